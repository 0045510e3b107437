"""Delivery of the outbox to a real SMTP server (aiosmtpd on localhost), and the other backends.

DESIGN.md guarantee 5: emails are queued exactly once and delivered at least once; an SMTP
outage loses none.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import io
import os
import re
import socket
import stat
import subprocess
import sys
import time
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from processor import lease
from processor.cli import cli
from processor.config import Settings
from processor.db import Database
from processor.delivery import Deliverer
from processor.errors import ConfigError, LeaseHeld
from processor.mailers import ConsoleMailer, FolderMailer, MailerDown, mailer_from_settings, message_id
from processor.models import AuditEntry, EmailStatus, Lease, OutboxEmail, Run
from processor.outbox import QueuedEmail, queue
from processor.run import Runner, RunOptions
from tests import factories
from tests.smtp_server import Handler, smtp_server, smtp_settings

D = dt.date(2026, 11, 26)
PASSWORD = "s3cret-Pa55word!"


def make_settings(settings: Settings, **email: Any) -> Settings:
    return Settings(database_url=settings.database_url, app_root=settings.app_root,
                    email={"staff_address": "", **email})


def deliverer(db: Database, settings: Settings, now: dt.datetime, environ: dict[str, str] | None = None) -> Deliverer:
    return Deliverer(db, mailer_from_settings(settings, environ or {}), settings, clock=lambda: now)


def run(db: Database, settings: Settings, now: dt.datetime, **options: Any):
    runner = Runner(db, settings, clock=lambda: now, deliverer=deliverer(db, settings, now))
    return runner.run(RunOptions(as_of=D, **options))


def body(message: Any, subtype: str) -> str:
    """A part's text as the template rendered it (SMTP carries CRLF line ends)."""
    return message.get_body((subtype,)).get_content().replace("\r\n", "\n").strip()


def outbox(db: Database) -> list[OutboxEmail]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)))


def seed(db: Database, n: int = 3) -> list[int]:
    with db.session.begin() as s:
        return [factories.request(s, factories.service(s, first_name=f"Grace{i}")).id for i in range(n)]


def queue_rows(db: Database, now: dt.datetime, addresses: list[str]) -> None:
    """Outbox rows as a run would queue them (for delivery-only tests)."""
    with db.engine.begin() as conn:
        queue(conn, [QueuedEmail(f"test:{i}:{a}", "service_cancellation_confirmation", None, a, f"Subject {i}",
                                 f"text {i}", f"<p>html {i}</p>") for i, a in enumerate(addresses)],
              run_id=None, now=now, from_address="billing@example.test")


# --- a real server ------------------------------------------------------------------------------

def test_a_run_delivers_over_smtp_with_headers_parts_and_merge_fields(db, settings, now, tmp_path):
    with db.session.begin() as s:
        grace = factories.request(s, factories.service(s, first_name="Grace"), reason="Moving <b>everything</b>")
        hans = factories.request(s, factories.service(s, first_name="Hans", language="de"))
    with smtp_server(tmp_path) as server:
        settings = make_settings(settings, staff_address="ops@example.test", **smtp_settings(server))
        summary = run(db, settings, now)
    assert (summary.completed, summary.emails_sent, summary.emails_failed, summary.exit_code) == (2, 2, 0, 0)
    assert summary.digest_sent
    rows = outbox(db)
    assert [(r.template, r.status, r.attempts) for r in rows] == [
        ("service_cancellation_confirmation", EmailStatus.SENT, 1)] * 2 + [("cron_job_activity", EmailStatus.SENT, 1)]
    by_to = {r.rcpt_tos[0]: r for r in server.received}
    assert len(server.received) == 3
    for row in rows:
        got = by_to[row.to_address]
        m = got.message
        assert got.mail_from == "billing@example.test" and got.rcpt_tos == [row.to_address]
        assert m["From"] == "Example Hosting <billing@example.test>"
        assert m["To"] == row.to_address and m["Subject"] == row.subject
        assert m["Message-ID"] == message_id(row.id, row.key, row.created_at, row.from_address)
        assert m["Auto-Submitted"] == "auto-generated" and m["Date"]
        assert m.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in m.iter_parts()] == ["text/plain", "text/html"]
        assert body(m, "plain") == row.text_body and body(m, "html") == row.html_body
    g = by_to[next(r.to_address for r in rows if r.request_id == grace.id)].message
    assert g["Subject"].startswith("Service Cancellation Confirmation - VPS 4GB (host")
    text, html = body(g, "plain"), body(g, "html")
    assert "Dear Grace," in text and "November 26, 2026" in text and "Moving <b>everything</b>" in text
    assert "Moving &lt;b&gt;everything&lt;/b&gt;" in html and "<b>everything" not in html  # autoescaped
    h = by_to[next(r.to_address for r in rows if r.request_id == hans.id)].message
    assert h["Subject"].startswith("Bestätigung der Kündigung - VPS 4GB")  # the client's language
    assert "Hallo Hans," in body(h, "plain") and "26. November 2026" in body(h, "plain")
    digest = by_to["ops@example.test"].message
    assert digest["Subject"] == "Cron Job Activity - run 1 - 2 cancelled"
    with db.read_session() as s:
        assert (s.get(Run, summary.run_id).emails_sent, s.get(Run, summary.run_id).emails_failed) == (2, 0)


