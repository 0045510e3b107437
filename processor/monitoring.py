"""Health of the processor, for the on-call operator and for Prometheus.

`health()` reads the database once: the last runs, the requests and emails that need
attention, the lease. `cancelproc status` prints it (exit non-zero with one line per
problem), and `write_metrics()` writes it after each run as a Prometheus text file for
node_exporter's textfile collector (written atomically by prometheus_client).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from sqlalchemy import ColumnElement, func, select

from processor.attention import Attention
from processor.config import Settings
from processor.db import Database
from processor.due import business_today, due_clause, join_addon, period_end_sql, ready_clause, start_of_day
from processor.models import (
    CancellationRequest,
    EmailStatus,
    Lease,
    OutboxEmail,
    RequestStatus,
    RequestType,
    Run,
    RunStatus,
    RunTrigger,
    Service,
)

SUCCESSFUL = (RunStatus.COMPLETED, RunStatus.COMPLETED_WITH_FAILURES)
# The nightly job's runs. A manual run (or a staff `requests process`) does work too, but
# must not keep a dead crontab or scheduler looking healthy.
SCHEDULED = (RunTrigger.CRON, RunTrigger.SCHEDULE)
R = CancellationRequest


@dataclass
class RunInfo:
    id: int
    trigger: str
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    duration_seconds: float | None
    # Run.REQUEST_COUNTS, then Run.DELIVERY_COUNTS
    due: int
    completed: int
    noop: int
    retrying: int
    failed: int
    vetoed: int
    emails_sent: int
    emails_failed: int
    error: str | None

    @classmethod
    def of(cls, run: Run) -> RunInfo:
        duration = (run.finished_at - run.started_at).total_seconds() if run.finished_at else None
        counts: dict[str, int] = {k: getattr(run, k) for k in (*Run.REQUEST_COUNTS, *Run.DELIVERY_COUNTS)}
        return cls(id=run.id, trigger=run.trigger.value, status=run.status.value, started_at=run.started_at,
                   finished_at=run.finished_at,
                   duration_seconds=duration, error=run.error, **counts)


@dataclass
class LeaseInfo:
    name: str
    run_id: int | None
    host: str
    pid: int
    acquired_at: dt.datetime
    expires_at: dt.datetime
    stale: bool  # expired: its holder stopped renewing it (died, or hung)


@dataclass
class Health:
    checked_at: dt.datetime
    last_run: RunInfo | None
    last_successful_run: RunInfo | None  # of any trigger
    last_scheduled_run: RunInfo | None  # trigger cron or schedule: the nightly job
    last_successful_scheduled_run: RunInfo | None  # what `status` and the metrics judge
    last_success_age_hours: float | None  # of the last successful scheduled run
    requests_pending: int
    requests_due: int  # what the next run would take: pending, due today, not waiting out a backoff
    requests_failed: int  # manual cancellation required
    oldest_due_request_age_seconds: float | None
    emails_queued: int
    emails_failed: int
    oldest_queued_email_age_seconds: float | None
    emails_untried: int  # queued and not tried once
    oldest_untried_email_age_seconds: float | None
    leases: list[LeaseInfo] = field(default_factory=list)
    failed_before_run: Attention | None = None  # the nightly job stopped before its run began (attention.py)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


def _age(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return _seconds_since(now, then) if then else None


def _seconds_since(now: dt.datetime, then: dt.datetime) -> float:
    return max(0.0, (now - then).total_seconds())  # never negative, whatever the clocks say


def due_now(settings: Settings, now: dt.datetime) -> tuple[ColumnElement[bool], ...]:
    """What the next run would take: pending, due today, and not waiting out a backoff (a
    failed or vetoed attempt); the same rule as the run's due query."""
    return (R.status == RequestStatus.PENDING, due_clause(business_today(now, settings.zone), settings.zone),
            ready_clause(now))


def _oldest_due(session: Any, settings: Settings, now: dt.datetime) -> dt.datetime | None:
    """When the longest-waiting due request became due: an Immediate (or undated) one when
    it was made, a dated one at the start of its date in the business time zone."""
    zone = settings.zone
    due = join_addon(session.query(R).join(Service, Service.id == R.service_id)).filter(*due_now(settings, now))
    end = period_end_sql()
    undated = (R.type == RequestType.IMMEDIATE) | ((R.type == RequestType.END_OF_BILLING_PERIOD) & end.is_(None))
    made = due.filter(undated).with_entities(func.min(R.created_at)).scalar()
    on_date = due.filter(R.type == RequestType.ON_DATE).with_entities(func.min(R.cancel_on)).scalar()
    period = due.filter(R.type == RequestType.END_OF_BILLING_PERIOD, end.is_not(None)) \
        .with_entities(func.min(end)).scalar()
    moments = [made] + [start_of_day(day, zone) for day in (on_date, period) if day is not None]
    return min((m for m in moments if m is not None), default=None)


