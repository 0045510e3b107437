"""Credit for unused time (immediate_refund = "credit"), on SQLite and PostgreSQL: what a
run, a dry run and `requests process` credit, the credits table, the client's balance,
the confirmation email, the audit trail and `requests show`. The rule itself is
property-tested in tests/test_properties.py."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from decimal import Decimal
from typing import Any

import psutil
import pytest
from freezegun import freeze_time
from sqlalchemy import func, insert, select

from processor import credits
from processor.db import Database, open_database
from processor.hooks import load_hooks
from processor.models import (
    AuditAction,
    AuditEntry,
    CancellationRequest,
    Client,
    Credit,
    Invoice,
    InvoiceStatus,
    OutboxEmail,
    Product,
    RequestStatus,
    RequestType,
    Run,
    Service,
    ServiceStatus,
)
from processor.run import Runner, RunOptions, RunSummary
from tests import factories
from tests.test_workers import cancelproc, env

D = dt.date(2026, 11, 26)
NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


@pytest.fixture
def credit_settings(settings: Any) -> Any:
    settings.immediate_refund = "credit"
    return settings


def seed(db: Database, *, type_: RequestType = RequestType.IMMEDIATE, next_due: dt.date | None = dt.date(2026, 12, 6),
         cycle: str = "Monthly", paid: list[tuple[str, dt.date | None]] = (("30.00", dt.date(2026, 11, 6)),),
         language: str = "en", balance: str = "0") -> tuple[int, int, int]:
    """A service (due `next_due`, billed `cycle`) with paid invoices of these amounts and due
    dates, and a request on it. Returns (request id, service id, client id)."""
    with db.session.begin() as s:
        svc = factories.service(s, next_due_date=next_due, language=language)
        svc.billing_cycle = cycle
        svc.client.balance = Decimal(balance)
        for amount, due in paid:
            s.add(Invoice(service_id=svc.id, amount=Decimal(amount), status=InvoiceStatus.PAID, due_date=due))
        s.add(Invoice(service_id=svc.id, amount=Decimal("99.00"), status=InvoiceStatus.UNPAID, due_date=next_due))
        req = factories.request(s, svc, type_=type_)
        return req.id, svc.id, svc.client.id


def run(db: Database, settings: Any, **options: Any) -> RunSummary:
    return Runner(db, settings, clock=lambda: NOW).run(RunOptions(as_of=options.pop("as_of", D), **options))


def credits_of(db: Database) -> list[Credit]:
    with db.read_session() as s:
        return list(s.scalars(select(Credit).order_by(Credit.request_id)))


def balance(db: Database, client_id: int) -> Decimal:
    with db.read_session() as s:
        return s.get(Client, client_id).balance


def confirmation(db: Database, request_id: int) -> OutboxEmail:
    with db.read_session() as s:
        return s.scalars(select(OutboxEmail).where(OutboxEmail.request_id == request_id)).one()


def test_an_immediate_cancellation_credits_the_unused_days_of_the_last_paid_invoice(db, credit_settings):
    # Paid 2026-11-06..12-06 (30 days); cancelled 11-26: 10 days unused of 30.00 -> 10.00.
    request_id, service_id, client_id = seed(db, balance="5.00", paid=[("24.00", dt.date(2026, 10, 6)),
                                                                        ("30.00", dt.date(2026, 11, 6))])
    summary = run(db, credit_settings)
    assert summary.completed == 1
    (credit,) = credits_of(db)
    assert (credit.request_id, credit.service_id, credit.client_id, credit.run_id, credit.amount) == (
        request_id, service_id, client_id, summary.run_id, Decimal("10.00"))
    assert (credit.period_start, credit.period_end, credit.days_unused, credit.days_in_period) == (
        dt.date(2026, 11, 6), dt.date(2026, 12, 6), 10, 30)
    with db.read_session() as s:
        assert credit.invoice_id == s.scalars(select(Invoice.id).where(Invoice.amount == Decimal("30.00"))).one()
        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == AuditAction.CREDITED)).one()
    assert balance(db, client_id) == Decimal("-5.00")  # owed 5.00; now 5.00 in credit
    assert (audit.request_id, audit.entity, audit.entity_id, audit.run_id) == (request_id, "client", client_id,
                                                                               summary.run_id)
    assert audit.detail == credit.description and "10.00" in audit.detail and "10 of 30 days" in audit.detail
    email = confirmation(db, request_id)
    assert "A credit of 10.00 for the unused part of the period you paid" in email.text_body
    assert "A credit of 10.00" in email.html_body
    # Run again: nothing is due, nothing credited twice.
    assert run(db, credit_settings).due == 0
    assert len(credits_of(db)) == 1 and balance(db, client_id) == Decimal("-5.00")


@pytest.mark.parametrize("case", ["setting none", "end of billing period", "no paid invoice", "free account",
                                  "after the period", "no next due date"])
def test_no_credit(db, settings, credit_settings, case):
    if case == "setting none":
        settings.immediate_refund = "none"
    kwargs: dict[str, Any] = {
        "setting none": {}, "end of billing period": {"type_": RequestType.END_OF_BILLING_PERIOD, "next_due": D},
        "no paid invoice": {"paid": []}, "free account": {"cycle": "Free Account"},
        "after the period": {"next_due": D - dt.timedelta(days=1)}, "no next due date": {"next_due": None},
    }[case]
    request_id, _, client_id = seed(db, **kwargs)
    assert run(db, settings).completed == 1
    assert credits_of(db) == [] and balance(db, client_id) == 0
    assert "credit" not in confirmation(db, request_id).text_body.lower()


def test_the_credit_is_in_the_clients_language(db, credit_settings):
    credit_settings.email.currency = "EUR"
    request_id, _, _ = seed(db, language="de")
    run(db, credit_settings)
    assert "Kundenkonto 10,00\u00a0€ gutgeschrieben" in confirmation(db, request_id).text_body.replace(" €", "\u00a0€")


def test_two_credits_of_one_client_in_one_chunk_both_lower_the_balance(db, credit_settings):
    with db.session.begin() as s:
        client_services = [factories.service(s, next_due_date=dt.date(2026, 12, 6)) for _ in range(2)]
        client = client_services[0].client
        client_services[1].client = client
        for svc, amount in zip(client_services, ("30.00", "60.00"), strict=True):
            s.add(Invoice(service_id=svc.id, amount=Decimal(amount), status=InvoiceStatus.PAID,
                          due_date=dt.date(2026, 11, 6)))
            factories.request(s, svc, type_=RequestType.IMMEDIATE)
        client_id = client.id
    assert run(db, credit_settings).completed == 2
    assert sorted(c.amount for c in credits_of(db)) == [Decimal("10.00"), Decimal("20.00")]
    assert balance(db, client_id) == Decimal("-30.00")


def test_the_dry_run_shows_the_credit_and_writes_nothing(db, credit_settings):
    request_id, _, client_id = seed(db)
    other, _, _ = seed(db, paid=[])
    rows = list(Runner(db, credit_settings, clock=lambda: NOW).preview(RunOptions(as_of=D)))
    assert {r["request_id"]: r["credit"] for r in rows} == {request_id: Decimal("10.00"), other: None}
    assert credits_of(db) == [] and balance(db, client_id) == 0


def test_a_failed_attempt_credits_nothing(db, credit_settings, tmp_path):
    hooks_dir = tmp_path / "hooks"
    hooks_dir.mkdir()
    (hooks_dir / "term.py").write_text("from processor.hooks import add_hook\n\n"
                                       "@add_hook('TerminateAccount')\ndef no(params):\n    return 'API down'\n")
    _, _, client_id = seed(db)
    summary = Runner(db, credit_settings, clock=lambda: NOW, hooks=load_hooks(hooks_dir, entry_points=False)).run(
        RunOptions(as_of=D))
    assert summary.retrying == 1
    assert credits_of(db) == [] and balance(db, client_id) == 0


def test_requests_process_and_requests_show(db, credit_settings, invoke):
    request_id, _, client_id = seed(db, next_due=dt.date(2027, 11, 26), cycle="Annually",
                                    paid=[("365.00", dt.date(2026, 11, 26))])
    env = {"CANCELPROC_IMMEDIATE_REFUND": "credit"}
    with freeze_time(NOW):
        result = invoke("requests", "process", request_id, "--json", env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["completed"] == 1
        (credit,) = credits_of(db)
        assert (credit.amount, credit.days_unused, credit.days_in_period) == (Decimal("365.00"), 365, 365)
        assert balance(db, client_id) == Decimal("-365.00")
        shown = invoke("requests", "show", request_id, "--json", env=env)
        assert shown.exit_code == 0, shown.output
        data = json.loads(shown.stdout)
        assert data["credit"]["amount"] == "365.00" and data["credit"]["id"] == credit.id
        assert "credited" in [a["action"] for a in data["audit"]]
        text = invoke("requests", "show", request_id, env=env).stdout
        assert "credit      365.00 for 365 of 365 days unused" in text
    with db.read_session() as s:
        assert s.get(CancellationRequest, request_id).status is RequestStatus.COMPLETED
        assert s.scalar(select(func.count()).select_from(Credit)) == 1


# --- exactly once on PostgreSQL with processes working on one run at once ---------------------

N_PG = 1200


def seed_many(db: Database, n: int) -> dt.date:
    """n Immediate requests, each on a Monthly service due in 10 days with one paid invoice
    of 30.00; a client per three services. Returns the services' next due date."""
    today = dt.date.today()
    created = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    with db.engine.begin() as conn:
        product = conn.execute(insert(Product).values(name="VPS", module="proxmox").returning(Product.id)).scalar()
        conn.execute(insert(Client), [dict(id=c, first_name=f"C{c}", last_name="", company_name="",
                                           email=f"c{c}@example.test", language="en", balance=0)
                                      for c in range(1, n // 3 + 1)])
        conn.execute(insert(Service), [dict(id=i, client_id=(i - 1) // 3 + 1, product_id=product, domain=f"h{i}.test",
                                            status=ServiceStatus.ACTIVE, billing_cycle="Monthly", amount=30,
                                            next_due_date=today + dt.timedelta(days=10)) for i in range(1, n + 1)])
        conn.execute(insert(Invoice), [dict(id=i, service_id=i, amount=Decimal("30.00"), status=InvoiceStatus.PAID,
                                            due_date=today - dt.timedelta(days=20)) for i in range(1, n + 1)])
        conn.execute(insert(CancellationRequest), [
            dict(id=i, service_id=i, type=RequestType.IMMEDIATE, reason_code="other", reason="",
                 effective_date=created.date(),  # Immediate: the day it was made (UTC here)
                 status=RequestStatus.PENDING, created_at=created, created_by="test", attempts=0, note="")
            for i in range(1, n + 1)])
    return today + dt.timedelta(days=10)


@pytest.mark.slow
def test_workers_and_a_killed_worker_credit_each_request_once_on_postgresql(pg_server, tmp_path):
    """`run --workers 3` on PostgreSQL, one worker killed with SIGKILL midway (its chunk in
    flight rolls back and another process claims it again): every request credited once,
    each client's balance minus the sum of its credits, one audit row per credit."""
    url = pg_server.new_database()
    db = open_database(url)
    try:
        next_due = seed_many(db, N_PG)
        environ = {**env(url, tmp_path), "CANCELPROC_IMMEDIATE_REFUND": "credit"}
        proc = cancelproc(tmp_path, environ, "run", "--workers", "3")
        try:
            coordinator = psutil.Process(proc.pid)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with db.read_session() as s:
                    done = s.scalar(select(func.count()).select_from(Credit))
                if done >= N_PG // 4 and len(coordinator.children()) == 3:
                    break
                time.sleep(0.05)
            workers = coordinator.children()
            if workers:  # (a run that ended first has none left: then nothing was killed)
                workers[0].send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        with db.read_session() as s:
            rows = s.execute(select(Credit.request_id, Credit.client_id, Credit.amount)).all()
            assert sorted(r.request_id for r in rows) == list(range(1, N_PG + 1))  # each once (and unique)
            as_of = s.scalars(select(Run.as_of)).one()
            rule = credits.unused_credit(1, credits.PaidInvoice(1, Decimal("30.00")), next_due, "Monthly", as_of)
            assert rule is not None and {r.amount for r in rows} == {rule.amount}
            balances = {client_id: balance for client_id, balance in s.execute(select(Client.id, Client.balance))}
            assert balances == dict.fromkeys(range(1, N_PG // 3 + 1), -3 * rule.amount)
            assert s.scalar(select(func.count()).where(AuditEntry.action == AuditAction.CREDITED)) == N_PG
            assert s.scalar(select(func.count()).where(
                CancellationRequest.status == RequestStatus.COMPLETED)) == N_PG
    finally:
        db.dispose()
