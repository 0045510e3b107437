"""grace period: a request records its suspension; runs count suspensions; two audit actions

cancellation_requests.suspended_on (the as-of date of the run that suspended the service)
and grace_ends_on (the date the run cancels it: suspended_on + the product's grace_days,
fixed when suspended, the date the client was told). Both NULL: not suspended. The request
stays `pending` while suspended, so the one-open-request-per-service index is unchanged.
runs.suspended: how many services a run suspended. The audit log's action CHECK grows by
'suspended' and 'unsuspended': on PostgreSQL dropped and created again; on SQLite the
table's definition is rewritten in place as 0005 and 0006 do (the rule only grows, so
every row satisfies it; the table is not copied).

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The values as they are now, not imported from processor.models.
BEFORE = ("created", "withdrawn", "retry", "resolved_by_hand", "completed", "cancelled", "attempt_failed",
          "vetoed", "failed", "aborted", "refused", "imported", "import_updated", "credited")
AFTER = (*BEFORE, "suspended", "unsuspended")
NAME = "ck_audit_log_audit_action"


def _sqlite_rule(values: tuple[str, ...]) -> str:
    return f"CONSTRAINT {NAME} CHECK (" + " OR ".join(f"action = '{v}'" for v in values) + ")"


def _change(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        # op.f: the name is final, not one for the naming convention.
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
    # ADD COLUMN on both databases (no table copy on SQLite: nullable, or with a constant default).
    op.add_column("cancellation_requests", sa.Column("suspended_on", sa.Date(), nullable=True))
    op.add_column("cancellation_requests", sa.Column("grace_ends_on", sa.Date(), nullable=True))
    op.add_column("runs", sa.Column("suspended", sa.Integer(), nullable=False, server_default="0"))
    _change(BEFORE, AFTER)


def downgrade() -> None:
    conn = op.get_bind()
    in_grace = conn.exec_driver_sql("SELECT count(*) FROM cancellation_requests "
                                    "WHERE status IN ('pending', 'failed') AND suspended_on IS NOT NULL").scalar_one()
    if in_grace:
        # Below 0012 such a request would be cancelled again from its first phase (suspended
        # twice, the client told twice): withdraw or finish them first.
        raise RuntimeError(f"{in_grace} open request(s) are in their grace period (service suspended); "
                           "withdraw them or let the run cancel them before downgrading below 0012")
    # The audit rows of suspensions stay, under the closest action before 0012 ('completed':
    # a step the run or staff completed), their detail saying which it was.
    for action in ("suspended", "unsuspended"):
        op.execute(f"UPDATE audit_log SET action = 'completed', detail = '{action}: ' || detail "
                   f"WHERE action = '{action}'")
    _change(AFTER, BEFORE)
    op.drop_column("runs", "suspended")
    op.drop_column("cancellation_requests", "grace_ends_on")
    op.drop_column("cancellation_requests", "suspended_on")
