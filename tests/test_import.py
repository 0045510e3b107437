"""`cancelproc import`: formats, kind inference, row errors, upserts, conflicts."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from processor.config import Settings
from processor.db import Database
from processor.errors import InputError
from processor.importer import KINDS, FileReport, ImportRejected, RowError, import_file, infer_kind
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

ALL_MODELS = (Client, Product, Service, ServiceAddon, Invoice, CancellationRequest, AuditEntry)


# --------------------------------------------------------------------------- helpers


def write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join((header, *rows)) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, *objects: dict[str, Any]) -> Path:
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n", encoding="utf-8")
    return path


def counts(db: Database) -> dict[str, int]:
    with db.read_session() as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m)) for m in ALL_MODELS}


def one(db: Database, model: Any, external_id: str) -> Any:
    with db.read_session() as s:
        return s.scalars(select(model).where(model.external_id == external_id)).one()


@pytest.fixture
def run(db: Database, settings: Settings, now: dt.datetime):
    """import_file with the test's database, settings and clock."""

    def _run(path: Path, **kw: Any) -> FileReport:
        return import_file(db, path, settings=settings, now=now, **kw)

    return _run


@pytest.fixture
def base(tmp_path: Path, run) -> None:
    """Two clients, two products, two services (S1 Active, S2 Active)."""
    run(write_csv(tmp_path / "c.csv", "external_id,first_name,email",
                  "C1,Ann,ann@example.test", "C2,Bob,bob@example.test"))
    run(write_csv(tmp_path / "p.csv", "external_id,name,module", "P1,Web Hosting,cpanel", "P2,Domain,"))
    run(
        write_csv(
            tmp_path / "s.csv",
            "external_id,client_external_id,product_external_id,status,domain,amount,next_due_date",
            "S1,C1,P1,Active,ann.test,10.00,2026-12-01",
            "S2,C2,P1,Active,bob.test,12.50,2026-12-15",
        )
    )


def cancelled_by_processor(db: Database, service_ext: str, now: dt.datetime) -> int:
    """Do what the run does: service Cancelled, its request completed. Returns the request id."""
    with db.session.begin() as s:
        svc = s.scalars(select(Service).where(Service.external_id == service_ext)).one()
        svc.status = ServiceStatus.CANCELLED
        svc.termination_date = dt.date(2026, 11, 20)
        req = CancellationRequest(
            external_id=f"R-{service_ext}",
            service_id=svc.id,
            type=RequestType.IMMEDIATE,
            effective_date=(now - dt.timedelta(days=7)).date(),
            reason_code="other",
            status=RequestStatus.COMPLETED,
            created_at=now - dt.timedelta(days=7),
            processed_at=dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC),
        )
        s.add(req)
        s.flush()
        return req.id


# --------------------------------------------------------------------------- each kind, both formats


def test_clients_csv(tmp_path: Path, run, db: Database) -> None:
    path = write_csv(
        tmp_path / "clients.csv",
        "external_id,first_name,last_name,company_name,email,language,balance",
        "C1,Ann,Lee,Acme Ltd,ann@example.test,de,-5.25",
        'C2,Bob,,"Smith, Jones & Co",bob@example.test,,',
    )
    report = run(path)
    assert (report.kind, report.inserted, report.updated, report.unchanged, report.conflicts) == (
        "clients", 2, 0, 0, [])
    ann, bob = one(db, Client, "C1"), one(db, Client, "C2")
    assert (ann.first_name, ann.last_name, ann.company_name, ann.language, ann.balance) == (
        "Ann", "Lee", "Acme Ltd", "de", Decimal("-5.25"))
    # Empty optional cells take the model's defaults.
    assert (bob.last_name, bob.company_name, bob.language, bob.balance) == ("", "Smith, Jones & Co", "en", Decimal("0"))


def test_clients_jsonl(tmp_path: Path, run, db: Database) -> None:
    path = write_jsonl(
        tmp_path / "clients.jsonl",
        {"external_id": 101, "first_name": "Ann", "email": "ann@example.test", "balance": 19.99},
        {"external_id": "102", "first_name": "Bob", "email": "bob@example.test", "language": None},
    )
    report = run(path)
    assert (report.kind, report.inserted) == ("clients", 2)
    assert one(db, Client, "101").balance == Decimal("19.99")  # a JSON number; id coerced to text
    assert one(db, Client, "102").language == "en"


def test_products_csv_and_jsonl(tmp_path: Path, run, db: Database) -> None:
    assert run(write_csv(tmp_path / "p.csv", "external_id,name,module",
                         "P1,Hosting,cpanel", "P2,Support,")).inserted == 2
    assert run(write_jsonl(tmp_path / "p.ndjson",
                           {"external_id": "P3", "name": "VPS", "module": "proxmox"})).inserted == 1
    assert one(db, Product, "P1").module == "cpanel"
    assert one(db, Product, "P2").module is None  # empty: nothing to deprovision
    assert (one(db, Product, "P3").name, one(db, Product, "P3").module) == ("VPS", "proxmox")


