"""The `cancelproc` group: the App the commands share, and the one place errors become
one line and an exit code (0 all done, 1 some requests failed, 2 usage/config/data error,
75 try again later, 70 a bug). A traceback only with --debug."""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click
import structlog
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from processor import __version__, attention, monitoring, outbox
from processor import db as dbmod
from processor.cli.output import ZONE_KEY
from processor.config import Settings, load_settings, settings_without_errors
from processor.db import Database, open_database
from processor.delivery import Deliverer
from processor.due import business_today
from processor.emails import EmailTemplates, TemplateProblem
from processor.errors import (
    CancelprocError,
    ConfigError,
    DatabaseUnavailable,
    FieldError,
    InputError,
    LeaseHeld,
    database_trouble,
    one_line,
)
from processor.hooks import HookDefinitionError, HookLoadError, HookRegistry, load_hooks
from processor.logs import captured_stdout, configure_logging, json_wanted, route_hook_output
from processor.mailers import mailer_from_settings
from processor.models import (
    AuditEntry,
    CancellationRequest,
)
from processor.run import Runner

EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug, not the operator's input
# Input errors that are the app folder's, not the command line's: the nightly job is broken.
BROKEN_FILES = (HookLoadError, HookDefinitionError, TemplateProblem)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class App:
    """What the commands share: settings and database, opened on first use."""

    config_path: Path | None
    debug: bool
    _settings: Settings | None = None
    _db: Database | None = None
    _hooks: HookRegistry | None = None
    _templates: EmailTemplates | None = None
    _runner: Runner | None = None
    operator: str = field(default_factory=lambda: os.environ.get("SUDO_USER") or getpass.getuser())
    _json_logs: bool = False

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._use_settings(load_settings(self.config_path))
            assert self._settings is not None
        return self._settings

    def _use_settings(self, settings: Settings) -> None:
        self._settings = settings
        self._json_logs = configure_logging("debug" if self.debug else settings.log_level, settings.log_format)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # the tables show times in the business time zone
            ctx.meta[ZONE_KEY] = settings.zone

    @property
    def settings_loaded(self) -> bool:
        return self._settings is not None

    @property
    def json_logs(self) -> bool:
        """The log is JSON lines (log_format json, or auto off a terminal: cron, systemd), so a
        command's report for people becomes one JSON log event instead of text on stdout:
        every line of the combined output is then one JSON object."""
        _ = self.settings
        return self._json_logs

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
            route_hook_output()  # a hook's print() is logged, never in a command's stdout
            with captured_stdout() as printed:  # what a hook file prints as it loads, too
                try:
                    self._hooks = load_hooks(self.settings.path(self.settings.hooks_dir),
                                             trace=os.environ.get("CANCELPROC_TRACE_HOOKS") == "1",
                                             check_permissions=not self.settings.hooks_allow_unsafe_permissions)
                finally:
                    for line in printed.getvalue().splitlines():
                        structlog.get_logger("cancelproc.hooks").info("hook output", output=line)
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

    def runner(self, *, deliver: bool = True, should_stop: Callable[[], bool] | None = None,
               settings: Settings | None = None) -> Runner:
        """The Runner of a command: this app's database, hooks, templates and clock; with
        `deliver`, it sends the outbox after the run when the settings say so."""
        settings = settings or self.settings
        deliverer = self.deliverer() if deliver and settings.email.send_after_run else None
        self._runner = Runner(self.database(), settings, clock=utc_now, templates=self.templates, hooks=self.hooks,
                              deliverer=deliverer, should_stop=should_stop)
        return self._runner

    def today(self) -> dt.date:
        return business_today(utc_now(), self.settings.zone)

    def attention_path(self) -> Path:
        """The before-run failure record (attention.py), under the app root."""
        return attention.state_path(self.settings.app_root)

    @contextmanager
    def nightly_job(self, command: str) -> Iterator[None]:
        """The nightly job's command: a failure before its run began (config, hooks,
        templates, database) is recorded for `status` and the metrics, and staff get one
        email per streak; a run that began and completed ends the streak."""
        try:
            yield
        except (LeaseHeld, click.ClickException, click.exceptions.Exit, KeyboardInterrupt):
            raise  # another run is at work, or the command line was wrong: not the job failing
        except Exception as exc:
            bad_argument = isinstance(exc, InputError) and not isinstance(exc, BROKEN_FILES)  # refused, nothing written
            if self._settings is None:
                if isinstance(exc, ConfigError):  # the config did not load
                    self.config_failed(command, exc)
            elif not bad_argument and (self._runner is None or self._runner.started_run_id is None):
                self.failed_before_run(command, exc)
            raise
        else:
            path = self.attention_path()
            if self._runner is not None and self._runner.started_run_id is not None and path.exists():
                attention.clear(path)
                self.write_metrics()  # written by the run before the streak ended

    def config_failed(self, command: str, exc: ConfigError) -> None:
        """The config file does not load: the nightly job is as broken as by a hook file
        that does not load, so it is recorded the same way, under the app root of the file
        (when no file was found, there is no app folder to record it in). The metrics file
        and the staff email are those of the file with its wrong keys left at their
        defaults; a file that is not TOML gets the record alone."""
        if exc.config_file is None:
            return
        settings = settings_without_errors(exc.config_file)
        if settings is not None:
            self._use_settings(settings)
            self.failed_before_run(command, exc)
            return
        path = attention.state_path(exc.config_file.parent.parent)
        try:
            attention.record_failure(path, command, str(exc), utc_now())
        except OSError as write_error:  # logging is not set up: no settings
            echo_error(f"failure record not written: {path}: {one_line(write_error)}", as_json=errors_as_json(self))

    def clear_failed_before_run(self) -> None:
        attention.clear(self.attention_path())

    def failed_before_run(self, command: str, exc: BaseException) -> None:
        """Record the failure, write the metrics, and email staff once per streak. Every
        step is best effort: the command's own error line must still come out."""
        log = structlog.get_logger("cancelproc")
        error = database_trouble(exc) if isinstance(exc, OperationalError) else one_line(exc)
        try:
            record = attention.record_failure(self.attention_path(), command, error, utc_now())
        except OSError as write_error:
            log.error("failure record not written", path=str(self.attention_path()), error=one_line(write_error))
            return
        self.write_metrics(record)
        email = self.settings.email
        if record.staff_notified or not email.staff_address:
            return
        try:
            attention.notify_staff(mailer_from_settings(self.settings), record, from_address=email.from_address,
                                   to_address=email.staff_address, host=socket.gethostname())
        except Exception as send_error:  # noqa: BLE001 - delivery may be what is broken; the record stays
            log.error("attention email not sent", error=one_line(send_error))
            return
        record.staff_notified = True
        attention.write(self.attention_path(), record)

    def write_metrics(self, failed: attention.Attention | None = None) -> None:
        """The Prometheus file, when one is configured. A failure to write it is logged,
        never fails the command: the run's work is done."""
        if not self.settings.metrics_file:
            return
        path = self.settings.path(self.settings.metrics_file)
        failed = failed or attention.read(self.attention_path())
        try:
            try:
                db = self.database()
                health = monitoring.health(db, self.settings, now=utc_now(), failed_before_run=failed,
                                           max_age_hours=self.settings.status_max_age_hours)
            except (CancelprocError, SQLAlchemyError):
                if failed is None:
                    raise
                monitoring.write_failure_metrics(path, failed, utc_now())  # the database is what is broken
                return
            monitoring.write_metrics(path, health)
        except (OSError, SQLAlchemyError, CancelprocError) as exc:
            structlog.get_logger("cancelproc").error("metrics file not written", path=str(path), error=one_line(exc))

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()


