"""The log as operators get it (issue 12, item 4), from the real CLI in real processes.

* Under cron (the crontab line through /bin/sh, stdout and stderr appended to one file, no
  terminal) every line of the file is one JSON object: the run's summary is one more event,
  a hook's stdlib `logging` comes out as JSON with run_id and request_id, and what a hook
  prints is a "hook output" event, never bare text.
* `run --json`: stdout is one JSON document, even with a hook that prints and logs; the log
  is on stderr.
* On a terminal (a real pty) a person gets the readable log and the summary table.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import process_env

pytestmark = pytest.mark.slow

# Logs every way a hook author might: the stdlib (info is not dropped, warning is no bare
# line), structlog, and print() (at load time and in calls).
HOOK = """\
import logging

import structlog
from processor.hooks import add_hook

log = logging.getLogger(__name__)
print("hook file loaded")

@add_hook("TerminateAccount")
def deprovision(request_id, service):
    print(f"deprovisioning {service['domain']}")
    log.info("deprovisioned %s", service["domain"])
    structlog.get_logger("hooks").info("told the panel", domain=service["domain"])

@add_hook("ServiceCancelled")
def tell_crm(request_id):
    log.warning("CRM did not answer for request %s", request_id)
"""
N = 4


def app_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An initialised app folder with N due requests (one of them to a client without an
    email address: it fails and is retried) and the hook above; the environment of a
    process started there, with the log format left to its default (auto)."""
    app = tmp_path / "app"
    (app / "hooks").mkdir(parents=True)
    (app / "var" / "log").mkdir(parents=True)
    (app / "hooks" / "logging_hook.py").write_text(HOOK)
    env = process_env(f"sqlite:///{app / 'var' / 'c.db'}", CANCELPROC_HOOKS_DIR=str(app / "hooks"))
    del env["CANCELPROC_LOG_FORMAT"]
    done = subprocess.run([sys.executable, "-m", "processor", "init"], cwd=app, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(app / "var" / "c.db") as db:
        db.execute("INSERT INTO products (id, name, module) VALUES (1, 'VPS', 'proxmox')")
        db.executemany("INSERT INTO clients (id, first_name, last_name, company_name, email, language, balance) "
                       "VALUES (?, 'C', '', '', ?, 'en', 0)",
                       [(i, "" if i == N else f"c{i}@example.test") for i in range(1, N + 1)])
        db.executemany("INSERT INTO services (id, client_id, product_id, domain, status, billing_cycle, amount, "
                       "next_due_date) VALUES (?, ?, 1, ?, 'Active', 'Monthly', 5, '2026-01-01')",
                       [(i, i, f"site{i}.example.test") for i in range(1, N + 1)])
        db.executemany("INSERT INTO cancellation_requests (id, service_id, type, reason_code, reason, status, "
                       "created_at, created_by, attempts, note, effective_date) "
                       "VALUES (?, ?, 'Immediate', 'other', '', "
                       "'pending', '2026-01-01 00:00:00', 'test', 0, '', '2026-01-01')",
                       [(i, i) for i in range(1, N + 1)])
    return app, env


def cron(app: Path, env: dict[str, str], command: str) -> int:
    """`command` as the crontab line runs it: through /bin/sh, in the app folder, stdout and
    stderr appended to var/log/cancelproc.log, no terminal."""
    line = f"cd {shlex.quote(str(app))} && {command} >>var/log/cancelproc.log 2>&1"
    return subprocess.run(["/bin/sh", "-c", line], env=env, stdin=subprocess.DEVNULL, timeout=300).returncode


def by_event(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == event]


def test_every_line_of_the_cron_log_is_one_json_object(tmp_path: Path) -> None:
    app, env = app_folder(tmp_path)
    cancelproc = f"{shlex.quote(sys.executable)} -m processor"
    assert cron(app, env, f"{cancelproc} run --trigger cron") == 1  # one request failed: exit 1
    assert cron(app, env, f"{cancelproc} emails send") == 0
    text = (app / "var" / "log" / "cancelproc.log").read_text()
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"line {number} of the cron log is not JSON: {line!r}\n{text}")
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)

    summary, = by_event(lines, "run summary")
    assert (summary["due"], summary["completed"], summary["retrying"]) == (N, N - 1, 1)
    assert summary["status"] == "completed_with_failures"
    assert summary["level"] == "warning" and summary["failures"][0]["request_id"] == N
    run_id = summary["run_id"]
    delivery, = by_event(lines, "delivery summary")
    assert delivery["level"] == "info" and delivery["queued"] == 0

    # The hook's stdlib records: JSON, with the run's and the request's ids and the logger's name.
    infos = by_event(lines, "deprovisioned site1.example.test")
    assert [(e["level"], e["run_id"], e["request_id"], e["logger"]) for e in infos] == [
        ("info", run_id, 1, "cancelproc_hooks.logging_hook")]
    warned = [e for e in lines if e["event"].startswith("CRM did not answer")]
    assert sorted(e["request_id"] for e in warned) == list(range(1, N))
    assert all(e["level"] == "warning" and e["run_id"] == run_id for e in warned)
    told = by_event(lines, "told the panel")
    assert sorted(e["request_id"] for e in told) == list(range(1, N))  # request N failed before
    # What it printed: log events too, the request's among them.
    printed = by_event(lines, "hook output")
    assert printed[0]["output"] == "hook file loaded"
    calls = {e["request_id"]: e["output"] for e in printed if "request_id" in e}
    assert calls == {i: f"deprovisioning site{i}.example.test" for i in range(1, N)}


