"""Planning an import: what the database holds for the file's rows, and per row what to do.

Each row becomes one action: an `Insert`, an `Update`, `Unchanged`, a `Conflict` (an update
that would undo the processor's or staff's work: skipped and reported), or a `RowError`
(a reference to an unknown id, a second open request for a service: the file is rejected).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Row, Table, select
from sqlalchemy.orm import Session

from processor.importer.validate import ImportRow, Kind, RequestRow, RowError, table_of
from processor.models import (
    OPEN_REQUEST_STATUSES,
    CancellationRequest,
    InvoiceStatus,
    RequestStatus,
    ServiceAddon,
    ServiceStatus,
)

# Rows per `WHERE ... IN (...)` lookup: well under SQLite's bound-parameter limit.
CHUNK = 500


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Insert:
    """A row the database does not have yet: every column is written."""

    line: int
    row: ImportRow
    values: dict[str, Any]  # every model attribute, references resolved to ids

    def after(self, name: str) -> Any:
        """The attribute's value once the row is written."""
        return self.values.get(name)


@dataclass(frozen=True)
class Update:
    """A stored row some of whose values differ from the file's: those are written."""

    line: int
    row: ImportRow
    values: dict[str, Any]  # the attributes the row gives, references resolved to ids
    existing: Row[Any]  # the stored row (its columns), locked until the import commits
    changes: dict[str, tuple[Any, Any]]  # attribute -> (old, new); never empty

    def after(self, name: str) -> Any:
        """The attribute's value once the row is written."""
        return self.values.get(name, getattr(self.existing, name))


@dataclass(frozen=True)
class Unchanged:
    """A stored row the file's row matches: nothing to write."""

    line: int
    external_id: str


@dataclass(frozen=True)
class Conflict:
    """A row that was not applied because it would undo the processor's (or staff's) work."""

    line: int
    external_id: str
    message: str


@dataclass(frozen=True)
class Plan:
    """Every row of a file, sorted by what to do with it. Any error rejects the whole file."""

    inserts: tuple[Insert, ...]
    updates: tuple[Update, ...]
    unchanged: tuple[Unchanged, ...]
    conflicts: tuple[Conflict, ...]
    errors: tuple[RowError, ...]


def plan_rows(
    s: Session, path: Path, kind: Kind, rows: Sequence[tuple[int, ImportRow]], errors: Sequence[RowError]
) -> Plan:
    """Decide each validated row's action; `errors` (the validation's) are carried into the plan."""
    resolved, ref_errors = _resolve_refs(s, path, rows, kind.row)
    existing = _rows_by_external_id(s, kind.table, {row.external_id for _line, row, _refs in resolved})
    actions = [_decide(line, row, refs, existing.get(row.external_id)) for line, row, refs in resolved]
    inserts = [a for a in actions if isinstance(a, Insert)]
    updates, conflicts = _apply_guards(s, kind, [a for a in actions if isinstance(a, Update)])
    open_errors = ([*_addons_of_other_services(s, path, [*inserts, *updates]),
                    *_second_open_requests(s, path, inserts, updates)] if kind.name == "requests" else [])
    return Plan(
        inserts=tuple(inserts),
        updates=tuple(updates),
        unchanged=tuple(a for a in actions if isinstance(a, Unchanged)),
        conflicts=tuple(conflicts),
        errors=(*errors, *ref_errors, *open_errors),
    )


def _decide(line: int, row: ImportRow, refs: dict[str, int], stored: Row[Any] | None) -> Insert | Update | Unchanged:
    """Insert a new row; update a stored one only where a value differs."""
    if stored is None:
        return Insert(line, row, row.values(new=True) | refs)
    values = row.values(new=False) | refs
    changes = {k: (getattr(stored, k), v) for k, v in values.items() if getattr(stored, k) != v}
    if not changes:
        return Unchanged(line, row.external_id)
    return Update(line, row, values, stored, changes)