_LONG_WORD = re.compile(r"\S{200,}")


def echo_error(line: str, *, as_json: bool = False, exit_code: int | None = None) -> None:
    """An error line as the operator reads it: one line, whatever value it quotes. A value
    with control characters or bytes that are not UTF-8 is shown escaped (it would break
    the line, or the terminal's encoding), and a very long one is cut, with its length.
    `as_json` (the log is JSON lines: cron, systemd): the same line as one JSON log event,
    its `error` holding the text, so the cron log stays JSON lines throughout."""
    line = "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in line)
    line = _LONG_WORD.sub(lambda m: f"{m.group()[:100]}...[{len(m.group())} characters]", line)
    if as_json:
        event, _, error = line.partition(": ")
        record: dict[str, Any] = {"event": event, "error": error, "level": "error"}
        if exit_code is not None:
            record["exit_code"] = exit_code
        record["timestamp"] = utc_now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = json.dumps(record, ensure_ascii=False)
    click.echo(line, err=True)


def errors_as_json(app: App | None) -> bool:
    """Are error lines JSON? As the log is: by the settings' log_format once they are loaded;
    before (a config error), by CANCELPROC_LOG_FORMAT, else JSON unless stderr is a terminal."""
    if app is not None and app.settings_loaded:
        return app.json_logs
    fmt = os.environ.get("CANCELPROC_LOG_FORMAT", "auto").strip().lower()
    return json_wanted(fmt if fmt in ("auto", "json", "console") else "auto", sys.stderr)


