"""Looking at what happened: `runs`, `services`, `report` and `status`."""

from __future__ import annotations

import csv
import datetime as dt
import enum
import io
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import joinedload

from processor import attention, cancellations, monitoring, reports
from processor import report_html as report_html_page
from processor.cli.app import App, audit_rows, cli, pass_app, request_row, utc_now
from processor.cli.arguments import CLIENT, DATE, HOURS, MAX_DOMAIN, SERVICE, FreeTextType, RunRefType
from processor.cli.listing import echo_page, fetch_page, page_options
from processor.cli.output import (
    cell,
    echo_fields,
    echo_json,
    echo_table,
    to_jsonable,
)
from processor.cli.requests import email_summary
from processor.digest import failure_entries
from processor.emails import CANCELLATION_REMINDER
from processor.errors import (
    CancelprocError,
    InputError,
    NotFound,
)
from processor.files import write_atomically
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Invoice,
    OutboxEmail,
    Run,
    Service,
    ServiceAddon,
    ServiceStatus,
)

# --- runs --------------------------------------------------------------------------------

def _run_row(r: Run) -> dict[str, Any]:
    return {k: getattr(r, k) for k in ("id", "trigger", "operator", "as_of", "host", "pid", "status", "started_at",
                                       "finished_at", *Run.COUNTS, "error")}


@cli.group("runs")
def runs_group() -> None:
    """Inspect past runs.

    \b
    Examples:
      cancelproc runs list
      cancelproc runs show last
    """


@runs_group.command("list")
@page_options(20)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: total, limit, offset and rows (docs/json.md).")
@pass_app
def runs_list(app: App, limit: int, offset: int, as_json: bool) -> None:
    """Recent runs, newest first.

    \b
    Examples:
      cancelproc runs list --limit 5
      cancelproc runs list --limit 0 --json
    """
    with app.database().read_session() as session:
        page = fetch_page(session, select(Run).order_by(Run.id.desc()), _run_row, limit=limit, offset=offset)
    echo_page(page, ["id", "started_at", "trigger", "operator", "as_of", "status", *Run.REQUEST_COUNTS,
                     *Run.LATENESS_COUNTS], as_json=as_json, empty="no runs yet")


@runs_group.command("show")
@click.argument("run_ref", metavar="RUN_ID|last", type=RunRefType())
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object, with the failures and the late requests (docs/json.md).")
@pass_app
def runs_show(app: App, run_ref: int | str, as_json: bool) -> None:
    """One run: counts, lateness and each failure.

    \b
    Examples:
      cancelproc runs show last
      cancelproc runs show 12 --json
    """
    with app.database().read_session() as session:
        if run_ref == "last":
            run_obj = session.scalars(select(Run).order_by(Run.id.desc()).limit(1)).one_or_none()
            if run_obj is None:
                raise NotFound("no runs yet")
        else:
            run_obj = session.get(Run, run_ref)
            if run_obj is None:
                raise NotFound(f"run {run_ref} not found")
        row = _run_row(run_obj)
        # The reminders it queued: outbox rows of the run (reminders.py), not a column of it.
        row["reminders_queued"] = session.scalar(select(func.count()).select_from(OutboxEmail).where(
            OutboxEmail.run_id == run_obj.id, OutboxEmail.template == CANCELLATION_REMINDER))
        row["failures"] = audit_rows(session.scalars(
            select(AuditEntry).where(failure_entries(run_obj.id)).order_by(AuditEntry.id)).all())
        row["late_requests"] = [
            {"request_id": r.id, "service_id": r.service_id, "days_late": r.days_late}
            for r in session.scalars(select(CancellationRequest).where(
                CancellationRequest.run_id == run_obj.id, CancellationRequest.days_late > 0)
                .order_by(CancellationRequest.days_late.desc()).limit(20))
        ]
    if as_json:
        echo_json(row)
        return
    echo_fields([(k, row[k]) for k in (*_run_row(run_obj), "reminders_queued")])
    if row["late_requests"]:
        click.echo("latest applied (catch-up):")
        echo_table(row["late_requests"], ["request_id", "service_id", "days_late"])
    click.echo("failures:")
    echo_table(row["failures"], ["at", "entity_id", "action", "detail"], empty="  (none)")


