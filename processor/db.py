"""Engine, sessions and migrations. SQLite is the embedded default; PostgreSQL comes later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from processor.errors import DatabaseError

READONLY = "cancelproc_readonly"
MIGRATIONS = str(Path(__file__).parent / "migrations")


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (savepoints need it).
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the run's writer
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe with WAL
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")  # a second writer waits instead of failing
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
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str, *, create: bool = False) -> Database:
    """Open the database at url; unless create, it must exist already."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database_url: cannot parse {url!r} (e.g. sqlite:///var/cancelproc.db)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            raise DatabaseError(f"database {path} does not exist: run `cancelproc init` first")
    try:
        engine = create_engine(url)
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise DatabaseError(f"database_url {parsed.render_as_string(hide_password=True)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    db = Database(url, engine)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:  # not a database file, permissions, server down, bad credentials
        engine.dispose()
        raise DatabaseError(f"database {db.display_url} cannot be opened: {exc.orig}") from None
    return db


def _alembic_config(db: Database) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS)
    return cfg


def head_revision(db: Database) -> str | None:
    return ScriptDirectory.from_config(_alembic_config(db)).get_current_head()


def current_revision(db: Database) -> str | None:
    with db.read_engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> None:
    """Apply migrations up to revision (all of them by default)."""
    cfg = _alembic_config(db)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def require_current(db: Database) -> None:
    """Refuse to work on a database whose schema is not the one this code expects."""
    current, head = current_revision(db), head_revision(db)
    if current != head:
        raise DatabaseError(
            f"database {db.display_url} is at schema revision {current or 'none'}, "
            f"this version needs {head}: run `cancelproc db upgrade`"
        )
