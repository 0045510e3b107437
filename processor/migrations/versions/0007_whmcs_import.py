"""services: registration_date and subscription_id, for `import --from whmcs` (tblhosting
regdate and subscriptionid)

Two nullable columns: ADD COLUMN on both databases, no table copied (SQLite keeps the
CHECK constraints 0005 wrote). DROP COLUMN on the way down (SQLite 3.35 and later).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("registration_date", "subscription_id")


def upgrade() -> None:
    op.add_column("services", sa.Column("registration_date", sa.Date(), nullable=True))
    op.add_column("services", sa.Column("subscription_id", sa.String(length=255), nullable=True))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.execute(f"ALTER TABLE services DROP COLUMN {name}")