# --- services ----------------------------------------------------------------------------

GONE = "(deleted outside cancelproc)"  # a client or product row removed with the foreign keys off


def service_row(s: Service) -> dict[str, Any]:
    return {"id": s.id, "external_id": s.external_id, "client_id": s.client_id,
            "client": s.client.name if s.client else f"#{s.client_id} {GONE}",
            "product": s.product.name if s.product else f"#{s.product_id} {GONE}", "domain": s.domain,
            "status": s.status, "billing_cycle": s.billing_cycle, "amount": s.amount,
            "next_due_date": s.next_due_date, "termination_date": s.termination_date,
            "registration_date": s.registration_date, "subscription_id": s.subscription_id}


@cli.group("services")
def services_group() -> None:
    """Inspect services.

    \b
    Examples:
      cancelproc services show ext:1003
      cancelproc services list --domain example.com
    """


@services_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in ServiceStatus], case_sensitive=False))
@click.option("--client", "client_id", type=CLIENT, help="Only this client's services (id or ext:ID).")
@click.option("--domain", type=FreeTextType(MAX_DOMAIN), help="Only services whose domain contains this (any case).")
@page_options(50)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: total, limit, offset and rows (docs/json.md).")
@pass_app
def services_list(app: App, status: str | None, client_id: int | None, domain: str | None, limit: int, offset: int,
                  as_json: bool) -> None:
    """List services, in id order.

    \b
    Examples:
      cancelproc services list --client ext:C-88
      cancelproc services list --domain example.com --status active
    """
    query = select(Service).order_by(Service.id)
    if status:
        query = query.where(Service.status == ServiceStatus(status.capitalize()))
    if client_id is not None:
        query = query.where(Service.client_id == client_id)
    if domain:
        query = query.where(func.lower(Service.domain).contains(domain.lower(), autoescape=True))
    with app.database().read_session() as session:
        page = fetch_page(session, query, service_row, limit=limit, offset=offset,
                          options=[joinedload(Service.client), joinedload(Service.product)])
    echo_page(page, ["id", "external_id", "client", "product", "domain", "status", "billing_cycle", "next_due_date",
                     "termination_date"], as_json=as_json, empty="no services")


@services_group.command("show")
@click.argument("service_id", type=SERVICE, metavar="SERVICE_ID|ext:ID")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object, with add-ons, invoices, requests and emails (docs/json.md).")
@pass_app
def services_show(app: App, service_id: int, as_json: bool) -> None:
    """One service with its client, add-ons, invoices, requests and emails.

    \b
    Examples:
      cancelproc services show 42
      cancelproc services show ext:1003 --json
    """
    with app.database().read_session() as session:
        service = cancellations.get_service(session, service_id)
        row = service_row(service)
        row["client_email"] = service.client.email if service.client else None
        row["addons"] = [{"id": a.id, "external_id": a.external_id, "name": a.name, "status": a.status,
                          "amount": a.amount}
                         for a in session.scalars(select(ServiceAddon).where(ServiceAddon.service_id == service_id))]
        row["invoices"] = [{"id": i.id, "external_id": i.external_id, "amount": i.amount, "status": i.status,
                            "due_date": i.due_date}
                           for i in session.scalars(select(Invoice).where(Invoice.service_id == service_id))]
        requests = session.scalars(select(CancellationRequest).where(CancellationRequest.service_id == service_id)
                                   .order_by(CancellationRequest.id)).all()
        row["requests"] = [request_row(r) for r in requests]
        row["emails"] = [email_summary(e) for e in session.scalars(
            select(OutboxEmail).where(OutboxEmail.request_id.in_([r.id for r in requests])).order_by(OutboxEmail.id))]
    if as_json:
        echo_json(row)
        return
    echo_fields([(k, row[k]) for k in ("id", "external_id", "client", "client_email", "product", "domain", "status",
                                       "billing_cycle", "amount", "next_due_date", "termination_date",
                                       "registration_date", "subscription_id")])
    for title, key, cols in (("add-ons", "addons", ["id", "external_id", "name", "status", "amount"]),
                             ("invoices", "invoices", ["id", "external_id", "amount", "status", "due_date"]),
                             ("requests", "requests", ["id", "external_id", "type", "status", "reason_code",
                                                       "created_at", "processed_at"]),
                             ("emails", "emails", ["id", "template", "to", "status", "sent_at", "last_error"])):
        click.echo(f"{title}:")
        echo_table(row[key], cols, empty="  (none)")