def test_starttls_and_login_with_the_password_from_the_environment(db, settings, now, tmp_path):
    seed(db, 2)
    with smtp_server(tmp_path, security="starttls", username="mailer", password=PASSWORD) as server:
        settings = make_settings(settings, **smtp_settings(server, "starttls"))
        report = deliverer_run(db, settings, now, {"CANCELPROC_SMTP_PASSWORD": PASSWORD})
    assert report.emails_sent == 2
    assert [(r.authenticated_as, r.tls) for r in server.received] == [("mailer", True)] * 2


def test_implicit_tls_and_the_password_from_a_file(db, settings, now, tmp_path):
    seed(db, 1)
    (tmp_path / "smtp-password").write_text(PASSWORD + "\n")
    with smtp_server(tmp_path, security="ssl", username="mailer", password=PASSWORD) as server:
        conf = smtp_settings(server, "ssl")
        conf["smtp"].update(password_file="smtp-password", password_env="")
        settings = make_settings(settings, **conf)
        report = deliverer_run(db, settings, now, {})
    assert report.emails_sent == 1 and [(r.authenticated_as, r.tls) for r in server.received] == [("mailer", True)]


def deliverer_run(db: Database, settings: Settings, now: dt.datetime, environ: dict[str, str]):
    runner = Runner(db, settings, clock=lambda: now, deliverer=deliverer(db, settings, now, environ))
    return runner.run(RunOptions(as_of=D))


def test_a_refused_login_stops_delivery_in_one_line_without_the_password(db, settings, now, tmp_path):
    seed(db, 2)
    with smtp_server(tmp_path, security="starttls", username="mailer", password="the-right-one") as server:
        settings = make_settings(settings, **smtp_settings(server, "starttls"))
        summary = deliverer_run(db, settings, now, {"CANCELPROC_SMTP_PASSWORD": PASSWORD})
    assert server.received == []
    assert summary.completed == 2 and summary.exit_code == 1  # the cancellations stand
    assert summary.delivery_error.startswith(f"smtp 127.0.0.1:{server.port} (starttls): login as 'mailer' refused: 535")
    rows = outbox(db)
    assert [r.status for r in rows] == [EmailStatus.QUEUED] * 2
    assert PASSWORD not in repr(summary.as_dict()) and all(PASSWORD not in (r.last_error or "") for r in rows)


def test_a_login_without_a_password_is_a_config_error(settings):
    settings = make_settings(settings, delivery="smtp", smtp={"username": "mailer", "password_env": "NO_SUCH_VAR"})
    with pytest.raises(ConfigError, match="email.smtp.username is 'mailer' but there is no password: set the "
                                          "environment variable NO_SUCH_VAR or email.smtp.password_file"):
        mailer_from_settings(settings, {})


