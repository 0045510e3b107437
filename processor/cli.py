"""The `cancelproc` command. The only place that prints, reads the environment and exits.

Domain errors become one line on stderr and an exit code: 0 all done, 1 some requests
failed, 2 usage/config/data error, 75 another run holds the lease. A traceback only
with --debug.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import gc
import io
import getpass
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import click
import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import joinedload

from processor import __version__, cancellations, db as dbmod, importer, monitoring, outbox, reports
from processor.arguments import COUNT, DATE, HOURS, ID, FreeTextType, LanguageType, RunRefType
from processor.config import Settings, clock_time_problem, load_settings
from processor.db import Database, open_database
from processor.delivery import Deliverer, DeliveryReport, build_message, mailer_from_settings, message_id
from processor.digest import preview_digest
from processor.demo import load_demo
from processor.due import business_today, effective_date, is_due
from processor.emails import CRON_JOB_ACTIVITY, TEMPLATES, EmailTemplates
from processor.errors import (
    CancelprocError,
    DatabaseUnavailable,
    InputError,
    NotFound,
    StateError,
    database_trouble,
    one_line,
)
from processor.hooks import POINTS, HookFailed, HookRegistry, load_hooks
from processor.params import request_params, request_select
from processor.logs import configure_logging
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Client,
    EmailStatus,
    Invoice,
    OutboxEmail,
    RequestStatus,
    RequestType,
    Run,
    RunTrigger,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.output import cell, dumps, echo_fields, echo_json, echo_rows, echo_table, to_jsonable
from processor.runner import RunOptions, Runner, RunStopped, RunSummary
from processor.scheduler import nightly, serve
from processor.text import MAX_NOTE, MAX_REASON
from processor.workers import run_with_workers

PROGRESS_THRESHOLD = 300  # a manual run on a terminal shows a bar above this many requests
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug, not the operator's input


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class App:
    """What the commands share: settings and database, opened on first use."""

    config_path: Path | None
    debug: bool
    _settings: Settings | None = None
    _db: Database | None = None
    _hooks: HookRegistry | None = None
    _templates: EmailTemplates | None = None
    operator: str = field(default_factory=lambda: os.environ.get("SUDO_USER") or getpass.getuser())

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
            configure_logging("debug" if self.debug else self._settings.log_level, self._settings.log_format)
        return self._settings

    def database(self, *, create: bool = False, migrated: bool = True) -> Database:
        if self._db is None:
            self._db = open_database(self.settings.resolved_database_url(), create=create,
                                     busy_timeout_seconds=self.settings.sqlite_busy_timeout_seconds)
            if migrated:
                dbmod.require_current(self._db)
        return self._db

    @property
    def hooks(self) -> HookRegistry:
        """Hook files and plugins, loaded once; a failure stops the command before any write."""
        if self._hooks is None:
            self._hooks = load_hooks(self.settings.path(self.settings.hooks_dir),
                                     trace=os.environ.get("CANCELPROC_TRACE_HOOKS") == "1",
                                     check_permissions=not self.settings.hooks_allow_unsafe_permissions)
        return self._hooks

    @property
    def templates(self) -> EmailTemplates:
        if self._templates is None:
            email = self.settings.email
            self._templates = EmailTemplates(self.settings.path(email.templates_dir) if email.templates_dir else None)
        return self._templates

    def composer(self) -> outbox.Composer:
        return outbox.Composer(self.templates, self.hooks, self.settings.email)

    def deliverer(self) -> Deliverer:
        return Deliverer(self.database(), mailer_from_settings(self.settings), self.settings, clock=utc_now)

    def today(self) -> dt.date:
        return business_today(utc_now(), self.settings.zone)

    def write_metrics(self) -> None:
        """The Prometheus file, when one is configured. A failure to write it is logged,
        never fails the command: the run's work is done."""
        if not self.settings.metrics_file or self._db is None:
            return
        path = self.settings.path(self.settings.metrics_file)
        try:
            monitoring.write_metrics(path, monitoring.health(self._db, self.settings, now=utc_now(),
                                                             max_age_hours=self.settings.status_max_age_hours))
        except (OSError, SQLAlchemyError) as exc:
            structlog.get_logger("cancelproc").error("metrics file not written", path=str(path), error=one_line(exc))

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()


