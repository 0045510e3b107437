"""`cancelproc import --from whmcs SOURCE`: WHMCS's own tables, as WHMCS keeps them.

SOURCE is a folder of CSV exports named after the tables (tblclients.csv, ...; header row
of WHMCS's column names) or the URL of the WHMCS MySQL/MariaDB database, which is read in
one read-only transaction and never written. Each table is mapped to the rows of one of
the generic importer's kinds (clients, products, services, add-ons, invoices, requests),
WHMCS's ids becoming external ids, and imported by it: the same checks, the same upserts
and the same guards (a re-import changes nothing, a cancellation made here is never
reverted). Unlike a list of files, the whole import is one transaction: every table or
none. A bad value is named by its file (or table), line (or id) and WHMCS column.

What WHMCS has no column for, or keeps differently, is decided here: language names
become codes, a free-text reason gets a reason code through the keyword map of the
settings, an invoice is tied to the one service its items bill, a client's balance is
its unpaid invoices less its credit. docs/whmcs-import.md lists the mapping.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from processor.config import Settings
from processor.db import Database, retrying_transaction
from processor.errors import InputError
from processor.importer import (
    Batch,
    FileReport,
    ImportRejected,
    ParsedFile,
    RowError,
    apply,
    read_file,
    validate,
)
from processor.models import CLOSED_SERVICE_STATUSES, ServiceStatus

# The tables read, in the order their rows are imported, with the columns each must have.
# Other columns (a `SELECT *` export has dozens) are ignored.
TABLES: dict[str, tuple[str, ...]] = {
    "tblclients": ("id", "firstname", "email"),
    "tblproducts": ("id", "name"),
    "tblhosting": ("id", "userid", "packageid", "domainstatus"),
    "tbladdons": ("id", "name"),
    "tblhostingaddons": ("id", "hostingid", "status"),
    "tblinvoices": ("id", "userid", "status", "total"),
    "tblinvoiceitems": ("id", "invoiceid", "type", "relid"),
    "tblcancelrequests": ("id", "relid", "type"),
}

# Every column read (the required ones and those used when present). From the database
# only these are selected: no password column, no card data, leaves WHMCS.
USED: dict[str, tuple[str, ...]] = {
    "tblclients": ("id", "firstname", "lastname", "companyname", "email", "language", "credit"),
    "tblproducts": ("id", "name", "servertype"),
    "tblhosting": ("id", "userid", "packageid", "domainstatus", "domain", "billingcycle", "amount", "nextduedate",
                   "termination_date", "regdate", "subscriptionid"),
    "tbladdons": ("id", "name"),
    "tblhostingaddons": ("id", "hostingid", "addonid", "name", "status", "recurring", "billingcycle", "nextduedate"),
    "tblinvoices": ("id", "userid", "status", "total", "duedate"),
    "tblinvoiceitems": ("id", "invoiceid", "type", "relid"),
    "tblcancelrequests": ("id", "date", "relid", "reason", "type"),
}
assert all(set(TABLES[t]) <= set(USED[t]) for t in TABLES)

# WHMCS's language names (its lang/ files) -> the codes templates and dates use.
LANGUAGES = {
    "arabic": "ar", "azerbaijani": "az", "catalan": "ca", "chinese": "zh", "croatian": "hr", "czech": "cs",
    "danish": "da", "dutch": "nl", "english": "en", "estonian": "et", "farsi": "fa", "finnish": "fi",
    "french": "fr", "german": "de", "greek": "el", "hebrew": "he", "hungarian": "hu", "indonesian": "id",
    "italian": "it", "japanese": "ja", "korean": "ko", "macedonian": "mk", "norwegian": "nb", "polish": "pl",
    "portuguese-br": "pt_BR", "portuguese-pt": "pt_PT", "romanian": "ro", "russian": "ru", "slovak": "sk",
    "spanish": "es", "swedish": "sv", "turkish": "tr", "ukranian": "uk", "ukrainian": "uk", "vietnamese": "vi",
}

# WHMCS's "Completed" (a one-time service delivered) has nothing left to cancel: Terminated here.
SERVICE_STATUSES = {"completed": ServiceStatus.TERMINATED.value}
# Billing cycles with no next due date: a request for them is due at once (WHMCS keeps 0000-00-00).
UNDATED_CYCLES = frozenset({"free account", "free", "one time", "onetime"})
# Invoice statuses the run has a use for; Draft, Refunded, Collections and Payment Pending
# invoices are left out (the run cancels Unpaid invoices only, as WHMCS does).
INVOICE_STATUSES = frozenset({"unpaid", "paid", "cancelled"})
# Invoice item types whose relid names a service (Hosting) or an add-on of one (Addon).
SERVICE_ITEM_TYPES = frozenset({"hosting", "addon"})


# --------------------------------------------------------------------------- reading


@dataclass
class Table:
    """One WHMCS table's rows, every value as the text a CSV export holds."""

    name: str
    where: Path  # what errors name: the CSV file, or the table (database)
    rows: list[tuple[int, dict[str, str]]]  # (line, or id for a database; column -> value)
    by_id: bool = False  # rows are numbered by their id (a database), not by line

    def error(self, line: int, column: str, message: str) -> RowError:
        return (RowAtId if self.by_id else RowError)(self.where, line, column, message)