# --- reports -----------------------------------------------------------------------------

REPORT_FORMATS = click.Choice(["table", "json", "csv"])


def _report_window(app: App, since: dt.date | None, until: dt.date | None) -> tuple[dt.date, dt.date]:
    until = until or app.today()
    since = since or until - dt.timedelta(days=30)
    if since > until:
        raise InputError(f"--since {since} is after --until {until}")
    return since, until


def _output_format(fmt: str, as_json: bool) -> str:
    """--json, or the older --format (json there is the bare list of rows, kept for scripts
    written before --json, with a line on stderr)."""
    if as_json:
        if fmt != "table":
            raise InputError(f"--json and --format {fmt}: give one of them")
        return "object"
    if fmt == "json":
        click.echo("warning: --format json is deprecated: use --json (one object, docs/json.md)", err=True)
    return fmt


def _echo_csv(rows: list[dict[str, Any]], columns: list[str]) -> None:
    fields = list(rows[0]) if rows else columns
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows([[to_jsonable(v) if isinstance(v, (dt.date, Decimal, enum.Enum)) else v
                       for v in (row[c] for c in fields)] for row in rows])
    click.echo(out.getvalue(), nl=False)


@cli.group("report")
def report_group() -> None:
    """Reports: churn in monthly recurring revenue, the runs, and both as an HTML page.

    \b
    Examples:
      cancelproc report reasons --since 2026-01-01 --json
      cancelproc report html --out churn.html --since 2026-01-01
    """


