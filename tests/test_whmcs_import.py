"""`cancelproc import --from whmcs SOURCE`: WHMCS's own tables (tests/data/whmcs, real WHMCS
column names, most of them ignored), from the CSV folder and from a real MariaDB server,
then a run with the outcome the data promises.

The dataset (as of 2026-11-26):
  clients 1 Anna (german, credit 5.00, unpaid 14.95), 2 Bob (english, unpaid 122.00),
          3 Chloé (klingon: unknown), 4 Dirk (no language: WHMCS's default)
  service 10 Anna, Monthly, due 11-20, add-ons 1 (Daily Backups, from tbladdons) and 2;
             request 100 End of Billing Period made 11-02: due, 6 days late
  service 11 Bob, Annually, due 2027-03-01; request 101: not due
  service 12 Bob, Free Account; request 102 End of Billing Period: due at once
  service 13 Chloé, One Time, Completed (Terminated here)
  service 14 Dirk, Quarterly, due 12-10; request 103 Immediate made 11-25: due
  service 15 Anna, Cancelled in WHMCS; its request 99 is left out
  invoices 1001 (Unpaid, service 10 and its add-on), 1002 (Paid, 10), 1004 (Unpaid, 14);
           1003 bills services 11 and 12, 1005 a domain, 1006 is Refunded: left out
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pymysql
import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from processor.db import Database
from processor.models import (
    AuditEntry,
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
from processor.whmcs_import import USED, reason_code
from tests.cli_helpers import Invoke, as_json, ok
from tests.conftest import IN_CI

DATA = Path(__file__).parent / "data" / "whmcs"
NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
KEYWORDS = json.dumps({"expensive": "too_expensive", "provider": "switched_service",
                       "no longer": "unused"})
ENV = {"CANCELPROC_WHMCS__REASON_KEYWORDS": KEYWORDS, "CANCELPROC_EMAIL__STAFF_ADDRESS": ""}


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as frozen_time:
        yield frozen_time


def by_ext(db: Database, model: Any) -> dict[str, Any]:
    with db.read_session() as s:
        return {row.external_id: row for row in s.scalars(select(model))}


def counts(db: Database) -> dict[str, int]:
    with db.read_session() as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                for m in (Client, Product, Service, ServiceAddon, Invoice, CancellationRequest, AuditEntry)}


def check_imported(db: Database) -> None:
    """What the dataset maps to, whichever source it came from."""
    clients = by_ext(db, Client)
    assert {k: (c.first_name, c.last_name, c.company_name, c.email, c.language, c.balance)
            for k, c in clients.items()} == {
        "1": ("Anna", "Schmidt", "Schmidt GmbH", "anna@example.test", "de", Decimal("9.95")),
        "2": ("Bob", "Jones", "", "bob@example.test", "en", Decimal("122.00")),
        "3": ("Chloé", "Martin", "", "chloe@example.test", "en", Decimal("0.00")),
        "4": ("Dirk", "de Vries", "De Vries BV", "dirk@example.test", "en", Decimal("30.00")),
    }
    assert {k: (p.name, p.module) for k, p in by_ext(db, Product).items()} == {
        "1": ("Web Hosting Pro", "cpanel"), "2": ("Managed Support", None), "3": ("VPS S", "proxmox")}
    services = by_ext(db, Service)
    ids = {k: s.id for k, s in services.items()}
    assert {k: (s.client_id, s.status, s.domain, s.billing_cycle, s.amount, s.next_due_date, s.termination_date,
                s.registration_date, s.subscription_id) for k, s in services.items()} == {
        "10": (clients["1"].id, ServiceStatus.ACTIVE, "anna-shop.test", "Monthly", Decimal("12.95"),
               dt.date(2026, 11, 20), None, dt.date(2019, 3, 4), "sub_A10"),
        "11": (clients["2"].id, ServiceStatus.ACTIVE, "vps.bob.test", "Annually", Decimal("120.00"),
               dt.date(2027, 3, 1), None, dt.date(2020, 7, 15), None),
        "12": (clients["2"].id, ServiceStatus.ACTIVE, "", "Free Account", Decimal("0.00"), None, None,
               dt.date(2020, 7, 15), None),
        "13": (clients["3"].id, ServiceStatus.TERMINATED, "chloe.test", "One Time", Decimal("49.00"), None, None,
               dt.date(2021, 1, 20), None),
        "14": (clients["4"].id, ServiceStatus.ACTIVE, "dirk.test", "Quarterly", Decimal("30.00"),
               dt.date(2026, 12, 10), None, dt.date(2022, 5, 2), None),
        "15": (clients["1"].id, ServiceStatus.CANCELLED, "old.anna.test", "Monthly", Decimal("9.95"),
               dt.date(2025, 6, 1), dt.date(2025, 6, 30), dt.date(2018, 6, 1), None),
    }
    assert {k: (a.service_id, a.name, a.status, a.amount) for k, a in by_ext(db, ServiceAddon).items()} == {
        "1": (ids["10"], "Daily Backups", ServiceStatus.ACTIVE, Decimal("2.00")),
        "2": (ids["10"], "Dedicated IP", ServiceStatus.ACTIVE, Decimal("3.00")),
        "3": (ids["11"], "Daily Backups", ServiceStatus.ACTIVE, Decimal("2.00")),
    }
    assert {k: (i.service_id, i.amount, i.status, i.due_date) for k, i in by_ext(db, Invoice).items()} == {
        "1001": (ids["10"], Decimal("14.95"), InvoiceStatus.UNPAID, dt.date(2026, 11, 20)),
        "1002": (ids["10"], Decimal("14.95"), InvoiceStatus.PAID, None),  # duedate NULL
        "1004": (ids["14"], Decimal("30.00"), InvoiceStatus.UNPAID, dt.date(2026, 12, 10)),
    }
    utc = dt.UTC
    assert {k: (r.service_id, r.type, r.reason_code, r.reason, r.status, r.created_at)
            for k, r in by_ext(db, CancellationRequest).items()} == {
        "100": (ids["10"], RequestType.END_OF_BILLING_PERIOD, "switched_service", "Moving to another provider",
                RequestStatus.PENDING, dt.datetime(2026, 11, 2, 10, 15, tzinfo=utc)),
        "101": (ids["11"], RequestType.END_OF_BILLING_PERIOD, "unused", "No longer needed",
                RequestStatus.PENDING, dt.datetime(2026, 11, 24, 16, 40, tzinfo=utc)),
        "102": (ids["12"], RequestType.END_OF_BILLING_PERIOD, "other", "", RequestStatus.PENDING,
                dt.datetime(2026, 11, 25, 9, 0, tzinfo=utc)),
        "103": (ids["14"], RequestType.IMMEDIATE, "too_expensive", "Too expensive for us", RequestStatus.PENDING,
                dt.datetime(2026, 11, 25, 14, 30, tzinfo=utc)),
    }


EXPECTED_COUNTS = {"clients": 4, "products": 3, "services": 6, "service_addons": 3, "invoices": 3,
                   "cancellation_requests": 4}


def check_run(invoke: Invoke, db: Database) -> None:
    """A run for a night the import came after (the requests keep their own dates, so it
    takes them), then tonight's run: requests 100, 102 and 103 cancel their services."""
    preview = as_json(invoke("run", "--as-of", "2026-11-25", "--dry-run", "--json", env=ENV))
    requests = by_ext(db, CancellationRequest)
    assert sorted(i["request_id"] for i in preview["requests"]) == sorted(
        requests[k].id for k in ("100", "102", "103"))

    summary = as_json(invoke("run", "--json", env=ENV))
    assert (summary["due"], summary["completed"], summary["failed"], summary["max_days_late"]) == (3, 3, 0, 6)
    services = by_ext(db, Service)
    assert {k: s.status for k, s in services.items()} == {
        "10": ServiceStatus.CANCELLED, "11": ServiceStatus.ACTIVE, "12": ServiceStatus.CANCELLED,
        "13": ServiceStatus.TERMINATED, "14": ServiceStatus.CANCELLED, "15": ServiceStatus.CANCELLED}
    assert {k: a.status for k, a in by_ext(db, ServiceAddon).items()} == {
        "1": ServiceStatus.CANCELLED, "2": ServiceStatus.CANCELLED, "3": ServiceStatus.ACTIVE}
    assert {k: i.status for k, i in by_ext(db, Invoice).items()} == {
        "1001": InvoiceStatus.CANCELLED, "1002": InvoiceStatus.PAID, "1004": InvoiceStatus.CANCELLED}
    requests = by_ext(db, CancellationRequest)
    assert {k: (r.status, r.days_late) for k, r in requests.items()} == {
        "100": (RequestStatus.COMPLETED, 6), "101": (RequestStatus.PENDING, None),
        "102": (RequestStatus.COMPLETED, 0), "103": (RequestStatus.COMPLETED, 0)}