def _resolve_refs(
    s: Session, path: Path, rows: Sequence[tuple[int, ImportRow]], row_type: type[ImportRow]
) -> tuple[list[tuple[int, ImportRow, dict[str, int]]], list[RowError]]:
    """Each row with its references turned into ids; a row naming an unknown id is an error."""
    ids: dict[str, dict[str, int]] = {}
    for column, (_attr, model) in row_type.REFS.items():
        wanted = {getattr(row, column) for _line, row in rows}
        ids[column] = ids_by_external_id(s, table_of(model), wanted)
    for column, (_attr, model) in row_type.OPTIONAL_REFS.items():
        wanted = {getattr(row, column) for _line, row in rows} - {None}
        ids[column] = ids_by_external_id(s, table_of(model), wanted)
    out: list[tuple[int, ImportRow, dict[str, int]]] = []
    errors: list[RowError] = []
    for line, row in rows:
        resolved: dict[str, Any] = {}
        for column, (attr, model) in row_type.REFS.items():
            ext = getattr(row, column)
            if ext in ids[column]:
                resolved[attr] = ids[column][ext]
            else:
                what = table_of(model).name.removesuffix("s")  # client, product, service
                errors.append(RowError(path, line, column, f"no {what} with external_id {ext!r}"))
        missing = len(row_type.REFS) - len(resolved)
        for column, (attr, _model) in row_type.OPTIONAL_REFS.items():
            ext = getattr(row, column)
            if ext is None:
                if column in row.model_fields_set:  # given empty: none (an update clears it)
                    resolved[attr] = None
            elif ext in ids[column]:
                resolved[attr] = ids[column][ext]
            else:
                missing += 1
                errors.append(RowError(path, line, column, f"no add-on with external_id {ext!r}"))
        if not missing:
            out.append((line, row, resolved))
    return out, errors


# --------------------------------------------------------------------------- guards


@dataclass(frozen=True)
class _Completed:
    """The completed request that cancelled a service."""

    request_id: int
    processed_at: dt.datetime | None


@dataclass(frozen=True)
class _InGrace:
    """The open request whose grace period a run started by suspending its service."""

    request_id: int
    grace_ends_on: dt.date | None


@dataclass(frozen=True)
class _Known:
    """What the guards know besides the stored row: the completed requests of the services
    concerned, and the requests in their grace period of the suspended ones."""

    completed: dict[int, _Completed]
    in_grace: dict[int, _InGrace]


# Guards: why an update must not be applied (a conflict), or None.
_Guard = Callable[[Update, _Known], str | None]


def _show(value: Any) -> str:
    """A value as a conflict message shows it."""
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _would_set(update: Update, names: Iterable[str]) -> str:
    return ", ".join(f"{n} {_show(update.changes[n][1])}" for n in names if n in update.changes)


def _cancelled_by(completed: _Completed, what: str) -> str:
    when = f" on {completed.processed_at.date().isoformat()}" if completed.processed_at else ""
    return f"{what} was cancelled by request {completed.request_id}{when}"


def _is_cancelled(stored: Row[Any]) -> bool:
    return stored.status in (ServiceStatus.CANCELLED, InvoiceStatus.CANCELLED)


def _guard_service(p: Update, known: _Known) -> str | None:
    svc = p.existing
    touched = [n for n in ("status", "termination_date") if n in p.changes]
    if svc.status == ServiceStatus.CANCELLED and svc.id in known.completed and touched:
        return f"{_cancelled_by(known.completed[svc.id], 'service')}; import would set {_would_set(p, touched)}"
    grace = known.in_grace.get(svc.id)
    if grace is not None and touched:
        # The billing system may not know the run suspended it: Active there must not end the
        # grace period here without UnsuspendAccount (`requests withdraw` does both).
        return (f"service was suspended by cancelproc for request {grace.request_id}, whose grace period ends "
                f"{grace.grace_ends_on}; import would set {_would_set(p, touched)}")
    return None


def _guard_cancelled_child(what: str) -> _Guard:
    """Add-ons and invoices the run cancelled with their service stay cancelled."""

    def guard(p: Update, known: _Known) -> str | None:
        stored, completed = p.existing, known.completed
        if _is_cancelled(stored) and stored.service_id in completed and "status" in p.changes:
            return (
                f"{what} was cancelled with its service by request {completed[stored.service_id].request_id}; "
                f"import would set {_would_set(p, ['status'])}"
            )
        alone = completed.get(_ALONE - stored.id)  # an add-on cancelled by a request for it alone
        if _is_cancelled(stored) and alone is not None and "status" in p.changes:
            return f"{_cancelled_by(alone, what)}; import would set {_would_set(p, ['status'])}"
        return None

    return guard


