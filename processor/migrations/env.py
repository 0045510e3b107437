"""Alembic environment: run on the connection `processor.db.upgrade` hands over."""

from alembic import context

from processor.find_index import not_find_index
from processor.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `cancelproc db upgrade` drives migrations
    raise RuntimeError("run migrations through `cancelproc db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    compare_type=True,
    include_name=not_find_index,  # not in the models: made where the database can have it
)
with context.begin_transaction():
    context.run_migrations()