def check_reimport_after_run(invoke: Invoke, db: Database, source: str) -> None:
    """WHMCS still shows the services Active: the import names each cancellation made here
    as a conflict, exit 1, and reverts none of them."""
    statuses = {k: s.status for k, s in by_ext(db, Service).items()}
    result = ok(invoke("import", "--from", "whmcs", source, "--json", env=ENV), code=1)
    report = json.loads(result.stdout)
    conflicts = {t["kind"]: sorted(c["external_id"] for c in t["conflicts"]) for t in report["tables"]}
    assert conflicts == {"clients": [], "products": [], "services": ["10", "12", "14"], "addons": ["1", "2"],
                         "invoices": ["1001", "1004"], "requests": []}
    assert all(t["inserted"] == t["updated"] == 0 for t in report["tables"])
    assert {k: s.status for k, s in by_ext(db, Service).items()} == statuses


# --------------------------------------------------------------------------- from the CSV folder


def test_whmcs_csv_folder_import_then_run(invoke: Invoke, db: Database) -> None:
    result = ok(invoke("import", "--from", "whmcs", DATA, env=ENV))
    lines = result.stdout.splitlines()
    assert lines[0] == f"WHMCS {DATA}:"
    assert f"{DATA / 'tblhosting.csv'} (services): 6 inserted, 0 updated, 0 unchanged, 0 conflict(s)" in lines
    notes = [line for line in result.stderr.splitlines() if "[warning" in line]  # the log
    assert any("language 'klingon' is not one this import knows (1 client(s): ids 3); they get 'en'" in n
               for n in notes)
    assert any("1 invoice(s) bill several services: left out" in n and "ids 1003" in n for n in notes)
    assert any("1 invoice(s) bill no service" in n and "ids 1005" in n for n in notes)
    assert any("with status 'Refunded': left out" in n for n in notes)
    assert any("1 request(s) for services WHMCS shows closed: left out (ids 99)" in n for n in notes)
    assert {k: v for k, v in counts(db).items() if k != "audit_log"} == EXPECTED_COUNTS
    check_imported(db)

    again = json.loads(ok(invoke("import", "--from", "whmcs", DATA, "--json", env=ENV)).stdout)
    assert {t["kind"]: (t["inserted"], t["updated"], t["unchanged"]) for t in again["tables"]} == {
        "clients": (0, 0, 4), "products": (0, 0, 3), "services": (0, 0, 6), "addons": (0, 0, 3),
        "invoices": (0, 0, 3), "requests": (0, 0, 4)}

    shown = as_json(invoke("services", "show", by_ext(db, Service)["10"].id, "--json"))
    assert (shown["registration_date"], shown["subscription_id"]) == ("2019-03-04", "sub_A10")

    check_run(invoke, db)
    check_reimport_after_run(invoke, db, str(DATA))


