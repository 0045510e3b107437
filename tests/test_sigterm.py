"""SIGTERM at random moments into real `cancelproc run` and `cancelproc schedule` processes.

Issue 12: a handler that logged (structlog's write lock), or that called threading.Event.set()
(the Event's lock) could wait for ever on a lock held by the very code the signal interrupted.
Here well over 100 SIGTERMs land in real processes, each at a moment drawn from a seeded RNG:
after a random number of log lines (the signal then meets a process in the middle of logging:
the run logs several lines per request) plus a random delay.

Whatever the moment, every process exits within a generous deadline (a hang fails the test
with every thread's stack, dumped by faulthandler on SIGABRT); a run that was under way is
recorded stopped, never left running; no lease is left; the next run in the same database
starts, and the last one applies what is left. The assertions hold for every moment, so none
depends on timing. Lanes of processes run side by side to keep the test short.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_helpers import process_env

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]

SEED = 1212
RUN_LANES, RUNS_PER_LANE = 2, 25
SCHEDULE_LANES, SCHEDULES_PER_LANE = 2, 25
REQUESTS_PER_LANE = 900
CHUNK_SIZE = 5
EXIT_DEADLINE = 60.0  # seconds from the SIGTERM to the exit: generous, so a loaded machine passes
STOPPING = "stopping after the current chunk (signal again to stop at once)"

# Logs through structlog and the stdlib on every request, on top of the traced hook calls
# (CANCELPROC_TRACE_HOOKS=1): the run is in the middle of a log write most of the time.
HOOK = """\
import logging

import structlog
from processor.hooks import add_hook

log = structlog.get_logger("hooks.stress")

@add_hook("TerminateAccount")
def deprovision(request_id):
    log.info("deprovisioning", account=request_id)

@add_hook("ServiceCancelled")
def tell_crm(request_id, days_late):
    logging.getLogger(__name__).info("told the CRM, %s days late", days_late)
"""


@dataclass
class Ended:
    """A process after its SIGTERM: how it exited, what it logged, whether a signal was sent."""

    returncode: int
    log: str
    signalled: bool


@contextmanager
def started(args: list[str], cwd: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A `python -m processor` process in a process group of its own, stdout and stderr into
    one pipe (as cron joins them); whatever happens, nothing of it is left running afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "processor", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def read_until(proc: subprocess.Popen[bytes], log: bytearray, *, lines: int | None, deadline: float) -> bool:
    """Read the process's output into `log` until it holds `lines` lines (None: until the end).
    False when the deadline passed first."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while lines is None or log.count(b"\n") < lines:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                return lines is None
            log += data
    return True


def terminate_at(proc: subprocess.Popen[bytes], lines: int, delay: float) -> Ended:
    """Read the process's log as it writes it; the moment it has written `lines` lines (the
    reader wakes as the writer flushes, so the writer is still inside its log call), wait
    `delay` seconds and send SIGTERM, if it still runs. Then wait for its exit. A process
    that does not exit in time is made to dump its threads' stacks (faulthandler, on SIGABRT)
    and the test fails with them."""
    log = bytearray()
    if not read_until(proc, log, lines=lines, deadline=time.monotonic() + EXIT_DEADLINE):
        pytest.fail(f"{proc.args}: fewer than {lines} log lines in {EXIT_DEADLINE:.0f} s:\n{log.decode()}")
    if delay:
        time.sleep(delay)
    signalled = proc.poll() is None
    if signalled:
        proc.send_signal(signal.SIGTERM)
    if not read_until(proc, log, lines=None, deadline=time.monotonic() + EXIT_DEADLINE):
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER=1: every thread's stack to stderr
        read_until(proc, log, lines=None, deadline=time.monotonic() + 30)
        pytest.fail(f"{' '.join(map(str, proc.args[2:]))} hung: no exit {EXIT_DEADLINE:.0f} s after SIGTERM "
                    f"(sent after {lines} log lines + {delay * 1000:.1f} ms). Its log and stacks:\n"
                    f"{log.decode(errors='replace')[-20000:]}")
    proc.wait(timeout=EXIT_DEADLINE)  # its output is closed: it is exiting
    return Ended(proc.returncode, log.decode(), signalled)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------- the database