def test_services_csv(tmp_path: Path, base: None, db: Database, run) -> None:
    path = write_csv(
        tmp_path / "services.csv",
        "external_id,client_external_id,product_external_id,status,domain,billing_cycle,amount,next_due_date,termination_date",
        "S3,C1,P2,suspended,x.test,Annually,99.00,2027-01-31,",
        "S4,C2,P2,TERMINATED,,Free Account,0,0000-00-00,2026-10-01",
    )
    report = run(path)
    assert (report.kind, report.inserted) == ("services", 2)
    s3, s4 = one(db, Service, "S3"), one(db, Service, "S4")
    assert (s3.status, s3.billing_cycle, s3.amount, s3.next_due_date, s3.termination_date) == (
        ServiceStatus.SUSPENDED, "Annually", Decimal("99.00"), dt.date(2027, 1, 31), None)
    assert s3.client_id == one(db, Client, "C1").id and s3.product_id == one(db, Product, "P2").id
    # WHMCS writes 0000-00-00 for "no due date".
    assert (s4.status, s4.next_due_date, s4.termination_date) == (ServiceStatus.TERMINATED, None, dt.date(2026, 10, 1))


def test_services_jsonl(tmp_path: Path, base: None, db: Database, run) -> None:
    path = write_jsonl(
        tmp_path / "services.jsonl",
        {"external_id": "S3", "client_external_id": "C1", "product_external_id": "P1", "status": "Pending",
         "next_due_date": None, "amount": "5"},
    )
    assert run(path).inserted == 1
    s3 = one(db, Service, "S3")
    assert (s3.status, s3.amount, s3.next_due_date, s3.billing_cycle) == (
        ServiceStatus.PENDING, Decimal("5"), None, "Monthly")


def test_addons_csv_and_jsonl(tmp_path: Path, base: None, db: Database, run) -> None:
    csv_report = run(write_csv(tmp_path / "a.csv", "external_id,service_external_id,name,status,amount",
                               "A1,S1,Backup,Active,2.00"))
    jsonl_report = run(write_jsonl(tmp_path / "a.jsonl",
                                   {"external_id": "A2", "service_external_id": "S2", "name": "IP", "status": "fraud"}))
    assert (csv_report.kind, csv_report.inserted, jsonl_report.kind, jsonl_report.inserted) == (
        "addons", 1, "addons", 1)
    a1, a2 = one(db, ServiceAddon, "A1"), one(db, ServiceAddon, "A2")
    assert (a1.name, a1.status, a1.amount, a1.service_id) == (
        "Backup", ServiceStatus.ACTIVE, Decimal("2.00"), one(db, Service, "S1").id)
    assert (a2.status, a2.amount) == (ServiceStatus.FRAUD, Decimal("0"))


def test_invoices_csv_and_jsonl(tmp_path: Path, base: None, db: Database, run) -> None:
    assert run(write_csv(tmp_path / "i.csv", "external_id,service_external_id,amount,status,due_date",
                         "I1,S1,10.00,Unpaid,2026-12-01", "I2,S1,10.00,paid,")).kind == "invoices"
    assert run(write_jsonl(tmp_path / "i.jsonl",
                           {"external_id": "I3", "service_external_id": "S2", "amount": 12.5,
                            "status": "Cancelled"})).inserted == 1
    i1, i2, i3 = (one(db, Invoice, e) for e in ("I1", "I2", "I3"))
    assert (i1.status, i1.amount, i1.due_date) == (InvoiceStatus.UNPAID, Decimal("10.00"), dt.date(2026, 12, 1))
    assert (i2.status, i2.due_date) == (InvoiceStatus.PAID, None)
    assert (i3.status, i3.amount) == (InvoiceStatus.CANCELLED, Decimal("12.5"))


def test_requests_csv(tmp_path: Path, base: None, db: Database, run, now: dt.datetime) -> None:
    path = write_csv(
        tmp_path / "requests.csv",
        "external_id,service_external_id,type,reason_code,reason,cancel_on",
        "R1,S1,end of billing period,too_expensive,Found cheaper,",
        "R2,S2,On Date,switched_service,,2027-01-15",
    )
    report = run(path, actor="alice")
    assert (report.kind, report.inserted) == ("requests", 2)
    r1, r2 = one(db, CancellationRequest, "R1"), one(db, CancellationRequest, "R2")
    assert (r1.type, r1.reason_code, r1.reason, r1.cancel_on, r1.status) == (
        RequestType.END_OF_BILLING_PERIOD, "too_expensive", "Found cheaper", None, RequestStatus.PENDING)
    assert (r1.created_at, r1.created_by, r1.attempts) == (now, "alice", 0)
    assert (r2.type, r2.cancel_on, r2.service_id) == (
        RequestType.ON_DATE, dt.date(2027, 1, 15), one(db, Service, "S2").id)


