"""`cancelproc import`: bring clients, products, services, add-ons, invoices and requests
in from the billing system (CSV with a header row, or JSON Lines), keyed by its own ids.

Each file is one transaction: every row is validated first (all errors are collected and
reported with file, line and field) and nothing of the file is written if any row is bad.
Good files are upserted by ``external_id``: new rows inserted, existing rows updated only
where a value differs, so a nightly re-import of an unchanged export writes nothing.

The importer never undoes the processor's work: a row that would reopen a service, add-on
or invoice cancelled by a completed request, or change a request that is no longer pending,
is skipped and reported as a conflict while the rest of the file is applied.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import functools
import io
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy import Row, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from processor.config import Settings
from processor.db import Database, retrying_transaction
from processor.errors import InputError
from processor.models import (
    OPEN_REQUEST_STATUSES,
    AuditEntry,
    Base,
    CancellationRequest,
    Client,
    Invoice,
    InvoiceStatus,
    Product,
    RequestStatus,
    RequestType,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.text import MAX_REASON, address_problem, text_problem

KINDS = ("clients", "products", "services", "addons", "invoices", "requests")

# Rows per `WHERE ... IN (...)` lookup: well under SQLite's bound-parameter limit.
CHUNK = 500

CSV_SUFFIXES = frozenset({".csv"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Conflict:
    """A row that was not applied because it would undo the processor's (or staff's) work."""

    line: int
    external_id: str
    message: str


@dataclass(frozen=True)
class RowError:
    """One bad value: where it is and what is wrong with it."""

    path: Path
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


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


# --------------------------------------------------------------------------- value types


def _enum_lookup(cls: type[enum.Enum], allowed: Iterable[enum.Enum] | None = None) -> Callable[[Any], Any]:
    """A before-validator accepting the enum's values in any letter case ("active", "ACTIVE")."""
    members = list(allowed) if allowed is not None else list(cls)
    by_word = {str(m.value).casefold(): m for m in members}
    words = ", ".join(str(m.value) for m in members)

    def parse(value: Any) -> Any:
        if isinstance(value, cls) and value in members:
            return value
        if isinstance(value, str) and value.strip().casefold() in by_word:
            return by_word[value.strip().casefold()]
        raise ValueError(f"must be one of {words} (got {value!r})")

    return parse


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _parse_date(value: Any) -> dt.date | None:
    """YYYY-MM-DD only: pydantic's lax date parsing would take a number as a Unix timestamp."""
    if value is None or isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        text = value.strip()
        # WHMCS exports "no date" (free and one-time services) as 0000-00-00.
        if text in ("", "0000-00-00"):
            return None
        if _ISO_DATE.fullmatch(text):
            try:
                return dt.date.fromisoformat(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a valid date") from None
    raise ValueError(f"must be a date as YYYY-MM-DD (got {value!r})")


ExternalId = Annotated[str, Field(min_length=1, max_length=64)]
OptionalDate = Annotated[dt.date | None, BeforeValidator(_parse_date)]
Money = Annotated[Decimal, Field(max_digits=12, decimal_places=2, allow_inf_nan=False)]
Amount = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=2, allow_inf_nan=False)]
ServiceStatusWord = Annotated[ServiceStatus, BeforeValidator(_enum_lookup(ServiceStatus))]
InvoiceStatusWord = Annotated[InvoiceStatus, BeforeValidator(_enum_lookup(InvoiceStatus))]
RequestTypeWord = Annotated[RequestType, BeforeValidator(_enum_lookup(RequestType))]
# Only these two make sense from outside: completed and failed are the processor's verdicts.
ImportedRequestStatus = Annotated[
    RequestStatus,
    BeforeValidator(_enum_lookup(RequestStatus, (RequestStatus.PENDING, RequestStatus.WITHDRAWN))),
]


# --------------------------------------------------------------------------- row models


