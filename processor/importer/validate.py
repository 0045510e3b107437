"""Validating imported rows: the pydantic model of each kind's row, which kind a file holds,
and every row checked, each bad value reported as FILE:LINE: field: message."""

from __future__ import annotations

import datetime as dt
import enum
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
from sqlalchemy import Table

from processor.config import Settings
from processor.errors import InputError
from processor.importer.read import ParsedFile
from processor.models import (
    REQUEST_TYPE_WORDS,
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


@dataclass(frozen=True)
class RowError:
    """One bad value: where it is and what is wrong with it."""

    path: Path
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


# --------------------------------------------------------------------------- value types


def _enum_lookup(
    cls: type[enum.Enum], allowed: Iterable[enum.Enum] | None = None, aliases: dict[str, Any] | None = None
) -> Callable[[Any], Any]:
    """A before-validator accepting the enum's values in any letter case ("active", "ACTIVE"),
    and the given other spellings of them."""
    members = list(allowed) if allowed is not None else list(cls)
    by_word = {str(m.value).casefold(): m for m in members}
    by_word.update({word.casefold(): m for word, m in (aliases or {}).items() if m in members})
    words = ", ".join([str(m.value) for m in members] + list(aliases or {}))

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


_ISO_MOMENT = re.compile(r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?)?")


def parse_moment(value: Any, zone: dt.tzinfo) -> dt.datetime | None:
    """An instant as YYYY-MM-DD[ HH:MM[:SS]][offset], aware in UTC; without an offset it is a
    time in `zone` (the business time zone), a date alone the start of that day there.
    Empty and WHMCS's 0000-00-00 (00:00:00) mean none."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime.combine(value, dt.time())
    elif isinstance(value, str) and not value.strip().strip("0-: "):
        return None  # "", "0000-00-00", "0000-00-00 00:00:00"
    elif isinstance(value, str) and _ISO_MOMENT.fullmatch(value.strip()):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value.strip()!r} is not a valid date and time") from None
    else:
        raise ValueError(f"must be a date as YYYY-MM-DD, or a date and time as YYYY-MM-DD HH:MM:SS (got {value!r})")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(dt.UTC)


ExternalId = Annotated[str, Field(min_length=1, max_length=64)]
OptionalDate = Annotated[dt.date | None, BeforeValidator(_parse_date)]
Money = Annotated[Decimal, Field(max_digits=12, decimal_places=2, allow_inf_nan=False)]
Amount = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=2, allow_inf_nan=False)]
ServiceStatusWord = Annotated[ServiceStatus, BeforeValidator(_enum_lookup(ServiceStatus))]
InvoiceStatusWord = Annotated[InvoiceStatus, BeforeValidator(_enum_lookup(InvoiceStatus))]
# "End of Billing Period" as stored and as WHMCS writes it, or "end-of-period" as `requests create --type` takes it.
RequestTypeWord = Annotated[RequestType, BeforeValidator(_enum_lookup(RequestType, aliases=REQUEST_TYPE_WORDS))]
# Only these two make sense from outside: completed and failed are the processor's verdicts.
ImportedRequestStatus = Annotated[
    RequestStatus,
    BeforeValidator(_enum_lookup(RequestStatus, (RequestStatus.PENDING, RequestStatus.WITHDRAWN))),
]


# --------------------------------------------------------------------------- row models


class ImportRow(BaseModel):
    """One imported row. Subclasses declare the columns; their defaults mirror the models'."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, str_strip_whitespace=True)

    # Reference column -> (model attribute holding the id, referenced model).
    REFS: ClassVar[dict[str, tuple[str, type[Base]]]] = {}
    # The same for a reference that may be empty (its attribute is then None).
    OPTIONAL_REFS: ClassVar[dict[str, tuple[str, type[Base]]]] = {}

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
        return {n: getattr(self, n) for n in _defaults(type(self))
                if (new or n in given) and n not in self.REFS and n not in self.OPTIONAL_REFS}


_REQUIRED = object()


@functools.cache
def _defaults(row_type: type[ImportRow]) -> dict[str, Any]:
    """Column -> default (or _REQUIRED), in declaration order. Cached: it is asked per row."""
    return {
        name: _REQUIRED if info.is_required() else info.get_default(call_default_factory=True)
        for name, info in row_type.model_fields.items()
    }


class ClientRow(ImportRow):
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
        if address_problem(email):
            raise ValueError(f"{email!r} is not an email address")
        return email


class ProductRow(ImportRow):
    name: str = Field(min_length=1, max_length=200)
    module: str | None = Field(None, max_length=64)  # empty: nothing to deprovision


class ServiceRow(ImportRow):
    REFS = {"client_external_id": ("client_id", Client), "product_external_id": ("product_id", Product)}

    client_external_id: ExternalId
    product_external_id: ExternalId
    status: ServiceStatusWord
    domain: str = Field("", max_length=255)
    billing_cycle: str = Field("Monthly", min_length=1, max_length=32)
    amount: Amount = Decimal("0")
    next_due_date: OptionalDate = None
    termination_date: OptionalDate = None
    registration_date: OptionalDate = None
    subscription_id: str | None = Field(None, max_length=255)


class AddonRow(ImportRow):
    REFS = {"service_external_id": ("service_id", Service)}

    service_external_id: ExternalId
    name: str = Field(min_length=1, max_length=200)
    status: ServiceStatusWord
    amount: Amount = Decimal("0")
    # Its own next due date: when an End of Billing Period request for the add-on alone is due.
    next_due_date: OptionalDate = None


class InvoiceRow(ImportRow):
    REFS = {"service_external_id": ("service_id", Service)}

    service_external_id: ExternalId
    amount: Amount
    status: InvoiceStatusWord
    due_date: OptionalDate = None


class RequestRow(ImportRow):
    REFS = {"service_external_id": ("service_id", Service)}
    # A reference that may be empty: a request for that one add-on of the service.
    OPTIONAL_REFS: ClassVar[dict[str, tuple[str, type[Base]]]] = {"addon_external_id": ("addon_id", ServiceAddon)}

    service_external_id: ExternalId
    type: RequestTypeWord
    reason_code: str = Field(min_length=1, max_length=64)
    reason: str = Field("", max_length=MAX_REASON)
    # Declared after `type` so its validator sees it; validated even when absent (required iff On Date).
    cancel_on: OptionalDate = Field(None, validate_default=True)
    status: ImportedRequestStatus = RequestStatus.PENDING
    # When the client asked (stored as the request's created_at): lateness, the list order and
    # whether a run for a past date takes it come from it. Empty: the time of the import.
    requested_at: dt.datetime | None = None
    # Empty: the request is for the whole service (with its add-ons).
    addon_external_id: ExternalId | None = None

    @field_validator("requested_at", mode="before")
    @classmethod
    def _moment(cls, value: Any, info: ValidationInfo) -> dt.datetime | None:
        context = info.context or {}
        moment = parse_moment(value, context.get("zone", dt.UTC))
        now: dt.datetime | None = context.get("now")
        # A few hours ahead is a clock or a time zone that differs (WHMCS writes its server's
        # local time); more than a day ahead is not a date a client asked on.
        if moment is not None and now is not None and moment > now + dt.timedelta(days=1):
            raise ValueError(f"{moment.isoformat()} is more than a day in the future "
                             f"(now {now.isoformat(timespec='seconds')})")
        return moment

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
        # The model's attribute is created_at; left empty, a new row gets the import's time
        # (write.py) and a stored one keeps its own.
        requested_at = out.pop("requested_at", None)
        if requested_at is not None:
            out["created_at"] = requested_at
        return out


# --------------------------------------------------------------------------- kinds


def table_of(model: type[Base]) -> Table:
    """The model's table, typed as one (SQLAlchemy types `__table__` as any FROM clause)."""
    return Base.metadata.tables[model.__tablename__]


@dataclass(frozen=True)
class Kind:
    """What a file of one kind holds: its row model, and the model and audit entity it writes."""

    name: str
    entity: str  # AuditEntry.entity
    model: type[Base]
    row: type[ImportRow]

    @property
    def table(self) -> Table:
        return table_of(self.model)


KIND_SPECS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("clients", "client", Client, ClientRow),
        Kind("products", "product", Product, ProductRow),
        Kind("services", "service", Service, ServiceRow),
        Kind("addons", "addon", ServiceAddon, AddonRow),
        Kind("invoices", "invoice", Invoice, InvoiceRow),
        Kind("requests", "request", CancellationRequest, RequestRow),
    )
}
assert tuple(KIND_SPECS) == KINDS


def required_columns(kind: str) -> tuple[str, ...]:
    """The columns a file of this kind must have."""
    return KIND_SPECS[kind].row.required_columns()


def allowed_columns(kind: str) -> tuple[str, ...]:
    """Every column a file of this kind may have."""
    return KIND_SPECS[kind].row.columns()


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


def check_columns(path: Path, kind: str, columns: Sequence[str], *, jsonl: bool) -> None:
    """InputError for a column the kind does not have, or a required one a CSV header lacks."""
    allowed = allowed_columns(kind)
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        names = ", ".join(repr(c) for c in unknown)
        raise InputError(f"{path}: unknown column{'s' if len(unknown) > 1 else ''} {names} for {kind} "
                         f"(allowed: {', '.join(allowed)})")
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


def validate_rows(
    path: Path, kind: Kind, parsed: ParsedFile, settings: Settings, now: dt.datetime
) -> tuple[list[tuple[int, ImportRow]], list[RowError]]:
    """Every row through its pydantic model: the good ones, and an error per bad value."""
    good: list[tuple[int, ImportRow]] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    context = {"reason_codes": list(settings.reason_codes), "zone": settings.zone, "now": now}
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
