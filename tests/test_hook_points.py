"""Every hook point fires at its moment with its documented parameters.

Hooks are real files written into tmp_path/hooks and loaded with `load_hooks`, as an
operator's would be. A hook file reaches this module's PROBE through sys.modules; the
probe records each call (the arguments, and what the database looked like at that
moment through a fresh read session) and does what the test asked (return a value, raise).

One test per point is named `test_hook_<Point>` (as datasette's test_plugins.py); the
meta-tests at the end fail when a point has no such test or is missing from docs/hooks.md.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import re
import shutil
import textwrap
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Self

import pytest
import structlog
from click.testing import CliRunner, Result
from freezegun import freeze_time
from sqlalchemy import func, insert, select

from processor.cli import cli
from processor.config import ProductSettings
from processor.db import Database
from processor.hooks import (
    MODULE_POINTS,
    POINTS,
    HookDefinitionError,
    HookLoadError,
    HookRegistry,
    load_hooks,
)
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Invoice,
    InvoiceStatus,
    Lease,
    OutboxEmail,
    RequestStatus,
    RequestType,
    Run,
    RunStatus,
    RunTrigger,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.run import Runner, RunOptions, RunSummary
from tests import factories
from tests.conftest import REPO

D = dt.date(2026, 11, 26)
DOCS = REPO / "docs" / "hooks.md"
EXAMPLES = REPO / "processor" / "resources" / "app" / "hooks"  # what `cancelproc init` copies to hooks/


# --- the probe: what hook files call into --------------------------------------------------

@dataclass
class Call:
    label: str
    kwargs: dict[str, Any]  # a shallow copy, taken at call time
    keys: set[str]  # the argument names received
    params_keys: set[str]  # the keys of `params` at call time (it may grow later)
    seen: dict[str, Any]  # the database at that moment, through a fresh read session


@dataclass
class Probe:
    db: Database | None = None
    calls: list[Call] = field(default_factory=list)
    # label -> what the hook does: an exception to raise, a function of kwargs, or a value to return
    behaviour: dict[str, Any] = field(default_factory=dict)

    def record(self, label: str, kwargs: dict[str, Any]) -> Any:
        params = kwargs.get("params")
        self.calls.append(Call(label, dict(kwargs), set(kwargs), set(params) if isinstance(params, dict) else set(),
                               self._look(kwargs)))
        action = self.behaviour.get(label)
        if isinstance(action, BaseException):
            raise action
        if callable(action):
            return action(kwargs)
        return action

    def _look(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.db is None:
            return {}
        seen: dict[str, Any] = {}
        with self.db.read_session() as s:
            request_id = kwargs.get("request_id")
            if request_id is not None:
                request = s.get(CancellationRequest, request_id)
                seen.update(request_status=request.status.value, attempts=request.attempts,
                            service_status=request.service.status.value,
                            addons={a.status.value for a in request.service.addons},
                            invoices=sorted(i.status.value for i in s.scalars(
                                select(Invoice).where(Invoice.service_id == request.service_id))))
            run_id = kwargs.get("run_id")
            if run_id is not None:
                run = s.get(Run, run_id)
                seen.update(run_status=run.status.value, run_finished=run.finished_at is not None)
            seen["emails"] = s.scalar(select(func.count()).select_from(OutboxEmail))
        return seen

    def labels(self) -> list[str]:
        return [c.label for c in self.calls]

    def of(self, label: str) -> list[Call]:
        return [c for c in self.calls if c.label == label]

    def one(self, label: str) -> Call:
        calls = self.of(label)
        assert len(calls) == 1, f"{label} called {len(calls)} times; calls: {self.labels()}"
        return calls[0]


PROBE = Probe()
HEADER = f"import sys\nfrom processor.hooks import add_hook\nprobe = sys.modules[{__name__!r}].PROBE\n"


@pytest.fixture(autouse=True)
def probe(db: Database) -> Iterator[Probe]:
    """A fresh probe per test, looking at this test's database; nothing leaks into the next test."""
    PROBE.db, PROBE.calls, PROBE.behaviour = db, [], {}
    try:
        yield PROBE
    finally:
        PROBE.db, PROBE.calls, PROBE.behaviour = None, [], {}


def recorder(point: str, label: str | None = None, *, priority: int = 0) -> str:
    """Source of a hook taking **kwargs that records its call under `label` (default: the point)."""
    label = label or point
    name = "on_" + re.sub(r"\W", "_", label)
    return (f"\n@add_hook({point!r}, priority={priority})\ndef {name}(**kwargs):\n"
            f"    return probe.record({label!r}, kwargs)\n")


def write_hook(tmp_path: Path, filename: str, *sources: str) -> Path:
    folder = tmp_path / "hooks"
    folder.mkdir(exist_ok=True)
    path = folder / filename
    path.write_text(HEADER + "".join(textwrap.dedent(s) for s in sources))
    return path


def load(tmp_path: Path) -> HookRegistry:
    return load_hooks(tmp_path / "hooks", entry_points=False)


def line_of(path: Path, fragment: str) -> int:
    """The line number of the first line containing `fragment` (where add_hook is called)."""
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if fragment in text:
            return number
    raise AssertionError(f"{fragment!r} not in {path}")


def run(db: Database, settings: Any, now: dt.datetime, hooks: HookRegistry, **options: Any) -> RunSummary:
    return Runner(db, settings, clock=lambda: now, hooks=hooks).run(
        RunOptions(as_of=options.pop("as_of", D), **options))


def preview(db: Database, settings: Any, now: dt.datetime, hooks: HookRegistry) -> list[dict[str, Any]]:
    return list(Runner(db, settings, clock=lambda: now, hooks=hooks).preview(RunOptions(as_of=D)))


def keys_of(point: str) -> set[str]:
    return set(POINTS[point].params)


def assert_keys(call: Call, point: str, known_bug: str = "") -> None:
    assert call.keys == keys_of(point), (
        f"{point}: a **kwargs hook got {sorted(call.keys)}, but points.py declares {sorted(keys_of(point))} "
        f"(extra: {sorted(call.keys - keys_of(point))}, missing: {sorted(keys_of(point) - call.keys)})"
        + (f"\n{known_bug}" if known_bug else ""))
    # `params` holds every other argument (WHMCS's $vars), not itself; at the module points
    # its "params" is WHMCS's module parameters ($vars['params']).
    # (every per-request point of a run carries it along; WHMCS gives it at MODULE_POINTS).
    module = {"idempotency_key", "run_id"} <= keys_of(point)
    assert module or point not in MODULE_POINTS
    expected = keys_of(point) - ({"params"} if not module else set())
    assert call.params_keys == expected, f"{point}: params holds {sorted(call.params_keys)}"
    if module:
        assert call.kwargs["params"]["params"]["serviceid"] == call.kwargs["service"]["id"]


def get(db: Database, model: type, id_: Any) -> Any:
    with db.read_session() as s:
        return s.get(model, id_)


def audit(db: Database, request_id: int) -> list[tuple[str, str, str]]:
    with db.read_session() as s:
        return [(a.entity, a.action, a.detail) for a in s.scalars(
            select(AuditEntry).where(AuditEntry.request_id == request_id).order_by(AuditEntry.id))]


def emails(db: Database) -> list[OutboxEmail]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)))


@dataclass
class Seeded:
    request_id: int
    service_id: int
    client_id: int
    email: str
    domain: str
    effective_date: dt.date


def seed(db: Database, *, next_due_date: dt.date | None = D, addons: int = 0, unpaid: int = 0, paid: int = 0,
         reason: str = "Too expensive", balance: Decimal | None = None, subscription_id: str | None = None,
         **request: Any) -> Seeded:
    with db.session.begin() as s:
        svc = factories.service(s, next_due_date=next_due_date, addons=addons, unpaid=unpaid, paid=paid)
        if balance is not None:
            svc.client.balance = balance
        svc.subscription_id = subscription_id
        req = factories.request(s, svc, reason=reason, **request)
        return Seeded(req.id, svc.id, svc.client.id, svc.client.email, svc.domain, req.effective_date)


def assert_request_dicts(call: Call, it: Seeded, *, request_status: str = "pending", attempts: int = 0) -> None:
    """The request/service/client/product dicts of a per-request point (processor/params.py)."""
    kw = call.kwargs
    assert kw["request_id"] == it.request_id
    assert kw["request"] == {
        "id": it.request_id, "external_id": None, "type": "End of Billing Period", "status": request_status,
        "reason_code": "too_expensive", "reason": kw["request"]["reason"], "cancel_on": None,
        "effective_date": it.effective_date, "created_at": factories.CREATED, "attempts": attempts,
        "grace_ends_on": None}
    service = kw["service"]
    assert (service["id"], service["domain"], service["billing_cycle"], service["amount"]) == (
        it.service_id, it.domain, "Monthly", Decimal("24.00"))
    assert set(service) == {"id", "external_id", "domain", "status", "billing_cycle", "amount", "next_due_date",
                            "subscription_id"}
    client = kw["client"]
    assert (client["id"], client["email"], client["first_name"]) == (it.client_id, it.email, "Ada")
    assert set(client) == {"id", "external_id", "first_name", "last_name", "company_name", "email", "language",
                           "balance"}
    assert kw["product"] == {"id": kw["product"]["id"], "external_id": None, "name": "VPS 4GB", "module": "proxmox"}


