"""credits: the unused part of a paid period credited on an Immediate cancellation

A new table `credits` (one row per request at most: request_id is unique), and the audit
log's action CHECK gets one value more, `credited`. On PostgreSQL the CHECK is dropped and
created again; on SQLite the table's definition is rewritten in place as migrations 0005
and 0006 do (the rule only grows, so every row satisfies it and the table is not copied).

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The values as they are now, not imported from processor.models.
BEFORE = ("created", "withdrawn", "retry", "resolved_by_hand", "completed", "cancelled", "attempt_failed",
          "vetoed", "failed", "aborted", "refused", "imported", "import_updated")
AFTER = (*BEFORE, "credited")
NAME = "ck_audit_log_audit_action"


def _sqlite_rule(values: tuple[str, ...]) -> str:
    return f"CONSTRAINT {NAME} CHECK (" + " OR ".join(f"action = '{v}'" for v in values) + ")"


def _change(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        op.drop_constraint(op.f(NAME), "audit_log", type_="check")
        op.create_check_constraint(op.f(NAME), "audit_log",
                                   sa.text("action IN (" + ", ".join(f"'{v}'" for v in new) + ")"))
        return
    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit_log'").scalar_one()
    if _sqlite_rule(old) not in sql:
        raise RuntimeError(f"audit_log: its action CHECK constraint is not the expected {_sqlite_rule(old)!r}")
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'audit_log'",
                         (sql.replace(_sqlite_rule(old), _sqlite_rule(new)),))
    conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    problems = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"integrity check after rewriting audit_log's CHECK constraint: {problems[:5]}")


def upgrade() -> None:
    op.create_table(
        "credits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("service_id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("invoice_id", sa.Integer(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        sa.Column("days_unused", sa.Integer(), nullable=False),
        sa.Column("days_in_period", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["client_id"], ["clients.id"], name=op.f("fk_credits_client_id_clients")),
        sa.ForeignKeyConstraint(["service_id"], ["services.id"], name=op.f("fk_credits_service_id_services")),
        sa.ForeignKeyConstraint(["request_id"], ["cancellation_requests.id"],
                                name=op.f("fk_credits_request_id_cancellation_requests")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_credits_run_id_runs")),
        sa.ForeignKeyConstraint(["invoice_id"], ["invoices.id"], name=op.f("fk_credits_invoice_id_invoices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credits")),
        sa.UniqueConstraint("request_id", name=op.f("uq_credits_request_id")),
    )
    op.create_index(op.f("ix_credits_client_id"), "credits", ["client_id"])
    op.create_index(op.f("ix_credits_service_id"), "credits", ["service_id"])
    op.create_index(op.f("ix_credits_run_id"), "credits", ["run_id"])
    _change(BEFORE, AFTER)


def downgrade() -> None:
    # The credits go with their table; their audit rows would break the narrower CHECK.
    op.execute("DELETE FROM audit_log WHERE action = 'credited'")
    _change(AFTER, BEFORE)
    op.drop_index(op.f("ix_credits_run_id"), table_name="credits")
    op.drop_index(op.f("ix_credits_service_id"), table_name="credits")
    op.drop_index(op.f("ix_credits_client_id"), table_name="credits")
    op.drop_table("credits")
