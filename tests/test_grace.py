"""The grace period (a product's grace_days): suspend when due, cancel when it ends, nights
apart; a withdrawal in between unsuspends. On SQLite and PostgreSQL (the `db` fixture).

The hook points themselves (vetoes, failures retried, UnsuspendAccount refusing a
withdrawal) are tested one by one in test_hook_points.py; the crash test in test_crash.py.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import func, select
from sqlalchemy import inspect as sa_inspect

from processor import db as dbmod
from processor.config import ProductSettings
from processor.db import Database
from processor.emails import SERVICE_CANCELLATION_CONFIRMATION, SERVICE_SUSPENDED
from processor.hooks import HookRegistry
from processor.models import (
    AuditAction,
    AuditEntry,
    CancellationRequest,
    OutboxEmail,
    RequestStatus,
    Run,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.run import Runner, RunOptions, RunSummary
from tests import factories

DUE = dt.date(2026, 11, 26)
GRACE = 10
ENDS = DUE + dt.timedelta(days=GRACE)


def night(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(2, 0), tzinfo=dt.UTC)


def run_on(db: Database, settings: Any, day: dt.date, hooks: HookRegistry | None = None) -> RunSummary:
    return Runner(db, settings, clock=lambda: night(day), hooks=hooks).run(RunOptions(as_of=day))


def grace_settings(settings: Any) -> Any:
    """"VPS 4GB" (the factories' product) with a grace period; "Domain" without."""
    return settings.model_copy(update={"products": {"VPS 4GB": ProductSettings(grace_days=GRACE),
                                                    "Domain": ProductSettings(grace_days=0)}})


def seed(db: Database, product: str = "VPS 4GB", **service: Any) -> tuple[int, int]:
    with db.session.begin() as s:
        svc = factories.service(s, next_due_date=DUE, **service)
        svc.product.name = product
        return factories.request(s, svc).id, svc.id


def state(db: Database, request_id: int) -> tuple[Any, ...]:
    with db.read_session() as s:
        r = s.get(CancellationRequest, request_id)
        return r.status, r.service.status, r.suspended_on, r.grace_ends_on


def templates_of(db: Database, request_id: int) -> list[str]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail.template).where(OutboxEmail.request_id == request_id)
                              .order_by(OutboxEmail.id)))


def actions_of(db: Database, request_id: int) -> list[tuple[str, str]]:
    with db.read_session() as s:
        return [(a.entity.value, a.action.value) for a in s.scalars(
            select(AuditEntry).where(AuditEntry.request_id == request_id).order_by(AuditEntry.id))]


def test_due_suspends_then_cancels_when_the_grace_period_ends(db, settings):
    """Night of the due date: suspended, its email, the request pending in its grace
    period; the nights in between: nothing; the night the grace period ends: cancelled as
    today, with the confirmation. A product without grace_days is cancelled at once."""
    settings = grace_settings(settings)
    graced, graced_service = seed(db, addons=1, unpaid=1)
    plain, _ = seed(db, product="Domain")

    summary = run_on(db, settings, DUE)
    assert (summary.due, summary.suspended, summary.completed, summary.emails_queued) == (2, 1, 1, 2)
    assert state(db, graced) == (RequestStatus.PENDING, ServiceStatus.SUSPENDED, DUE, ENDS)
    assert state(db, plain)[:2] == (RequestStatus.COMPLETED, ServiceStatus.CANCELLED)
    assert templates_of(db, graced) == [SERVICE_SUSPENDED]
    assert templates_of(db, plain) == [SERVICE_CANCELLATION_CONFIRMATION]
    assert actions_of(db, graced) == [("service", "suspended"), ("request", "suspended")]
    with db.read_session() as s:
        run = s.get(Run, summary.run_id)
        assert (run.suspended, run.completed) == (1, 1)
        assert s.scalars(select(ServiceAddon.status).where(ServiceAddon.service_id == graced_service)).all() == [
            ServiceStatus.ACTIVE]  # the add-ons wait for the cancellation
        email = s.scalars(select(OutboxEmail).where(OutboxEmail.request_id == graced)).one()
        assert email.key == f"{SERVICE_SUSPENDED}:request:{graced}"
        assert "December 6, 2026" in email.text_body or "2026-12-06" in email.text_body

    for day in (DUE + dt.timedelta(days=1), ENDS - dt.timedelta(days=1)):  # in the grace period: not due
        assert run_on(db, settings, day).due == 0
    assert state(db, graced)[:2] == (RequestStatus.PENDING, ServiceStatus.SUSPENDED)

    summary = run_on(db, settings, ENDS)
    assert (summary.due, summary.completed, summary.suspended, summary.late) == (1, 1, 0, 0)
    assert state(db, graced)[:2] == (RequestStatus.COMPLETED, ServiceStatus.CANCELLED)
    assert templates_of(db, graced) == [SERVICE_SUSPENDED, SERVICE_CANCELLATION_CONFIRMATION]
    assert actions_of(db, graced)[2:] == [("service", "cancelled"), ("addon", "cancelled"), ("invoice", "cancelled")]
    with db.read_session() as s:
        assert s.get(Service, graced_service).termination_date == ENDS
        assert s.get(CancellationRequest, graced).days_late == 0
    assert run_on(db, settings, ENDS + dt.timedelta(days=1)).due == 0


