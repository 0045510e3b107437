"""Engine, sessions and migrations. SQLite is the embedded default; PostgreSQL comes later."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    String,
    Table,
    any_,
    bindparam,
    column,
    create_engine,
    event,
    func,
    insert,
    literal_column,
    select,
    values,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import sessionmaker
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from processor.errors import DatabaseError, DatabaseUnavailable, one_line

READONLY = "cancelproc_readonly"
MIGRATIONS = str(Path(__file__).parent / "migrations")


def _sqlite_setup(engine: Engine, busy_timeout_seconds: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (savepoints need it).
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the run's writer
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe with WAL
        cur.execute("PRAGMA foreign_keys=ON")
        # Checkpoint (and fsync) every ~40 MB of WAL rather than every 4 MB: a run writes
        # several MB per chunk, and syncing at each chunk cost ~8% of a run.
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        # A second writer (or another program holding the file) is waited for, then an error.
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the lock up front: a read-then-write transaction must not find, at its
        # first write, that another writer got in between (SQLite would fail it at once).
        readonly = conn.get_execution_options().get(READONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


@dataclass
class Database:
    """The engine plus session factories: one for writes, one that never takes the write lock."""

    url: str
    engine: Engine

    def __post_init__(self) -> None:
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self.read_engine = self.engine.execution_options(**{READONLY: True})
        self.read_session = sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def in_ids(self, column: Any, ids: Sequence[int]) -> ColumnElement[bool]:
        """`column IN ids` for a chunk's worth of ids.

        A plain `in_(ids)` makes SQLAlchemy coerce every id and re-render the statement for
        each list length, per statement, per chunk: that was a fifth of a run's time. On
        SQLite the list travels as one JSON parameter instead, and the statement is cached.
        """
        if self.is_sqlite:
            return column.in_(select(literal_column("value")).select_from(
                func.json_each(bindparam(None, json.dumps(list(ids)), type_=String))).scalar_subquery())
        if self.is_postgresql:  # one array parameter: = ANY(%s)
            return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(Integer)))
        return column.in_(ids)

    def id_values(self, pairs: Sequence[tuple[int, int]]) -> Any:
        """A subquery of (id, value) rows, to UPDATE ... FROM it in one statement.

        On SQLite the pairs travel as one JSON parameter (see `in_ids`); elsewhere as VALUES.
        """
        if self.is_sqlite:
            rows = func.json_each(bindparam(None, json.dumps(list(pairs)), type_=String)).table_valued("value")
            return select(func.json_extract(rows.c.value, "$[0]").label("id"),
                          func.json_extract(rows.c.value, "$[1]").label("value")).subquery()
        if self.is_postgresql:  # two array parameters: unnest(%s, %s) AS (id, value)
            array = postgresql.ARRAY(Integer)
            return func.unnest(bindparam(None, [p[0] for p in pairs], type_=array),
                               bindparam(None, [p[1] for p in pairs], type_=array)
                               ).table_valued("id", "value").render_derived(name="id_values")
        return values(column("id", Integer), column("value", Integer), name="id_values").data(list(pairs))

    @property
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


# PostgreSQL's serialization_failure and deadlock_detected: it rolled the transaction back,
# and running the whole transaction again is the documented answer.
_TRANSIENT_SQLSTATES = ("40001", "40P01")
TRANSACTION_ATTEMPTS = 5


def is_transient(exc: BaseException) -> bool:
    """A transaction that lost a deadlock or a serialization conflict, nothing worse."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES


def retrying_transaction(before_again: Callable[[RetryCallState], None] | None = None) -> Retrying:
    """Attempts of a transaction that may lose a deadlock: `for attempt in retrying_transaction():
    with attempt: ...` runs the block again (after a short random wait, so two processes
    that collided do not collide again) up to TRANSACTION_ATTEMPTS times, calling
    `before_again` before each new attempt. Any other error goes straight through."""
    return Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(TRANSACTION_ATTEMPTS),
                    wait=wait_random_exponential(multiplier=0.05, max=2), reraise=True,
                    before_sleep=before_again)


_PLACEHOLDER = {"qmark": "?", "format": "%s", "pyformat": "%s"}
_ROWS_PER_INSERT = 500
_SQLITE_MAX_PARAMETERS = 32_766  # SQLITE_MAX_VARIABLE_NUMBER's default since SQLite 3.32