def test_json_stdout_is_one_document_whatever_the_hooks_print_or_log(tmp_path: Path) -> None:
    app, env = app_folder(tmp_path)
    done = subprocess.run([sys.executable, "-m", "processor", "run", "--json"], cwd=app, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)  # the whole of stdout: one document
    assert (summary["due"], summary["completed"], summary["retrying"]) == (N, N - 1, 1)
    log = [json.loads(line) for line in done.stderr.splitlines()]
    assert {"hook output", "told the panel", "deprovisioned site1.example.test"} <= {e["event"] for e in log}
    assert "run summary" not in {e["event"] for e in log}  # --json said it on stdout


def read_pty(master: int, proc: subprocess.Popen[bytes], deadline: float) -> str:
    out = bytearray()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    return out.decode(errors="replace")


def test_a_terminal_gets_the_readable_log_and_the_summary_table(tmp_path: Path) -> None:
    app, env = app_folder(tmp_path)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "processor", "run"], cwd=app, env=dict(env, TERM="dumb"),
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        screen = read_pty(master, proc, time.monotonic() + 300)
        assert proc.wait(timeout=60) == 1, screen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    screen = re.sub(r"\x1b\[[0-9;]*m", "", screen).replace("\r\n", "\n")
    assert not [line for line in screen.splitlines() if line.startswith("{")], screen  # no JSON on a terminal
    for line in (f"due                       {N}", f"cancelled                 {N - 1}",
                 "failed, will retry        1", "status                    completed_with_failures"):
        assert line in screen, screen
    assert "deprovisioned site1.example.test" in screen and "run finished" in screen  # the readable log
    assert f"request {N} (service {N}): " in screen  # the failure, named


def test_an_error_in_the_cron_log_is_one_json_line_too(tmp_path: Path) -> None:
    """Refused before the settings load (a bad variable) and after (a date in the future):
    the one error line is a JSON object with the text and the exit code, as the log is."""
    app, env = app_folder(tmp_path)
    cancelproc = f"{shlex.quote(sys.executable)} -m processor"
    assert cron(app, dict(env, CANCELPROC_BUSINESS_TIMEZONE="Mars/Olympus"), f"{cancelproc} run") == 2
    assert cron(app, env, f"{cancelproc} run --as-of 2999-01-01") == 2
    lines = [json.loads(line) for line in (app / "var" / "log" / "cancelproc.log").read_text().splitlines()]
    assert [(e["event"], e["level"], e["exit_code"]) for e in lines] == [("error", "error", 2), ("error", "error", 2)]
    assert "business_timezone" in lines[0]["error"] and "Mars/Olympus" in lines[0]["error"]
    assert lines[1]["error"].startswith("--as-of 2999-01-01 is in the future")