class StopOnSignal:
    """SIGTERM or SIGINT asks the work to stop after its current chunk (the run is recorded
    as stopped, its lease released); a second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        structlog.get_logger("cancelproc").warning(
            "stopping after the current chunk (signal again to stop at once)", signal=signal.Signals(signum).name)

    def __call__(self) -> bool:
        return self.event.is_set()


REQUEST_TYPES = {"immediate": RequestType.IMMEDIATE, "end-of-period": RequestType.END_OF_BILLING_PERIOD,
                 "on-date": RequestType.ON_DATE}


_LONG_WORD = re.compile(r"\S{200,}")


def _echo_error(line: str) -> None:
    """An error line as the operator reads it: one line, whatever value it quotes. A value
    with control characters or bytes that are not UTF-8 is shown escaped (it would break
    the line, or the terminal's encoding), and a very long one is cut, with its length."""
    line = "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in line)
    line = _LONG_WORD.sub(lambda m: f"{m.group()[:100]}...[{len(m.group())} characters]", line)
    click.echo(line, err=True)


class CancelprocGroup(click.Group):
    """Runs a command and turns every error into one line and an exit code."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("CANCELPROC_DEBUG") == "1"
        try:
            code = super().main(argv, prog_name or "cancelproc", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.exceptions.NoArgsIsHelpError as exc:
            # A bare group (`cancelproc requests`) is a request for its help, not a mistake.
            click.echo(exc.ctx.get_help())
            code = 0
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _echo_error(f"error: {exc.format_message()}{where}")
            code = 2
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            code = 130
        except CancelprocError as exc:
            if debug:
                raise
            _echo_error(f"error: {exc}")
            code = exc.exit_code
        except OperationalError as exc:  # the database went away, or is locked: not a bug
            if debug:
                raise
            _echo_error(f"error: {database_trouble(exc)}")
            code = DatabaseUnavailable.exit_code
        except Exception as exc:
            if debug:
                raise
            _echo_error(f"internal error: {one_line(exc)} (run with --debug for the traceback)")
            code = EXIT_INTERNAL
        code = 0 if code is None else code
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=CancelprocGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="CANCELPROC_CONFIG",
              help="Config file (default: ./config/processor.toml; env CANCELPROC_CONFIG).")
@click.option("--debug", is_flag=True, help="Debug logging, and a traceback on errors.")
@click.version_option(version=__version__, prog_name="cancelproc")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, debug: bool) -> None:
    """Apply due service cancellation requests: the nightly job and the staff tools.

    \b
    Exit codes: 0 all done, 1 some requests failed or some emails could not
    be sent (see the summary), 2 usage, config or data error, 75 another run
    (or email sender) holds the lease, or the database is locked or
    unreachable: try again later.
    """
    app = App(config_path=config_path, debug=debug)
    ctx.obj = app
    ctx.call_on_close(app.close)


pass_app = click.make_pass_decorator(App)


# --- database ---------------------------------------------------------------------------

@cli.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations)."""


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Create or upgrade the database schema to this version."""
    database = app.database(create=True, migrated=False)
    before = dbmod.current_revision(database)
    dbmod.upgrade(database)
    after = dbmod.current_revision(database)
    click.echo(f"database {database.display_url}: schema {before or 'empty'} -> {after}"
               if before != after else f"database {database.display_url}: schema already at {after}")


@cli.command()
@click.option("--demo", is_flag=True, help="Also load a demo company (clients, services, requests).")
@pass_app
def init(app: App, demo: bool) -> None:
    """Create the database (through the migrations), optionally with demo data."""
    database = app.database(create=True, migrated=False)
    dbmod.upgrade(database)
    click.echo(f"database {database.display_url} ready (schema {dbmod.current_revision(database)})")
    if demo:
        with database.session.begin() as session:
            if session.scalar(select(func.count()).select_from(Client)):
                raise InputError(f"database {database.display_url} already has clients; demo data goes into an empty database")
            counts = load_demo(session, today=app.today(), now=utc_now())
        click.echo("demo data: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


# --- the run -----------------------------------------------------------------------------

def _echo_summary(summary: RunSummary) -> None:
    echo_fields([
        ("run", summary.run_id), ("as of", summary.as_of), ("status", summary.status),
        ("due", summary.due), ("cancelled", summary.completed), ("no-op (already closed)", summary.noop),
        ("failed, will retry", summary.retrying), ("vetoed by a hook", summary.vetoed),
        ("failed for good", summary.failed),
        ("skipped (done elsewhere)", summary.skipped), ("emails queued", summary.emails_queued),
        ("emails sent", summary.emails_sent),
        ("emails not sent", f"{summary.emails_retrying} will retry, {summary.emails_failed} failed for good, "
                            f"{summary.emails_still_queued} still queued"
                            if summary.emails_retrying or summary.emails_failed or summary.delivery_error else 0),
        ("applied late", f"{summary.late} (up to {summary.max_days_late} days)" if summary.late else 0),
        ("staff digest", "queued" if summary.digest_queued else "suppressed by a hook" if summary.digest_suppressed
         else "none"),
    ])
    for f in summary.failures:
        what = "MANUAL CANCELLATION REQUIRED" if f["gave_up"] else "vetoed, will retry" if f["vetoed"] else "will retry"
        click.echo(f"  request {f['request_id']} (service {f['service_id']}): {f['error']} [{what}]")
    for e in summary.failed_emails:
        click.echo(f"  email {e['id']} ({e['template']}) to {e['to_address']}: {e['error']} [FAILED]")
    if summary.delivery_error:
        click.echo(f"  email delivery stopped: {summary.delivery_error}; the emails stay queued "
                   "(cancelproc emails send)")


def _run_with_progress(runner: Runner, options: RunOptions, show_progress: bool) -> RunSummary:
    if not show_progress:
        return runner.run(options)
    total = runner.count_due(options)
    if total <= PROGRESS_THRESHOLD:
        return runner.run(options)
    with click.progressbar(length=total, label="cancelling", file=sys.stderr) as bar:
        runner.progress = bar.update
        return runner.run(options)


def _echo_preview(runner: Runner, options: RunOptions, as_json: bool) -> int:
    """--dry-run: what the run would do, changing nothing. Streams, so memory stays flat."""
    counts = {"cancel": 0, "no-op": 0, "vetoed": 0, "error": 0}
    if as_json:
        click.echo(f'{{"as_of": "{options.as_of}", "dry_run": true, "requests": [')
    rows: list[dict[str, Any]] = []
    first = True
    for item in runner.preview(options):
        counts[item["action"]] += 1
        if as_json:
            click.echo(("  " if first else ", ") + dumps(item))
            first = False
        else:
            rows.append(item)
            if len(rows) >= 1000:
                echo_table(rows, PREVIEW_COLUMNS)
                rows.clear()
    if as_json:
        click.echo(f'], "summary": {dumps(counts)}}}')
    else:
        if rows or not any(counts.values()):
            echo_table(rows, PREVIEW_COLUMNS, empty="nothing is due")
        click.echo(f"dry run as of {options.as_of}: {counts['cancel']} to cancel, {counts['no-op']} no-op, "
                   f"{counts['vetoed']} vetoed, {counts['error']} would fail; nothing was changed")
    return 1 if counts["error"] or counts["vetoed"] else 0


PREVIEW_COLUMNS = ["request_id", "service_id", "client", "product", "domain", "type", "due_on", "days_late",
                   "action", "addons", "unpaid_invoices", "email_to", "detail"]


@cli.command()
@click.option("--as-of", type=DATE, help="Apply requests due on or before this date (default: today in business_timezone).")
@click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or the preview) as JSON.")
@click.option("--limit", type=COUNT, help="Process at most N due requests.")
@click.option("--trigger", type=click.Choice([t.value for t in RunTrigger]),
              help="Recorded in the run (default: manual on a terminal, cron otherwise).")
@click.option("--workers", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Worker processes sharing the run (PostgreSQL).")
@click.option("--join", is_flag=True, help="Work on the run in progress (from another host; PostgreSQL).")
@pass_app
def run(app: App, as_of: dt.date | None, dry_run: bool, as_json: bool, limit: int | None, trigger: str | None,
        workers: int, join: bool) -> int:
    """Apply every due cancellation request (the nightly job).

    A request is due when it is pending and it is Immediate, or its service's next
    due date (End of Billing Period) or its chosen date (On Date) is on or before
    the as-of date, or the service has no next due date. Missed nights catch up.

    \b
    On PostgreSQL a run can be shared: --workers N starts N worker processes on
    this host, and `cancelproc run --join` on another host works on the run in
    progress until nothing is left (docs/deploy.md).
    """
    settings = app.settings
    if join:
        if as_of or dry_run or limit or trigger or workers > 1:
            raise click.UsageError("--join takes no other option: it works on the run in progress as it is")
        return _join(app, as_json)
    today = app.today()
    as_of = as_of or today
    if as_of > today and not dry_run:
        raise InputError(f"--as-of {as_of} is in the future (today is {today} in {settings.business_timezone}); "
                         "only --dry-run may look ahead")
    database = app.database()
    on_terminal = sys.stdin.isatty() and sys.stderr.isatty()
    options = RunOptions(
        as_of=as_of, limit=limit, operator=app.operator,
        trigger=RunTrigger(trigger) if trigger else (RunTrigger.MANUAL if on_terminal else RunTrigger.CRON),
    )
    deliverer = app.deliverer() if settings.email.send_after_run and not dry_run else None
    stop = StopOnSignal()
    runner = Runner(database, settings, clock=utc_now, templates=app.templates, hooks=app.hooks, deliverer=deliverer,
                    should_stop=stop)
    _tune_gc()
    if dry_run:
        return _echo_preview(runner, options, as_json)
    if workers > 1 and limit:
        raise click.UsageError("--limit works with one process, not with --workers")
    if workers > 1 and not database.is_postgresql:
        raise InputError(f"--workers {workers}: parallel workers need PostgreSQL (database_url); "
                         "SQLite lets one process write at a time")
    try:
        with stop:
            if workers > 1:
                summary = run_with_workers(runner, options, workers=workers, worker_command=_worker_command(app))
            else:
                summary = _run_with_progress(runner, options, show_progress=on_terminal and not as_json)
    finally:  # also after a run that stopped on an error: the metrics show it
        app.write_metrics()
    if as_json:
        echo_json(summary.as_dict())
    else:
        _echo_summary(summary)
    return summary.exit_code


def _tune_gc() -> None:
    # A run allocates many short-lived objects; the long-lived ones (modules, compiled
    # templates, SQLAlchemy's caches) need not be scanned by every full collection.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _worker_command(app: App) -> list[str]:
    """`cancelproc run --join` as this process was started (same interpreter, same config)."""
    config = ["--config", str(app.config_path)] if app.config_path else []
    return [sys.executable, "-m", "processor", *config, "run", "--join"]


def _join(app: App, as_json: bool) -> int:
    """A worker: this process's share of the run in progress."""
    stop = StopOnSignal()
    runner = Runner(app.database(), app.settings, clock=utc_now, templates=app.templates, hooks=app.hooks,
                    should_stop=stop)
    _tune_gc()
    with stop:
        try:
            summary = runner.join()
        except RunStopped as exc:
            click.echo(f"worker {os.getpid()}: {exc}")
            return 1
    if as_json:
        echo_json(summary.as_dict())
    else:
        click.echo(f"worker {os.getpid()} on run {summary.run_id}: {summary.due} due, {summary.completed} cancelled, "
                   f"{summary.noop} no-op, {summary.retrying + summary.vetoed} to retry, {summary.failed} failed")
    return 1 if summary.retrying or summary.failed or summary.vetoed else 0


@cli.command("schedule")
@click.option("--at", "times", multiple=True, metavar="HH:MM",
              help="Run daily at this local time (business_timezone); repeatable. Default: schedule_times.")
@pass_app
def schedule_command(app: App, times: tuple[str, ...]) -> None:
    """Run the nightly job daily in the foreground, for hosts without cron.

    Logs the next run time; SIGTERM or SIGINT stops it (a run in progress first
    finishes its chunk and releases the lease). A run that fails is logged and the
    scheduler goes on; one that finds another run holding the lease waits for the
    next time.
    """
    settings = app.settings
    for at in times:
        problem = clock_time_problem(at)
        if problem:
            raise InputError(f"--at: {problem}")
    if times:
        settings = settings.model_copy(update={"schedule_times": list(times)})
    database = app.database()
    log = structlog.get_logger("cancelproc.schedule")
    stop = StopOnSignal()

    def nightly_run() -> None:
        options = RunOptions(as_of=app.today(), trigger=RunTrigger.SCHEDULE, operator=app.operator)
        deliverer = app.deliverer() if settings.email.send_after_run else None
        runner = Runner(database, settings, clock=utc_now, templates=app.templates, hooks=app.hooks,
                        deliverer=deliverer, should_stop=stop)
        try:
            summary = runner.run(options)
            log.info("scheduled run done", run_id=summary.run_id, status=str(summary.status), due=summary.due,
                     completed=summary.completed, failed=summary.failed)
        except CancelprocError as exc:  # another run holds the lease, a bad template, the database: try next time
            log.error("scheduled run did not complete", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the nightly schedule; it is logged
            log.exception("scheduled run failed", error=one_line(exc))
        finally:
            app.write_metrics()

    scheduler = nightly(settings.schedule_times, settings.business_timezone, nightly_run)
    log.info("scheduler started", times=settings.schedule_times, zone=settings.business_timezone)
    with stop:
        serve(scheduler, stop.event, settings.zone)


# --- requests ----------------------------------------------------------------------------

def _request_row(r: CancellationRequest) -> dict[str, Any]:
    return {"id": r.id, "service_id": r.service_id, "type": r.type, "cancel_on": r.cancel_on,
            "reason_code": r.reason_code, "reason": r.reason, "status": r.status, "attempts": r.attempts,
            "last_error": r.last_error, "next_attempt_at": r.next_attempt_at, "created_at": r.created_at,
            "created_by": r.created_by, "processed_at": r.processed_at, "run_id": r.run_id,
            "days_late": r.days_late, "external_id": r.external_id, "note": r.note}


def _audit_rows(entries: Sequence[AuditEntry]) -> list[dict[str, Any]]:
    return [{"at": a.at, "actor": a.actor, "run_id": a.run_id, "entity": a.entity, "entity_id": a.entity_id,
             "action": a.action, "detail": a.detail} for a in entries]


@cli.group("requests")
def requests_group() -> None:
    """Create, inspect, withdraw, retry and process cancellation requests."""


def _notify_request_hook(database: Database, hooks: HookRegistry, point: str, request_id: int, **more: Any) -> None:
    """Fire a staff-command hook after the change is committed (its failure is logged, not raised)."""
    if not hooks.has(point):
        return
    with database.read_engine.connect() as conn:
        row = conn.execute(request_select().where(CancellationRequest.id == request_id)).one_or_none()
    if row is None:  # its service, client or product was deleted outside cancelproc: no params to give
        structlog.get_logger("cancelproc").warning(
            "hook not called: the request's service, client or product no longer exists", point=point,
            request_id=request_id)
        return
    hooks.notify(point, request_params(row, **more))


@requests_group.command("create")
@click.argument("service_id", type=ID)
@click.option("--type", "type_name", type=click.Choice(list(REQUEST_TYPES)), default="end-of-period", show_default=True)
@click.option("--reason-code", required=True, help="One of the configured reason_codes.")
@click.option("--reason", default="", type=FreeTextType(MAX_REASON),
              help=f"Free text from the client (at most {MAX_REASON} characters).")
@click.option("--on", "cancel_on", type=DATE, help="The date, for --type on-date.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def requests_create(app: App, service_id: int, type_name: str, reason_code: str, reason: str,
                    cancel_on: dt.date | None, as_json: bool) -> None:
    """Record a cancellation request for SERVICE_ID."""
    database = app.database()
    hooks = app.hooks
    composer = app.composer()
    now = utc_now()
    try:
        with database.session.begin() as session:
            request = cancellations.create_request(
                session, service_id=service_id, type_=REQUEST_TYPES[type_name], reason_code=reason_code,
                reason=reason, allowed_reasons=app.settings.reason_codes, cancel_on=cancel_on,
                actor=app.operator, now=now, today=app.today(),
            )
            not_queued = outbox.queue_request_emails(session, request.id, composer=composer, settings=app.settings,
                                                     now=now, actor=app.operator)
            row = _request_row(request)
    except IntegrityError:
        # Another writer created an open request between our check and our insert.
        raise InputError(f"service {service_id} already has an open request") from None
    except HookFailed as exc:  # fail closed: no request without its confirmation email
        raise CancelprocError(f"request not created: {exc}") from None
    _notify_request_hook(database, hooks, "CancellationRequest", row["id"], actor=app.operator)
    row["emails_not_queued"] = not_queued
    if as_json:
        echo_json(row)
    else:
        click.echo(f"request {row['id']} created for service {service_id} ({row['type'].value})")
        for line in not_queued:
            click.echo(f"warning: {line}", err=True)


@requests_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in RequestStatus]), help="Only requests in this state.")
@click.option("--service", "service_id", type=ID, help="Only requests for this service.")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def requests_list(app: App, status: str | None, service_id: int | None, limit: int, as_json: bool) -> None:
    """List requests, newest first."""
    query = select(CancellationRequest).order_by(CancellationRequest.id.desc()).limit(limit)
    if status:
        query = query.where(CancellationRequest.status == RequestStatus(status))
    if service_id is not None:
        query = query.where(CancellationRequest.service_id == service_id)
    with app.database().read_session() as session:
        rows = [_request_row(r) for r in session.scalars(query)]
    echo_rows(rows, ["id", "service_id", "type", "cancel_on", "status", "attempts", "reason_code",
                     "created_at", "processed_at", "last_error"], as_json=as_json, empty="no requests")


