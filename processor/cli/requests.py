"""`cancelproc requests ...`: what support staff do with cancellation requests."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import contains_eager, joinedload

from processor import cancellations, outbox
from processor.cli.app import App, audit_rows, cli, pass_app, request_row, utc_now
from processor.cli.arguments import ADDON, CLIENT, DATE, MAX_DOMAIN, REQUEST, SERVICE, FreeTextType, ReasonCodeOption
from processor.cli.listing import echo_page, fetch_page, page_options
from processor.cli.output import echo_fields, echo_json, echo_table
from processor.cli.run import echo_summary
from processor.due import due_before_clause, request_due_on, request_is_due
from processor.emails import REQUEST_WITHDRAWN, SERVICE_UNSUSPENDED
from processor.errors import (
    CancelprocError,
    InputError,
    LeaseHeld,
    NotDue,
)
from processor.hooks import POINTS, HookFailed
from processor.models import (
    OPEN_REQUEST_STATUSES,
    REQUEST_TYPE_WORDS,
    AuditAction,
    AuditEntry,
    CancellationRequest,
    Credit,
    OutboxEmail,
    RequestStatus,
    RunTrigger,
    Service,
)
from processor.run import RunOptions
from processor.terms import terms_of
from processor.text import MAX_NOTE, MAX_REASON

REQUEST_TYPES = REQUEST_TYPE_WORDS


@cli.group("requests")
def requests_group() -> None:
    """Create, inspect, withdraw, retry and process cancellation requests.

    \b
    Examples:
      cancelproc requests list --client ext:C-88
      cancelproc requests create ext:1003 --reason-code too_expensive
    """


@requests_group.command("create")
@click.argument("service_id", type=SERVICE, metavar="SERVICE_ID|ext:ID")
@click.option("--type", "type_name", type=click.Choice(list(REQUEST_TYPES)), default="end-of-period", show_default=True)
@click.option("--reason-code", cls=ReasonCodeOption, required=True,
              help="Why the client cancels: one of the reason_codes setting.")
@click.option("--reason", default="", type=FreeTextType(MAX_REASON),
              help=f"Free text from the client (at most {MAX_REASON} characters).")
@click.option("--on", "cancel_on", type=DATE, help="The date, for --type on-date.")
@click.option("--addon", "addon_id", type=ADDON,
              help="Cancel only this add-on of the service (id or ext:ID); end-of-period: the add-on's own next "
                   "due date. The service stays.")
@click.option("--json", "as_json", is_flag=True, help="Print the request created as one JSON object (docs/json.md).")
@pass_app
def requests_create(app: App, service_id: int, type_name: str, reason_code: str, reason: str,
                    cancel_on: dt.date | None, addon_id: int | None, as_json: bool) -> int:
    """Record a cancellation request for SERVICE_ID (with --addon: for that add-on alone).

    \b
    One open request per service and one per add-on. An add-on request is refused while
    the service has an open request (which cancels its add-ons too); a service request
    made while add-on requests are open closes them when it is applied.

    \b
    The client's confirmation and the staff notice are queued with it and sent at once
    (email.send_after_create). Exit 1 if they could not be sent now: they stay queued and
    the next run or `emails send` retries them.

    \b
    Examples:
      cancelproc requests create ext:1003 --reason-code too_expensive
      cancelproc requests create 42 --type on-date --on 2026-12-31 --reason-code switched_service
      cancelproc requests create ext:1003 --addon ext:AD-7 --reason-code unused
    """
    database = app.database()
    hooks = app.hooks
    composer = app.composer()
    now = utc_now()
    try:
        with database.session.begin() as session:
            request = cancellations.create_request(
                session, service_id=service_id, type_=REQUEST_TYPES[type_name], reason_code=reason_code,
                reason=reason, allowed_reasons=app.settings.reason_codes, cancel_on=cancel_on,
                actor=app.operator, now=now, today=app.today(), terms_of=terms_of(app.settings),
                addon_id=addon_id,
            )
            not_queued = outbox.queue_request_emails(session, request.id, composer=composer, settings=app.settings,
                                                     now=now, actor=app.operator)
            row = request_row(request)
    except IntegrityError:
        # Another writer created an open request between our check and our insert.
        raise InputError(f"add-on {addon_id} already has an open request" if addon_id is not None
                         else f"service {service_id} already has an open request") from None
    except HookFailed as exc:  # fail closed: no request without its confirmation email
        raise CancelprocError(f"request not created: {exc}") from None
    cancellations.fire_request_created(database, hooks, row["id"], actor=app.operator)
    row["emails_not_queued"] = not_queued
    sent, not_sent, failed = (_send_request_emails(app, row["id"]) if app.settings.email.send_after_create
                              else (0, None, False))
    row["emails_sent"], row["emails_not_sent"] = sent, not_sent
    if as_json:
        echo_json(row)
    else:
        click.echo(f"request {row['id']} created for "
                   + (f"add-on {addon_id} of " if addon_id is not None else "")
                   + f"service {service_id} ({row['type'].value})"
                   + (f"; {row['emails_sent']} email(s) sent" if row["emails_sent"] else ""))
        for line in not_queued:
            click.echo(f"warning: {line}", err=True)
        if row["emails_not_sent"]:
            click.echo(f"warning: {row['emails_not_sent']}", err=True)
    return 1 if failed else 0


def _send_request_emails(app: App, request_id: int) -> tuple[int, str | None, bool]:
    """Send the emails just queued about the request: how many were sent, why any were
    not (None: all were), and whether that is a failure (exit 1) rather than another
    sender at work."""
    try:
        report = app.deliverer().deliver_request(request_id)
    except LeaseHeld as exc:
        return 0, f"emails left to the sender at work, which sends them ({exc})", False
    finally:
        app.write_metrics()
    if report.ok:
        return report.sent, None, False
    why = report.stopped or "; ".join(e["error"] for e in report.failed_emails) or "sending failed"
    return report.sent, (f"emails not sent: {why}; they stay queued for the next run or "
                         "`cancelproc emails send`"), True


@requests_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in RequestStatus]), help="Only requests in this state.")
@click.option("--client", "client_id", type=CLIENT, help="Only this client's requests (id or ext:ID).")
@click.option("--service", "service_id", type=SERVICE, help="Only requests for this service (id or ext:ID).")
@click.option("--domain", type=FreeTextType(MAX_DOMAIN),
              help="Only requests for services whose domain contains this (any case).")
@click.option("--type", "type_name", type=click.Choice(list(REQUEST_TYPES)), help="Only requests of this type.")
@click.option("--due-before", type=DATE, help="Only requests whose effective date (DUE_ON) is before this day.")
@click.option("--in-grace", is_flag=True,
              help="Only open requests in their grace period: the service suspended by a run, cancelled on "
                   "GRACE_ENDS_ON unless withdrawn.")
@page_options(50)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: total, limit, offset and rows (docs/json.md).")
@pass_app
def requests_list(app: App, status: str | None, client_id: int | None, service_id: int | None, domain: str | None,
                  type_name: str | None, due_before: dt.date | None, in_grace: bool, limit: int, offset: int,
                  as_json: bool) -> None:
    """List requests, newest first (by when they were made: an imported request keeps its
    date), with the client, the domain and the date each is due on.

    \b
    Examples:
      cancelproc requests list --status failed
      cancelproc requests list --client ext:C-88 --due-before 2026-12-31 --json
      cancelproc requests list --in-grace
    """
    r, s = CancellationRequest, Service
    query = select(r).outerjoin(s, s.id == r.service_id).order_by(r.created_at.desc(), r.id.desc())
    if status:
        query = query.where(r.status == RequestStatus(status))
    if service_id is not None:
        query = query.where(r.service_id == service_id)
    if client_id is not None:
        query = query.where(s.client_id == client_id)
    if domain:
        query = query.where(func.lower(s.domain).contains(domain.lower(), autoescape=True))
    if type_name:
        query = query.where(r.type == REQUEST_TYPES[type_name])
    if due_before is not None:
        query = query.where(due_before_clause(due_before))
    if in_grace:
        query = query.where(r.suspended_on.is_not(None), r.status.in_(OPEN_REQUEST_STATUSES))
    with app.database().read_session() as session:
        page = fetch_page(session, query, listed_request, limit=limit, offset=offset,
                          options=[contains_eager(r.service).joinedload(s.client), joinedload(r.addon)])
    echo_page(page, ["id", "client", "domain", "addon", "type", "due_on", "status", "grace_ends_on", "reason_code",
                     "attempts", "created_at", "last_error"], as_json=as_json, empty="no requests")


def listed_request(request: CancellationRequest) -> dict[str, Any]:
    """A request as `requests list` and `find` show it: with its client, domain and date."""
    row = request_row(request)
    service = request.service
    client = service.client if service else None
    row.update(client_id=service.client_id if service else None, client=client.name if client else None,
               domain=service.domain if service else None,
               addon=request.addon.name if request.addon else None, due_on=request_due_on(request))
    return row


@requests_group.command("show")
@click.argument("request_id", type=REQUEST, metavar="REQUEST_ID|ext:ID")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (docs/json.md).")
@pass_app
def requests_show(app: App, request_id: int, as_json: bool) -> None:
    """One request: whether it is due, its emails, what hooks did to it, its audit trail.

    \b
    Examples:
      cancelproc requests show 42
      cancelproc requests show ext:R-1001 --json
    """
    with app.database().read_session() as session:
        request = cancellations.get_request(session, request_id)
        service = request.service  # None if deleted outside cancelproc (foreign keys off)
        row = request_row(request)
        row["due_on"] = request_due_on(request)
        # As the run decides: due by its date, and not waiting out a backoff (due.ready_clause).
        row["due_now"] = (service is not None and request.status is RequestStatus.PENDING
                          and request_is_due(request, None, app.today())
                          and (request.next_attempt_at is None or request.next_attempt_at <= utc_now()))
        client = service.client if service else None
        row["service"] = service and {"id": service.id, "external_id": service.external_id, "status": service.status,
                                      "domain": service.domain, "next_due_date": service.next_due_date,
                                      "termination_date": service.termination_date}
        row["client"] = client and {"id": client.id, "external_id": client.external_id, "name": client.name,
                                    "email": client.email}
        addon = request.addon
        row["addon"] = addon and {"id": addon.id, "external_id": addon.external_id, "name": addon.name,
                                  "status": addon.status, "next_due_date": addon.next_due_date}
        row["audit"] = audit_rows(session.scalars(
            select(AuditEntry).where(AuditEntry.request_id == request_id).order_by(AuditEntry.id)).all())
        row["emails"] = [email_summary(e) for e in session.scalars(
            select(OutboxEmail).where(OutboxEmail.request_id == request_id).order_by(OutboxEmail.id))]
        credit = session.scalars(select(Credit).where(Credit.request_id == request_id)).one_or_none()
        row["credit"] = credit and {
            "id": credit.id, "amount": credit.amount, "client_id": credit.client_id, "run_id": credit.run_id,
            "invoice_id": credit.invoice_id, "period_start": credit.period_start, "period_end": credit.period_end,
            "days_unused": credit.days_unused, "days_in_period": credit.days_in_period,
            "created_at": credit.created_at}
    row["hook_outcomes"] = hook_outcomes(row["audit"])
    if as_json:
        echo_json(row)
        return
    _echo_request(row)


def email_summary(e: OutboxEmail) -> dict[str, Any]:
    """An email in a request's or a service's record (`emails show ID` has all of it)."""
    return {"id": e.id, "template": e.template, "to": e.to_address, "subject": e.subject, "status": e.status,
            "attempts": e.attempts, "created_at": e.created_at, "sent_at": e.sent_at, "last_error": e.last_error}


def hook_outcomes(audit: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What hooks did to the request, as its audit trail records it: a PreModuleTerminate
    veto, an EmailPreSend abortsend, or a hook that failed an attempt (HookFailed's
    "POINT hook LABEL: ..." in the detail)."""
    outcomes = []
    for entry in audit:
        point = POINT_OF_ACTION.get(entry["action"]) or next(
            (name for name in POINTS if f"{name} hook " in entry["detail"]), None)
        if point:
            outcomes.append({"at": entry["at"], "run_id": entry["run_id"], "point": point, "action": entry["action"],
                             "detail": entry["detail"]})
    return outcomes


