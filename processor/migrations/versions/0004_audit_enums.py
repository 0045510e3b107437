"""the audit log's entity and action are enums: a CHECK constraint lists their values

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The values as they are now, not imported from processor.models: a migration keeps
# meaning what it meant when it was written.
ENTITIES = ("client", "product", "service", "addon", "invoice", "request", "email")
ACTIONS = ("created", "withdrawn", "retry", "resolved_by_hand", "completed", "cancelled", "attempt_failed",
           "vetoed", "failed", "aborted", "refused", "imported", "import_updated")


def _in(column: str, values: tuple[str, ...]) -> sa.TextClause:
    return sa.text(f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")")


def upgrade() -> None:
    # The columns stay VARCHAR(32) and VARCHAR(64); only the CHECK constraints are new.
    # op.f: the name is final, not one for the naming convention.
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_check_constraint(op.f("ck_audit_log_audit_entity"), _in("entity", ENTITIES))
        batch_op.create_check_constraint(op.f("ck_audit_log_audit_action"), _in("action", ACTIONS))


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_audit_log_audit_action"), type_="check")
        batch_op.drop_constraint(op.f("ck_audit_log_audit_entity"), type_="check")
