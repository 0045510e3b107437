"""Add-on cancellation requests (issue 14 item 5): a request for one add-on of a service,
cancelled alone at its own date while the service stays; one open request per add-on;
a service request still cascades to its add-ons and closes their open requests."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from sqlalchemy import select

from processor.hooks import HookImpl, HookRegistry
from processor.hooks.registry import check_signature
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Invoice,
    InvoiceStatus,
    OutboxEmail,
    RequestStatus,
    RequestType,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.reports import closed_requests
from processor.run import Runner, RunOptions
from tests import factories
from tests.cli_helpers import as_json, ok, one_line_error

D = dt.date(2026, 11, 26)
ADDON_DUE = dt.date(2026, 11, 24)  # the factories' add-on due date: before D
SERVICE_DUE = dt.date(2026, 12, 20)  # the service's, after D


def seed(db, *, addons: int = 2, language: str = "en", addon_due: dt.date | None = ADDON_DUE):
    """A service due after D with add-ons due before it, an unpaid invoice; ids."""
    with db.session.begin() as s:
        svc = factories.service(s, next_due_date=SERVICE_DUE, addons=addons, addon_due=addon_due, unpaid=1,
                                language=language)
        return svc.id, [a.id for a in sorted(svc.addons, key=lambda a: a.id)]


def run(db, settings, now, hooks: HookRegistry | None = None, as_of: dt.date = D):
    return Runner(db, settings, clock=lambda: now, hooks=hooks).run(RunOptions(as_of=as_of))


def audit(db, request_id: int) -> list[tuple[str, str, str]]:
    with db.read_session() as s:
        return [(a.entity.value, a.action.value, a.detail) for a in s.scalars(
            select(AuditEntry).where(AuditEntry.request_id == request_id).order_by(AuditEntry.id))]


def create(invoke, *args):
    return invoke("requests", "create", *args, "--reason-code", "too_expensive", "--json")


# --- creating ------------------------------------------------------------------------------

def test_create_an_addon_request_and_see_it(db, invoke):
    """`requests create SERVICE --addon ADDON`: the request names the add-on, takes effect at
    the add-on's own next due date (stored), and list/show (and their JSON) say so."""
    today = dt.datetime.now(dt.UTC).date()  # the CLI's: the business time zone is UTC here
    addon_due, service_due = today + dt.timedelta(days=5), today + dt.timedelta(days=20)
    service_id, (addon_id, _) = seed(db, addon_due=addon_due)
    with db.session.begin() as s:
        s.get(Service, service_id).next_due_date = service_due
    created = as_json(create(invoke, service_id, "--addon", addon_id))
    assert (created["service_id"], created["addon_id"], created["status"]) == (service_id, addon_id, "pending")
    assert created["effective_date"] == addon_due.isoformat()
    shown = as_json(invoke("requests", "show", created["id"], "--json"))
    assert shown["addon"] == {"id": addon_id, "external_id": None, "name": "Backup 0", "status": "Active",
                              "next_due_date": addon_due.isoformat()}
    assert shown["due_on"] == addon_due.isoformat()  # the add-on's date, not the service's
    assert shown["audit"][0]["detail"] == (f"End of Billing Period; add-on {addon_id}; reason too_expensive; "
                                           f"takes effect {addon_due}")
    listed = as_json(invoke("requests", "list", "--json"))["rows"]
    assert [(r["id"], r["addon_id"], r["addon"], r["due_on"]) for r in listed] == [
        (created["id"], addon_id, "Backup 0", addon_due.isoformat())]
    with db.read_session() as s:  # the client's confirmation and the staff notice name the add-on
        emails = {e.template: e for e in s.scalars(select(OutboxEmail))}
    confirmation = emails["cancellation_request_confirmation"].text_body
    assert "This concerns the add-on Backup 0 only: the service itself continues." in confirmation
    assert f"will be cancelled on {addon_due:%B} {addon_due.day}, {addon_due.year}" in confirmation  # the add-on's
    assert "Add-on:    Backup 0 alone (the service stays)" in emails["new_cancellation_request"].text_body
    text = ok(invoke("requests", "show", created["id"])).stdout
    assert f"add-on      {addon_id} Backup 0 (Active, next due {addon_due})" in text
    before = as_json(invoke("requests", "list", "--due-before", service_due.isoformat(), "--json"))["rows"]
    assert [r["id"] for r in before] == [created["id"]]