POINT_OF_ACTION = {AuditAction.VETOED: "PreModuleTerminate", AuditAction.ABORTED: "EmailPreSend"}


def _echo_request(row: dict[str, Any]) -> None:
    echo_fields([(k, row[k]) for k in ("id", "external_id", "service_id", "addon_id", "type", "cancel_on", "due_on",
                                       "due_now", "status", "suspended_on", "grace_ends_on", "reason_code", "reason",
                                       "attempts", "last_error", "next_attempt_at",
                                       "created_at", "created_by", "processed_at", "run_id", "days_late", "note")])
    service, client = row["service"], row["client"]
    click.echo(f"service     {service['id']} {service['domain']} ({service['status'].value}, "
               f"next due {service['next_due_date'] or '-'})" if service
               else f"service     {row['service_id']} no longer exists (deleted outside cancelproc)")
    if client:
        click.echo(f"client      {client['id']} {client['name']} <{client['email'] or '-'}>")
    addon = row["addon"]
    if addon:  # a request for this add-on alone
        click.echo(f"add-on      {addon['id']} {addon['name']} ({addon['status'].value}, "
                   f"next due {addon['next_due_date'] or '-'})")
    credit = row["credit"]
    if credit:
        click.echo(f"credit      {credit['amount']} for {credit['days_unused']} of {credit['days_in_period']} days "
                   f"unused of {credit['period_start']}..{credit['period_end']} (invoice #{credit['invoice_id']}, "
                   f"credit #{credit['id']})")
    for title, key, columns in (("emails", "emails", ["id", "template", "to", "status", "attempts", "sent_at",
                                                      "last_error"]),
                                ("hook outcomes", "hook_outcomes", ["at", "run_id", "point", "action", "detail"]),
                                ("audit trail", "audit", ["at", "actor", "run_id", "entity", "entity_id", "action",
                                                          "detail"])):
        click.echo(f"{title}:")
        echo_table(row[key], columns, empty="  (none)")


