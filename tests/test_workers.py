"""Parallel workers on PostgreSQL (real processes): `run --workers N` and `run --join`.

Every test checks the database itself: each due request completed once, each service
cancelled once (one audit row), one email each, and TerminateAccount (counted by a hook
that appends the request id to a file) called once per request when nothing is killed.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, insert, select

from processor.db import Database, open_database
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Client,
    OutboxEmail,
    Product,
    RequestStatus,
    RequestType,
    Run,
    RunStatus,
    Service,
    ServiceStatus,
)
from tests.cli_helpers import error_text, process_env

pytestmark = pytest.mark.slow
N = 3000

HOOK = """\
import os
import time
from processor.hooks import add_hook

@add_hook("TerminateAccount")
def terminate(request_id):
    time.sleep(0.002)  # a little network call
    with open(os.environ["TERMINATED_LOG"], "a") as f:
        f.write(f"{request_id}\\n")
"""


@pytest.fixture
def pg(pg_server, tmp_path: Path) -> tuple[str, Database]:
    url = pg_server.new_database()
    db = open_database(url)
    yield url, db
    db.dispose()


def seed(db: Database, n: int) -> None:
    yesterday = dt.date.today() - dt.timedelta(days=1)
    created = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    with db.engine.begin() as conn:
        product = conn.execute(insert(Product).values(name="VPS 4GB", module="proxmox").returning(Product.id)).scalar()
        conn.execute(insert(Client), [dict(id=i, first_name=f"C{i}", last_name="", company_name="",
                                           email=f"c{i}@example.test", language="en", balance=0)
                                      for i in range(1, n + 1)])
        conn.execute(insert(Service), [dict(id=i, client_id=i, product_id=product, domain=f"h{i}.example.test",
                                            status=ServiceStatus.ACTIVE, billing_cycle="Monthly", amount=5,
                                            next_due_date=yesterday) for i in range(1, n + 1)])
        conn.execute(insert(CancellationRequest), [
            dict(id=i, service_id=i, type=RequestType.END_OF_BILLING_PERIOD, effective_date=yesterday,
                 reason_code="other", reason="",
                 status=RequestStatus.PENDING, created_at=created, created_by="test", attempts=0, note="")
            for i in range(1, n + 1)])


def env(url: str, tmp_path: Path) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "terminate.py").write_text(HOOK)
    return process_env(url, CANCELPROC_CHUNK_SIZE="50", CANCELPROC_LOG_LEVEL="warning",
                       CANCELPROC_HOOKS_DIR=str(hooks), CANCELPROC_HOOK_CONCURRENCY="1",
                       CANCELPROC_EMAIL__SEND_AFTER_RUN="false", TERMINATED_LOG=str(tmp_path / "terminated.log"))


def cancelproc(tmp_path: Path, environ: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "processor", *args], cwd=tmp_path, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_each_applied_once(db: Database, n: int, tmp_path: Path, *, exactly_once_hooks: bool) -> None:
    with db.read_session() as s:
        assert s.scalar(select(func.count()).where(CancellationRequest.status == RequestStatus.COMPLETED)) == n
        assert s.scalar(select(func.count()).where(Service.status == ServiceStatus.CANCELLED)) == n
        audited = s.execute(select(AuditEntry.entity_id, func.count()).where(
            AuditEntry.entity == "service", AuditEntry.action == "cancelled").group_by(AuditEntry.entity_id)).all()
        assert len(audited) == n and {c for _, c in audited} == {1}  # one audit trail per service
        assert s.scalar(select(func.count()).where(  # one email each (and the staff digest)
            OutboxEmail.template == "service_cancellation_confirmation")) == n
        assert s.scalar(select(func.count()).select_from(Run)) == 1
        run = s.scalars(select(Run)).one()
        assert (run.status, run.due, run.completed) == (RunStatus.COMPLETED, n, n)
    calls = collections.Counter(int(x) for x in (tmp_path / "terminated.log").read_text().split())
    assert set(calls) == set(range(1, n + 1))  # TerminateAccount for every request
    if exactly_once_hooks:
        assert max(calls.values()) == 1  # and no request taken by two workers


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_share_a_run_and_apply_each_request_once(pg, tmp_path, workers):
    url, db = pg
    seed(db, N)
    proc = cancelproc(tmp_path, env(url, tmp_path), "run", "--workers", str(workers), "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads(out)  # stdout is the JSON document alone: the workers' output is not in it
    assert (summary["due"], summary["completed"]) == (N, N)
    assert all(json.loads(line) for line in err.splitlines())  # theirs is with the log, JSON too
    assert_each_applied_once(db, N, tmp_path, exactly_once_hooks=True)


def test_a_worker_killed_midway_leaves_its_work_to_the_others(pg, tmp_path):
    url, db = pg
    seed(db, N)
    proc = cancelproc(tmp_path, env(url, tmp_path), "run", "--workers", "3")
    coordinator = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with db.read_session() as s:
            done = s.scalar(select(func.count()).where(CancellationRequest.status == RequestStatus.COMPLETED))
        children = coordinator.children()
        if done >= N // 4 and len(children) == 3:
            break
        time.sleep(0.05)
    victim = coordinator.children()[0]
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "workers ended abnormally" in err
    # Its chunk in flight rolled back and was done again: TerminateAccount at least once.
    assert_each_applied_once(db, N, tmp_path, exactly_once_hooks=False)


def test_a_second_host_joins_the_run_in_progress(pg, tmp_path):
    url, db = pg
    seed(db, N)
    environ = env(url, tmp_path)
    main = cancelproc(tmp_path, environ, "run")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the run is under way
        with db.read_session() as s:
            if s.scalar(select(func.count()).where(CancellationRequest.status == RequestStatus.COMPLETED)):
                break
        time.sleep(0.05)
    joined = cancelproc(tmp_path, dict(environ, CANCELPROC_LOG_LEVEL="info"), "run", "--join")
    j_out, j_err = joined.communicate(timeout=300)
    out, err = main.communicate(timeout=300)
    assert main.returncode == 0, err
    assert joined.returncode == 0, j_err
    assert j_out == ""  # JSON logs (no terminal): the worker's report is its "worker done" log line
    done, = [line for line in map(json.loads, j_err.splitlines()) if line["event"] == "worker done"]
    assert done["run_id"] == 1
    done_by_worker = done["due"]
    assert 0 < done_by_worker < N  # it did a share, not all
    assert_each_applied_once(db, N, tmp_path, exactly_once_hooks=True)


def test_workers_need_postgresql_and_join_needs_a_run(pg, tmp_path):
    url, _ = pg
    sqlite = dict(env(url, tmp_path), CANCELPROC_DATABASE_URL=f"sqlite:///{tmp_path / 'c.db'}")
    subprocess.run([sys.executable, "-m", "processor", "init"], cwd=tmp_path, env=sqlite, check=True,
                   capture_output=True)
    refused = subprocess.run([sys.executable, "-m", "processor", "run", "--workers", "2"], cwd=tmp_path, env=sqlite,
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert error_text(refused.stderr.strip().splitlines()[-1]) == (
        "error: --workers 2: parallel workers need PostgreSQL (database_url); SQLite lets one process write at a time")
    nothing = subprocess.run([sys.executable, "-m", "processor", "run", "--join"], cwd=tmp_path, env=env(url, tmp_path),
                             capture_output=True, text=True)
    assert nothing.returncode == 2
    assert error_text(nothing.stderr.strip().splitlines()[-1]) == "error: no run in progress to join"


def test_limit_and_join_take_no_other_options(pg, tmp_path):
    url, _ = pg
    for args, fragment in ((["--workers", "2", "--limit", "5"], "--limit works with one process, not with --workers"),
                           (["--join", "--workers", "2"], "--join takes no other option")):
        result = subprocess.run([sys.executable, "-m", "processor", "run", *args], cwd=tmp_path,
                                env=env(url, tmp_path), capture_output=True, text=True)
        assert result.returncode == 2 and fragment in error_text(result.stderr.strip().splitlines()[-1])
