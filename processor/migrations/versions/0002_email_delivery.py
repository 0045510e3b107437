"""email delivery: outbox backoff, delivery counts per run, a lease without a run

Revision ID: 0002
Revises: 0001
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("email_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("emails_sent", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("emails_failed", sa.Integer(), nullable=False, server_default="0"))
    # The email delivery lease belongs to no run.
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.alter_column("run_id", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM leases WHERE run_id IS NULL")
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.alter_column("run_id", existing_type=sa.Integer(), nullable=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("emails_failed")
        batch_op.drop_column("emails_sent")
    with op.batch_alter_table("email_outbox", schema=None) as batch_op:
        batch_op.drop_column("next_attempt_at")