@requests_group.command("show")
@click.argument("request_id", type=ID)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def requests_show(app: App, request_id: int, as_json: bool) -> None:
    """One request, whether it is due, and its audit trail."""
    with app.database().read_session() as session:
        request = cancellations.get_request(session, request_id)
        service = request.service  # None if deleted outside cancelproc (foreign keys off)
        row = _request_row(request)
        created_on = business_today(request.created_at, app.settings.zone)
        due_date = service.next_due_date if service else None
        row["due_on"] = effective_date(request.type, due_date, request.cancel_on, created_on) if service else None
        row["due_now"] = service is not None and request.status is RequestStatus.PENDING and is_due(
            request.type, due_date, request.cancel_on, created_on, app.today())
        row["service"] = service and {"id": service.id, "status": service.status, "domain": service.domain,
                                      "next_due_date": service.next_due_date,
                                      "termination_date": service.termination_date}
        row["audit"] = _audit_rows(session.scalars(
            select(AuditEntry).where(AuditEntry.request_id == request_id).order_by(AuditEntry.id)).all())
    if as_json:
        echo_json(row)
        return
    echo_fields([(k, row[k]) for k in ("id", "external_id", "service_id", "type", "cancel_on", "due_on", "due_now",
                                       "status", "reason_code", "reason", "attempts", "last_error", "next_attempt_at",
                                       "created_at", "created_by", "processed_at", "run_id", "days_late", "note")])
    click.echo(f"service     {service.id} {service.domain} ({service.status.value}, next due {service.next_due_date or '-'})"
               if service else f"service     {row['service_id']} no longer exists (deleted outside cancelproc)")
    click.echo("audit trail:")
    echo_table(row["audit"], ["at", "actor", "run_id", "entity", "entity_id", "action", "detail"], empty="  (none)")