def test_an_addon_request_takes_no_product_terms(db, invoke, tmp_path):
    """The product's notice period and minimum term are the service's: an add-on request
    takes effect at the add-on's next due date all the same; a service request beside it
    gets them."""
    today = dt.datetime.now(dt.UTC).date()
    addon_due, service_due = today + dt.timedelta(days=3), today + dt.timedelta(days=4)
    service_id, (addon_id, _) = seed(db, addon_due=addon_due)
    with db.session.begin() as s:
        s.get(Service, service_id).next_due_date = service_due
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "processor.toml").write_text('[products."VPS 4GB"]\nnotice_days = 30\n')
    env = {"CANCELPROC_CONFIG": str(tmp_path / "config" / "processor.toml")}
    addon_request = as_json(ok(invoke("requests", "create", service_id, "--addon", addon_id, "--reason-code",
                                      "too_expensive", "--json", env=env)))
    service_request = as_json(ok(invoke("requests", "create", service_id, "--reason-code", "too_expensive",
                                        "--json", env=env)))
    assert addon_request["effective_date"] == addon_due.isoformat()
    assert service_request["effective_date"] > service_due.isoformat()  # the notice period moved it on


def test_an_addon_by_its_external_id(db, invoke):
    with db.session.begin() as s:
        svc = factories.service(s, addons=1)
        svc.addons[0].external_id = "AD-7"
        service_id, addon_id = svc.id, svc.addons[0].id
    created = as_json(create(invoke, service_id, "--addon", "ext:AD-7"))
    assert created["addon_id"] == addon_id
    one_line_error(invoke("requests", "create", service_id, "--addon", "ext:AD-8", "--reason-code", "other"),
                   "--addon", "no add-on has the external id 'AD-8'")


def test_what_an_addon_request_is_refused_for(db, invoke):
    """Each refusal is one line, exit 2, and nothing is written."""
    service_id, (first, second) = seed(db)
    other_service, (foreign,) = seed(db, addons=1)
    one_line_error(create(invoke, service_id, "--addon", foreign),
                   f"--addon: add-on {foreign} belongs to service {other_service}, not {service_id}")
    one_line_error(create(invoke, service_id, "--addon", 999999), "add-on 999999 not found")
    with db.session.begin() as s:
        s.get(ServiceAddon, second).status = ServiceStatus.CANCELLED
    one_line_error(create(invoke, service_id, "--addon", second), f"add-on {second} is already Cancelled")
    made = as_json(create(invoke, service_id, "--addon", first))["id"]
    one_line_error(create(invoke, service_id, "--addon", first),
                   f"add-on {first} already has open request {made} (pending)")
    # The service has an open request: it cancels the add-on too, so none of its own.
    service_request = as_json(create(invoke, other_service))["id"]
    one_line_error(create(invoke, other_service, "--addon", foreign),
                   f"service {other_service} already has open request {service_request} (pending), "
                   f"which cancels add-on {foreign} with the service")
    with db.read_session() as s:
        assert len(s.scalars(select(CancellationRequest)).all()) == 2


def test_a_service_request_may_be_made_beside_an_addon_request(db, invoke):
    service_id, (addon_id, _) = seed(db)
    addon_request = as_json(create(invoke, service_id, "--addon", addon_id))["id"]
    service_request = as_json(create(invoke, service_id))["id"]
    assert service_request != addon_request
    one_line_error(create(invoke, service_id), f"service {service_id} already has open request {service_request}")


# --- the run ---------------------------------------------------------------------------------

