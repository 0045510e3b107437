"""Importing one file: read, validate, plan and write it in one transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from processor.config import Settings
from processor.db import Database, retrying_transaction
from processor.errors import InputError
from processor.importer.effective import add_effective_dates
from processor.importer.plan import Conflict, plan_rows
from processor.importer.read import ParsedFile, read_file
from processor.importer.validate import (
    KIND_SPECS,
    KINDS,
    ImportRow,
    RowError,
    check_columns,
    infer_kind,
    validate_rows,
)
from processor.importer.write import write_plan
from processor.models import CancellationRequest
from processor.terms import terms_of


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
    """A file had bad rows; nothing of it was written. ``errors`` lists every one, in line
    order (file by file, in the order the files first appear)."""

    def __init__(self, errors: Sequence[RowError]) -> None:
        files = {path: n for n, path in enumerate(dict.fromkeys(e.path for e in errors))}
        self.errors = sorted(errors, key=lambda e: (files[e.path], e.line))
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
    check_columns(path, kind_name, parsed.columns, jsonl=parsed.jsonl)
    batch = validate(path, kind_name, parsed, settings=settings, now=now)
    del parsed  # the raw rows: only the validated ones are needed from here on
    # The rows it updates are locked (see plan.py's `_rows_by_external_id`): one that a run's
    # chunk also wants can deadlock, and the loser is rolled back. If that is the import, it
    # is planned and written again, from what is committed by then.
    for attempt in retrying_transaction():
        with attempt, db.session.begin() as s:
            report = apply(s, batch, actor=actor, now=now, settings=settings)
    return report


@dataclass
class Batch:
    """A file's rows of one kind, validated, with the errors found so far."""

    path: Path
    kind: str
    rows: list[tuple[int, ImportRow]]
    errors: list[RowError]


def validate(path: Path, kind: str, parsed: ParsedFile, *, settings: Settings, now: dt.datetime) -> Batch:
    """Every row of `parsed` through the kind's row model (no database needed)."""
    rows, errors = validate_rows(path, KIND_SPECS[kind], parsed, settings, now)
    return Batch(path, kind, rows, errors)


def apply(s: Session, batch: Batch, *, actor: str, now: dt.datetime, settings: Settings) -> FileReport:
    """Plan and write a batch inside the caller's transaction; ImportRejected (before
    anything of it is written) if any row is bad. The caller rolls back on it."""
    spec = KIND_SPECS[batch.kind]
    plan = plan_rows(s, batch.path, spec, batch.rows, batch.errors)
    if plan.errors:
        raise ImportRejected(plan.errors)
    if spec.model is CancellationRequest:
        add_effective_dates(s, plan, now=now, zone=settings.zone, terms_of=terms_of(settings))
    write_plan(s, batch.path, spec, plan, actor=actor, now=now)
    return FileReport(batch.path, batch.kind, len(plan.inserts), len(plan.updates), len(plan.unchanged),
                      list(plan.conflicts))
