"""SQLite: every CHECK (col IN ('a', 'b', ...)) becomes CHECK (col = 'a' OR col = 'b' OR ...)

The same rule, NULLs included: a cheaper form of it. SQLite (3.40 here) evaluates an IN
list of more than two constants in a CHECK constraint by building a temporary index for
every row it writes; a run writes some seven such checks per request, which cost a fifth
of its time. An OR chain of equalities costs next to nothing.

Only the constraints' text changes, and every row satisfies both forms, so the table
definitions are rewritten in place as SQLite documents for such changes ("ALTER TABLE",
section 7: writable_schema, then a new schema_version), not by copying every table. The
integrity check after it must pass. PostgreSQL plans IN lists well: nothing to do there.

A later migration that recreates one of these tables on SQLite (Alembic's batch mode)
writes its CHECK constraints in the IN form again, from the models: it should rewrite
them as this one does (tests/test_schema.py fails on an IN form at head).

Revision ID: 0005
Revises: 0004
"""

import re
from collections.abc import Callable, Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# CHECK (status IN ('pending', 'completed')) as SQLAlchemy and migration 0004 write them;
# the values are enum values (no quote, comma or parenthesis inside).
_IN = re.compile(r"CHECK \((\"?\w+\"?) IN \(([^)]*)\)\)")
_OR = re.compile(r"CHECK \((\"?\w+\"?) = ('[^']*'(?: OR \1 = '[^']*')*)\)")


def _as_or(match: re.Match[str]) -> str:
    column, values = match.group(1), [v.strip() for v in match.group(2).split(",")]
    return "CHECK (" + " OR ".join(f"{column} = {v}" for v in values) + ")"


def _as_in(match: re.Match[str]) -> str:
    column = match.group(1)
    values = [v.strip() for v in match.group(2).split(f" OR {column} = ")]
    return f"CHECK ({column} IN (" + ", ".join(values) + "))"


def _rewrite(pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str]) -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    tables = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql LIKE '%CHECK%'")
    changed = [(name, pattern.sub(replace, sql)) for name, sql in tables.all() if pattern.search(sql)]
    if not changed:
        return
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    for name, sql in changed:
        conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (sql, name))
    conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    problems = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"integrity check after rewriting the CHECK constraints: {problems[:5]}")


def upgrade() -> None:
    _rewrite(_IN, _as_or)


def downgrade() -> None:
    _rewrite(_OR, _as_in)