def _report_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--since, --until, --json and --format, shared by the reports."""
    for option in (click.option("--format", "fmt", type=REPORT_FORMATS, default="table", show_default=True,
                                help="table or csv (json: deprecated, use --json)."),
                   click.option("--json", "as_json", is_flag=True, help="One JSON object (docs/json.md)."),
                   click.option("--until", type=DATE, help="Last day, included (default: today)."),
                   click.option("--since", type=DATE, help="First day (default: 30 days before --until).")):
        command = option(command)
    return command


REASON_COLUMNS = ["reason_code", "product", "cancellations", "share_percent", "recurring_amount", "lost_mrr"]
APART_COLUMNS = ["reason_code", "product", "requests", "recurring_amount", "mrr"]


def _echo_churn(churn: dict[str, Any], since: dt.date, until: dt.date) -> None:
    echo_table(churn["rows"], REASON_COLUMNS, empty=f"no cancellations from {since} to {until}")
    if not churn["rows"] and not churn["no_ops"] and not churn["resolved_by_hand"]:
        return
    click.echo(f"\ncancellations made by runs: {churn['cancellations']}, monthly recurring revenue lost: "
               f"{churn['lost_mrr']}")
    for title, key, columns in (("by reason", "by_reason", REASON_COLUMNS[:1] + REASON_COLUMNS[2:]),
                                ("by product", "by_product", REASON_COLUMNS[1:])):
        if churn[key]:
            click.echo(f"\n{title}:")
            echo_table(churn[key], columns)
    for title, key in (("no-ops (the service was already closed; not counted above)", "no_ops"),
                       ("resolved by hand (not counted above)", "resolved_by_hand")):
        if churn[key]:
            click.echo(f"\n{title}:")
            echo_table(churn[key], APART_COLUMNS)
    for u in churn["unknown_cycles"]:
        click.echo(f"\nbilling cycle {u['billing_cycle']!r} is not known: its {u['cancellations']} cancellation(s) "
                   f"(recurring amount {u['recurring_amount']}) count 0 MRR")


@report_group.command("reasons")
@_report_options
@pass_app
def report_reasons(app: App, since: dt.date | None, until: dt.date | None, as_json: bool, fmt: str) -> None:
    """Churn in the window: the cancellations runs made, by reason code and product, with
    the monthly recurring revenue (MRR) they lost.

    \b
    MRR: the service's recurring amount over the months of its billing cycle
    (Monthly 1, Quarterly 3, Semi-Annually 6, Annually 12, Biennially 24,
    Triennially 36; Free Account and One Time 0), to the cent per service. A
    cycle it does not know counts 0 and is named. No-ops (service already
    closed) and requests resolved by hand are shown apart, not counted.

    \b
    Examples:
      cancelproc report reasons --since 2026-01-01
      cancelproc report reasons --json
      cancelproc report reasons --format csv > reasons.csv
    """
    out = _output_format(fmt, as_json)
    since, until = _report_window(app, since, until)
    with app.database().read_session() as session:
        churn = reports.churn(reports.closed_requests(session, since=since, until=until, zone=app.settings.zone))
    if out == "object":
        echo_json({"since": since, "until": until, **churn})
    elif out == "json":
        echo_json(churn["rows"])
    elif out == "csv":
        _echo_csv(churn["rows"], REASON_COLUMNS)
    else:
        _echo_churn(churn, since, until)


@report_group.command("runs")
@_report_options
@pass_app
def report_runs(app: App, since: dt.date | None, until: dt.date | None, as_json: bool, fmt: str) -> None:
    """Runs started in the window: status, duration, counts, lateness, emails.

    \b
    Examples:
      cancelproc report runs
      cancelproc report runs --json
    """
    out = _output_format(fmt, as_json)
    since, until = _report_window(app, since, until)
    with app.database().read_session() as session:
        rows = reports.runs_between(session, since=since, until=until, zone=app.settings.zone)
    columns = ["id", "started_at", "trigger", "status", "duration_seconds", *Run.REQUEST_COUNTS,
               *Run.LATENESS_COUNTS, *Run.DELIVERY_COUNTS]
    if out == "object":
        echo_json({"since": since, "until": until, "rows": rows})
    elif out == "json":
        echo_json(rows)
    elif out == "csv":
        _echo_csv(rows, columns)
    else:
        echo_table(rows, columns, empty=f"no runs from {since} to {until}")


def _writable_file(path: Path) -> Path:
    """--out names a file in a folder that exists (checked before the database is read)."""
    shown = click.format_filename(path)[:200]
    try:
        if path.is_dir():
            raise InputError(f"--out {shown}: is a folder; give a file name (e.g. {shown}/churn.html)")
        if not path.parent.is_dir():
            raise InputError(f"--out {shown}: the folder {click.format_filename(path.parent)[:200]} does not exist")
    except OSError as e:  # a name too long, a folder we may not read
        raise InputError(f"--out {shown}: {e.strerror or e}") from None
    return path


@report_group.command("html")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=True, path_type=Path),
              help="The HTML file to write (replaced whole if it exists).")
@click.option("--since", type=DATE,
              help="First day (default: the 1st of the month 11 months before --until's: 12 months).")
@click.option("--until", type=DATE, help="Last day, included (default: today).")
@click.option("--json", "as_json", is_flag=True, help="Say what was written as one JSON object (docs/json.md).")
@pass_app
def report_html(app: App, out_path: Path, since: dt.date | None, until: dt.date | None, as_json: bool) -> None:
    """One self-contained HTML page with charts: cancellations and lost MRR by month
    and by reason, the lateness of catch-up cancellations, the runs over time
    (duration, due, failed), and the tables of `report reasons`.

    \b
    The page needs no network: its chart library (uPlot, MIT licence) is inside it.
    Send it by mail or put it on a share; open it in any browser.

    \b
    Examples:
      cancelproc report html --out churn.html
      cancelproc report html --out /srv/reports/2026.html --since 2026-01-01 --until 2026-12-31
    """
    until = until or app.today()
    since, until = _report_window(app, since or _twelve_months_to(until), until)
    _writable_file(out_path)
    with app.database().read_session() as session:
        page = report_html_page.build(session, since=since, until=until, zone=app.settings.zone,
                                      generated_at=utc_now(), company=app.settings.email.company_name)
    try:
        write_atomically(out_path, page.html.encode(), temp_prefix=f".{out_path.name}.")
    except OSError as e:
        raise InputError(f"--out {click.format_filename(out_path)[:200]}: cannot write it: {e.strerror or e}") from None
    summary = {"file": str(out_path), "since": since, "until": until, "cancellations": page.cancellations,
               "lost_mrr": page.lost_mrr, "runs": page.runs}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"wrote {out_path}: {since} to {until}, {page.cancellations} cancellation(s), "
                   f"{page.lost_mrr} MRR lost, {page.runs} run(s)")


def _twelve_months_to(day: dt.date) -> dt.date:
    """The 1st of the month eleven months before `day`'s: twelve calendar months, this one included."""
    year, month = divmod(day.year * 12 + day.month - 1 - 11, 12)
    return dt.date(year, month + 1, 1)