def _guard_request(p: Update, known: _Known) -> str | None:
    req = p.existing
    if req.status != RequestStatus.PENDING:
        when = f" on {req.processed_at.date().isoformat()}" if req.processed_at else ""
        return f"request {req.id} is already {req.status.value}{when}; import would set {_would_set(p, p.changes)}"
    if req.suspended_on is not None:
        # Withdrawn here, its service would stay suspended; a new type or date would move the
        # day the client was told. `requests withdraw` unsuspends (UnsuspendAccount) and says so.
        return (f"request {req.id} is in its grace period (service suspended {req.suspended_on}, cancelled "
                f"{req.grace_ends_on}); import would set {_would_set(p, p.changes)}: "
                f"withdraw it with `cancelproc requests withdraw {req.id}`")
    return None


_GUARDS: dict[str, _Guard] = {
    "services": _guard_service,
    "addons": _guard_cancelled_child("add-on"),
    "invoices": _guard_cancelled_child("invoice"),
    "requests": _guard_request,
}


def _apply_guards(s: Session, kind: Kind, updates: list[Update]) -> tuple[list[Update], list[Conflict]]:
    """The updates that may be applied, and a conflict for each that would undo the processor's work."""
    guard = _GUARDS.get(kind.name)
    if guard is None or not updates:
        return updates, []
    completed: dict[int, _Completed] = {}  # requests: the request's own row decides
    in_grace: dict[int, _InGrace] = {}
    if kind.name != "requests":
        # Only cancelled rows can be protected: fetch requests for their services alone.
        sid = "id" if kind.name == "services" else "service_id"
        completed = _completed_requests(s, {getattr(p.existing, sid) for p in updates if _is_cancelled(p.existing)})
        if kind.name == "addons":
            completed.update(_completed_addon_requests(s, {p.existing.id: p.existing.service_id for p in updates
                                                           if _is_cancelled(p.existing)}))
        if kind.name == "services":
            in_grace = _requests_in_grace(s, {p.existing.id for p in updates
                                              if p.existing.status == ServiceStatus.SUSPENDED})
    known = _Known(completed, in_grace)
    kept: list[Update] = []
    conflicts: list[Conflict] = []
    for p in updates:
        message = guard(p, known)
        if message is None:
            kept.append(p)
        else:
            conflicts.append(Conflict(p.line, p.row.external_id, message))
    return kept, conflicts


def _addons_of_other_services(s: Session, path: Path, writes: list[Insert | Update]) -> list[RowError]:
    """A request's add-on must be one of its service's."""
    named = {p.after("addon_id") for p in writes} - {None}
    if not named:
        return []
    A = ServiceAddon
    owner = {addon_id: service_id for chunk in _chunks(sorted(named))
             for addon_id, service_id in s.execute(select(A.id, A.service_id).where(A.id.in_(chunk)))}
    errors = []
    for p in writes:
        addon_id = p.after("addon_id")
        if addon_id is not None and owner.get(addon_id) != p.after("service_id"):
            assert isinstance(p.row, RequestRow)  # only request files are checked
            errors.append(RowError(path, p.line, "addon_external_id",
                                   f"add-on {p.row.addon_external_id} is not an add-on of service "
                                   f"{p.row.service_external_id}"))
    return errors


# What an open request holds: its service (a request for the service) or its add-on.
_Holding = tuple[str, int]


def _holding(service_id: int, addon_id: int | None) -> _Holding:
    return ("service", service_id) if addon_id is None else ("add-on", addon_id)


def _second_open_requests(s: Session, path: Path, inserts: list[Insert], updates: list[Update]) -> list[RowError]:
    """One open request per service among the requests for services, and one per add-on: a
    request that would be a second one is a row error. (A request for an add-on beside an
    open one for its service is not: the service's cancellation closes it when applied.)

    The schema enforces this too; checking first names the row instead of failing the file
    with an integrity error.
    """
    writes: list[Insert | Update] = [*inserts, *updates]
    touched = {p.after("service_id") for p in writes} | {p.existing.service_id for p in updates}
    holders: dict[_Holding, int | str] = dict(_open_requests(s, touched))  # -> request id or "line N"
    # Rows that close (withdraw) or move their open request free what it held first.
    for u in updates:
        old = u.existing
        held = _holding(old.service_id, old.addon_id)
        moves_or_closes = not _ends_open(u) or _holding(u.after("service_id"), u.after("addon_id")) != held
        if old.status in OPEN_REQUEST_STATUSES and moves_or_closes and holders.get(held) == old.id:
            del holders[held]
    errors: list[RowError] = []
    for p in sorted(writes, key=lambda w: w.line):
        holding = _holding(p.after("service_id"), p.after("addon_id"))
        if not _ends_open(p) or (isinstance(p, Update) and
                                 holding == _holding(p.existing.service_id, p.existing.addon_id)):
            continue
        holder = holders.get(holding)
        if holder is None:
            holders[holding] = f"line {p.line}"
            continue
        assert isinstance(p.row, RequestRow)  # only request files are checked
        which = f"open request {holder}" if isinstance(holder, int) else f"an open request on {holder}"
        if holding[0] == "service":
            errors.append(RowError(path, p.line, "service_external_id",
                                   f"service {p.row.service_external_id} already has {which}"))
        else:
            errors.append(RowError(path, p.line, "addon_external_id",
                                   f"add-on {p.row.addon_external_id} already has {which}"))
    return errors


