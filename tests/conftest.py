"""Shared fixtures: every test gets its own app root and migrated SQLite database."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from processor.config import Settings
from processor.db import Database, open_database, upgrade

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for runner-level tests. No staff digest: these tests count a run's own
    emails and hook calls; the digest has tests of its own (test_digest.py)."""
    return Settings(database_url=f"sqlite:///{tmp_path / 'cancelproc.db'}", app_root=tmp_path,
                    email={"staff_address": ""})


@pytest.fixture
def db(settings: Settings) -> Database:
    database = open_database(settings.resolved_database_url(), create=True)
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def now() -> dt.datetime:
    return dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.timezone.utc)
