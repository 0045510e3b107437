"""Loading hook files (hooks/*.py) and installed plugins (entry points `cancelproc.hooks`).

A hook file is a plain Python file, compiled into a fresh module each time (as datasette's
plugins folder), so loading twice never mixes registrations. Anything wrong stops the
command before anything is touched, naming the file and line: fail closed, since a veto
hook that did not load must not let a run cancel services.
"""

from __future__ import annotations

import importlib.metadata
import os
import stat
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from processor.errors import InputError, one_line
from processor.hooks.registry import HookDefinitionError, HookImpl, HookRegistry, check_signature

ENTRY_POINT_GROUP = "cancelproc.hooks"
F = TypeVar("F", bound=Callable[..., Any])


class HookLoadError(InputError):
    """A hook file or plugin could not be loaded."""


# add_hook records each registration in the calling module's globals; the loader reads
# that list after running (or importing) the module. No global registry, and a module
# imported by another registers its hooks only in its own list.
_REGISTRATIONS = "__cancelproc_hooks__"


@dataclass(frozen=True)
class _Registration:
    point: str
    priority: int
    fn: Callable[..., Any]
    line: int
    wants: tuple[str, ...] | None


def add_hook(point: str, priority: int = 0, fn: Callable[..., Any] | None = None) -> Any:
    """Register `fn` on a hook point; lower priority runs first. Also a decorator:

        @add_hook("PreModuleTerminate", priority=10)
        def keep_paying_customers(params): ...
    """
    caller = sys._getframe(1)
    where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
    registrations = caller.f_globals.setdefault(_REGISTRATIONS, [])

    def register(func: F) -> F:
        wants = check_signature(point, func, priority, where)
        registrations.append(_Registration(point, priority, func, caller.f_lineno, wants))
        return func

    return register if fn is None else register(fn)


def _register_module(registry: HookRegistry, namespace: dict[str, Any], source: str) -> None:
    for seq, r in enumerate(namespace.get(_REGISTRATIONS, ())):
        registry.register(HookImpl(r.point, r.fn, r.priority, source, r.line, seq, r.wants))


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
        exec(code, module.__dict__)
    except HookDefinitionError:
        raise
    except (Exception, SystemExit) as exc:  # whatever the file raises (or exits with), it did not load
        line = _error_line(exc, filename)
        where = f"{path}:{line}" if line else str(path)
        raise HookLoadError(f"{where}: hook file failed to load: {one_line(exc)}") from None
    _register_module(registry, module.__dict__, path.name)


def load_entry_point(registry: HookRegistry, entry_point: importlib.metadata.EntryPoint) -> None:
    """Load an installed plugin: the module it names (or the module of the object it names)."""
    source = f"entry point {entry_point.name}"
    try:
        target = entry_point.load()
    except HookDefinitionError:
        raise
    except (Exception, SystemExit) as exc:
        raise HookLoadError(f"{source} ({entry_point.value}): failed to load: {one_line(exc)}") from None
    module = target if isinstance(target, types.ModuleType) else sys.modules[target.__module__]
    _register_module(registry, vars(module), source)


def unsafe_permissions(path: Path) -> str | None:
    """Why someone other than its owner (or root) could change this file or folder, or None.

    As sshd's StrictModes: a hook file is code that cancelproc runs against the billing
    data, so a file or folder that other users can write is a way in for them.
    """
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group and others" if st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IWOTH else (
            "its group" if st.st_mode & stat.S_IWGRP else "others")
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}; chmod go-w {path})"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by another user (uid {st.st_uid}); only root or the user running cancelproc may own it"
    return None


def load_hooks(hooks_dir: Path | None, *, entry_points: bool = True, trace: bool = False,
               check_permissions: bool = True) -> HookRegistry:
    """Every hooks_dir/*.py not starting with '_' (sorted by name), then installed plugins.

    With `check_permissions`, a hooks folder or hook file that users other than its owner
    can write is refused (HookLoadError naming the path): nothing is loaded.
    """
    registry = HookRegistry(trace=trace)
    if hooks_dir is not None:
        if hooks_dir.exists() and not hooks_dir.is_dir():
            raise HookLoadError(f"{hooks_dir}: hooks_dir is not a folder")
        paths = [p for p in sorted(hooks_dir.glob("*.py")) if not p.name.startswith("_")] if hooks_dir.is_dir() else []
        if check_permissions:
            for path in ([hooks_dir] if paths else []) + paths:
                problem = unsafe_permissions(path)
                if problem:
                    raise HookLoadError(f"{path}: hook {'folder' if path == hooks_dir else 'file'} refused: {problem}"
                                        " (or set hooks_allow_unsafe_permissions = true)")
        for path in paths:
            load_file(registry, path)
    if entry_points:
        for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            load_entry_point(registry, entry_point)
    return registry
