"""Hook files ported from WHMCS: WHMCS's parameter names at each point, PreModuleTerminate
overrides under WHMCS's names, `add_hook` in WHMCS's positional form, and the ported hook
file of docs/hooks.md working end to end.

The hooks are real files loaded with `load_hooks`, recording through test_hook_points' probe.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from freezegun import freeze_time
from sqlalchemy import select, update

from processor.cli import cli
from processor.db import Database
from processor.hooks import MODULE_PARAMS, HookDefinitionError, HookImpl, HookRegistry, load_hooks
from processor.models import CancellationRequest, Invoice, OutboxEmail, Product, RequestStatus, ServiceAddon
from processor.params import ModuleParams
from tests.test_hook_points import DOCS, PROBE, Probe, get, load, ok, recorder, run, seed, write_hook


@pytest.fixture(autouse=True)
def probe(db: Database) -> Iterator[Probe]:
    """test_hook_points' probe (its hook files' HEADER reaches it), fresh for each test."""
    PROBE.db, PROBE.calls, PROBE.behaviour = db, [], {}
    try:
        yield PROBE
    finally:
        PROBE.db, PROBE.calls, PROBE.behaviour = None, [], {}


@pytest.fixture
def invoke(settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """`cancelproc ARGS` in-process, on this test's database and hooks dir, at a frozen time."""
    monkeypatch.chdir(tmp_path)
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=settings.database_url, CANCELPROC_HOOKS_DIR=str(tmp_path / "hooks"),
               CANCELPROC_LOG_FORMAT="console")

    def _invoke(*args: Any) -> Result:
        with freeze_time(dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)):
            return CliRunner().invoke(cli, [str(a) for a in args], env=env)

    return _invoke


def whmcs_recorder(point: str, label: str, *, priority: int = 0) -> str:
    """A hook as WHMCS writes them, `function($vars)`, recording a plain copy of what it read."""
    name = "on_" + re.sub(r"\W", "_", label)
    return (f"\ndef {name}(vars):\n"
            f"    seen = dict(vars)\n"
            f"    if isinstance(vars.get('params'), ModuleParams):\n"
            f"        seen['params'] = dict(vars['params'])\n"
            f"    return probe.record({label!r}, seen)\n"
            f"add_hook({point!r}, {priority}, {name})\n")


IMPORTS = "from processor.params import ModuleParams\n"


def module_params_of(it: Any, db: Any) -> dict[str, Any]:
    with db.read_session() as s:
        request = s.get(CancellationRequest, it.request_id)
        service = request.service
        client, product = service.client, service.product
        return {
            "serviceid": service.id, "accountid": service.id, "userid": client.id, "pid": product.id,
            "packageid": product.id, "domain": service.domain, "username": "", "producttype": "other",
            "moduletype": "proxmox",
            "clientsdetails": {"userid": client.id, "id": client.id, "client_id": client.id, "firstname": "Ada",
                               "lastname": client.last_name, "fullname": f"Ada {client.last_name}",
                               "companyname": "", "email": client.email, "language": "en"}}


def test_module_points_give_whmcs_module_parameters(db, settings, now, tmp_path, probe):
    it = seed(db)
    points = ("PreModuleTerminate", "TerminateAccount", "AfterModuleTerminate")
    write_hook(tmp_path, "module.py", IMPORTS, *(whmcs_recorder(p, p) for p in points))
    run(db, settings, now, load(tmp_path))
    expected = module_params_of(it, db)
    assert set(expected) == set(MODULE_PARAMS)
    for point in points:
        assert probe.one(point).kwargs["params"] == expected, point


def test_pre_module_terminate_overrides_module_parameters_by_whmcs_names(db, settings, now, tmp_path, probe):
    it = seed(db)
    probe.behaviour["first"] = lambda kw: {"username": "u123"}  # flat, as our merges
    probe.behaviour["second"] = lambda kw: {"params": {"domain": "renamed.example.test"}}  # WHMCS's shape
    write_hook(tmp_path, "module.py", IMPORTS, whmcs_recorder("PreModuleTerminate", "first", priority=1),
               whmcs_recorder("PreModuleTerminate", "second", priority=2),
               whmcs_recorder("TerminateAccount", "TerminateAccount"),
               whmcs_recorder("AfterModuleTerminate", "AfterModuleTerminate"))
    run(db, settings, now, load(tmp_path))
    assert probe.one("second").kwargs["params"]["username"] == "u123"  # the hook after it sees the new value
    for point in ("TerminateAccount", "AfterModuleTerminate"):
        module = probe.one(point).kwargs["params"]
        assert (module["username"], module["domain"], module["serviceid"]) == (
            "u123", "renamed.example.test", it.service_id), point
    assert probe.one("TerminateAccount").kwargs["username"] == "u123"  # merged as before, too
    assert get(db, CancellationRequest, it.request_id).status is RequestStatus.COMPLETED


