"""Per-request hooks in threads (hook_concurrency): only when they wait, order kept."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from processor.config import Settings
from processor.db import Database
from processor.hooks import load_hooks
from processor.run import Runner, RunOptions
from processor.run.decide import ChunkDecider
from processor.run.outcome import Action, Outcome
from tests import factories

D = __import__("datetime").date(2026, 11, 26)

# TerminateAccount that waits as a network call does: slow in the main thread (the run
# times its first requests and turns to threads), and in threads the first TOGETHER calls
# wait for one another: they pass only if that many run at the same time. One at a time,
# the first would wait a minute, give up and be recorded in BROKEN. No timing is assumed.
WAITING_HOOK = """\
import threading, time
from processor.hooks import add_hook
CALLS, BROKEN, THREADED = [], [], []
TOGETHER = threading.Barrier(5)
LOCK = threading.Lock()

@add_hook('TerminateAccount')
def terminate(request_id):
    if threading.current_thread() is threading.main_thread():
        time.sleep(0.05)
    else:
        with LOCK:
            THREADED.append(request_id)
            first = len(THREADED) <= TOGETHER.parties
        if first:
            try:
                TOGETHER.wait(timeout=60)
            except threading.BrokenBarrierError:
                BROKEN.append(request_id)
    CALLS.append((request_id, threading.current_thread().name))
"""


def seed(db: Database, n: int) -> list[int]:
    with db.session.begin() as s:
        return [factories.request(s, factories.service(s)).id for _ in range(n)]


def test_slow_hooks_of_different_requests_wait_side_by_side(db: Database, settings: Settings, now, tmp_path: Path):
    ids = seed(db, 40)
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "api.py").write_text(WAITING_HOOK)
    hooks = load_hooks(tmp_path / "hooks", entry_points=False)
    state = hooks.of("TerminateAccount")[0].fn.__globals__
    settings = settings.model_copy(update={"hook_concurrency": 10, "chunk_size": 20})
    summary = Runner(db, settings, clock=lambda: now, hooks=hooks).run(RunOptions(as_of=D))
    assert summary.completed == 40
    assert sorted(r for r, _ in state["CALLS"]) == ids  # each once
    assert state["BROKEN"] == []  # five hooks were waiting at the same time
    assert len({name for _, name in state["CALLS"]}) > 5  # in threads, after the first few


def decide_in(names: list[str]):
    def decide(row: int) -> Outcome:
        names.append(threading.current_thread().name)
        return Outcome(row, row, Action.CANCEL)
    return decide


@pytest.mark.parametrize(("seconds_per_request", "threaded"), [(0.0001, False), (0.01, True)])
def test_threads_only_once_the_first_requests_of_a_chunk_are_slow(seconds_per_request: float, threaded: bool):
    """The probe's measure (a clock that advances as given per reading): quick requests stay
    in the main thread, slow ones go to threads from then on; the order of outcomes is kept."""
    ticks = itertools.count()
    names: list[str] = []
    with ThreadPoolExecutor(4) as pool:
        chunks = ChunkDecider(decide_in(names), pool, 4,
                              timer=lambda: next(ticks) * seconds_per_request * ChunkDecider.PROBE)
        first, second = chunks(list(range(10))), chunks(list(range(10, 15)))
    assert [o.request_id for o in first + second] == list(range(15))
    assert chunks.threaded is threaded
    assert (set(names) != {"MainThread"}) is threaded
    assert names[:ChunkDecider.PROBE] == ["MainThread"] * ChunkDecider.PROBE