def test_the_run_cancels_the_addon_alone_at_its_date(db, settings, now):
    """Not before the add-on's next due date; at it, the add-on alone is Cancelled (the
    service, its other add-on and its unpaid invoice stay), audited, and the client gets
    the Addon Cancellation Confirmation in their language, naming the add-on."""
    service_id, (addon_id, other) = seed(db, language="de")
    with db.session.begin() as s:  # made before the add-on's due date (factories.CREATED)
        request_id = factories.request(s, s.get(Service, service_id), addon=s.get(ServiceAddon, addon_id)).id
    early = run(db, settings, now, as_of=ADDON_DUE - dt.timedelta(days=1))
    assert (early.due, early.completed, early.reminders_queued) == (0, 0, 1)  # the 1-day reminder
    with db.read_session() as s:
        reminder = s.scalars(select(OutboxEmail)).one()
    assert reminder.template == "cancellation_reminder"
    assert reminder.subject.startswith("Erinnerung: Ihre Zusatzleistung Backup 0 wird am 24. November 2026 gekündigt")
    assert "Dies betrifft nur die Zusatzleistung Backup 0: der Dienst selbst läuft weiter." in reminder.text_body
    summary = run(db, settings, now)
    assert (summary.due, summary.completed, summary.emails_queued, summary.late, summary.exit_code) == (1, 1, 1, 1, 0)
    with db.read_session() as s:
        service = s.get(Service, service_id)
        assert (service.status, service.termination_date) == (ServiceStatus.ACTIVE, None)
        assert {a.id: a.status for a in service.addons} == {addon_id: ServiceStatus.CANCELLED,
                                                            other: ServiceStatus.ACTIVE}
        assert s.scalars(select(Invoice.status).where(Invoice.service_id == service_id)).all() == [
            InvoiceStatus.UNPAID]
        request = s.get(CancellationRequest, request_id)
        assert (request.status, request.run_id, request.days_late) == (RequestStatus.COMPLETED, summary.run_id, 2)
        email = s.scalars(select(OutboxEmail).where(OutboxEmail.template != "cancellation_reminder")).one()
    assert audit(db, request_id) == [("addon", "cancelled", "alone, by its own request; the service stays")]
    assert email.key == f"addon_cancellation_confirmation:request:{request_id}"
    assert email.subject == "Bestätigung der Kündigung der Zusatzleistung - Backup 0"
    assert "die Zusatzleistung Backup 0 Ihres Dienstes VPS 4GB" in email.text_body
    assert "läuft unverändert weiter (nächste Fälligkeit 20. Dezember 2026)" in email.text_body
    again = run(db, settings, now)
    assert again.due == 0  # cancelled once
    with db.read_session() as s:  # the churn report is about services: the service stays
        assert closed_requests(s, since=D, until=D + dt.timedelta(days=7), zone=settings.zone) == []


@pytest.mark.parametrize("kind", [RequestType.IMMEDIATE, RequestType.ON_DATE])
def test_immediate_and_on_date_addon_requests(db, settings, now, kind):
    service_id, (addon_id, _) = seed(db, addon_due=None)
    with db.session.begin() as s:
        factories.request(s, s.get(Service, service_id), addon=s.get(ServiceAddon, addon_id), type_=kind,
                          cancel_on=D + dt.timedelta(days=1) if kind is RequestType.ON_DATE else None)
    first = run(db, settings, now)
    assert first.completed == (1 if kind is RequestType.IMMEDIATE else 0)
    assert run(db, settings, now, as_of=D + dt.timedelta(days=1)).completed == (
        0 if kind is RequestType.IMMEDIATE else 1)
    with db.read_session() as s:
        assert s.get(ServiceAddon, addon_id).status is ServiceStatus.CANCELLED
        assert s.get(Service, service_id).status is ServiceStatus.ACTIVE


