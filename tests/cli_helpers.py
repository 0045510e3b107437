"""Checking `cancelproc` results from click's CliRunner (the `invoke` fixture is in conftest)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import Result

Invoke = Callable[..., Result]
REPO = Path(__file__).resolve().parents[1]


def process_env(database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a real `python -m processor` process: the test runner's own
    CANCELPROC_* variables dropped, this database, JSON logs, this checkout importable,
    then `settings` (CANCELPROC_... variables, or any other)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=database_url, CANCELPROC_LOG_FORMAT="json",
               PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    env.update(settings)
    return env


def error_text(line: str) -> str:
    """An error line of a process whose log is JSON (cron, systemd: no terminal) as the
    person's line reads ("error: ..."): it is one JSON object with the same text."""
    record = json.loads(line)
    assert record["level"] == "error", record
    return f"{record['event']}: {record['error']}"


def ok(result: Result, code: int = 0) -> Result:
    assert result.exit_code == code, (
        f"exit {result.exit_code} (expected {code})\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    assert "Traceback" not in result.output
    return result


def as_json(result: Result, code: int = 0) -> Any:
    return json.loads(ok(result, code).stdout)


def one_line_error(result: Result, *fragments: str, code: int = 2) -> str:
    """The command failed with `code` and exactly one 'error: ...' line on stderr, no traceback."""
    assert result.exit_code == code, (
        f"exit {result.exit_code} (expected {code})\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def uncomment_setting(config: Path, section: str, key: str, value: str) -> None:
    """Set a key the way an operator does: uncomment its line in the file init wrote."""
    lines = config.read_text().splitlines()
    current = ""
    for n, line in enumerate(lines):
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and re.match(rf"# {key} = ", line):
            lines[n] = f"{key} = {value}"
            config.write_text("\n".join(lines) + "\n")
            return
    raise AssertionError(f"no commented line for {section or 'top level'} {key} in {config}")
