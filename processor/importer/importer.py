"""Importing one file: read, validate, plan and write it in one transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from processor.config import Settings
from processor.db import Database, retrying_transaction
from processor.errors import InputError
from processor.importer.plan import Conflict, plan_rows
from processor.importer.read import read_file
from processor.importer.validate import KIND_SPECS, KINDS, RowError, check_columns, infer_kind, validate_rows
from processor.importer.write import write_plan


@dataclass
class FileReport:
    """What importing one file did."""

    path: Path
    kind: str
    inserted: int
    updated: int
    unchanged: int
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.inserted + self.updated + self.unchanged + len(self.conflicts)


class ImportRejected(InputError):
    """A file had bad rows; nothing of it was written. ``errors`` lists every one, in line order."""

    def __init__(self, errors: Sequence[RowError]) -> None:
        self.errors = sorted(errors, key=lambda e: e.line)
        more = len(self.errors) - 1
        super().__init__(str(self.errors[0]) + (f" (and {more} more)" if more else ""))


def import_file(
    db: Database,
    path: Path,
    *,
    settings: Settings,
    now: dt.datetime,
    kind: str | None = None,
    actor: str = "import",
) -> FileReport:
    """Import one file in one transaction; see the package docstring.

    Raises InputError for a file that cannot be read or whose kind or columns are wrong, and
    ImportRejected (an InputError) listing every bad row; in both cases nothing is written.
    """
    path = Path(path)
    if kind is not None and kind not in KIND_SPECS:
        raise InputError(f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})")
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    parsed = read_file(path)
    kind_name = kind or infer_kind(path, parsed.columns)
    spec = KIND_SPECS[kind_name]
    check_columns(path, kind_name, parsed.columns, jsonl=parsed.jsonl)
    rows, errors = validate_rows(path, spec, parsed, settings, now)
    del parsed  # the raw rows: only the validated ones are needed from here on
    # The rows it updates are locked (see plan.py's `_rows_by_external_id`): one that a run's
    # chunk also wants can deadlock, and the loser is rolled back. If that is the import, it
    # is planned and written again, from what is committed by then.
    for attempt in retrying_transaction():
        with attempt, db.session.begin() as s:
            plan = plan_rows(s, path, spec, rows, errors)
            if plan.errors:
                raise ImportRejected(plan.errors)  # leaving the block rolls the transaction back
            write_plan(s, path, spec, plan, actor=actor, now=now)
    return FileReport(path, kind_name, len(plan.inserts), len(plan.updates), len(plan.unchanged), list(plan.conflicts))