def health(db: Database, settings: Settings, *, now: dt.datetime, max_age_hours: float,
           failed_before_run: Attention | None = None) -> Health:
    """The processor's state, and the problems an operator must look at."""
    with db.read_session() as s:
        last = s.scalars(select(Run).order_by(Run.id.desc()).limit(1)).one_or_none()
        success = s.scalars(
            select(Run).where(Run.status.in_(SUCCESSFUL)).order_by(Run.id.desc()).limit(1)).one_or_none()
        scheduled = s.scalars(
            select(Run).where(Run.trigger.in_(SCHEDULED)).order_by(Run.id.desc()).limit(1)).one_or_none()
        nightly = s.scalars(select(Run).where(Run.status.in_(SUCCESSFUL), Run.trigger.in_(SCHEDULED))
                            .order_by(Run.id.desc()).limit(1)).one_or_none()
        requests = dict(s.execute(select(R.status, func.count()).group_by(R.status)).all())
        due = s.scalar(join_addon(select(func.count()).select_from(R).join(Service, Service.id == R.service_id))
                       .where(*due_now(settings, now))) or 0
        emails = dict(s.execute(select(OutboxEmail.status, func.count()).group_by(OutboxEmail.status)).all())
        oldest_email = s.scalar(
            select(func.min(OutboxEmail.created_at)).where(OutboxEmail.status == EmailStatus.QUEUED))
        untried, oldest_untried = s.execute(select(func.count(), func.min(OutboxEmail.created_at)).where(
            OutboxEmail.status == EmailStatus.QUEUED, OutboxEmail.attempts == 0)).one()
        oldest_due = _oldest_due(s, settings, now)
        leases = [LeaseInfo(le.name, le.run_id, le.host, le.pid, le.acquired_at, le.expires_at, le.expires_at <= now)
                  for le in s.scalars(select(Lease).order_by(Lease.name))]
        h = Health(
            checked_at=now,
            last_run=RunInfo.of(last) if last else None,
            last_successful_run=RunInfo.of(success) if success else None,
            last_scheduled_run=RunInfo.of(scheduled) if scheduled else None,
            last_successful_scheduled_run=RunInfo.of(nightly) if nightly else None,
            last_success_age_hours=round(_seconds_since(now, nightly.finished_at) / 3600, 2)
            if nightly and nightly.finished_at else None,
            requests_pending=requests.get(RequestStatus.PENDING, 0),
            requests_due=due,
            requests_failed=requests.get(RequestStatus.FAILED, 0),
            oldest_due_request_age_seconds=_age(now, oldest_due),
            emails_queued=emails.get(EmailStatus.QUEUED, 0),
            emails_failed=emails.get(EmailStatus.FAILED, 0),
            oldest_queued_email_age_seconds=_age(now, oldest_email),
            emails_untried=untried,
            oldest_untried_email_age_seconds=_age(now, oldest_untried),
            leases=leases,
            failed_before_run=failed_before_run,
        )
    h.problems = _problems(h, max_age_hours)
    return h