class _Row(BaseModel):
    """One imported row. Subclasses declare the columns; their defaults mirror the models'."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, str_strip_whitespace=True)

    # Reference column -> (model attribute holding the id, referenced model).
    REFS: ClassVar[dict[str, tuple[str, type[Base]]]] = {}

    external_id: ExternalId

    @model_validator(mode="before")
    @classmethod
    def _blank_means_default(cls, data: Any) -> Any:
        """An empty cell (or JSON null) in an optional column means its default (none, "", 0).

        In a required column it stays missing, reported as "required". CSV cannot tell an
        empty string from no value, so both formats treat them the same.
        """
        if not isinstance(data, dict):
            return data
        defaults = _defaults(cls)
        out: dict[str, Any] = {}
        for key, value in data.items():
            if (value is None or (isinstance(value, str) and not value.strip())) and key in defaults:
                value = defaults[key]
                if value is _REQUIRED:
                    continue
            out[key] = value
        return out

    @field_validator("*", mode="after")
    @classmethod
    def _plain_text(cls, value: Any) -> Any:
        """No NUL, control characters or undecodable bytes in any text (PostgreSQL refuses
        NUL; the others would end up in emails and logs)."""
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                raise ValueError(f"the text {problem}")
        return value

    @classmethod
    def required_columns(cls) -> tuple[str, ...]:
        return tuple(name for name, default in _defaults(cls).items() if default is _REQUIRED)

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(_defaults(cls))

    def values(self, *, new: bool) -> dict[str, Any]:
        """Model attributes to write: all of them for a new row, only the given ones for an update.

        A JSON Lines row may leave a column out: an existing row then keeps its value.
        """
        given = self.model_fields_set
        return {n: getattr(self, n) for n in _defaults(type(self)) if (new or n in given) and n not in self.REFS}


_REQUIRED = object()


@functools.cache
def _defaults(row_type: type[_Row]) -> dict[str, Any]:
    """Column -> default (or _REQUIRED), in declaration order. Cached: it is asked per row."""
    return {
        name: _REQUIRED if info.is_required() else info.get_default(call_default_factory=True)
        for name, info in row_type.model_fields.items()
    }


class ClientRow(_Row):
    first_name: str = Field(min_length=1, max_length=100)
    email: str = Field(min_length=1, max_length=254)
    last_name: str = Field("", max_length=100)
    company_name: str = Field("", max_length=200)
    language: str = Field("en", max_length=16)
    balance: Money = Decimal("0")  # may be negative: credit

    @field_validator("email")
    @classmethod
    def _looks_like_email(cls, email: str) -> str:
        # Only a sanity check: the billing system owns the address, the mailer will tell if it bounces.
        problem = address_problem(email)
        if problem:
            raise ValueError(f"{email!r} is not an email address ({problem})")
        return email


class ProductRow(_Row):
    name: str = Field(min_length=1, max_length=200)
    module: str | None = Field(None, max_length=64)  # empty: nothing to deprovision


class ServiceRow(_Row):
    REFS = {"client_external_id": ("client_id", Client), "product_external_id": ("product_id", Product)}

    client_external_id: ExternalId
    product_external_id: ExternalId
    status: ServiceStatusWord
    domain: str = Field("", max_length=255)
    billing_cycle: str = Field("Monthly", min_length=1, max_length=32)
    amount: Amount = Decimal("0")
    next_due_date: OptionalDate = None
    termination_date: OptionalDate = None


class AddonRow(_Row):
    REFS = {"service_external_id": ("service_id", Service)}

    service_external_id: ExternalId
    name: str = Field(min_length=1, max_length=200)
    status: ServiceStatusWord
    amount: Amount = Decimal("0")


class InvoiceRow(_Row):
    REFS = {"service_external_id": ("service_id", Service)}

    service_external_id: ExternalId
    amount: Amount
    status: InvoiceStatusWord
    due_date: OptionalDate = None


class RequestRow(_Row):
    REFS = {"service_external_id": ("service_id", Service)}

    service_external_id: ExternalId
    type: RequestTypeWord
    reason_code: str = Field(min_length=1, max_length=64)
    reason: str = Field("", max_length=MAX_REASON)
    # Declared after `type` so its validator sees it; validated even when absent (required iff On Date).
    cancel_on: OptionalDate = Field(None, validate_default=True)
    status: ImportedRequestStatus = RequestStatus.PENDING

    @field_validator("reason_code")
    @classmethod
    def _known_reason(cls, code: str, info: ValidationInfo) -> str:
        codes: list[str] = (info.context or {}).get("reason_codes", [])
        if code not in codes:
            raise ValueError(f"unknown reason code {code!r} (allowed: {', '.join(codes)})")
        return code

    @field_validator("cancel_on")
    @classmethod
    def _date_iff_on_date(cls, cancel_on: dt.date | None, info: ValidationInfo) -> dt.date | None:
        kind = info.data.get("type")  # absent when `type` itself was invalid: reported there
        if kind == RequestType.ON_DATE and cancel_on is None:
            raise ValueError("required when type is On Date")
        if kind is not None and kind != RequestType.ON_DATE and cancel_on is not None:
            raise ValueError(f"only allowed when type is On Date (type is {kind.value})")
        return cancel_on

    def values(self, *, new: bool) -> dict[str, Any]:
        out = super().values(new=new)
        # A new type without On Date clears an old cancel_on date even if the column was left out.
        if "type" in out:
            out["cancel_on"] = self.cancel_on
        return out


@dataclass(frozen=True)
class _Kind:
    name: str
    entity: str  # AuditEntry.entity
    model: type[Base]
    row: type[_Row]


_KINDS: dict[str, _Kind] = {
    k.name: k
    for k in (
        _Kind("clients", "client", Client, ClientRow),
        _Kind("products", "product", Product, ProductRow),
        _Kind("services", "service", Service, ServiceRow),
        _Kind("addons", "addon", ServiceAddon, AddonRow),
        _Kind("invoices", "invoice", Invoice, InvoiceRow),
        _Kind("requests", "request", CancellationRequest, RequestRow),
    )
}
assert tuple(_KINDS) == KINDS


def required_columns(kind: str) -> tuple[str, ...]:
    """The columns a file of this kind must have."""
    return _KINDS[kind].row.required_columns()


def allowed_columns(kind: str) -> tuple[str, ...]:
    """Every column a file of this kind may have."""
    return _KINDS[kind].row.columns()


# --------------------------------------------------------------------------- reading files


@dataclass
class _Parsed:
    columns: list[str]  # CSV header, or the keys of the first JSON object
    rows: list[tuple[int, dict[str, Any]]]  # (line number, column -> value)
    jsonl: bool


def _column_name(name: str) -> str:
    # Spreadsheets add stray spaces and capitals to headers; the names themselves are fixed.
    return name.strip().lower()


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a BOM (spreadsheet exports add one)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    return text


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return False
    if suffix in JSONL_SUFFIXES:
        return True
    return text.lstrip().startswith("{")


def _read_csv(path: Path, text: str) -> _Parsed:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, Any]]] = []
    end = 0  # physical line where the previous record ended
    try:
        for record in reader:
            start, end = end + 1, reader.line_num  # a quoted cell may span lines: report the first
            if not any(cell.strip() for cell in record):
                continue  # blank line
            if header is None:
                header = [_column_name(c) for c in record]
                _check_unique(path, start, header)
                continue
            if len(record) != len(header):
                raise InputError(f"{path}:{start}: {len(record)} fields, the header has {len(header)}")
            rows.append((start, dict(zip(header, record))))
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
    assert header is not None  # _read_text refused a blank file
    return _Parsed(header, rows, jsonl=False)


def _read_jsonl(path: Path, text: str) -> _Parsed:
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{number}: expected one JSON object per line, got {type(obj).__name__}")
        keys = [_column_name(k) for k in obj]
        _check_unique(path, number, keys)
        rows.append((number, dict(zip(keys, obj.values()))))
    return _Parsed(list(rows[0][1]), rows, jsonl=True)


def _check_unique(path: Path, line: int, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"{path}:{line}: column {name!r} appears twice")
        seen.add(name)


def _read_file(path: Path) -> _Parsed:
    """Parse a CSV or JSON Lines file into numbered rows; InputError if it is not readable."""
    text = _read_text(path)
    return _read_jsonl(path, text) if _is_jsonl(path, text) else _read_csv(path, text)


# --------------------------------------------------------------------------- kind


def infer_kind(path: Path, columns: Iterable[str]) -> str:
    """The kind whose required columns the header has (the most specific one if several do).

    Kinds the header fits without unknown columns are preferred, so an add-on file (which
    also has every column a product needs) is not taken for products.
    """
    present = set(columns)
    matching = [k for k in KINDS if set(required_columns(k)) <= present]
    clean = [k for k in matching if present <= set(allowed_columns(k))]
    pool = clean or matching
    if not pool:
        raise InputError(
            f"{path}: cannot tell what the file holds from its columns ({', '.join(columns) or 'none'}); "
            f"pass --kind ({'|'.join(KINDS)})"
        )
    most = max(len(required_columns(k)) for k in pool)
    best = [k for k in pool if len(required_columns(k)) == most]
    if len(best) > 1:
        raise InputError(f"{path}: columns fit several kinds ({', '.join(best)}); pass --kind")
    return best[0]


def _check_columns(path: Path, kind: str, columns: Sequence[str], *, jsonl: bool) -> None:
    allowed = allowed_columns(kind)
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        raise InputError(
            f"{path}: unknown column {unknown[0]!r} for {kind} (allowed: {', '.join(allowed)})"
        )
    # A JSON Lines row may leave out a column (each row is checked); a CSV header may not.
    missing = [c for c in required_columns(kind) if c not in columns]
    if missing and not jsonl:
        raise InputError(f"{path}: missing required column(s) for {kind}: {', '.join(missing)}")


# --------------------------------------------------------------------------- validation


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> tuple[str, str]:
    """(field, one-line message) for one pydantic error."""
    name = str(err["loc"][0]) if err["loc"] else "row"
    kind = err["type"]
    if kind == "missing":
        return name, "required, but empty" if name in raw else "required column missing"
    if kind == "extra_forbidden":
        return name, "unknown column"
    if kind == "string_too_short" and err.get("ctx", {}).get("min_length") == 1:
        return name, "must not be empty"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if kind != "value_error" and not isinstance(value, (dict, list)) and value is not None:
        message += f" (got {value!r})"
    return name, message


def _validate(
    path: Path, kind: _Kind, parsed: _Parsed, settings: Settings
) -> tuple[list[tuple[int, _Row]], list[RowError]]:
    """Every row through its pydantic model: the good ones, and an error per bad value."""
    good: list[tuple[int, _Row]] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    context = {"reason_codes": list(settings.reason_codes)}
    for line, raw in parsed.rows:
        try:
            row = kind.row.model_validate(raw, context=context)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                errors.append(RowError(path, line, *_describe(dict(err), raw)))
            continue
        if row.external_id in first_line:
            # Two rows for one id: which one wins would depend on the order of the export.
            errors.append(
                RowError(path, line, "external_id", f"{row.external_id!r} also on line {first_line[row.external_id]}")
            )
            continue
        first_line[row.external_id] = line
        good.append((line, row))
    return good, errors


# --------------------------------------------------------------------------- database look-ups


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _ids_by_external_id(s: Session, model: Any, external_ids: set[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for chunk in _chunks(sorted(external_ids)):
        out.update(s.execute(select(model.external_id, model.id).where(model.external_id.in_(chunk))).all())
    return out


def _rows_by_external_id(s: Session, model: Any, external_ids: set[str]) -> dict[str, Row[Any]]:
    """The existing rows, as plain column rows (comparing values needs no ORM objects),
    locked until the import commits (PostgreSQL; SQLite's write transaction is exclusive).

    Without the lock, a run could cancel a service between this read and the import's
    write, and the import would write its stale status over Cancelled. With it, the read
    waits for the run's chunk to commit and sees Cancelled (a conflict, reported).
    """
    out: dict[str, Row[Any]] = {}
    table = model.__table__
    for chunk in _chunks(sorted(external_ids)):
        query = select(table).where(table.c.external_id.in_(chunk)).order_by(table.c.id).with_for_update()
        out.update((row.external_id, row) for row in s.execute(query))
    return out


@dataclass(frozen=True)
class _Completed:
    """The completed request that cancelled a service."""

    request_id: int
    processed_at: dt.datetime | None


def _completed_requests(s: Session, service_ids: set[int]) -> dict[int, _Completed]:
    """Service id -> its latest completed request, for the given services."""
    out: dict[int, _Completed] = {}
    R = CancellationRequest
    for chunk in _chunks(sorted(service_ids)):
        query = (
            select(R.service_id, R.id, R.processed_at)
            .where(R.status == RequestStatus.COMPLETED, R.service_id.in_(chunk))
            .order_by(R.id)
        )
        for service_id, request_id, processed_at in s.execute(query):
            out[service_id] = _Completed(request_id, processed_at)
    return out


def _open_requests(s: Session, service_ids: set[int]) -> dict[int, int]:
    """Service id -> id of its open (pending or failed) request."""
    out: dict[int, int] = {}
    R = CancellationRequest
    for chunk in _chunks(sorted(service_ids)):
        query = select(R.service_id, R.id).where(R.status.in_(OPEN_REQUEST_STATUSES), R.service_id.in_(chunk))
        out.update(s.execute(query).all())
    return out


# --------------------------------------------------------------------------- planning


@dataclass
class _Planned:
    """A row that passed every check: what to write."""

    line: int
    row: _Row
    values: dict[str, Any]  # model attributes, references resolved to ids
    existing: Row[Any] | None = None  # the stored row (its columns), for an update
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # attribute -> (old, new)


@dataclass
class _Plan:
    inserts: list[_Planned] = field(default_factory=list)
    updates: list[_Planned] = field(default_factory=list)
    unchanged: int = 0
    conflicts: list[Conflict] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _would_set(planned: _Planned, names: Iterable[str]) -> str:
    return ", ".join(f"{n} {_show(planned.changes[n][1])}" for n in names if n in planned.changes)


def _cancelled_by(completed: _Completed, what: str) -> str:
    when = f" on {completed.processed_at.date().isoformat()}" if completed.processed_at else ""
    return f"{what} was cancelled by request {completed.request_id}{when}"


def _is_cancelled(obj: Any) -> bool:
    return obj.status in (ServiceStatus.CANCELLED, InvoiceStatus.CANCELLED)


# Guards: why an update must not be applied (a conflict), or None. They get the existing row
# already loaded and the completed requests of the services concerned.
_Guard = Callable[[_Planned, dict[int, _Completed]], str | None]


def _guard_service(p: _Planned, completed: dict[int, _Completed]) -> str | None:
    svc = p.existing
    touched = [n for n in ("status", "termination_date") if n in p.changes]
    if svc.status == ServiceStatus.CANCELLED and svc.id in completed and touched:
        return f"{_cancelled_by(completed[svc.id], 'service')}; import would set {_would_set(p, touched)}"
    return None


def _guard_cancelled_child(what: str) -> _Guard:
    """Add-ons and invoices the run cancelled with their service stay cancelled."""

    def guard(p: _Planned, completed: dict[int, _Completed]) -> str | None:
        obj = p.existing
        if _is_cancelled(obj) and obj.service_id in completed and "status" in p.changes:
            return (
                f"{what} was cancelled with its service by request {completed[obj.service_id].request_id}; "
                f"import would set {_would_set(p, ['status'])}"
            )
        return None

    return guard


def _guard_request(p: _Planned, completed: dict[int, _Completed]) -> str | None:
    req = p.existing
    if req.status != RequestStatus.PENDING:
        when = f" on {req.processed_at.date().isoformat()}" if req.processed_at else ""
        return f"request {req.id} is already {req.status.value}{when}; import would set {_would_set(p, p.changes)}"
    return None


_GUARDS: dict[str, _Guard] = {
    "services": _guard_service,
    "addons": _guard_cancelled_child("add-on"),
    "invoices": _guard_cancelled_child("invoice"),
    "requests": _guard_request,
}


def _resolve_refs(
    s: Session, path: Path, rows: list[tuple[int, _Row]], row_type: type[_Row], errors: list[RowError]
) -> list[tuple[int, _Row, dict[str, int]]]:
    """Each row with its references turned into ids; a row naming an unknown id is an error."""
    ids: dict[str, dict[str, int]] = {}
    for column, (_attr, model) in row_type.REFS.items():
        wanted = {getattr(row, column) for _line, row in rows}
        ids[column] = _ids_by_external_id(s, model, wanted)
    out: list[tuple[int, _Row, dict[str, int]]] = []
    for line, row in rows:
        resolved: dict[str, int] = {}
        for column, (attr, model) in row_type.REFS.items():
            ext = getattr(row, column)
            if ext in ids[column]:
                resolved[attr] = ids[column][ext]
            else:
                what = model.__tablename__.removesuffix("s")  # client, product, service
                errors.append(RowError(path, line, column, f"no {what} with external_id {ext!r}"))
        if len(resolved) == len(row_type.REFS):
            out.append((line, row, resolved))
    return out


def _plan(s: Session, path: Path, kind: _Kind, rows: list[tuple[int, _Row]], errors: list[RowError]) -> _Plan:
    """Sort the rows into inserts, updates, unchanged and conflicts (errors go to `errors`)."""
    plan = _Plan(errors=errors)
    resolved = _resolve_refs(s, path, rows, kind.row, plan.errors)
    existing = _rows_by_external_id(s, kind.model, {row.external_id for _l, row, _r in resolved})
    for line, row, refs in resolved:
        obj = existing.get(row.external_id)
        values = row.values(new=obj is None) | refs
        planned = _Planned(line, row, values, obj)
        if obj is None:
            plan.inserts.append(planned)
            continue
        planned.changes = {k: (getattr(obj, k), v) for k, v in values.items() if getattr(obj, k) != v}
        if planned.changes:
            plan.updates.append(planned)
        else:
            plan.unchanged += 1
    _apply_guards(s, kind, plan)
    if kind.name == "requests":
        _check_open_requests(s, path, plan)
    return plan


def _apply_guards(s: Session, kind: _Kind, plan: _Plan) -> None:
    """Move updates that would undo the processor's work from `updates` to `conflicts`."""
    guard = _GUARDS.get(kind.name)
    if guard is None or not plan.updates:
        return
    if kind.name == "requests":
        completed: dict[int, _Completed] = {}  # the request's own status decides
    else:
        # Only cancelled rows can be protected: fetch requests for their services alone.
        sid = "id" if kind.name == "services" else "service_id"
        cancelled = {getattr(p.existing, sid) for p in plan.updates if _is_cancelled(p.existing)}
        completed = _completed_requests(s, cancelled)
    kept: list[_Planned] = []
    for p in plan.updates:
        message = guard(p, completed)
        if message is None:
            kept.append(p)
        else:
            plan.conflicts.append(Conflict(p.line, p.row.external_id, message))
    plan.updates = kept


def _check_open_requests(s: Session, path: Path, plan: _Plan) -> None:
    """One open request per service: a request that would be a second one is a row error.

    The schema enforces this too; checking first names the row instead of failing the file
    with an integrity error.
    """
    def ends_open(p: _Planned) -> bool:
        return p.values.get("status", p.existing.status if p.existing else None) in OPEN_REQUEST_STATUSES

    def service_of(p: _Planned) -> int:
        return p.values.get("service_id", p.existing.service_id if p.existing else None)

    touched = {service_of(p) for p in plan.inserts + plan.updates}
    touched |= {p.existing.service_id for p in plan.updates}
    holders: dict[int, int | str] = dict(_open_requests(s, touched))  # service id -> request id or "line N"
    # Rows that close (withdraw) or move their open request free its service first.
    for p in plan.updates:
        if p.existing.status in OPEN_REQUEST_STATUSES and (not ends_open(p) or service_of(p) != p.existing.service_id):
            if holders.get(p.existing.service_id) == p.existing.id:
                del holders[p.existing.service_id]
    for p in sorted(plan.inserts + plan.updates, key=lambda planned: planned.line):
        if not ends_open(p) or (p.existing is not None and service_of(p) == p.existing.service_id):
            continue
        holder = holders.get(service_of(p))
        if holder is not None:
            ext = p.row.service_external_id  # type: ignore[attr-defined]
            which = f"open request {holder}" if isinstance(holder, int) else f"an open request on {holder}"
            plan.errors.append(RowError(path, p.line, "service_external_id", f"service {ext} already has {which}"))
        else:
            holders[service_of(p)] = f"line {p.line}"


# --------------------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):  # before str: the enums are StrEnums
        return value.value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)  # Decimal, date


