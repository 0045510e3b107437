"""The hook registry: validated registrations, run order, calls with only the wanted arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from processor.errors import InputError, one_line
from processor.hooks.points import MODULE_PARAMS, POINTS, Policy
from processor.logs import hook_callers


class HookDefinitionError(InputError):
    """A hook is declared wrongly: unknown point, unknown parameter, bad priority."""


class HookFailed(Exception):
    """A hook that may fail the request raised, or returned an error."""

    def __init__(self, impl: HookImpl, message: str, response: str | None = None) -> None:
        super().__init__(f"{impl.point} hook {impl.label}: {message}")
        self.impl = impl
        # What the hook itself said: the error it returned, or its exception in one line
        # (WHMCS's failureResponseMessage).
        self.response = message if response is None else response


# The names a hook may give to the whole of its point's parameters: ours, and WHMCS's `$vars`.
WHOLE = frozenset({"params", "vars"})


@dataclass(frozen=True)
class HookImpl:
    point: str
    fn: Callable[..., Any]
    priority: int
    source: str  # the hook file's name, or "entry point NAME"
    line: int
    seq: int  # registration order within its source
    wants: tuple[str, ...] | None  # the parameters it asks for; None: all of them (**kwargs)

    @property
    def label(self) -> str:
        return f"{self.fn.__qualname__} ({self.source}:{self.line})"

    def arguments(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments this hook gets from a point's params. `params` itself (all of
        them, WHMCS style) is handed over here, not stored in the dict: a dict containing
        itself is a reference cycle per request."""
        if self.wants is None:
            return {**params, "params": params}
        return {name: params if name in WHOLE else params[name] for name in self.wants}

    @functools.cached_property
    def invoke(self) -> Callable[[Mapping[str, Any]], Any]:
        """Call the hook with its arguments; the common shapes skip building a dict (hot path)."""
        fn, wants = self.fn, self.wants
        if wants is not None and len(wants) == 1 and wants[0] in WHOLE:
            # `def hook(params)` or `def hook(vars)`, WHMCS's shape and the usual one: the
            # function itself, no wrapper.
            name = wants[0]
            return fn if _params_first(fn) else lambda params: fn(**{name: params})
        if wants == ():
            return lambda params: fn()
        return lambda params: fn(**self.arguments(params))

    @property
    def order(self) -> tuple[int, str, int]:
        # Lower priority first; then file name, then registration order (WHMCS leaves it undefined).
        return (self.priority, self.source, self.seq)


def _params_first(fn: Callable[..., Any]) -> bool:
    """True if fn(x) passes x as its `params` or `vars` (its first parameter, positional or keyword)."""
    first = next(iter(inspect.signature(fn).parameters.values()), None)
    return first is not None and first.name in WHOLE and first.kind is first.POSITIONAL_OR_KEYWORD


def check_signature(point_name: str, fn: Callable[..., Any], priority: Any, where: str) -> tuple[str, ...] | None:
    """Validate one registration; return the parameters the function wants (None: all)."""
    point = POINTS.get(point_name)
    if point is None:
        raise HookDefinitionError(f"{where}: unknown hook point {point_name!r} (known: {', '.join(POINTS)})")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise HookDefinitionError(f"{where}: priority of {point_name} hook must be an integer, not {priority!r}")
    if not callable(fn):
        raise HookDefinitionError(f"{where}: {point_name} hook is not a function: {fn!r}")
    wants: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.POSITIONAL_ONLY:
            if p.default is not p.empty:
                continue
            raise HookDefinitionError(
                f"{where}: {getattr(fn, '__qualname__', fn)} has positional-only parameter {p.name!r}; "
                "hooks are called with keyword arguments (remove the '/')")
        if p.name not in point.params and p.name != "vars":
            if p.default is not p.empty:
                continue  # an optional parameter the point does not give keeps its default
            raise HookDefinitionError(
                f"{where}: {getattr(fn, '__qualname__', fn)} asks for {p.name!r}, which {point_name} does not give "
                f"(it gives: {', '.join(point.params)})")
        wants.append(p.name)
    return tuple(wants)


Call = Callable[[Mapping[str, Any]], Any]


