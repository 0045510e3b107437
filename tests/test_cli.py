"""Every `cancelproc` command through click's CliRunner: output, exit code and database state.

Each test gets its own app root (tmp_path, also the working directory, so no
./config/processor.toml is picked up) and its own SQLite database, named by
CANCELPROC_DATABASE_URL. Time is frozen at 2026-11-26T02:00Z, so "today" is
2026-11-26 in the default business time zone (UTC).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import psutil
import pytest
from alembic.script import ScriptDirectory
from freezegun import freeze_time
from sqlalchemy import func, select

import processor
from processor import cancellations, lease
from processor.cli import cli
from processor.cli import requests as cli_module  # `requests list` prints with its echo_page
from processor.db import Database, open_database
from processor.errors import FieldError
from processor.lease import LEASE_NAME
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Client,
    Invoice,
    InvoiceStatus,
    Lease,
    OutboxEmail,
    Product,
    RequestStatus,
    RequestType,
    Run,
    RunStatus,
    RunTrigger,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.resources import shipped
from tests import factories
from tests.cli_helpers import Invoke, as_json, ok, one_line_error
from tests.smtp_server import free_port

NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
TODAY = dt.date(2026, 11, 26)



# --- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as frozen_time:
        yield frozen_time


def get(db: Database, model: type, id_: Any) -> Any:
    with db.read_session() as session:
        return session.get(model, id_)


def count(db: Database, model: type) -> int:
    with db.read_session() as session:
        return session.scalar(select(func.count()).select_from(model))


def audit_actions(db: Database, request_id: int) -> list[str]:
    with db.read_session() as session:
        return list(session.scalars(select(AuditEntry.action).where(AuditEntry.request_id == request_id)
                                    .order_by(AuditEntry.id)))


def snapshot(db: Database) -> dict[str, Any]:
    """Everything a command could change, to compare before and after."""
    with db.read_session() as s:
        return {
            "requests": sorted((r.id, r.status.value, r.attempts, r.last_error, r.next_attempt_at, r.run_id,
                                r.processed_at, r.note) for r in s.scalars(select(CancellationRequest))),
            "services": sorted((x.id, x.status.value, x.termination_date) for x in s.scalars(select(Service))),
            "addons": sorted((a.id, a.status.value) for a in s.scalars(select(ServiceAddon))),
            "invoices": sorted((i.id, i.status.value) for i in s.scalars(select(Invoice))),
            **{name: s.scalar(select(func.count()).select_from(model)) for name, model in
               (("runs", Run), ("leases", Lease), ("audit", AuditEntry), ("emails", OutboxEmail),
                ("clients", Client))},
        }


def add_request(db: Database, service_id: int, type_: RequestType = RequestType.END_OF_BILLING_PERIOD, *,
                cancel_on: dt.date | None = None, created_at: dt.datetime = NOW - dt.timedelta(days=10),
                status: RequestStatus = RequestStatus.PENDING, **extra: Any) -> int:
    with db.session.begin() as session:
        request = CancellationRequest(service_id=service_id, type=type_, cancel_on=cancel_on,
                                      effective_date=extra.pop("effective_date", None)
                                      or factories.effective(session, service_id, type_, cancel_on, created_at),
                                      reason_code="too_expensive", reason="test", status=status,
                                      created_at=created_at, created_by="test", attempts=0, note="", **extra)
        session.add(request)
        session.flush()
        return request.id


@pytest.fixture
def seeded(db: Database) -> Database:
    """A small company. As of today (2026-11-26) requests 1, 3, 4 cancel and 5 is a no-op; 2 is not due.

    clients: 1 Alice (valid email), 2 Bob (empty email)
    service 1 Alice, due 11-20, an add-on, an unpaid and a paid invoice; request 1 End of Billing Period
    service 2 Alice, due 12-10; request 2 End of Billing Period (not due)
    service 3 Alice, due 12-24; request 3 Immediate (created yesterday)
    service 4 Alice, due 12-15; request 4 On Date 11-23
    service 5 Alice, due 12-20; no request
    service 6 Alice, already Cancelled by hand, due 11-25; request 5 End of Billing Period (a no-op)
    service 7 Bob, due 12-05; no request
    """
    with db.session.begin() as s:
        alice = Client(first_name="Alice", last_name="Martin", email="alice@example.test")
        bob = Client(first_name="Bob", last_name="Novak", email="")
        hosting = Product(name="Shared Hosting", module="cpanel")
        vps = Product(name="VPS 4GB", module="proxmox")
        s.add_all([alice, bob, hosting, vps])
        s.flush()

        def service(client: Client, product: Product, due: dt.date | None,
                    status: ServiceStatus = ServiceStatus.ACTIVE, **extra: Any) -> Service:
            svc = Service(client_id=client.id, product_id=product.id, domain=f"site{due}.example.test",
                          status=status, billing_cycle="Monthly", amount=Decimal("4.99"), next_due_date=due, **extra)
            s.add(svc)
            s.flush()
            return svc

        s1 = service(alice, hosting, dt.date(2026, 11, 20))
        service(alice, vps, dt.date(2026, 12, 10))
        service(alice, vps, dt.date(2026, 12, 24))
        service(alice, hosting, dt.date(2026, 12, 15))
        service(alice, hosting, dt.date(2026, 12, 20))
        service(alice, hosting, dt.date(2026, 11, 25), ServiceStatus.CANCELLED, termination_date=dt.date(2026, 11, 20))
        service(bob, vps, dt.date(2026, 12, 5))
        s.add_all([
            ServiceAddon(service_id=s1.id, name="Daily Backups", status=ServiceStatus.ACTIVE, amount=Decimal("2.00")),
            Invoice(service_id=s1.id, amount=Decimal("4.99"), status=InvoiceStatus.UNPAID,
                    due_date=dt.date(2026, 11, 20)),
            Invoice(service_id=s1.id, amount=Decimal("4.99"), status=InvoiceStatus.PAID,
                    due_date=dt.date(2026, 10, 20)),
        ])
    assert add_request(db, 1) == 1
    assert add_request(db, 2) == 2
    assert add_request(db, 3, RequestType.IMMEDIATE, created_at=NOW - dt.timedelta(days=1)) == 3
    assert add_request(db, 4, RequestType.ON_DATE, cancel_on=dt.date(2026, 11, 23)) == 4
    assert add_request(db, 6) == 5
    return db


def statuses(db: Database) -> dict[int, str]:
    with db.read_session() as s:
        return {r.id: r.status.value for r in s.scalars(select(CancellationRequest))}


def write_config(tmp_path: Path, text: str, name: str = "processor.toml") -> Path:
    folder = tmp_path / "config"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --- init and db upgrade -------------------------------------------------------------------

# The newest migration's revision, as the migrations folder says (each migration file
# names its own; the head is the one no other revises).
HEAD = ScriptDirectory(str(Path(processor.__file__).parent / "migrations")).get_current_head()

def test_init_creates_a_migrated_empty_database(invoke: Invoke, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'c.db'}"  # the folder does not exist yet: init creates it
    result = ok(invoke("init", env={"CANCELPROC_DATABASE_URL": url}))
    assert f"ready (schema {HEAD})" in result.stdout
    db = open_database(url)
    try:
        assert count(db, Client) == 0 and count(db, Service) == 0
        assert ok(invoke("requests", "list", env={"CANCELPROC_DATABASE_URL": url})).stdout.strip() == "no requests"
    finally:
        db.dispose()


def test_init_makes_the_app_folder_and_never_overwrites_a_file(invoke: Invoke, tmp_path: Path) -> None:
    first = ok(invoke("init")).stdout
    assert "no config file was found, so this init used the defaults" in first
    made = {line.split()[1] for line in first.splitlines() if line.startswith("  created ")}
    assert {"var/", "var/log/", "config/processor.toml", "hooks/", "hooks/_example_notify.py",
            "templates/", "templates/README.md"} <= made, first
    assert all((tmp_path / name).exists() for name in made)
    written = (tmp_path / "config" / "processor.toml").read_bytes()
    assert written == shipped("app", "config", "processor.toml").read_bytes()
    # The operator's changes stay; what they removed comes back; nothing else is touched.
    (tmp_path / "config" / "processor.toml").write_text("chunk_size = 50\n")
    (tmp_path / "hooks" / "_example_notify.py").unlink()
    (tmp_path / "templates" / "README.md").write_text("mine\n")
    again = ok(invoke("init")).stdout
    assert (tmp_path / "config" / "processor.toml").read_text() == "chunk_size = 50\n"
    assert (tmp_path / "templates" / "README.md").read_text() == "mine\n"
    assert [line.split()[1] for line in again.splitlines() if line.startswith("  created ")] == [
        "hooks/_example_notify.py"], again
    assert "  kept    config/processor.toml " in again and "settings: config/processor.toml" in again
    assert "no hooks loaded" in ok(invoke("hooks", "list")).stdout  # the examples never load


def test_init_makes_a_hooks_folder_the_loader_accepts_whatever_the_umask(invoke: Invoke, tmp_path: Path) -> None:
    previous = os.umask(0o002)  # a group-writable default (Debian's for users with their own group)
    try:
        ok(invoke("init"))
    finally:
        os.umask(previous)
    assert not (tmp_path / "hooks").stat().st_mode & 0o022
    assert not (tmp_path / "config" / "processor.toml").stat().st_mode & 0o022
    ok(invoke("hooks", "list"))  # hooks/ is not refused as writable by others


def test_init_refuses_a_file_where_its_folder_belongs(invoke: Invoke, tmp_path: Path) -> None:
    (tmp_path / "hooks").write_text("not a folder\n")
    one_line_error(invoke("init"), f"{tmp_path / 'hooks'}: is in the way of the folder hooks/")


def test_init_with_a_config_file_elsewhere_writes_none_and_follows_its_folders(invoke: Invoke, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "cancelproc.toml"
    config.parent.mkdir()
    config.write_text('hooks_dir = "plugins"\n[email]\ntemplates_dir = ""\n')
    out = ok(invoke("--config", config, "init")).stdout
    assert f"settings: {config}" in out
    assert not (tmp_path / "config").exists() and not (tmp_path / "templates").exists()
    assert (tmp_path / "plugins" / "_example_notify.py").is_file() and (tmp_path / "var" / "log").is_dir()


def test_init_demo_prints_counts_that_match_the_database(invoke: Invoke, url: str) -> None:
    result = ok(invoke("init", "--demo"))
    line = next(x for x in result.stdout.splitlines() if x.startswith("demo data: "))
    printed = {kind: int(n) for n, kind in (part.split(" ") for part in line.removeprefix("demo data: ").split(", "))}
    db = open_database(url)
    try:
        assert printed == {"clients": count(db, Client), "products": count(db, Product),
                           "services": count(db, Service), "addons": count(db, ServiceAddon),
                           "invoices": count(db, Invoice), "requests": count(db, CancellationRequest)}
        assert printed["clients"] > 0 and printed["requests"] > 0
        before = snapshot(db)
        # Demo data only goes into an empty database.
        again = invoke("init", "--demo")
        one_line_error(again, "already has clients")
        assert snapshot(db) == before
    finally:
        db.dispose()


def test_db_upgrade_creates_then_is_idempotent(invoke: Invoke, backend: str, request: pytest.FixtureRequest) -> None:
    # On PostgreSQL the administrator creates the (empty) database; the upgrade fills it.
    env = {} if backend == "sqlite" else {
        "CANCELPROC_DATABASE_URL": request.getfixturevalue("pg_server").empty_database()}
    first = ok(invoke("db", "upgrade", env=env))
    assert f"schema empty -> {HEAD}" in first.stdout
    second = ok(invoke("db", "upgrade", env=env))
    assert f"schema already at {HEAD}" in second.stdout
    # init on a database already migrated is fine too.
    assert f"ready (schema {HEAD})" in ok(invoke("init")).stdout


def test_unmigrated_database_is_refused_with_a_hint(invoke: Invoke, tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    result = invoke("requests", "list", env={"CANCELPROC_DATABASE_URL": f"sqlite:///{empty}"})
    one_line_error(result, "schema revision none", "cancelproc db upgrade")


# --- run -----------------------------------------------------------------------------------

def test_run_prints_summary_and_applies_due_requests(invoke: Invoke, seeded: Database, tmp_path: Path) -> None:
    result = ok(invoke("run"))
    out = result.stdout
    for line in ("as of                     2026-11-26", "status                    completed",
                 "due                       4", "cancelled                 3", "no-op (already closed)    1",
                 "emails queued             3", "applied late              3 (up to 6 days)"):
        assert line in out, out
    assert statuses(seeded) == {1: "completed", 2: "pending", 3: "completed", 4: "completed", 5: "completed"}

    s1 = get(seeded, Service, 1)
    assert (s1.status, s1.termination_date) == (ServiceStatus.CANCELLED, TODAY)
    assert get(seeded, ServiceAddon, 1).status is ServiceStatus.CANCELLED
    assert get(seeded, Invoice, 1).status is InvoiceStatus.CANCELLED  # unpaid
    assert get(seeded, Invoice, 2).status is InvoiceStatus.PAID
    s6 = get(seeded, Service, 6)  # the no-op keeps its own termination date
    assert (s6.status, s6.termination_date) == (ServiceStatus.CANCELLED, dt.date(2026, 11, 20))
    assert get(seeded, Service, 2).status is ServiceStatus.ACTIVE
    r1 = get(seeded, CancellationRequest, 1)
    assert (r1.attempts, r1.days_late, r1.run_id, r1.processed_at) == (1, 6, 1, NOW)

    run = get(seeded, Run, 1)
    assert (run.status, run.due, run.completed, run.noop, run.emails_queued, run.late, run.max_days_late) == \
        (RunStatus.COMPLETED, 4, 3, 1, 3, 3, 6)  # request 3 (Immediate, made yesterday) is on time
    assert run.trigger is RunTrigger.CRON  # not on a terminal
    assert count(seeded, Lease) == 0
    with seeded.read_session() as s:
        emails = s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)).all()
    # The confirmations, sent at the end of the run (to var/outbox), then the staff digest.
    assert [(e.template, e.request_id, e.to_address, e.status.value) for e in emails] == [
        ("service_cancellation_confirmation", 1, "alice@example.test", "sent"),
        ("service_cancellation_confirmation", 3, "alice@example.test", "sent"),
        ("service_cancellation_confirmation", 4, "alice@example.test", "sent"),
        ("cron_job_activity", None, "support@example.test", "sent")]
    assert sorted(p.name for p in (tmp_path / "var" / "outbox").iterdir()) == [
        f"{e.id:08d}-{e.template}.eml" for e in emails]
    # The digest reports the counts, so is not in them (README, "Email counts"): its own line says it went.
    assert "emails sent               3" in out and "staff digest              sent" in out
    # A second run finds nothing due.
    again = as_json(invoke("run", "--json"))
    assert (again["due"], again["completed"], again["status"]) == (0, 0, "completed")


def test_run_json_counts_match_the_database(invoke: Invoke, seeded: Database) -> None:
    summary = as_json(invoke("run", "--json", "--trigger", "schedule"))
    assert summary["run_id"] == 1 and summary["as_of"] == "2026-11-26" and summary["failures"] == []
    run = get(seeded, Run, summary["run_id"])
    for key in ("due", "completed", "noop", "retrying", "failed", "emails_queued", "late", "max_days_late"):
        assert summary[key] == getattr(run, key), key
    assert summary["status"] == run.status.value == "completed"
    assert run.trigger is RunTrigger.SCHEDULE
    with seeded.read_session() as s:
        completed = s.scalar(select(func.count()).where(CancellationRequest.run_id == run.id,
                                                        CancellationRequest.status == RequestStatus.COMPLETED))
    assert completed == summary["completed"] + summary["noop"] == 4
    assert count(seeded, OutboxEmail) - 1 == summary["emails_queued"] == 3  # and the staff digest
    # The digest reports the emails' counts, so it is not in them: it says it was sent itself.
    assert summary["digest_queued"] and summary["digest_sent"] and summary["emails_sent"] == 3


def test_dry_run_changes_nothing(invoke: Invoke, seeded: Database) -> None:
    before = snapshot(seeded)
    result = ok(invoke("run", "--dry-run"))
    assert ("dry run as of 2026-11-26: 3 to cancel, 1 no-op, 0 vetoed, 0 would fail, 0 reminders to queue; "
            "nothing was changed"
            in result.stdout)
    assert "Daily Backups" in result.stdout and "alice@example.test" in result.stdout
    assert snapshot(seeded) == before

    json_result = invoke("run", "--dry-run", "--json")
    preview = as_json(json_result)
    assert snapshot(seeded) == before
    assert preview["dry_run"] is True and preview["as_of"] == "2026-11-26"
    assert preview["summary"] == {"cancel": 3, "no-op": 1, "vetoed": 0, "error": 0, "remind": 0}


def test_dry_run_json_matches_what_the_real_run_does(invoke: Invoke, seeded: Database) -> None:
    add_request(seeded, 7, RequestType.IMMEDIATE)  # request 6: Bob has no email, it will fail
    preview = as_json(invoke("run", "--dry-run", "--json"), code=1)
    by_id = {item["request_id"]: item for item in preview["requests"]}
    assert {i: item["action"] for i, item in by_id.items()} == {1: "cancel", 3: "cancel", 4: "cancel", 5: "no-op",
                                                               6: "error"}
    assert by_id[1]["addons"] == "Daily Backups" and by_id[1]["unpaid_invoices"] == "#1 4.99"
    assert by_id[1]["days_late"] == 6 and by_id[1]["due_on"] == "2026-11-20"
    assert "no valid email address" in by_id[6]["detail"]

    summary = as_json(invoke("run", "--json"), code=1)
    assert summary["due"] == len(by_id)
    assert summary["completed"] == preview["summary"]["cancel"]
    assert summary["noop"] == preview["summary"]["no-op"]
    assert summary["retrying"] == preview["summary"]["error"]
    with seeded.read_session() as s:
        for rid, item in by_id.items():
            request = s.get(CancellationRequest, rid)
            service = s.get(Service, item["service_id"])
            if item["action"] == "cancel":
                assert request.status is RequestStatus.COMPLETED and service.termination_date == TODAY
                assert s.scalar(select(OutboxEmail.to_address).where(OutboxEmail.request_id == rid)) == item["email_to"]
            elif item["action"] == "no-op":
                assert request.status is RequestStatus.COMPLETED and service.termination_date != TODAY
            else:
                assert request.status is RequestStatus.PENDING and request.attempts == 1
    assert get(seeded, CancellationRequest, 2).status is RequestStatus.PENDING  # not in the preview, not touched


def test_dry_run_with_nothing_due(invoke: Invoke, db: Database) -> None:
    result = ok(invoke("run", "--dry-run"))
    assert "nothing is due" in result.stdout
    preview = as_json(invoke("run", "--dry-run", "--json"))
    assert preview["requests"] == [] and preview["summary"] == {"cancel": 0, "no-op": 0, "vetoed": 0, "error": 0,
                                                                  "remind": 0}


def test_run_limit(invoke: Invoke, seeded: Database) -> None:
    first = as_json(invoke("run", "--limit", "1", "--json"))
    assert (first["due"], first["completed"]) == (1, 1)
    assert statuses(seeded) == {1: "completed", 2: "pending", 3: "pending", 4: "pending", 5: "pending"}
    rest = as_json(invoke("run", "--limit", "10", "--json"))
    assert (rest["due"], rest["completed"], rest["noop"]) == (3, 2, 1)
    assert statuses(seeded)[2] == "pending"
    one_line_error(invoke("run", "--limit", "0"), "--limit")


def test_run_as_of_past_date_applies_only_what_was_due_then(invoke: Invoke, seeded: Database) -> None:
    summary = as_json(invoke("run", "--as-of", "2026-11-21", "--json"))
    assert summary["as_of"] == "2026-11-21"
    st = statuses(seeded)
    assert st[1] == "completed"  # due 11-20
    assert (st[2], st[4], st[5]) == ("pending", "pending", "pending")  # due 12-10, 11-23, 11-25
    r1 = get(seeded, CancellationRequest, 1)
    assert r1.days_late == 1
    assert get(seeded, Service, 1).termination_date == dt.date(2026, 11, 21)
    assert get(seeded, Run, summary["run_id"]).as_of == dt.date(2026, 11, 21)
    # Today's run catches up on the rest.
    catch_up = as_json(invoke("run", "--json"))
    assert statuses(seeded) == {1: "completed", 2: "pending", 3: "completed", 4: "completed", 5: "completed"}
    assert catch_up["late"] >= 2


def test_run_as_of_past_does_not_apply_requests_created_later(invoke: Invoke, seeded: Database) -> None:
    """Request 3 (Immediate) was created on 2026-11-25; it did not exist, so was not due, on 2026-11-21.

    A re-run of a past night must not cancel a service before its client asked.
    """
    as_json(invoke("run", "--as-of", "2026-11-21", "--json"))
    r3 = get(seeded, CancellationRequest, 3)
    s3 = get(seeded, Service, 3)
    assert r3.status is RequestStatus.PENDING, (
        f"request 3, created {r3.created_at:%Y-%m-%d}, was applied by a run as of 2026-11-21: "
        f"service 3 termination_date {s3.termination_date} is before the request existed"
    )


def test_run_as_of_future_is_refused_but_allowed_with_dry_run(invoke: Invoke, seeded: Database) -> None:
    before = snapshot(seeded)
    one_line_error(invoke("run", "--as-of", "2026-12-31"), "--as-of 2026-12-31 is in the future", "--dry-run")
    assert count(seeded, Run) == 0
    assert snapshot(seeded) == before

    preview = as_json(invoke("run", "--as-of", "2026-12-31", "--dry-run", "--json"))
    assert preview["as_of"] == "2026-12-31"
    assert {i["request_id"] for i in preview["requests"]} == {1, 2, 3, 4, 5}  # request 2 is due by then
    assert snapshot(seeded) == before


def test_run_exit_1_when_a_request_fails_and_the_others_still_apply(invoke: Invoke, seeded: Database) -> None:
    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    result = ok(invoke("run"), code=1)
    assert "status                    completed_with_failures" in result.stdout
    assert "failed, will retry        1" in result.stdout
    assert f"request {rid} (service 7): client of service 7 has no valid email address ('') [will retry]" \
        in result.stdout
    r = get(seeded, CancellationRequest, rid)
    assert (r.status, r.attempts) == (RequestStatus.PENDING, 1)
    assert "no valid email address" in r.last_error
    assert r.next_attempt_at == NOW + dt.timedelta(minutes=60)  # retry_backoff_minutes
    assert get(seeded, Service, 7).status is ServiceStatus.ACTIVE
    assert statuses(seeded)[1] == "completed"  # one bad request never stops the others
    assert audit_actions(seeded, rid) == ["attempt_failed"]
    run = get(seeded, Run, 1)
    assert (run.status, run.retrying, run.failed) == (RunStatus.COMPLETED_WITH_FAILURES, 1, 0)

    # Backoff: the next run (same instant) leaves it alone; an hour later it is tried again.
    assert as_json(invoke("run", "--json"))["due"] == 0
    with freeze_time(NOW + dt.timedelta(minutes=61)):
        again = as_json(invoke("run", "--json"), code=1)
    assert (again["due"], again["retrying"]) == (1, 1)
    assert get(seeded, CancellationRequest, rid).attempts == 2


def test_run_gives_up_after_max_attempts(invoke: Invoke, seeded: Database) -> None:
    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    result = ok(invoke("run", env={"CANCELPROC_MAX_ATTEMPTS": "1"}), code=1)
    assert "failed for good           1" in result.stdout
    assert "[MANUAL CANCELLATION REQUIRED]" in result.stdout
    r = get(seeded, CancellationRequest, rid)
    assert (r.status, r.attempts, r.next_attempt_at) == (RequestStatus.FAILED, 1, None)
    assert audit_actions(seeded, rid) == ["failed"]


def test_run_exit_75_when_another_run_holds_the_lease(invoke: Invoke, seeded: Database) -> None:
    host = socket.gethostname() + "-elsewhere"
    with seeded.session.begin() as s:
        other = Run(trigger=RunTrigger.CRON, operator="cron", as_of=TODAY, host=host, pid=4242,
                    status=RunStatus.RUNNING, started_at=NOW - dt.timedelta(minutes=5))
        s.add(other)
        s.flush()
        s.add(Lease(name=LEASE_NAME, run_id=other.id, host=host, pid=4242, acquired_at=NOW - dt.timedelta(minutes=5),
                    expires_at=NOW + dt.timedelta(minutes=5)))
    before = snapshot(seeded)
    result = invoke("run")
    one_line_error(result, f"run {other.id} in progress on host {host} (pid 4242)", code=75)
    assert snapshot(seeded) == before  # no run row, nothing applied
    # A dry run needs no lease.
    assert as_json(invoke("run", "--dry-run", "--json"))["summary"]["cancel"] == 3
    # Once the lease has expired, the next run takes it over and records the old run as abandoned.
    with freeze_time(NOW + dt.timedelta(minutes=6)):
        summary = as_json(invoke("run", "--json"))
    assert summary["completed"] == 3
    assert get(seeded, Run, other.id).status is RunStatus.ABANDONED


def test_run_takes_over_the_lease_of_a_dead_process_on_this_host(invoke: Invoke, seeded: Database) -> None:
    dead_pid = next(pid for pid in range(4_000_000, 4_100_000) if not psutil.pid_exists(pid))
    host = socket.gethostname()
    with seeded.session.begin() as s:
        other = Run(trigger=RunTrigger.CRON, operator="cron", as_of=TODAY, host=host, pid=dead_pid,
                    status=RunStatus.RUNNING, started_at=NOW - dt.timedelta(minutes=1))
        s.add(other)
        s.flush()
        s.add(Lease(name=LEASE_NAME, run_id=other.id, host=host, pid=dead_pid,
                    acquired_at=NOW - dt.timedelta(minutes=1), expires_at=NOW + dt.timedelta(minutes=9)))
    summary = as_json(invoke("run", "--json"))  # not expired, but its holder is gone: no waiting
    assert summary["run_id"] == other.id + 1 and summary["completed"] == 3
    old = get(seeded, Run, other.id)
    assert (old.status, old.error) == (RunStatus.ABANDONED, lease.ABANDONED)
    assert count(seeded, Lease) == 0


def test_today_is_in_the_business_time_zone(invoke: Invoke, seeded: Database) -> None:
    # 2026-11-26T02:00Z is still 2026-11-25 (18:00) in Los Angeles.
    la = {"CANCELPROC_BUSINESS_TIMEZONE": "America/Los_Angeles"}
    one_line_error(invoke("run", "--as-of", "2026-11-26", env=la), "is in the future", "today is 2026-11-25")
    ok(invoke("requests", "create", "5", "--type", "on-date", "--on", "2026-11-25", "--reason-code", "other", env=la))
    summary = as_json(invoke("run", "--json", env=la))
    assert summary["as_of"] == "2026-11-25"
    st = statuses(seeded)
    assert (st[1], st[3], st[4], st[5], st[6]) == ("completed",) * 5
    assert get(seeded, Service, 1).termination_date == dt.date(2026, 11, 25)


# --- requests ------------------------------------------------------------------------------

@pytest.mark.parametrize(("type_name", "extra", "expected_type", "cancel_on"), [
    ("immediate", [], RequestType.IMMEDIATE, None),
    ("end-of-period", [], RequestType.END_OF_BILLING_PERIOD, None),
    ("on-date", ["--on", "2026-12-01"], RequestType.ON_DATE, dt.date(2026, 12, 1)),
    ("on-date", ["--on", "2026-11-26"], RequestType.ON_DATE, TODAY),  # today is not in the past
])
def test_requests_create_each_type(invoke: Invoke, seeded: Database, type_name: str, extra: list[str],
                                   expected_type: RequestType, cancel_on: dt.date | None) -> None:
    result = ok(invoke("requests", "create", "5", "--type", type_name, "--reason-code", "too_expensive",
                       "--reason", "cheaper elsewhere", *extra))
    assert result.stdout.strip() == f"request 6 created for service 5 ({expected_type.value}); 2 email(s) sent"
    r = get(seeded, CancellationRequest, 6)
    assert (r.service_id, r.type, r.cancel_on, r.status, r.reason_code, r.reason, r.attempts, r.created_at) == \
        (5, expected_type, cancel_on, RequestStatus.PENDING, "too_expensive", "cheaper elsewhere", 0, NOW)
    assert r.created_by  # the operator
    assert audit_actions(seeded, 6) == ["created"]


def test_requests_create_default_type_and_json(invoke: Invoke, seeded: Database) -> None:
    row = as_json(invoke("requests", "create", "5", "--reason-code", "other", "--json"))
    assert (row["id"], row["service_id"], row["type"], row["status"], row["reason_code"]) == \
        (6, 5, "End of Billing Period", "pending", "other")


@pytest.mark.parametrize(("args", "fragments"), [
    (["5", "--reason-code", "nope"], ["--reason-code", "'nope' is not a configured reason", "too_expensive"]),
    (["5", "--type", "on-date", "--reason-code", "other"], ["--on", "needs the date"]),
    (["5", "--type", "on-date", "--on", "2026-11-25", "--reason-code", "other"], ["2026-11-25 is in the past"]),
    (["5", "--type", "immediate", "--on", "2026-12-01", "--reason-code", "other"], ["--on", "only an On Date"]),
    (["5", "--type", "on-date", "--on", "2026-02-30", "--reason-code", "other"], ["'2026-02-30' is not a date"]),
    (["5"], ["--reason-code"]),  # required
    (["5", "--type", "someday", "--reason-code", "other"], ["--type"]),
    (["1", "--reason-code", "other"], ["service 1 already has open request 1 (pending)"]),
    (["999", "--reason-code", "other"], ["service 999 not found"]),
    (["6", "--reason-code", "other"], ["service 6 is already Cancelled"]),
])
def test_requests_create_refused(invoke: Invoke, seeded: Database, args: list[str], fragments: list[str]) -> None:
    before = snapshot(seeded)
    one_line_error(invoke("requests", "create", *args), *fragments)
    assert snapshot(seeded) == before


def test_a_domain_error_names_its_field_and_the_cli_the_option(invoke: Invoke, seeded: Database) -> None:
    with seeded.session.begin() as session, pytest.raises(FieldError) as caught:
        cancellations.create_request(session, service_id=5, type_=RequestType.ON_DATE, reason_code="other",
                                     reason="", allowed_reasons=["other"], cancel_on=TODAY - dt.timedelta(days=1),
                                     actor="test", now=NOW, today=TODAY)
    problem = "2026-11-25 is in the past (today is 2026-11-26 in the business time zone)"
    assert (caught.value.field, str(caught.value)) == ("cancel_on", f"cancel_on: {problem}")
    assert one_line_error(invoke("requests", "create", "5", "--type", "on-date", "--on", "2026-11-25",
                                 "--reason-code", "other")) == f"error: --on: {problem}"


def test_requests_create_second_open_request_refused(invoke: Invoke, seeded: Database) -> None:
    ok(invoke("requests", "create", "5", "--reason-code", "other"))
    before = snapshot(seeded)
    one_line_error(invoke("requests", "create", "5", "--type", "immediate", "--reason-code", "other"),
                   "service 5 already has open request 6")
    assert snapshot(seeded) == before


def test_requests_create_uses_reason_codes_from_the_config_file(invoke: Invoke, seeded: Database,
                                                               tmp_path: Path) -> None:
    config = write_config(tmp_path, 'reason_codes = ["price", "moving"]\n')
    ok(invoke("--config", config, "requests", "create", "5", "--reason-code", "moving"))
    one_line_error(invoke("--config", config, "requests", "create", "7", "--reason-code", "too_expensive"),
                   "allowed: price, moving")


def test_requests_list_filters_and_json(invoke: Invoke, seeded: Database) -> None:
    text = ok(invoke("requests", "list")).stdout.splitlines()
    assert text[0].split()[:3] == ["ID", "CLIENT", "DOMAIN"]
    # Newest first by when they were made (request 3 yesterday, the others ten days ago), then by id.
    assert [line.split()[0] for line in text[1:]] == ["3", "5", "4", "2", "1"]

    assert [r["id"] for r in as_json(invoke("requests", "list", "--json"))["rows"]] == [3, 5, 4, 2, 1]
    assert [r["id"] for r in as_json(invoke("requests", "list", "--service", "2", "--json"))["rows"]] == [2]
    assert [r["id"] for r in as_json(invoke("requests", "list", "--limit", "2", "--json"))["rows"]] == [3, 5]
    ok(invoke("run"))
    completed = as_json(invoke("requests", "list", "--status", "completed", "--json"))["rows"]
    assert sorted(r["id"] for r in completed) == [1, 3, 4, 5]
    assert all(r["status"] == "completed" and r["run_id"] == 1 for r in completed)
    assert [r["id"] for r in as_json(invoke("requests", "list", "--status", "pending", "--json"))["rows"]] == [2]
    assert ok(invoke("requests", "list", "--status", "failed")).stdout.strip() == "no requests"
    one_line_error(invoke("requests", "list", "--status", "bogus"), "--status")


def test_requests_show_json_has_audit_and_due_now(invoke: Invoke, seeded: Database) -> None:
    ok(invoke("requests", "create", "5", "--reason-code", "other"))
    row = as_json(invoke("requests", "show", "6", "--json"))
    assert (row["id"], row["status"], row["due_now"], row["due_on"]) == (6, "pending", False, "2026-12-20")
    assert row["service"]["id"] == 5 and row["service"]["status"] == "Active"
    assert [(a["action"], a["entity"], a["entity_id"]) for a in row["audit"]] == [("created", "request", 6)]

    assert as_json(invoke("requests", "show", "1", "--json"))["due_now"] is True
    assert as_json(invoke("requests", "show", "2", "--json"))["due_now"] is False
    ok(invoke("requests", "process", "1"))
    done = as_json(invoke("requests", "show", "1", "--json"))
    assert (done["status"], done["due_now"], done["days_late"]) == ("completed", False, 6)
    assert [(a["entity"], a["action"]) for a in done["audit"]] == [
        ("service", "cancelled"), ("addon", "cancelled"), ("invoice", "cancelled")]

    text = ok(invoke("requests", "show", "1")).stdout
    assert "audit trail:" in text and "completed" in text and "service     1 " in text
    one_line_error(invoke("requests", "show", "999"), "request 999 not found")
    one_line_error(invoke("requests", "show", "abc"), "abc")


def test_requests_withdraw(invoke: Invoke, seeded: Database) -> None:
    result = ok(invoke("requests", "withdraw", "2", "--note", "client changed their mind"))
    assert result.stdout.strip() == "request 2 withdrawn; 1 email(s) sent"  # the client is told (to the folder)
    r2 = get(seeded, CancellationRequest, 2)
    assert (r2.status, r2.note) == (RequestStatus.WITHDRAWN, "client changed their mind")
    assert audit_actions(seeded, 2) == ["withdrawn"]
    assert get(seeded, Service, 2).status is ServiceStatus.ACTIVE
    # The service may get a new request now.
    ok(invoke("requests", "create", "2", "--reason-code", "other"))

    before = snapshot(seeded)
    one_line_error(invoke("requests", "withdraw", "2"), "request 2 is withdrawn",
                   "only a pending or failed request can be withdrawn")
    assert snapshot(seeded) == before
    ok(invoke("requests", "process", "1"))
    before = snapshot(seeded)
    one_line_error(invoke("requests", "withdraw", "1"), "request 1 is completed on 2026-11-26",
                   "only a pending or failed request can be withdrawn")
    one_line_error(invoke("requests", "withdraw", "999"), "request 999 not found")
    assert snapshot(seeded) == before


def test_requests_withdraw_a_failed_request(invoke: Invoke, seeded: Database) -> None:
    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    ok(invoke("run", env={"CANCELPROC_MAX_ATTEMPTS": "1"}), code=1)
    ok(invoke("requests", "withdraw", rid))
    assert get(seeded, CancellationRequest, rid).status is RequestStatus.WITHDRAWN
    assert audit_actions(seeded, rid) == ["failed", "withdrawn"]


def test_requests_retry_a_failed_request(invoke: Invoke, seeded: Database) -> None:
    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    ok(invoke("run", env={"CANCELPROC_MAX_ATTEMPTS": "1"}), code=1)
    assert get(seeded, CancellationRequest, rid).status is RequestStatus.FAILED

    result = ok(invoke("requests", "retry", rid))
    assert f"request {rid} is pending again (attempts reset)" in result.stdout
    r = get(seeded, CancellationRequest, rid)
    assert (r.status, r.attempts, r.next_attempt_at) == (RequestStatus.PENDING, 0, None)
    assert audit_actions(seeded, rid) == ["failed", "retry"]
    # Already pending with no backoff: nothing to retry.
    one_line_error(invoke("requests", "retry", rid), "already pending")
    one_line_error(invoke("requests", "retry", "2"), "request 2 is already pending")
    one_line_error(invoke("requests", "retry", "1"), "request 1 is completed",
                   "only a failed or pending request can be retried")
    one_line_error(invoke("requests", "retry", "999"), "request 999 not found")


def test_requests_retry_skips_the_backoff(invoke: Invoke, seeded: Database) -> None:
    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    ok(invoke("run"), code=1)
    assert get(seeded, CancellationRequest, rid).next_attempt_at is not None
    ok(invoke("requests", "retry", rid))
    r = get(seeded, CancellationRequest, rid)
    assert (r.status, r.attempts, r.next_attempt_at) == (RequestStatus.PENDING, 0, None)
    assert as_json(invoke("run", "--json"), code=1)["due"] == 1  # tried again at once


def test_requests_resolve_by_hand(invoke: Invoke, seeded: Database) -> None:
    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    ok(invoke("run", env={"CANCELPROC_MAX_ATTEMPTS": "1"}), code=1)
    one_line_error(invoke("requests", "resolve", rid, "--note", "  "), "--note")
    one_line_error(invoke("requests", "resolve", rid), "--note")  # required

    result = ok(invoke("requests", "resolve", rid, "--note", "terminated in the panel by hand"))
    assert result.stdout.strip() == f"request {rid} resolved by hand"
    r = get(seeded, CancellationRequest, rid)
    assert (r.status, r.note, r.processed_at) == (RequestStatus.COMPLETED, "terminated in the panel by hand", NOW)
    assert get(seeded, Service, 7).status is ServiceStatus.ACTIVE  # the service is not touched
    row = as_json(invoke("requests", "show", rid, "--json"))
    assert row["audit"][-1]["action"] == "resolved_by_hand"
    assert row["audit"][-1]["detail"] == "terminated in the panel by hand"
    one_line_error(invoke("requests", "resolve", "2", "--note", "x"), "request 2 is pending",
                   "only a failed request, or a pending one waiting out the backoff")


def test_requests_process_applies_at_once(invoke: Invoke, seeded: Database) -> None:
    result = ok(invoke("requests", "process", "1"))
    assert "cancelled                 1" in result.stdout
    assert statuses(seeded) == {1: "completed", 2: "pending", 3: "pending", 4: "pending", 5: "pending"}
    assert get(seeded, Service, 1).status is ServiceStatus.CANCELLED
    run = get(seeded, Run, 1)
    assert (run.trigger, run.due, run.completed) == (RunTrigger.MANUAL, 1, 1)
    assert count(seeded, OutboxEmail) == 1


def test_requests_process_not_due_needs_now(invoke: Invoke, seeded: Database) -> None:
    before = snapshot(seeded)
    one_line_error(invoke("requests", "process", "2"), "request 2 is not due until 2026-12-10", "--now")
    assert snapshot(seeded) == before

    summary = as_json(invoke("requests", "process", "2", "--now", "--json"))
    assert (summary["due"], summary["completed"]) == (1, 1)
    r2 = get(seeded, CancellationRequest, 2)
    assert (r2.status, r2.days_late) == (RequestStatus.COMPLETED, 0)
    s2 = get(seeded, Service, 2)
    assert (s2.status, s2.termination_date) == (ServiceStatus.CANCELLED, TODAY)

    before = snapshot(seeded)
    one_line_error(invoke("requests", "process", "2"), "request 2 is completed",
                   "only a pending request can be processed")
    one_line_error(invoke("requests", "process", "999"), "request 999 not found")
    one_line_error(invoke("requests", "process"), "REQUEST_ID|ext:ID")
    # One bad id refuses them all: request 1 (due) is not applied either.
    one_line_error(invoke("requests", "process", "1", "2"), "request 2 is completed")
    one_line_error(invoke("requests", "process", "1", "5", "999"), "request 999 not found")
    assert snapshot(seeded) == before


def test_requests_process_a_failing_request_exits_1(invoke: Invoke, seeded: Database) -> None:
    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    summary = as_json(invoke("requests", "process", rid, "--json"), code=1)
    assert summary["retrying"] == 1 and summary["failures"][0]["request_id"] == rid
    assert get(seeded, CancellationRequest, rid).attempts == 1


# --- runs ----------------------------------------------------------------------------------

def test_runs_list_and_show(invoke: Invoke, seeded: Database) -> None:
    assert ok(invoke("runs", "list")).stdout.strip() == "no runs yet"
    one_line_error(invoke("runs", "show", "last"), "no runs yet")

    rid = add_request(seeded, 7, RequestType.IMMEDIATE)
    ok(invoke("run", "--as-of", "2026-11-21"), code=1)  # request 1 and the failing one (3 was made later)
    ok(invoke("run"), code=0)  # the failing one waits for its backoff
    rows = as_json(invoke("runs", "list", "--json"))["rows"]
    assert [r["id"] for r in rows] == [2, 1]
    assert [(r["status"], r["as_of"]) for r in rows] == [("completed", "2026-11-26"),
                                                         ("completed_with_failures", "2026-11-21")]
    assert as_json(invoke("runs", "list", "--limit", "1", "--json"))["rows"][0]["id"] == 2
    table = ok(invoke("runs", "list")).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "STARTED_AT", "TRIGGER"] and len(table) == 3

    one = as_json(invoke("runs", "show", "1", "--json"))
    assert (one["id"], one["due"], one["completed"], one["retrying"]) == (1, 2, 1, 1)
    assert [(f["action"], f["entity_id"]) for f in one["failures"]] == [("attempt_failed", rid)]
    assert "no valid email address" in one["failures"][0]["detail"]
    text = ok(invoke("runs", "show", "1")).stdout
    assert "failures:" in text and "attempt_failed" in text

    last = as_json(invoke("runs", "show", "last", "--json"))
    assert last["id"] == 2 and last["failures"] == []
    assert sorted(r["request_id"] for r in last["late_requests"]) == [4, 5]  # 3 and 1 days late
    text = ok(invoke("runs", "show", "last")).stdout
    assert "latest applied (catch-up):" in text and "(none)" in text

    one_line_error(invoke("runs", "show", "99"), "run 99 not found")


def test_people_read_times_in_the_business_time_zone_and_json_keeps_the_offset(invoke: Invoke,
                                                                               seeded: Database) -> None:
    """Lists and records show times in business_timezone with its abbreviation (NOW is
    02:00 UTC: 03:00 in Berlin in November); JSON carries ISO 8601 with the offset."""
    berlin = {"CANCELPROC_BUSINESS_TIMEZONE": "Europe/Berlin"}
    ok(invoke("run", env=berlin))
    table = ok(invoke("runs", "list", env=berlin)).stdout.splitlines()
    assert "2026-11-26 03:00 CET" in table[1]
    shown = ok(invoke("runs", "show", "1", env=berlin)).stdout.splitlines()
    assert ["started_at", "2026-11-26", "03:00", "CET"] in [line.split() for line in shown]
    assert "2026-11-26 02:00 UTC" in ok(invoke("runs", "list")).stdout  # the default zone, labelled too
    assert as_json(invoke("runs", "list", "--json", env=berlin))["rows"][0]["started_at"] == "2026-11-26T02:00:00+00:00"
    created = as_json(invoke("requests", "show", "1", "--json", env=berlin))["created_at"]
    assert created.endswith("+00:00") and f"{created[:10]} " in ok(invoke("requests", "list", env=berlin)).stdout


def test_runs_show_names_vetoes(invoke: Invoke, seeded: Database, tmp_path: Path) -> None:
    """A vetoed request is a failure of its run: `runs show` names it, as the run and its digest do."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "hold.py").write_text(
        "from processor.hooks import add_hook\n\n\n"
        "@add_hook('PreModuleTerminate')\n"
        "def hold_everything(params):\n"
        "    return {'abortcmd': True, 'reason': 'on hold by billing'}\n")
    summary = as_json(invoke("run", "--json"), code=1)
    vetoed = sorted(f["request_id"] for f in summary["failures"] if f["vetoed"])
    assert summary["vetoed"] == len(vetoed) == len(summary["failures"]) == 3  # requests 1, 3, 4 (5 is a no-op)

    shown = as_json(invoke("runs", "show", "last", "--json"))
    assert shown["vetoed"] == 3
    assert sorted((f["entity_id"], f["action"]) for f in shown["failures"]) == [(r, "vetoed") for r in vetoed]
    assert all("on hold by billing" in f["detail"] for f in shown["failures"])
    text = ok(invoke("runs", "show", "last")).stdout
    rows = text[text.index("failures:"):].splitlines()[2:]  # after the heading and the table's header
    # AT is "2026-11-26 02:00 UTC" (three words), then ENTITY_ID and ACTION
    assert [(row.split()[3], row.split()[4]) for row in rows] == [(str(r), "vetoed") for r in vetoed]
    assert all("on hold by billing" in row for row in rows)
    one_line_error(invoke("runs", "show", "abc"), "'abc' is not a run id")
    one_line_error(invoke("runs", "show", "1.5"), "'1.5' is not a run id")