# --- monitoring --------------------------------------------------------------------------

def _echo_health(h: monitoring.Health) -> None:
    def ago(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"

    last, ok, scheduled = h.last_run, h.last_successful_scheduled_run, h.last_scheduled_run
    echo_fields([
        ("health", "OK" if h.healthy else f"{len(h.problems)} problem(s)"),
        ("last run", f"{last.id} {last.trigger} {last.status}, started {cell(last.started_at)}" if last
         else "none yet"),
        ("last scheduled run", f"{scheduled.id} {scheduled.trigger} {scheduled.status}, started "
                               f"{cell(scheduled.started_at)}" if scheduled else "none yet"),
        ("last scheduled success", f"{ok.id}, finished {cell(ok.finished_at)} "
                                   f"({h.last_success_age_hours} h ago)" if ok else "none yet"),
        ("requests pending", f"{h.requests_pending} ({h.requests_due} due now, the longest waiting for "
                             f"{ago(h.oldest_due_request_age_seconds)})"),
        ("requests failed", f"{h.requests_failed} (manual cancellation required)"),
        ("emails queued", f"{h.emails_queued} (the oldest for {ago(h.oldest_queued_email_age_seconds)})"),
        ("emails failed", h.emails_failed),
        ("leases", ", ".join(f"{le.name}: {'run ' + str(le.run_id) if le.run_id else 'sender'} on {le.host} "
                             f"pid {le.pid}{' (STALE)' if le.stale else ''}" for le in h.leases) or "none held"),
    ])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The health as one JSON object (docs/json.md).")
@click.option("--max-age-hours", type=HOURS,
              help="A successful run must have finished within this many hours (default: status_max_age_hours).")
@pass_app
def status(app: App, as_json: bool, max_age_hours: float | None) -> int:
    """Is the processor healthy? One screen for the operator on call.

    \b
    Exit 0 when healthy; 1 with one line per problem on stderr when the nightly
    job failed before its run began (config, hooks, templates, database), the last
    successful scheduled run (trigger cron or schedule; a manual run or
    `requests process` does not count) is too old, the last run ended in error, requests need a
    manual cancellation, emails failed, or a lease went stale.

    \b
    Examples:
      cancelproc status
      cancelproc status --max-age-hours 30 --json
    """
    app.settings  # noqa: B018 - a config that does not load is the first thing to say
    failed = attention.read(app.attention_path())
    try:
        db = app.database()
    except (CancelprocError, OperationalError):
        if failed is None:
            raise
        # The database is what is broken: the failed job's line names it (and its error).
        click.echo(f"problem: {failed.line()}", err=True)
        return 1
    h = monitoring.health(db, app.settings, now=utc_now(), failed_before_run=failed,
                          max_age_hours=max_age_hours or app.settings.status_max_age_hours)
    if as_json:
        echo_json(h.as_dict())
    else:
        _echo_health(h)
    for problem in h.problems:
        click.echo(f"problem: {problem}", err=True)
    return 0 if h.healthy else 1