def _audit_row(
    kind: _Kind, entity_id: int, action: str, detail: dict[str, Any], *, actor: str, now: dt.datetime
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


def _update_rows(s: Session, table: Table, updates: list[_Planned]) -> None:
    """UPDATE by id, one executemany per set of changed columns."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for p in updates:
        assert p.existing is not None
        groups[tuple(sorted(p.changes))].append({"_id": p.existing.id, **{n: new for n, (_o, new) in p.changes.items()}})
    for names, params in groups.items():
        stmt = update(table).where(table.c.id == bindparam("_id")).values({n: bindparam(n) for n in names})
        s.execute(stmt, params)


def _write(s: Session, path: Path, kind: _Kind, plan: _Plan, *, actor: str, now: dt.datetime) -> None:
    """Insert and update the planned rows, with an audit entry each.

    Core executemany statements, not ORM objects: a 100,000-row file would otherwise
    spend most of its time in the unit of work.
    """
    model = kind.model
    audits: list[dict[str, Any]] = []
    # Updates first: a request withdrawn by this file frees its service for a new one.
    if plan.updates:
        _update_rows(s, model.__table__, plan.updates)
        audits += [
            _audit_row(
                kind,
                p.existing.id,
                "import_updated",
                {
                    "source": f"{path.name}:{p.line}",
                    "external_id": p.row.external_id,
                    "changed": {n: [_jsonable(old), _jsonable(new)] for n, (old, new) in p.changes.items()},
                },
                actor=actor,
                now=now,
            )
            for p in plan.updates
        ]
    if plan.inserts:
        extra = {"created_at": now, "created_by": actor} if model is CancellationRequest else {}
        params = [dict(p.values, external_id=p.row.external_id, **extra) for p in plan.inserts]
        # Plain executemany, then the new ids by external id: SQLite cannot return ids in
        # parameter order from one multi-row INSERT, and SQLAlchemy would fall back to a
        # statement per row.
        s.execute(insert(model.__table__), params)
        ids = _ids_by_external_id(s, model, {p.row.external_id for p in plan.inserts})
        audits += [
            _audit_row(kind, ids[p.row.external_id], "imported",
                       {"source": f"{path.name}:{p.line}", "external_id": p.row.external_id}, actor=actor, now=now)
            for p in plan.inserts
        ]
    if audits:
        s.execute(insert(AuditEntry.__table__), audits)


# --------------------------------------------------------------------------- entry point


def import_file(
    db: Database,
    path: Path,
    *,
    settings: Settings,
    now: dt.datetime,
    kind: str | None = None,
    actor: str = "import",
) -> FileReport:
    """Import one file in one transaction; see the module docstring.

    Raises InputError for a file that cannot be read or whose kind or columns are wrong, and
    ImportRejected (an InputError) listing every bad row; in both cases nothing is written.
    """
    path = Path(path)
    if kind is not None and kind not in _KINDS:
        raise InputError(f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})")
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    parsed = _read_file(path)
    kind_name = kind or infer_kind(path, parsed.columns)
    spec = _KINDS[kind_name]
    _check_columns(path, kind_name, parsed.columns, jsonl=parsed.jsonl)
    rows, errors = _validate(path, spec, parsed, settings)
    del parsed  # the raw rows: only the validated ones are needed from here on
    # The rows it updates are locked (see `_rows_by_external_id`): one that a run's chunk
    # also wants can deadlock, and the loser is rolled back. If that is the import, it is
    # planned and written again, from what is committed by then.
    for attempt in retrying_transaction():
        with attempt, db.session.begin() as s:
            plan = _plan(s, path, spec, rows, list(errors))
            if plan.errors:
                raise ImportRejected(plan.errors)  # leaving the block rolls the transaction back
            _write(s, path, spec, plan, actor=actor, now=now)
    return FileReport(path, kind_name, len(plan.inserts), len(plan.updates), plan.unchanged, plan.conflicts)