# --- services ------------------------------------------------------------------------------

def test_services_list(invoke: Invoke, seeded: Database) -> None:
    rows = as_json(invoke("services", "list", "--json"))["rows"]
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[0]["client"] == "Alice Martin" and rows[0]["product"] == "Shared Hosting"
    assert [r["id"] for r in as_json(invoke("services", "list", "--status", "Cancelled", "--json"))["rows"]] == [6]
    active = as_json(invoke("services", "list", "--status", "active", "--json"))["rows"]
    assert [r["id"] for r in active] == [1, 2, 3, 4, 5, 7]
    assert [r["id"] for r in as_json(invoke("services", "list", "--client", "2", "--json"))["rows"]] == [7]
    assert [r["id"] for r in as_json(invoke("services", "list", "--limit", "2", "--json"))["rows"]] == [1, 2]
    text = ok(invoke("services", "list", "--client", "2")).stdout.splitlines()
    assert text[0].split()[:3] == ["ID", "EXTERNAL_ID", "CLIENT"] and "Bob Novak" in text[1]
    assert ok(invoke("services", "list", "--status", "fraud")).stdout.strip() == "no services"
    one_line_error(invoke("services", "list", "--status", "gone"), "--status")


def test_services_show(invoke: Invoke, seeded: Database) -> None:
    ok(invoke("run"))
    row = as_json(invoke("services", "show", "1", "--json"))
    assert (row["id"], row["status"], row["termination_date"], row["client_email"]) == \
        (1, "Cancelled", "2026-11-26", "alice@example.test")
    assert [(a["name"], a["status"]) for a in row["addons"]] == [("Daily Backups", "Cancelled")]
    assert sorted((i["id"], i["status"]) for i in row["invoices"]) == [(1, "Cancelled"), (2, "Paid")]
    assert [(r["id"], r["status"]) for r in row["requests"]] == [(1, "completed")]
    assert [(e["to"], e["status"], e["template"]) for e in row["emails"]] == \
        [("alice@example.test", "sent", "service_cancellation_confirmation")]
    text = ok(invoke("services", "show", "1")).stdout
    for title in ("add-ons:", "invoices:", "requests:", "emails:", "Daily Backups"):
        assert title in text
    empty = as_json(invoke("services", "show", "5", "--json"))
    assert (empty["addons"], empty["invoices"], empty["requests"], empty["emails"]) == ([], [], [], [])
    one_line_error(invoke("services", "show", "999"), "service 999 not found")


