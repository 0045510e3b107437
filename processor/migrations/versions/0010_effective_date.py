"""cancellation_requests.effective_date: the stored day a request takes effect

From now on the date is computed once, when a request is made or imported (with its
product's notice period and minimum term, processor/terms.py), and the run's due rule
reads only this column. The requests already there get the date the rule before this
migration gave them, so none moves: Immediate, the day it was made in the business time
zone; On Date, its date; End of Billing Period, its service's next due date; and never
before the day it was made (an overdue service's past due date, a service with no next
due date or an On Date request without a date were due at once: the day they were made).
Closed requests too, so that `requests list` shows every request's date as it did; the
column is NOT NULL, so that a writer that forgets it fails instead of leaving a request
that is never due. No notice period or minimum term: those settings did not exist when
these requests were made and their clients were told the old date.

The business time zone comes from `processor.db.upgrade(..., business_timezone=...)`
(`cancelproc db upgrade` and `init` pass the setting); UTC without it.

The run's keyset scan of pending requests (status, id) gets the date as a third column of
its index: a request not due yet is passed over from the index, without reading its row
or joining its service. Measured on SQLite (VM instructions of the whole due scan, 100,000
pending requests of which 2% due): 1.96 M with the old rule's join, 0.76 M on the stored
column with the old index, 0.57 M with this one; all due: 0.94 M, 0.76 M, 0.76 M.

On SQLite the column is added, filled, then made NOT NULL by rewriting the table's
definition in place, as 0005 and 0006 do (every row has a value, so every row satisfies
the new rule; the integrity check after it must pass). PostgreSQL alters the column.

Revision ID: 0010
Revises: 0009
"""

import datetime as dt
from collections.abc import Sequence
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from alembic import context, op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000
ADDED = "effective_date DATE"

requests = sa.table("cancellation_requests", sa.column("id", sa.Integer), sa.column("service_id", sa.Integer),
                    sa.column("type", sa.String), sa.column("cancel_on", sa.Date),
                    sa.column("created_at", sa.DateTime), sa.column("effective_date", sa.Date))
services = sa.table("services", sa.column("id", sa.Integer), sa.column("next_due_date", sa.Date))


def _date_then(type_: str, cancel_on: dt.date | None, next_due_date: dt.date | None, created_on: dt.date) -> dt.date:
    """The rule before this migration (processor.due at 0008), never before the day it was made."""
    on = created_on if type_ == "Immediate" else cancel_on if type_ == "On Date" else next_due_date
    return max(on or created_on, created_on)


def _fill(conn: sa.Connection, zone: ZoneInfo) -> None:
    """Every request's date, a batch of ids at a time (keyset: memory stays flat)."""
    r, s = requests, services
    after = 0
    while True:
        rows = conn.execute(sa.select(r.c.id, r.c.type, r.c.cancel_on, r.c.created_at, s.c.next_due_date)
                            .select_from(r.outerjoin(s, s.c.id == r.c.service_id))
                            .where(r.c.id > after).order_by(r.c.id).limit(BATCH)).all()
        if not rows:
            return
        conn.execute(sa.update(r).where(r.c.id == sa.bindparam("_id")).values(effective_date=sa.bindparam("_on")), [
            {"_id": id_, "_on": _date_then(type_, cancel_on, next_due,
                                           created_at.replace(tzinfo=dt.UTC).astimezone(zone).date())}
            for id_, type_, cancel_on, created_at, next_due in rows])
        after = rows[-1][0]


def _sqlite_not_null(conn: sa.Connection) -> None:
    sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'cancellation_requests'").scalar_one()
    # SQLite writes an added column after the others, before the table's constraints.
    if sql.count(ADDED) != 1 or sql[sql.index(ADDED) + len(ADDED)] not in ",)":
        raise RuntimeError(f"cancellation_requests: its definition has not the column {ADDED!r} just added")
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'cancellation_requests'",
                         (sql.replace(ADDED, ADDED + " NOT NULL"),))
    conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    problems = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"integrity check after making effective_date NOT NULL: {problems[:5]}")


def upgrade() -> None:
    conn = op.get_bind()
    zone = ZoneInfo(context.config.attributes.get("business_timezone") or "UTC")
    op.add_column("cancellation_requests", sa.Column("effective_date", sa.Date(), nullable=True))
    _fill(conn, zone)
    if conn.dialect.name == "sqlite":
        _sqlite_not_null(conn)
    else:
        op.alter_column("cancellation_requests", "effective_date", nullable=False)
    op.drop_index("ix_cancellation_requests_status_id", table_name="cancellation_requests")
    op.create_index("ix_cancellation_requests_status_id_effective_date", "cancellation_requests",
                    ["status", "id", "effective_date"])


def downgrade() -> None:
    conn = op.get_bind()
    op.drop_index("ix_cancellation_requests_status_id_effective_date", table_name="cancellation_requests")
    op.create_index("ix_cancellation_requests_status_id", "cancellation_requests", ["status", "id"])
    if conn.dialect.name == "sqlite":
        # DROP COLUMN (SQLite 3.35+) without copying the table: its CHECK constraints stay OR chains (0005).
        conn.exec_driver_sql("ALTER TABLE cancellation_requests DROP COLUMN effective_date")
    else:
        op.drop_column("cancellation_requests", "effective_date")