class CancelprocCommand(click.Command):
    """A command whose domain errors about a field name the option that gave its value:
    FieldError("cancel_on", ...) from `requests create --on ...` reads "--on: ..."."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FieldError as exc:
            options = [p.opts[0] for p in self.params if isinstance(p, click.Option) and p.name == exc.field]
            if not options:
                raise
            raise InputError(f"{options[0]}: {exc.problem}") from None


def _debug_first(argv: list[str]) -> list[str]:
    """`--debug` belongs to `cancelproc` itself, but is taken after the subcommand too
    (`cancelproc run --debug`, as one adds it to a command that just failed): moved to the
    front. Not after `--`, where arguments are taken as they are."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug", *(a for a in argv[:end] if a != "--debug"), *argv[end:]]


class CancelprocGroup(click.Group):
    """Runs a command and turns every error into one line and an exit code."""

    command_class = CancelprocCommand
    group_class = type  # subgroups are CancelprocGroups, so their commands are CancelprocCommands
    app: App | None = None  # the App of the command under way: its log format is that of the error lines

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = _debug_first(list(sys.argv[1:] if args is None else args))
        debug = argv[:1] == ["--debug"] or os.environ.get("CANCELPROC_DEBUG") == "1"
        self.app = None

        def fail(line: str, code: int) -> int:
            echo_error(line, as_json=errors_as_json(self.app), exit_code=code)
            return code

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
            code = fail(f"error: {exc.format_message()}{where}", 2)
        except click.exceptions.Abort:
            code = fail("aborted", 130)
        except CancelprocError as exc:
            if debug:
                raise
            code = fail(f"error: {exc}", exc.exit_code)
        except OperationalError as exc:  # the database went away, or is locked: not a bug
            if debug:
                raise
            code = fail(f"error: {database_trouble(exc)}", DatabaseUnavailable.exit_code)
        except Exception as exc:
            if debug:
                raise
            code = fail(f"internal error: {one_line(exc)} (run with --debug for the traceback)", EXIT_INTERNAL)
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

    \b
    Examples:
      cancelproc find alice@example.com
      cancelproc requests show ext:R-1001
    """
    app = App(config_path=config_path, debug=debug)
    ctx.obj = app
    if isinstance(ctx.command, CancelprocGroup):
        ctx.command.app = app
    ctx.call_on_close(app.close)


pass_app = click.make_pass_decorator(App)


def nightly_job(command: str, *, unless: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Under @pass_app: run the command in `App.nightly_job` (a failure before its run
    began is recorded), except when one of the `unless` flags is given (--dry-run...)."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(app: App, *args: Any, **kwargs: Any) -> Any:
            if any(kwargs.get(flag) for flag in unless):
                return f(app, *args, **kwargs)
            with app.nightly_job(command):
                return f(app, *args, **kwargs)
        return wrapper
    return decorate


def request_row(r: CancellationRequest) -> dict[str, Any]:
    return {"id": r.id, "service_id": r.service_id, "addon_id": r.addon_id, "type": r.type, "cancel_on": r.cancel_on,
            "effective_date": r.effective_date,
            "reason_code": r.reason_code, "reason": r.reason, "status": r.status, "attempts": r.attempts,
            "last_error": r.last_error, "next_attempt_at": r.next_attempt_at, "created_at": r.created_at,
            "created_by": r.created_by, "processed_at": r.processed_at, "run_id": r.run_id,
            "days_late": r.days_late, "external_id": r.external_id, "note": r.note,
            "suspended_on": r.suspended_on, "grace_ends_on": r.grace_ends_on}


def audit_rows(entries: Sequence[AuditEntry]) -> list[dict[str, Any]]:
    return [{"at": a.at, "actor": a.actor, "run_id": a.run_id, "entity": a.entity, "entity_id": a.entity_id,
             "action": a.action, "detail": a.detail} for a in entries]


def main() -> NoReturn:
    cli.main()
    raise SystemExit(0)  # pragma: no cover - CancelprocGroup.main exits