# --- outages and refusals -----------------------------------------------------------------------

def test_smtp_down_during_a_run_loses_nothing_and_a_later_send_delivers_each_once(db, settings, now, tmp_path):
    ids = seed(db, 5)
    with smtp_server(tmp_path) as server:
        port = server.port
    # The server is gone: the run cancels everything and keeps the emails.
    settings = make_settings(settings, **smtp_settings(server))
    summary = run(db, settings, now)
    assert (summary.completed, summary.emails_queued, summary.emails_sent, summary.exit_code) == (5, 5, 0, 1)
    assert summary.delivery_error.startswith(f"smtp 127.0.0.1:{port} (none): cannot connect")
    rows = outbox(db)
    assert [r.status for r in rows] == [EmailStatus.QUEUED] * 5 and sorted(r.request_id for r in rows) == ids
    assert rows[0].attempts == 1 and rows[0].last_error.startswith("smtp 127.0.0.1") and rows[0].next_attempt_at
    assert all(r.attempts == 0 for r in rows[1:])  # delivery stopped at the first: nothing else was tried
    # The server is back (same port); within the backoff only the untried ones go...
    with smtp_server(tmp_path, port=port) as back:
        first = deliverer(db, settings, now + dt.timedelta(minutes=1)).deliver()
        assert (first.sent, first.queued) == (4, 1)
        # ... and after it, the last one. Each email arrives exactly once.
        later = deliverer(db, settings, now + dt.timedelta(minutes=6)).deliver()
        assert (later.sent, later.queued, later.ok) == (1, 0, True)
        again = deliverer(db, settings, now + dt.timedelta(hours=1)).deliver()
        assert again.sent == 0
    assert sorted(back.handler.message_ids()) == sorted(
        message_id(r.id, r.key, r.created_at, r.from_address) for r in rows)
    assert all(r.status is EmailStatus.SENT and r.last_error is None for r in outbox(db))
    # Each recorded as it was accepted, at its own delivery's time.
    minutes = sorted((r.sent_at - now) / dt.timedelta(minutes=1) for r in outbox(db))
    assert minutes == [1, 1, 1, 1, 6]


def test_a_5xx_refusal_fails_at_once_a_4xx_is_retried_with_backoff_then_fails(db, settings, now, tmp_path):
    queue_rows(db, now, ["gone@example.test", "busy@example.test", "fine@example.test"])
    handler = Handler(refuse={"gone@example.test": "550 5.1.1 mailbox unavailable",
                              "busy@example.test": "450 4.2.1 mailbox busy, try later"})
    with smtp_server(tmp_path, handler=handler) as server:
        settings = make_settings(settings, max_attempts=3, retry_backoff_minutes=10, **smtp_settings(server))
        first = deliverer(db, settings, now).deliver()
        assert (first.sent, first.retrying, first.failed, first.queued, first.stopped) == (1, 1, 1, 0, None)
        assert first.failed_emails == [{"id": 1, "template": "service_cancellation_confirmation",
                                        "to_address": "gone@example.test",
                                        "error": "recipient refused: 550 5.1.1 mailbox unavailable"}]
        gone, busy, fine = outbox(db)
        assert (gone.status, gone.attempts) == (EmailStatus.FAILED, 1)
        assert (busy.status, busy.attempts, busy.next_attempt_at) == (
            EmailStatus.QUEUED, 1, now + dt.timedelta(minutes=10))
        assert busy.last_error == "recipient refused: 450 4.2.1 mailbox busy, try later"
        assert deliverer(db, settings, now + dt.timedelta(minutes=9)).deliver().retrying == 0  # not yet
        second = deliverer(db, settings, now + dt.timedelta(minutes=10)).deliver()
        assert (second.retrying, outbox(db)[1].next_attempt_at) == (1, now + dt.timedelta(minutes=30))  # doubled
        third = deliverer(db, settings, now + dt.timedelta(minutes=30)).deliver()
        assert (third.failed, outbox(db)[1].status, outbox(db)[1].attempts) == (1, EmailStatus.FAILED, 3)
        assert [r.rcpt_tos for r in server.received] == [["fine@example.test"]]
    with db.read_session() as s:
        audit = s.scalars(select(AuditEntry).where(AuditEntry.entity == "email").order_by(AuditEntry.id)).all()
    assert [(a.entity_id, a.action) for a in audit] == [(1, "failed"), (2, "failed")]
    assert audit[1].detail.endswith("gave up after 3 attempts")