def _copy(tmp_path: Path, *tables: str) -> Path:
    folder = tmp_path / "whmcs"
    folder.mkdir()
    for name in tables or [p.stem for p in DATA.glob("*.csv")]:
        shutil.copy(DATA / f"{name}.csv", folder / f"{name}.csv")
    return folder


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_bad_values_are_named_by_file_line_and_whmcs_column_and_nothing_is_written(
    invoke: Invoke, db: Database, tmp_path: Path
) -> None:
    folder = _copy(tmp_path)
    _replace(folder / "tblclients.csv", "bob@example.test", "bob at example")
    _replace(folder / "tblhosting.csv", "Annually,2027-03-01", "Annually,2027-13-01")
    _replace(folder / "tblcancelrequests.csv", "14,Too expensive for us,Immediate", "14,Too expensive,Now")
    _replace(folder / "tblhostingaddons.csv", "3,511,11,1,", "3,511,11,7,")  # addonid 7: no such add-on
    result = invoke("import", "--from", "whmcs", folder, env=ENV)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {folder / 'tblclients.csv'}:3: email: 'bob at example' is not an email address",
        f"error: {folder / 'tblhosting.csv'}:3: nextduedate: '2027-13-01' is not a valid date",
        f"error: {folder / 'tblhostingaddons.csv'}:4: name: empty, and addonid '7' names no add-on of tbladdons",
        f"error: {folder / 'tblcancelrequests.csv'}:6: type: must be one of Immediate, End of Billing Period, "
        "On Date, immediate, end-of-period, on-date (got 'Now')",
        f"error: {folder}: rejected, 4 bad row(s); nothing was imported",
    ]
    assert "Traceback" not in result.output
    assert set(counts(db).values()) == {0}  # the good tables are not imported either


