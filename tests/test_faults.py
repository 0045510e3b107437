"""Faults from outside: the database file locked by another program (issue 6)."""

from __future__ import annotations

import sqlite3
import time

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from processor.models import CancellationRequest, RequestStatus, Run
from tests import factories
from tests.cli_helpers import ok, one_line_error

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
    from processor.runner import RunOptions, Runner

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
    # Long overdue: applied, and how late is recorded (from the day it was made, not 1970).
    assert got[ancient.id].status is RequestStatus.COMPLETED and got[ancient.id].days_late == 6
    assert got[far.id].status is RequestStatus.PENDING  # not due until 9999: left alone
    # No hook handles its module: nothing external to do, so it is cancelled (docs/hooks.md).
    assert got[module.id].status is RequestStatus.COMPLETED
    assert got[no_address.id].status is RequestStatus.PENDING
    assert "has no valid email address" in got[no_address.id].last_error
    assert (summary.due, summary.completed, summary.retrying) == (3, 2, 1)
