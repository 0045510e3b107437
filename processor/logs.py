"""Logging with structlog: readable lines on a terminal, JSON lines otherwise (cron, systemd).

The run binds run_id into structlog's context variables, so every line of a run carries
it; what a hook logs also carries the request_id it is called for (`_add_hook_call`).

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
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import CodeType, FrameType
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
        _add_hook_call,
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


# --- what hooks print, and whose lines they are ------------------------------------------

# A block's own capture (`captured_stdout`: what hook files print as they load).
_captured: ContextVar[io.StringIO | None] = ContextVar("cancelproc_hook_stdout", default=None)


# The code of the functions that call hooks (HookRegistry.apply and .call, registered by
# the registry): a frame of one of them up the stack means "inside a hook call", and its
# locals say which hook (`impl`) and for which request (`params`).
_HOOK_CALLERS: set[CodeType] = set()


def hook_callers(*functions: Callable[..., Any]) -> None:
    """Name the functions that call hooks (their loop variable `impl` is the hook being
    called, `params` what it was given): what runs under them is the hook's."""
    _HOOK_CALLERS.update(f.__code__ for f in functions)


def _hook_call(frame: FrameType | None) -> tuple[str, Any] | None:
    """(hook label, request id) if `frame` runs inside a hook call, else None.

    Found by walking up the stack, only when a line is logged or printed: nothing is set
    around each hook call, which runs several times per request (a marker set and reset
    there cost a twentieth of a run with hooks)."""
    while frame is not None:
        if frame.f_code in _HOOK_CALLERS:
            local = frame.f_locals
            impl, params = local.get("impl"), local.get("params")
            request_id = params.get("request_id") if isinstance(params, Mapping) else None
            return getattr(impl, "label", "?"), request_id
        frame = frame.f_back
    return None


def _add_hook_call(logger: Any, method: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """A line logged while a hook runs carries the request it runs for (shared processor)."""
    if _HOOK_CALLERS and "request_id" not in event_dict:
        call = _hook_call(sys._getframe(1))
        if call is not None and call[1] is not None:
            event_dict["request_id"] = call[1]
    return event_dict


class _Unfinished(threading.local):
    """Per thread: printed text not yet ended by a newline, and whose (print() writes its
    arguments, separators and end one by one). Class defaults: nothing in a new thread."""

    call: tuple[str, Any] | None = None
    text = ""


_unfinished = _Unfinished()


def _log_printed(call: tuple[str, Any], line: str) -> None:
    structlog.get_logger("cancelproc.hooks").info("hook output", hook=call[0], request_id=call[1], output=line)


class _RoutedStdout(io.TextIOBase):
    """sys.stdout once hooks are loaded: what a hook prints (under a hook call, in whatever
    thread) is logged line by line; inside `captured_stdout` it goes to that capture;
    everything else to the real stdout."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real

    def write(self, s: str) -> int:
        call = _hook_call(sys._getframe(1))
        if _unfinished.text and _unfinished.call != call:  # another hook call's unfinished line
            assert _unfinished.call is not None
            _log_printed(_unfinished.call, _unfinished.text)
            _unfinished.text = ""
        if call is not None:
            *lines, _unfinished.text = (_unfinished.text + s).split("\n")
            _unfinished.call = call
            for line in lines:
                _log_printed(call, line)
            return len(s)
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
    """Send what hooks print to the log, not to stdout. Idempotent."""
    if not isinstance(sys.stdout, _RoutedStdout):
        sys.stdout = _RoutedStdout(sys.stdout)


@contextmanager
def captured_stdout() -> Iterator[io.StringIO]:
    """What this block prints while stdout is routed; the caller logs it."""
    buffer = io.StringIO()
    token = _captured.set(buffer)
    try:
        yield buffer
    finally:
        _captured.reset(token)