def test_missed_nights_count_the_grace_period_from_the_day_of_the_suspension(db, settings):
    """A run three nights late suspends with the whole grace period ahead (the client is
    told the date); a run late for the cancellation counts its lateness from the grace end."""
    settings = grace_settings(settings)
    request_id, _ = seed(db)
    late = DUE + dt.timedelta(days=3)
    summary = run_on(db, settings, late)
    assert (summary.suspended, summary.late, summary.max_days_late) == (1, 1, 3)
    assert state(db, request_id)[2:] == (late, late + dt.timedelta(days=GRACE))
    summary = run_on(db, settings, late + dt.timedelta(days=GRACE + 2))
    assert (summary.completed, summary.max_days_late) == (1, 2)


def test_grace_days_zero_is_todays_behaviour(db, settings):
    """No product with a grace period: the decider asks nothing per request, and a due
    request is cancelled at the due date as before."""
    runner = Runner(db, settings, clock=lambda: night(DUE))
    assert runner.decider.grace_days is None
    request_id, _ = seed(db)
    summary = runner.run(RunOptions(as_of=DUE))
    assert (summary.completed, summary.suspended) == (1, 0)
    assert state(db, request_id) == (RequestStatus.COMPLETED, ServiceStatus.CANCELLED, None, None)


def test_a_suspended_request_is_cancelled_after_grace_days_is_turned_off(db, settings):
    """The grace end is fixed when suspended (the client was told it): turning grace_days
    off neither cancels it early nor leaves it suspended."""
    request_id, _ = seed(db)
    run_on(db, grace_settings(settings), DUE)
    assert run_on(db, settings, DUE + dt.timedelta(days=1)).due == 0
    assert run_on(db, settings, ENDS).completed == 1
    assert state(db, request_id)[:2] == (RequestStatus.COMPLETED, ServiceStatus.CANCELLED)


def test_a_service_already_suspended_is_cancelled_at_once(db, settings):
    request_id, _ = seed(db, status=ServiceStatus.SUSPENDED)
    summary = run_on(db, grace_settings(settings), DUE)
    assert (summary.completed, summary.suspended) == (1, 0)
    assert state(db, request_id) == (RequestStatus.COMPLETED, ServiceStatus.CANCELLED, None, None)


def test_the_dry_run_shows_the_suspension_and_later_the_cancellation(db, settings):
    settings = grace_settings(settings)
    request_id, _ = seed(db)
    runner = Runner(db, settings, clock=lambda: night(DUE))
    [row] = list(runner.preview(RunOptions(as_of=DUE)))
    assert (row["action"], row["due_on"], row["addons"]) == ("suspend", DUE, "")
    assert f"suspended until {ENDS}" in row["detail"] and "Service Suspended" in row["detail"]
    assert state(db, request_id)[1] is ServiceStatus.ACTIVE  # nothing written
    run_on(db, settings, DUE)
    assert list(Runner(db, settings, clock=lambda: night(DUE)).preview(RunOptions(as_of=DUE))) == []
    [row] = list(Runner(db, settings, clock=lambda: night(ENDS)).preview(RunOptions(as_of=ENDS)))
    assert (row["action"], row["due_on"]) == ("cancel", ENDS)


def test_a_suspension_is_written_once_even_if_decided_twice(db, settings):
    """Exactly once: a chunk decided before another process suspended the request (the
    write claims it again) is skipped, not suspended a second time or emailed twice."""
    settings = grace_settings(settings)
    request_id, _ = seed(db)
    runner = Runner(db, settings, clock=lambda: night(DUE))
    with runner._reading() as store:
        rows = store.read_due(RunOptions(as_of=DUE), night(DUE), 0, 10)
    stale = [runner.decider.decide(row, DUE, runner.decider.run_fields(DUE)) for row in rows]
    run_on(db, settings, DUE)  # another run suspends it meanwhile
    with runner._writing() as store:  # the chunk write's claim and statements (its run is closed)
        run_id = store.conn.execute(select(func.max(Run.id))).scalar_one()
        store._write(stale, run_id, DUE, night(DUE))
    assert [o.action.value for o in stale] == ["skipped"]
    assert templates_of(db, request_id) == [SERVICE_SUSPENDED]


