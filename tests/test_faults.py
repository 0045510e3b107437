"""Faults from outside: the database file locked by another program (issue 6)."""

from __future__ import annotations

import sqlite3
import time

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from processor.models import CancellationRequest, RequestStatus, Run
from tests import factories
from tests.cli_helpers import as_json, ok, one_line_error

NOW = "2026-11-26T02:00:00Z"


@pytest.mark.sqlite_only
def test_a_locked_sqlite_file_is_waited_for_then_a_clear_line_and_nothing_written(invoke, db, settings):
    with db.session.begin() as s:
        factories.request(s, factories.service(s))
    other = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # a backup tool, a sqlite3 shell...
    try:
        started = time.monotonic()
        with freeze_time(NOW, tick=True):
            result = invoke("run", env={"CANCELPROC_SQLITE_BUSY_TIMEOUT_SECONDS": "1"})
        waited = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    one_line_error(result, "the database is locked by another program or writer (waited "
                           "sqlite_busy_timeout_seconds)", code=75)
    assert waited >= 1
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 0
        assert s.scalar(select(CancellationRequest.status)) is RequestStatus.PENDING
    with freeze_time(NOW, tick=True):
        ok(invoke("run"))  # the lock is gone: the rerun does the work
    with db.read_session() as s:
        assert s.scalar(select(CancellationRequest.status)) is RequestStatus.COMPLETED


def test_wrong_but_well_formed_data_ends_in_recorded_outcomes(db, settings, now):
    """Dates far in the past or the future, a product whose module no hook handles, a
    client without an address: each ends explained, and none stops the others."""
    import datetime as dt

    from processor.models import Product
    from processor.run import Runner, RunOptions

    with db.session.begin() as s:
        ancient = factories.request(s, factories.service(s, next_due_date=dt.date(1970, 1, 1)))
        far = factories.request(s, factories.service(s, next_due_date=dt.date(9999, 12, 31)))
        unknown_module = factories.service(s)
        s.get(Product, unknown_module.product_id).module = "no-such-module"
        module = factories.request(s, unknown_module)
        no_address = factories.request(s, factories.service(s, email=""))
        ids = (ancient.id, far.id, module.id, no_address.id)
    summary = Runner(db, settings, clock=lambda: now).run(RunOptions(as_of=now.date()))
    with db.read_session() as s:
        got = {i: s.get(CancellationRequest, i) for i in ids}
    # Long overdue: applied, and how late is recorded: not from 1970 but, as for an Immediate
    # request, from the first nightly run after the day it was made (11-20: the 21st).
    assert got[ancient.id].status is RequestStatus.COMPLETED and got[ancient.id].days_late == 5
    assert got[far.id].status is RequestStatus.PENDING  # not due until 9999: left alone
    # No hook handles its module: nothing external to do, so it is cancelled (docs/hooks.md).
    assert got[module.id].status is RequestStatus.COMPLETED
    assert got[no_address.id].status is RequestStatus.PENDING
    assert "has no valid email address" in got[no_address.id].last_error
    assert (summary.due, summary.completed, summary.retrying) == (3, 2, 1)


def _delete_behind_our_back(db, table: str, row_id: int) -> None:
    """Delete a row as another program would, with the foreign keys off (a DBA's cleanup
    script, a WHMCS sync with `foreign_keys` unset)."""
    raw = db.engine.raw_connection()  # the driver's own connection: no BEGIN of ours
    try:
        cur = raw.cursor()
        # Off for this connection only: SQLite's pragma (in autocommit, or it is ignored);
        # PostgreSQL's replica role, which fires no foreign key triggers.
        cur.execute("SET session_replication_role = replica" if db.is_postgresql else "PRAGMA foreign_keys=OFF")
        cur.execute(f"DELETE FROM {table} WHERE id = {int(row_id)}")
        raw.commit()
        cur.execute("RESET session_replication_role" if db.is_postgresql else "PRAGMA foreign_keys=ON")
        raw.commit()
    finally:
        raw.close()


def test_a_request_whose_service_client_or_product_was_deleted_fails_explained(invoke, db):
    """Rows deleted outside cancelproc: the request cannot join to the due query. It must
    not wait unseen for ever: the run fails it, says why, and goes on with the others."""
    with db.session.begin() as s:
        good = factories.request(s, factories.service(s)).id
        no_service = factories.request(s, svc := factories.service(s, addons=1, unpaid=1))
        gone_service = svc.id
        no_client = factories.request(s, svc := factories.service(s))
        gone_client = svc.client_id
        no_product = factories.request(s, svc := factories.service(s))
        gone_product = svc.product_id
        ids = (no_service.id, no_client.id, no_product.id)
    _delete_behind_our_back(db, "services", gone_service)
    _delete_behind_our_back(db, "clients", gone_client)
    _delete_behind_our_back(db, "products", gone_product)

    with freeze_time(NOW, tick=True):
        preview = as_json(invoke("run", "--dry-run", "--json"), code=1)
        assert {r["request_id"]: r["action"] for r in preview["requests"]} == {
            good: "cancel", **{i: "error" for i in ids}}
        summary = as_json(invoke("run", "--json"), code=1)
    assert (summary["due"], summary["completed"], summary["failed"]) == (4, 1, 3)
    with db.read_session() as s:
        got = {i: s.get(CancellationRequest, i) for i in (good, *ids)}
    assert got[good].status is RequestStatus.COMPLETED
    assert all(got[i].status is RequestStatus.FAILED for i in ids)
    assert got[ids[0]].last_error == (f"service #{gone_service} no longer exists (deleted outside cancelproc); "
                                      "nothing was cancelled")
    assert f"client #{gone_client} of service" in got[ids[1]].last_error
    assert f"product #{gone_product} of service" in got[ids[2]].last_error
    # Staff see them: in the digest, in `status`, and at `requests show`.
    digest = as_json(invoke("emails", "list", "--template", "cron_job_activity", "--json"))["rows"]
    body = ok(invoke("emails", "show", digest[0]["id"])).stdout
    assert "MANUAL CANCELLATION REQUIRED" in body and f"service #{gone_service} no longer exists" in body
    assert as_json(invoke("status", "--json"), code=1)["requests_failed"] == len(ids)
    shown = as_json(invoke("requests", "show", ids[0], "--json"))
    assert shown["status"] == "failed" and "no longer exists" in shown["last_error"] and shown["service"] is None
    assert f"service     {gone_service} no longer exists" in ok(invoke("requests", "show", ids[0])).stdout
    one_line_error(invoke("emails", "preview", "cancellation_request_confirmation", "--request", ids[0]),
                   f"request {ids[0]}: its service, client or product no longer exists")
    # The service whose client was deleted can still be looked at.
    shown = ok(invoke("services", "show", got[ids[1]].service_id)).stdout
    assert f"#{gone_client} (deleted outside cancelproc)" in shown
    assert "(deleted outside cancelproc)" in ok(invoke("services", "list")).stdout
    # Staff may retry it (the service restored from a backup, say); until then it fails again, saying why.
    ok(invoke("requests", "retry", ids[0]))
    with freeze_time(NOW, tick=True):
        assert as_json(invoke("requests", "process", ids[0], "--json"), code=1)["failed"] == 1
    # Nothing left to do, and nothing is failed twice.
    with freeze_time("2026-11-27T02:00:00Z", tick=True):
        again = as_json(invoke("run", "--json"))
    assert (again["due"], again["failed"]) == (0, 0)