@requests_group.command("withdraw")
@click.argument("request_id", type=ID)
@click.option("--note", default="", type=FreeTextType(MAX_NOTE), help="Why (goes into the audit log).")
@pass_app
def requests_withdraw(app: App, request_id: int, note: str) -> None:
    """Withdraw a pending (or failed) request: the service stays as it is."""
    database, hooks = app.database(), app.hooks
    with database.session.begin() as session:
        cancellations.withdraw_request(session, request_id, actor=app.operator, now=utc_now(), note=note)
    _notify_request_hook(database, hooks, "CancellationRequestWithdrawn", request_id, actor=app.operator, note=note)
    click.echo(f"request {request_id} withdrawn")


@requests_group.command("retry")
@click.argument("request_id", type=ID)
@pass_app
def requests_retry(app: App, request_id: int) -> None:
    """Put a failed request (or one waiting for its next attempt) back in line for the next run."""
    with app.database().session.begin() as session:
        cancellations.retry_request(session, request_id, actor=app.operator, now=utc_now())
    click.echo(f"request {request_id} is pending again (attempts reset); the next run applies it when due")


@requests_group.command("resolve")
@click.argument("request_id", type=ID)
@click.option("--note", required=True, type=FreeTextType(MAX_NOTE),
              help="What was done by hand (goes into the audit log).")