@requests_group.command("withdraw")
@click.argument("request_id", type=REQUEST, metavar="REQUEST_ID|ext:ID")
@click.option("--note", default="", type=FreeTextType(MAX_NOTE), help="Why (goes into the audit log).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: the request's id and status, the emails withdrawn, sent and not sent.")
@pass_app
def requests_withdraw(app: App, request_id: int, note: str, as_json: bool) -> int:
    """Withdraw a pending (or failed) request: the service stays as it is.

    \b
    Emails about the request still queued (its confirmation, the staff notice) are not
    sent: `emails list` shows them withdrawn. The client gets Cancellation Request
    Withdrawn, saying the service continues, sent at once (email.send_after_create).
    Exit 1 if it could not be sent now: it stays queued for the next run or `emails send`.

    \b
    A request in its grace period (its service suspended, grace_days) is withdrawn
    with its suspension undone: the UnsuspendAccount hooks, the service Active again,
    and the client gets Service Unsuspended instead. If UnsuspendAccount fails,
    nothing changes (exit 2): the request stays in its grace period; try again.

    \b
    Examples:
      cancelproc requests withdraw ext:R-1001 --note "client changed their mind"
    """
    database, hooks, composer = app.database(), app.hooks, app.composer()
    now = utc_now()
    try:
        with database.session.begin() as session:
            unsuspended = cancellations.withdraw_request(session, request_id, actor=app.operator, now=now, note=note,
                                                         hooks=hooks, today=app.today()).unsuspended
            held = [e.id for e in outbox.withdraw_queued_emails(session, request_id, now=now, actor=app.operator)]
            not_queued = outbox.queue_request_emails(
                session, request_id, composer=composer, settings=app.settings, now=now, actor=app.operator,
                templates=(SERVICE_UNSUSPENDED if unsuspended else REQUEST_WITHDRAWN,))
    except HookFailed as exc:  # fail closed, as `create`: no withdrawal the client is not told of
        raise CancelprocError(f"request not withdrawn: {exc}"
                              + ("; its service stays suspended" if exc.impl.point == "UnsuspendAccount" else "")
                              ) from None
    cancellations.fire_request_withdrawn(database, hooks, request_id, actor=app.operator, note=note)
    sent, not_sent, failed = (_send_request_emails(app, request_id) if app.settings.email.send_after_create
                              else (0, None, False))
    if as_json:
        echo_json({"id": request_id, "status": RequestStatus.WITHDRAWN.value, "unsuspended": unsuspended,
                   "emails_withdrawn": held,
                   "emails_not_queued": not_queued, "emails_sent": sent, "emails_not_sent": not_sent})
    else:
        click.echo(f"request {request_id} withdrawn"
                   + ("; its service is Active again (it was suspended in its grace period)" if unsuspended else "")
                   + (f"; {len(held)} queued email(s) about it will not be sent" if held else "")
                   + (f"; {sent} email(s) sent" if sent else ""))
        for line in [*not_queued, *([not_sent] if not_sent else [])]:
            click.echo(f"warning: {line}", err=True)
    return 1 if failed else 0


