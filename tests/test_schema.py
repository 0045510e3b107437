"""The schema: migrations match the models, and one open request per service is enforced."""

from __future__ import annotations

import datetime as dt
import importlib
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select
from sqlalchemy import text as sql
from sqlalchemy.exc import IntegrityError

import processor
from processor import db as dbmod
from processor.errors import DatabaseError
from processor.find_index import not_find_index
from processor.models import Base, CancellationRequest, RequestStatus, Service, ServiceAddon
from tests import factories


def test_migrations_match_the_models(db):
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(
            conn, opts={"compare_type": True, "include_name": not_find_index}), Base.metadata)
    assert diff == [], f"models and migrations drift; add a migration: {diff}"


def test_migrations_reach_head(db):
    assert dbmod.current_revision(db) == dbmod.head_revision(db)
    dbmod.require_current(db)


def test_an_unmigrated_database_is_refused(tmp_path):
    empty = dbmod.open_database(f"sqlite:///{tmp_path / 'empty.db'}", create=True)
    with pytest.raises(DatabaseError, match="run `cancelproc db upgrade`"):
        dbmod.require_current(empty)


def test_a_missing_database_is_refused(tmp_path):
    with pytest.raises(DatabaseError, match="does not exist: run `cancelproc init` first"):
        dbmod.open_database(f"sqlite:///{tmp_path / 'nope.db'}")


@pytest.mark.parametrize("other", [RequestStatus.PENDING, RequestStatus.FAILED])
def test_one_open_request_per_service(db, other):
    with db.session.begin() as s:
        svc = factories.service(s)
        factories.request(s, svc).status = other
        sid = svc.id
    with pytest.raises(IntegrityError), db.session.begin() as s:
        factories.request(s, s.get(type(svc), sid))


def test_closed_requests_do_not_count_as_open(db):
    with db.session.begin() as s:
        svc = factories.service(s)
        factories.request(s, svc).status = RequestStatus.WITHDRAWN
        factories.request(s, svc).status = RequestStatus.COMPLETED
        factories.request(s, svc)  # a new pending one is fine


def test_one_open_request_per_addon_beside_the_service_request(db):
    """Migration 0013: a request for one add-on is not the service's open request (both may
    be open), and an add-on has at most one open request."""
    with db.session.begin() as s:
        svc = factories.service(s, addons=2)
        first, second = svc.addons
        factories.request(s, svc)
        factories.request(s, svc, addon=first)
        factories.request(s, svc, addon=second).status = RequestStatus.WITHDRAWN
        s.flush()
        factories.request(s, svc, addon=second).status = RequestStatus.FAILED
        sid, aid = svc.id, first.id
    with pytest.raises(IntegrityError), db.session.begin() as s:
        svc = s.get(Service, sid)
        factories.request(s, svc, addon=s.get(ServiceAddon, aid))


def test_migration_0013_adds_addon_requests_and_goes_back(db):
    """Down to 0012 is refused while add-on requests exist, then drops the columns (on
    SQLite the foreign key's clause first, in place) and restores one open request per
    service whatever it is for; up again, an add-on request may be open beside it."""
    with db.session.begin() as s:
        svc = factories.service(s, addons=1)
        factories.request(s, svc)
        addon_request = factories.request(s, svc, addon=svc.addons[0]).id
        sid, aid = svc.id, svc.addons[0].id
    cfg = dbmod._alembic_config(db)
    with pytest.raises(RuntimeError, match="1 add-on request"), db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0012")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM cancellation_requests WHERE id = {addon_request}")
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0012")
    with db.engine.connect() as conn:
        assert "addon_id" not in {c["name"] for c in sa_inspect(conn).get_columns("cancellation_requests")}
        assert "next_due_date" not in {c["name"] for c in sa_inspect(conn).get_columns("service_addons")}
    with pytest.raises(IntegrityError), db.engine.begin() as conn:  # the old rule: one open per service
        conn.exec_driver_sql("INSERT INTO cancellation_requests (service_id, type, effective_date, reason_code, "
                             "reason, status, created_at, created_by, attempts, note) VALUES "
                             f"({sid}, 'Immediate', '2026-11-30', 'x', '', 'pending', '2026-11-30 00:00:00', 't', 0, "
                             "'')")
    dbmod.upgrade(db)
    with db.session.begin() as s:
        factories.request(s, s.get(Service, sid), addon=s.get(ServiceAddon, aid))
    if db.engine.dialect.name == "sqlite":
        assert " IN (" not in _check_constraints(db)
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []


