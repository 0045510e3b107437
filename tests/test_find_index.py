"""`find`'s match of any part of a value through the trigram index (migration 0009): SQLite's
FTS5 tables kept in step by triggers, PostgreSQL's pg_trgm GIN indexes, and the tables read
where the database cannot have them."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event

from processor.db import Database, open_database
from processor.find_index import drop_find_index, has_find_index
from processor.models import CancellationRequest, Client, Product, Service, ServiceStatus
from tests import factories
from tests.cli_helpers import Invoke, as_json, ok, one_line_error
from tests.factories import support_desk
from tests.test_support import whole_table_reads

NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


@pytest.fixture
def desk(db: Database) -> Database:
    return support_desk(db, NOW)


def found(invoke: Invoke, text: str, env: dict[str, str] | None = None) -> dict[str, list[int]]:
    result = as_json(invoke("find", text, "--json", env=env))
    return {kind: [row["id"] for row in result[kind]["rows"]] for kind in ("clients", "services", "requests")}


def test_any_part_reads_no_table_whole(invoke: Invoke, desk: Database, backend: str) -> None:
    """Every statement of `find` (whole values, starts, then any part) is answered through
    indexes when TEXT has three characters or more."""
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "alembic_version" not in statement \
                and "sqlite_master" not in statement and "pg_indexes" not in statement:
            statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        for text_ in ("ovak.tes", "LICE", "artin", "lice@exa", "1002", "r-3"):
            ok(invoke("find", text_, "--json"))
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert any("MATCH" in s or "LIKE" in s.upper() for s, _ in statements)
    scans = []
    with desk.engine.connect() as conn:
        if backend == "postgresql":
            # Tiny tables: a scan, or any index walked whole and filtered, costs less than the
            # trigram index here; without both, a plan reads a table whole only when no index
            # can answer. (Which plan PostgreSQL picks on a million rows: bench/find_bench.py.)
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("SET enable_indexscan = off")
        for statement, parameters in statements:
            explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
            plan = [str(row[-1]) for row in conn.exec_driver_sql(explain + statement, parameters)]
            scans += [(statement, line) for line in whole_table_reads(plan)]
    assert not scans, "\n\n".join(f"{line}\n  in {statement}" for statement, line in scans)


def test_the_index_follows_inserts_updates_and_deletes(invoke: Invoke, desk: Database, backend: str) -> None:
    assert found(invoke, "w.novak")["services"] == [3]  # part of the domain, not of the email
    with desk.session.begin() as s:
        s.get(Service, 3).domain = "www.dvorak.example"
        s.get(Client, 2).last_name = "Dvořák"
        product = s.query(Product).one()
        carol = Client(external_id="C-300", first_name="Carol", last_name="Smith", email="carol@smith.example")
        s.add(carol)
        s.flush()
        carols = Service(external_id="S-3001", client_id=carol.id, product_id=product.id,
                         domain="carol-smith.example", status=ServiceStatus.ACTIVE, billing_cycle="Monthly")
        s.add(carols)
        s.flush()
        factories.request(s, carols).external_id = "REQ-77-NEW"  # the triggers survive every later migration
    assert found(invoke, "w.novak")["services"] == []  # the old domain is gone from the index
    assert found(invoke, "vorak.exam")["services"] == [3]
    assert found(invoke, "dvořák")["clients"] == [2]
    smith = found(invoke, "smith.exa")
    assert len(smith["clients"]) == 1 and len(smith["services"]) == 1 and len(smith["requests"]) == 1
    assert found(invoke, "77-new")["requests"] == smith["requests"]
    with desk.session.begin() as s:
        s.delete(s.get(CancellationRequest, smith["requests"][0]))
        s.delete(s.get(Service, smith["services"][0]))
        s.delete(s.get(Client, smith["clients"][0]))
    assert found(invoke, "smith.exa") == {"clients": [], "services": [], "requests": []}
    if backend == "sqlite":  # FTS5 folds case beyond ASCII (PostgreSQL's lower() follows the locale)
        assert found(invoke, "DVOŘ")["clients"] == [2]


def test_short_texts_and_a_database_without_the_index_read_the_tables(invoke: Invoke, desk: Database) -> None:
    assert found(invoke, "ak")["services"] == [3]  # two characters: no trigram; the LIKE scan answers
    with desk.engine.begin() as conn:
        drop_find_index(conn)
        assert not has_find_index(conn)
    assert found(invoke, "ovak.tes")["services"] == [3]
    assert found(invoke, "artin")["clients"] == [1]
    out = ok(invoke("db", "find-index")).stdout
    assert "find's trigram index built" in out
    with desk.engine.connect() as conn:
        assert has_find_index(conn)
    assert found(invoke, "ovak.tes")["services"] == [3]


@pytest.mark.postgresql_only
def test_a_postgresql_user_who_may_not_create_pg_trgm(invoke: Invoke, pg_server: Any, backend: str) -> None:
    """A database user with the right to create tables but not extensions (a database owned
    by someone else): the upgrade works without the index and says so; `find` reads the
    tables; once a superuser has created pg_trgm, `db find-index` builds it."""
    role = f"finder_{os.getpid()}"
    url = pg_server.empty_database()
    dbname = url.rsplit("/", 1)[1]
    pg_server.admin(f"CREATE ROLE {role} LOGIN")
    conninfo = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={dbname}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {role}")
    user_url = f"postgresql+psycopg://{role}@127.0.0.1:{pg_server.port}/{dbname}"
    env = {"CANCELPROC_DATABASE_URL": user_url}
    upgraded = ok(invoke("db", "upgrade", env=env))
    assert "no trigram index for `find` (permission denied to create extension" in upgraded.stderr
    database = open_database(user_url)
    try:
        with database.engine.connect() as conn:
            assert not has_find_index(conn)
        support_desk(database, NOW)
        assert found(invoke, env=env, text="ovak.tes")["services"] == [3]
        line = one_line_error(invoke("db", "find-index", env=env), "permission denied to create extension")
        assert "CREATE EXTENSION pg_trgm" in line
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_trgm")
        ok(invoke("db", "find-index", env=env))
        with database.engine.connect() as conn:
            assert has_find_index(conn)
        assert found(invoke, env=env, text="ovak.tes")["services"] == [3]
    finally:
        database.dispose()

