"""The staff digest (Cron Job Activity): what a run did, queued after the run for staff.

It names every request that did not go through (those that need a manual cancellation
first), how late catch-up requests were, and emails that could not be delivered.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, select
from sqlalchemy.orm import Session

from processor.config import Settings
from processor.emails import CRON_JOB_ACTIVITY, format_date
from processor.errors import NotFound
from processor.models import (
    FAILURE_ACTIONS,
    AuditAction,
    AuditEntity,
    AuditEntry,
    CancellationRequest,
    Client,
    EmailStatus,
    OutboxEmail,
    Run,
    Service,
)
from processor.outbox import Composed, Composer, email_key, queue

MAX_LISTED = 200  # failures named in the digest; the rest are counted, `runs show` has them all


def digest_fields(conn: Connection, run_id: int, summary: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The digest's merge fields: the run summary plus what it names."""
    zone = settings.zone
    run = conn.execute(select(Run.as_of, Run.trigger, Run.operator, Run.host, Run.started_at, Run.finished_at)
                       .where(Run.id == run_id)).one()
    failures = sorted(summary["failures"], key=lambda f: (not f["gave_up"], f["request_id"]))
    listed = failures[:MAX_LISTED]
    about = {row.id: row for row in conn.execute(
        select(CancellationRequest.id, CancellationRequest.attempts, Service.domain, Client.first_name,
               Client.last_name)
        # Outer joins: a failure may be that the service or its client is gone.
        .outerjoin(Service, Service.id == CancellationRequest.service_id)
        .outerjoin(Client, Client.id == Service.client_id)
        .where(CancellationRequest.id.in_([f["request_id"] for f in listed])))}
    late_by_days = [{"days": days, "count": count} for days, count in conn.execute(
        select(CancellationRequest.days_late, func.count())
        .where(CancellationRequest.run_id == run_id, CancellationRequest.days_late > 0)
        .group_by(CancellationRequest.days_late).order_by(CancellationRequest.days_late.desc()))]
    outbox = dict(conn.execute(select(OutboxEmail.status, func.count()).group_by(OutboxEmail.status)).all())

    def local(moment: dt.datetime | None) -> str:
        return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z") if moment else "-"

    return {
        **{k: summary[k] for k in (*Run.COUNTS, "skipped")},
        "run_id": run_id, "as_of": format_date(run.as_of), "status": str(summary["status"]).replace("_", " "),
        "trigger": run.trigger.value, "operator": run.operator, "host": run.host,
        "started_at": local(run.started_at), "finished_at": local(run.finished_at),
        "late_by_days": late_by_days,
        "failures": [{**f, "client_name": _name(about[f["request_id"]]), "domain": about[f["request_id"]].domain,
                      "attempts": about[f["request_id"]].attempts}
                     for f in listed if f["request_id"] in about],
        "failures_not_listed": len(failures) - len(listed),
        "failed_emails": summary.get("failed_emails", []),
        "emails_failed_total": outbox.get(EmailStatus.FAILED, 0),
        # The run's retrying emails are queued too: counted once, as retrying (README, "Email counts").
        "emails_retrying": summary.get("emails_retrying", 0),
        "emails_queued_now": max(0, outbox.get(EmailStatus.QUEUED, 0) - summary.get("emails_retrying", 0)),
        "delivery_error": summary.get("delivery_error") or "",
    }


def queue_digest(conn: Connection, composer: Composer, *, run_id: int, summary: dict[str, Any], now: dt.datetime,
                 settings: Settings) -> int | None:
    """Queue the digest of this run to staff: its outbox id; None when an EmailPreSend hook
    aborted it."""
    fields = {**composer.common_fields(now.astimezone(settings.zone).date()),
              **digest_fields(conn, run_id, summary, settings)}
    key = email_key(CRON_JOB_ACTIVITY, "run", run_id)
    composed = composer.compose(CRON_JOB_ACTIVITY, key=key, to_address=settings.email.staff_address, fields=fields,
                                run_id=run_id)
    if composed.email is None:
        return None
    queue(conn, [composed.email], run_id=run_id, now=now, from_address=settings.email.from_address)
    digest_id: int = conn.execute(select(OutboxEmail.id).where(OutboxEmail.key == key)).scalar_one()
    return digest_id


def _name(row: Any) -> str:
    return f"{row.first_name or ''} {row.last_name or ''}".strip() or "(client unknown)"


def failure_entries(run_id: int) -> ColumnElement[bool]:
    """The audit rows that record a run's failures: its requests that failed an attempt, were
    vetoed, or were given up (FAILURE_ACTIONS). The digest and `runs show` name these."""
    return and_(AuditEntry.run_id == run_id, AuditEntry.entity == AuditEntity.REQUEST,
                AuditEntry.action.in_(FAILURE_ACTIONS))


def recorded_failures(conn: Connection | Session, run_id: int) -> list[dict[str, Any]]:
    """The requests of a run that did not go through, as its audit rows record them (every
    process that worked on the run wrote its own)."""
    return [
        {"request_id": request_id, "service_id": service_id, "error": detail,
         "gave_up": action == AuditAction.FAILED, "vetoed": action == AuditAction.VETOED}
        for request_id, service_id, detail, action in conn.execute(
            select(AuditEntry.request_id, CancellationRequest.service_id, AuditEntry.detail, AuditEntry.action)
            .join(CancellationRequest, CancellationRequest.id == AuditEntry.request_id)
            .where(failure_entries(run_id))
            .order_by(AuditEntry.id))
    ]


def summary_of_run(conn: Connection, run_id: int) -> dict[str, Any]:
    """A past run's summary as the digest reads it, from its record and audit rows."""
    run = conn.execute(select(*Run.__table__.c).where(Run.id == run_id)).one_or_none()
    if run is None:
        raise NotFound(f"run {run_id} not found")
    failures = recorded_failures(conn, run_id)
    failed_emails = [
        {"id": e.id, "template": e.template, "to_address": e.to_address, "error": e.last_error}
        for e in conn.execute(select(OutboxEmail).where(OutboxEmail.run_id == run_id,
                                                        OutboxEmail.status == EmailStatus.FAILED)).scalars()
    ]
    counts = {k: getattr(run, k) for k in Run.COUNTS}
    return {**counts, "skipped": 0, "status": run.status.value, "failures": failures, "failed_emails": failed_emails,
            "delivery_error": ""}


def preview_digest(conn: Connection, composer: Composer, run_id: int, *, now: dt.datetime,
                   settings: Settings) -> Composed:
    """The digest of a past run as it would be queued now; nothing is written."""
    composer.check(CRON_JOB_ACTIVITY)
    fields = {**composer.common_fields(now.astimezone(settings.zone).date()),
              **digest_fields(conn, run_id, summary_of_run(conn, run_id), settings)}
    return composer.compose(CRON_JOB_ACTIVITY, key=email_key(CRON_JOB_ACTIVITY, "run", run_id),
                            to_address=settings.email.staff_address, fields=fields, run_id=run_id, dry_run=True)