def test_after_module_terminate_failed_gives_the_failure_response_message(db, settings, now, tmp_path, probe):
    failing = seed(db)
    raising = seed(db)
    probe.behaviour["TerminateAccount"] = lambda kw: (
        "Connection to server timed out" if kw["request_id"] == failing.request_id else 1 / 0)
    write_hook(tmp_path, "module.py", IMPORTS, recorder("TerminateAccount"),
               whmcs_recorder("AfterModuleTerminateFailed", "failed"))
    run(db, settings, now, load(tmp_path))
    by_request = {c.kwargs["request_id"]: c.kwargs for c in probe.of("failed")}
    assert by_request[failing.request_id]["failureResponseMessage"] == "Connection to server timed out"
    assert by_request[failing.request_id]["error"].endswith("returned error: Connection to server timed out")
    assert by_request[raising.request_id]["failureResponseMessage"] == "ZeroDivisionError: division by zero"
    assert by_request[failing.request_id]["params"]["serviceid"] == failing.service_id


def test_email_pre_send_gives_messagename_relid_mergefields(db, settings, now, tmp_path, probe):
    it = seed(db)
    probe.behaviour["EmailPreSend"] = lambda kw: {"company_name": "Renamed Hosting"}
    write_hook(tmp_path, "email.py", "\n@add_hook('EmailPreSend', 1)\n"
               "def on_email(messagename, relid, mergefields, fields):\n"
               "    assert mergefields is fields\n"
               "    return probe.record('EmailPreSend', dict(messagename=messagename, relid=relid,\n"
               "                        company=mergefields['company_name']))\n")
    run(db, settings, now, load(tmp_path))
    call = probe.one("EmailPreSend")
    assert call.kwargs == {"messagename": "Service Cancellation Confirmation", "relid": it.service_id,
                           "company": settings.email.company_name}
    with db.read_session() as s:
        (email,) = s.scalars(select(OutboxEmail))
    assert "Renamed Hosting" in email.text_body  # the answer merged into the fields


def test_addon_and_invoice_cancelled_give_whmcs_names(db, settings, now, tmp_path, probe):
    it = seed(db, addons=1, unpaid=1)
    write_hook(tmp_path, "after.py", "\n@add_hook('AddonCancelled', 1)\n"
               "def addon(id, userid, serviceid, addonid):\n"
               "    probe.record('AddonCancelled', dict(id=id, userid=userid, serviceid=serviceid, addonid=addonid))\n"
               "\n@add_hook('InvoiceCancelled', 1)\n"
               "def invoice(vars):\n"
               "    probe.record('InvoiceCancelled', dict(invoiceid=vars['invoiceid']))\n")
    run(db, settings, now, load(tmp_path))
    with db.read_session() as s:
        addon_id = s.scalar(select(ServiceAddon.id).where(ServiceAddon.service_id == it.service_id))
        invoice_id = s.scalar(select(Invoice.id).where(Invoice.service_id == it.service_id))
    assert probe.one("AddonCancelled").kwargs == {"id": addon_id, "userid": it.client_id,
                                                  "serviceid": it.service_id, "addonid": None}
    assert probe.one("InvoiceCancelled").kwargs == {"invoiceid": invoice_id}


def test_cancellation_request_gives_whmcs_names(db, tmp_path, invoke, probe):
    it = seed(db)  # its service gets a second, Immediate request: withdraw the first
    with db.session.begin() as s:
        s.execute(update(CancellationRequest).where(CancellationRequest.id == it.request_id)
                  .values(status=RequestStatus.WITHDRAWN))
    write_hook(tmp_path, "created.py", "\n@add_hook('CancellationRequest', 1)\n"
               "def created(userid, relid, reason, type):\n"
               "    probe.record('CancellationRequest', dict(userid=userid, relid=relid, reason=reason, type=type))\n")
    ok(invoke("requests", "create", it.service_id, "--type", "immediate", "--reason-code", "other",
              "--reason", "Moving to a bigger plan"))
    assert probe.one("CancellationRequest").kwargs == {"userid": it.client_id, "relid": it.service_id,
                                                       "reason": "Moving to a bigger plan", "type": "Immediate"}


def test_add_hook_in_whmcs_positional_form_runs_by_priority_beside_the_decorator(db, settings, now, tmp_path,
                                                                                   probe):
    seed(db)
    write_hook(tmp_path, "a.py",
               "\n@add_hook('PreModuleTerminate', priority=5)\ndef decorated(vars):\n    probe.record('a5', {})\n"
               "\ndef first(vars):\n    probe.record('a1', {})\nadd_hook('PreModuleTerminate', 1, first)\n"
               "\nadd_hook('PreModuleTerminate', 10, lambda vars: probe.record('a10', {}))\n")
    write_hook(tmp_path, "b.py",
               "\ndef b1(params):\n    probe.record('b1', {})\nadd_hook('PreModuleTerminate', 1, b1)\n")
    hooks = load(tmp_path)
    assert [(i.priority, i.source) for i in hooks.impls("PreModuleTerminate")] == [
        (1, "a.py"), (1, "b.py"), (5, "a.py"), (10, "a.py")]
    run(db, settings, now, hooks)
    # As WHMCS: lower priority first; equal ones by file name, then as registered.
    assert probe.labels() == ["a1", "b1", "a5", "a10"]