@dataclass(frozen=True)
class RowAtId(RowError):
    """A bad value of a row read from the database: named by the table and the row's id."""

    def __str__(self) -> str:
        return f"{self.path} id {self.line}: {self.field}: {self.message}"


def is_database_url(source: str) -> bool:
    return "://" in source


def shown_source(source: str) -> str:
    """The source as messages name it: a database URL without its password."""
    if not is_database_url(source):
        return source
    try:
        return make_url(source).render_as_string(hide_password=True)
    except ArgumentError:
        return "the database URL"


def read_source(source: str) -> tuple[str, dict[str, Table]]:
    """(what to call the source, its tables by name); InputError if it cannot be read."""
    if is_database_url(source):
        return read_database(source)
    return str(source), read_folder(Path(source))


def read_folder(folder: Path) -> dict[str, Table]:
    """The tables a folder of CSV exports has (tblclients.csv, ...); the others are skipped."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of WHMCS CSV exports (tblclients.csv, ...) "
                         "nor a database URL (mysql+pymysql://user:password@host/whmcs)")
    tables: dict[str, Table] = {}
    for name in TABLES:
        path = folder / f"{name}.csv"
        if not path.exists():
            continue
        parsed = read_file(path)
        if parsed.jsonl:
            raise InputError(f"{path}: not CSV")
        _check_columns(path, name, parsed.columns)
        rows = [(line, {k: _csv_cell(v) for k, v in row.items() if k in USED[name]}) for line, row in parsed.rows]
        tables[name] = Table(name, path, rows)
    if not tables:
        expected = ", ".join(f"{t}.csv" for t in TABLES)
        raise InputError(f"{folder}: none of WHMCS's tables is there (expected {expected})")
    return tables


def read_database(url: str) -> tuple[str, dict[str, Table]]:
    """Every table of TABLES the database has, read in one read-only transaction."""
    shown, engine_url = _mysql_url(url)
    try:
        engine = create_engine(engine_url, poolclass=NullPool)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise InputError(f"{shown}: not a database URL this import reads ({exc})") from None
    tables: dict[str, Table] = {}
    try:
        with engine.connect() as conn:
            # Read only, one snapshot: what a WHMCS cron writes meanwhile is not half seen.
            conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
            conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            present: dict[str, list[str]] = defaultdict(list)
            for table, column in conn.execute(text(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = DATABASE() ORDER BY table_name, ordinal_position")):
                present[str(table)].append(str(column).lower())
            for name in TABLES:
                if name not in present:
                    continue
                _check_columns(Path(name), name, present[name])
                columns = [c for c in USED[name] if c in present[name]]
                result = conn.exec_driver_sql(
                    f"SELECT {', '.join(f'`{c}`' for c in columns)} FROM `{name}` ORDER BY id")
                rows = [dict(zip(columns, (_cell(v) for v in row), strict=True)) for row in result]
                tables[name] = Table(name, Path(name), [(int(r["id"]), r) for r in rows], by_id=True)
            conn.rollback()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise InputError(f"{shown}: cannot read the WHMCS database: {reason}") from None
    finally:
        engine.dispose()
    if not tables:
        raise InputError(f"{shown}: none of WHMCS's tables is there (expected {', '.join(TABLES)})")
    return shown, tables


def _mysql_url(url: str) -> tuple[str, str]:
    """(the URL without its password, the URL SQLAlchemy opens with PyMySQL)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError("cannot parse the database URL (e.g. mysql+pymysql://user:password@host/whmcs)") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        raise InputError(f"{shown}: WHMCS runs on MySQL or MariaDB: give mysql+pymysql://user:password@host/whmcs")
    parsed = parsed.set(drivername=f"{parsed.get_backend_name()}+pymysql")
    if "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return shown, parsed.render_as_string(hide_password=False)


def _check_columns(where: Path, table: str, columns: Sequence[str]) -> None:
    missing = [c for c in TABLES[table] if c not in columns]
    if missing:
        raise InputError(f"{where}: missing column(s) of WHMCS's {table}: {', '.join(missing)}")


