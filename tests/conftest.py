"""Shared fixtures: every test gets its own app root and migrated SQLite database."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from processor.cli import cli
from processor.config import Settings
from processor.db import Database, open_database, upgrade
from tests.cli_helpers import Invoke

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


@pytest.fixture
def url(settings: Settings) -> str:
    """The URL of the `db` fixture (tmp_path/cancelproc.db); nothing exists until a test creates it."""
    return settings.database_url


@pytest.fixture
def invoke(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """invoke(*args, env={...}) -> click Result: `cancelproc` with the app root at tmp_path (also the
    working directory, so no ./config/processor.toml is picked up) and the `db` fixture's database.
    The config is the shipped defaults (staff digest on)."""
    monkeypatch.chdir(tmp_path)
    base_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    base_env["CANCELPROC_DATABASE_URL"] = url

    def _invoke(*args: Any, env: dict[str, str | None] | None = None) -> Result:
        return CliRunner().invoke(cli, [str(a) for a in args], env={**base_env, **(env or {})})

    return _invoke