def test_requests_keep_the_date_the_client_asked(
    tmp_path: Path, base: None, db: Database, settings: Settings, now: dt.datetime
) -> None:
    """requested_at is the request's created_at: a date alone is the start of that day in the
    business time zone, a time without an offset is a time there; empty means the import's time."""
    settings.business_timezone = "Europe/Berlin"
    path = write_csv(
        tmp_path / "requests.csv",
        "external_id,service_external_id,type,reason_code,requested_at",
        "R1,S1,end-of-period,other,2026-11-02",
        "R2,S2,immediate,other,2026-11-20 10:23:45",
    )
    import_file(db, path, settings=settings, now=now)
    r1, r2 = one(db, CancellationRequest, "R1"), one(db, CancellationRequest, "R2")
    midnight_berlin = dt.datetime(2026, 11, 1, 23, 0, tzinfo=dt.UTC)
    assert (r1.type, r1.created_at) == (RequestType.END_OF_BILLING_PERIOD, midnight_berlin)
    assert (r2.type, r2.created_at) == (RequestType.IMMEDIATE, dt.datetime(2026, 11, 20, 9, 23, 45, tzinfo=dt.UTC))
    # The same file again: nothing to write.
    assert import_file(db, path, settings=settings, now=now).unchanged == 2
    # A later export without the column keeps the stored date.
    path.write_text("external_id,service_external_id,type,reason_code\nR1,S1,End of Billing Period,other\n")
    assert import_file(db, path, settings=settings, now=now).unchanged == 1
    assert one(db, CancellationRequest, "R1").created_at == dt.datetime(2026, 11, 1, 23, 0, tzinfo=dt.UTC)


def test_requested_at_must_not_be_days_ahead(tmp_path: Path, base: None, db: Database, run) -> None:
    path = write_csv(
        tmp_path / "requests.csv",
        "external_id,service_external_id,type,reason_code,requested_at",
        "R1,S1,Immediate,other,2026-12-24",
        "R2,S2,Immediate,other,1700000000",
        "R3,S2,Immediate,other,2026-11-26 09:00:00",  # hours ahead (another zone's clock): taken
    )
    with pytest.raises(ImportRejected) as exc:
        run(path)
    assert [(e.line, e.field, e.message.split(" (")[0]) for e in exc.value.errors] == [
        (2, "requested_at", "2026-12-24T00:00:00+00:00 is more than a day in the future"),
        (3, "requested_at", "must be a date as YYYY-MM-DD, or a date and time as YYYY-MM-DD HH:MM:SS"),
    ]
    assert counts(db)["cancellation_requests"] == 0


def test_requests_jsonl(tmp_path: Path, base: None, db: Database, run) -> None:
    path = write_jsonl(
        tmp_path / "requests.jsonl",
        {"external_id": "R1", "service_external_id": "S1", "type": "IMMEDIATE", "reason_code": "other"},
        {"external_id": "R2", "service_external_id": "S2", "type": "Immediate", "reason_code": "other",
         "status": "withdrawn"},
    )
    assert run(path).inserted == 2
    assert one(db, CancellationRequest, "R1").type == RequestType.IMMEDIATE
    assert one(db, CancellationRequest, "R2").status == RequestStatus.WITHDRAWN


def test_audit_entries_for_inserts(tmp_path: Path, base: None, db: Database, run, now: dt.datetime) -> None:
    with db.read_session() as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.entity == "service").order_by(AuditEntry.id)).all()
    assert [(e.action, e.actor, e.at, e.entity_id) for e in entries] == [
        ("imported", "import", now, one(db, Service, "S1").id),
        ("imported", "import", now, one(db, Service, "S2").id),
    ]
    assert json.loads(entries[0].detail) == {"source": "s.csv:2", "external_id": "S1"}


# --------------------------------------------------------------------------- format and kind


def test_format_sniffed_without_extension(tmp_path: Path, run, db: Database) -> None:
    jsonl = tmp_path / "export1"
    jsonl.write_text('\n{"external_id": "P1", "name": "Hosting"}\n\n{"external_id": "P2", "name": "VPS"}\n')
    csv_file = write_csv(tmp_path / "export2", "external_id,name", "P3,Mail")
    assert run(jsonl).inserted == 2  # blank lines are ignored
    assert run(csv_file).inserted == 1
    assert counts(db)["products"] == 3


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("external_id,first_name,email", "clients"),
        ("external_id,name", "products"),
        ("external_id,name,module", "products"),
        ("external_id,client_external_id,product_external_id,status", "services"),
        # Has every column products need too: the kind with more required columns wins.
        ("external_id,service_external_id,name,status", "addons"),
        # Required columns of invoices are there too, but "name" is not an invoice column.
        ("external_id,service_external_id,name,status,amount", "addons"),
        ("external_id,service_external_id,amount,status,due_date", "invoices"),
        ("External_ID , Service_External_ID,type,reason_code", "requests"),
    ],
)
def test_kind_inferred_from_header(tmp_path: Path, header: str, kind: str) -> None:
    columns = [c.strip().lower() for c in header.split(",")]
    assert infer_kind(tmp_path / "f.csv", columns) == kind


def test_kind_inferred_from_first_jsonl_object(tmp_path: Path, base: None, run) -> None:
    path = write_jsonl(tmp_path / "x.jsonl",
                       {"external_id": "I1", "service_external_id": "S1", "amount": 1, "status": "Paid"})
    assert run(path).kind == "invoices"