def test_module_parameters_are_built_only_when_read():
    class Row:  # what ModuleParams reads of a request row; counting the reads
        reads = 0

        def __getattr__(self, name: str) -> Any:
            Row.reads += 1
            return {"module": "proxmox"}.get(name, 1)

    view = ModuleParams(Row())
    assert Row.reads == 0
    assert view["serviceid"] == 1 and Row.reads > 0
    reads = Row.reads
    assert view["domain"] == 1 and Row.reads == reads  # built once


# --- the ported WHMCS hook file of docs/hooks.md, end to end --------------------------------

def ported_hook_file() -> str:
    """The Python block after the `ported-hook-file` marker in docs/hooks.md."""
    text = DOCS.read_text()
    match = re.search(r"<!-- ported-hook-file -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, f"{DOCS}: no ported hook file"
    return match.group(1)


def test_the_ported_whmcs_hook_file_of_the_docs_works_in_a_run(db, tmp_path, invoke, probe, monkeypatch):
    held = seed(db)
    failing = seed(db)
    with db.session.begin() as s:
        product_id = s.get(CancellationRequest, held.request_id).service.product_id
        s.execute(update(Product).where(Product.id == product_id).values(module="dedicated"))
    fresh = seed(db)  # gets an Immediate request through `requests create`
    with db.session.begin() as s:
        s.execute(update(CancellationRequest).where(CancellationRequest.id == fresh.request_id)
                  .values(status=RequestStatus.WITHDRAWN))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "hold_dedicated.py").write_text(ported_hook_file())
    probe.behaviour["TerminateAccount"] = lambda kw: (
        "Connection to server timed out" if kw["request_id"] == failing.request_id else "success")
    write_hook(tmp_path, "terminate.py", recorder("TerminateAccount"))
    activity = tmp_path / "activity.log"
    monkeypatch.setenv("ACTIVITY_LOG", str(activity))

    ok(invoke("requests", "create", fresh.service_id, "--type", "immediate", "--reason-code", "other",
              "--reason", "Moving to a bigger plan"))
    ok(invoke("run"), code=1)  # a vetoed and a failed request: exit 1

    assert activity.read_text().splitlines() == [
        f"client {fresh.client_id} asked to cancel service {fresh.service_id} now: Moving to a bigger plan",
        f"held termination of service {held.service_id} ({held.domain})",
        f"termination of {failing.domain} failed: Connection to server timed out",
        "daily cron done",
    ]
    held_request = get(db, CancellationRequest, held.request_id)
    assert held_request.status is RequestStatus.PENDING
    assert "dedicated: terminate by hand" in held_request.last_error
    assert get(db, CancellationRequest, failing.request_id).status is RequestStatus.PENDING
    with db.read_session() as s:
        created = s.scalars(select(CancellationRequest).where(CancellationRequest.service_id == fresh.service_id,
                                                              CancellationRequest.status == RequestStatus.COMPLETED))
        assert len(list(created)) == 1  # the Immediate request went through


def test_the_ported_hook_file_loads_on_its_own(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "hold_dedicated.py").write_text(ported_hook_file())
    registry = load_hooks(hooks, entry_points=False)
    assert [(i.point, i.priority) for i in registry.impls()] == [
        ("CancellationRequest", 1), ("PreModuleTerminate", 1), ("AfterModuleTerminateFailed", 1),
        ("DailyCronJob", 1)]



def test_vars_beside_named_parameters_and_whmcs_names_checked_at_load(db, settings, now, tmp_path, probe):
    it = seed(db)
    write_hook(tmp_path, "both.py", "\n@add_hook('ServiceCancelled', 1)\n"
               "def both(vars, service, days_late):\n"
               "    probe.record('both', dict(same=vars['service'] is service, days_late=days_late,\n"
               "                              serviceid=vars['params']['serviceid']))\n")
    run(db, settings, now, load(tmp_path))
    assert probe.one("both").kwargs == {"same": True, "days_late": 0, "serviceid": it.service_id}
    # A WHMCS name its point does not give is refused when the file loads, as any other name.
    path = write_hook(tmp_path, "wrong.py", "\n@add_hook('AfterModuleTerminate', 1)\n"
                      "def wrong(failureResponseMessage):\n    pass\n")
    with pytest.raises(HookDefinitionError, match=r"asks for 'failureResponseMessage', which AfterModuleTerminate"):
        load(tmp_path)
    path.unlink()


def test_overrides_reach_a_plain_module_params_dict_too():
    """`HookRegistry.apply` as tools and tests call it, with a plain dict for WHMCS's params."""
    registry = HookRegistry()
    registry.register(HookImpl("PreModuleTerminate", lambda params: {"username": "u1", "vm": 7}, 0, "t.py", 1, 0,
                               ("params",)))
    params: dict[str, Any] = {"params": {"username": "", "domain": "d.example.test"}}
    assert registry.apply("PreModuleTerminate", params).vetoed is None
    assert params == {"params": {"username": "u1", "domain": "d.example.test"}, "username": "u1", "vm": 7}