def test_the_addon_hook_fires_and_no_module_point(db, settings, now, tmp_path):
    """AddonCancelled fires for the add-on, after the commit; PreModuleTerminate and
    TerminateAccount (the service's deprovisioning) never do for an add-on request."""
    service_id, (addon_id, _) = seed(db)
    with db.session.begin() as s:
        request_id = factories.request(s, s.get(Service, service_id), addon=s.get(ServiceAddon, addon_id)).id
    calls: list[tuple[str, dict]] = []
    hooks = HookRegistry()
    for seq, point in enumerate(("PreModuleTerminate", "TerminateAccount", "AfterModuleTerminate",
                                 "AfterModuleTerminateFailed", "ServiceCancelled", "AddonCancelled")):
        def hook(params, point=point):
            calls.append((point, params))
        hooks.register(HookImpl(point, hook, 0, "test.py", 10 + seq, seq, check_signature(point, hook, 0, "test.py")))
    summary = run(db, settings, now, hooks)
    assert summary.completed == 1
    assert [point for point, _ in calls] == ["AddonCancelled"]
    params = calls[0][1]
    assert (params["request_id"], params["addon_id"], params["id"], params["serviceid"]) == (
        request_id, addon_id, addon_id, service_id)
    assert params["addon"] == {"id": addon_id, "external_id": None, "name": "Backup 0", "amount": Decimal("2.00"),
                               "next_due_date": ADDON_DUE, "status": "Cancelled"}
    assert params["service"]["status"] == "Active" and params["request"]["status"] == "completed"


def test_a_service_request_cascades_and_closes_the_addon_request(db, settings, now):
    """The add-on request is not due yet, the service request is: the service's cancellation
    cancels every add-on and completes the add-on's request, naming the service's."""
    service_id, (addon_id, _) = seed(db, addon_due=D + dt.timedelta(days=10))
    with db.session.begin() as s:
        svc = s.get(Service, service_id)
        svc.next_due_date = D
        addon_request = factories.request(s, svc, addon=s.get(ServiceAddon, addon_id)).id
        service_request = factories.request(s, svc).id
    summary = run(db, settings, now)
    assert (summary.due, summary.completed, summary.emails_queued) == (1, 1, 1)
    with db.read_session() as s:
        assert s.get(Service, service_id).status is ServiceStatus.CANCELLED
        assert {a.status for a in s.get(Service, service_id).addons} == {ServiceStatus.CANCELLED}
        closed = s.get(CancellationRequest, addon_request)
        assert (closed.status, closed.run_id) == (RequestStatus.COMPLETED, summary.run_id)
        assert [e.template for e in s.scalars(select(OutboxEmail))] == ["service_cancellation_confirmation"]
    assert audit(db, addon_request) == [
        ("request", "completed", f"closed: its add-on was cancelled with the service by request #{service_request}")]


def test_both_due_in_one_chunk_the_service_request_wins(db, settings, now):
    """Both due in the same run: the service is cancelled with its add-ons; the add-on's
    request completes as a no-op naming the service's request, with no email of its own;
    the add-on is cancelled (and audited) once."""
    service_id, (addon_id, _) = seed(db)
    with db.session.begin() as s:
        svc = s.get(Service, service_id)
        svc.next_due_date = D
        addon_request = factories.request(s, svc, addon=s.get(ServiceAddon, addon_id)).id
        service_request = factories.request(s, svc).id
    summary = run(db, settings, now)
    assert (summary.due, summary.completed, summary.noop, summary.emails_queued) == (2, 1, 1, 1)
    assert audit(db, addon_request) == [
        ("request", "completed", f"no-op: add-on cancelled with its service by request #{service_request}; "
                                 "request completed without changes")]
    with db.read_session() as s:
        addon_audit = s.scalars(select(AuditEntry.request_id).where(AuditEntry.entity == "addon",
                                                                    AuditEntry.entity_id == addon_id)).all()
    assert addon_audit == [service_request]


