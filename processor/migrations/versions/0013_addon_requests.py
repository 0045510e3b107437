"""add-on cancellation requests: cancellation_requests.addon_id, service_addons.next_due_date

A request may name one add-on of its service (`addon_id`, a nullable foreign key); an
End of Billing Period request for an add-on is due at the add-on's own next due date
(`service_addons.next_due_date`). The open-request rule becomes two partial unique
indexes: one open request per service among the service requests (addon_id IS NULL),
one open request per add-on.

Both columns are added with ADD COLUMN on both databases, no table copied (SQLite keeps
the CHECK constraints 0005 wrote). An index is its own object on SQLite, so the partial
index is dropped and created again there as on PostgreSQL.

Down: refused while add-on requests exist (an older cancelproc would take one for a
request to cancel the whole service). SQLite cannot drop a column a foreign key names,
so the key's clause is first taken out of the table's definition in place, as 0005 and
0006 change CHECK constraints (the rule only loosens: every row satisfies it).

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The rules as they were and are, written here, not imported from processor.models.
OPEN = "status IN ('pending', 'failed')"
OPEN_SERVICE = f"{OPEN} AND addon_id IS NULL"
OPEN_ADDON = f"{OPEN} AND addon_id IS NOT NULL"
FK = "fk_cancellation_requests_addon_id_service_addons"
SQLITE_FK = f" CONSTRAINT {FK} REFERENCES service_addons (id)"


def _open_index(name: str, column: str, where: str) -> None:
    op.create_index(name, "cancellation_requests", [column], unique=True,
                    sqlite_where=sa.text(where), postgresql_where=sa.text(where))


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column("service_addons", sa.Column("next_due_date", sa.Date(), nullable=True))
    if sqlite:
        # SQLite takes a REFERENCES clause in ADD COLUMN (the column is NULL in every row).
        op.execute(f"ALTER TABLE cancellation_requests ADD COLUMN addon_id INTEGER{SQLITE_FK}")
    else:
        op.add_column("cancellation_requests", sa.Column("addon_id", sa.Integer(), nullable=True))
        op.create_foreign_key(op.f(FK), "cancellation_requests", "service_addons", ["addon_id"], ["id"])
    op.drop_index("uq_cancellation_requests_open_service", table_name="cancellation_requests")
    _open_index("uq_cancellation_requests_open_service", "service_id", OPEN_SERVICE)
    _open_index("uq_cancellation_requests_open_addon", "addon_id", OPEN_ADDON)


def downgrade() -> None:
    conn = op.get_bind()
    found = conn.exec_driver_sql("SELECT count(*) FROM cancellation_requests WHERE addon_id IS NOT NULL").scalar_one()
    if found:
        raise RuntimeError(f"cancellation_requests holds {found} add-on request(s); a schema before 0013 would "
                           "take each for a request to cancel its whole service: delete them first")
    op.drop_index("uq_cancellation_requests_open_addon", table_name="cancellation_requests")
    op.drop_index("uq_cancellation_requests_open_service", table_name="cancellation_requests")
    _open_index("uq_cancellation_requests_open_service", "service_id", OPEN)
    if conn.dialect.name == "sqlite":
        _drop_sqlite_foreign_key()
    else:
        op.drop_constraint(op.f(FK), "cancellation_requests", type_="foreignkey")
    op.execute("ALTER TABLE cancellation_requests DROP COLUMN addon_id")
    op.execute("ALTER TABLE service_addons DROP COLUMN next_due_date")


def _drop_sqlite_foreign_key() -> None:
    conn = op.get_bind()
    sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'cancellation_requests'").scalar_one()
    if SQLITE_FK not in sql:
        raise RuntimeError(f"cancellation_requests: its addon_id foreign key is not the expected {SQLITE_FK!r}")
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'cancellation_requests'",
                         (sql.replace(SQLITE_FK, ""),))
    conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    problems = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"integrity check after removing addon_id's foreign key: {problems[:5]}")