@pytest.mark.sqlite_only
def test_reference_errors_name_the_whmcs_column(invoke: Invoke, db: Database, tmp_path: Path) -> None:
    folder = _copy(tmp_path, "tblproducts", "tblhosting")  # no tblclients: userid names no client
    result = invoke("import", "--from", "whmcs", folder, env=ENV)
    assert result.exit_code == 2
    assert f"error: {folder / 'tblhosting.csv'}:2: userid: no client with id '1'" in result.stderr.splitlines()
    assert set(counts(db).values()) == {0}


@pytest.mark.sqlite_only
def test_tables_missing_from_the_folder_are_skipped(invoke: Invoke, db: Database, tmp_path: Path) -> None:
    folder = _copy(tmp_path, "tblclients", "tblproducts")
    result = ok(invoke("import", "--from", "whmcs", folder, env=ENV))
    assert re.findall(r"\((\w+)\):", result.stdout) == ["clients", "products"]
    # Without tblinvoices the balance is the credit alone.
    assert by_ext(db, Client)["1"].balance == Decimal("-5.00")


@pytest.mark.sqlite_only
def test_not_a_whmcs_source(invoke: Invoke, db: Database, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for source, message in [
        (tmp_path / "empty", "none of WHMCS's tables is there (expected tblclients.csv, tblproducts.csv"),
        (tmp_path / "nothing", "not a folder of WHMCS CSV exports (tblclients.csv, ...) nor a database URL"),
        ("postgresql://u:secret@localhost/whmcs", "WHMCS runs on MySQL or MariaDB"),
    ]:
        result = invoke("import", "--from", "whmcs", source)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert "secret" not in result.output
    cols = tmp_path / "cols"
    cols.mkdir()
    (cols / "tblhosting.csv").write_text("id,userid,domain\n1,1,a.test\n")
    result = invoke("import", "--from", "whmcs", cols)
    assert "tblhosting.csv: missing column(s) of WHMCS's tblhosting: packageid, domainstatus" in result.stderr
    assert invoke("import", "--from", "whmcs", cols, cols).exit_code == 2


def test_reason_codes_come_from_the_keyword_map() -> None:
    keywords = {"expensive": "too_expensive", "support": "customer_service"}
    assert reason_code("Far too EXPENSIVE", keywords, "other") == "too_expensive"
    assert reason_code("Support never answers, and it is expensive", keywords, "other") == "too_expensive"
    assert reason_code("", keywords, "other") == "other"


@pytest.mark.sqlite_only
def test_a_keyword_map_code_must_be_a_reason_code(invoke: Invoke, db: Database, tmp_path: Path) -> None:
    folder = _copy(tmp_path, "tblclients", "tblproducts", "tblhosting", "tblcancelrequests")
    result = invoke("import", "--from", "whmcs", folder,
                    env={"CANCELPROC_WHMCS__REASON_KEYWORDS": '{"price": "pricing"}'})
    assert result.exit_code == 2
    assert "setting whmcs.reason_keywords['price']: 'pricing' is not one of reason_codes" in result.stderr
    assert set(counts(db).values()) == {0}


# --------------------------------------------------------------------------- from a MariaDB server

# Column types as WHMCS declares them (the rest are text): the database hands back dates,
# Decimals and its zero dates, which the CSV folder has as text.
INT = "int(10) NOT NULL"
DATE = "date DEFAULT NULL"
DATETIME = "datetime DEFAULT NULL"
MONEY = "decimal(16,2) NOT NULL DEFAULT 0.00"
STATUS = "enum('Pending','Active','Suspended','Terminated','Cancelled','Fraud','Completed') NOT NULL DEFAULT 'Pending'"
TYPES = {
    **dict.fromkeys(("id", "userid", "orderid", "packageid", "server", "hostingid", "addonid", "relid", "invoiceid",
                     "qty", "gid", "currency", "promoid", "diskusage", "disklimit", "bwusage", "bwlimit"), INT),
    **dict.fromkeys(("regdate", "nextduedate", "nextinvoicedate", "termination_date", "completed_date", "duedate",
                     "datecreated"), DATE),
    **dict.fromkeys(("lastupdate", "datepaid", "last_capture_attempt", "date_refunded", "date_cancelled",
                     "created_at", "updated_at"), DATETIME),
    **dict.fromkeys(("amount", "firstpaymentamount", "credit", "subtotal", "tax2", "total", "recurring",
                     "setupfee"), MONEY),
}
TABLE_TYPES = {("tblhosting", "domainstatus"): STATUS, ("tblhostingaddons", "status"): STATUS,
               ("tblcancelrequests", "date"): "datetime NOT NULL DEFAULT '0000-00-00 00:00:00'",
               ("tblinvoices", "date"): DATE, ("tbladdons", "tax"): "tinyint(1) NOT NULL DEFAULT 0",
               ("tblinvoices", "tax"): MONEY}


def _load_whmcs_tables(server: Any, database: str) -> None:
    """The dataset's CSV files as WHMCS tables of a new database."""
    server.admin(f"CREATE DATABASE {database} CHARACTER SET utf8mb4")
    statements = []
    inserts = []
    for path in sorted(DATA.glob("*.csv")):
        header, *rows = _csv_rows(path)
        columns = ", ".join(f"`{c}` {TABLE_TYPES.get((path.stem, c)) or TYPES.get(c, 'text NOT NULL')}"
                            for c in header)
        statements.append(f"CREATE TABLE `{path.stem}` ({columns}, PRIMARY KEY (`id`)) ENGINE=InnoDB")
        marks = ", ".join(["%s"] * len(header))
        params = [[None if v == "NULL" or (v == "" and (TABLE_TYPES.get((path.stem, c)) or TYPES.get(c)) in (
            DATE, DATETIME)) else v for c, v in zip(header, row, strict=True)] for row in rows]
        inserts.append((f"INSERT INTO `{path.stem}` VALUES ({marks})", params))
    server.admin(*statements, database=database, rows=tuple(inserts))


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="session")
def mariadb() -> Iterator[Any]:
    """One MariaDB server for the session, holding the dataset as database `whmcs`, and a
    user who may only read it (the import needs no more: it never writes)."""
    from tests.mariadb_server import start_server

    try:
        server = start_server()
    except Exception as exc:  # noqa: BLE001 - whatever stops it, say so
        if IN_CI:
            pytest.fail(f"MariaDB test server did not start (CI needs it): {exc}")
        pytest.skip(f"no MariaDB test server (make test installs Debian's mariadb-server): {exc}")
    try:
        _load_whmcs_tables(server, "whmcs")
        # SELECT alone; on tblclients and tblhosting only the columns the import uses (not
        # their passwords): what it reads, and no more, is all it can read.
        grants = [f"GRANT SELECT ON whmcs.{t} TO 'reader'@'127.0.0.1'" for t in USED
                  if t not in ("tblclients", "tblhosting")]
        grants += [f"GRANT SELECT ({', '.join(USED[t])}) ON whmcs.{t} TO 'reader'@'127.0.0.1'"
                   for t in ("tblclients", "tblhosting")]
        server.admin("CREATE USER 'reader'@'127.0.0.1' IDENTIFIED BY 's3cret'", *grants)
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


