"""What a hook's return value does, by its point's declared policy (points.py), applied in
one place: `HookRegistry.apply`. Unit tests on the registry, with no database; the
per-point tests in test_hook_points.py show the same policies through whole runs.

The meta-test at the end fails when a policy has no `test_policy_<value>` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import structlog

from processor.hooks import POINTS, HookFailed, HookImpl, HookRegistry
from processor.hooks.points import Policy
from processor.hooks.registry import check_signature


def registry(point: str, *answers: Callable[..., Any], trace: bool = False) -> HookRegistry:
    """A registry with one hook per answer on `point`, run in the order given."""
    hooks = HookRegistry(trace=trace)
    for seq, fn in enumerate(answers):
        hooks.register(HookImpl(point, fn, 0, "test.py", 10 + seq, seq, check_signature(point, fn, 0, "test.py")))
    return hooks


def answering(value: Any, calls: list[str] | None = None, name: str = "hook") -> Callable[..., Any]:
    def hook(**kwargs: Any) -> Any:
        if calls is not None:
            calls.append(name)
        if isinstance(value, BaseException):
            raise value
        return value
    hook.__qualname__ = name
    return hook


def params(**more: Any) -> dict[str, Any]:
    return {"request_id": 7, **more}


def test_every_point_declares_a_policy_its_words_agree_with():
    for point in POINTS.values():
        assert isinstance(point.policy, Policy)
        assert point.fails_the_attempt == (point.policy in (Policy.VETO, Policy.FAIL, Policy.ABORT_SEND))
    assert {p.name for p in POINTS.values() if p.policy is Policy.VETO} == {"PreModuleTerminate", "PreModuleSuspend"}
    assert {p.name for p in POINTS.values() if p.policy is Policy.FAIL} == {
        "TerminateAccount", "SuspendAccount", "UnsuspendAccount", "CancelSubscription"}
    assert {p.name for p in POINTS.values() if p.policy is Policy.ABORT_SEND} == {"EmailPreSend",
                                                                                  "CancellationReminder"}
    assert {p.name for p in POINTS.values() if p.policy is Policy.SUPPRESS} == {"DailyCronJobPreEmail"}


def test_policy_nothing():
    """Return values are ignored, and an exception is logged and the next hook still runs."""
    calls: list[str] = []
    hooks = registry("ServiceCancelled", answering({"abortcmd": True, "error": "x"}, calls, "first"),
                     answering(RuntimeError("boom"), calls, "second"), answering("failed", calls, "third"))
    with structlog.testing.capture_logs() as logs:
        applied = hooks.apply("ServiceCancelled", p := params(days_late=0))
    assert calls == ["first", "second", "third"]
    assert (applied.stopped_by, applied.suppressed, applied.vetoed) == (None, False, None)
    assert "abortcmd" not in p
    assert [(e["event"], e["error"], e["request_id"]) for e in logs] == [("hook failed", "RuntimeError: boom", 7)]


def test_policy_veto():
    """abortcmd stops the hooks after it, naming the hook and its reason; other dicts merge into params."""
    calls: list[str] = []
    hooks = registry("PreModuleTerminate", answering({"ticket": 42, "reason": "kept out"}, calls, "first"),
                     answering({"abortcmd": True, "reason": "outstanding balance"}, calls, "second"),
                     answering(None, calls, "third"))
    applied = hooks.apply("PreModuleTerminate", p := params())
    assert calls == ["first", "second"]
    assert applied.vetoed == "vetoed by second (test.py:11): outstanding balance"
    assert p["ticket"] == 42 and "reason" not in p and "abortcmd" not in p
    assert registry("PreModuleTerminate", answering({"abortcmd": 1})).apply(
        "PreModuleTerminate", params()).vetoed == "vetoed by hook (test.py:10): no reason given"
    assert registry("PreModuleTerminate", answering("anything"), answering(None)).apply(
        "PreModuleTerminate", params()).vetoed is None
    with pytest.raises(HookFailed, match=r"PreModuleTerminate hook hook \(test.py:10\): RuntimeError: down"):
        registry("PreModuleTerminate", answering(RuntimeError("down"))).apply("PreModuleTerminate", params())


@pytest.mark.parametrize("answer, error", [
    (None, None), (True, None), ("success", None), ("", None), ({}, None), ({"status": "gone"}, None),
    ({"error": ""}, None), (42, None),
    ({"error": "API said no"}, "returned error: API said no"),
    ("Connection to server timed out", "returned error: Connection to server timed out"),  # WHMCS's way
    ("Success", "returned error: Success"),  # WHMCS compares exactly; so do we
    (False, "returned False"),
    # A WHMCS gateway module's answer (CancelSubscription's _cancelSubscription): status error fails.
    ({"status": "success", "rawdata": "ok"}, None),
    ({"status": "error", "rawdata": "No such subscription"}, "returned error: No such subscription"),
    ({"status": "error"}, "returned error: status error"),
])
def test_policy_fail(answer: Any, error: str | None):
    """A WHMCS module answers "success" or an error message: any other string fails the
    attempt, as {'error': ...}, False or raising do."""
    hooks = registry("TerminateAccount", answering(answer))
    if error is None:
        assert hooks.apply("TerminateAccount", params()).stopped_by is None
    else:
        with pytest.raises(HookFailed) as raised:
            hooks.apply("TerminateAccount", params())
        assert str(raised.value) == f"TerminateAccount hook hook (test.py:10): {error}"


def test_policy_fail_stops_at_the_first_failure():
    calls: list[str] = []
    hooks = registry("TerminateAccount", answering("success", calls, "a"), answering("no route", calls, "b"),
                     answering(None, calls, "c"))
    with pytest.raises(HookFailed, match="no route"):
        hooks.apply("TerminateAccount", params())
    assert calls == ["a", "b"]
    with pytest.raises(HookFailed, match="RuntimeError: down"):
        registry("TerminateAccount", answering(RuntimeError("down"))).apply("TerminateAccount", params())


def test_policy_abortsend():
    """abortsend stops the email, naming the hook; other dicts merge into the merge fields."""
    calls: list[str] = []
    fields: dict[str, Any] = {"client_name": "Ada"}
    hooks = registry("EmailPreSend", answering({"client_name": "Ada L.", "reason": "kept"}, calls, "first"),
                     answering({"abortsend": True}, calls, "second"), answering(None, calls, "third"))
    applied = hooks.apply("EmailPreSend", params(template="x", fields=fields))
    assert calls == ["first", "second"] and applied.stopped_by == "second (test.py:11)"
    assert fields == {"client_name": "Ada L.", "reason": "kept"}
    kept = registry("EmailPreSend", answering({"extra": 1})).apply("EmailPreSend", params(fields=fields))
    assert kept.stopped_by is None and fields["extra"] == 1
    with pytest.raises(HookFailed):
        registry("EmailPreSend", answering(ValueError("bad"))).apply("EmailPreSend", params(fields={}))


@pytest.mark.parametrize("answers, suppressed", [
    ([None], False), ([False], False), ([True], True), ([{"skip": 1}], True), ([None, "yes"], True),
    ([RuntimeError("x"), None], False), ([RuntimeError("x"), True], True),
])
def test_policy_suppress(answers: list[Any], suppressed: bool):
    """Any truthy answer suppresses; an exception is logged and counts as no answer."""
    hooks = registry("DailyCronJobPreEmail", *(answering(a, name=f"h{i}") for i, a in enumerate(answers)))
    with structlog.testing.capture_logs():
        assert hooks.apply("DailyCronJobPreEmail", {"run_id": 1, "summary": {}}).suppressed is suppressed


def test_a_point_without_hooks_applies_nothing():
    applied = HookRegistry().apply("PreModuleTerminate", params())
    assert (applied.stopped_by, applied.suppressed) == (None, False)


def test_every_declared_policy_has_a_test():
    tested = {name.removeprefix("test_policy_") for name in globals() if name.startswith("test_policy_")}
    declared = {point.policy.value for point in POINTS.values()} | {p.value for p in Policy}
    assert declared <= tested, f"policies without a test_policy_<value> in {__file__}: {sorted(declared - tested)}"


def test_each_signature_shape_gets_the_params_it_asks_for():
    """A hook is called the way its signature asks: `params` positionally or by keyword, the
    named parameters it wants, nothing, or all of them (**kwargs); with and without tracing."""
    seen: list[tuple[str, Any]] = []

    def positional(params):  # untyped, as operators write hooks
        seen.append(("positional", params["request_id"]))

    def keyword_only(*, params: dict[str, Any]) -> None:
        seen.append(("keyword_only", params["request_id"]))

    def defaulted(params: dict[str, Any], extra: int = 5) -> None:
        seen.append(("defaulted", (params["request_id"], extra)))

    def named(request_id: int, days_late: int) -> None:
        seen.append(("named", (request_id, days_late)))

    def nothing() -> None:
        seen.append(("nothing", None))

    def everything(**kwargs: Any) -> None:
        seen.append(("everything", (kwargs["request_id"], kwargs["params"]["days_late"])))

    for trace in (False, True):
        hooks = registry("ServiceCancelled", positional, keyword_only, defaulted, named, nothing, everything,
                         trace=trace)
        seen.clear()
        with structlog.testing.capture_logs() as logs:
            hooks.apply("ServiceCancelled", params(days_late=3))
        assert seen == [("positional", 7), ("keyword_only", 7), ("defaulted", (7, 5)), ("named", (7, 3)),
                        ("nothing", None), ("everything", (7, 3))]
        assert [e["event"] for e in logs] == (["hook called"] * 6 if trace else [])

