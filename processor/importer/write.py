"""Writing a plan: its inserts and updates, with an audit entry each.

Runs inside the caller's transaction and never commits: the caller owns it, so a file is
written whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy.orm import Session

from processor.importer.plan import Insert, Plan, Update, ids_by_external_id
from processor.importer.validate import Kind, table_of
from processor.models import AuditEntry, CancellationRequest


def write_plan(s: Session, path: Path, kind: Kind, plan: Plan, *, actor: str, now: dt.datetime) -> None:
    """Insert and update the planned rows, with an audit entry each.

    Core executemany statements, not ORM objects: a 100,000-row file would otherwise
    spend most of its time in the unit of work.
    """
    audits: list[dict[str, Any]] = []
    # Updates first: a request withdrawn by this file frees its service for a new one.
    if plan.updates:
        _update_rows(s, kind.table, plan.updates)
        audits += [_updated_entry(kind, path, u, actor=actor, now=now) for u in plan.updates]
    if plan.inserts:
        ids = _insert_rows(s, kind, plan.inserts, actor=actor, now=now)
        audits += [_inserted_entry(kind, path, i, ids[i.row.external_id], actor=actor, now=now) for i in plan.inserts]
    if audits:
        s.execute(insert(table_of(AuditEntry)), audits)


def _update_rows(s: Session, table: Table, updates: tuple[Update, ...]) -> None:
    """UPDATE by id, one executemany per set of changed columns."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for u in updates:
        new_values = {n: new for n, (_old, new) in u.changes.items()}
        groups[tuple(sorted(u.changes))].append({"_id": u.existing.id, **new_values})
    for names, params in groups.items():
        stmt = update(table).where(table.c.id == bindparam("_id")).values({n: bindparam(n) for n in names})
        s.execute(stmt, params)


def _insert_rows(
    s: Session, kind: Kind, inserts: tuple[Insert, ...], *, actor: str, now: dt.datetime
) -> dict[str, int]:
    """INSERT the new rows; their ids by external id."""
    extra = {"created_at": now, "created_by": actor} if kind.model is CancellationRequest else {}
    # A request's own created_at (its requested_at column) beats the import's time.
    params = [{**extra, **i.values, "external_id": i.row.external_id} for i in inserts]
    # Plain executemany, then the new ids by external id: SQLite cannot return ids in
    # parameter order from one multi-row INSERT, and SQLAlchemy would fall back to a
    # statement per row.
    s.execute(insert(kind.table), params)
    return ids_by_external_id(s, kind.table, {i.row.external_id for i in inserts})


def _updated_entry(kind: Kind, path: Path, u: Update, *, actor: str, now: dt.datetime) -> dict[str, Any]:
    detail = {
        "source": f"{path.name}:{u.line}",
        "external_id": u.row.external_id,
        "changed": {n: [_jsonable(old), _jsonable(new)] for n, (old, new) in u.changes.items()},
    }
    return _audit_row(kind, u.existing.id, "import_updated", detail, actor=actor, now=now)


def _inserted_entry(
    kind: Kind, path: Path, i: Insert, entity_id: int, *, actor: str, now: dt.datetime
) -> dict[str, Any]:
    detail = {"source": f"{path.name}:{i.line}", "external_id": i.row.external_id}
    return _audit_row(kind, entity_id, "imported", detail, actor=actor, now=now)


def _audit_row(
    kind: Kind, entity_id: int, action: str, detail: dict[str, Any], *, actor: str, now: dt.datetime
) -> dict[str, Any]:
    return {
        "at": now,
        "actor": actor,
        "entity": kind.entity,
        "entity_id": entity_id,
        # Request entries also carry request_id, so a request's history shows its import.
        "request_id": entity_id if kind.model is CancellationRequest else None,
        "action": action,
        "detail": json.dumps(detail, sort_keys=True),
    }


def _jsonable(value: Any) -> Any:
    """A value as the audit entry's JSON detail holds it."""
    if isinstance(value, enum.Enum):  # before str: the enums are StrEnums
        return value.value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)  # Decimal, date
