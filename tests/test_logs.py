"""Logging: JSON lines off a terminal; run_id on every line of a run, request_id on request lines."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import warnings

import structlog

from processor.cli.run import _run_with_progress
from processor.logs import captured_stdout, configure_logging, route_hook_output
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


def test_stdlib_records_are_json_lines_with_the_bound_context():
    """A hook's `logging.getLogger(__name__)`: info is kept (at the configured level), and
    each record is rendered like structlog's own lines, with run_id and request_id."""
    stream = io.StringIO()
    logging.captureWarnings(False)  # an earlier test's capture holds a showwarning of its own test
    configure_logging("info", "json", stream)
    try:
        with structlog.contextvars.bound_contextvars(run_id=5, request_id=9):
            logging.getLogger("my_hooks").info("deprovisioned %s", "site.test")
            logging.getLogger("my_hooks").debug("not at info level")
            warnings.warn("a library warns", UserWarning, stacklevel=1)
            try:
                raise ValueError("no panel")
            except ValueError:
                logging.getLogger("my_hooks").exception("panel call failed")
        configure_logging("info", "json", stream)  # again (each CLI command): still one handler
        logging.getLogger("my_hooks").warning("outside the run")
    finally:
        structlog.reset_defaults()
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["level"], e.get("run_id"), e.get("request_id"), e["logger"]) for e in lines] == [
        ("deprovisioned site.test", "info", 5, 9, "my_hooks"),
        (lines[1]["event"], "warning", 5, 9, "py.warnings"),
        ("panel call failed", "error", 5, 9, "my_hooks"),
        ("outside the run", "warning", None, None, "my_hooks")]
    assert "UserWarning: a library warns" in lines[1]["event"]
    assert "ValueError: no panel" in lines[2]["exception"]


def test_what_hook_files_print_as_they_load_is_captured_while_stdout_is_routed(capsys):
    route_hook_output()
    with captured_stdout() as printed:
        print("from the hook")
    print("from the command")
    assert printed.getvalue() == "from the hook\n"
    assert capsys.readouterr().out == "from the command\n"


def test_what_a_hook_prints_and_logs_is_its_own_in_any_thread(capsys):
    """print() under a hook call is logged line by line as "hook output" naming the hook and
    the request, in the main thread or a worker's; a line left unfinished is logged when
    the next one of another call comes; the command's own prints still reach stdout."""
    from concurrent.futures import ThreadPoolExecutor

    from processor.hooks import HookImpl, HookRegistry
    from processor.hooks.registry import check_signature

    def hook(params):  # an operator's hook, as they write them
        print("deprovisioned", params["request_id"], sep=": ")
        print("no newline", end="")
        logging.getLogger("my_hooks").warning("from the stdlib")

    hooks = HookRegistry()
    hooks.register(HookImpl("ServiceCancelled", hook, 0, "mine.py", 3, 0,
                            check_signature("ServiceCancelled", hook, 0, "mine.py")))
    route_hook_output()
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        hooks.apply("ServiceCancelled", {"request_id": 7})
        with ThreadPoolExecutor(1) as pool:
            pool.submit(hooks.apply, "ServiceCancelled", {"request_id": 8}).result()
        print("from the command")
    finally:
        structlog.reset_defaults()
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    label = "test_what_a_hook_prints_and_logs_is_its_own_in_any_thread.<locals>.hook (mine.py:3)"
    assert [(e["event"], e.get("hook"), e.get("request_id"), e.get("output")) for e in lines] == [
        ("hook output", label, 7, "deprovisioned: 7"),
        ("from the stdlib", None, 7, None),
        ("hook output", label, 8, "deprovisioned: 8"),
        ("from the stdlib", None, 8, None),
        ("hook output", label, 7, "no newline"),  # once the main thread prints something else
    ]
    assert capsys.readouterr().out == "from the command\n"