def insert_rows(
    conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]], constants: dict[str, Any]
) -> None:
    """INSERT many rows straight through the driver.

    For the run's hot path: SQLAlchemy's per-row parameter handling cost more than the
    insert itself. Per-row values must need no type conversion (str, int, None); the
    constants go through their columns' types (as this dialect stores them) once. On
    SQLite, many rows per statement: run once per row (executemany), a statement spends
    as much again setting up the table's CHECK constraints.
    """
    if not rows:
        return
    mark = _PLACEHOLDER.get(conn.dialect.paramstyle)
    if mark is None:  # a driver with another paramstyle: the ordinary (slower) way
        conn.execute(insert(table).values(**constants), [dict(zip(columns, row, strict=True)) for row in rows])
        return
    fixed = []
    for name, value in constants.items():
        processor = table.c[name].type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        fixed.append(processor(value) if processor else value)
    names = [*columns, *constants]
    one_row = f"({', '.join([mark] * len(names))})"
    head = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES "
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql(head + one_row, [(*row, *fixed) for row in rows])
        return
    per_statement = max(1, min(_ROWS_PER_INSERT, _SQLITE_MAX_PARAMETERS // len(names)))
    for start in range(0, len(rows), per_statement):
        batch = rows[start:start + per_statement]
        conn.exec_driver_sql(head + ", ".join([one_row] * len(batch)),
                             tuple(value for row in batch for value in (*row, *fixed)))


def open_database(url: str, *, create: bool = False, busy_timeout_seconds: float = 30.0) -> Database:
    """Open the database at url; unless create, it must exist already (a PostgreSQL
    database is always created by its administrator: see docs/deploy.md)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError("database_url: cannot parse it (e.g. sqlite:///var/cancelproc.db or "
                            "postgresql://user@host/dbname)") from None
    if parsed.drivername in ("postgresql", "postgres"):  # psycopg 3 is the driver we ship
        parsed = parsed.set(drivername="postgresql+psycopg")
        url = parsed.render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.exists():
                raise DatabaseError(f"database {path} does not exist: run `cancelproc init` first")
        except OSError as exc:
            raise DatabaseError(f"database {path}: {exc.strerror}") from None
    try:
        engine = create_engine(url)
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise DatabaseError(f"database_url {parsed.render_as_string(hide_password=True)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine, busy_timeout_seconds)
    db = Database(url, engine)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:  # not a database file, permissions, server down, bad credentials
        engine.dispose()
        error = DatabaseUnavailable if _may_pass(exc) else DatabaseError
        raise error(f"database {db.display_url} cannot be opened: {one_line(exc.orig or exc)}") from None
    return db


# PostgreSQL's answers that go away by themselves: starting up or shutting down, too many
# connections, the server not reached. libpq reports a failed connection without a SQLSTATE,
# so its message says which.
_PASSING_SQLSTATES = {"57P01", "57P02", "57P03", "53300", "08000", "08001", "08004", "08006"}
_PASSING_MESSAGES = ("connection refused", "timeout expired", "could not translate host name", "starting up",
                     "shutting down", "too many clients", "no route to host", "network is unreachable",
                     "server closed the connection unexpectedly")


def _may_pass(exc: DBAPIError) -> bool:
    """Whether a failure to connect is the server's absence (exit 75: cron tries again
    tomorrow, systemd's Restart= sooner) rather than something to fix (a password, a missing
    database or file, permissions: exit 2)."""
    if exc.connection_invalidated or getattr(exc.orig, "sqlite_errorname", None) in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return True
    if not hasattr(exc.orig, "sqlstate"):  # not PostgreSQL
        return False
    message = str(exc.orig).lower()
    return getattr(exc.orig, "sqlstate", None) in _PASSING_SQLSTATES or any(m in message for m in _PASSING_MESSAGES)


def _alembic_config(db: Database) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS)
    return cfg


def head_revision(db: Database) -> str | None:
    return ScriptDirectory.from_config(_alembic_config(db)).get_current_head()


def current_revision(db: Database) -> str | None:
    with db.read_engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head", *, business_timezone: str = "UTC") -> None:
    """Apply migrations up to revision (all of them by default). A migration that fills a
    date from a moment (0010: the day a request was made) reads it in business_timezone."""
    cfg = _alembic_config(db)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["business_timezone"] = business_timezone
        command.upgrade(cfg, revision)


def require_current(db: Database) -> None:
    """Refuse to work on a database whose schema is not the one this code expects."""
    current, head = current_revision(db), head_revision(db)
    if current != head:
        raise DatabaseError(
            f"database {db.display_url} is at schema revision {current or 'none'}, "
            f"this version needs {head}: run `cancelproc db upgrade`"
        )