@pass_app
def requests_resolve(app: App, request_id: int, note: str) -> None:
    """Close a failed request that staff cancelled by hand (the service is not touched)."""
    with app.database().session.begin() as session:
        cancellations.resolve_request(session, request_id, actor=app.operator, now=utc_now(), note=note)
    click.echo(f"request {request_id} resolved by hand")


@requests_group.command("process")
@click.argument("request_ids", type=ID, nargs=-1, required=True)
@click.option("--now", "ignore_due_date", is_flag=True, help="Apply even if the request is not due yet.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def requests_process(app: App, request_ids: tuple[int, ...], ignore_due_date: bool, as_json: bool) -> int:
    """Apply these requests at once, as a run limited to them."""
    database = app.database()
    today = app.today()
    with database.read_session() as session:
        for rid in request_ids:
            request = cancellations.get_request(session, rid)
            if request.status is not RequestStatus.PENDING:
                raise InputError(f"request {rid} is {request.status.value}; only a pending request can be processed")
            service = request.service  # None if deleted behind our back: the run fails it, saying so
            created_on = business_today(request.created_at, app.settings.zone)
            if service and not ignore_due_date and not is_due(request.type, service.next_due_date, request.cancel_on,
                                                  created_on, today):
                due_on = effective_date(request.type, service.next_due_date, request.cancel_on, created_on)
                raise InputError(f"request {rid} is not due until {due_on}; add --now to apply it before its due date")
    options = RunOptions(as_of=today, trigger=RunTrigger.MANUAL, operator=app.operator,
                         request_ids=list(request_ids), ignore_due_date=ignore_due_date, digest=False)
    deliverer = app.deliverer() if app.settings.email.send_after_run else None
    summary = Runner(database, app.settings, clock=utc_now, templates=app.templates, hooks=app.hooks,
                     deliverer=deliverer).run(options)
    if as_json:
        echo_json(summary.as_dict())
    else:
        _echo_summary(summary)
    return summary.exit_code


# --- import ------------------------------------------------------------------------------

@cli.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(importer.KINDS), help="What the rows are (default: from the columns).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def import_command(app: App, files: tuple[Path, ...], kind: str | None, as_json: bool) -> int:
    """Import clients, products, services, add-ons, invoices or requests (CSV or JSON Lines).

    \b
    Rows are matched by external_id (the billing system's id); each file is all or
    nothing. Files are imported in the order given (clients before services before
    requests); the first rejected file stops the import. Exit 1 if some rows were
    conflicts (they would undo a cancellation the processor applied; not applied).
    """
    database = app.database()
    reports: list[importer.FileReport] = []
    for position, path in enumerate(files):
        try:
            report = importer.import_file(database, path, settings=app.settings, now=utc_now(), kind=kind,
                                          actor=f"import:{app.operator}")
        except importer.ImportRejected as exc:
            for error in exc.errors:
                click.echo(f"error: {error}", err=True)
            skipped = [str(p) for p in files[position + 1:]]
            raise InputError(f"{path}: rejected, {len(exc.errors)} bad row(s); nothing of it was imported"
                             + (f"; not attempted: {', '.join(skipped)}" if skipped else "")) from None
        reports.append(report)
        if not as_json:
            click.echo(f"{report.path} ({report.kind}): {report.inserted} inserted, {report.updated} updated, "
                       f"{report.unchanged} unchanged, {len(report.conflicts)} conflict(s)")
            for c in report.conflicts:
                click.echo(f"  conflict {report.path}:{c.line} ({c.external_id}): {c.message}")
    if as_json:
        echo_json([{"path": str(r.path), "kind": r.kind, "inserted": r.inserted, "updated": r.updated,
                    "unchanged": r.unchanged, "conflicts": [vars(c) for c in r.conflicts]} for r in reports])
    return 1 if any(r.conflicts for r in reports) else 0


# --- runs --------------------------------------------------------------------------------

def _run_row(r: Run) -> dict[str, Any]:
    return {k: getattr(r, k) for k in ("id", "trigger", "operator", "as_of", "host", "pid", "status", "started_at",
                                       "finished_at", "due", "completed", "noop", "retrying", "failed",
                                       "vetoed", "emails_queued", "emails_sent", "emails_failed", "late",
                                       "max_days_late", "error")}


@cli.group("runs")
def runs_group() -> None:
    """Inspect past runs."""


@runs_group.command("list")
@click.option("--limit", type=COUNT, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def runs_list(app: App, limit: int, as_json: bool) -> None:
    """Recent runs, newest first."""
    with app.database().read_session() as session:
        rows = [_run_row(r) for r in session.scalars(select(Run).order_by(Run.id.desc()).limit(limit))]
    echo_rows(rows, ["id", "started_at", "trigger", "operator", "as_of", "status", "due", "completed", "noop",
                     "retrying", "failed", "vetoed", "late", "max_days_late"], as_json=as_json, empty="no runs yet")


@runs_group.command("show")
@click.argument("run_ref", metavar="RUN_ID|last", type=RunRefType())
@click.option("--json", "as_json", is_flag=True)
@pass_app
def runs_show(app: App, run_ref: int | str, as_json: bool) -> None:
    """One run: counts, lateness and each failure."""
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
        row["failures"] = _audit_rows(session.scalars(
            select(AuditEntry).where(AuditEntry.run_id == run_obj.id,
                                     AuditEntry.action.in_(["failed", "attempt_failed"])).order_by(AuditEntry.id)).all())
        row["late_requests"] = [
            {"request_id": r.id, "service_id": r.service_id, "days_late": r.days_late}
            for r in session.scalars(select(CancellationRequest).where(
                CancellationRequest.run_id == run_obj.id, CancellationRequest.days_late > 0)
                .order_by(CancellationRequest.days_late.desc()).limit(20))
        ]
    if as_json:
        echo_json(row)
        return
    echo_fields([(k, row[k]) for k in _run_row(run_obj)])
    if row["late_requests"]:
        click.echo("latest applied (catch-up):")
        echo_table(row["late_requests"], ["request_id", "service_id", "days_late"])
    click.echo("failures:")
    echo_table(row["failures"], ["at", "entity_id", "action", "detail"], empty="  (none)")


# --- services ----------------------------------------------------------------------------

def _service_row(s: Service) -> dict[str, Any]:
    return {"id": s.id, "external_id": s.external_id, "client_id": s.client_id, "client": s.client.name,
            "product": s.product.name, "domain": s.domain, "status": s.status, "billing_cycle": s.billing_cycle,
            "amount": s.amount, "next_due_date": s.next_due_date, "termination_date": s.termination_date}


@cli.group("services")
def services_group() -> None:
    """Inspect services."""


@services_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in ServiceStatus], case_sensitive=False))
@click.option("--client", "client_id", type=ID, help="Only this client's services.")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def services_list(app: App, status: str | None, client_id: int | None, limit: int, as_json: bool) -> None:
    """List services."""
    query = (select(Service).options(joinedload(Service.client), joinedload(Service.product))
             .order_by(Service.id).limit(limit))
    if status:
        query = query.where(Service.status == ServiceStatus(status.capitalize()))
    if client_id is not None:
        query = query.where(Service.client_id == client_id)
    with app.database().read_session() as session:
        rows = [_service_row(s) for s in session.scalars(query)]
    echo_rows(rows, ["id", "client", "product", "domain", "status", "billing_cycle", "next_due_date",
                     "termination_date"], as_json=as_json, empty="no services")