def test_ambiguous_kind_asks_for_kind(tmp_path: Path, base: None, run, db: Database) -> None:
    # Fits addons and requests equally (each with one unknown column for the other).
    path = write_csv(tmp_path / "x.csv", "external_id,service_external_id,name,status,type,reason_code",
                     "X1,S1,n,Active,Immediate,other")
    with pytest.raises(InputError, match=r"x\.csv: columns fit several kinds \(addons, requests\); pass --kind"):
        run(path)


def test_unknown_kind_asks_for_kind(tmp_path: Path, run) -> None:
    path = write_csv(tmp_path / "x.csv", "id,title", "1,foo")
    with pytest.raises(InputError, match=r"x\.csv: cannot tell .* pass --kind"):
        run(path)


def test_explicit_kind(tmp_path: Path, base: None, run, db: Database) -> None:
    # A product file whose header would be read as products anyway, but forced kinds are checked.
    path = write_csv(tmp_path / "x.csv", "external_id,name", "P9,Extra")
    assert run(path, kind="products").kind == "products"
    with pytest.raises(InputError,
                       match=r"x\.csv: missing required column\(s\) for addons: service_external_id, status"):
        run(path, kind="addons")
    with pytest.raises(InputError, match="unknown kind 'widgets'"):
        run(path, kind="widgets")
    # Resolves the ambiguous header above.
    amb = write_csv(tmp_path / "amb.csv", "external_id,service_external_id,name,status", "A1,S1,Backup,Active")
    assert run(amb, kind="addons").inserted == 1


def test_unknown_column_is_an_error(tmp_path: Path, run, db: Database) -> None:
    path = write_csv(tmp_path / "c.csv", "external_id,first_name,email,phone", "C1,Ann,a@x.test,123")
    with pytest.raises(InputError,
                       match=r"c\.csv: unknown column 'phone' for clients \(allowed: external_id, first_name, email,"):
        run(path, kind="clients")
    assert counts(db)["clients"] == 0


def test_every_unknown_column_is_named_at_once(tmp_path: Path, run, db: Database) -> None:
    path = write_csv(tmp_path / "c.csv", "external_id,first_name,phone,email,city,country", "C1,Ann,1,a@x.test,B,DE")
    with pytest.raises(InputError, match=r"c\.csv: unknown columns 'phone', 'city', 'country' for clients \(allowed"):
        run(path, kind="clients")
    assert counts(db)["clients"] == 0


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", r"empty\.csv: file is empty"),
        ("blank.jsonl", b"\n  \n", r"blank\.jsonl: file is empty"),
        ("latin.csv", b"external_id,name\nP1,Caf\xe9\n", r"latin\.csv:2: not UTF-8"),
        ("bad.jsonl", b'{"external_id": "P1", "name": "a"}\n{"external_id": \n', r"bad\.jsonl:2: malformed JSON"),
        ("list.jsonl", b'{"external_id": "P1", "name": "a"}\n[1, 2]\n', r"list\.jsonl:2: expected one JSON object"),
        ("short.csv", b"external_id,name\nP1,a\nP2\n", r"short\.csv:3: 1 fields, the header has 2"),
        ("quote.csv", b'external_id,name\nP1,"a"b\n', r"quote\.csv:2: malformed CSV"),
        ("dup.csv", b"external_id,name,name\nP1,a,b\n", r"dup\.csv:1: column 'name' appears twice"),
    ],
)
def test_bad_file(tmp_path: Path, run, db: Database, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        run(path, kind="products")
    assert "\n" not in str(info.value)
    assert counts(db)["products"] == 0


def test_missing_file(tmp_path: Path, run) -> None:
    with pytest.raises(InputError, match=r"nope\.csv: cannot be read: No such file"):
        run(tmp_path / "nope.csv")


def test_header_only_csv_is_an_empty_import(tmp_path: Path, run) -> None:
    report = run(write_csv(tmp_path / "p.csv", "external_id,name"))
    assert (report.kind, report.rows) == ("products", 0)


# --------------------------------------------------------------------------- row errors


def test_every_bad_row_is_reported_and_nothing_written(tmp_path: Path, base: None, run, db: Database) -> None:
    before = counts(db)
    path = write_csv(
        tmp_path / "services.csv",
        "external_id,client_external_id,product_external_id,status,amount,next_due_date",
        "S3,C1,P1,Active,1.00,2026-12-01",  # good: still not written
        "S4,C1,P1,Sleeping,1.00,2026-12-01",  # line 3: status
        "S5,C1,P1,Active,-1,31/12/2026",  # line 4: amount and next_due_date
        "S6,C9,P1,Active,1.00,",  # line 5: unknown client
        ",C1,P1,Active,1.234,",  # line 6: external_id empty, amount
        "S3,C1,P1,Active,1.00,",  # line 7: duplicate external_id
    )
    with pytest.raises(ImportRejected) as info:
        run(path)
    errors = info.value.errors
    found = [(e.line, e.field) for e in errors]
    assert found == [
        (3, "status"),
        (4, "amount"),
        (4, "next_due_date"),
        (5, "client_external_id"),
        (6, "external_id"),
        (6, "amount"),
        (7, "external_id"),
    ]
    assert all(e.path == path for e in errors)
    assert "must be one of Pending, Active, Suspended, Terminated, Cancelled, Fraud" in errors[0].message
    assert errors[3].message == "no client with external_id 'C9'"
    assert errors[4].message == "required, but empty"
    assert errors[6].message == "'S3' also on line 2"
    assert str(info.value) == f"{path}:3: status: {errors[0].message} (and 6 more)"
    assert str(errors[3]) == f"{path}:5: client_external_id: no client with external_id 'C9'"
    assert counts(db) == before
    assert one(db, Service, "S1").status == ServiceStatus.ACTIVE


def test_jsonl_row_errors_have_line_numbers(tmp_path: Path, db: Database, run) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"external_id": "C1", "first_name": "Ann", "email": "ann@example.test"}\n'
        "\n"
        '{"external_id": "C2", "email": "not-an-email"}\n'
        '{"external_id": "C3", "first_name": "Cy", "email": "c@x.test", "phone": "1"}\n'
    )
    with pytest.raises(ImportRejected) as info:
        run(path)
    assert [(e.line, e.field, e.message) for e in info.value.errors] == [
        (3, "first_name", "required column missing"),
        (3, "email", "'not-an-email' is not an email address"),
        (4, "phone", "unknown column"),
    ]
    assert counts(db)["clients"] == 0


