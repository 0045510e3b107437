"""services.reg_date: the day the service was registered (WHMCS's tblhosting.regdate),
for the merge field service_reg_date. Nullable: services imported before it have none.

A plain ADD COLUMN on both databases (no table copy on SQLite, so the CHECK constraints
migration 0005 rewrote stay as they are).

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


def upgrade() -> None:
    op.add_column("services", sa.Column("reg_date", sa.Date(), nullable=True))


def downgrade() -> None:
    op.drop_column("services", "reg_date")
