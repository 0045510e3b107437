"""an outbox email may be withdrawn: never sent, as the request it is about was withdrawn

Only the CHECK constraint of email_outbox.status changes: one value more. On PostgreSQL
it is dropped and created again. On SQLite the table's definition is rewritten in place,
as migration 0005 does (SQLite's "ALTER TABLE", section 7): the rule only grows, so every
row satisfies it, and the table is not copied.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The values as they are now, not imported from processor.models.
BEFORE = ("queued", "sent", "failed")
AFTER = (*BEFORE, "withdrawn")
NAME = "ck_email_outbox_email_status"


def _sqlite_rule(values: tuple[str, ...]) -> str:
    return f"CONSTRAINT {NAME} CHECK (" + " OR ".join(f"status = '{v}'" for v in values) + ")"


def _change(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        # op.f: the name is final, not one for the naming convention.
        op.drop_constraint(op.f(NAME), "email_outbox", type_="check")
        op.create_check_constraint(op.f(NAME), "email_outbox", sa.text("status IN (" + ", ".join(f"'{v}'" for v in new) + ")"))
        return
    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'email_outbox'").scalar_one()
    if _sqlite_rule(old) not in sql:
        raise RuntimeError(f"email_outbox: its status CHECK constraint is not the expected {_sqlite_rule(old)!r}")
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'email_outbox'",
                         (sql.replace(_sqlite_rule(old), _sqlite_rule(new)),))
    conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    problems = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"integrity check after rewriting email_outbox's CHECK constraint: {problems[:5]}")


def upgrade() -> None:
    _change(BEFORE, AFTER)


def downgrade() -> None:
    # A withdrawn email was never sent: it goes back to failed, which `emails retry` could send.
    op.execute("UPDATE email_outbox SET status = 'failed' WHERE status = 'withdrawn'")
    _change(AFTER, BEFORE)
