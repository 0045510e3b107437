"""The index behind `cancelproc find`'s match of any part of a value (migration 0009).

LIKE '%text%' can use no b-tree index. SQLite answers it from an FTS5 table per kind with
the trigram tokenizer, kept in step by triggers; PostgreSQL from GIN indexes with pg_trgm's
gin_trgm_ops on the lower(...) expressions `find` queries. Where the database cannot have
them (SQLite without the trigram tokenizer, PostgreSQL without the right to create pg_trgm)
`find` reads the tables instead, as it did before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, column, func, literal_column, select, table
from sqlalchemy.exc import DBAPIError, OperationalError

# A trigram index answers a text of at least three characters; a shorter one reads the table.
SHORTEST = 3


@dataclass(frozen=True)
class Searched:
    """One kind's table and the values `find` searches in it: (name, SQL) where the SQL is
    over the table's columns, each written {r}column (r: "" in the table, "new." in a trigger)."""

    table: str
    values: tuple[tuple[str, str], ...]
    columns: str  # the columns those values are made of: an update of one changes the index

    @property
    def fts(self) -> str:
        return f"find_{self.table}"

    def gin_name(self, n: int) -> str:
        return f"ix_find_{self.table}_{n}_trgm"

    def sql(self, row: str = "") -> list[str]:
        return [value.format(r=row) for _, value in self.values]


# The same values as cli/find.py's part pass (which lowers each: PostgreSQL's indexes are on
# lower(value), SQLite's trigram tokenizer ignores case).
SEARCHED = (
    Searched("clients", (("email", "{r}email"), ("name", "{r}first_name || ' ' || {r}last_name"),
                         ("company_name", "{r}company_name"), ("external_id", "{r}external_id")),
             "email, first_name, last_name, company_name, external_id"),
    Searched("services", (("domain", "{r}domain"), ("external_id", "{r}external_id")),
             "domain, external_id"),
    Searched("cancellation_requests", (("external_id", "{r}external_id"),), "external_id"),
)


def not_find_index(name: str | None, type_: str, parent_names: object) -> bool:
    """For Alembic's comparison (include_name): everything but this index, which is not in
    the models (the FTS5 tables with their shadow tables, the GIN indexes)."""
    return not (name or "").startswith(("find_", "ix_find_"))


def _sqlite_statements(s: Searched) -> list[str]:
    names = [name for name, _ in s.values]
    cols = ", ".join(names)
    sets = ", ".join(f"{name} = {value}" for name, value in zip(names, s.sql("new."), strict=True))
    return [
        f"CREATE VIRTUAL TABLE {s.fts} USING fts5({cols}, tokenize = 'trigram')",
        f"INSERT INTO {s.fts} (rowid, {cols}) SELECT id, {', '.join(s.sql())} FROM {s.table}",
        f"CREATE TRIGGER {s.fts}_insert AFTER INSERT ON {s.table} BEGIN "
        f"INSERT INTO {s.fts} (rowid, {cols}) VALUES (new.id, {', '.join(s.sql('new.'))}); END",
        f"CREATE TRIGGER {s.fts}_update AFTER UPDATE OF {s.columns} ON {s.table} BEGIN "
        f"UPDATE {s.fts} SET {sets} WHERE rowid = old.id; END",
        f"CREATE TRIGGER {s.fts}_delete AFTER DELETE ON {s.table} BEGIN "
        f"DELETE FROM {s.fts} WHERE rowid = old.id; END",
    ]


def create_find_index(conn: Connection) -> str | None:
    """Create the index where the database can have it. None when made; else why not (one line)."""
    if conn.dialect.name == "sqlite":
        return _create_sqlite(conn)
    return _create_postgresql(conn)


def _create_sqlite(conn: Connection) -> str | None:
    try:
        with conn.begin_nested():
            for s in SEARCHED:
                for statement in _sqlite_statements(s):
                    conn.exec_driver_sql(statement)
    except OperationalError as exc:  # an SQLite built without FTS5 or its trigram tokenizer
        if "fts5" not in str(exc) and "tokenize" not in str(exc):
            raise
        return ("no trigram index for `find`: this SQLite has no FTS5 trigram tokenizer (3.34 or later has); "
                "a match of any part of a value reads the tables")
    return None


def _create_postgresql(conn: Connection) -> str | None:
    try:
        with conn.begin_nested():
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DBAPIError as exc:  # not permitted, or not installed: say so, carry on
        first_line = (str(exc.orig).splitlines() or [type(exc.orig).__name__])[0]
        return (f"no trigram index for `find` ({first_line}); a match of any part of a value reads the tables. "
                "A superuser can run CREATE EXTENSION pg_trgm in this database, then `cancelproc db find-index`")
    for s in SEARCHED:
        for n, value in enumerate(s.sql()):
            conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {s.gin_name(n)} ON {s.table} "
                                 f"USING gin (lower({value}) gin_trgm_ops)")
    return None


def drop_find_index(conn: Connection) -> None:
    """Remove the index (and, on SQLite, its triggers); pg_trgm stays, it may serve others."""
    for s in SEARCHED:
        if conn.dialect.name == "sqlite":
            for trigger in ("insert", "update", "delete"):
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {s.fts}_{trigger}")
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {s.fts}")
        else:
            for n in range(len(s.values)):
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {s.gin_name(n)}")


def has_find_index(conn: Connection) -> bool:
    """Whether the index is there (every table of it on SQLite; the first index on PostgreSQL)."""
    if conn.dialect.name == "sqlite":
        names = [s.fts for s in SEARCHED]
        found = conn.execute(select(func.count()).select_from(table("sqlite_master", column("type"), column("name")))
                             .where(column("type") == "table", column("name").in_(names))).scalar()
        return found == len(names)
    return bool(conn.execute(select(func.count()).select_from(table("pg_indexes", column("indexname")))
                             .where(column("indexname") == SEARCHED[0].gin_name(0))).scalar())


def sqlite_holding(id_column: Any, kind: str, text: str) -> ColumnElement[bool] | None:
    """On SQLite with the FTS5 tables: `id_column IN (the rows of `kind` holding text in a
    searched value)`, for a text the index answers (three characters or more); else None."""
    if len(text) < SHORTEST:
        return None
    s = next(s for s in SEARCHED if s.table == kind)
    fts = table(s.fts, column("rowid"))
    phrase = '"' + text.replace('"', '""') + '"'  # one FTS5 string: every character literal
    return id_column.in_(select(fts.c.rowid).where(literal_column(s.fts).op("MATCH")(phrase)))
