"""trigram indexes for `cancelproc find`: any part of a value, indexed

A match of any part of a value (`find ample.com`) is LIKE '%text%', which no b-tree index
answers: without these, `find` reads the tables (about 2 s on a million services).

SQLite: an FTS5 table per kind with the trigram tokenizer (SQLite 3.34+), holding the
values `find` searches, kept in step with the table by triggers. The triggers fire on an
insert, a delete, and an update of those columns only: a run, which updates statuses and
dates, never touches them.

PostgreSQL: GIN indexes with pg_trgm's gin_trgm_ops on the same lower(...) expressions
`find` queries, which LIKE '%text%' uses as it is. pg_trgm ships with PostgreSQL and is a
trusted extension (13+): the database's owner may create it. A database user who may not
(no CREATE on the database, or the extension not installed) gets the migration without
these indexes and a warning; `find` still works, reading the tables. A superuser can run
`CREATE EXTENSION pg_trgm` in the database and then `cancelproc db find-index`.

Neither is in the models: they exist where the database can have them (tests/test_schema.py
leaves them out of the comparison by their `find_` names).

Revision ID: 0009
Revises: 0008
"""

import logging
from collections.abc import Sequence

from alembic import op

from processor.find_index import create_find_index, drop_find_index

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The DDL lives with the code that queries it, and `cancelproc db find-index` runs it again.
    why_not = create_find_index(op.get_bind())
    if why_not:
        logging.getLogger("processor.migrations").warning(why_not)


def downgrade() -> None:
    drop_find_index(op.get_bind())