def assert_run_request_params(call: Call, it: Seeded, run_id: int | None, *, dry_run: bool = False,
                              committed: bool = False) -> None:
    """committed: a point after the write sees the committed state in its dicts."""
    kw = call.kwargs
    assert_request_dicts(call, it, request_status="completed" if committed else "pending")
    assert kw["service"]["status"] == ("Cancelled" if committed else "Active")
    assert kw["idempotency_key"] == str(it.request_id)
    assert (kw["run_id"], kw["as_of"], kw["dry_run"]) == (run_id, D, dry_run)
    assert kw["params"]["request_id"] == it.request_id  # WHMCS style: everything in one dict too


# --- one test per hook point ---------------------------------------------------------------

@pytest.fixture
def invoke(settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """`cancelproc ARGS` in-process, on this test's database and hooks dir, at a frozen time."""
    monkeypatch.chdir(tmp_path)
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=settings.database_url, CANCELPROC_HOOKS_DIR=str(tmp_path / "hooks"),
               CANCELPROC_LOG_FORMAT="console")  # a person's view: the summary table, not a log event

    def _invoke(*args: Any) -> Result:
        with freeze_time(dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)):
            return CliRunner().invoke(cli, [str(a) for a in args], env=env)

    return _invoke


def ok(result: Result, code: int = 0) -> Result:
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


# The staff commands (`requests create`, `requests withdraw`) fire their points with the same
# per-request params as the run, `idempotency_key` included. A **kwargs hook must get exactly the
# arguments the point declares, and a hook that names one of them must load: the params passed and
# the points' declarations (processor/hooks/points.py) have to agree.
CLI_PARAMS_MISMATCH = ("the params a staff command passes to this point differ from what the point declares "
                       "(processor/hooks/points.py), e.g. an undeclared `idempotency_key`")


def test_hook_CancellationRequest(db, tmp_path, invoke, probe):
    with db.session.begin() as s:
        svc = factories.service(s)
        service_id, email = svc.id, svc.client.email
    write_hook(tmp_path, "created.py", recorder("CancellationRequest"))
    ok(invoke("requests", "create", service_id, "--type", "immediate", "--reason-code", "other",
              "--reason", "Moving to a bigger plan"))
    call = probe.one("CancellationRequest")
    kw = call.kwargs
    with db.read_session() as s:
        request_id = s.scalars(select(CancellationRequest.id)).one()
    # After the commit: a fresh connection already sees the request.
    assert call.seen["request_status"] == "pending" and call.seen["service_status"] == "Active"
    assert kw["request_id"] == request_id
    assert (kw["request"]["type"], kw["request"]["status"], kw["request"]["reason_code"], kw["request"]["reason"]) == (
        "Immediate", "pending", "other", "Moving to a bigger plan")
    assert (kw["service"]["id"], kw["service"]["status"]) == (service_id, "Active")
    assert kw["client"]["email"] == email and kw["product"]["module"] == "proxmox"
    assert kw["actor"]  # the operator (SUDO_USER or the login name)
    assert_keys(call, "CancellationRequest", CLI_PARAMS_MISMATCH)


def test_hook_CancellationRequestWithdrawn(db, tmp_path, invoke, probe):
    it = seed(db)
    write_hook(tmp_path, "withdrawn.py", recorder("CancellationRequestWithdrawn"))
    ok(invoke("requests", "withdraw", it.request_id, "--note", "client changed their mind"))
    call = probe.one("CancellationRequestWithdrawn")
    kw = call.kwargs
    assert call.seen["request_status"] == "withdrawn"  # committed before the hook
    assert kw["request_id"] == it.request_id
    assert kw["request"]["status"] == "withdrawn"
    assert (kw["service"]["id"], kw["service"]["status"], kw["service"]["domain"]) == (
        it.service_id, "Active", it.domain)
    assert kw["client"]["email"] == it.email
    assert kw["note"] == "client changed their mind" and kw["actor"]
    assert_keys(call, "CancellationRequestWithdrawn", CLI_PARAMS_MISMATCH)


def test_hook_PreCronJob(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "cron.py", recorder("PreCronJob"), recorder("PreModuleTerminate"))
    summary = run(db, settings, now, load(tmp_path), trigger=RunTrigger.CRON, operator="cron-user")
    assert probe.labels() == ["PreCronJob", "PreModuleTerminate"]  # before the first request
    call = probe.one("PreCronJob")
    assert_keys(call, "PreCronJob")
    assert call.kwargs == {"params": call.kwargs["params"], "run_id": summary.run_id, "as_of": D, "trigger": "cron",
                           "operator": "cron-user"}
    assert call.seen["run_status"] == "running"  # the run holds the lease
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.COMPLETED


