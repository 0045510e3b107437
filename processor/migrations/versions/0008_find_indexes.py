"""indexes for `cancelproc find` and a service's requests

lower(domain) and lower(email): a whole domain or email in any case, or its start, is
found through an index (`find --match whole|start`, the first passes of `find`). A match
of any part (LIKE '%text%') can use no b-tree index; it reads the table (README,
Performance). cancellation_requests.service_id: a
service's requests (`services show`, `find`); the unique index on it is for open
requests only.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # PostgreSQL orders text by the database's collation, so LIKE 'start%' needs the
    # text_pattern_ops operator class (which answers = too); SQLite compares bytes.
    ops = " text_pattern_ops" if op.get_bind().dialect.name == "postgresql" else ""
    op.create_index("ix_services_domain_lower", "services", [sa.text(f"lower(domain){ops}")])
    op.create_index("ix_clients_email_lower", "clients", [sa.text(f"lower(email){ops}")])
    op.create_index(op.f("ix_cancellation_requests_service_id"), "cancellation_requests", ["service_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_cancellation_requests_service_id"), table_name="cancellation_requests")
    op.drop_index("ix_clients_email_lower", table_name="clients")
    op.drop_index("ix_services_domain_lower", table_name="services")