def test_reference_to_unknown_external_id(tmp_path: Path, base: None, run, db: Database) -> None:
    path = write_jsonl(
        tmp_path / "i.jsonl",
        {"external_id": "I1", "service_external_id": "S1", "amount": 1, "status": "Unpaid"},
        {"external_id": "I2", "service_external_id": "S404", "amount": 1, "status": "Unpaid"},
    )
    with pytest.raises(ImportRejected) as info:
        run(path)
    assert info.value.errors == [RowError(path, 2, "service_external_id", "no service with external_id 'S404'")]
    assert counts(db)["invoices"] == 0


def test_on_date_without_cancel_on(tmp_path: Path, base: None, run, db: Database) -> None:
    path = write_csv(
        tmp_path / "r.csv",
        "external_id,service_external_id,type,reason_code,cancel_on",
        "R1,S1,On Date,other,",
        "R2,S2,Immediate,other,2027-01-01",
    )
    with pytest.raises(ImportRejected) as info:
        run(path)
    assert [(e.line, e.field, e.message) for e in info.value.errors] == [
        (2, "cancel_on", "required when type is On Date"),
        (3, "cancel_on", "only allowed when type is On Date (type is Immediate)"),
    ]
    assert counts(db)["cancellation_requests"] == 0


def test_unknown_reason_code(tmp_path: Path, base: None, run, db: Database, settings: Settings) -> None:
    path = write_csv(tmp_path / "r.csv", "external_id,service_external_id,type,reason_code", "R1,S1,Immediate,bored")
    with pytest.raises(ImportRejected) as info:
        run(path)
    (err,) = info.value.errors
    assert (err.line, err.field) == (2, "reason_code")
    assert err.message == f"unknown reason code 'bored' (allowed: {', '.join(settings.reason_codes)})"
    assert counts(db)["cancellation_requests"] == 0


def test_request_status_other_than_pending_or_withdrawn(tmp_path: Path, base: None, run) -> None:
    path = write_csv(tmp_path / "r.csv", "external_id,service_external_id,type,reason_code,status",
                     "R1,S1,Immediate,other,completed")
    with pytest.raises(ImportRejected, match=r"r\.csv:2: status: must be one of pending, withdrawn"):
        run(path)


def test_second_open_request_for_a_service(tmp_path: Path, base: None, run, db: Database) -> None:
    run(write_csv(tmp_path / "r1.csv", "external_id,service_external_id,type,reason_code", "R1,S1,Immediate,other"))
    first = one(db, CancellationRequest, "R1")
    path = write_csv(
        tmp_path / "r2.csv",
        "external_id,service_external_id,type,reason_code",
        "R2,S1,Immediate,other",  # S1 has R1 open in the database
        "R3,S2,Immediate,other",
        "R4,S2,Immediate,other",  # S2 gets R3 from this very file
    )
    with pytest.raises(ImportRejected) as info:
        run(path)
    assert [(e.line, e.field, e.message) for e in info.value.errors] == [
        (2, "service_external_id", f"service S1 already has open request {first.id}"),
        (4, "service_external_id", "service S2 already has an open request on line 3"),
    ]
    assert counts(db)["cancellation_requests"] == 1


def test_failed_request_is_open_too(tmp_path: Path, base: None, run, db: Database) -> None:
    run(write_csv(tmp_path / "r1.csv", "external_id,service_external_id,type,reason_code", "R1,S1,Immediate,other"))
    with db.session.begin() as s:
        s.scalars(select(CancellationRequest)).one().status = RequestStatus.FAILED
    path = write_csv(tmp_path / "r2.csv", "external_id,service_external_id,type,reason_code", "R2,S1,Immediate,other")
    with pytest.raises(ImportRejected, match="service S1 already has open request"):
        run(path)