# --- bad input: one line, exit 2, nothing written ------------------------------------------

@pytest.mark.parametrize("args", [
    ["run", "--as-of", "2026-13-01"],
    ["run", "--as-of", "yesterday"],
    ["run", "--bogus"],
    ["--bogus", "run"],
    ["nosuchcommand"],
    ["requests", "show", "abc"],
    ["requests", "list", "--limit", "x"],
    ["run", "--trigger", "nightly"],
], ids=lambda a: " ".join(a))
def test_bad_arguments(invoke: Invoke, seeded: Database, args: list[str]) -> None:
    before = snapshot(seeded)
    one_line_error(invoke(*args))
    assert snapshot(seeded) == before


def test_unparsable_date_names_the_option(invoke: Invoke, seeded: Database) -> None:
    one_line_error(invoke("run", "--as-of", "2026-13-01"), "--as-of", "'2026-13-01' is not a date; use YYYY-MM-DD")


@pytest.mark.parametrize("args", [["run"], ["requests", "list"], ["runs", "list"], ["services", "show", "1"],
                                  ["run", "--dry-run"], ["db", "upgrade"]], ids=" ".join)
def test_database_url_that_cannot_be_opened(invoke: Invoke, tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "nowhere" / "c.db"
    result = invoke(*args, env={"CANCELPROC_DATABASE_URL": f"sqlite:///{missing}"})
    if args == ["db", "upgrade"]:  # db upgrade creates the database, like init
        ok(result)
        return
    one_line_error(result, f"database {missing} does not exist", "cancelproc init")
    assert not missing.parent.exists()


@pytest.mark.parametrize("args", [["init"], ["run"], ["requests", "list"]], ids=" ".join)
def test_database_url_with_unknown_driver(invoke: Invoke, args: list[str]) -> None:
    one_line_error(invoke(*args, env={"CANCELPROC_DATABASE_URL": "postgresql+nosuchdriver://x"}),
                   "database_url postgresql+nosuchdriver://x")


def test_database_url_not_parsable_or_a_folder(invoke: Invoke, tmp_path: Path) -> None:
    one_line_error(invoke("requests", "list", env={"CANCELPROC_DATABASE_URL": "not a url"}), "database_url")
    one_line_error(invoke("requests", "list", env={"CANCELPROC_DATABASE_URL": f"sqlite:///{tmp_path}"}),
                   "cannot be opened")


@pytest.mark.postgresql_only
def test_a_database_server_that_is_down_is_a_temporary_failure(invoke: Invoke, pg_server: Any, backend: str) -> None:
    """Exit 75 (EX_TEMPFAIL) for a server that is not there (tomorrow's run, or systemd's
    Restart=, tries again); exit 2 for what the operator must fix (a database that does not
    exist). Either way one line, and no traceback."""
    down = f"postgresql://cancelproc@127.0.0.1:{free_port()}/cancelproc"
    for args in (["run"], ["requests", "list"]):
        line = one_line_error(invoke(*args, env={"CANCELPROC_DATABASE_URL": down}), "cannot be opened",
                              "Connection refused", code=75)
        assert "\\n" not in line
    missing = pg_server.url("no_such_database")
    one_line_error(invoke("run", env={"CANCELPROC_DATABASE_URL": missing}), "does not exist", code=2)


def test_database_file_that_is_not_a_database(invoke: Invoke, tmp_path: Path) -> None:
    """SQLite reports a non-database file as sqlite3.DatabaseError (not OperationalError): still bad input."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite file\n" * 200)
    for args in (["requests", "list"], ["run"], ["init"]):
        result = invoke(*args, env={"CANCELPROC_DATABASE_URL": f"sqlite:///{junk}"})
        assert result.exit_code == 2 and result.stderr.startswith("error: "), (
            f"{' '.join(args)} on a file that is not a database: exit {result.exit_code}, {result.stderr.strip()!r}"
        )
        one_line_error(result, str(junk))


def test_relative_database_url_in_the_config_is_relative_to_the_app_root(invoke: Invoke, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "app"
    config = write_config(root, 'database_url = "sqlite:///var/here.db"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ok(invoke("--config", config, "init", env={"CANCELPROC_DATABASE_URL": None}))
    assert (root / "var" / "here.db").is_file()
    assert not (elsewhere / "var").exists()


@pytest.mark.parametrize(("text", "fragments"), [
    ("chunk_size = 0\n", ["chunk_size", "greater than or equal to 1"]),
    ('business_timezone = "Mars/Base"\n', ["business_timezone", "unknown time zone 'Mars/Base'"]),
    ('log_level = "loud"\n', ["log_level"]),
    ("max_attempts = \"many\"\n", ["max_attempts"]),
    ("[email]\nnope = 1\n", ["email.nope", "unknown setting"]),
    ("colour = 1\n", ["colour", "unknown setting"]),
    ("chunk_size = \n", ["not valid TOML"]),
], ids=["chunk_size", "timezone", "log_level", "max_attempts", "email.nope", "unknown key", "toml"])
def test_config_file_with_an_invalid_value(invoke: Invoke, seeded: Database, tmp_path: Path, text: str,
                                           fragments: list[str]) -> None:
    config = write_config(tmp_path, text, "bad.toml")
    before = snapshot(seeded)
    for args in (["--config", config, "run"], ["--config", config, "requests", "list"]):
        one_line_error(invoke(*args), str(config), *fragments)
    # The same file found through CANCELPROC_CONFIG.
    one_line_error(invoke("run", env={"CANCELPROC_CONFIG": str(config)}), str(config), *fragments)
    assert snapshot(seeded) == before


def test_default_config_file_is_read_from_the_working_directory(invoke: Invoke, seeded: Database,
                                                                tmp_path: Path) -> None:
    write_config(tmp_path, "max_attempts = 0\n")  # ./config/processor.toml
    one_line_error(invoke("run"), "processor.toml", "max_attempts")


def test_environment_variable_with_an_invalid_value(invoke: Invoke, seeded: Database) -> None:
    one_line_error(invoke("run", env={"CANCELPROC_MAX_ATTEMPTS": "abc"}),
                   "environment variable CANCELPROC_MAX_ATTEMPTS", "max_attempts")
    assert count(seeded, Run) == 0


def test_unknown_environment_variable_is_refused_naming_the_closest(invoke: Invoke, seeded: Database) -> None:
    """CANCELPROC_EMAIL_DELIVERY (one underscore) would set nothing: refused, not ignored."""
    before = snapshot(seeded)
    one_line_error(invoke("run", env={"CANCELPROC_EMAIL_DELIVERY": "smtp"}),
                   "environment variable CANCELPROC_EMAIL_DELIVERY: not a cancelproc setting; "
                   "did you mean CANCELPROC_EMAIL__DELIVERY?")
    one_line_error(invoke("requests", "list", env={"CANCELPROC_COLOUR": "1"}),
                   "environment variable CANCELPROC_COLOUR: not a cancelproc setting; settings are CANCELPROC_")
    assert snapshot(seeded) == before


def test_missing_config_file(invoke: Invoke, seeded: Database, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    one_line_error(invoke("--config", missing, "run"), f"{missing}: config file not found")
    one_line_error(invoke("run", env={"CANCELPROC_CONFIG": str(missing)}), "config file not found")
    assert count(seeded, Run) == 0


# --- internal errors and --debug -----------------------------------------------------------

def test_internal_error_is_one_line_and_debug_lets_the_traceback_through(
        invoke: Invoke, seeded: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli_module, "echo_page", boom)
    result = invoke("requests", "list")
    assert result.exit_code == 70
    lines = result.stderr.strip().splitlines()
    assert lines == ["internal error: RuntimeError: boom (run with --debug for the traceback)"]

    debug = invoke("--debug", "requests", "list")
    assert isinstance(debug.exception, RuntimeError) and str(debug.exception) == "boom\nsecond line"
    assert debug.exc_info is not None and debug.exc_info[2] is not None  # the traceback goes through
    # CANCELPROC_DEBUG=1 does the same; a domain error is raised too.
    assert isinstance(invoke("requests", "list", env={"CANCELPROC_DEBUG": "1"}).exception, RuntimeError)
    assert type(invoke("--debug", "runs", "show", "99").exception).__name__ == "NotFound"
    # --debug after the subcommand, as one adds it to the command that just failed; not after `--`.
    assert isinstance(invoke("requests", "list", "--debug").exception, RuntimeError)
    assert type(invoke("runs", "show", "99", "--debug").exception).__name__ == "NotFound"
    assert invoke("runs", "show", "--", "--debug").exit_code == 2


# --- help and version ----------------------------------------------------------------------

def _command_paths(command: click.Command = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _command_paths(sub, (*path, name))


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", list(_command_paths()), ids=lambda p: " ".join(p) or "cancelproc")
def test_help_of_every_command(invoke: Invoke, path: tuple[str, ...]) -> None:
    result = ok(invoke(*path, "--help"))
    assert result.stdout.startswith("Usage: ")
    assert ok(invoke(*path, "-h")).stdout == result.stdout


def test_group_without_a_command_shows_its_help(invoke: Invoke) -> None:
    """click >= 8.2 raises NoArgsIsHelpError (a UsageError) for a bare group: show the help, not an error."""
    groups = [p for p in _command_paths() if isinstance(_command(p), click.Group)]
    assert len(groups) >= 5
    garbled = {}
    for path in groups:
        result = invoke(*path)
        if "error:" in result.output or not result.output.startswith("Usage: "):
            garbled[" ".join(("cancelproc", *path))] = (result.exit_code, result.output.splitlines()[0])
    assert not garbled, f"a group without a command printed its help as an error: {garbled}"


def test_version(invoke: Invoke) -> None:
    """The version comes from the package itself, so it works from a source checkout too."""
    result = invoke("--version")
    assert result.exit_code == 0 and processor.__version__ in result.stdout, (
        f"`cancelproc --version` from a source checkout exits {result.exit_code}: {result.stderr.strip()}"
    )
