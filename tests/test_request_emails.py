"""`requests create` sends its emails itself (email.send_after_create), to a real SMTP
server; when it cannot, it says so, exits 1, and the emails wait for the next sender.

`requests withdraw` (issue 14, item 1): the withdrawn request's queued emails are not sent
(each says why), and the client is told, in their language; the race with a sender that
has an email in flight, through a real `emails send` process held at the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from processor.cli import cli
from processor.config import Settings
from processor.db import Database
from processor.models import (
    AuditEntity,
    AuditEntry,
    CancellationRequest,
    EmailStatus,
    OutboxEmail,
    RequestStatus,
)
from tests import factories
from tests.cli_helpers import process_env
from tests.smtp_server import HOST, Handler, free_port, smtp_server

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


# --- requests withdraw ---------------------------------------------------------------------

QUEUE_ONLY = {"CANCELPROC_EMAIL__SEND_AFTER_CREATE": "false"}


def emails(db: Database) -> list[OutboxEmail]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)))


def subjects(server: Any) -> list[tuple[str, str]]:
    return [(r.rcpt_tos[0], r.message["Subject"]) for r in server.received]


def test_queued_emails_of_a_withdrawn_request_are_not_sent_and_the_client_is_told(db, cancelproc, tmp_path):
    with db.session.begin() as s:
        service = factories.service(s, first_name="Grace", email="grace@example.test")
        service_id, domain = service.id, service.domain
    with smtp_server(tmp_path) as server:
        assert create(cancelproc, service_id, server.port, **QUEUE_ONLY).exit_code == 0
        withdrawn = cancelproc("requests", "withdraw", "1", "--note", "changed their mind", port=server.port)
        assert withdrawn.exit_code == 0, withdrawn.output
        assert withdrawn.stdout == "request 1 withdrawn; 2 queued email(s) about it will not be sent; 1 email(s) sent\n"
        # Later senders (the next run, `emails send`) have nothing more to send.
        assert cancelproc("emails", "send", "--now", port=server.port).exit_code == 0
    assert subjects(server) == [("grace@example.test", f"Cancellation Request Withdrawn - VPS 4GB ({domain})")]
    body = server.received[0].message.get_body(("plain",)).get_content()
    assert "has been withdrawn" in body and "continues as before" in body
    assert "your next due date stays November 26, 2026" in body
    got = emails(db)
    assert [(e.template, e.status) for e in got] == [
        ("cancellation_request_confirmation", EmailStatus.WITHDRAWN),
        ("new_cancellation_request", EmailStatus.WITHDRAWN),
        ("cancellation_request_withdrawn", EmailStatus.SENT)]
    assert got[0].last_error == "not sent: request 1 was withdrawn while this was queued"
    # Why, where staff look: the email list and the request's audit trail.
    listed = json.loads(cancelproc("emails", "list", "--status", "withdrawn", "--json", port=server.port).stdout)
    assert sorted(e["template"] for e in listed["rows"]) == [
        "cancellation_request_confirmation", "new_cancellation_request"]
    with db.read_session() as s:
        trail = [(a.entity, a.action.value, a.detail) for a in s.scalars(
            select(AuditEntry).where(AuditEntry.request_id == 1).order_by(AuditEntry.id))]
    assert [(entity, action) for entity, action, _ in trail] == [
        (AuditEntity.REQUEST, "created"), (AuditEntity.REQUEST, "withdrawn"), (AuditEntity.EMAIL, "withdrawn"),
        (AuditEntity.EMAIL, "withdrawn")]
    assert trail[2][2] == ("cancellation_request_confirmation to grace@example.test: "
                           "not sent: request 1 was withdrawn while this was queued")


def test_a_request_whose_emails_went_out_gets_the_withdrawal_in_the_clients_language(db, cancelproc, tmp_path):
    with db.session.begin() as s:
        service_id = factories.service(s, first_name="Hans", language="de").id
    with smtp_server(tmp_path) as server:
        assert create(cancelproc, service_id, server.port).exit_code == 0  # both sent at once
        withdrawn = cancelproc("requests", "withdraw", "1", "--json", port=server.port)
    assert withdrawn.exit_code == 0, withdrawn.output
    assert json.loads(withdrawn.stdout) == {"id": 1, "status": "withdrawn", "emails_withdrawn": [],
                                            "emails_not_queued": [], "emails_sent": 1, "emails_not_sent": None,
                                            "unsuspended": False}
    assert [subject.split(" - ")[0] for _, subject in subjects(server)] == [
        "Eingang Ihrer Kündigung", "New Cancellation Request", "Kündigung zurückgenommen"]
    german = server.received[2].message.get_body(("plain",)).get_content()
    assert "Fälligkeitsdatum bleibt der 26. November 2026" in german
    assert [e.status for e in emails(db)] == [EmailStatus.SENT] * 3


class HeldAtData(Handler):
    """Holds each message at DATA until `hold` is set, and says when one arrived."""

    def __init__(self) -> None:
        super().__init__(hold=threading.Event())
        self.arrived = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrived.set()
        return await super().handle_DATA(server, session, envelope)


def test_an_email_in_flight_when_its_request_is_withdrawn_is_recorded_sent_and_the_rest_are_not_sent(
        db, cancelproc, settings, tmp_path):
    """A sender (`emails send`, a real process) has the confirmation at the server when staff
    withdraw the request: that one went and is recorded sent; the staff notice of the same
    batch, not yet sent, is not sent at all; the withdrawal notice goes after."""
    with db.session.begin() as s:
        service_id = factories.service(s, email="lin@example.test").id
    handler = HeldAtData()
    try:
        with smtp_server(tmp_path, handler=handler) as server:
            assert create(cancelproc, service_id, server.port, **QUEUE_ONLY).exit_code == 0
            env = process_env(settings.database_url, CANCELPROC_EMAIL__DELIVERY="smtp",
                              CANCELPROC_EMAIL__SMTP__HOST=HOST, CANCELPROC_EMAIL__SMTP__PORT=str(server.port),
                              CANCELPROC_EMAIL__SMTP__SECURITY="none", CANCELPROC_EMAIL__SMTP__TIMEOUT_SECONDS="120")
            sender = subprocess.Popen([sys.executable, "-m", "processor", "emails", "send", "--now"], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                assert handler.arrived.wait(120), "the sender never reached the server"
                withdrawn = cancelproc("requests", "withdraw", "1", port=server.port, **QUEUE_ONLY)
                assert withdrawn.exit_code == 0, withdrawn.output
                handler.hold.set()
                output, _ = sender.communicate(timeout=120)
            finally:
                handler.hold.set()
                if sender.poll() is None:
                    sender.kill()
                    sender.wait()
            assert sender.returncode == 0, output
            # The confirmation in flight went; the staff notice did not; the withdrawal
            # notice, queued meanwhile, went with the sender's next batch.
            assert [(to, subject.split(" - ")[0]) for to, subject in subjects(server)] == [
                ("lin@example.test", "Cancellation Request Confirmation"),
                ("lin@example.test", "Cancellation Request Withdrawn")]
    finally:
        handler.hold.set()
    assert [(e.template, e.status) for e in emails(db)] == [
        ("cancellation_request_confirmation", EmailStatus.SENT),  # it went: the record says so
        ("new_cancellation_request", EmailStatus.WITHDRAWN),
        ("cancellation_request_withdrawn", EmailStatus.SENT)]
    with db.read_session() as s:
        assert s.get(CancellationRequest, 1).status is RequestStatus.WITHDRAWN
