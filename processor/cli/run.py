"""`cancelproc run` (one process, --workers N, --join) and `cancelproc schedule`."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
import select
import signal
import sys
import time
from typing import Any

import click
import structlog

from processor.cli.app import App, cli, nightly_job, pass_app
from processor.cli.arguments import COUNT, DATE
from processor.cli.output import dumps, echo_fields, echo_json, echo_table, log_report
from processor.config import clock_time_problem
from processor.errors import (
    CancelprocError,
    InputError,
    LeaseHeld,
    one_line,
)
from processor.models import (
    RunTrigger,
)
from processor.run import PREVIEW_COLUMNS, REMIND, Runner, RunOptions, RunStopped, RunSummary
from processor.scheduler import nightly, serve
from processor.workers import WorkerProcesses

PROGRESS_THRESHOLD = 300  # a manual run on a terminal shows a bar above this many requests


class StopOnSignal:
    """SIGTERM or SIGINT asks the work to stop after its current chunk (the run is recorded
    as stopped, its lease released); a second signal stops at once.

    The handler only sets a flag and writes a byte to a pipe of its own (async-signal-safe,
    non-blocking). It takes no lock: a handler that logs waits for the logger's lock, and
    one that calls threading.Event.set() waits for the Event's lock, each held by the very
    code the signal interrupted (a structlog write; the scheduler inside Event.wait), for
    ever. `wait` sleeps on that pipe, so a signal wakes the scheduler at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._logged = False
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None  # (read end, write end) while entered

    def __enter__(self) -> StopOnSignal:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self._wakeup = (read_end, write_end)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        if self._wakeup is not None:
            with contextlib.suppress(OSError):  # the pipe is full: it is readable anyway
                os.write(self._wakeup[1], b"\0")

    def is_set(self) -> bool:
        return self.received is not None

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds or until a signal comes; True if one came."""
        if self.received is None:
            if self._wakeup is None:
                time.sleep(timeout)
            else:  # a signal before select() left a byte in the pipe: select returns at once
                select.select([self._wakeup[0]], [], [], timeout)
        return self.received is not None

    def __call__(self) -> bool:
        """Asked to stop? Polled between chunks; says so in the log the first time."""
        if self.received is None:
            return False
        if not self._logged:
            self._logged = True
            structlog.get_logger("cancelproc").warning(
                "stopping after the current chunk (signal again to stop at once)",
                signal=signal.Signals(self.received).name)
        return True


def echo_summary(summary: RunSummary) -> None:
    echo_fields([
        ("run", summary.run_id), ("as of", summary.as_of), ("status", summary.status),
        ("due", summary.due), ("cancelled", summary.completed), ("no-op (already closed)", summary.noop),
        ("failed, will retry", summary.retrying), ("vetoed by a hook", summary.vetoed),
        ("failed for good", summary.failed),
        ("skipped (done elsewhere)", summary.skipped), ("emails queued", summary.emails_queued),
        ("reminders queued", f"{summary.reminders_queued} ({summary.reminders_aborted} aborted by a hook, "
                             f"{summary.reminders_failed} failed)"
                             if summary.reminders_aborted or summary.reminders_failed else summary.reminders_queued),
        ("emails sent", summary.emails_sent),
        ("emails not sent", f"{summary.emails_retrying} will retry, {summary.emails_failed} failed for good, "
                            f"{summary.emails_still_queued} still queued"
                            if summary.emails_retrying or summary.emails_failed or summary.delivery_error else 0),
        ("applied late", f"{summary.late} (up to {summary.max_days_late} days)" if summary.late else 0),
        ("staff digest", _digest_line(summary)),
    ])
    share = summary.this_process
    if share is not None and summary.run_total is not None and share["due"] != summary.run_total["due"]:
        # Other processes (run --join) did part of it: the counts above are the run's.
        click.echo(f"this process's share: {share['due']} due, {share['completed']} cancelled "
                   f"(the counts above are the whole run's)")
    for f in summary.failures:
        what = "MANUAL CANCELLATION REQUIRED" if f["gave_up"] else "vetoed, will retry" if f["vetoed"] else "will retry"
        click.echo(f"  request {f['request_id']} (service {f['service_id']}): {f['error']} [{what}]")
    for e in summary.failed_emails:
        click.echo(f"  email {e['id']} ({e['template']}) to {e['to_address']}: {e['error']} [FAILED]")
    if summary.delivery_error:
        # --now: the email that met the fault waits out a backoff, which a fixed server need not.
        click.echo(f"  email delivery stopped: {summary.delivery_error}; the emails stay queued "
                   "(once fixed: cancelproc emails send --now)")


def _digest_line(summary: RunSummary) -> str:
    if summary.digest_sent:
        return "sent"
    if summary.digest_queued:
        return f"queued, not sent: {summary.digest_error}" if summary.digest_error else "queued"
    return "suppressed by a hook" if summary.digest_suppressed else "none"


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
    counts = {"cancel": 0, "no-op": 0, "vetoed": 0, "error": 0, REMIND: 0}
    if as_json:
        click.echo(f'{{"as_of": "{options.as_of}", "dry_run": true, "requests": [')
    rows: list[dict[str, Any]] = []
    first = True
    # The credit column only when credits are given (immediate_refund = "credit").
    columns = PREVIEW_COLUMNS if runner.credits else [c for c in PREVIEW_COLUMNS if c != "credit"]
    for item in runner.preview(options):
        counts[item["action"]] += 1
        if as_json:
            click.echo(("  " if first else ", ") + dumps(item))
            first = False
        else:
            rows.append(item)
            if len(rows) >= 1000:
                echo_table(rows, columns)
                rows.clear()
    if as_json:
        click.echo(f'], "summary": {dumps(counts)}}}')
    else:
        if rows or not any(counts.values()):
            echo_table(rows, columns, empty="nothing is due")
        click.echo(f"dry run as of {options.as_of}: {counts['cancel']} to cancel, {counts['no-op']} no-op, "
                   f"{counts['vetoed']} vetoed, {counts['error']} would fail, {counts[REMIND]} reminders to queue; "
                   "nothing was changed")
    return 1 if counts["error"] or counts["vetoed"] else 0



@cli.command()
@click.option("--as-of", type=DATE,
              help="Apply requests due on or before this date (default: today in business_timezone).")
@click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or the preview) as JSON.")
@click.option("--limit", type=COUNT, help="Process at most N due requests.")
@click.option("--trigger", type=click.Choice([t.value for t in RunTrigger]),
              help="Recorded in the run (default: manual on a terminal, cron otherwise).")
@click.option("--workers", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Worker processes sharing the run (PostgreSQL).")
@click.option("--join", is_flag=True, help="Work on the run in progress (from another host; PostgreSQL).")
@pass_app
@nightly_job("run", unless=("dry_run", "join"))
def run(app: App, as_of: dt.date | None, dry_run: bool, as_json: bool, limit: int | None, trigger: str | None,
        workers: int, join: bool) -> int:
    """Apply every due cancellation request (the nightly job).

    A request is due when it is pending and its effective date (stored when it was
    made: README, "When a request is due") is on or before the as-of date. Missed
    nights catch up.

    \b
    On PostgreSQL a run can be shared: --workers N starts N worker processes on
    this host, and `cancelproc run --join` on another host works on the run in
    progress until nothing is left (docs/deploy.md).

    \b
    Examples:
      cancelproc run --dry-run
      cancelproc run --trigger cron   # the crontab line (crontab.example)
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
    stop = StopOnSignal()
    runner = app.runner(deliver=not dry_run, should_stop=stop)
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
                summary = runner.run(options, helpers=WorkerProcesses(workers, _worker_command(app)))
            else:
                summary = _run_with_progress(runner, options, show_progress=on_terminal and not as_json)
    finally:  # also after a run that stopped on an error: the metrics show it
        app.write_metrics()
    if as_json:
        echo_json(summary.as_dict())
    elif app.json_logs:  # cron, systemd: the summary is one more JSON line of the log
        log_report("run summary", summary.as_dict(), problem=summary.exit_code != 0)
    else:
        echo_summary(summary)
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
    runner = app.runner(deliver=False, should_stop=stop)
    _tune_gc()
    with stop:
        try:
            summary = runner.join()
        except RunStopped as exc:
            structlog.get_logger("cancelproc").warning("worker stopped", worker=os.getpid(), reason=str(exc))
            return 1
    if as_json:
        echo_json(summary.as_dict())
    elif not app.json_logs:  # with JSON logs, the runner's "worker done" line says it
        click.echo(f"worker {os.getpid()} on run {summary.run_id}: {summary.due} due, {summary.completed} cancelled, "
                   f"{summary.noop} no-op, {summary.retrying + summary.vetoed} to retry, {summary.failed} failed"
                   + (f" (the run so far: {summary.run_total['due']} due)" if summary.run_total else ""))
    return 1 if summary.retrying or summary.failed or summary.vetoed else 0