def test_withdrawing_frees_the_service_for_a_new_request(tmp_path: Path, base: None, run, db: Database) -> None:
    run(write_csv(tmp_path / "r1.csv", "external_id,service_external_id,type,reason_code", "R1,S1,Immediate,other"))
    path = write_csv(
        tmp_path / "r2.csv",
        "external_id,service_external_id,type,reason_code,status",
        "R2,S1,End of Billing Period,other,pending",
        "R1,S1,Immediate,other,withdrawn",
    )
    report = run(path)
    assert (report.inserted, report.updated) == (1, 1)
    assert one(db, CancellationRequest, "R1").status == RequestStatus.WITHDRAWN
    assert one(db, CancellationRequest, "R2").status == RequestStatus.PENDING


# --------------------------------------------------------------------------- upserts


def test_second_import_of_the_same_file_changes_nothing(tmp_path: Path, base: None, run, db: Database) -> None:
    files = [
        write_csv(tmp_path / "a.csv", "external_id,service_external_id,name,status,amount", "A1,S1,Backup,Active,2"),
        write_jsonl(tmp_path / "i.jsonl", {"external_id": "I1", "service_external_id": "S1", "amount": 10,
                                           "status": "Unpaid", "due_date": "2026-12-01"}),
        write_csv(tmp_path / "r.csv", "external_id,service_external_id,type,reason_code,reason,cancel_on",
                  "R1,S2,On Date,other,moving,2027-02-01"),
        tmp_path / "s.csv",  # from the base fixture: already imported once
    ]
    for f in files[:3]:
        run(f)
    before = counts(db)
    for f in files:
        report = run(f)
        assert (report.inserted, report.updated, report.conflicts) == (0, 0, [])
        assert report.unchanged == report.rows > 0
    assert counts(db) == before


def test_changed_value_is_updated_and_audited(tmp_path: Path, base: None, run, db: Database, now: dt.datetime) -> None:
    path = write_csv(
        tmp_path / "s2.csv",
        "external_id,client_external_id,product_external_id,status,domain,amount,next_due_date",
        "S1,C1,P1,Suspended,ann.test,11.00,2026-12-01",  # status and amount change
        "S2,C2,P1,Active,bob.test,12.50,2026-12-15",  # unchanged
    )
    audits_before = counts(db)["audit_log"]
    report = run(path, actor="nightly")
    assert (report.inserted, report.updated, report.unchanged) == (0, 1, 1)
    s1 = one(db, Service, "S1")
    assert (s1.status, s1.amount, s1.domain) == (ServiceStatus.SUSPENDED, Decimal("11.00"), "ann.test")
    with db.read_session() as s:
        entry = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).one()
    assert counts(db)["audit_log"] == audits_before + 1
    assert (entry.entity, entry.entity_id, entry.action, entry.actor, entry.at) == (
        "service", s1.id, "import_updated", "nightly", now)
    assert json.loads(entry.detail)["changed"] == {"status": ["Active", "Suspended"], "amount": ["10.00", "11.00"]}


def test_jsonl_update_keeps_columns_left_out(tmp_path: Path, run, db: Database) -> None:
    run(write_csv(tmp_path / "c.csv", "external_id,first_name,last_name,email,language", "C1,Ann,Lee,ann@x.test,de"))
    report = run(write_jsonl(tmp_path / "c.jsonl", {"external_id": "C1", "first_name": "Anne", "email": "ann@x.test"}))
    assert report.updated == 1
    c1 = one(db, Client, "C1")
    assert (c1.first_name, c1.last_name, c1.language) == ("Anne", "Lee", "de")


def test_pending_request_can_be_updated(tmp_path: Path, base: None, run, db: Database) -> None:
    header = "external_id,service_external_id,type,reason_code,cancel_on"
    run(write_csv(tmp_path / "r1.csv", header, "R1,S1,On Date,other,2027-01-01"))
    report = run(write_csv(tmp_path / "r2.csv", header, "R1,S1,Immediate,customer_service,"))
    assert report.updated == 1
    r1 = one(db, CancellationRequest, "R1")
    assert (r1.type, r1.reason_code, r1.cancel_on, r1.status) == (
        RequestType.IMMEDIATE, "customer_service", None, RequestStatus.PENDING)


# --------------------------------------------------------------------------- conflicts


def test_service_cancelled_by_request_is_not_reopened(
    tmp_path: Path, base: None, run, db: Database, now: dt.datetime
) -> None:
    request_id = cancelled_by_processor(db, "S1", now)
    path = write_csv(
        tmp_path / "s2.csv",
        "external_id,client_external_id,product_external_id,status,domain,amount,next_due_date",
        "S1,C1,P1,Active,ann.test,10.00,2026-12-01",  # the billing system has not caught up yet
        "S2,C2,P1,Suspended,bob.test,12.50,2026-12-15",  # applied
        "S3,C1,P2,Active,new.test,1.00,2027-01-01",  # applied
    )
    audits_before = counts(db)["audit_log"]
    report = run(path)
    assert (report.inserted, report.updated, report.unchanged) == (1, 1, 0)
    assert len(report.conflicts) == 1
    conflict = report.conflicts[0]
    assert (conflict.line, conflict.external_id) == (2, "S1")
    assert conflict.message == (
        f"service was cancelled by request {request_id} on 2026-11-20; "
        "import would set status Active"
    )
    s1 = one(db, Service, "S1")
    assert (s1.status, s1.termination_date) == (ServiceStatus.CANCELLED, dt.date(2026, 11, 20))
    assert one(db, Service, "S2").status == ServiceStatus.SUSPENDED
    assert one(db, Service, "S3").domain == "new.test"
    assert counts(db)["audit_log"] == audits_before + 2