@services_group.command("show")
@click.argument("service_id", type=ID)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def services_show(app: App, service_id: int, as_json: bool) -> None:
    """One service with its add-ons, invoices, requests and emails."""
    with app.database().read_session() as session:
        service = cancellations.get_service(session, service_id)
        row = _service_row(service)
        row["client_email"] = service.client.email
        row["addons"] = [{"id": a.id, "name": a.name, "status": a.status, "amount": a.amount}
                         for a in session.scalars(select(ServiceAddon).where(ServiceAddon.service_id == service_id))]
        row["invoices"] = [{"id": i.id, "amount": i.amount, "status": i.status, "due_date": i.due_date}
                           for i in session.scalars(select(Invoice).where(Invoice.service_id == service_id))]
        requests = session.scalars(select(CancellationRequest).where(CancellationRequest.service_id == service_id)
                                   .order_by(CancellationRequest.id)).all()
        row["requests"] = [_request_row(r) for r in requests]
        row["emails"] = [{"id": e.id, "template": e.template, "to": e.to_address, "subject": e.subject,
                          "status": e.status} for e in session.scalars(
                              select(OutboxEmail).where(OutboxEmail.request_id.in_([r.id for r in requests])))]
    if as_json:
        echo_json(row)
        return
    echo_fields([(k, row[k]) for k in ("id", "external_id", "client", "client_email", "product", "domain", "status",
                                       "billing_cycle", "amount", "next_due_date", "termination_date")])
    for title, key, cols in (("add-ons", "addons", ["id", "name", "status", "amount"]),
                             ("invoices", "invoices", ["id", "amount", "status", "due_date"]),
                             ("requests", "requests", ["id", "type", "status", "created_at", "processed_at"]),
                             ("emails", "emails", ["id", "template", "to", "status"])):
        click.echo(f"{title}:")
        echo_table(row[key], cols, empty="  (none)")


# --- emails ------------------------------------------------------------------------------

def _email_row(e: OutboxEmail) -> dict[str, Any]:
    return {"id": e.id, "key": e.key, "template": e.template, "request_id": e.request_id, "run_id": e.run_id,
            "to": e.to_address, "from": e.from_address, "subject": e.subject, "status": e.status,
            "attempts": e.attempts, "last_error": e.last_error, "next_attempt_at": e.next_attempt_at,
            "created_at": e.created_at, "sent_at": e.sent_at,
            "message_id": message_id(e.id, e.key, e.created_at, e.from_address)}


def _get_email(session: Any, email_id: int) -> OutboxEmail:
    email = session.get(OutboxEmail, email_id)
    if email is None:
        raise NotFound(f"email {email_id} not found")
    return email


@cli.group("emails")
def emails_group() -> None:
    """The email outbox: list, show, preview, send and retry emails."""


