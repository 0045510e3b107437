"""`run` plus `run --join` (PostgreSQL): each process's summary says its own share and the
run's total, and which one its top-level counts are."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from processor.config import Settings
from processor.db import open_database
from processor.run import Runner, RunOptions
from tests import factories

NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


def test_a_joined_run_reports_each_share_and_the_total(pg_server, tmp_path: Path):
    url = pg_server.new_database()
    db = open_database(url)
    try:
        with db.session.begin() as s:
            for _ in range(5):
                factories.request(s, factories.service(s))
        settings = Settings(database_url=url, app_root=tmp_path, chunk_size=1, email={"staff_address": ""})
        joined = []
        main = Runner(db, settings, clock=lambda: NOW)

        def after_first_chunk(n: int) -> None:
            # Between the main process's chunks (nothing locked), another process joins and
            # takes every request left; the main process then finds nothing more.
            if not joined:
                joined.append(Runner(db, settings, clock=lambda: NOW).join())

        main.progress = after_first_chunk
        summary = main.run(RunOptions(as_of=NOW.date()))
        worker = joined[0].as_dict()
        mine = summary.as_dict()
        assert (mine["counts_are"], mine["due"], mine["completed"]) == ("run_total", 5, 5)
        assert (mine["this_process"]["due"], mine["run_total"]["due"]) == (1, 5)
        assert (worker["counts_are"], worker["due"], worker["completed"]) == ("this_process", 4, 4)
        assert (worker["this_process"]["due"], worker["run_total"]["due"]) == (4, 5)
        assert mine["this_process"]["due"] + worker["this_process"]["due"] == mine["run_total"]["due"]
    finally:
        db.dispose()