def test_cancelled_service_without_request_can_be_reopened(tmp_path: Path, base: None, run, db: Database) -> None:
    # Cancelled in the billing system itself, not by the processor: its word is final.
    with db.session.begin() as s:
        s.scalars(select(Service).where(Service.external_id == "S1")).one().status = ServiceStatus.CANCELLED
    report = run(write_csv(tmp_path / "s2.csv", "external_id,client_external_id,product_external_id,status",
                           "S1,C1,P1,Active"))
    assert (report.updated, report.conflicts) == (1, [])
    assert one(db, Service, "S1").status == ServiceStatus.ACTIVE


def test_cancelled_service_other_fields_still_update(
    tmp_path: Path, base: None, run, db: Database, now: dt.datetime
) -> None:
    cancelled_by_processor(db, "S1", now)
    path = write_csv(
        tmp_path / "s2.csv",
        "external_id,client_external_id,product_external_id,status,domain,termination_date",
        "S1,C1,P1,cancelled,renamed.test,2026-11-20",
    )
    report = run(path)
    assert (report.updated, report.conflicts) == (1, [])
    assert one(db, Service, "S1").domain == "renamed.test"


def test_completed_request_is_not_changed(tmp_path: Path, base: None, run, db: Database, now: dt.datetime) -> None:
    request_id = cancelled_by_processor(db, "S1", now)
    path = write_csv(
        tmp_path / "r.csv",
        "external_id,service_external_id,type,reason_code,status",
        "R-S1,S1,Immediate,other,withdrawn",  # conflict: the run completed it
        "R9,S2,Immediate,other,pending",  # applied
    )
    report = run(path)
    assert (report.inserted, report.updated) == (1, 0)
    assert [(c.line, c.external_id) for c in report.conflicts] == [(2, "R-S1")]
    assert report.conflicts[0].message == (
        f"request {request_id} is already completed on 2026-11-20; import would set status withdrawn")
    assert one(db, CancellationRequest, "R-S1").status == RequestStatus.COMPLETED
    assert one(db, CancellationRequest, "R9").status == RequestStatus.PENDING


def test_a_grace_period_is_not_ended_by_an_import(
    tmp_path: Path, base: None, run, db: Database, now: dt.datetime
) -> None:
    """A run suspended S1 for its request's grace period. A file that withdraws the request
    (or changes it) or sets the service Active is a conflict naming the command that
    unsuspends: written, the service would stay suspended, or the grace period would end
    without UnsuspendAccount and the client's email. S2's rows still apply."""
    run(write_csv(tmp_path / "r.csv", "external_id,service_external_id,type,reason_code",
                  "R1,S1,End of Billing Period,other", "R2,S2,End of Billing Period,other"))
    suspended_on, ends = dt.date(2026, 12, 1), dt.date(2026, 12, 15)
    with db.session.begin() as s:  # what the run's suspension writes
        one_row = s.scalars(select(CancellationRequest).where(CancellationRequest.external_id == "R1")).one()
        one_row.suspended_on, one_row.grace_ends_on, one_row.effective_date = suspended_on, ends, ends
        s.get(Service, one_row.service_id).status = ServiceStatus.SUSPENDED
        request_id = one_row.id
    requests = run(write_csv(tmp_path / "r2.csv", "external_id,service_external_id,type,reason_code,status",
                             "R1,S1,End of Billing Period,other,withdrawn",
                             "R2,S2,End of Billing Period,other,withdrawn"))
    assert (requests.updated, [(c.line, c.external_id) for c in requests.conflicts]) == (1, [(2, "R1")])
    assert requests.conflicts[0].message == (
        f"request {request_id} is in its grace period (service suspended 2026-12-01, cancelled 2026-12-15); "
        f"import would set status withdrawn: withdraw it with `cancelproc requests withdraw {request_id}`")
    services = run(write_csv(tmp_path / "s2.csv", "external_id,client_external_id,product_external_id,status",
                             "S1,C1,P1,Active", "S2,C2,P1,Suspended"))
    assert (services.updated, [(c.line, c.external_id, c.message) for c in services.conflicts]) == (1, [
        (2, "S1", f"service was suspended by cancelproc for request {request_id}, whose grace period ends "
                  "2026-12-15; import would set status Active")])
    assert one(db, CancellationRequest, "R1").status == RequestStatus.PENDING
    assert one(db, Service, "S1").status == ServiceStatus.SUSPENDED
    assert (one(db, CancellationRequest, "R2").status, one(db, Service, "S2").status) == (
        RequestStatus.WITHDRAWN, ServiceStatus.SUSPENDED)