def fill(db_path: Path, n: int) -> None:
    """n clients, each with one Active service and one due request (Immediate)."""
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO products (id, name, module) VALUES (1, 'VPS', 'proxmox')")
        db.executemany("INSERT INTO clients (id, first_name, last_name, company_name, email, language, balance) "
                       "VALUES (?, 'C', '', '', ?, 'en', 0)", [(i, f"c{i}@example.test") for i in range(1, n + 1)])
        db.executemany("INSERT INTO services (id, client_id, product_id, domain, status, billing_cycle, amount, "
                       "next_due_date) VALUES (?, ?, 1, 'h', 'Active', 'Monthly', 5, '2026-01-01')",
                       [(i, i) for i in range(1, n + 1)])
        db.executemany("INSERT INTO cancellation_requests (id, service_id, type, reason_code, reason, status, "
                       "created_at, created_by, attempts, note, effective_date) "
                       "VALUES (?, ?, 'Immediate', 'other', '', "
                       "'pending', '2026-01-01 00:00:00', 'test', 0, '', '2026-01-01')",
                       [(i, i) for i in range(1, n + 1)])


def database_state(db_path: Path) -> tuple[list[tuple[int, str, str | None]], int, int]:
    """(runs as (id, status, error), leases held, requests completed)."""
    with sqlite3.connect(db_path) as db:
        runs = db.execute("SELECT id, status, error FROM runs ORDER BY id").fetchall()
        leases = db.execute("SELECT count(*) FROM leases").fetchone()[0]
        done = db.execute("SELECT count(*) FROM cancellation_requests WHERE status = 'completed'").fetchone()[0]
    return runs, leases, done


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `cancelproc init`ed database, copied for each lane."""
    folder = tmp_path_factory.mktemp("migrated")
    done = subprocess.run([sys.executable, "-m", "processor", "init"], cwd=folder, capture_output=True, text=True,
                          env=process_env(f"sqlite:///{folder / 'c.db'}"), timeout=120)
    assert done.returncode == 0, done.stderr
    return folder / "c.db"


def lane_env(folder: Path) -> dict[str, str]:
    return process_env(f"sqlite:///{folder / 'c.db'}", CANCELPROC_CHUNK_SIZE=str(CHUNK_SIZE),
                       CANCELPROC_HOOK_CONCURRENCY="1",  # the main thread logs: the case that hung
                       CANCELPROC_HOOKS_DIR=str(folder / "hooks"), CANCELPROC_TRACE_HOOKS="1",
                       CANCELPROC_EMAIL__SEND_AFTER_RUN="false", CANCELPROC_EMAIL__STAFF_ADDRESS="",
                       PYTHONFAULTHANDLER="1")


# --------------------------------------------------------------------------- the lanes


def moment(rng: random.Random) -> float:
    """The delay after the chosen log line: often none (the signal lands while the process is
    still in the log call that wrote the line), else up to 20 ms (anywhere after it)."""
    return 0.0 if rng.random() < 0.5 else rng.uniform(0, 0.02)


def run_lane(folder: Path, rng: random.Random) -> int:
    """RUNS_PER_LANE runs, each sent SIGTERM at a random moment, then one left to finish.
    Returns how many SIGTERMs met a live process."""
    env = lane_env(folder)
    signals = 0
    for i in range(RUNS_PER_LANE):
        runs_before, _, _ = database_state(folder / "c.db")
        # Mostly while requests are being applied (several log lines each); now and then
        # while it starts (before the handler is installed) or before its first chunk.
        lines = rng.choice((0, 1, 2)) if rng.random() < 0.15 else rng.randint(3, 90)
        with started(["run", "--trigger", "cron"], folder, env) as proc:
            ended = terminate_at(proc, lines, moment(rng))
        signals += ended.signalled
        runs, leases, _ = database_state(folder / "c.db")
        what = f"run {i} (SIGTERM after {lines} lines), exit {ended.returncode}:\n{ended.log[-5000:]}"
        assert leases == 0, what
        assert all(status != "running" for _, status, _ in runs), what
        new = runs[len(runs_before):]
        assert len(new) <= 1, what
        if ended.returncode == -signal.SIGTERM:
            # Killed by the default action: before the handler was in place (no run yet),
            # or after the run was closed.
            assert all(status == "completed" for _, status, _ in new), what
            continue
        log = json_lines(ended.log)  # every line JSON: a signal never cuts one, the summary is one
        events = [line["event"] for line in log]
        assert len(new) == 1, what
        _, status, error = new[0]
        assert [line["status"] for line in log if line["event"] == "run summary"] == [status], what
        stopping = STOPPING in ended.log
        if ended.returncode == 1:
            assert status == "stopped" and stopping and error.startswith("stopped on request after"), what
        else:  # the signal came after the last chunk: the run completed
            assert ended.returncode == 0 and status == "completed" and not stopping, what
            assert "run finished" in events, what
    with started(["run", "--trigger", "cron"], folder, env) as proc:
        log = bytearray()
        finished = read_until(proc, log, lines=None, deadline=time.monotonic() + 300)
        assert finished and proc.wait(timeout=EXIT_DEADLINE) == 0, log.decode()[-5000:]
    runs, leases, done = database_state(folder / "c.db")
    assert runs[-1][1] == "completed", log.decode()[-5000:]
    assert leases == 0 and done == REQUESTS_PER_LANE
    return signals


def schedule_lane(folder: Path, rng: random.Random) -> int:
    """SCHEDULES_PER_LANE `cancelproc schedule --at 03:00`, each sent SIGTERM after 0, 1 or 2
    of its first log lines (mostly 2: it is then about to sleep) and a random delay."""
    env = lane_env(folder)
    signals = 0
    for i in range(SCHEDULES_PER_LANE):
        lines = rng.choices((0, 1, 2), weights=(1, 2, 7))[0]
        with started(["schedule", "--at", "03:00"], folder, env) as proc:
            ended = terminate_at(proc, lines, moment(rng))
        signals += ended.signalled
        what = f"schedule {i} (SIGTERM after {lines} lines), exit {ended.returncode}:\n{ended.log[-5000:]}"
        assert ended.signalled, what  # it sleeps until 03:00: it cannot have ended by itself
        events = [line["event"] for line in json_lines(ended.log)] if ended.returncode == 0 else []
        if '"event": "next run"' in ended.log:  # the handler was in place: a clean stop
            assert ended.returncode == 0 and events[-1] == "scheduler stopped", what
        else:  # SIGTERM before the handler was installed: the default action, at once
            assert ended.returncode in (0, -signal.SIGTERM), what
    runs, leases, _ = database_state(folder / "c.db")
    assert runs == [] and leases == 0
    return signals


def test_sigterm_at_random_moments_never_hangs_and_leaves_nothing_held(tmp_path: Path, migrated: Path) -> None:
    lanes = []
    for k in range(RUN_LANES + SCHEDULE_LANES):
        folder = tmp_path / f"lane{k}"
        (folder / "hooks").mkdir(parents=True)
        (folder / "hooks" / "stress.py").write_text(HOOK)
        shutil.copy(migrated, folder / "c.db")
        if k < RUN_LANES:
            fill(folder / "c.db", REQUESTS_PER_LANE)
        lanes.append((run_lane if k < RUN_LANES else schedule_lane, folder, random.Random(SEED + k)))
    started_at = time.monotonic()
    with ThreadPoolExecutor(len(lanes)) as pool:
        futures = [pool.submit(fn, folder, rng) for fn, folder, rng in lanes]
        signals = [f.result() for f in futures]
    took = time.monotonic() - started_at
    assert sum(signals) >= 100, signals
    print(f"{sum(signals)} SIGTERMs into {RUN_LANES * RUNS_PER_LANE} runs and "
          f"{SCHEDULE_LANES * SCHEDULES_PER_LANE} schedulers in {took:.0f} s")
