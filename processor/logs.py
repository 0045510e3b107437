"""Logging with structlog: readable lines on a terminal, JSON lines otherwise (cron, systemd).

The run binds run_id into structlog's context variables, so every line of a run carries
it; a hook call binds request_id (hooks/registry.py), so what a hook logs carries both.

Records of the standard library's `logging` (a hook's `logging.getLogger(__name__)`, a
library) go through the same processors and renderer (structlog's ProcessorFormatter on
the root logger), so they are JSON lines with the same context too, never bare text.

What a hook prints (`print()`) is captured while the hook runs and logged as "hook output"
lines, so it never lands in a command's stdout (`--json` output, or a table).
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _StdlibHandler(logging.StreamHandler):
    """The root handler configure_logging installs (and replaces when called again)."""


class _StderrHandler(_StdlibHandler):
    """To whatever sys.stderr is at the time of the record (as logging.lastResort does)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def json_wanted(fmt: str, stream: TextIO) -> bool:
    """JSON lines, or lines for a person? auto: JSON unless `stream` is a terminal."""
    return fmt == "json" or (fmt == "auto" and not stream.isatty())


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> bool:
    """Set up structlog and the stdlib root logger for this process. fmt: auto (console on
    a TTY, else json), json, console. Returns True when the lines are JSON."""
    handler = _StdlibHandler(stream) if stream is not None else _StderrHandler()
    stream = stream or sys.stderr
    use_json = json_wanted(fmt, stream)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    logging.captureWarnings(True)  # a library's warning is a log line too, not bare text on stderr
    # Alembic says what it does at INFO on every migration; only its warnings are news.
    logging.getLogger("alembic").setLevel(max(LEVELS[level], logging.WARNING))
    return use_json


# --- what hooks print ------------------------------------------------------------------

_captured: ContextVar[io.StringIO | None] = ContextVar("cancelproc_hook_stdout", default=None)


class _RoutedStdout(io.TextIOBase):
    """sys.stdout once hooks are loaded: what is written inside `captured_stdout` (a hook
    call, in whatever thread) goes to that capture; everything else to the real stdout."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real

    def write(self, s: str) -> int:
        buffer = _captured.get()
        return (buffer if buffer is not None else self.real).write(s)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    def writable(self) -> bool:
        return True

    # Read-only here as in io's own streams (TextIOBase's are None): click writes to a
    # stream whose encoding it knows, instead of wrapping the buffer behind it.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.real.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.real.errors

    def __getattr__(self, name: str) -> Any:  # encoding, buffer, errors: the real stream's
        return getattr(self.real, name)


def route_hook_output() -> None:
    """Send what hooks print to the log, not to stdout (see captured_stdout). Idempotent."""
    if not isinstance(sys.stdout, _RoutedStdout):
        sys.stdout = _RoutedStdout(sys.stdout)


def capture_stdout(buffer: io.StringIO) -> Token[io.StringIO | None]:
    """From now on, in this context, what is printed while stdout is routed
    (route_hook_output) goes to `buffer`, until release_stdout(the token). The hook
    registry calls these two around every hook call: cheaper than a context manager."""
    return _captured.set(buffer)


def release_stdout(token: Token[io.StringIO | None]) -> None:
    _captured.reset(token)


@contextmanager
def captured_stdout() -> Iterator[io.StringIO]:
    """What this block prints while stdout is routed; the caller logs it."""
    buffer = io.StringIO()
    token = capture_stdout(buffer)
    try:
        yield buffer
    finally:
        release_stdout(token)