def _check_constraints(db) -> str:
    with db.engine.connect() as conn:
        return "\n".join(conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND sql LIKE '%CHECK%'").scalars())


def test_sqlite_check_constraints_are_or_chains_and_still_refuse_bad_values(tmp_path):
    """Migration 0005: SQLite checks `col IN (...)` by building a temporary index per row
    written; the same rule as an OR chain costs nothing. Every constraint is rewritten, each
    still refuses a value outside its enum, and the downgrade restores the IN form."""
    db = dbmod.open_database(f"sqlite:///{tmp_path / 'c.db'}", create=True)
    dbmod.upgrade(db)
    text = _check_constraints(db)
    assert " IN (" not in text and text.count("CHECK (") >= 10
    assert "status = 'pending' OR status = 'completed' OR status = 'withdrawn' OR status = 'failed'" in text
    with db.session.begin() as s:
        request_id = factories.request(s, factories.service(s)).id
    with pytest.raises(IntegrityError, match="CHECK constraint failed"), db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE cancellation_requests SET status = 'done' WHERE id = ?", (request_id,))
    with pytest.raises(IntegrityError, match="CHECK constraint failed"), db.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO audit_log (at, actor, entity, entity_id, action, detail) "
                             "VALUES ('2026-01-01 00:00:00', 'x', 'request', 1, 'deleted', '')")

    with db.engine.begin() as conn:  # down to 0004 and up again
        cfg = dbmod._alembic_config(db)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    assert "status IN ('pending', 'completed', 'withdrawn', 'failed')" in _check_constraints(db)
    dbmod.upgrade(db)
    assert " IN (" not in _check_constraints(db)
    db.dispose()