def test_withdrawing_in_the_grace_period_unsuspends(db, settings, invoke):
    """`requests withdraw` (the command, no hooks): the service Active again, the request
    withdrawn, the client told by service_unsuspended; no later run touches it."""
    settings = grace_settings(settings)
    request_id, service_id = seed(db)
    run_on(db, settings, DUE)
    result = invoke("requests", "withdraw", str(request_id), "--note", "client stays", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["unsuspended"] is True
    assert state(db, request_id)[:2] == (RequestStatus.WITHDRAWN, ServiceStatus.ACTIVE)
    assert templates_of(db, request_id) == [SERVICE_SUSPENDED, "service_unsuspended"]
    assert (AuditAction.UNSUSPENDED.value in {a for _, a in actions_of(db, request_id)})
    assert run_on(db, settings, ENDS).due == 0
    with db.read_session() as s:
        assert s.get(Service, service_id).status is ServiceStatus.ACTIVE


def test_requests_show_and_list_say_it_is_in_its_grace_period(db, settings, invoke):
    settings = grace_settings(settings)
    request_id, _ = seed(db)
    run_on(db, settings, DUE)
    shown = json.loads(invoke("requests", "show", str(request_id), "--json").stdout)
    assert (shown["status"], shown["suspended_on"], shown["grace_ends_on"], shown["service"]["status"]) == (
        "pending", str(DUE), str(ENDS), "Suspended")
    assert [a["action"] for a in shown["audit"]] == ["suspended", "suspended"]
    table = invoke("requests", "list").stdout
    assert "GRACE_ENDS_ON" in table and str(ENDS) in table
    with db.session.begin() as s:  # another service's request, not suspended
        other = factories.request(s, factories.service(s)).id
    listed = json.loads(invoke("requests", "list", "--json").stdout)["rows"]
    in_grace = json.loads(invoke("requests", "list", "--in-grace", "--json").stdout)["rows"]
    assert sorted(r["id"] for r in listed) == sorted([request_id, other])
    assert [(r["id"], r["grace_ends_on"]) for r in in_grace] == [(request_id, str(ENDS))]
    invoke("requests", "withdraw", str(request_id))
    assert json.loads(invoke("requests", "list", "--in-grace", "--json").stdout)["rows"] == []


def test_the_grace_period_migration_goes_down_and_up(db):
    """Down to 0008 drops the columns and renames the audit rows' new actions; it refuses
    while a request is in its grace period."""
    with db.session.begin() as s:
        svc = factories.service(s)
        request = factories.request(s, svc)
        request.suspended_on, request.grace_ends_on = DUE, ENDS
        s.add(AuditEntry(at=night(DUE), actor="test", request_id=request.id, entity="request",
                         entity_id=request.id, action=AuditAction.SUSPENDED, detail="x"))
    cfg = dbmod._alembic_config(db)
    before = _previous_revision(db)
    try:
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, before)
    except RuntimeError as exc:
        assert "grace period" in str(exc)
    else:
        raise AssertionError("downgrade with a request in its grace period should be refused")
    with db.session.begin() as s:
        s.execute(CancellationRequest.__table__.update().values(status="withdrawn"))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, before)
    with db.engine.connect() as conn:
        assert "suspended_on" not in {c["name"] for c in sa_inspect(conn).get_columns("cancellation_requests")}
        assert conn.exec_driver_sql("SELECT action, detail FROM audit_log").all() == [("completed", "suspended: x")]
    dbmod.upgrade(db)
    with db.session.begin() as s:  # the new action is accepted again at head
        s.add(AuditEntry(at=night(DUE), actor="test", request_id=None, entity="service", entity_id=1,
                         action=AuditAction.UNSUSPENDED, detail=""))
    if db.engine.dialect.name == "sqlite":
        with db.engine.connect() as conn:
            sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'audit_log'").scalar_one()
        assert " IN (" not in sql and "action = 'unsuspended'" in sql


def _previous_revision(db: Database) -> str:
    """The revision before the one adding the grace period (the lead re-chains 0009s)."""
    script = ScriptDirectory.from_config(dbmod._alembic_config(db))
    grace = next(s for s in script.walk_revisions() if s.path.endswith("_grace_period.py"))
    return str(grace.down_revision)