def test_hook_PreModuleTerminate(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "pre.py", recorder("PreModuleTerminate"), recorder("TerminateAccount"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["PreModuleTerminate", "TerminateAccount"]
    call = probe.one("PreModuleTerminate")
    assert_keys(call, "PreModuleTerminate")
    assert_run_request_params(call, it, summary.run_id)
    assert call.kwargs["service"]["status"] == "Active"
    # Before anything is written: the service is still Active, the request pending, no email.
    assert call.seen == {"request_status": "pending", "attempts": 0, "service_status": "Active", "addons": set(),
                         "invoices": [], "run_status": "running", "run_finished": False, "emails": 0}
    assert summary.completed == 1


def test_hook_PreModuleTerminate_in_dry_run(db, settings, now, tmp_path, probe):
    """A preview calls PreModuleTerminate (dry_run=True, no run) and EmailPreSend, never TerminateAccount."""
    it = seed(db)
    write_hook(tmp_path, "pre.py", recorder("PreModuleTerminate"), recorder("EmailPreSend"),
               recorder("TerminateAccount"), recorder("AfterModuleTerminate"), recorder("ServiceCancelled"),
               recorder("PreCronJob"), recorder("AfterCronJob"))
    rows = preview(db, settings, now, load(tmp_path))
    assert [r["action"] for r in rows] == ["cancel"]
    assert probe.labels() == ["PreModuleTerminate", "EmailPreSend"]
    call = probe.one("PreModuleTerminate")
    assert_keys(call, "PreModuleTerminate")
    assert_run_request_params(call, it, None, dry_run=True)
    assert probe.one("EmailPreSend").kwargs["dry_run"] is True
    assert get(db, Service, it.service_id).status is ServiceStatus.ACTIVE


def test_hook_EmailPreSend(db, settings, now, tmp_path, probe):
    settings.email.company_name = "Example Hosting"
    it = seed(db, reason="Found a cheaper host")
    probe.behaviour["EmailPreSend"] = lambda kw: {"service_cancellation_reason": "INJECTED: moved to Mars",
                                                  "company_name": "Injected Hosting Ltd"}
    write_hook(tmp_path, "mail.py", recorder("PreModuleTerminate"), recorder("EmailPreSend"),
               recorder("TerminateAccount"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["PreModuleTerminate", "EmailPreSend", "TerminateAccount"]
    call = probe.one("EmailPreSend")
    assert_keys(call, "EmailPreSend")
    kw = call.kwargs
    assert (kw["template"], kw["to_address"], kw["request_id"], kw["run_id"], kw["dry_run"]) == (
        "service_cancellation_confirmation", it.email, it.request_id, summary.run_id, False)
    # The merge fields as they were when the hook was called: what the template will get.
    fields = kw["fields"]
    assert (fields["client_email"], fields["service_domain"], fields["request_id"]) == (
        it.email, it.domain, it.request_id)
    assert call.seen["service_status"] == "Active" and call.seen["emails"] == 0  # before rendering and writing
    (email,) = emails(db)
    assert "Reason given: INJECTED: moved to Mars" in email.text_body
    assert email.text_body.endswith("\nInjected Hosting Ltd") and "Injected Hosting Ltd" in email.html_body
    assert "Found a cheaper host" not in email.text_body
    assert summary.emails_queued == 1


def test_hook_EmailPreSend_abortsend_queues_nothing_and_is_recorded(db, settings, now, tmp_path, probe):
    it = seed(db)
    probe.behaviour["abort"] = {"abortsend": True}
    path = write_hook(tmp_path, "mail.py", recorder("EmailPreSend", "abort"),
                      recorder("EmailPreSend", "later", priority=5), recorder("TerminateAccount"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["abort", "TerminateAccount"]  # a later EmailPreSend hook is not called
    assert (summary.completed, summary.emails_queued, summary.exit_code) == (1, 0, 0)
    assert emails(db) == []
    assert get(db, Service, it.service_id).status is ServiceStatus.CANCELLED  # only the email is aborted
    (row,) = [a for a in audit(db, it.request_id) if a[0] == "email"]
    assert row[1] == "aborted"
    assert f"mail.py:{line_of(path, 'EmailPreSend')}" in row[2] and "abortsend" in row[2]


def test_hook_CancellationReminder(db, settings, now, tmp_path, probe):
    it = seed(db, next_due_date=D + dt.timedelta(days=7))  # a week ahead: the 7-day reminder
    probe.behaviour["CancellationReminder"] = lambda kw: {"retention_offer": "20% off"}
    write_hook(tmp_path, "remind.py", recorder("PreModuleTerminate"), recorder("CancellationReminder"),
               recorder("EmailPreSend"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["CancellationReminder", "EmailPreSend"]  # not due: no PreModuleTerminate
    call = probe.one("CancellationReminder")
    assert_keys(call, "CancellationReminder")
    assert_run_request_params(call, it, summary.run_id)
    kw = call.kwargs
    assert (kw["days"], kw["days_left"], kw["cancellation_date"]) == (7, 7, D + dt.timedelta(days=7))
    assert (kw["fields"]["reminder_days"], kw["fields"]["service_cancellation_date"]) == (7, "December 3, 2026")
    assert call.seen["emails"] == 0 and call.seen["request_status"] == "pending"  # before it is queued
    mail = probe.one("EmailPreSend").kwargs
    assert (mail["template"], mail["fields"]["retention_offer"]) == ("cancellation_reminder", "20% off")
    assert [e.key for e in emails(db)] == [f"cancellation_reminder:request:{it.request_id}:7"]
    assert summary.reminders_queued == 1


def test_hook_CancellationReminder_abortsend_in_a_dry_run(db, settings, now, tmp_path, probe):
    seed(db, next_due_date=D + dt.timedelta(days=1))
    probe.behaviour["CancellationReminder"] = {"abortsend": True}
    write_hook(tmp_path, "remind.py", recorder("CancellationReminder"), recorder("EmailPreSend"))
    (item,) = preview(db, settings, now, load(tmp_path))
    assert (item["action"], item["email_to"]) == ("remind", "")
    assert item["detail"].startswith("1-day reminder aborted by on_CancellationReminder (remind.py:")
    assert probe.labels() == ["CancellationReminder"] and probe.one("CancellationReminder").kwargs["dry_run"]
    assert emails(db) == []


def test_hook_TerminateAccount(db, settings, now, tmp_path, probe):
    it = seed(db, addons=1, unpaid=1)
    write_hook(tmp_path, "term.py", recorder("TerminateAccount"))
    summary = run(db, settings, now, load(tmp_path))
    call = probe.one("TerminateAccount")
    assert_keys(call, "TerminateAccount")
    assert_run_request_params(call, it, summary.run_id)
    assert call.kwargs["idempotency_key"] == str(it.request_id)
    # Nothing is written before the external deprovisioning has succeeded.
    assert (call.seen["request_status"], call.seen["service_status"], call.seen["addons"], call.seen["invoices"],
            call.seen["emails"]) == ("pending", "Active", {"Active"}, ["Unpaid"], 0)
    assert get(db, Service, it.service_id).status is ServiceStatus.CANCELLED


def test_hook_TerminateAccount_is_never_called_in_dry_run(db, settings, now, tmp_path, probe):
    seed(db)
    write_hook(tmp_path, "term.py", recorder("TerminateAccount"))
    assert [r["action"] for r in preview(db, settings, now, load(tmp_path))] == ["cancel"]
    assert probe.calls == []


def test_hook_CancelSubscription(db, settings, now, tmp_path, probe):
    it = seed(db, subscription_id="sub_1Abc")
    without = seed(db)  # no subscription: not called for it
    write_hook(tmp_path, "sub.py", recorder("TerminateAccount"), recorder("CancelSubscription"))
    summary = run(db, settings, now, load(tmp_path))
    assert summary.completed == 2
    assert probe.labels() == ["TerminateAccount", "CancelSubscription", "TerminateAccount"]
    call = probe.one("CancelSubscription")
    assert_keys(call, "CancelSubscription")
    assert_request_dicts(call, it)
    kw = call.kwargs
    assert (kw["subscription_id"], kw["subscriptionID"], kw["service"]["subscription_id"]) == ("sub_1Abc",) * 3
    assert kw["idempotency_key"] == f"cancelproc:cancel-subscription:request:{it.request_id}"
    assert (kw["run_id"], kw["as_of"], kw["dry_run"]) == (summary.run_id, D, False)
    # After the veto and TerminateAccount, before anything is written.
    assert (call.seen["request_status"], call.seen["service_status"], call.seen["emails"]) == (
        "pending", "Active", 0)
    assert probe.of("TerminateAccount")[1].kwargs["request_id"] == without.request_id
    assert get(db, Service, it.service_id).status is ServiceStatus.CANCELLED


def test_hook_CancelSubscription_is_never_called_in_dry_run_nor_after_a_veto(db, settings, now, tmp_path, probe):
    seed(db, subscription_id="sub_1")
    write_hook(tmp_path, "sub.py", recorder("CancelSubscription"), recorder("PreModuleTerminate"))
    assert [r["action"] for r in preview(db, settings, now, load(tmp_path))] == ["cancel"]
    assert probe.labels() == ["PreModuleTerminate"]
    probe.calls.clear()
    probe.behaviour["PreModuleTerminate"] = {"abortcmd": True, "reason": "owes money"}
    assert run(db, settings, now, load(tmp_path)).vetoed == 1
    assert probe.labels() == ["PreModuleTerminate"]


@pytest.mark.parametrize("failure", [{"error": "gateway down"}, {"status": "error", "rawdata": "gateway down"},
                                     "gateway down", RuntimeError("gateway down")])
def test_a_failing_cancel_subscription_changes_nothing_and_is_retried_then_failed(
        db, settings, now, tmp_path, probe, failure):
    """As TerminateAccount: the attempt fails (WHMCS's gateway answer {'status': 'error'} too),
    nothing is written, the request is retried with the same key, then failed."""
    settings.max_attempts, settings.retry_backoff_minutes = 2, 0
    it = seed(db, subscription_id="sub_9", unpaid=1)
    probe.behaviour["CancelSubscription"] = failure
    path = write_hook(tmp_path, "sub.py", recorder("CancelSubscription"), recorder("AfterModuleTerminateFailed"))
    hooks = load(tmp_path)
    first = run(db, settings, now, hooks)
    assert (first.retrying, first.completed, first.exit_code) == (1, 0, 1)
    request = get(db, CancellationRequest, it.request_id)
    assert request.status is RequestStatus.PENDING and "gateway down" in request.last_error
    assert f"sub.py:{line_of(path, 'CancelSubscription')}" in request.last_error
    assert probe.one("AfterModuleTerminateFailed").kwargs["error"] == request.last_error
    assert get(db, Service, it.service_id).status is ServiceStatus.ACTIVE and emails(db) == []
    last = run(db, settings, now + dt.timedelta(minutes=1), hooks)
    assert (last.failed, last.completed) == (1, 0)
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.FAILED
    keys = {c.kwargs["idempotency_key"] for c in probe.of("CancelSubscription")}
    assert keys == {f"cancelproc:cancel-subscription:request:{it.request_id}"}
    assert len(probe.of("CancelSubscription")) == 2


def test_cancel_subscription_runs_again_after_a_crash_before_the_commit(db, settings, now, tmp_path, probe):
    """At least once, with a key stable across the crash."""
    it = seed(db, subscription_id="sub_2")
    probe.behaviour["CancelSubscription"] = KeyboardInterrupt()  # after recording: the gateway was called
    write_hook(tmp_path, "sub.py", recorder("CancelSubscription"))
    hooks = load(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(db, settings, now, hooks)
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.PENDING
    probe.behaviour.clear()
    assert run(db, settings, now + dt.timedelta(minutes=1), hooks).completed == 1
    keys = [c.kwargs["idempotency_key"] for c in probe.of("CancelSubscription")]
    assert keys == [f"cancelproc:cancel-subscription:request:{it.request_id}"] * 2


def test_cancel_subscription_in_requests_process(db, tmp_path, invoke, probe):
    """`requests process` (the CLI's immediate path) goes through the same decision."""
    it = seed(db, subscription_id="sub_3", next_due_date=D + dt.timedelta(days=20))
    failing = seed(db, subscription_id="sub_4", next_due_date=D + dt.timedelta(days=20))
    probe.behaviour["CancelSubscription"] = lambda kw: (
        {"error": "card network down"} if kw["subscription_id"] == "sub_4" else "success")
    write_hook(tmp_path, "sub.py", recorder("CancelSubscription"))
    result = invoke("requests", "process", it.request_id, failing.request_id, "--now", "--json")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert (summary["completed"], summary["retrying"]) == (1, 1)
    assert sorted(c.kwargs["subscription_id"] for c in probe.of("CancelSubscription")) == ["sub_3", "sub_4"]
    assert get(db, Service, it.service_id).status is ServiceStatus.CANCELLED
    assert get(db, Service, failing.service_id).status is ServiceStatus.ACTIVE
    assert "card network down" in get(db, CancellationRequest, failing.request_id).last_error


def test_hook_AfterModuleTerminate(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "after.py", recorder("AfterModuleTerminate"))
    summary = run(db, settings, now, load(tmp_path))
    call = probe.one("AfterModuleTerminate")
    assert_keys(call, "AfterModuleTerminate")
    assert_run_request_params(call, it, summary.run_id, committed=True)
    # Committed: a fresh connection sees the service Cancelled, the request completed, the email queued.
    assert (call.seen["service_status"], call.seen["request_status"], call.seen["emails"]) == (
        "Cancelled", "completed", 1)


def test_hook_AfterModuleTerminateFailed(db, settings, now, tmp_path, probe):
    it = seed(db)
    probe.behaviour["TerminateAccount"] = {"error": "proxmox API: node unreachable"}
    path = write_hook(tmp_path, "term.py", recorder("TerminateAccount"), recorder("AfterModuleTerminateFailed"))
    summary = run(db, settings, now, load(tmp_path))
    call = probe.one("AfterModuleTerminateFailed")
    assert_keys(call, "AfterModuleTerminateFailed")
    assert_run_request_params(call, it, summary.run_id)
    error = call.kwargs["error"]
    assert "proxmox API: node unreachable" in error and f"term.py:{line_of(path, 'TerminateAccount')}" in error
    # After the failed attempt was recorded: still Active, pending, one attempt, last_error set.
    assert (call.seen["service_status"], call.seen["request_status"], call.seen["attempts"]) == ("Active", "pending", 1)
    assert get(db, CancellationRequest, it.request_id).last_error == error


# --- the grace period's points (a product with grace_days) -----------------------------------

GRACE = 14
GRACE_ENDS = D + dt.timedelta(days=GRACE)


def with_grace(settings: Any) -> Any:
    """The factories' product ("VPS 4GB") with a grace period."""
    return settings.model_copy(update={"products": {"VPS 4GB": ProductSettings(grace_days=GRACE)}})


def assert_suspension_params(call: Call, it: Seeded, run_id: int | None, *, committed: bool = False) -> None:
    kw = call.kwargs
    assert_request_dicts(call, it) if not committed else None
    assert kw["service"]["status"] == ("Suspended" if committed else "Active")
    assert (kw["grace_days"], kw["grace_ends_on"]) == (GRACE, GRACE_ENDS)
    assert str(GRACE_ENDS) in kw["suspendreason"]
    assert (kw["run_id"], kw["as_of"], kw["idempotency_key"]) == (run_id, D, str(it.request_id))


def test_hook_PreModuleSuspend(db, settings, now, tmp_path, probe):
    """Before the suspension, nothing written; its veto keeps the service Active, the request
    pending (a vetoed attempt, retried), no email; and it fires in the dry run too."""
    it = seed(db)
    write_hook(tmp_path, "pre.py", recorder("PreModuleSuspend"), recorder("PreModuleTerminate"),
               recorder("SuspendAccount"))
    summary = run(db, with_grace(settings), now, load(tmp_path))
    assert probe.labels() == ["PreModuleSuspend", "SuspendAccount"]  # not the termination's points
    call = probe.one("PreModuleSuspend")
    assert_keys(call, "PreModuleSuspend")
    assert_suspension_params(call, it, summary.run_id)
    assert call.seen == {"request_status": "pending", "attempts": 0, "service_status": "Active", "addons": set(),
                         "invoices": [], "run_status": "running", "run_finished": False, "emails": 0}
    assert (summary.suspended, summary.completed) == (1, 0)

    vetoed = seed(db)
    probe.calls.clear()
    probe.behaviour["PreModuleSuspend"] = {"abortcmd": True, "reason": "legal hold"}
    assert [r["action"] for r in preview(db, with_grace(settings), now, load(tmp_path))] == ["vetoed"]
    summary = run(db, with_grace(settings), now, load(tmp_path))
    assert probe.labels() == ["PreModuleSuspend"] * 2  # the preview's, the run's; no SuspendAccount
    assert (summary.vetoed, summary.suspended) == (1, 0)
    request = get(db, CancellationRequest, vetoed.request_id)
    assert (request.status, request.attempts, request.suspended_on) == (RequestStatus.PENDING, 1, None)
    assert "legal hold" in request.last_error
    assert get(db, Service, vetoed.service_id).status is ServiceStatus.ACTIVE
    assert [e.request_id for e in emails(db)] == [it.request_id]
    assert audit(db, vetoed.request_id)[-1][1] == "vetoed"


def test_hook_SuspendAccount(db, settings, now, tmp_path, probe):
    """The external suspension, last before the write; never in the dry run."""
    it = seed(db, addons=1, unpaid=1)
    write_hook(tmp_path, "suspend.py", recorder("SuspendAccount"))
    assert [r["action"] for r in preview(db, with_grace(settings), now, load(tmp_path))] == ["suspend"]
    assert probe.calls == []
    summary = run(db, with_grace(settings), now, load(tmp_path))
    call = probe.one("SuspendAccount")
    assert_keys(call, "SuspendAccount")
    assert_suspension_params(call, it, summary.run_id)
    assert (call.seen["request_status"], call.seen["service_status"], call.seen["emails"]) == ("pending", "Active", 0)
    # Suspended: the add-ons and unpaid invoices wait for the cancellation.
    assert get(db, Service, it.service_id).status is ServiceStatus.SUSPENDED
    with db.read_session() as s:
        assert {a.status for a in s.scalars(select(ServiceAddon))} == {ServiceStatus.ACTIVE}
        assert {i.status for i in s.scalars(select(Invoice))} == {InvoiceStatus.UNPAID}


def test_hook_AfterModuleSuspend(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "after.py", recorder("AfterModuleSuspend"), recorder("AfterModuleTerminate"))
    summary = run(db, with_grace(settings), now, load(tmp_path))
    call = probe.one("AfterModuleSuspend")
    assert_keys(call, "AfterModuleSuspend")
    assert_suspension_params(call, it, summary.run_id, committed=True)
    assert call.kwargs["request"]["grace_ends_on"] == GRACE_ENDS
    # Committed: Suspended, the request still pending (open), its email queued.
    assert (call.seen["service_status"], call.seen["request_status"], call.seen["emails"]) == (
        "Suspended", "pending", 1)
    assert probe.of("AfterModuleTerminate") == []


def test_hook_AfterModuleSuspendFailed(db, settings, now, tmp_path, probe):
    """A failing SuspendAccount fails the attempt: nothing written but the failure, retried
    after the backoff; the retry suspends once, with one email."""
    it = seed(db)
    probe.behaviour["SuspendAccount"] = {"error": "cPanel: suspendacct failed"}
    write_hook(tmp_path, "suspend.py", recorder("SuspendAccount"), recorder("AfterModuleSuspendFailed"),
               recorder("AfterModuleTerminateFailed"))
    summary = run(db, with_grace(settings), now, load(tmp_path))
    assert (summary.retrying, summary.suspended, summary.emails_queued) == (1, 0, 0)
    call = probe.one("AfterModuleSuspendFailed")
    assert_keys(call, "AfterModuleSuspendFailed")
    assert "cPanel: suspendacct failed" in call.kwargs["error"]
    assert call.kwargs["failureResponseMessage"] == "cPanel: suspendacct failed"
    assert (call.seen["service_status"], call.seen["request_status"], call.seen["attempts"], call.seen["emails"]) == (
        "Active", "pending", 1, 0)
    assert probe.of("AfterModuleTerminateFailed") == []
    request = get(db, CancellationRequest, it.request_id)
    assert request.suspended_on is None and request.next_attempt_at is not None
    # After the backoff, SuspendAccount works: suspended once, one email, attempts from 0 again.
    probe.behaviour.clear()
    later = request.next_attempt_at + dt.timedelta(minutes=1)
    summary = run(db, with_grace(settings), later, load(tmp_path))
    assert (summary.suspended, summary.emails_queued) == (1, 1)
    request = get(db, CancellationRequest, it.request_id)
    assert (request.status, request.suspended_on, request.grace_ends_on, request.attempts, request.last_error) == (
        RequestStatus.PENDING, D, GRACE_ENDS, 0, None)
    assert [e.template for e in emails(db)] == ["service_suspended_for_cancellation"]


def test_hook_UnsuspendAccount(db, settings, now, tmp_path, invoke, probe):
    """`requests withdraw` in the grace period: UnsuspendAccount before the commit; if it
    fails, nothing changes (exit 2, the service stays suspended); then it works: the
    service is Active again and the client gets service_unsuspended."""
    it = seed(db)
    run(db, with_grace(settings), now, HookRegistry())
    assert get(db, Service, it.service_id).status is ServiceStatus.SUSPENDED
    path = write_hook(tmp_path, "unsuspend.py", recorder("UnsuspendAccount"),
                      recorder("CancellationRequestWithdrawn"))
    probe.behaviour["UnsuspendAccount"] = {"error": "cPanel: unsuspendacct failed"}
    result = ok(invoke("requests", "withdraw", it.request_id, "--note", "kept after all"), 2)
    assert "request not withdrawn" in result.stderr and "cPanel: unsuspendacct failed" in result.stderr
    assert f"unsuspend.py:{line_of(path, 'UnsuspendAccount')}" in result.stderr
    assert "stays suspended" in result.stderr
    request = get(db, CancellationRequest, it.request_id)
    assert (request.status, request.grace_ends_on) == (RequestStatus.PENDING, GRACE_ENDS)
    assert get(db, Service, it.service_id).status is ServiceStatus.SUSPENDED
    assert probe.labels() == ["UnsuspendAccount"]  # no CancellationRequestWithdrawn: nothing was withdrawn

    probe.calls.clear()
    probe.behaviour.clear()
    ok(invoke("requests", "withdraw", it.request_id, "--note", "kept after all"))
    assert probe.labels() == ["UnsuspendAccount", "CancellationRequestWithdrawn"]
    call = probe.one("UnsuspendAccount")
    assert_keys(call, "UnsuspendAccount", CLI_PARAMS_MISMATCH)
    kw = call.kwargs
    assert (kw["request_id"], kw["idempotency_key"], kw["note"], kw["run_id"], kw["dry_run"]) == (
        it.request_id, str(it.request_id), "kept after all", None, False)
    assert kw["service"]["status"] == "Suspended" and kw["actor"]
    assert kw["params"]["params"]["serviceid"] == it.service_id  # WHMCS's module parameters
    # Before the commit: a fresh connection still sees it pending and suspended.
    assert (call.seen["request_status"], call.seen["service_status"]) == ("pending", "Suspended")
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.WITHDRAWN
    assert get(db, Service, it.service_id).status is ServiceStatus.ACTIVE
    assert [e.template for e in emails(db)] == ["service_suspended_for_cancellation", "service_unsuspended"]
    # The suspension's email, still queued, is not sent: the client reads only that it is Active again.
    assert [e.status.value for e in emails(db)] == ["withdrawn", "sent"]  # sent at once (send_after_create)
    assert sorted((entity, action) for entity, action, _ in audit(db, it.request_id)[-4:]) == [
        ("email", "withdrawn"), ("request", "unsuspended"), ("request", "withdrawn"), ("service", "unsuspended")]


def test_hook_AddonCancelled(db, settings, now, tmp_path, probe):
    it = seed(db, addons=2)
    write_hook(tmp_path, "addon.py", recorder("AddonCancelled"))
    summary = run(db, settings, now, load(tmp_path))
    calls = probe.of("AddonCancelled")
    with db.read_session() as s:
        addon_ids = list(s.scalars(select(ServiceAddon.id).where(ServiceAddon.service_id == it.service_id)
                                   .order_by(ServiceAddon.id)))
    assert sorted(c.kwargs["addon_id"] for c in calls) == addon_ids
    for call in calls:
        assert_keys(call, "AddonCancelled")
        assert_run_request_params(call, it, summary.run_id, committed=True)
        addon = call.kwargs["addon"]
        assert addon["id"] == call.kwargs["addon_id"]
        assert addon["name"].startswith("Backup ") and addon["amount"] == Decimal(2)
        assert set(addon) == {"id", "external_id", "name", "amount", "status", "next_due_date"}
        assert addon["status"] == "Cancelled"
        assert call.seen["addons"] == {"Cancelled"} and call.seen["request_status"] == "completed"  # committed


def test_hook_InvoiceCancelled(db, settings, now, tmp_path, probe):
    it = seed(db, unpaid=1, paid=1)
    write_hook(tmp_path, "invoice.py", recorder("InvoiceCancelled"))
    summary = run(db, settings, now, load(tmp_path))
    call = probe.one("InvoiceCancelled")  # the unpaid one only
    assert_keys(call, "InvoiceCancelled")
    assert_run_request_params(call, it, summary.run_id, committed=True)
    invoice = call.kwargs["invoice"]
    assert invoice["id"] == call.kwargs["invoice_id"]
    assert (invoice["amount"], invoice["due_date"], set(invoice)) == (
        Decimal("24.00"), D, {"id", "external_id", "amount", "due_date"})
    assert get(db, Invoice, invoice["id"]).status is InvoiceStatus.CANCELLED
    assert call.seen["invoices"] == ["Cancelled", "Paid"]  # committed when the hook runs


def test_hook_InvoiceCancelled_not_fired_when_invoices_are_kept(db, settings, now, tmp_path, probe):
    settings.cancel_unpaid_invoices = False
    seed(db, unpaid=1)
    write_hook(tmp_path, "invoice.py", recorder("InvoiceCancelled"))
    assert run(db, settings, now, load(tmp_path)).completed == 1
    assert probe.calls == []


def test_hook_ServiceCancelled(db, settings, now, tmp_path, probe):
    it = seed(db, next_due_date=D - dt.timedelta(days=3), addons=1, unpaid=1)
    write_hook(tmp_path, "all.py", recorder("ServiceCancelled"), recorder("AfterModuleTerminate"),
               recorder("AddonCancelled"), recorder("InvoiceCancelled"))
    summary = run(db, settings, now, load(tmp_path))
    # After AfterModuleTerminate and the add-on and invoice hooks.
    assert probe.labels() == ["AfterModuleTerminate", "AddonCancelled", "InvoiceCancelled", "ServiceCancelled"]
    call = probe.one("ServiceCancelled")
    assert_keys(call, "ServiceCancelled")
    kw = call.kwargs
    assert (kw["request_id"], kw["service"]["id"], kw["service"]["domain"], kw["client"]["email"],
            kw["product"]["module"], kw["run_id"], kw["as_of"], kw["dry_run"]) == (
        it.request_id, it.service_id, it.domain, it.email, "proxmox", summary.run_id, D, False)
    assert kw["days_late"] == 3
    assert (call.seen["service_status"], call.seen["request_status"]) == ("Cancelled", "completed")
    with db.read_session() as s:
        assert s.get(CancellationRequest, it.request_id).days_late == 3


CRON_POINTS = ("PreCronJob", "PreAutomationTask", "PostAutomationTask", "AfterCronJob", "DailyCronJob",
               "DailyCronJobPreEmail")


def test_hook_CreditIssued(db, settings, now, tmp_path, probe):
    settings.immediate_refund = "credit"
    # Monthly, paid 24.00 for 2026-11-06..12-06; cancelled 11-26: 10 of 30 days unused -> 8.00.
    it = seed(db, next_due_date=D + dt.timedelta(days=10), paid=1, type_=RequestType.IMMEDIATE)
    not_credited = seed(db, type_=RequestType.IMMEDIATE)  # no paid invoice: no credit, no call
    write_hook(tmp_path, "credit.py", recorder("ServiceCancelled"), recorder("CreditIssued"))
    summary = run(db, settings, now, load(tmp_path))
    assert summary.completed == 2
    call = probe.one("CreditIssued")
    assert_keys(call, "CreditIssued")
    kw = call.kwargs
    assert (kw["request_id"], kw["run_id"], kw["amount"]) == (it.request_id, summary.run_id, Decimal("8.00"))
    assert kw["idempotency_key"] == f"cancelproc:credit:request:{it.request_id}"
    credit = kw["credit"]
    assert (credit["id"], credit["amount"], credit["days_unused"], credit["days_in_period"], credit["period_end"]) == (
        kw["credit_id"], Decimal("8.00"), 10, 30, D + dt.timedelta(days=10))
    assert credit["invoice_amount"] == Decimal("24.00") and "8.00" in credit["description"]
    # After the commit, after ServiceCancelled of the same request.
    assert (call.seen["request_status"], call.seen["service_status"]) == ("completed", "Cancelled")
    assert kw["service"]["status"] == "Cancelled" and kw["request"]["status"] == "completed"
    labels = [(c.label, c.kwargs["request_id"]) for c in probe.calls]
    assert labels.index(("ServiceCancelled", it.request_id)) < labels.index(("CreditIssued", it.request_id))
    assert ("ServiceCancelled", not_credited.request_id) in labels


def test_hook_PreAutomationTask(db, settings, now, tmp_path, probe):
    seed(db)
    seed(db)
    write_hook(tmp_path, "cron.py", *(recorder(p) for p in CRON_POINTS), recorder("ServiceCancelled"))
    summary = run(db, settings, now, load(tmp_path))
    # Once per run each, around the cancellation step (docs/hooks.md, "Where the cron points fire").
    assert probe.labels() == ["PreCronJob", "PreAutomationTask", "ServiceCancelled", "ServiceCancelled",
                              "PostAutomationTask", "AfterCronJob", "DailyCronJob", "DailyCronJobPreEmail"]
    call = probe.one("PreAutomationTask")
    assert_keys(call, "PreAutomationTask")
    assert (call.kwargs["task"], call.kwargs["run_id"], call.kwargs["as_of"]) == (
        "CancellationRequests", summary.run_id, D)
    assert call.seen["run_status"] == "running"


def test_hook_PostAutomationTask(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "cron.py", *(recorder(p) for p in CRON_POINTS))
    summary = run(db, settings, now, load(tmp_path))
    call = probe.one("PostAutomationTask")
    assert_keys(call, "PostAutomationTask")
    assert (call.kwargs["task"], call.kwargs["completed"], call.kwargs["run_id"]) == (
        "CancellationRequests", True, summary.run_id)
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.COMPLETED  # after the requests
    assert call.seen["run_finished"] is False  # before the run record is closed


def test_hook_PostAutomationTask_fires_not_completed_when_the_run_stops(db, settings, now, tmp_path, probe):
    seed(db)
    seed(db)
    settings.chunk_size = 1
    write_hook(tmp_path, "cron.py", *(recorder(p) for p in CRON_POINTS))
    summary = Runner(db, settings, clock=lambda: now, hooks=load(tmp_path), should_stop=lambda: True).run(
        RunOptions(as_of=D))
    assert summary.status is RunStatus.STOPPED and summary.completed == 1
    # Stopped: the task ended without going through; no DailyCronJob, no digest.
    assert probe.labels() == ["PreCronJob", "PreAutomationTask", "PostAutomationTask", "AfterCronJob"]
    assert probe.one("PostAutomationTask").kwargs["completed"] is False


def test_hook_DailyCronJob(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "cron.py", *(recorder(p) for p in CRON_POINTS))
    summary = run(db, settings, now, load(tmp_path))
    call = probe.one("DailyCronJob")
    assert_keys(call, "DailyCronJob")
    assert (call.kwargs["run_id"], call.kwargs["as_of"]) == (summary.run_id, D)
    assert call.seen["run_finished"] is True
    # `requests process` applies a few requests at once: not the daily job.
    probe.calls.clear()
    other = seed(db)
    run(db, settings, now, load(tmp_path), request_ids=[other.request_id], trigger=RunTrigger.MANUAL)
    assert "DailyCronJob" not in probe.labels()
    assert probe.one("PostAutomationTask").kwargs["completed"] is True
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.COMPLETED


def test_hook_AfterCronJob(db, settings, now, tmp_path, probe):
    it = seed(db)
    seed(db, next_due_date=D + dt.timedelta(days=30))  # not due
    write_hook(tmp_path, "cron.py", recorder("AfterCronJob"), recorder("ServiceCancelled"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["ServiceCancelled", "AfterCronJob"]
    call = probe.one("AfterCronJob")
    assert_keys(call, "AfterCronJob")
    assert call.kwargs["run_id"] == summary.run_id
    got = call.kwargs["summary"]
    assert got == summary.as_dict() | {"digest_suppressed": False}
    assert (got["due"], got["completed"], got["failed"], got["vetoed"], got["emails_queued"], got["status"],
            got["as_of"], got["run_id"], got["failures"]) == (1, 1, 0, 0, 1, "completed", D, summary.run_id, [])
    assert (call.seen["run_status"], call.seen["run_finished"]) == ("completed", True)  # the run record is closed
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.COMPLETED


@pytest.mark.parametrize("returned, suppressed", [(True, True), ({"skip": 1}, True), (None, False), (False, False)])
def test_hook_DailyCronJobPreEmail(db, settings, now, tmp_path, probe, returned, suppressed):
    seed(db)
    probe.behaviour["DailyCronJobPreEmail"] = returned
    write_hook(tmp_path, "digest.py", recorder("DailyCronJobPreEmail"), recorder("AfterCronJob"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["AfterCronJob", "DailyCronJobPreEmail"]
    call = probe.one("DailyCronJobPreEmail")
    assert_keys(call, "DailyCronJobPreEmail")
    assert call.kwargs["run_id"] == summary.run_id
    assert (call.kwargs["summary"]["completed"], call.kwargs["summary"]["status"]) == (1, "completed")
    assert summary.digest_suppressed is suppressed


# --- semantics: vetoes, merges, failures, isolation ----------------------------------------

def test_a_veto_keeps_the_request_pending_and_stops_the_rest(db, settings, now, tmp_path, probe):
    it = seed(db)
    probe.behaviour["veto"] = {"abortcmd": True, "reason": "client owes 40.00"}
    path = write_hook(tmp_path, "veto.py", recorder("PreModuleTerminate", "veto"),
                      recorder("PreModuleTerminate", "later", priority=10), recorder("EmailPreSend"),
                      recorder("TerminateAccount"), recorder("AfterModuleTerminateFailed"),
                      recorder("AfterModuleTerminate"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["veto"]  # no later PreModuleTerminate, no email, no TerminateAccount, no Failed hook
    assert (summary.vetoed, summary.completed, summary.retrying, summary.exit_code) == (1, 0, 0, 1)
    assert summary.failures[0]["vetoed"] is True
    request = get(db, CancellationRequest, it.request_id)
    assert (request.status, request.attempts) == (RequestStatus.PENDING, 1)
    where = f"veto.py:{line_of(path, 'PreModuleTerminate')}"
    assert where in request.last_error and "client owes 40.00" in request.last_error
    ((entity, action, detail),) = audit(db, it.request_id)
    assert (entity, action) == ("request", "vetoed")
    assert where in detail and "client owes 40.00" in detail
    assert get(db, Service, it.service_id).status is ServiceStatus.ACTIVE
    assert emails(db) == []


def test_a_veto_exits_1_through_the_cli(db, tmp_path, invoke, probe):
    it = seed(db)
    probe.behaviour["veto"] = {"abortcmd": True, "reason": "on hold"}
    write_hook(tmp_path, "veto.py", recorder("PreModuleTerminate", "veto"))
    # The preview shows the veto, with exit 1; so does the run, and the request stays pending.
    assert "1 vetoed" in ok(invoke("run", "--dry-run"), code=1).stdout
    result = ok(invoke("run"), code=1)
    assert "vetoed" in result.stdout and "on hold" in result.stdout
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.PENDING


def test_a_veto_on_every_attempt_fails_the_request_after_max_attempts(db, settings, now, tmp_path, probe):
    settings.max_attempts, settings.retry_backoff_minutes = 2, 0
    it = seed(db)
    probe.behaviour["veto"] = {"abortcmd": True}
    write_hook(tmp_path, "veto.py", recorder("PreModuleTerminate", "veto"))
    hooks = load(tmp_path)
    assert run(db, settings, now, hooks).vetoed == 1
    last = run(db, settings, now + dt.timedelta(minutes=1), hooks)
    assert (last.vetoed, last.failed) == (1, 1)
    request = get(db, CancellationRequest, it.request_id)
    assert (request.status, request.attempts) == (RequestStatus.FAILED, 2)
    assert "no reason given" in request.last_error
    assert [a[1] for a in audit(db, it.request_id)] == ["vetoed", "failed"]


def test_a_pre_module_terminate_dict_merges_into_params_for_later_hooks(db, settings, now, tmp_path, probe):
    seed(db)
    probe.behaviour["first"] = {"vm_id": "vm-42", "node": "pve3"}
    write_hook(tmp_path, "a.py", recorder("PreModuleTerminate", "first"))
    write_hook(tmp_path, "b.py", recorder("PreModuleTerminate", "second"), recorder("TerminateAccount"),
               """
               @add_hook("TerminateAccount", priority=5)
               def only_params(params):
                   return probe.record("only_params", {"vm_id": params["vm_id"]})
               """)
    run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["first", "second", "TerminateAccount", "only_params"]
    first, second, terminate = probe.one("first"), probe.one("second"), probe.one("TerminateAccount")
    assert "vm_id" not in first.keys
    for call in (second, terminate):
        assert call.keys == keys_of("PreModuleTerminate") | {"vm_id", "node"}
        assert (call.kwargs["vm_id"], call.kwargs["node"]) == ("vm-42", "pve3")
        assert call.kwargs["params"]["vm_id"] == "vm-42"
    assert probe.one("only_params").kwargs == {"vm_id": "vm-42"}


def test_a_hook_receives_only_the_parameters_it_names(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "some.py", """
        @add_hook("PreModuleTerminate")
        def picky(request_id, client, dry_run, unknown_but_optional=7):
            return probe.record("picky", dict(request_id=request_id, client=client, dry_run=dry_run,
                                              unknown_but_optional=unknown_but_optional))
        """)
    run(db, settings, now, load(tmp_path))
    kw = probe.one("picky").kwargs
    assert (kw["request_id"], kw["client"]["email"], kw["dry_run"], kw["unknown_but_optional"]) == (
        it.request_id, it.email, False, 7)


@pytest.mark.parametrize("failure", ["returns error", "returns a WHMCS error string", "raises"])
def test_a_failing_terminate_account_changes_nothing_and_is_retried_then_failed(
        db, settings, now, tmp_path, probe, failure):
    settings.max_attempts, settings.retry_backoff_minutes = 2, 0
    it = seed(db, addons=1, unpaid=1)
    probe.behaviour["TerminateAccount"] = {
        "returns error": {"error": "API said no"},
        "returns a WHMCS error string": "API said no",  # a WHMCS module's answer: anything but "success" fails
        "raises": RuntimeError("API said no\nsecond line"),
    }[failure]
    path = write_hook(tmp_path, "term.py", recorder("TerminateAccount"), recorder("AfterModuleTerminateFailed"),
                      recorder("AfterModuleTerminate"), recorder("ServiceCancelled"))
    hooks = load(tmp_path)
    first = run(db, settings, now, hooks)
    assert probe.labels() == ["TerminateAccount", "AfterModuleTerminateFailed"]
    assert (first.retrying, first.failed, first.completed, first.exit_code) == (1, 0, 0, 1)
    request = get(db, CancellationRequest, it.request_id)
    assert (request.status, request.attempts) == (RequestStatus.PENDING, 1)
    where = f"term.py:{line_of(path, 'TerminateAccount')}"
    assert where in request.last_error and "API said no" in request.last_error
    assert "second line" not in request.last_error
    assert probe.one("AfterModuleTerminateFailed").kwargs["error"] == request.last_error
    with db.read_session() as s:  # nothing changed
        service = s.get(Service, it.service_id)
        assert service.status is ServiceStatus.ACTIVE and service.termination_date is None
        assert {a.status for a in service.addons} == {ServiceStatus.ACTIVE}
        assert s.scalars(select(Invoice.status).where(Invoice.service_id == it.service_id)).all() == [
            InvoiceStatus.UNPAID]
    assert emails(db) == []
    assert [a[1] for a in audit(db, it.request_id)] == ["attempt_failed"]

    probe.calls.clear()
    last = run(db, settings, now + dt.timedelta(minutes=1), hooks)
    assert probe.labels() == ["TerminateAccount", "AfterModuleTerminateFailed"]  # retried
    assert (last.failed, last.retrying, last.exit_code) == (1, 0, 1) and last.failures[0]["gave_up"] is True
    request = get(db, CancellationRequest, it.request_id)
    assert (request.status, request.attempts) == (RequestStatus.FAILED, 2)
    assert [a[1] for a in audit(db, it.request_id)] == ["attempt_failed", "failed"]
    assert get(db, Service, it.service_id).status is ServiceStatus.ACTIVE


@pytest.mark.parametrize("answer", ["success", None, {"status": "terminated"}])
def test_terminate_account_answering_success_cancels(db, settings, now, tmp_path, probe, answer):
    """WHMCS's "success" (or no answer, or a dict without an error) means the account is gone."""
    it = seed(db)
    probe.behaviour["TerminateAccount"] = answer
    write_hook(tmp_path, "term.py", recorder("TerminateAccount"))
    summary = run(db, settings, now, load(tmp_path))
    assert (summary.completed, summary.retrying, summary.exit_code) == (1, 0, 0)
    assert get(db, Service, it.service_id).status is ServiceStatus.CANCELLED


@pytest.mark.parametrize("point", ["PreModuleTerminate", "EmailPreSend"])
def test_an_exception_in_a_hook_that_can_fail_the_request_fails_the_attempt(db, settings, now, tmp_path, probe, point):
    it = seed(db)
    probe.behaviour["boom"] = ValueError("cannot reach the CRM")
    path = write_hook(tmp_path, "boom.py", recorder(point, "boom"), recorder("TerminateAccount"),
                      recorder("AfterModuleTerminateFailed"))
    summary = run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["boom", "AfterModuleTerminateFailed"]  # TerminateAccount not called
    assert (summary.retrying, summary.completed) == (1, 0)
    request = get(db, CancellationRequest, it.request_id)
    assert request.status is RequestStatus.PENDING
    assert f"boom.py:{line_of(path, point)}" in request.last_error
    assert "ValueError: cannot reach the CRM" in request.last_error
    assert probe.one("AfterModuleTerminateFailed").kwargs["error"] == request.last_error
    assert get(db, Service, it.service_id).status is ServiceStatus.ACTIVE


@pytest.mark.parametrize("point", ["PreCronJob", "AfterModuleTerminate", "AddonCancelled", "InvoiceCancelled",
                                   "ServiceCancelled", "AfterCronJob", "DailyCronJobPreEmail"])
def test_an_exception_in_an_after_the_fact_hook_is_logged_and_undoes_nothing(
        db, settings, now, tmp_path, probe, point):
    it = seed(db, addons=1, unpaid=1)
    probe.behaviour["boom"] = RuntimeError("notifier down")
    path = write_hook(tmp_path, "boom.py", recorder(point, "boom"), recorder(point, "later", priority=10),
                      *(recorder(p) for p in ("AfterModuleTerminate", "AddonCancelled", "InvoiceCancelled",
                                              "ServiceCancelled", "AfterCronJob") if p != point))
    with structlog.testing.capture_logs() as logs:
        summary = run(db, settings, now, load(tmp_path))
    assert "later" in probe.labels()  # later hooks of the same point are still called
    assert {"AfterModuleTerminate", "AddonCancelled", "InvoiceCancelled", "ServiceCancelled",
            "AfterCronJob"} - {point} <= set(probe.labels())  # and the other points
    assert (summary.completed, summary.exit_code) == (1, 0)
    request = get(db, CancellationRequest, it.request_id)
    assert (request.status, request.last_error) == (RequestStatus.COMPLETED, None)
    assert get(db, Service, it.service_id).status is ServiceStatus.CANCELLED
    assert len(emails(db)) == 1
    failures = [e for e in logs if e["event"] == "hook failed"]
    assert len(failures) == 1, logs
    assert failures[0]["point"] == point and failures[0]["log_level"] == "error"
    assert f"boom.py:{line_of(path, point)}" in failures[0]["hook"]
    assert failures[0]["error"] == "RuntimeError: notifier down"


def test_terminate_account_runs_again_after_a_crash_before_the_commit(db, settings, now, tmp_path, probe):
    """At least once: the process dies after the external call, before the write; the next
    run calls TerminateAccount again with the same idempotency_key."""
    it = seed(db)
    probe.behaviour["TerminateAccount"] = KeyboardInterrupt()  # after recording: the "API call" was made
    write_hook(tmp_path, "term.py", recorder("TerminateAccount"))
    hooks = load(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(db, settings, now, hooks)
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.PENDING
    probe.behaviour.clear()
    assert run(db, settings, now + dt.timedelta(minutes=1), hooks).completed == 1
    keys = [c.kwargs["idempotency_key"] for c in probe.of("TerminateAccount")]
    assert keys == [str(it.request_id)] * 2


def test_add_on_hooks_fire_once_each_when_the_chunk_is_rewritten_row_by_row(db, settings, now, tmp_path, probe):
    """When the chunk's set-based write fails on one row and is rewritten row by row, the
    add-ons and invoices of the other rows are announced once each (Runner._attach_for_hooks
    runs again for every row), and none for the row that failed."""
    with db.session.begin() as s:
        ids = [factories.request(s, factories.service(s, addons=1, unpaid=1)).id for _ in range(3)]
        # An email already queued under the key the run will use for ids[1]: the chunk write fails on it.
        s.execute(insert(OutboxEmail).values(
            key=f"service_cancellation_confirmation:request:{ids[1]}", template="x", to_address="a@b.c",
            from_address="a@b.c", subject="s", text_body="t", html_body="h", status="queued", attempts=0,
            created_at=now))
    write_hook(tmp_path, "addon.py", recorder("AddonCancelled"), recorder("InvoiceCancelled"))
    summary = run(db, settings, now, load(tmp_path))
    assert (summary.completed, summary.retrying) == (2, 1)
    fired = sorted((c.label, c.kwargs["request_id"]) for c in probe.calls)
    expected = sorted((p, r) for p in ("AddonCancelled", "InvoiceCancelled") for r in (ids[0], ids[2]))
    assert fired == expected, f"fired {fired}: once per cancelled add-on and invoice expected"



def test_slow_hooks_do_not_let_the_lease_expire_while_each_chunk_is_within_lease_seconds(db, settings, tmp_path, probe):
    """The lease is renewed from the time each chunk ends, so the time its hooks take counts:
    a run whose chunks each take less than lease_seconds keeps its lease however many chunks
    there are, even when two consecutive chunks together take longer. If the lease expired
    mid-run, another run could take it over, and this one would stop with LeaseLost after
    TerminateAccount had already been called for its whole chunk."""
    settings.lease_seconds, settings.chunk_size = 10, 1
    for _ in range(3):
        seed(db, type_=RequestType.IMMEDIATE)
    clock = [dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)]
    expired: list[str] = []

    def slow_terminate(kwargs: dict[str, Any]) -> None:
        clock[0] += dt.timedelta(seconds=6)  # each deprovisioning takes 6 s, under lease_seconds
        with db.read_session() as s:
            expires_at = s.scalars(select(Lease.expires_at)).one()
        if expires_at <= clock[0]:
            expired.append(f"request {kwargs['request_id']}: lease expired at {expires_at:%H:%M:%S}, "
                           f"now {clock[0]:%H:%M:%S}")

    probe.behaviour["TerminateAccount"] = slow_terminate
    write_hook(tmp_path, "slow.py", recorder("TerminateAccount"))
    summary = Runner(db, settings, clock=lambda: clock[0], hooks=load(tmp_path)).run(RunOptions(as_of=D))
    assert summary.completed == 3
    assert expired == [], ("the lease expired while the run was working, though each chunk took less than "
                           f"lease_seconds: {expired}")

# --- load-time behaviour that docs/hooks.md promises ------------------------------------------

def test_files_are_loaded_in_name_order_skipping_underscore_files(db, settings, now, tmp_path, probe):
    seed(db)
    write_hook(tmp_path, "b.py", recorder("PreModuleTerminate", "b"))
    write_hook(tmp_path, "a.py", recorder("PreModuleTerminate", "a-second"),
               recorder("PreModuleTerminate", "a-first", priority=-1), recorder("PreModuleTerminate", "a-third"))
    write_hook(tmp_path, "_off.py", recorder("PreModuleTerminate", "never"))
    run(db, settings, now, load(tmp_path))
    assert probe.labels() == ["a-first", "a-second", "a-third", "b"]


@pytest.mark.parametrize("source, message", [
    ('\n@add_hook("PreModuleTerminat")\ndef f(**kw): pass\n', "unknown hook point 'PreModuleTerminat'"),
    ('\n@add_hook("AfterCronJob")\ndef f(request_id): pass\n',
     "asks for 'request_id', which AfterCronJob does not give"),
    ('\n@add_hook("AfterCronJob", priority="high")\ndef f(**kw): pass\n',
     "priority of AfterCronJob hook must be an integer"),
    ('\nraise RuntimeError("no config")\n', "hook file failed to load: RuntimeError: no config"),
])
def test_a_bad_hook_file_stops_the_command_naming_file_and_line(db, tmp_path, invoke, source, message):
    it = seed(db)
    path = write_hook(tmp_path, "bad.py", source)
    with pytest.raises(HookLoadError if "failed to load" in message else HookDefinitionError) as info:
        load(tmp_path)
    assert f"bad.py:{len(HEADER.splitlines()) + 2}" in str(info.value) and message in str(info.value)
    result = ok(invoke("run"), code=2)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(path) in line and message in line
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.PENDING  # nothing touched
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 0


def test_hooks_list_shows_every_hook_in_run_order(tmp_path, invoke):
    write_hook(tmp_path, "x.py", recorder("ServiceCancelled", "s"), recorder("PreModuleTerminate", "p", priority=3),
               """
               @add_hook("TerminateAccount")
               def named(request_id, idempotency_key):
                   pass
               """)
    rows = json.loads(ok(invoke("hooks", "list", "--json")).stdout)
    assert [(r["point"], r["priority"], r["function"], r["arguments"]) for r in rows] == [
        ("PreModuleTerminate", 3, "on_p", "**kwargs"), ("TerminateAccount", 0, "named", "request_id, idempotency_key"),
        ("ServiceCancelled", 0, "on_s", "**kwargs")]
    assert all(r["file"].startswith("x.py:") for r in rows)


# --- the example hook files in hooks/ ------------------------------------------------------

def install_example(tmp_path: Path, name: str) -> HookRegistry:
    """Copy hooks/_example_NAME.py to a hooks dir as NAME.py (enabled) and load it."""
    folder = tmp_path / "hooks"
    folder.mkdir(exist_ok=True)
    shutil.copy(EXAMPLES / f"_example_{name}.py", folder / f"{name}.py")
    return load(tmp_path)


def test_examples_are_skipped_where_they_ship():
    assert sorted(p.name for p in EXAMPLES.glob("_example_*.py")) == [
        "_example_cancel_subscription.py", "_example_notify.py", "_example_terminate_http.py",
        "_example_veto_balance.py"]
    assert load_hooks(EXAMPLES, entry_points=False).impls() == []


def test_example_veto_balance(db, settings, now, tmp_path):
    hooks = install_example(tmp_path, "veto_balance")
    assert [(i.point, i.priority, i.source) for i in hooks.impls()] == [("PreModuleTerminate", 10, "veto_balance.py")]
    owes = seed(db, balance=Decimal("40.00"))
    clear = seed(db, balance=Decimal("0.00"))
    rows = {r["request_id"]: r for r in preview(db, settings, now, hooks)}  # shows in the dry run
    assert (rows[owes.request_id]["action"], rows[clear.request_id]["action"]) == ("vetoed", "cancel")
    summary = run(db, settings, now, hooks)
    assert (summary.vetoed, summary.completed, summary.exit_code) == (1, 1, 1)
    request = get(db, CancellationRequest, owes.request_id)
    assert request.status is RequestStatus.PENDING
    assert "outstanding balance of 40.00" in request.last_error and "veto_balance.py:" in request.last_error
    assert get(db, Service, owes.service_id).status is ServiceStatus.ACTIVE
    assert get(db, Service, clear.service_id).status is ServiceStatus.CANCELLED


def test_example_notify(db, settings, now, tmp_path, monkeypatch):
    out = tmp_path / "out" / "cancellations.jsonl"
    out.parent.mkdir()
    monkeypatch.setenv("CANCELLATIONS_JSONL", str(out))
    hooks = install_example(tmp_path, "notify")
    assert [(i.point, i.source) for i in hooks.impls()] == [("ServiceCancelled", "notify.py")]
    it = seed(db, next_due_date=D - dt.timedelta(days=2))
    summary = run(db, settings, now, hooks)
    (line,) = out.read_text().splitlines()
    assert json.loads(line) == {
        "event": "service_cancelled", "run_id": summary.run_id, "as_of": "2026-11-26", "request_id": it.request_id,
        "reason_code": "too_expensive", "service_id": it.service_id, "service_external_id": None,
        "domain": it.domain, "product": "VPS 4GB", "client_email": it.email, "days_late": 2}
    # A notifier that fails (here: the folder is gone) is logged; the cancellation stands.
    shutil.rmtree(out.parent)
    other = seed(db)
    with structlog.testing.capture_logs() as logs:
        assert run(db, settings, now, hooks).completed == 1
    assert get(db, Service, other.service_id).status is ServiceStatus.CANCELLED
    assert [e["point"] for e in logs if e["event"] == "hook failed"] == ["ServiceCancelled"]


def test_example_terminate_http_loads_and_sends_an_idempotency_key(db, settings, now, tmp_path, monkeypatch):
    """Only loaded and called with urlopen replaced: this test never touches a network."""
    hooks = install_example(tmp_path, "terminate_http")
    (impl,) = hooks.impls()
    assert (impl.point, impl.source, impl.wants) == (
        "TerminateAccount", "terminate_http.py", ("idempotency_key", "service", "client", "product"))
    sent: list[urllib.request.Request] = []

    class Response:
        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read(self) -> bytes:
            return b"{}"

    def fake_urlopen(request: urllib.request.Request, timeout: float) -> Response:
        sent.append(request)
        return Response()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    service = {"id": 7, "external_id": "S-7", "domain": "h.example.test"}
    args = {"idempotency_key": "42", "service": service, "client": {"id": 3}, "product": {"module": "proxmox"}}
    monkeypatch.delenv("TERMINATE_API_URL", raising=False)
    assert "TERMINATE_API_URL is not set" in impl.fn(**args)["error"]
    assert impl.fn(**{**args, "product": {"module": None}}) is None  # nothing provisioned: nothing to do
    monkeypatch.setenv("TERMINATE_API_URL", "http://api.invalid/terminate")
    assert impl.fn(**args) is None
    (request,) = sent
    assert (request.full_url, request.get_method(), request.get_header("Idempotency-key")) == (
        "http://api.invalid/terminate", "POST", "cancelproc-terminate-42")
    assert json.loads(request.data)["service_external_id"] == "S-7"


class _StripeStub(http.server.BaseHTTPRequestHandler):
    """Stripe's DELETE /v1/subscriptions/{id}, on localhost: records each request; sub_gone
    is unknown (404), sub_declined is refused (402), any other id is canceled."""

    seen: list[tuple[str, str, str | None, str | None]] = []

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.command, self.path, self.headers.get("Authorization"),
                          self.headers.get("Idempotency-Key")))
        sub = self.path.rsplit("/", 1)[-1]
        code, body = {"sub_gone": (404, {"error": {"message": "No such subscription: 'sub_gone'"}}),
                      "sub_declined": (402, {"error": {"message": "Your card was declined."}})}.get(
            sub, (200, {"id": sub, "object": "subscription", "status": "canceled"}))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def stripe_stub() -> Iterator[str]:
    """A local HTTP server answering as Stripe does; its base URL."""
    _StripeStub.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StripeStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_example_cancel_subscription_against_a_local_stripe(db, settings, now, tmp_path, monkeypatch, stripe_stub):
    hooks = install_example(tmp_path, "cancel_subscription")
    assert [(i.point, i.source) for i in hooks.impls()] == [("CancelSubscription", "cancel_subscription.py")]
    monkeypatch.setenv("STRIPE_API_BASE", stripe_stub)
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_123")
    ok_, gone, declined, paypal = (seed(db, subscription_id=s, type_=RequestType.IMMEDIATE)
                                   for s in ("sub_ok", "sub_gone", "sub_declined", "I-PAYPAL1"))
    summary = run(db, settings, now, hooks)
    assert (summary.completed, summary.retrying) == (3, 1)
    assert sorted(_StripeStub.seen) == sorted(
        ("DELETE", f"/v1/subscriptions/{sub}", "Bearer sk_test_123", f"cancelproc:cancel-subscription:request:{r}")
        for sub, r in (("sub_ok", ok_.request_id), ("sub_gone", gone.request_id),
                       ("sub_declined", declined.request_id)))  # the PayPal id is not Stripe's: not sent
    assert get(db, Service, paypal.service_id).status is ServiceStatus.CANCELLED
    error = get(db, CancellationRequest, declined.request_id).last_error
    assert "Stripe answered HTTP 402 for sub_declined: Your card was declined." in error
    monkeypatch.delenv("STRIPE_API_KEY")
    assert "STRIPE_API_KEY is not set" in hooks.impls()[0].fn(
        subscription_id="sub_x", idempotency_key="k", service={"id": 1})["error"]


# --- meta-tests: every point is tested and documented ----------------------------------------

def test_every_hook_point_has_a_test():
    tested = {name[len("test_hook_"):].split("_")[0] for name in globals() if name.startswith("test_hook_")}
    missing = [p for p in POINTS if p not in tested]
    assert not missing, f"hook points without a test_hook_<Point> test in {__file__}: {missing}"


def doc_sections() -> dict[str, str]:
    text = DOCS.read_text()
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_hook_point_and_parameter_is_documented():
    sections = doc_sections()
    problems = []
    for name, point in POINTS.items():
        if name not in sections:
            problems.append(f"no '## {name}' section")
            continue
        problems += [f"{name}: parameter `{p}` not mentioned" for p in point.params if f"`{p}`" not in sections[name]]
    assert not problems, f"{DOCS}: " + "; ".join(problems)


def test_no_documented_hook_point_is_unknown():
    point_like = [h for h in doc_sections() if re.fullmatch(r"[A-Z][a-z]+(?:[A-Z][a-z]*)+", h)]
    assert [h for h in point_like if h not in POINTS] == []
    assert point_like == list(POINTS), "docs/hooks.md should describe the points in points.py order"