def test_a_stalled_server_times_out_and_the_email_stays_queued(db, settings, now, tmp_path):
    queue_rows(db, now, ["a@example.test"])
    with smtp_server(tmp_path, handler=Handler(delay=3)) as server:
        conf = smtp_settings(server)
        conf["smtp"]["timeout_seconds"] = 0.5
        report = deliverer(db, make_settings(settings, **conf), now).deliver()
    assert report.sent == 0 and report.stopped == f"smtp 127.0.0.1:{server.port} (none): no answer (timed out; " \
                                                  "email.smtp.timeout_seconds)"
    assert outbox(db)[0].status is EmailStatus.QUEUED


@pytest.mark.parametrize(("to_address", "subject", "why"), [
    ("victim@example.test\r\nBcc: everyone@example.test", "Hello", "recipient contains a line break"),
    ("a@example.test", "Hello\nBcc: everyone@example.test", "subject contains a line break"),
    ("a@example.test, b@example.test", "Hello", "recipient not a single email address"),
])
def test_header_injection_in_a_queued_row_is_refused_recorded_and_never_sent(db, settings, now, tmp_path,
                                                                             to_address, subject, why):
    with db.engine.begin() as conn:  # a row put there by something other than the processor
        queue(conn, [QueuedEmail("x:1", "service_cancellation_confirmation", None, to_address, subject, "t", "h")],
              run_id=None, now=now, from_address="billing@example.test")
    with smtp_server(tmp_path) as server:
        report = deliverer(db, make_settings(settings, **smtp_settings(server)), now).deliver()
    assert server.received == [] and (report.sent, report.failed) == (0, 1)
    row = outbox(db)[0]
    assert row.status is EmailStatus.FAILED and row.last_error == f"refused, never sent: {why} (header injection)"


# --- the other backends -------------------------------------------------------------------------

def test_folder_backend_writes_one_eml_per_email_and_a_resend_writes_no_second_copy(db, settings, now, tmp_path):
    queue_rows(db, now, ["a@example.test", "b@example.test"])
    settings = make_settings(settings, delivery="folder", outbox_dir="var/out")
    assert deliverer(db, settings, now).deliver().sent == 2
    files = sorted((tmp_path / "var" / "out").iterdir())
    assert [f.name for f in files] == ["00000001-service_cancellation_confirmation.eml",
                                       "00000002-service_cancellation_confirmation.eml"]
    m = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert (m["To"], m["Subject"], body(m, "plain")) == ("a@example.test", "Subject 0", "text 0")
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    # Sent again (as after a crash between the send and its record): each file is found
    # under its final name with its row's Message-ID, recorded as sent, not written again.
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    with db.engine.begin() as conn:
        conn.execute(update(OutboxEmail).values(status=EmailStatus.QUEUED))
    assert deliverer(db, settings, now).deliver().sent == 2
    assert sorted((tmp_path / "var" / "out").iterdir()) == files
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before
    assert {e.status for e in outbox(db)} == {EmailStatus.SENT}


def test_a_file_of_another_message_under_the_final_name_is_replaced(db, settings, now, tmp_path):
    """Same name, other Message-ID (an outbox folder shared with another database whose ids
    overlap): not this email, so it is written, as it always was."""
    queue_rows(db, now, ["a@example.test"])
    folder = tmp_path / "var" / "out"
    folder.mkdir(parents=True)
    (folder / "00000001-service_cancellation_confirmation.eml").write_bytes(
        b"Message-ID: <cancelproc.1.0000000000000000@elsewhere.test>\r\nSubject: other\r\n\r\nother\r\n")
    assert deliverer(db, make_settings(settings, delivery="folder", outbox_dir="var/out"), now).deliver().sent == 1
    m = email.message_from_bytes((folder / "00000001-service_cancellation_confirmation.eml").read_bytes(),
                                 policy=email.policy.default)
    row = outbox(db)[0]
    assert m["Message-ID"] == message_id(row.id, row.key, row.created_at, row.from_address)