def test_an_addon_already_cancelled_is_a_noop(db, settings, now):
    service_id, (addon_id, _) = seed(db)
    with db.session.begin() as s:
        request_id = factories.request(s, s.get(Service, service_id), addon=s.get(ServiceAddon, addon_id)).id
        s.get(ServiceAddon, addon_id).status = ServiceStatus.TERMINATED
    summary = run(db, settings, now)
    assert (summary.noop, summary.emails_queued) == (1, 0)
    assert audit(db, request_id) == [
        ("request", "completed", "no-op: add-on already Terminated; request completed without changes")]


def test_the_dry_run_shows_the_addon_alone(db, invoke):
    service_id, (addon_id, _) = seed(db)
    with db.session.begin() as s:
        request_id = factories.request(s, s.get(Service, service_id), addon=s.get(ServiceAddon, addon_id)).id
    (row,) = as_json(invoke("run", "--dry-run", "--as-of", D.isoformat(), "--json"))["requests"]
    assert (row["request_id"], row["addon_id"], row["action"], row["addons"], row["unpaid_invoices"],
            row["due_on"]) == (request_id, addon_id, "cancel", "Backup 0", "", ADDON_DUE.isoformat())
    assert row["detail"] == "Add-on Cancellation Confirmation - Backup 0"


# --- import ----------------------------------------------------------------------------------

def _write(path, *lines: str):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_import_addon_next_due_dates_and_addon_requests(db, invoke, tmp_path):
    """`import`: an add-on's next_due_date, a request's addon_external_id (empty: for the
    service); an add-on of another service, an unknown one and a second open request for
    one add-on are row errors; a request for the add-on beside the service's is taken."""
    files = [
        _write(tmp_path / "clients.csv", "external_id,first_name,email", "C1,Ann,ann@example.test"),
        _write(tmp_path / "products.csv", "external_id,name", "P1,Web Hosting"),
        _write(tmp_path / "services.csv", "external_id,client_external_id,product_external_id,status,next_due_date",
               "S1,C1,P1,Active,2026-12-20", "S2,C1,P1,Active,2026-12-20"),
        _write(tmp_path / "addons.csv", "external_id,service_external_id,name,status,amount,next_due_date",
               "A1,S1,Daily Backups,Active,2.00,2026-11-24", "A2,S2,SSL,Active,5.00,"),
        _write(tmp_path / "requests.csv",
               "external_id,service_external_id,type,reason_code,addon_external_id,requested_at",
               "R1,S1,End of Billing Period,other,A1,2026-11-20", "R2,S1,End of Billing Period,other,,2026-11-20"),
    ]
    ok(invoke("import", *files))
    with db.read_session() as s:
        addons = {a.external_id: a.next_due_date for a in s.scalars(select(ServiceAddon))}
        requests = {r.external_id: r.addon_id for r in s.scalars(select(CancellationRequest))}
        a1 = s.scalars(select(ServiceAddon.id).where(ServiceAddon.external_id == "A1")).one()
    assert addons == {"A1": ADDON_DUE, "A2": None}
    assert requests == {"R1": a1, "R2": None}
    rows = as_json(invoke("requests", "list", "--json"))["rows"]  # R1: the add-on's date, R2: the service's
    assert {r["external_id"]: r["due_on"] for r in rows} == {"R1": ADDON_DUE.isoformat(), "R2": "2026-12-20"}
    bad = _write(tmp_path / "bad.csv", "external_id,service_external_id,type,reason_code,addon_external_id",
                 "R3,S1,Immediate,other,A2", "R4,S1,Immediate,other,A9", "R5,S1,Immediate,other,A1")
    result = invoke("import", bad)
    assert result.exit_code == 2, result.output
    assert "bad.csv:2: addon_external_id: add-on A2 is not an add-on of service S1" in result.stderr
    assert "bad.csv:3: addon_external_id: no add-on with external_id 'A9'" in result.stderr
    assert "bad.csv:4: addon_external_id: add-on A1 already has open request" in result.stderr
    with db.read_session() as s:
        assert len(s.scalars(select(CancellationRequest)).all()) == 2
