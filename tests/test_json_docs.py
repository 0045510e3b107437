"""docs/json.md is the contract of every list and show command's --json: this test runs
each one on data where every part of its output is there (an add-on, an invoice, a veto,
a late request, emails, a hook) and fails when a documented key is missing from the
output, an undocumented one appears, or a value is not of its documented type.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from processor.db import Database
from processor.models import CancellationRequest, RequestStatus, RequestType, ServiceAddon, ServiceStatus
from tests.cli_helpers import Invoke, as_json, ok
from tests.factories import support_desk
from tests.json_shapes import TYPES, fits, observe
from tests.test_reports import hand_computed_dataset

DOC = Path(__file__).resolve().parents[1] / "docs" / "json.md"
NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
# Vetoes the requests of shop.alice.test (a failure of the run, a hook outcome); the
# others complete (request 3 a day late).
HOOK = ("from processor.hooks import add_hook\n\n\n"
        "@add_hook('PreModuleTerminate')\n"
        "def hold(service):\n"
        "    return {'abortcmd': True, 'reason': 'on hold'} if service['domain'] == 'shop.alice.test' else None\n")

# What each documented command is run with; the paths seen over all its runs are compared.
RUNS: dict[str, list[list[str]]] = {
    "runs list": [["runs", "list"]],
    "runs show": [["runs", "show", "last"]],
    "services list": [["services", "list"]],
    "services show": [["services", "show", "1"], ["services", "show", "3"]],
    "requests list": [["requests", "list"]],
    "requests show": [["requests", "show", "1"], ["requests", "show", "3"], ["requests", "show", "4"]],
    "emails list": [["emails", "list"]],
    "emails show": [["emails", "show", "1"]],
    "hooks list": [["hooks", "list"]],
    "find": [["find", "alice"]],
}
# The reports, on the dataset of tests/test_reports.py.
REPORT_RUNS: dict[str, list[str]] = {
    "report reasons": ["report", "reasons", "--since", "2026-09-01"],
    "report runs": ["report", "runs", "--since", "2026-09-01"],
    "report html": ["report", "html", "--out", "churn.html", "--since", "2026-09-01"],
}


def documented() -> dict[str, dict[str, str]]:
    """docs/json.md: under each '## `cancelproc COMMAND --json`' heading, a table of
    | `path` | type | meaning |."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^## `cancelproc (.+) --json`", line)
        if heading:
            current = sections.setdefault(heading.group(1), {})
            continue
        row = re.match(r"^\| `([^`]+)` \| ([a-z|]+) \|", line)
        if row and current is not None:
            assert row.group(1) not in current, f"docs/json.md: {row.group(1)} twice"
            assert all(t in (*TYPES, "null") for t in row.group(2).split("|")), f"docs/json.md: type {row.group(2)}"
            current[row.group(1)] = row.group(2)
    return sections


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as frozen_time:
        yield frozen_time


def _problems(command: str, outputs: list[Any], doc: dict[str, str]) -> list[str]:
    """What differs between the documented paths of `command` and those seen in its outputs."""
    seen: dict[str, set[str]] = {}
    for output in outputs:
        observe(output, seen)
    problems = [f"{command}: `{path}` is documented but not in the output" for path in doc if path not in seen]
    problems += [f"{command}: `{path}` ({'|'.join(sorted(kinds))}) is in the output but not documented"
                 for path, kinds in seen.items() if path not in doc]
    problems += [f"{command}: `{path}` is {k}, documented as {doc[path]}"
                 for path, kinds in seen.items() if path in doc for k in kinds if not fits(k, doc[path])]
    return problems


def test_every_list_and_show_json_is_as_documented(invoke: Invoke, db: Database, tmp_path: Path) -> None:
    support_desk(db, NOW)
    with db.session.begin() as s:  # request 4: for one add-on of service 2 (not due)
        addon = ServiceAddon(external_id="AD-2", service_id=2, name="SSL", status=ServiceStatus.ACTIVE,
                             next_due_date=dt.date(2026, 12, 10))
        s.add(addon)
        s.flush()
        s.add(CancellationRequest(service_id=2, addon_id=addon.id, type=RequestType.END_OF_BILLING_PERIOD,
                                  effective_date=addon.next_due_date, reason_code="too_expensive", reason="",
                                  status=RequestStatus.PENDING,
                                  created_at=NOW - dt.timedelta(days=1), created_by="test"))
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "hold.py").write_text(HOOK)
    ok(invoke("run"), code=1)
    docs = documented()
    assert sorted(docs) == sorted([*RUNS, *REPORT_RUNS]), "docs/json.md documents other commands than these tests run"
    problems = []
    for command, runs in RUNS.items():
        problems += _problems(command, [as_json(invoke(*args, "--json")) for args in runs], docs[command])
    assert not problems, "\n".join(problems)


def test_every_report_json_is_as_documented(invoke: Invoke, db: Database, tmp_path: Path) -> None:
    """On the dataset of tests/test_reports.py: cancellations, a no-op, a request resolved by
    hand and a billing cycle the report does not know."""
    # The dataset's nights freeze the clock themselves, inside this file's frozen one.
    hand_computed_dataset(invoke, db)
    docs = documented()
    problems = []
    with freeze_time(NOW):
        for command, args in REPORT_RUNS.items():
            problems += _problems(command, [as_json(invoke(*args, "--json"))], docs[command])
    assert not problems, "\n".join(problems)
