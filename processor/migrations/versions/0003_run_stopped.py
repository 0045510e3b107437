"""a run can be stopped (SIGTERM, SIGINT) after a chunk: run status 'stopped'

Revision ID: 0003
Revises: 0002
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BEFORE = ("running", "completed", "completed_with_failures", "error", "abandoned")
AFTER = (*BEFORE, "stopped")


def _allow(values: tuple[str, ...]) -> None:
    # The CHECK constraint of a non-native enum lists its values: drop it, create it again
    # (the column stays VARCHAR(32)). op.f: the name is final, not one for the naming convention.
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_runs_run_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_runs_run_status"),
                                         sa.text("status IN (" + ", ".join(f"'{v}'" for v in values) + ")"))


def upgrade() -> None:
    _allow(AFTER)


def downgrade() -> None:
    op.execute("UPDATE runs SET status = 'error' WHERE status = 'stopped'")
    _allow(BEFORE)
