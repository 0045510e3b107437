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