@requests_group.command("retry")
@click.argument("request_id", type=REQUEST, metavar="REQUEST_ID|ext:ID")
@pass_app
def requests_retry(app: App, request_id: int) -> None:
    """Put a failed request (or one waiting for its next attempt) back in line for the next run.

    \b
    Examples:
      cancelproc requests retry 42
    """
    with app.database().session.begin() as session:
        cancellations.retry_request(session, request_id, actor=app.operator, now=utc_now())
    click.echo(f"request {request_id} is pending again (attempts reset); the next run applies it when due")


@requests_group.command("resolve")
@click.argument("request_id", type=REQUEST, metavar="REQUEST_ID|ext:ID")
@click.option("--note", required=True, type=FreeTextType(MAX_NOTE),
              help="What was done by hand (goes into the audit log).")
@pass_app
def requests_resolve(app: App, request_id: int, note: str) -> None:
    """Close a request whose service staff cancelled by hand (the service is not touched).

    A failed request, or a pending one waiting out the backoff of a failed or vetoed
    attempt. The note goes into the request and its audit trail.

    \b
    Examples:
      cancelproc requests resolve 42 --note "terminated in the panel by hand"
      cancelproc requests resolve ext:R-1001 --note "vetoed: billing hold lifted, cancelled by hand"
    """
    with app.database().session.begin() as session:
        cancellations.resolve_request(session, request_id, actor=app.operator, now=utc_now(), note=note)
    click.echo(f"request {request_id} resolved by hand")