def test_datetimes_come_back_aware_in_utc(db):
    """A datetime goes in aware (any zone) and comes back the same instant in UTC, on every
    database; on SQLite also text another tool wrote: without microseconds, or with an offset."""
    made = dt.datetime(2026, 11, 26, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with db.session.begin() as s:
        request_id = factories.request(s, factories.service(s), created_at=made).id
    with db.engine.connect() as conn:
        read = conn.execute(select(CancellationRequest.created_at).where(CancellationRequest.id == request_id))
        assert (got := read.scalar_one()) == made and got.tzinfo is dt.UTC and got.hour == 1
    if db.engine.dialect.name != "sqlite":
        return
    for text, expected in (("2026-11-26 01:04:05", dt.datetime(2026, 11, 26, 1, 4, 5, tzinfo=dt.UTC)),
                           ("2026-11-26T03:04:05+02:00", dt.datetime(2026, 11, 26, 1, 4, 5, tzinfo=dt.UTC))):
        with db.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE cancellation_requests SET created_at = ? WHERE id = ?", (text, request_id))
            got = conn.execute(select(CancellationRequest.created_at)
                               .where(CancellationRequest.id == request_id)).scalar_one()
        assert got == expected and got.utcoffset() == dt.timedelta(0), text


def test_migration_0006_lets_an_email_be_withdrawn_and_its_downgrade_makes_it_failed(db):
    """Only the email status's CHECK constraint changes (on SQLite rewritten in place, still
    an OR chain): `withdrawn` is accepted at head, refused again after the downgrade, which
    turns withdrawn emails into failed ones (never sent, which `emails retry` may send)."""
    insert = ("INSERT INTO email_outbox (key, template, to_address, from_address, subject, text_body, html_body, "
              "status, attempts, created_at) VALUES ('{key}', 't', 'a@example.test', 'b@example.test', 's', '', '', "
              "'withdrawn', 0, '2026-11-30 00:00:00')")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(insert.format(key="k1"))
    if db.engine.dialect.name == "sqlite":
        assert "status = 'failed' OR status = 'withdrawn')" in _check_constraints(db)
    with db.engine.begin() as conn:
        cfg = dbmod._alembic_config(db)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT status FROM email_outbox").scalars().all() == ["failed"]
    with pytest.raises(IntegrityError), db.engine.begin() as conn:
        conn.exec_driver_sql(insert.format(key="k2"))
    dbmod.upgrade(db)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(insert.format(key="k3"))
    if db.engine.dialect.name == "sqlite":
        assert " IN (" not in _check_constraints(db)


def test_migration_0007_adds_the_service_columns_and_goes_back(db):
    """0007 (registration_date, subscription_id for the WHMCS import): down to 0006 drops
    them and keeps the rows, up again adds them; on SQLite the checks stay OR chains."""
    with db.session.begin() as s:
        service_id = factories.service(s).id
    cfg = dbmod._alembic_config(db)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    with db.engine.connect() as conn:
        columns = {c["name"] for c in sa_inspect(conn).get_columns("services")}
    assert "subscription_id" not in columns and "registration_date" not in columns
    dbmod.upgrade(db)
    with db.read_session() as s:
        assert s.get(Service, service_id).subscription_id is None
    if db.engine.dialect.name == "sqlite":
        assert " IN (" not in _check_constraints(db)


def _effective_date_revision() -> tuple[str, str]:
    """(the migration adding cancellation_requests.effective_date, the one before it): found
    by its file name, not its number, which the merge of other migrations may change."""
    scripts = ScriptDirectory(str(Path(processor.__file__).parent / "migrations"))
    found = next(s for s in scripts.walk_revisions() if s.path.endswith("_effective_date.py"))
    assert isinstance(found.down_revision, str)
    return found.revision, found.down_revision


def test_migration_fills_the_effective_date_of_existing_requests_by_the_old_rule_and_goes_back(db):
    """Existing requests keep the date the rule before the column gave them (Immediate: the
    day it was made in the business time zone; no next due date, an overdue one, or an On
    Date without a date: the day it was made), closed ones too; then the column is NOT NULL
    and in the due scan's index. Down again drops it and keeps the rows."""
    revision, before = _effective_date_revision()
    cfg = dbmod._alembic_config(db)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, before)
    tokyo_late = "2026-11-25 23:30:00"  # already the 26th in Tokyo
    rows = [  # (request id, type, cancel_on, status, service's next due date, created_at) -> expected
        ((1, "Immediate", None, "pending", "2026-12-24", tokyo_late), dt.date(2026, 11, 26)),
        ((2, "End of Billing Period", None, "pending", "2026-12-10", tokyo_late), dt.date(2026, 12, 10)),
        ((3, "End of Billing Period", None, "failed", "2026-11-01", tokyo_late), dt.date(2026, 11, 26)),
        ((4, "End of Billing Period", None, "pending", None, tokyo_late), dt.date(2026, 11, 26)),
        ((5, "On Date", "2027-01-31", "pending", "2026-12-05", tokyo_late), dt.date(2027, 1, 31)),
        ((6, "On Date", None, "pending", "2026-12-05", tokyo_late), dt.date(2026, 11, 26)),
        ((7, "End of Billing Period", None, "completed", "2026-12-20", "2026-10-01 10:00:00"),
         dt.date(2026, 12, 20)),
    ]
    with db.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO clients (id, first_name, last_name, company_name, email, language, balance)"
                             " VALUES (1, 'A', '', '', 'a@example.test', 'en', 0)")
        conn.exec_driver_sql("INSERT INTO products (id, name) VALUES (1, 'VPS')")
        conn.execute(sql("INSERT INTO services (id, client_id, product_id, domain, status, billing_cycle, amount,"
                          " next_due_date) VALUES (:id, 1, 1, 'd', 'Active', 'Monthly', 1, :due)"),
                     [{"id": rid, "due": next_due and dt.date.fromisoformat(next_due)}
                      for (rid, _type, _on, _status, next_due, _created), _ in rows])
        conn.execute(sql("INSERT INTO cancellation_requests (id, service_id, type, cancel_on, reason_code, reason,"
                          " status, created_at, created_by, attempts, note) VALUES (:id, :id, :type, :cancel_on,"
                          " 'other', '', :status, :created, 't', 0, '')"),
                     [{"id": rid, "type": type_, "cancel_on": cancel_on and dt.date.fromisoformat(cancel_on),
                       "status": status, "created": dt.datetime.fromisoformat(created)}
                      for (rid, type_, cancel_on, status, _due, created), _ in rows])
    dbmod.upgrade(db, business_timezone="Asia/Tokyo")
    assert dbmod.current_revision(db) == dbmod.head_revision(db)
    with db.read_session() as s:
        got = dict(s.execute(select(CancellationRequest.id, CancellationRequest.effective_date)).all())
    assert got == {rid: expected for (rid, *_), expected in rows}
    with db.engine.connect() as conn:
        inspector = sa_inspect(conn)
        column = next(c for c in inspector.get_columns("cancellation_requests") if c["name"] == "effective_date")
        indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("cancellation_requests")}
    assert column["nullable"] is False
    assert indexes["ix_cancellation_requests_status_id_effective_date"] == ["status", "id", "effective_date"]
    assert "ix_cancellation_requests_status_id" not in indexes
    with pytest.raises(IntegrityError), db.engine.begin() as conn:  # a writer that forgets the date fails
        conn.execute(sql("INSERT INTO cancellation_requests (service_id, type, reason_code, reason, status,"
                          " created_at, created_by, attempts, note) VALUES (1, 'Immediate', 'other', '',"
                          " 'withdrawn', :now, 't', 0, '')"), {"now": dt.datetime(2026, 11, 26)})
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, before)
    with db.engine.connect() as conn:
        inspector = sa_inspect(conn)
        assert "effective_date" not in {c["name"] for c in inspector.get_columns("cancellation_requests")}
        names = {i["name"] for i in inspector.get_indexes("cancellation_requests")}
        assert "ix_cancellation_requests_status_id" in names
        assert conn.exec_driver_sql("SELECT count(*) FROM cancellation_requests").scalar_one() == len(rows)
    dbmod.upgrade(db)
    assert revision == dbmod.current_revision(db) or dbmod.current_revision(db) == dbmod.head_revision(db)