def _ends_open(p: Insert | Update) -> bool:
    return p.after("status") in OPEN_REQUEST_STATUSES


# --------------------------------------------------------------------------- database look-ups


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def ids_by_external_id(s: Session, table: Table, external_ids: set[str]) -> dict[str, int]:
    """External id -> id of the rows of `table` that exist."""
    out: dict[str, int] = {}
    for chunk in _chunks(sorted(external_ids)):
        query = select(table.c.external_id, table.c.id).where(table.c.external_id.in_(chunk))
        out.update((external_id, id_) for external_id, id_ in s.execute(query))
    return out


def _rows_by_external_id(s: Session, table: Table, external_ids: set[str]) -> dict[str, Row[Any]]:
    """The existing rows, as plain column rows (comparing values needs no ORM objects),
    locked until the import commits (PostgreSQL; SQLite's write transaction is exclusive).

    Without the lock, a run could cancel a service between this read and the import's
    write, and the import would write its stale status over Cancelled. With it, the read
    waits for the run's chunk to commit and sees Cancelled (a conflict, reported).
    """
    out: dict[str, Row[Any]] = {}
    for chunk in _chunks(sorted(external_ids)):
        query = select(table).where(table.c.external_id.in_(chunk)).order_by(table.c.id).with_for_update()
        out.update((row.external_id, row) for row in s.execute(query))
    return out


def _requests_of(s: Session, service_ids: set[int]) -> list[Any]:
    """Every request of these services, in id order, with what the guards ask of it. Read by
    service id alone: with a status condition beside it, SQLite's planner (no statistics)
    takes the status index and walks every open or completed request of the database for
    each chunk. A service has few requests; the callers filter them."""
    R = CancellationRequest
    rows: list[Any] = []
    for chunk in _chunks(sorted(service_ids)):
        rows += s.execute(select(R.id, R.service_id, R.addon_id, R.status, R.processed_at, R.suspended_on,
                                 R.grace_ends_on).where(R.service_id.in_(chunk)).order_by(R.id)).all()
    return rows


def _requests_in_grace(s: Session, service_ids: set[int]) -> dict[int, _InGrace]:
    """Service id -> its open request in its grace period (the run suspended the service)."""
    return {r.service_id: _InGrace(r.id, r.grace_ends_on) for r in _requests_of(s, service_ids)
            if r.suspended_on is not None and r.status in OPEN_REQUEST_STATUSES}


def _completed_requests(s: Session, service_ids: set[int]) -> dict[int, _Completed]:
    """Service id -> its latest completed request for the service (not for one add-on of
    it), for the given services."""
    return {r.service_id: _Completed(r.id, r.processed_at) for r in _requests_of(s, service_ids)
            if r.status == RequestStatus.COMPLETED and r.addon_id is None}


# The guards' `completed` is keyed by service id; an add-on's own completed request is
# keyed by _ALONE - its id (ids are positive), so the guards keep one signature.
_ALONE = 0


def _completed_addon_requests(s: Session, addons: dict[int, int]) -> dict[int, _Completed]:
    """_ALONE - add-on id -> its latest completed request for it alone, for these add-ons
    (`addons`: add-on id -> its service's id)."""
    return {_ALONE - r.addon_id: _Completed(r.id, r.processed_at) for r in _requests_of(s, set(addons.values()))
            if r.status == RequestStatus.COMPLETED and r.addon_id in addons}


def _open_requests(s: Session, service_ids: set[int]) -> dict[_Holding, int]:
    """What the open (pending or failed) requests of these services hold (the service, or
    one add-on of it) -> the request's id."""
    return {_holding(r.service_id, r.addon_id): r.id for r in _requests_of(s, service_ids)
            if r.status in OPEN_REQUEST_STATUSES}
