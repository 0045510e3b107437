"""Domain exceptions. The CLI turns them into one-line messages and exit codes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


class CancelprocError(Exception):
    """Base class: something the operator must fix. Exit code 2."""

    exit_code = 2


class ConfigError(CancelprocError):
    """The configuration file or an environment variable holds an invalid value."""

    config_file: Path | None = None  # the file that was read (config.load_settings), if any


class InputError(CancelprocError):
    """A CLI argument, a date or an imported row is not acceptable."""


class FieldError(InputError):
    """A value given for a named field is not acceptable. The message names the field as the
    domain function calls its argument (`cancel_on`); the CLI names the option that gave the
    value instead (`--on`)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotDue(InputError):
    """A request asked to be applied at once is not due yet."""

    def __init__(self, request_id: int, due_on: dt.date | None) -> None:
        super().__init__(f"request {request_id} is not due until {due_on}")
        self.request_id = request_id
        self.due_on = due_on


class NotFound(CancelprocError):
    """An id names no row."""


class StateError(CancelprocError):
    """The action is not allowed in the row's current state (e.g. withdraw a completed request)."""


class DatabaseError(CancelprocError):
    """The database cannot be opened or is not migrated."""


class DatabaseUnavailable(DatabaseError):
    """The database failed during the command (locked, restarted, unreachable). Exit code
    75 (EX_TEMPFAIL): what was committed stays; a later run finishes the work."""

    exit_code = 75


class LeaseHeld(CancelprocError):
    """Another run holds the lease. Exit code 75 (EX_TEMPFAIL): cron may simply try later."""

    exit_code = 75


def one_line(exc: BaseException) -> str:
    """An exception on one line, for error lines, logs and records: our own errors by their
    message; anything else with its class and the first line of its message."""
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    lines = text.strip().splitlines()
    if not lines:
        return exc.__class__.__name__
    return lines[0] if isinstance(exc, CancelprocError) else f"{exc.__class__.__name__}: {lines[0]}"


def database_trouble(exc: BaseException) -> str:
    """A database failure during a command, on one line, for the operator."""
    orig = getattr(exc, "orig", None)
    text = one_line(orig) if orig is not None else one_line(exc)
    if "database is locked" in text:
        return ("the database is locked by another program or writer (waited sqlite_busy_timeout_seconds); "
                "what was committed before stays; try again later")
    return f"database error: {text}; what was committed stays; try again later"
