"""The schema: migrations match the models, and one open request per service is enforced."""

from __future__ import annotations

import datetime as dt

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from processor import db as dbmod
from processor.errors import DatabaseError
from processor.models import Base, CancellationRequest, RequestStatus, Service, ServiceAddon
from tests import factories


def test_migrations_match_the_models(db):
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
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
    """Migration 0009: a request for one add-on is not the service's open request (both may
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


def test_migration_0009_adds_addon_requests_and_goes_back(db):
    """Down to 0008 is refused while add-on requests exist, then drops the columns (on
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
        command.downgrade(cfg, "0008")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM cancellation_requests WHERE id = {addon_request}")
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0008")
    with db.engine.connect() as conn:
        assert "addon_id" not in {c["name"] for c in sa_inspect(conn).get_columns("cancellation_requests")}
        assert "next_due_date" not in {c["name"] for c in sa_inspect(conn).get_columns("service_addons")}
    with pytest.raises(IntegrityError), db.engine.begin() as conn:  # the old rule: one open per service
        conn.exec_driver_sql("INSERT INTO cancellation_requests (service_id, type, reason_code, reason, status, "
                             f"created_at, created_by, attempts, note) VALUES ({sid}, 'Immediate', 'x', '', "
                             "'pending', '2026-11-30 00:00:00', 't', 0, '')")
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