@emails_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in EmailStatus]), help="Only emails in this state.")
@click.option("--request", "request_id", type=ID, help="Only emails about this request.")
@click.option("--template", type=click.Choice(list(TEMPLATES)), help="Only this message.")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def emails_list(app: App, status: str | None, request_id: int | None, template: str | None, limit: int,
                as_json: bool) -> None:
    """List emails, newest first."""
    query = select(OutboxEmail).order_by(OutboxEmail.id.desc()).limit(limit)
    if status:
        query = query.where(OutboxEmail.status == EmailStatus(status))
    if request_id is not None:
        query = query.where(OutboxEmail.request_id == request_id)
    if template:
        query = query.where(OutboxEmail.template == template)
    with app.database().read_session() as session:
        rows = [_email_row(e) for e in session.scalars(query)]
    echo_rows(rows, ["id", "template", "request_id", "to", "status", "attempts", "created_at", "sent_at",
                     "last_error"], as_json=as_json, empty="no emails")


@emails_group.command("show")
@click.argument("email_id", type=ID)
@click.option("--raw", is_flag=True, help="The whole message as it is sent (headers, text and HTML parts).")
@click.option("--html", is_flag=True, help="The HTML part instead of the text.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def emails_show(app: App, email_id: int, raw: bool, html: bool, as_json: bool) -> None:
    """One email: its state and its text (or HTML, or the raw message)."""
    with app.database().read_session() as session:
        email = _get_email(session, email_id)
        row = _email_row(email)
        row.update(text=email.text_body, html=email.html_body)
        message = build_message(email, app.settings.email.company_name) if raw else None
    if as_json:
        echo_json(row)
    elif message is not None:
        click.echo(message.as_string(), nl=False)
    else:
        echo_fields([(k, row[k]) for k in ("id", "key", "template", "request_id", "run_id", "from", "to", "subject",
                                           "message_id", "status", "attempts", "last_error", "next_attempt_at",
                                           "created_at", "sent_at")])
        click.echo()
        click.echo(row["html"] if html else row["text"])


@emails_group.command("preview")
@click.argument("template", type=click.Choice(list(TEMPLATES)), metavar="TEMPLATE")
@click.option("--request", "request_id", type=ID, help="Render it for this request (client and request emails).")
@click.option("--run", "run_id", type=ID, help="Render it for this run (cron_job_activity).")
@click.option("--language", type=LanguageType(),
              help="Use this language's templates and dates instead of the client's (e.g. de, de_AT).")
@click.option("--html", is_flag=True, help="Print the HTML part instead of the text.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def emails_preview(app: App, template: str, request_id: int | None, run_id: int | None, language: str | None,
                   html: bool, as_json: bool) -> None:
    """Render TEMPLATE with real data, as it would be queued now; nothing is written.

    \b
    Templates: cancellation_request_confirmation, new_cancellation_request,
    service_cancellation_confirmation (each --request ID), cron_job_activity (--run ID).
    """
    composer = app.composer()
    if template == CRON_JOB_ACTIVITY:
        if run_id is None or request_id is not None:
            raise click.UsageError(f"{template} needs --run RUN_ID (and no --request)")
        with app.database().read_engine.connect() as conn:
            composed = preview_digest(conn, composer, run_id, now=utc_now(), settings=app.settings)
    else:
        if request_id is None or run_id is not None:
            raise click.UsageError(f"{template} needs --request REQUEST_ID (and no --run)")
        with app.database().read_session() as session:
            composed, language = outbox.preview_request_email(session, template, request_id, composer=composer,
                                                              settings=app.settings, today=app.today(),
                                                              language=language)
    email = composed.email
    if email is None:
        raise InputError(f"{template}: an EmailPreSend hook ({composed.aborted_by}) would abort this email")
    if as_json:
        echo_json({"template": template, "file": app.templates.filename(template, language), "to": email.to_address,
                   "subject": email.subject, "text": email.text_body, "html": email.html_body})
        return
    click.echo(f"To: {email.to_address}\nSubject: {email.subject}\n")
    click.echo(email.html_body if html else email.text_body)


def _echo_delivery(report: DeliveryReport) -> None:
    click.echo(f"{report.sent} sent, {report.retrying} will be retried, {report.failed} failed for good, "
               f"{report.queued} still queued")
    for e in report.failed_emails:
        click.echo(f"  email {e['id']} ({e['template']}) to {e['to_address']}: {e['error']} [FAILED]")
    if report.stopped:
        click.echo(f"error: delivery stopped: {report.stopped}; the rest stays queued", err=True)


@emails_group.command("send")
@click.option("--limit", type=COUNT, help="Send at most N emails.")
@click.option("--now", "ignore_backoff", is_flag=True,
              help="Also send emails waiting for their next attempt after a failed send.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def emails_send(app: App, limit: int | None, ignore_backoff: bool, as_json: bool) -> int:
    """Send queued emails now (a run also sends them at its end).

    Exit 0 when everything due was sent, 1 when some could not be (they stay queued
    with their error, or failed for good after max_attempts), 75 when another sender
    is at work.
    """
    try:
        report = app.deliverer().deliver(limit=limit, ignore_backoff=ignore_backoff)
    finally:
        app.write_metrics()
    if as_json:
        echo_json({k: getattr(report, k) for k in ("sent", "retrying", "failed", "queued", "stopped", "failed_emails")})
    else:
        _echo_delivery(report)
    return 0 if report.ok else 1


@emails_group.command("retry")
@click.argument("email_ids", type=ID, nargs=-1)
@click.option("--all-failed", is_flag=True, help="Every failed email.")
@pass_app
def emails_retry(app: App, email_ids: tuple[int, ...], all_failed: bool) -> None:
    """Queue failed emails again (attempts reset); the next run or `emails send` sends them."""
    if bool(email_ids) == all_failed:
        raise click.UsageError("give EMAIL_IDS or --all-failed (not both)")
    with app.database().session.begin() as session:
        if all_failed:
            emails = list(session.scalars(select(OutboxEmail).where(OutboxEmail.status == EmailStatus.FAILED)))
        else:
            emails = [_get_email(session, i) for i in email_ids]
            for e in emails:
                if e.status is not EmailStatus.FAILED:
                    raise StateError(f"email {e.id} is {e.status.value}; only a failed email can be retried")
        now = utc_now()
        for e in emails:
            session.add(AuditEntry(at=now, actor=app.operator, request_id=e.request_id, entity="email", entity_id=e.id,
                                   action="retry", detail=f"was failed: {e.last_error or '-'}"))
            e.status, e.attempts, e.next_attempt_at = EmailStatus.QUEUED, 0, None
    click.echo(f"{len(emails)} email(s) queued again; `cancelproc emails send` sends them now")


# --- reports -----------------------------------------------------------------------------

REPORT_FORMATS = click.Choice(["table", "json", "csv"])


def _report_window(app: App, since: dt.date | None, until: dt.date | None) -> tuple[dt.date, dt.date]:
    until = until or app.today()
    since = since or until - dt.timedelta(days=30)
    if since > until:
        raise InputError(f"--since {since} is after --until {until}")
    return since, until


def _echo_report(rows: list[dict[str, Any]], columns: list[str], fmt: str, empty: str) -> None:
    if fmt == "json":
        echo_json(rows)
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[to_jsonable(v) if isinstance(v, (dt.date, Decimal, enum.Enum)) else v
                           for v in (row[c] for c in columns)] for row in rows])
        click.echo(out.getvalue(), nl=False)
    else:
        echo_table(rows, columns, empty=empty)


