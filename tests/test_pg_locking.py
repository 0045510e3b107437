"""PostgreSQL: a run's chunk against other writers (issue 6).

- A chunk that loses a deadlock is rolled back whole by PostgreSQL; the run does it
  again, and every request is still applied once.
- An import that updates a service while a run's chunk cancels it waits for the chunk,
  then reports the conflict instead of writing its stale status over Cancelled (a lost
  update, before the importer locked the rows it reads).

Both set up the collision for real, with a second connection and row locks, and wait on
pg_stat_activity to know that a transaction is blocked.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from processor import importer
from processor.db import Database
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Client,
    OutboxEmail,
    Product,
    RequestStatus,
    Run,
    Service,
    ServiceStatus,
)
from processor.run import Runner, RunOptions
from tests import factories

pytestmark = pytest.mark.postgresql_only
D = dt.date(2026, 11, 26)


def seed(db: Database, n: int) -> tuple[list[int], list[int]]:
    with db.session.begin() as s:
        requests = [factories.request(s, factories.service(s)) for _ in range(n)]
        return [r.id for r in requests], [r.service_id for r in requests]


def waiting_on_locks(db: Database) -> int:
    """Backends of this database blocked on a lock."""
    with db.engine.connect() as conn:
        return conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND wait_event_type = 'Lock'"))


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def cancelled_once(db: Database, service_ids: list[int]) -> None:
    with db.read_session() as s:
        audited = s.execute(select(AuditEntry.entity_id, func.count()).where(
            AuditEntry.entity == "service", AuditEntry.action == "cancelled").group_by(AuditEntry.entity_id)).all()
        assert dict(audited) == dict.fromkeys(service_ids, 1)
        assert {i: s.get(Service, i).status for i in service_ids} == dict.fromkeys(service_ids, ServiceStatus.CANCELLED)
        emails = s.scalars(select(OutboxEmail.request_id).where(
            OutboxEmail.template == "service_cancellation_confirmation")).all()
        assert len(emails) == len(set(emails)) == len(service_ids)


def test_a_chunk_that_loses_a_deadlock_is_done_again_and_applies_each_request_once(db, settings, now):
    request_ids, service_ids = seed(db, 3)
    runner = Runner(db, settings, clock=lambda: now)
    decide = runner.decider.decide
    decided: list[int] = []
    other: dict[str, object] = {}
    holds_service = threading.Event()

    def rival() -> None:
        """Locks the first service, then asks for its request, which the chunk holds."""
        with db.engine.connect() as conn:
            # Let PostgreSQL pick the chunk as the deadlock's victim: it checks whoever
            # has waited deadlock_timeout (1 s by default) first.
            conn.exec_driver_sql("SET deadlock_timeout = '30s'")
            conn.execute(text("UPDATE services SET domain = domain WHERE id = :id"), {"id": service_ids[0]})
            holds_service.set()
            conn.execute(text("SELECT id FROM cancellation_requests WHERE id = :id FOR UPDATE"),
                         {"id": request_ids[0]})
            conn.commit()
        other["done"] = True

    def decide_while_a_rival_locks(row, *args):
        decided.append(row.id)
        if row.id == request_ids[0] and "thread" not in other:
            other["thread"] = threading.Thread(target=rival)
            other["thread"].start()
            assert holds_service.wait(10)
        return decide(row, *args)

    runner.decider.decide = decide_while_a_rival_locks
    summary = runner.run(RunOptions(as_of=D))
    other["thread"].join(timeout=30)
    assert other.get("done")
    # The chunk was decided twice (rolled back once), and counted once. (Sorted: the retry
    # may claim before the rival has let go of the first request, and take it next.)
    assert sorted(decided) == sorted(request_ids * 2)
    assert (summary.due, summary.completed, summary.failed, summary.retrying) == (3, 3, 0, 0)
    with db.read_session() as s:
        run = s.get(Run, summary.run_id)
        assert (run.due, run.completed) == (3, 3)
        assert {s.get(CancellationRequest, i).status for i in request_ids} == {RequestStatus.COMPLETED}
    cancelled_once(db, service_ids)


def test_an_import_waits_for_a_chunk_cancelling_its_service_and_reports_the_conflict(db, settings, now,
                                                                                     tmp_path: Path):
    request_ids, service_ids = seed(db, 1)
    with db.session.begin() as s:
        service = s.get(Service, service_ids[0])
        service.external_id = "S1"
        s.get(Client, service.client_id).external_id = "C1"
        s.get(Product, service.product_id).external_id = "P1"
    feed = tmp_path / "services.jsonl"  # the billing system's nightly feed: S1 is now Suspended
    feed.write_text(json.dumps({"external_id": "S1", "client_external_id": "C1", "product_external_id": "P1",
                                "status": "Suspended"}) + "\n")

    # Hold the run record's row: the chunk then writes its service (Cancelled) and waits,
    # uncommitted, at the update of its counts.
    run_lock = threading.Event()
    release = threading.Event()

    def hold_the_run_record(run_id: int) -> None:
        with db.engine.connect() as conn:
            # NO KEY UPDATE: the chunk's inserts (audit rows referencing the run) pass; the
            # update of the run's counts, its last statement, waits.
            conn.execute(text("SELECT id FROM runs WHERE id = :id FOR NO KEY UPDATE"), {"id": run_id})
            run_lock.set()
            release.wait(30)
            conn.rollback()

    runner = Runner(db, settings, clock=lambda: now)
    decide = runner.decider.decide

    def decide_then_block_the_commit(row, as_of, fields, run_id=None, **kw):
        threading.Thread(target=hold_the_run_record, args=(run_id,), daemon=True).start()
        assert run_lock.wait(10)
        return decide(row, as_of, fields, run_id, **kw)

    runner.decider.decide = decide_then_block_the_commit
    results: dict[str, object] = {}
    run_thread = threading.Thread(target=lambda: results.update(summary=runner.run(RunOptions(as_of=D))))
    run_thread.start()
    wait_until(lambda: waiting_on_locks(db) == 1, "the chunk waits on the run record")
    import_thread = threading.Thread(target=lambda: results.update(
        report=importer.import_file(db, feed, settings=settings, now=now)))
    import_thread.start()
    wait_until(lambda: waiting_on_locks(db) == 2, "the import waits on the service the chunk cancelled")
    release.set()
    run_thread.join(30)
    import_thread.join(30)

    assert results["summary"].completed == 1
    report = results["report"]
    assert (report.updated, report.unchanged, len(report.conflicts)) == (0, 0, 1)
    assert report.conflicts[0].message.startswith(f"service was cancelled by request {request_ids[0]}")
    cancelled_once(db, service_ids)  # still Cancelled: the import did not write Suspended over it