def _csv_cell(value: Any) -> str:
    """A CSV cell; `NULL` is how phpMyAdmin's CSV export writes a NULL by default."""
    cell = _cell(value)
    return "" if cell == "NULL" else cell


def _cell(value: Any) -> str:
    """A value as a CSV export writes it: the database's and the folder's rows map alike."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value).strip()


# --------------------------------------------------------------------------- mapping


@dataclass
class Mapped:
    """One table's rows as rows of a generic import kind."""

    kind: str
    table: Table
    rows: list[tuple[int, dict[str, Any]]]
    columns: dict[str, str]  # our column -> the WHMCS column it came from (for error messages)


@dataclass
class MappingResult:
    """What the tables map to, what was left out and why, and the values that are wrong."""

    mapped: list[Mapped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


def map_tables(tables: Mapping[str, Table], settings: Settings) -> MappingResult:
    out = MappingResult()
    unpaid = _unpaid_by_client(tables.get("tblinvoices"), out)
    for mapper in (_clients, _products, _services, _addons, _invoices, _requests):
        mapper(tables, settings, out, unpaid)
    return out


def _money(table: Table, line: int, column: str, value: str, out: MappingResult) -> Decimal | None:
    try:
        amount = Decimal(value or "0")
    except decimal.InvalidOperation:
        out.errors.append(table.error(line, column, f"must be a number (got {value!r})"))
        return None
    if not amount.is_finite():
        out.errors.append(table.error(line, column, f"must be a number (got {value!r})"))
        return None
    return amount


def _unpaid_by_client(invoices: Table | None, out: MappingResult) -> dict[str, Decimal]:
    """Client id -> the total of its Unpaid invoices (what WHMCS shows as due)."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    if invoices is None:
        return totals
    for line, row in invoices.rows:
        if row["status"].strip().lower() == "unpaid":
            amount = _money(invoices, line, "total", row["total"], out)
            if amount is not None:
                totals[row["userid"]] += amount
    return totals


def _clients(tables: Mapping[str, Table], settings: Settings, out: MappingResult, unpaid: dict[str, Decimal]) -> None:
    table = tables.get("tblclients")
    if table is None:
        return
    default = settings.whmcs.default_language
    unknown: dict[str, list[str]] = defaultdict(list)
    rows = []
    for line, r in table.rows:
        language = r.get("language", "").strip().lower()
        if language and language not in LANGUAGES:
            unknown[language].append(r["id"])
        credit = _money(table, line, "credit", r.get("credit", ""), out)
        balance = "" if credit is None else str(unpaid.get(r["id"], Decimal(0)) - credit)
        rows.append((line, {
            "external_id": r["id"], "first_name": r["firstname"], "last_name": r.get("lastname", ""),
            "company_name": r.get("companyname", ""), "email": r["email"],
            "language": LANGUAGES.get(language, default), "balance": balance,
        }))
    for name, ids in unknown.items():
        _note(out, f"{table.where}: language {name!r} is not one this import knows ({len(ids)} client(s): "
                   f"{_ids(ids)}); they get {default!r} (setting whmcs.default_language)")
    out.mapped.append(Mapped("clients", table, rows, {
        "external_id": "id", "first_name": "firstname", "last_name": "lastname", "company_name": "companyname",
        "email": "email", "language": "language", "balance": "credit"}))


def _products(tables: Mapping[str, Table], settings: Settings, out: MappingResult, unpaid: dict[str, Decimal]) -> None:
    table = tables.get("tblproducts")
    if table is None:
        return
    rows = [(line, {"external_id": r["id"], "name": r["name"], "module": r.get("servertype", "")})
            for line, r in table.rows]
    out.mapped.append(Mapped("products", table, rows, {"external_id": "id", "name": "name", "module": "servertype"}))


def _service_status(word: str) -> str:
    return SERVICE_STATUSES.get(word.strip().lower(), word)


def _services(tables: Mapping[str, Table], settings: Settings, out: MappingResult, unpaid: dict[str, Decimal]) -> None:
    table = tables.get("tblhosting")
    if table is None:
        return
    rows = []
    for line, r in table.rows:
        cycle = r.get("billingcycle", "")
        rows.append((line, {
            "external_id": r["id"], "client_external_id": r["userid"], "product_external_id": r["packageid"],
            "status": _service_status(r["domainstatus"]), "domain": r.get("domain", ""), "billing_cycle": cycle,
            "amount": r.get("amount", ""),
            "next_due_date": "" if cycle.strip().lower() in UNDATED_CYCLES else r.get("nextduedate", ""),
            "termination_date": r.get("termination_date", ""), "registration_date": r.get("regdate", ""),
            "subscription_id": r.get("subscriptionid", ""),
        }))
    out.mapped.append(Mapped("services", table, rows, {
        "external_id": "id", "client_external_id": "userid", "product_external_id": "packageid",
        "status": "domainstatus", "domain": "domain", "billing_cycle": "billingcycle", "amount": "amount",
        "next_due_date": "nextduedate", "termination_date": "termination_date", "registration_date": "regdate",
        "subscription_id": "subscriptionid"}))


def _addons(tables: Mapping[str, Table], settings: Settings, out: MappingResult, unpaid: dict[str, Decimal]) -> None:
    table = tables.get("tblhostingaddons")
    if table is None:
        return
    catalogue = {r["id"]: r["name"] for _line, r in tables["tbladdons"].rows} if "tbladdons" in tables else {}
    rows = []
    for line, r in table.rows:
        # A predefined add-on's name is in tbladdons; a custom one's in the row itself.
        name = r.get("name", "") or catalogue.get(r.get("addonid", ""), "")
        if not name:
            out.errors.append(table.error(line, "name", f"empty, and addonid {r.get('addonid', '')!r} names no "
                                                        "add-on of tbladdons"))
            continue
        # Its own next due date (an add-on request's End of Billing Period); none for a free
        # or one-time add-on, as for services.
        cycle = r.get("billingcycle", "")
        rows.append((line, {"external_id": r["id"], "service_external_id": r["hostingid"], "name": name,
                            "status": _service_status(r["status"]), "amount": r.get("recurring", ""),
                            "next_due_date": "" if cycle.strip().lower() in UNDATED_CYCLES
                            else r.get("nextduedate", "")}))
    out.mapped.append(Mapped("addons", table, rows, {
        "external_id": "id", "service_external_id": "hostingid", "name": "name", "status": "status",
        "amount": "recurring", "next_due_date": "nextduedate"}))


def _invoice_services(tables: Mapping[str, Table]) -> dict[str, set[str]]:
    """Invoice id -> the services its items bill (Hosting items, and Addon items through
    the add-on's service)."""
    addon_service = {r["id"]: r["hostingid"] for _line, r in tables["tblhostingaddons"].rows} \
        if "tblhostingaddons" in tables else {}
    services: dict[str, set[str]] = defaultdict(set)
    for _line, item in tables["tblinvoiceitems"].rows:
        kind = item["type"].strip().lower()
        if kind == "hosting":
            services[item["invoiceid"]].add(item["relid"])
        elif kind == "addon" and item["relid"] in addon_service:
            services[item["invoiceid"]].add(addon_service[item["relid"]])
    return services


def _invoices(tables: Mapping[str, Table], settings: Settings, out: MappingResult, unpaid: dict[str, Decimal]) -> None:
    table = tables.get("tblinvoices")
    if table is None:
        return
    if "tblinvoiceitems" not in tables:
        _note(out, f"{table.where}: not imported: without tblinvoiceitems no invoice can be tied to its service")
        return
    services = _invoice_services(tables)
    rows = []
    unbilled: list[str] = []
    several: list[str] = []
    other_status: dict[str, list[str]] = defaultdict(list)
    for line, r in table.rows:
        billed = services.get(r["id"], set())
        if r["status"].strip().lower() not in INVOICE_STATUSES:
            other_status[r["status"]].append(r["id"])
        elif not billed:
            unbilled.append(r["id"])
        elif len(billed) > 1:
            several.append(r["id"])
        else:
            rows.append((line, {"external_id": r["id"], "service_external_id": next(iter(billed)),
                                "amount": r["total"], "status": r["status"], "due_date": r.get("duedate", "")}))
    if unbilled:
        _note(out, f"{table.where}: {len(unbilled)} invoice(s) bill no service (domains, other items): "
                   f"left out ({_ids(unbilled)})")
    if several:
        _note(out, f"{table.where}: {len(several)} invoice(s) bill several services: left out, so a cancellation "
                   f"never cancels another service's invoice; cancel them in WHMCS ({_ids(several)})")
    for status, ids in other_status.items():
        _note(out, f"{table.where}: {len(ids)} invoice(s) with status {status!r}: left out (the run cancels "
                   f"Unpaid invoices only) ({_ids(ids)})")
    out.mapped.append(Mapped("invoices", table, rows, {
        "external_id": "id", "service_external_id": "relid (tblinvoiceitems)", "amount": "total", "status": "status",
        "due_date": "duedate"}))


def reason_code(reason: str, keywords: Mapping[str, str], default: str) -> str:
    """The code of the first keyword the reason contains (any letter case), else the default."""
    folded = reason.casefold()
    return next((code for word, code in keywords.items() if word.casefold() in folded), default)


def _requests(tables: Mapping[str, Table], settings: Settings, out: MappingResult, unpaid: dict[str, Decimal]) -> None:
    table = tables.get("tblcancelrequests")
    if table is None:
        return
    _check_reason_settings(settings)
    closed_words = {s.value.lower() for s in CLOSED_SERVICE_STATUSES}
    closed = {r["id"] for _line, r in tables["tblhosting"].rows
              if _service_status(r["domainstatus"]).lower() in closed_words} if "tblhosting" in tables else set()
    keywords, default = settings.whmcs.reason_keywords, settings.whmcs.default_reason_code
    rows = []
    done: list[str] = []
    for line, r in table.rows:
        if r["relid"] in closed:
            done.append(r["id"])  # WHMCS cancelled the service already: nothing left to do here
            continue
        reason = r.get("reason", "")
        rows.append((line, {"external_id": r["id"], "service_external_id": r["relid"], "type": r["type"],
                            "reason": reason, "reason_code": reason_code(reason, keywords, default),
                            "requested_at": r.get("date", "")}))
    if done:
        _note(out, f"{table.where}: {len(done)} request(s) for services WHMCS shows closed: left out ({_ids(done)})")
    out.mapped.append(Mapped("requests", table, rows, {
        "external_id": "id", "service_external_id": "relid", "type": "type", "reason": "reason",
        "reason_code": "reason", "requested_at": "date"}))


def _check_reason_settings(settings: Settings) -> None:
    codes = settings.reason_codes
    used = [("whmcs.default_reason_code", settings.whmcs.default_reason_code)] + [
        (f"whmcs.reason_keywords[{word!r}]", code) for word, code in settings.whmcs.reason_keywords.items()]
    for where, code in used:
        if code not in codes:
            raise InputError(f"setting {where}: {code!r} is not one of reason_codes ({', '.join(codes)})")


def _ids(ids: Iterable[str], shown: int = 10) -> str:
    ids = list(ids)
    more = len(ids) - shown
    return "ids " + ", ".join(ids[:shown]) + (f" and {more} more" if more > 0 else "")


def _note(out: MappingResult, message: str) -> None:
    out.notes.append(message)
    structlog.get_logger("cancelproc.import").warning(message)


# --------------------------------------------------------------------------- importing


@dataclass
class WhmcsReport:
    """What importing a WHMCS source did: a report per table, and what was left out."""

    source: str
    reports: list[FileReport]
    notes: list[str]


def _renamed(errors: Sequence[RowError], mapped: Mapped) -> list[RowError]:
    """The importer's errors with the WHMCS column (and, from a database, the row's id)."""
    table = mapped.table
    out = []
    for e in errors:
        message = e.message.replace("with external_id", "with id")
        out.append(table.error(e.line, mapped.columns.get(e.field, e.field), message))
    return out


def import_whmcs(
    db: Database,
    source: str,
    *,
    settings: Settings,
    now: dt.datetime,
    actor: str = "import",
    read: Callable[[str], tuple[str, dict[str, Table]]] = read_source,
) -> WhmcsReport:
    """Import a WHMCS source in one transaction; see the module docstring.

    Raises InputError when the source cannot be read, and ImportRejected listing every bad
    value; in both cases nothing is written.
    """
    shown, tables = read(source)
    mapping = map_tables(tables, settings)
    errors = list(mapping.errors)
    batches: list[tuple[Batch, Mapped]] = []
    for m in mapping.mapped:
        parsed = ParsedFile(list(m.columns), m.rows, jsonl=False)
        batch = validate(m.table.where, m.kind, parsed, settings=settings, now=now)
        errors += _renamed(batch.errors, m)
        batches.append((batch, m))
    if errors:
        order = {t.where: n for n, t in enumerate(tables.values())}  # TABLES order: clients first
        errors.sort(key=lambda e: (order.get(e.path, len(order)), e.line))
        # One value can be wrong for two reasons (an invoice's total: its amount, its client's balance).
        raise ImportRejected(list({(e.path, e.line, e.field): e for e in reversed(errors)}.values())[::-1])
    for attempt in retrying_transaction():
        with attempt, db.session.begin() as s:
            reports = []
            for batch, m in batches:
                try:
                    reports.append(apply(s, batch, actor=actor, now=now, settings=settings))
                except ImportRejected as exc:
                    raise ImportRejected(_renamed(exc.errors, m)) from None  # rolls every table back
    return WhmcsReport(shown, reports, mapping.notes)
