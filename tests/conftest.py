"""Shared fixtures: every test gets its own app root and its own database.

Every test that uses a database runs twice: on SQLite (a file in tmp_path) and on
PostgreSQL (a fresh database on a throwaway server the session starts: tests/pg_server.py).
A test about SQLite itself is marked `sqlite_only`. Without PostgreSQL binaries the
PostgreSQL half is skipped with the reason shown, except in CI (CI=1), where it fails.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import freezegun
import pytest
from click.testing import CliRunner, Result

from processor.cli import cli
from processor.config import Settings
from processor.db import Database, open_database, upgrade
from tests.cli_helpers import Invoke
from tests.pg_server import TEMPLATE, PgServer, start_server

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
BACKENDS = ("sqlite", "postgresql")

# A fixture that freezes the clock (freeze_time in test_cli.py) froze pytest's own too, and
# --durations showed a setup of 1.8e9 s: pytest's clock keeps the real time.
freezegun.configure(extend_ignore_list=["_pytest.timing"])


def pytest_configure(config: pytest.Config) -> None:
    # Hook files the tests write must be writable by their owner only (group- or
    # world-writable ones are refused), whatever umask the machine running them has.
    os.umask(0o022)
    config.addinivalue_line("markers", "sqlite_only: a test of SQLite's own behaviour; not run on PostgreSQL")
    config.addinivalue_line("markers", "postgresql_only: a test of PostgreSQL's own behaviour (row locks)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that spawn processes (marked slow) first, the rest in file order after them.
    With pytest-xdist (-n, pyproject's addopts) each worker takes the next test when it is
    done: a long test started last would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        if metafunc.definition.get_closest_marker("sqlite_only"):
            metafunc.parametrize("backend", ["sqlite"])
        elif metafunc.definition.get_closest_marker("postgresql_only"):
            metafunc.parametrize("backend", ["postgresql"])
        else:
            metafunc.parametrize("backend", BACKENDS)


@contextmanager
def throwaway_pg() -> Iterator[PgServer]:
    """A PostgreSQL server for the block, stopped and removed after it. Without one: a
    visible skip, or in CI a failure."""
    try:
        server = start_server()
    except Exception as exc:  # noqa: BLE001 - whatever stops it, say so
        if IN_CI:
            pytest.fail(f"PostgreSQL test server did not start (CI needs it): {exc}")
        pytest.skip(f"no PostgreSQL test server: {exc}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session, with a migrated template database."""
    with throwaway_pg() as server:
        server.admin(f"CREATE DATABASE {TEMPLATE}")
        template = open_database(server.url(TEMPLATE))
        upgrade(template)
        template.dispose()
        yield server


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database of its own for this test: a SQLite file (not created yet), or a fresh
    migrated PostgreSQL database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'cancelproc.db'}"
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings for runner-level tests. No staff digest: these tests count a run's own
    emails and hook calls; the digest has tests of its own (test_digest.py)."""
    return Settings(database_url=database_url, app_root=tmp_path, email={"staff_address": ""})


@pytest.fixture
def db(settings: Settings) -> Database:
    database = open_database(settings.resolved_database_url(), create=True)
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def now() -> dt.datetime:
    return dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


@pytest.fixture
def url(settings: Settings) -> str:
    """The URL of the `db` fixture (on SQLite nothing exists until a test creates it)."""
    return settings.database_url


@pytest.fixture
def invoke(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """invoke(*args, env={...}) -> click Result: `cancelproc` with the app root at tmp_path (also the
    working directory, so no ./config/processor.toml is picked up) and the `db` fixture's database.
    The config is the shipped defaults (staff digest on)."""
    monkeypatch.chdir(tmp_path)
    base_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    base_env["CANCELPROC_DATABASE_URL"] = url
    # CliRunner's streams are no terminal: these tests read what a person at one gets (the
    # human run summary; JSON lines are tested in test_logs.py), so they ask for it.
    base_env["CANCELPROC_LOG_FORMAT"] = "console"

    def _invoke(*args: Any, env: dict[str, str | None] | None = None) -> Result:
        return CliRunner().invoke(cli, [str(a) for a in args], env={**base_env, **(env or {})})

    return _invoke
