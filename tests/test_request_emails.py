"""`requests create` sends its emails itself (email.send_after_create), to a real SMTP
server; when it cannot, it says so, exits 1, and the emails wait for the next sender."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from processor.cli import cli
from processor.config import Settings
from processor.db import Database
from processor.models import EmailStatus, OutboxEmail
from tests import factories
from tests.smtp_server import HOST, free_port, smtp_server

Cli = Callable[..., Result]


@pytest.fixture
def service_id(db: Database) -> int:
    with db.session.begin() as s:
        return factories.service(s, first_name="Grace").id


@pytest.fixture
def cancelproc(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """`cancelproc ...` at the CLI, sending over SMTP to 127.0.0.1:port."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str, port: int, **more: str) -> Result:
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
        env.update(CANCELPROC_DATABASE_URL=settings.database_url, CANCELPROC_EMAIL__DELIVERY="smtp",
                   CANCELPROC_EMAIL__SMTP__HOST=HOST, CANCELPROC_EMAIL__SMTP__PORT=str(port),
                   CANCELPROC_EMAIL__SMTP__SECURITY="none", CANCELPROC_EMAIL__SMTP__TIMEOUT_SECONDS="5", **more)
        return CliRunner().invoke(cli, list(args), env=env)
    return invoke


def outbox(db: Database) -> list[tuple[str, str, EmailStatus]]:
    with db.read_session() as s:
        return [(e.template, e.to_address, e.status) for e in s.scalars(select(OutboxEmail).order_by(OutboxEmail.id))]


def create(cancelproc: Cli, service_id: int, port: int, *more: str, **env: str) -> Result:
    return cancelproc("requests", "create", str(service_id), "--reason-code", "too_expensive", *more, port=port, **env)


def test_the_client_and_staff_get_their_emails_from_the_command_itself(db, cancelproc, service_id, tmp_path):
    with db.session.begin() as s:
        second = factories.service(s, first_name="Hans").id
    with smtp_server(tmp_path) as server:
        result = create(cancelproc, service_id, server.port)
        as_json = create(cancelproc, second, server.port, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"request 1 created for service {service_id} (End of Billing Period); 2 email(s) sent\n"
    assert as_json.exit_code == 0, as_json.output
    assert (json.loads(as_json.stdout)["emails_sent"], json.loads(as_json.stdout)["emails_not_sent"]) == (2, None)
    subjects = sorted((r.rcpt_tos[0], r.message["Subject"].split(" - ")[0]) for r in server.received)
    clients = sorted({to for to, subject in subjects if subject == "Cancellation Request Confirmation"})
    assert len(subjects) == 4 and len(clients) == 2 and "support@example.test" not in clients
    assert [to for to, subject in subjects if subject == "New Cancellation Request"] == ["support@example.test"] * 2
    assert [status for *_, status in outbox(db)] == [EmailStatus.SENT] * 4


def test_mail_server_down_exits_1_and_the_emails_wait_for_the_next_sender(db, cancelproc, service_id, tmp_path):
    port = free_port()  # nothing listens there
    result = create(cancelproc, service_id, port)
    assert result.exit_code == 1, result.output
    assert result.stdout == f"request 1 created for service {service_id} (End of Billing Period)\n"
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "emails not sent: smtp 127.0.0.1" in warning[0] and "cannot connect" in warning[0]
    assert warning[0].endswith("they stay queued for the next run or `cancelproc emails send`")
    assert [status for *_, status in outbox(db)] == [EmailStatus.QUEUED, EmailStatus.QUEUED]
    with smtp_server(tmp_path, port=port) as server:
        sent = cancelproc("emails", "send", "--now", port=port)
    assert sent.exit_code == 0, sent.output
    assert len(server.received) == 2 and [status for *_, status in outbox(db)] == [EmailStatus.SENT] * 2


def test_with_send_after_create_off_the_emails_stay_queued(db, cancelproc, service_id, tmp_path):
    with smtp_server(tmp_path) as server:
        result = create(cancelproc, service_id, server.port, CANCELPROC_EMAIL__SEND_AFTER_CREATE="false")
    assert result.exit_code == 0, result.output
    assert "sent" not in result.stdout and server.received == []
    assert [status for *_, status in outbox(db)] == [EmailStatus.QUEUED, EmailStatus.QUEUED]