@dataclass
class HookRegistry:
    """The loaded hooks. Passed to whatever fires them; never a module global."""

    trace: bool = False
    _impls: dict[str, list[HookImpl]] = field(default_factory=dict)
    # Per point, each hook in run order with the callable that calls it (traced or not):
    # decided once at registration, not on every call (this is per request, several times).
    _calls: dict[str, tuple[tuple[HookImpl, Call], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log = structlog.get_logger("cancelproc.hooks")

    def register(self, impl: HookImpl) -> None:
        impls = self._impls.setdefault(impl.point, [])
        impls.append(impl)
        impls.sort(key=lambda i: i.order)
        self._calls[impl.point] = tuple(
            (i, self._traced(i) if self.trace else i.invoke) for i in impls)

    def has(self, point: str) -> bool:
        return bool(self._impls.get(point))

    def of(self, point: str) -> Sequence[HookImpl]:
        """The point's hooks in run order (not a copy: do not change it)."""
        return self._impls.get(point, ())

    def impls(self, point: str | None = None) -> list[HookImpl]:
        """Hooks in run order: of one point, or of every point in declaration order."""
        if point is not None:
            return list(self._impls.get(point, ()))
        return [impl for name in POINTS for impl in self._impls.get(name, ())]

    def _traced(self, impl: HookImpl) -> Call:
        """Call the hook and log its arguments and what it returned or raised (trace mode)."""
        def call(params: Mapping[str, Any]) -> Any:
            kwargs = impl.arguments(params)
            try:
                result = impl.fn(**kwargs)
            except Exception as exc:
                self.log.info("hook called", point=impl.point, hook=impl.label, arguments=_short(kwargs),
                              raised=one_line(exc))
                raise
            self.log.info("hook called", point=impl.point, hook=impl.label, arguments=_short(kwargs),
                          result=_short(result))
            return result
        return call

    def call(self, point: str, params: dict[str, Any]) -> list[tuple[HookImpl, Any]]:
        """Call the point's hooks in order and return what each returned, applying nothing
        (for tools and tests; the processor uses `apply`). An exception becomes HookFailed."""
        answers = []
        for impl, call in self._calls.get(point, ()):
            try:
                answers.append((impl, call(params)))
            except Exception as exc:  # a hook is operator code: anything may come out of it
                raise HookFailed(impl, one_line(exc)) from exc
        return answers

    def apply(self, point: str, params: dict[str, Any]) -> Applied:
        """Call the point's hooks in order and do what their return values mean there (its
        `Policy`, declared in points.py): the one place that reads a hook's return value.

        VETO and ABORT_SEND stop at the hook that said so and merge other dicts (into
        `params`, or into `params["fields"]`); FAIL raises HookFailed; at those points an
        exception raises HookFailed too (fail closed). NOTHING and SUPPRESS log an exception
        and go on to the next hook.
        """
        calls = self._calls.get(point)
        if not calls:
            return NOTHING_APPLIED
        policy = POINTS[point].policy
        if policy is Policy.NOTHING or policy is Policy.SUPPRESS:
            suppressed = False
            for impl, call in calls:
                try:
                    result = call(params)
                except Exception as exc:  # the point fires after the fact: logged, never undoes anything
                    self.log.error("hook failed", point=point, hook=impl.label, error=one_line(exc),
                                   request_id=params.get("request_id"))
                    continue
                suppressed = suppressed or (policy is Policy.SUPPRESS and bool(result))
            return SUPPRESSED if suppressed else NOTHING_APPLIED
        for impl, call in calls:
            try:
                result = call(params)
            except Exception as exc:  # fail closed: the attempt fails, naming the hook
                raise HookFailed(impl, one_line(exc)) from exc
            if policy is Policy.FAIL:
                error = None if result is None else _failure(result)
                if error is not None:
                    raise HookFailed(impl, *error)
            elif isinstance(result, dict):
                stop, kept, target = _STOP[policy]
                if result.get(stop):
                    return Applied(impl.label, str(result.get("reason") or "no reason given"))
                (params if target is None else params[target]).update(
                    (k, v) for k, v in result.items() if k not in kept)
                if policy is Policy.VETO:
                    _override_module_params(params, result)
        return NOTHING_APPLIED


@dataclass(frozen=True)
class Applied:
    """What the hooks of one point decided, by its policy."""

    stopped_by: str | None = None  # the hook that vetoed (VETO) or aborted the email (ABORT_SEND)
    reason: str | None = None  # the veto's reason
    suppressed: bool = False  # SUPPRESS: a hook returned something truthy

    @property
    def vetoed(self) -> str | None:
        """The veto as one line, or None."""
        return f"vetoed by {self.stopped_by}: {self.reason}" if self.stopped_by else None


NOTHING_APPLIED = Applied()  # most calls: one shared answer, not an object per call
SUPPRESSED = Applied(suppressed=True)


# VETO and ABORT_SEND: the key that stops, the keys never merged, and where the rest
# merges (None: into params itself; else into that entry of params).
_STOP: dict[Policy, tuple[str, frozenset[str], str | None]] = {
    Policy.VETO: ("abortcmd", frozenset({"abortcmd", "reason", "params"}), None),
    Policy.ABORT_SEND: ("abortsend", frozenset({"abortsend"}), "fields"),
}


def _override_module_params(params: dict[str, Any], result: dict[str, Any]) -> None:
    """WHMCS's module parameter names in a PreModuleTerminate answer give new values to
    `params["params"]` (params.ModuleParams) for the hooks after it."""
    module = params.get("params")
    if module is None:
        return
    overrides = {k: v for k, v in result.items() if k in MODULE_PARAMS}
    if isinstance(result.get("params"), dict):  # WHMCS's shape: {'params': {'username': ...}}
        overrides.update((k, v) for k, v in result["params"].items() if k in MODULE_PARAMS)
    if overrides:  # a ModuleParams (params.py) takes them with `override`; a plain dict (tools, tests) with update
        (module.override if hasattr(module, "override") else module.update)(overrides)


def _failure(result: Any) -> tuple[str, str] | None:
    """A FAIL point's answer as (the error message, what the hook said), or None for
    success. WHMCS modules answer "success" or an error message for the admin; ours may
    also answer a dict."""
    if result is None or result is True:
        return None
    if result is False:
        return "returned False", "returned False"
    if isinstance(result, str):
        return None if result in ("", "success") else (f"returned error: {result}", result)
    if isinstance(result, dict):
        error = result.get("error")
        if not error and result.get("status") == "error":
            # A WHMCS gateway module's answer: {'status': 'error', 'rawdata': ...}.
            error = result.get("rawdata") or "status error"
        return (f"returned error: {error}", str(error)) if error else None
    return None


def _short(value: Any, limit: int = 2000) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# What runs under these is a hook's: its log lines carry the request id, and what it
# prints is logged, not written to stdout (logs.py finds the hook from their frames).
hook_callers(HookRegistry.apply, HookRegistry.call)
