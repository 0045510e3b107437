"""Per-request hooks in threads (hook_concurrency): only when they wait, order kept."""

from __future__ import annotations

import time
from pathlib import Path

from processor.config import Settings
from processor.db import Database
from processor.hooks import load_hooks
from processor.run import Runner, RunOptions
from tests import factories

D = __import__("datetime").date(2026, 11, 26)


def registry(tmp_path: Path, seconds: float):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "api.py").write_text(
        "import threading, time\n"
        "from processor.hooks import add_hook\n"
        "CALLS = []\n"
        "@add_hook('TerminateAccount')\n"
        "def terminate(request_id):\n"
        f"    time.sleep({seconds})\n"
        "    CALLS.append((request_id, threading.current_thread().name))\n")
    hooks = load_hooks(tmp_path / "hooks", entry_points=False)
    return hooks, hooks.of("TerminateAccount")[0].fn.__globals__["CALLS"]


def seed(db: Database, n: int) -> list[int]:
    with db.session.begin() as s:
        return [factories.request(s, factories.service(s)).id for _ in range(n)]


def run(db: Database, settings: Settings, now, hooks, concurrency: int):
    settings = settings.model_copy(update={"hook_concurrency": concurrency, "chunk_size": 20})
    return Runner(db, settings, clock=lambda: now, hooks=hooks).run(RunOptions(as_of=D))


def test_slow_hooks_of_different_requests_wait_side_by_side(db, settings, now, tmp_path):
    ids = seed(db, 40)
    hooks, calls = registry(tmp_path, 0.05)
    started = time.perf_counter()
    summary = run(db, settings, now, hooks, concurrency=10)
    elapsed = time.perf_counter() - started
    assert summary.completed == 40
    assert sorted(r for r, _ in calls) == ids  # each once
    assert elapsed < 40 * 0.05 / 2  # one at a time would take 2 s
    assert len({name for _, name in calls}) > 5  # in threads, after the first few


def test_quick_hooks_stay_in_the_main_thread(db, settings, now, tmp_path):
    seed(db, 30)
    hooks, calls = registry(tmp_path, 0)
    summary = run(db, settings, now, hooks, concurrency=10)
    assert summary.completed == 30 and {name for _, name in calls} == {"MainThread"}