@cli.group("report")
def report_group() -> None:
    """Reports: why clients cancel, and the runs."""


def _report_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--since, --until and --format, shared by the reports."""
    for option in (click.option("--format", "fmt", type=REPORT_FORMATS, default="table", show_default=True),
                   click.option("--until", type=DATE, help="Last day, included (default: today)."),
                   click.option("--since", type=DATE, help="First day (default: 30 days before --until).")):
        command = option(command)
    return command


@report_group.command("reasons")
@_report_options
@pass_app
def report_reasons(app: App, since: dt.date | None, until: dt.date | None, fmt: str) -> None:
    """Cancellations applied in the window, by reason code and product (churn analysis)."""
    since, until = _report_window(app, since, until)
    with app.database().read_session() as session:
        rows = reports.cancellations_by_reason(session, since=since, until=until, zone=app.settings.zone)
    _echo_report(rows, ["reason_code", "product", "cancellations", "share_percent", "recurring_amount"], fmt,
                 empty=f"no cancellations from {since} to {until}")


@report_group.command("runs")
@_report_options
@pass_app
def report_runs(app: App, since: dt.date | None, until: dt.date | None, fmt: str) -> None:
    """Runs started in the window: status, duration, counts, lateness, emails."""
    since, until = _report_window(app, since, until)
    with app.database().read_session() as session:
        rows = reports.runs_between(session, since=since, until=until, zone=app.settings.zone)
    columns = ["id", "started_at", "trigger", "status", "duration_seconds", "due", "completed", "noop", "retrying",
               "failed", "vetoed", "late", "max_days_late", "emails_sent", "emails_failed"]
    _echo_report(rows, columns if fmt == "table" else list(rows[0]) if rows else columns, fmt,
                 empty=f"no runs from {since} to {until}")


# --- monitoring --------------------------------------------------------------------------

def _echo_health(h: monitoring.Health) -> None:
    def ago(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"

    last, ok = h.last_run, h.last_successful_run
    echo_fields([
        ("health", "OK" if h.healthy else f"{len(h.problems)} problem(s)"),
        ("last run", f"{last.id} {last.status}, started {cell(last.started_at)}" if last else "none yet"),
        ("last successful run", f"{ok.id}, finished {cell(ok.finished_at)} ({h.last_success_age_hours} h ago)"
         if ok else "none yet"),
        ("requests pending", f"{h.requests_pending} ({h.requests_due} due now, the longest waiting for "
                             f"{ago(h.oldest_due_request_age_seconds)})"),
        ("requests failed", f"{h.requests_failed} (manual cancellation required)"),
        ("emails queued", f"{h.emails_queued} (the oldest for {ago(h.oldest_queued_email_age_seconds)})"),
        ("emails failed", h.emails_failed),
        ("leases", ", ".join(f"{le.name}: {'run ' + str(le.run_id) if le.run_id else 'sender'} on {le.host} "
                             f"pid {le.pid}{' (STALE)' if le.stale else ''}" for le in h.leases) or "none held"),
    ])


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--max-age-hours", type=HOURS,
              help="A successful run must have finished within this many hours (default: status_max_age_hours).")
@pass_app
def status(app: App, as_json: bool, max_age_hours: float | None) -> int:
    """Is the processor healthy? One screen for the operator on call.

    \b
    Exit 0 when healthy; 1 with one line per problem on stderr when the last
    successful run is too old, the last run ended in error, requests need a
    manual cancellation, emails failed, or a lease went stale.
    """
    h = monitoring.health(app.database(), app.settings, now=utc_now(),
                          max_age_hours=max_age_hours or app.settings.status_max_age_hours)
    if as_json:
        echo_json(h.as_dict())
    else:
        _echo_health(h)
    for problem in h.problems:
        click.echo(f"problem: {problem}", err=True)
    return 0 if h.healthy else 1


# --- hooks -------------------------------------------------------------------------------

@cli.group("hooks")
def hooks_group() -> None:
    """Operator hooks (hooks/*.py and installed plugins)."""


@hooks_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def hooks_list(app: App, as_json: bool) -> None:
    """Every loaded hook, in the order it runs at each point."""
    rows = [{"point": i.point, "priority": i.priority, "function": i.fn.__qualname__, "file": f"{i.source}:{i.line}",
             "arguments": "**kwargs" if i.wants is None else ", ".join(i.wants)} for i in app.hooks.impls()]
    if as_json:
        echo_json(rows)
    else:
        echo_table(rows, ["point", "priority", "function", "file", "arguments"],
                   empty=f"no hooks loaded (hooks_dir: {app.settings.path(app.settings.hooks_dir)}; "
                         f"points: {', '.join(POINTS)})")


def main() -> NoReturn:
    cli.main()
    raise SystemExit(0)  # pragma: no cover - CancelprocGroup.main exits


if __name__ == "__main__":  # pragma: no cover
    main()
