"""The PostgreSQL server restarted in the middle of a run (issue 6): the run stops with a
non-zero exit and one clear line, nothing committed is lost, and a rerun finishes the
work with every request applied once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from processor.db import open_database, upgrade
from processor.models import AuditEntry, CancellationRequest, OutboxEmail, RequestStatus
from tests.cli_helpers import error_text
from tests.conftest import throwaway_pg
from tests.test_workers import env, seed  # the workers' data and slow TerminateAccount hook

pytestmark = pytest.mark.slow
N = 2000


@pytest.fixture
def own_server():
    """A server of its own: this test restarts it."""
    with throwaway_pg() as server:
        yield server


def test_a_server_restart_mid_run_loses_nothing_and_a_rerun_finishes(own_server, tmp_path: Path) -> None:
    own_server.admin("CREATE DATABASE faults")
    url = own_server.url("faults")
    db = open_database(url)
    upgrade(db)
    seed(db, N)
    environ = env(url, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "processor", "run"], cwd=tmp_path, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with db.read_session() as s:
            done = s.scalar(select(func.count()).where(CancellationRequest.status == RequestStatus.COMPLETED))
        if done >= N // 5:
            break
        time.sleep(0.05)
    db.dispose()  # our own connections die with the restart too
    own_server.restart()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    last = error_text(err.strip().splitlines()[-1])
    assert last.startswith("error: run 1 stopped: database error:") and "what was committed stays" in last
    with db.read_session() as s:
        committed = s.scalar(select(func.count()).where(CancellationRequest.status == RequestStatus.COMPLETED))
    assert N // 5 <= committed < N  # what was committed before the restart stays
    rerun = subprocess.run([sys.executable, "-m", "processor", "run"], cwd=tmp_path, env=environ,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    with db.read_session() as s:
        assert s.scalar(select(func.count()).where(CancellationRequest.status == RequestStatus.COMPLETED)) == N
        cancelled = s.execute(select(AuditEntry.entity_id, func.count()).where(
            AuditEntry.entity == "service", AuditEntry.action == "cancelled").group_by(AuditEntry.entity_id)).all()
        assert len(cancelled) == N and {c for _, c in cancelled} == {1}
        assert s.scalar(select(func.count()).where(OutboxEmail.template == "service_cancellation_confirmation")) == N
    db.dispose()