def test_completed_request_same_values_is_unchanged(
    tmp_path: Path, base: None, run, db: Database, now: dt.datetime
) -> None:
    cancelled_by_processor(db, "S1", now)
    report = run(write_csv(tmp_path / "r.csv", "external_id,service_external_id,type,reason_code",
                           "R-S1,S1,Immediate,other"))
    assert (report.unchanged, report.conflicts) == (1, [])


def test_addon_and_invoice_cancelled_by_request_stay_cancelled(
    tmp_path: Path, base: None, run, db: Database, now: dt.datetime
) -> None:
    run(write_csv(tmp_path / "a.csv", "external_id,service_external_id,name,status",
                  "A1,S1,Backup,Active", "A2,S2,IP,Active"))
    run(write_csv(tmp_path / "i.csv", "external_id,service_external_id,amount,status",
                  "I1,S1,10,Unpaid", "I2,S2,5,Unpaid"))
    request_id = cancelled_by_processor(db, "S1", now)
    with db.session.begin() as s:  # what the run does to the service's add-ons and unpaid invoices
        s.scalars(select(ServiceAddon).where(ServiceAddon.external_id == "A1")).one().status = ServiceStatus.CANCELLED
        s.scalars(select(Invoice).where(Invoice.external_id == "I1")).one().status = InvoiceStatus.CANCELLED

    addons = run(write_csv(tmp_path / "a2.csv", "external_id,service_external_id,name,status",
                           "A1,S1,Backup,Active", "A2,S2,IP,Suspended"))
    invoices = run(write_csv(tmp_path / "i2.csv", "external_id,service_external_id,amount,status",
                             "I1,S1,10,Unpaid", "I2,S2,5,Paid"))

    assert [(c.line, c.external_id, c.message) for c in addons.conflicts] == [
        (2, "A1", f"add-on was cancelled with its service by request {request_id}; import would set status Active")
    ]
    assert [(c.line, c.external_id) for c in invoices.conflicts] == [(2, "I1")]
    assert (addons.updated, invoices.updated) == (1, 1)
    assert one(db, ServiceAddon, "A1").status == ServiceStatus.CANCELLED
    assert one(db, ServiceAddon, "A2").status == ServiceStatus.SUSPENDED
    assert one(db, Invoice, "I1").status == InvoiceStatus.CANCELLED
    assert one(db, Invoice, "I2").status == InvoiceStatus.PAID


# --------------------------------------------------------------------------- scale


def test_large_file_uses_batched_queries(tmp_path: Path, run, db: Database) -> None:
    """Queries grow with the number of 500-id chunks, not with the number of rows."""
    n = 3000
    lines = [f"C{i},First{i},c{i}@example.test" for i in range(n)]
    path = write_csv(tmp_path / "c.csv", "external_id,first_name,email", *lines)
    statements: list[str] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    chunks = n // 500
    assert run(path).inserted == n
    assert len(statements) <= 2 * chunks + 2  # existing rows, then the new ids
    statements.clear()
    assert run(path).unchanged == n
    assert len(statements) <= chunks + 2
    assert counts(db)["clients"] == n


def test_kinds_constant() -> None:
    assert KINDS == ("clients", "products", "services", "addons", "invoices", "requests")


# --- through the CLI -----------------------------------------------------------------------

def _cli(tmp_path: Path, *args: str):
    from click.testing import CliRunner

    from processor.cli import cli

    env = {"CANCELPROC_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "CANCELPROC_CONFIG": "",
           "CANCELPROC_LOG_FORMAT": "console"}  # the lines a person reads
    with contextlib.chdir(tmp_path):  # the app folder: `init` makes config/, hooks/, var/ there, not in the checkout
        return CliRunner().invoke(cli, list(args), env=env)


def test_cli_import_reports_each_file_and_each_bad_row(tmp_path: Path) -> None:
    assert _cli(tmp_path, "init").exit_code == 0
    clients = tmp_path / "clients.csv"
    clients.write_text("external_id,first_name,email\nC1,Ann,ann@example.test\n")
    products = tmp_path / "products.csv"
    products.write_text("external_id,name,module\nP1,VPS,proxmox\n")
    services = tmp_path / "services.csv"
    services.write_text("external_id,client_external_id,product_external_id,status\n"
                        "S1,C1,P9,Active\nS2,C7,P1,Sleeping\n")
    result = _cli(tmp_path, "import", str(clients), str(services), str(products))
    assert result.exit_code == 2
    assert f"{clients} (clients): 1 inserted, 0 updated, 0 unchanged, 0 conflict(s)" in result.stdout
    errors = result.stderr.strip().splitlines()
    assert errors[0] == f"error: {services}:2: product_external_id: no product with external_id 'P9'"
    assert (f"error: {services}:3: status: must be one of Pending, Active, Suspended, Terminated, Cancelled, Fraud "
            "(got 'Sleeping')") in errors
    assert errors[-1] == (f"error: {services}: rejected, {len(errors) - 1} bad row(s); nothing of it was imported; "
                          f"not attempted: {products}")
    assert "Traceback" not in result.output

    again = _cli(tmp_path, "import", str(clients), "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)[0] | {"path": ""} == {
        "path": "", "kind": "clients", "inserted": 0, "updated": 0, "unchanged": 1, "conflicts": []}
