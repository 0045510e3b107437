"""Loading hook files (hooks/*.py) and installed plugins (entry points `cancelproc.hooks`).

A hook file is a plain Python file, compiled into a fresh module each time (as datasette's
plugins folder), so loading twice never mixes registrations. Anything wrong stops the
command before anything is touched, naming the file and line: fail closed, since a veto
hook that did not load must not let a run cancel services.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from processor.errors import InputError
from processor.hooks.registry import HookDefinitionError, HookImpl, HookRegistry, check_signature

ENTRY_POINT_GROUP = "cancelproc.hooks"
F = TypeVar("F", bound=Callable[..., Any])


class HookLoadError(InputError):
    """A hook file or plugin could not be loaded."""


@dataclass
class _Collector:
    registry: HookRegistry
    source: str
    seq: int = 0


_collecting: contextvars.ContextVar[_Collector | None] = contextvars.ContextVar("cancelproc_hooks", default=None)
_MARK = "__cancelproc_hooks__"


def add_hook(point: str, priority: int = 0, fn: Callable[..., Any] | None = None) -> Any:
    """Register `fn` on a hook point; lower priority runs first. Also a decorator:

        @add_hook("PreModuleTerminate", priority=10)
        def keep_paying_customers(params): ...
    """
    caller = sys._getframe(1)
    where = f"{caller.f_code.co_filename}:{caller.f_lineno}"

    def register(func: F) -> F:
        wants = check_signature(point, func, priority, where)
        line = caller.f_lineno
        marks = getattr(func, _MARK, None)
        if marks is None:
            try:
                setattr(func, _MARK, marks := [])
            except (AttributeError, TypeError):  # a builtin or bound method: only collected
                marks = []
        marks.append((point, priority, line, wants))
        collector = _collecting.get()
        if collector is not None:
            collector.registry.register(HookImpl(point, func, priority, collector.source, line, collector.seq, wants))
            collector.seq += 1
        return func

    return register if fn is None else register(fn)


@contextmanager
def _collect(registry: HookRegistry, source: str) -> Iterator[_Collector]:
    collector = _Collector(registry, source)
    token = _collecting.set(collector)
    try:
        yield collector
    finally:
        _collecting.reset(token)


def _error_line(exc: BaseException, filename: str) -> int | None:
    """The last line of `filename` in the exception's traceback (where the hook file failed)."""
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        return exc.lineno
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return line


def load_file(registry: HookRegistry, path: Path) -> None:
    """Run one hook file in a fresh module; its add_hook calls register into `registry`."""
    filename = str(path)
    module = types.ModuleType(f"cancelproc_hooks.{path.stem}")
    module.__file__ = filename
    try:
        code = compile(path.read_bytes(), filename, "exec")
        with _collect(registry, path.name):
            exec(code, module.__dict__)
    except HookDefinitionError:
        raise
    except Exception as exc:  # whatever the file raises, it did not load: stop here
        line = _error_line(exc, filename)
        where = f"{path}:{line}" if line else str(path)
        message = exc.msg if isinstance(exc, SyntaxError) else (str(exc).strip().splitlines() or [""])[0]
        raise HookLoadError(f"{where}: hook file failed to load: {exc.__class__.__name__}: {message}") from None


def load_entry_point(registry: HookRegistry, entry_point: importlib.metadata.EntryPoint) -> None:
    """Load an installed plugin: its module's add_hook calls (or already-marked functions) register."""
    source = f"entry point {entry_point.name}"
    try:
        with _collect(registry, source) as collector:
            target = entry_point.load()
            if collector.seq == 0:  # imported before (decorators already ran): use their marks
                _register_marked(registry, target, source)
    except HookDefinitionError:
        raise
    except Exception as exc:
        raise HookLoadError(f"{source} ({entry_point.value}): failed to load: {exc.__class__.__name__}: {exc}") from None


def _register_marked(registry: HookRegistry, target: Any, source: str) -> None:
    candidates = vars(target).values() if isinstance(target, types.ModuleType) else [target]
    seq = 0
    for fn in sorted((c for c in candidates if hasattr(c, _MARK)), key=lambda c: getattr(c, _MARK)[0][2]):
        for point, priority, line, wants in getattr(fn, _MARK):
            registry.register(HookImpl(point, fn, priority, source, line, seq, wants))
            seq += 1


def load_hooks(hooks_dir: Path | None, *, entry_points: bool = True, trace: bool = False) -> HookRegistry:
    """Every hooks_dir/*.py not starting with '_' (sorted by name), then installed plugins."""
    registry = HookRegistry(trace=trace)
    if hooks_dir is not None:
        if hooks_dir.exists() and not hooks_dir.is_dir():
            raise HookLoadError(f"{hooks_dir}: hooks_dir is not a folder")
        for path in sorted(hooks_dir.glob("*.py")) if hooks_dir.is_dir() else []:
            if not path.name.startswith("_"):
                load_file(registry, path)
    if entry_points:
        for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            load_entry_point(registry, entry_point)
    return registry