@cli.command("schedule")
@click.option("--at", "times", multiple=True, metavar="HH:MM",
              help="Run daily at this local time (business_timezone); repeatable. Default: schedule_times.")
@pass_app
@nightly_job("schedule")
def schedule_command(app: App, times: tuple[str, ...]) -> None:
    """Run the nightly job daily in the foreground, for hosts without cron.

    Logs the next run time; SIGTERM or SIGINT stops it (a run in progress first
    finishes its chunk and releases the lease). A run that fails is logged and the
    scheduler goes on; one that finds another run holding the lease waits for the
    next time.

    \b
    Examples:
      cancelproc schedule --at 00:30
    """
    settings = app.settings
    for at in times:
        problem = clock_time_problem(at)
        if problem:
            raise InputError(f"--at: {problem}")
    if times:
        settings = settings.model_copy(update={"schedule_times": list(times)})
    app.database()  # unreachable or not migrated: say so now, not at the first run hours later
    log = structlog.get_logger("cancelproc.schedule")
    stop = StopOnSignal()

    def nightly_run() -> None:
        options = RunOptions(as_of=app.today(), trigger=RunTrigger.SCHEDULE, operator=app.operator)
        runner = app.runner(should_stop=stop, settings=settings)
        try:
            summary = runner.run(options)
            app.clear_failed_before_run()
            log.info("scheduled run done", run_id=summary.run_id, status=str(summary.status), due=summary.due,
                     completed=summary.completed, failed=summary.failed)
        except CancelprocError as exc:  # another run holds the lease, a bad template, the database: try next time
            log.error("scheduled run did not complete", error=str(exc))
            if runner.started_run_id is None and not isinstance(exc, LeaseHeld):
                app.failed_before_run("schedule", exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the nightly schedule; it is logged
            log.exception("scheduled run failed", error=one_line(exc))
        finally:
            app.write_metrics()

    scheduler = nightly(settings.schedule_times, settings.business_timezone, nightly_run)
    log.info("scheduler started", times=settings.schedule_times, zone=settings.business_timezone)
    with stop:
        serve(scheduler, stop, settings.zone)
