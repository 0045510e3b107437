"""`cancelproc schedule` and stopping cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time

from processor.scheduler import next_run, nightly, serve
from tests.cli_helpers import process_env

LONDON = ZoneInfo("Europe/London")


def test_the_job_fires_at_the_local_times_across_a_dst_change() -> None:
    fired: list[dt.datetime] = []
    # Europe/London moves from GMT to BST on 2027-03-28 at 01:00 UTC.
    with freeze_time("2027-03-26 12:00:00") as clock:
        scheduler = nightly(["02:05", "14:30"], "Europe/London", lambda: fired.append(dt.datetime.now(dt.UTC)))
        assert next_run(scheduler, LONDON) == dt.datetime(2027, 3, 26, 14, 30, tzinfo=LONDON)
        for _ in range(4 * 24 * 12):  # four days in 5-minute steps
            clock.tick(dt.timedelta(minutes=5))
            scheduler.run_pending()
    local = [t.astimezone(LONDON).strftime("%m-%d %H:%M %Z") for t in fired]
    assert local == ["03-26 14:30 GMT", "03-27 02:05 GMT", "03-27 14:30 GMT", "03-28 02:05 BST", "03-28 14:30 BST",
                     "03-29 02:05 BST", "03-29 14:30 BST", "03-30 02:05 BST"]
    assert [t.strftime("%H:%M") for t in fired[1::2]] == ["02:05", "01:05", "01:05", "01:05"]  # UTC moved


def test_serve_runs_until_asked_to_stop() -> None:
    stop = threading.Event()
    scheduler = nightly(["02:05"], "UTC", lambda: None)
    thread = threading.Thread(target=serve, args=(scheduler, stop, dt.UTC), kwargs={"longest_sleep": 0.1})
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def env_for(db_path: Path, tmp_path: Path, **more: str) -> dict[str, str]:
    return process_env(f"sqlite:///{db_path}", **more)


def cancelproc(tmp_path: Path, environ: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "processor", *args], cwd=tmp_path, env=environ, capture_output=True,
                          text=True, **kwargs)


@pytest.mark.slow
def test_the_scheduler_logs_its_next_run_and_stops_on_sigterm(tmp_path: Path) -> None:
    environ = env_for(tmp_path / "c.db", tmp_path)
    assert cancelproc(tmp_path, environ, "init").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "processor", "schedule", "--at", "03:00"], cwd=tmp_path,
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline() + proc.stderr.readline()
    assert '"event": "scheduler started"' in line and '"event": "next run"' in line and "T03:00:00+00:00" in line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and '"event": "scheduler stopped"' in err


HOOK = """\
import time
from processor.hooks import add_hook

@add_hook("TerminateAccount")
def slow(request_id):
    time.sleep(0.01)
"""


@pytest.mark.slow
def test_sigterm_stops_a_run_after_its_chunk_and_releases_the_lease(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "slow.py").write_text(HOOK)
    db_path = tmp_path / "c.db"
    environ = env_for(db_path, tmp_path, CANCELPROC_CHUNK_SIZE="20", CANCELPROC_HOOK_CONCURRENCY="1",
                      CANCELPROC_HOOKS_DIR=str(tmp_path / "hooks"))
    assert cancelproc(tmp_path, environ, "init").returncode == 0
    n = 400
    with sqlite3.connect(db_path) as db:  # n due requests
        db.execute("INSERT INTO products (id, name, module) VALUES (1, 'VPS', 'proxmox')")
        db.executemany("INSERT INTO clients (id, first_name, last_name, company_name, email, language, balance) "
                       "VALUES (?, 'C', '', '', ?, 'en', 0)", [(i, f"c{i}@example.test") for i in range(1, n + 1)])
        db.executemany("INSERT INTO services (id, client_id, product_id, domain, status, billing_cycle, amount, "
                       "next_due_date) VALUES (?, ?, 1, 'h', 'Active', 'Monthly', 5, '2026-01-01')",
                       [(i, i) for i in range(1, n + 1)])
        db.executemany("INSERT INTO cancellation_requests (id, service_id, type, reason_code, reason, status, "
                       "created_at, created_by, attempts, note, effective_date) "
                       "VALUES (?, ?, 'End of Billing Period', 'other', '', "
                       "'pending', '2026-01-01 00:00:00', 'test', 0, '', '2026-01-01')",
                       [(i, i) for i in range(1, n + 1)])
    proc = subprocess.Popen([sys.executable, "-m", "processor", "run"], cwd=tmp_path, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as db:
            done = db.execute("SELECT count(*) FROM cancellation_requests WHERE status = 'completed'").fetchone()[0]
        if done >= 60:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    with sqlite3.connect(db_path) as db:
        status, error = db.execute("SELECT status, error FROM runs").fetchone()
        done = db.execute("SELECT count(*) FROM cancellation_requests WHERE status = 'completed'").fetchone()[0]
        leases = db.execute("SELECT count(*) FROM leases").fetchone()[0]
    assert status == "stopped" and error.startswith("stopped on request after")
    assert leases == 0 and done % 20 == 0 and 60 <= done < n  # whole chunks; the rest left for the next run
    again = cancelproc(tmp_path, environ, "run", timeout=120)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM cancellation_requests WHERE status = 'completed'").fetchone()[0] == n


def test_the_signal_handler_only_sets_a_flag_and_the_loop_logs() -> None:
    """A handler that logs can wait for ever on the logger's lock, held by the very code the
    signal interrupted (a structlog write): the handler sets a flag, the polling loop logs."""
    import structlog

    from processor.cli.run import StopOnSignal

    stop = StopOnSignal()
    with stop, structlog.testing.capture_logs() as logs:
        assert stop() is False and stop.wait(0) is False
        stop._handle(signal.SIGTERM, None)
        assert logs == [] and stop.is_set()
        assert stop() is True and stop() is True
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            stop._handle(signal.SIGTERM, None)
    assert [(e["event"], e["signal"]) for e in logs] == [
        ("stopping after the current chunk (signal again to stop at once)", "SIGTERM")]


def test_a_real_signal_wakes_the_sleeping_scheduler_at_once() -> None:
    """`wait` sleeps on the handler's pipe: a SIGTERM ends a 60-second sleep at once, with no
    threading.Event in between (its set() in a handler can wait for ever on the Event's lock
    when the signal lands inside Event.wait)."""
    from processor.cli.run import StopOnSignal

    stop = StopOnSignal()
    with stop:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        started = time.monotonic()
        try:
            assert stop.wait(60) is True
        finally:
            timer.cancel()
        assert time.monotonic() - started < 30 and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was
