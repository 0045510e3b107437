"""Domain exceptions. The CLI turns them into one-line messages and exit codes."""


class CancelprocError(Exception):
    """Base class: something the operator must fix. Exit code 2."""

    exit_code = 2


class ConfigError(CancelprocError):
    """The configuration file or an environment variable holds an invalid value."""


class InputError(CancelprocError):
    """A CLI argument, a date or an imported row is not acceptable."""


class NotFound(CancelprocError):
    """An id names no row."""


class StateError(CancelprocError):
    """The action is not allowed in the row's current state (e.g. withdraw a completed request)."""


class DatabaseError(CancelprocError):
    """The database cannot be opened or is not migrated."""


class LeaseHeld(CancelprocError):
    """Another run holds the lease. Exit code 75 (EX_TEMPFAIL): cron may simply try later."""

    exit_code = 75