def test_whmcs_database_import_then_run(invoke: Invoke, db: Database, mariadb: Any) -> None:
    """The same dataset from the database, by a user who can only SELECT: the same rows,
    the same run; the password never shows."""
    url = mariadb.url("reader", "s3cret", "whmcs")
    reader = pymysql.connect(host="127.0.0.1", port=mariadb.port, user="reader", password="s3cret", database="whmcs")
    with reader, reader.cursor() as cur, pytest.raises(pymysql.err.OperationalError, match="denied"):
        cur.execute("SELECT password FROM tblclients")  # what the grants keep from it
    result = ok(invoke("import", "--from", "whmcs", url, env=ENV))
    assert result.stdout.splitlines()[0] == f"WHMCS mysql+pymysql://reader:***@127.0.0.1:{mariadb.port}/whmcs:"
    assert "tblhosting (services): 6 inserted, 0 updated, 0 unchanged, 0 conflict(s)" in result.stdout
    assert "s3cret" not in result.output
    assert {k: v for k, v in counts(db).items() if k != "audit_log"} == EXPECTED_COUNTS
    check_imported(db)
    with db.read_session() as s:
        detail = s.scalars(select(AuditEntry.detail).where(AuditEntry.entity == "service")
                           .order_by(AuditEntry.id)).first()
    assert json.loads(detail or "{}") == {"source": "tblhosting:10", "external_id": "10"}  # table and id

    again = json.loads(ok(invoke("import", "--from", "whmcs", url, "--json", env=ENV)).stdout)
    assert sum(t["unchanged"] for t in again["tables"]) == 23
    check_run(invoke, db)
    check_reimport_after_run(invoke, db, url)


@pytest.mark.sqlite_only  # about reading the source: once is enough
def test_whmcs_database_errors_name_table_and_id(invoke: Invoke, db: Database, mariadb: Any) -> None:
    mariadb.admin("DROP DATABASE IF EXISTS whmcs_bad")
    _load_whmcs_tables(mariadb, "whmcs_bad")
    mariadb.admin("UPDATE tblclients SET email = 'nobody' WHERE id = 2", database="whmcs_bad")
    result = invoke("import", "--from", "whmcs", f"mysql+pymysql://root@localhost/whmcs_bad?unix_socket={mariadb.socket}")
    assert result.exit_code == 2, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: tblclients id 2: email: 'nobody' is not an email address",
        "error: mysql+pymysql://root@localhost/whmcs_bad?unix_socket=" + mariadb.socket.replace("/", "%2F")
        + ": rejected, 1 bad row(s); nothing was imported"]
    assert set(counts(db).values()) == {0}

    wrong = invoke("import", "--from", "whmcs", mariadb.url("reader", "wrong", "whmcs"))
    assert wrong.exit_code == 2
    assert "cannot read the WHMCS database: (1045, \"Access denied for user 'reader'" in wrong.stderr
    assert "wrong" not in wrong.stderr