def _problems(h: Health, max_age_hours: float) -> list[str]:
    """One line per thing to look at (WHMCS mails 'Daily System Cron Attention Needed')."""
    problems = [h.failed_before_run.line()] if h.failed_before_run else []
    nightly, scheduled = h.last_successful_scheduled_run, h.last_scheduled_run
    if nightly is None:
        tried = (f" (the last, {scheduled.id}, ended {scheduled.status})" if scheduled else "")
        problems.append(f"no scheduled run (cron or schedule) has completed yet{tried}: "
                        "is `cancelproc run` in the crontab?")
    elif h.last_success_age_hours is not None and h.last_success_age_hours > max_age_hours:
        last_tried = (f"; the last scheduled run, {scheduled.id}, ended {scheduled.status}"
                      if scheduled and scheduled.id != nightly.id else "")
        problems.append(f"the last successful scheduled run ({nightly.id}, {nightly.trigger}) finished "
                        f"{h.last_success_age_hours:.1f} hours ago (more than {max_age_hours:g}){last_tried}: "
                        "is cron running it?")
    if h.last_run is not None and h.last_run.status in (RunStatus.ERROR, RunStatus.ABANDONED):
        problems.append(f"the last run ({h.last_run.id}) ended {h.last_run.status}: {h.last_run.error or '-'}")
    if h.requests_failed:
        problems.append(f"{h.requests_failed} request(s) need a manual cancellation: "
                        "cancelproc requests list --status failed")
    # Emails never even tried for that long: delivery is not running, or it stops at the
    # first email (a relay down, an unwritable folder). One that is tried and waits out its
    # backoff (a greylisting recipient) is no sign of that; it ends sent or failed.
    untried_hours = (h.oldest_untried_email_age_seconds or 0) / 3600
    if untried_hours > max_age_hours:
        problems.append(f"{h.emails_untried} queued email(s) never tried, the oldest queued {untried_hours:.1f} hours "
                        f"ago (more than {max_age_hours:g}): is delivery working? cancelproc emails send")
    if h.emails_failed:
        problems.append(f"{h.emails_failed} email(s) failed: cancelproc emails list --status failed")
    for lease in h.leases:
        if lease.stale:
            holder = f"run {lease.run_id}" if lease.run_id else "email delivery"
            problems.append(f"{holder} on host {lease.host} (pid {lease.pid}) stopped renewing its lease at "
                            f"{lease.expires_at:%Y-%m-%d %H:%M} UTC: it died or hangs (the next run takes over)")
    return problems


def write_metrics(path: Path, h: Health) -> None:
    """The health as Prometheus gauges, written atomically (a temp file renamed)."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    gauge("cancelproc_metrics_timestamp_seconds", "When these metrics were written").set(h.checked_at.timestamp())
    last, success = h.last_run, h.last_successful_scheduled_run
    if last is not None:
        gauge("cancelproc_last_run_id", "The last run's id").set(last.id)
        gauge("cancelproc_last_run_start_timestamp_seconds", "When the last run started").set(
            last.started_at.timestamp())
        if last.duration_seconds is not None:
            gauge("cancelproc_last_run_duration_seconds", "How long the last run took").set(last.duration_seconds)
        gauge("cancelproc_last_run_error", "1 if the last run ended in error or was abandoned").set(
            float(last.status in (RunStatus.ERROR, RunStatus.ABANDONED)))
        by_outcome = gauge("cancelproc_last_run_requests", "Requests of the last run by outcome", ("outcome",))
        for outcome in Run.REQUEST_COUNTS:
            by_outcome.labels(outcome).set(getattr(last, outcome))
        emails = gauge("cancelproc_last_run_emails", "Emails delivered at the end of the last run", ("outcome",))
        emails.labels("sent").set(last.emails_sent)
        emails.labels("failed").set(last.emails_failed)
    if success is not None and success.finished_at is not None:
        gauge("cancelproc_last_success_timestamp_seconds",
              "When the last successful scheduled run (trigger cron or schedule) finished").set(
            success.finished_at.timestamp())
    requests = gauge("cancelproc_requests", "Requests by status", ("status",))
    requests.labels("pending").set(h.requests_pending)
    requests.labels("failed").set(h.requests_failed)
    gauge("cancelproc_requests_due", "Pending requests due today").set(h.requests_due)
    gauge("cancelproc_oldest_due_request_age_seconds",
          "How long the longest-waiting due request has been due (0: none)").set(h.oldest_due_request_age_seconds or 0)
    outbox = gauge("cancelproc_emails", "Emails in the outbox by status", ("status",))
    outbox.labels("queued").set(h.emails_queued)
    outbox.labels("failed").set(h.emails_failed)
    gauge("cancelproc_oldest_queued_email_age_seconds",
          "How long the oldest queued email has waited (0: none)").set(h.oldest_queued_email_age_seconds or 0)
    gauge("cancelproc_problems", "Problems `cancelproc status` reports").set(len(h.problems))
    _failed_before_run_gauge(registry, h.failed_before_run)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)


def _failed_before_run_gauge(registry: CollectorRegistry, attention: Attention | None) -> None:
    Gauge("cancelproc_failed_before_run", "Failures in a row of the nightly job before its run began (0: none)",
          registry=registry).set(attention.failures if attention else 0)


def write_failure_metrics(path: Path, attention: Attention, now: dt.datetime) -> None:
    """The metrics when the database cannot be read: only what is known (the failure)."""
    registry = CollectorRegistry()
    Gauge("cancelproc_metrics_timestamp_seconds", "When these metrics were written",
          registry=registry).set(now.timestamp())
    Gauge("cancelproc_problems", "Problems `cancelproc status` reports", registry=registry).set(1)
    _failed_before_run_gauge(registry, attention)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
