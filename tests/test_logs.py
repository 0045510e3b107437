"""Logging: JSON lines off a terminal; run_id on every line of a run, request_id on request lines."""

from __future__ import annotations

import datetime as dt
import io
import json

import structlog

from processor.cli.run import _run_with_progress
from processor.logs import configure_logging
from processor.run import Runner, RunOptions
from tests import factories

D = dt.date(2026, 11, 26)


def test_every_line_of_a_run_carries_the_run_id(db, settings, now):
    stream = io.StringIO()
    configure_logging("debug", "auto", stream)  # StringIO is not a terminal: JSON lines
    try:
        with db.session.begin() as s:
            good = factories.request(s, factories.service(s)).id
            bad = factories.request(s, factories.service(s, email="")).id
        summary = Runner(db, settings, clock=lambda: now).run(RunOptions(as_of=D))
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines and all(line["run_id"] == summary.run_id for line in lines)
    events = {line["event"] for line in lines}
    assert {"run started", "chunk written", "run finished"} <= events
    by_request = {line["request_id"]: line for line in lines if "request_id" in line}
    assert good not in by_request  # completions are in the audit log and the chunk line
    chunk = next(line for line in lines if line["event"] == "chunk written")
    assert (chunk["due"], chunk["completed"], chunk["retrying"]) == (2, 1, 1)
    assert (chunk["first_request_id"], chunk["last_request_id"]) == (good, bad)
    assert by_request[bad]["event"] == "request attempt failed; will retry"
    assert by_request[bad]["level"] == "warning" and "no valid email address" in by_request[bad]["error"]


def test_console_format_on_request():
    stream = io.StringIO()
    configure_logging("info", "console", stream)
    try:
        structlog.get_logger().info("hello", run_id=7)
    finally:
        structlog.reset_defaults()
    assert "hello" in stream.getvalue() and "run_id=7" in stream.getvalue()
    assert not stream.getvalue().startswith("{")


def test_progress_bar_only_above_the_threshold(db, settings, now, capsys):
    with db.session.begin() as s:
        for _ in range(301):
            factories.request(s, factories.service(s))
    runner = Runner(db, settings, clock=lambda: now)
    summary = _run_with_progress(runner, RunOptions(as_of=D), show_progress=True)
    assert summary.completed == 301
    assert "cancelling" in capsys.readouterr().err
    with db.session.begin() as s:
        factories.request(s, factories.service(s))
    _run_with_progress(runner, RunOptions(as_of=D), show_progress=True)
    assert "cancelling" not in capsys.readouterr().err