def dead_pid() -> int:
    """The pid of a process that has ended and was reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_the_next_delivery_removes_only_temp_files_whose_writer_is_gone(db, settings, now, tmp_path):
    """Temp files a killed writer left (a whole message each) go at the next delivery, even
    one with nothing to send: at once when the name says its process on this host has
    ended; after `stale_after` (the lease's length) when it cannot be checked (another
    host, a live pid that may be a reused one, the unnamed temp files of older versions).
    Anything else in the folder is left alone."""
    folder = tmp_path / "out"
    folder.mkdir()
    host = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())
    fresh = {
        "dead": f".cancelproc.{host}.{dead_pid()}.a1b2c3d4.tmp",
        "live": f".cancelproc.{host}.{os.getppid()}.a1b2c3d4.tmp",
        "other host": ".cancelproc.mail2.1234.a1b2c3d4.tmp",
        "older version": ".k3j_9xq2.tmp",
    }
    not_ours = [".cancelproc.mail2.1234.a1b2c3d4.tmp.bak", ".k3j_9xq2.eml", "notes.tmp", ".a1b2.tmp",
                "00000001-service_cancellation_confirmation.eml"]
    for name in [*fresh.values(), *not_ours]:
        (folder / name).write_bytes(b"Subject: half a message\r\n")
    settings = make_settings(settings, delivery="folder", outbox_dir=str(folder))
    assert settings.lease_seconds == 600
    assert deliverer(db, settings, now).deliver().sent == 0  # nothing queued: it cleans all the same
    left = {p.name for p in folder.iterdir()}
    assert left == {*not_ours, fresh["live"], fresh["other host"], fresh["older version"]}
    # Untouched for longer than the lease: no live sender is writing them.
    an_hour_ago = time.time() - 3600
    for name in left:
        os.utime(folder / name, (an_hour_ago, an_hour_ago))
    assert deliverer(db, settings, now).deliver().sent == 0
    assert {p.name for p in folder.iterdir()} == set(not_ours)


def test_a_temp_file_being_written_by_a_live_sender_is_left_alone(db, settings, now, tmp_path):
    """Two senders at once cannot happen in one database (the lease), but a sender whose
    lease was taken over may still be writing, or another database may share the folder:
    a fresh temp file of a live process stays."""
    folder = tmp_path / "out"
    folder.mkdir()
    writing = folder / f".cancelproc.{re.sub(r'[^A-Za-z0-9-]', '_', socket.gethostname())}.{os.getppid()}.zz99zz99.tmp"
    writing.write_bytes(b"Subject: being written\r\n")
    queue_rows(db, now, ["a@example.test"])
    assert deliverer(db, make_settings(settings, delivery="folder", outbox_dir=str(folder)), now).deliver().sent == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted([writing.name,
                                                              "00000001-service_cancellation_confirmation.eml"])


def test_a_folder_that_cannot_be_written_stops_delivery_and_keeps_the_emails(db, settings, now, tmp_path):
    queue_rows(db, now, ["a@example.test"])
    (tmp_path / "blocked").write_text("a file where the folder should be")
    report = deliverer(db, make_settings(settings, delivery="folder", outbox_dir="blocked/out"), now).deliver()
    assert report.sent == 0 and report.stopped.startswith(f"folder {tmp_path / 'blocked' / 'out'}: cannot write")
    assert outbox(db)[0].status is EmailStatus.QUEUED


def test_a_batch_the_folder_cannot_sync_is_not_recorded_as_sent(db, settings, now, tmp_path):
    """Sent means on disk for good: the files are written, but if the folder cannot be
    synced (a disk error), the batch stays queued and goes again (same file names)."""

    class UnsyncableFolder(FolderMailer):  # the real folder backend, with a failing disk sync
        def flush(self) -> None:
            raise MailerDown(f"{self.description}: cannot sync: Input/output error")

    queue_rows(db, now, ["a@example.test", "b@example.test"])
    folder = tmp_path / "out"
    report = Deliverer(db, UnsyncableFolder(folder), make_settings(settings), clock=lambda: now).deliver()
    assert (report.sent, report.stopped) == (0, f"folder {folder}: cannot sync: Input/output error")
    # Left as they were: no attempt is counted against emails that are not at fault.
    assert [(e.status, e.attempts, e.next_attempt_at) for e in outbox(db)] == [(EmailStatus.QUEUED, 0, None)] * 2
    report = Deliverer(db, FolderMailer(folder), make_settings(settings), clock=lambda: now).deliver()
    assert report.sent == 2 and len(list(folder.glob("*.eml"))) == 2


def test_console_backend_prints_the_message(db, settings, now):
    queue_rows(db, now, ["a@example.test"])
    stream = io.StringIO()
    report = Deliverer(db, ConsoleMailer(stream), make_settings(settings), clock=lambda: now).deliver()
    assert report.sent == 1
    out = stream.getvalue()
    assert "envelope billing@example.test -> a@example.test" in out and "Subject: Subject 0" in out and "text 0" in out


def test_one_sender_at_a_time(db, settings, now, tmp_path):
    queue_rows(db, now, ["a@example.test"])
    settings = make_settings(settings)
    with db.session.begin() as s:  # another live process holds the delivery lease
        lease.acquire_delivery(s, clock=lambda: now, seconds=600, me=lease.Holder.this_process())
    other = Deliverer(db, FolderMailer(tmp_path / "out"), settings, clock=lambda: now,
                      me=lease.Holder("another-host", 1234))
    with pytest.raises(LeaseHeld, match="^email delivery in progress on host"):
        other.deliver()
    # Once its lease has expired, the next sender takes over.
    later = Deliverer(db, FolderMailer(tmp_path / "out"), settings, clock=lambda: now + dt.timedelta(seconds=601),
                      me=lease.Holder("another-host", 1234))
    assert later.deliver().sent == 1
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Lease)) == 0


def test_at_the_cli_an_outage_exits_1_and_emails_send_delivers_each_once_later(db, settings, tmp_path, monkeypatch):
    """The operator's view: `cancelproc run` with the mail server down, then `emails send`."""
    seed(db, 3)
    with smtp_server(tmp_path) as server:
        port = server.port
    monkeypatch.chdir(tmp_path)
    env = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=settings.database_url, CANCELPROC_EMAIL__DELIVERY="smtp",
               CANCELPROC_EMAIL__SMTP__HOST="127.0.0.1", CANCELPROC_EMAIL__SMTP__PORT=str(port),
               CANCELPROC_EMAIL__SMTP__SECURITY="none", CANCELPROC_EMAIL__SMTP__USERNAME="mailer",
               CANCELPROC_SMTP_PASSWORD=PASSWORD, CANCELPROC_LOG_FORMAT="console")  # the summary for a person
    down = CliRunner().invoke(cli, ["run", "--as-of", str(D)], env=env)
    assert down.exit_code == 1, down.output
    assert "cancelled                 3" in down.stdout
    assert f"email delivery stopped: smtp 127.0.0.1:{port} (none): cannot connect" in down.stdout
    assert PASSWORD not in down.output
    with smtp_server(tmp_path, port=port, username="mailer", password=PASSWORD) as back:
        sent = CliRunner().invoke(cli, ["emails", "send", "--now"], env=env)
        assert sent.exit_code == 0, sent.output
        assert "4 sent, 0 will be retried, 0 failed for good, 0 still queued" in sent.stdout  # 3 and the digest
        assert CliRunner().invoke(cli, ["emails", "send", "--now"], env=env).stdout.startswith("0 sent")
    assert sorted(r.rcpt_tos[0] for r in back.received)[-1] == "support@example.test"
    assert len(back.handler.message_ids()) == len(set(back.handler.message_ids())) == 4
