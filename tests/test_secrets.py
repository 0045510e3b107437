"""Secrets never show: with a password in the database URL and an SMTP password
configured, every command's output (stdout, stderr with its log lines, --json), the run
records, the audit log and the emails are searched for them."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from freezegun import freeze_time
from sqlalchemy import text

from processor.cli import cli
from processor.db import open_database
from tests import factories
from tests.smtp_server import smtp_server

DB_PASSWORD = "Db-S3cret-4242"
SMTP_PASSWORD = "Smtp-S3cret-9393"
NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


@pytest.mark.slow
def test_no_command_shows_a_password(pg_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The test server trusts local connections, so a password in the URL is accepted (and unused).
    url = pg_server.new_database().replace("postgres@", f"postgres:{DB_PASSWORD}@")
    db = open_database(url)
    with db.session.begin() as s:
        for _ in range(2):
            factories.request(s, factories.service(s))
        service = factories.service(s).id
    monkeypatch.chdir(tmp_path)
    outputs: list[str] = []
    with smtp_server(tmp_path, username="mailer", password="not-the-configured-one") as server:
        env = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
        env.update(CANCELPROC_DATABASE_URL=url, CANCELPROC_EMAIL__DELIVERY="smtp",
                   CANCELPROC_EMAIL__SMTP__HOST="127.0.0.1", CANCELPROC_EMAIL__SMTP__PORT=str(server.port),
                   CANCELPROC_EMAIL__SMTP__SECURITY="none", CANCELPROC_EMAIL__SMTP__USERNAME="mailer",
                   CANCELPROC_SMTP_PASSWORD=SMTP_PASSWORD, CANCELPROC_LOG_FORMAT="json",
                   CANCELPROC_LOG_LEVEL="debug")
        commands = [
            ["db", "upgrade"], ["init"], ["status"], ["status", "--json"], ["run", "--dry-run"],
            ["run", "--dry-run", "--json"], ["run", "--json"], ["run"], ["--debug", "run"],
            ["requests", "create", str(service), "--reason-code", "other"], ["requests", "list", "--json"],
            ["requests", "show", "1", "--json"], ["requests", "process", "3", "--now", "--json"],
            ["requests", "withdraw", "99"], ["requests", "retry", "1"], ["runs", "list", "--json"],
            ["runs", "show", "last", "--json"], ["services", "show", "1", "--json"], ["emails", "list", "--json"],
            ["emails", "show", "1", "--json"], ["emails", "show", "1", "--raw"], ["emails", "send"],
            ["emails", "send", "--now", "--json"], ["emails", "retry", "--all-failed"],
            ["emails", "preview", "cron_job_activity", "--run", "1"], ["report", "runs", "--format", "json"],
            ["report", "reasons", "--format", "csv"], ["hooks", "list"], ["import", "missing.csv"],
        ]
        with freeze_time(NOW, tick=True):
            for args in commands:
                result = CliRunner().invoke(cli, args, env=env)
                outputs.append(f"$ cancelproc {' '.join(args)} -> {result.exit_code}\n{result.output}\n"
                               f"{result.stderr}\n{result.exception!r}")
        # A wrong database password in the URL on a server that checks it fails in one line, without it.
        bad = CliRunner().invoke(cli, ["status"], env={**env, "CANCELPROC_DATABASE_URL": url.replace(
            "127.0.0.1", "127.0.0.2")})
        outputs.append(bad.output + bad.stderr)
    everything = "\n".join(outputs)
    assert "login as 'mailer' refused" in everything  # the SMTP login was tried, and failed
    with db.engine.connect() as conn:  # what the processor wrote: runs, audit, outbox, leases
        for table in ("runs", "audit_log", "email_outbox", "cancellation_requests"):
            everything += "\n".join(str(row) for row in conn.execute(text(f"SELECT * FROM {table}")))
    db.dispose()
    for secret in (DB_PASSWORD, SMTP_PASSWORD):
        assert secret not in everything, next(chunk for chunk in everything.split("$ ") if secret in chunk)
