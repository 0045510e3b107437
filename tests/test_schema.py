"""The schema: migrations match the models, and one open request per service is enforced."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from processor import db as dbmod
from processor.errors import DatabaseError
from processor.models import Base, RequestStatus
from tests import factories


def test_migrations_match_the_models(db):
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], f"models and migrations drift; add a migration: {diff}"


def test_migrations_reach_head(db):
    assert dbmod.current_revision(db) == dbmod.head_revision(db)
    dbmod.require_current(db)


def test_an_unmigrated_database_is_refused(tmp_path):
    empty = dbmod.open_database(f"sqlite:///{tmp_path / 'empty.db'}", create=True)
    with pytest.raises(DatabaseError, match="run `cancelproc db upgrade`"):
        dbmod.require_current(empty)


def test_a_missing_database_is_refused(tmp_path):
    with pytest.raises(DatabaseError, match="does not exist: run `cancelproc init` first"):
        dbmod.open_database(f"sqlite:///{tmp_path / 'nope.db'}")


@pytest.mark.parametrize("other", [RequestStatus.PENDING, RequestStatus.FAILED])
def test_one_open_request_per_service(db, other):
    with db.session.begin() as s:
        svc = factories.service(s)
        factories.request(s, svc).status = other
        sid = svc.id
    with pytest.raises(IntegrityError), db.session.begin() as s:
        factories.request(s, s.get(type(svc), sid))


def test_closed_requests_do_not_count_as_open(db):
    with db.session.begin() as s:
        svc = factories.service(s)
        factories.request(s, svc).status = RequestStatus.WITHDRAWN
        factories.request(s, svc).status = RequestStatus.COMPLETED
        factories.request(s, svc)  # a new pending one is fine