def test_migration_credits_adds_the_table_and_the_audit_action_and_goes_back(db):
    """The credits migration: at head a credit and a 'credited' audit row can be written;
    down to the revision before it the table is gone and 'credited' is refused (its audit
    rows removed, no longer meaningful), up again all is back; SQLite's checks stay OR chains."""
    # Found by name, not number: the lead may renumber it when merging other migrations.
    (path,) = (Path(dbmod.__file__).parent / "migrations" / "versions").glob("*_credits.py")
    module = importlib.import_module(f"processor.migrations.versions.{path.stem}")
    audit = ("INSERT INTO audit_log (at, actor, entity, entity_id, action, detail) "
             "VALUES ('2026-11-30 00:00:00', 'test', 'client', 1, '{action}', '')")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(audit.format(action="credited"))
    if db.engine.dialect.name == "sqlite":
        assert "action = 'import_updated' OR action = 'credited'" in _check_constraints(db)
    cfg = dbmod._alembic_config(db)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, module.down_revision)
    with db.engine.connect() as conn:
        assert "credits" not in sa_inspect(conn).get_table_names()
        assert conn.exec_driver_sql("SELECT count(*) FROM audit_log").scalar_one() == 0
    with pytest.raises(IntegrityError), db.engine.begin() as conn:
        conn.exec_driver_sql(audit.format(action="credited"))
    dbmod.upgrade(db)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(audit.format(action="credited"))
        assert "credits" in sa_inspect(conn).get_table_names()
    if db.engine.dialect.name == "sqlite":
        assert " IN (" not in _check_constraints(db)