@requests_group.command("process")
@click.argument("request_ids", type=REQUEST, nargs=-1, required=True, metavar="REQUEST_ID|ext:ID...")
@click.option("--now", "ignore_due_date", is_flag=True, help="Apply even if the request is not due yet.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the run's summary as one JSON object, as `run --json` (docs/json.md).")
@pass_app
def requests_process(app: App, request_ids: tuple[int, ...], ignore_due_date: bool, as_json: bool) -> int:
    """Apply these requests at once, as a run limited to them.

    \b
    Examples:
      cancelproc requests process 42
      cancelproc requests process ext:R-1001 ext:R-1002 --now --json
    """
    today = app.today()
    try:
        with app.database().read_session() as session:
            cancellations.check_processable(session, request_ids, today=today, zone=app.settings.zone,
                                            ignore_due_date=ignore_due_date)
    except NotDue as exc:
        raise InputError(f"{exc}; add --now to apply it before its due date") from None
    options = RunOptions(as_of=today, trigger=RunTrigger.MANUAL, operator=app.operator,
                         request_ids=list(request_ids), ignore_due_date=ignore_due_date, digest=False)
    summary = app.runner().run(options)
    if as_json:
        echo_json(summary.as_dict())
    else:
        echo_summary(summary)
    return summary.exit_code
