"""SIGKILL during delivery (DESIGN.md guarantee 5): `cancelproc emails send` is killed while
it talks to a real SMTP server or writes to the outbox folder; after the rerun every queued
email has been delivered, each row is marked sent exactly once, and a resend carries the
same Message-ID.

- SMTP, killed at random moments: every email arrives; at most one repeat per kill.
- SMTP, killed at an exact message by the server itself (while it holds the message, before
  its 250; or right after the 250): the one in flight arrives twice, nothing else does.
- folder, killed at an exact file (tests/sigkill_at_rename.py: after its temp file is
  written, or after its rename): exactly one file per email, the killed writer's temp file
  removed by the next delivery, no file written twice, modes unchanged.
"""

from __future__ import annotations

import collections
import datetime as dt
import email
import email.policy
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from processor.db import Database, open_database, upgrade
from processor.delivery import BATCH
from processor.mailers import message_id
from processor.models import EmailStatus, OutboxEmail
from processor.outbox import QueuedEmail, queue
from tests.cli_helpers import process_env
from tests.smtp_server import HOST, Handler, smtp_server

N = 600

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]


def env(url: str, port: int) -> dict[str, str]:
    return process_env(url, CANCELPROC_LOG_LEVEL="warning", CANCELPROC_EMAIL__DELIVERY="smtp",
                       CANCELPROC_EMAIL__SMTP__HOST=HOST, CANCELPROC_EMAIL__SMTP__PORT=str(port),
                       CANCELPROC_EMAIL__SMTP__SECURITY="none")


def make_outbox(url: str, n: int) -> Database:
    db = open_database(url, create=True)
    upgrade(db)
    now = dt.datetime.now(dt.UTC)
    with db.engine.begin() as conn:
        queue(conn, [QueuedEmail(f"test:request:{i}", "service_cancellation_confirmation", None,
                                 f"client{i}@example.test", f"Cancelled {i}", f"text {i}", f"<p>{i}</p>")
                     for i in range(n)], run_id=None, now=now, from_address="billing@example.test")
    return db


def outbox(db: Database) -> list[OutboxEmail]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)))


def assert_each_sent_once(db: Database) -> list[OutboxEmail]:
    """Each row marked sent exactly once: one successful recorded attempt, one sent_at."""
    rows = outbox(db)
    assert {(r.status, r.attempts) for r in rows} == {(EmailStatus.SENT, 1)}
    assert all(r.sent_at is not None for r in rows)
    return rows


def send(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "processor", "emails", "send"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_kill_9_during_delivery_delivers_every_email_and_marks_each_sent_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db = make_outbox(url, N)
    handler = Handler(delay=0.004)  # a server that takes a few ms per message: the kill lands mid-batch
    kills = 0
    with smtp_server(tmp_path, handler=handler) as server:
        for kill_after in (130, 333, 480):
            proc = subprocess.Popen([sys.executable, "-m", "processor", "emails", "send"], cwd=tmp_path,
                                    env=env(url, server.port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while len(handler.message_ids()) < kill_after and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.communicate(timeout=30)
        final = send(tmp_path, env(url, server.port))
        assert final.returncode == 0, final.stderr
    assert kills >= 2, "the sender finished before it could be killed; slow the server down"
    rows = assert_each_sent_once(db)
    # Every email delivered at least once; a repeat only for the one send a kill cut off
    # before it was recorded (each message is recorded once the server accepted it), with
    # its row's own Message-ID.
    received = collections.Counter(handler.message_ids())
    expected = {message_id(r.id, r.key, r.created_at, r.from_address) for r in rows}
    assert set(received) == expected
    repeats = sum(received.values()) - len(expected)
    assert repeats <= kills, repeats
    db.dispose()


# --- SMTP: killed by the server at an exact message -----------------------------------------

@dataclass
class KillingHandler(Handler):
    """The test server, which SIGKILLs the sender once, at its `kill_at`th message:
    `in_flight`: when the message has arrived whole, before the server answers 250 (the
    server has it, the sender never learns it); `accepted`: at the next message's MAIL FROM
    (the sender had the 250 for message `kill_at` and went on)."""

    kill_at: int = 0
    moment: str = "in_flight"
    sender: subprocess.Popen[Any] | None = None
    started: threading.Event = field(default_factory=threading.Event)
    killed: bool = False

    def _kill(self) -> None:
        self.started.wait(60)  # the sender's Popen object is set (it cannot send before it exists)
        assert self.sender is not None
        self.sender.send_signal(signal.SIGKILL)
        self.killed = True

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, mail_options: Any) -> str:
        if self.moment == "accepted" and not self.killed and len(self.message_ids()) == self.kill_at:
            self._kill()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        if self.moment == "in_flight" and not self.killed and len(self.message_ids()) == self.kill_at:
            self._kill()  # the server has the message; the sender dies before it reads the 250
        return answer


@pytest.mark.parametrize("moment", ["in_flight", "accepted"])
def test_a_sender_killed_mid_batch_sends_again_at_most_the_message_in_flight(database_url: str, tmp_path: Path,
                                                                            moment: str) -> None:
    """SIGKILL at the 150th of 250 messages (the middle of the second batch of 100): the
    next `emails send` delivers the rest; only the message the server held when the sender
    died (no 250 seen) arrives twice. Killed right after a 250, nothing arrives twice.
    On SQLite and PostgreSQL."""
    n, kill_at = 250, 150
    url = database_url
    db = make_outbox(url, n)
    handler = KillingHandler(kill_at=kill_at, moment=moment)
    with smtp_server(tmp_path, handler=handler) as server:
        proc = subprocess.Popen([sys.executable, "-m", "processor", "emails", "send"], cwd=tmp_path,
                                env=env(url, server.port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            handler.sender = proc
            handler.started.set()
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == -signal.SIGKILL and handler.killed
        # Each accepted message was recorded at once, not at the end of its batch.
        recorded = [r.id for r in outbox(db) if r.status is EmailStatus.SENT]
        assert recorded == list(range(1, kill_at + (moment == "accepted")))
        final = send(tmp_path, env(url, server.port))
        assert final.returncode == 0, final.stderr
    rows = assert_each_sent_once(db)
    received = collections.Counter(handler.message_ids())
    ids = [message_id(r.id, r.key, r.created_at, r.from_address) for r in rows]
    assert set(received) == set(ids)  # none lost
    twice = [ids[kill_at - 1]] if moment == "in_flight" else []
    assert [m for m, count in received.items() if count > 1] == twice
    assert max(received.values()) <= 2
    db.dispose()


# --- folder: killed at an exact file ------------------------------------------------------------

def folder_env(url: str, outbox_dir: Path) -> dict[str, str]:
    return process_env(url, CANCELPROC_LOG_LEVEL="warning", CANCELPROC_EMAIL__DELIVERY="folder",
                       CANCELPROC_EMAIL__OUTBOX_DIR=str(outbox_dir))


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_folder_delivery_killed_mid_batch_leaves_one_file_per_email_and_no_temp_file(database_url: str,
                                                                                       tmp_path: Path,
                                                                                       when: str) -> None:
    """SIGKILL at the 150th of 250 files (the middle of the second batch of 100): `before`
    its rename (written and synced under its temp name) or `after` it (in place, its batch
    not recorded). The next `emails send` removes the temp file, finds the files of the
    unrecorded batch already there and records them without writing them again, writes the
    rest: one file per email, each its row's message, all with the mode of any other.
    On SQLite and PostgreSQL."""
    n, kill_at = 250, 150
    url, folder = database_url, tmp_path / "outbox"
    db = make_outbox(url, n)
    killed = subprocess.run([sys.executable, "-m", "tests.sigkill_at_rename", str(kill_at), when, "emails", "send"],
                            cwd=tmp_path, env=folder_env(url, folder), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # The first batch was synced and recorded; the second not: its files are there unrecorded.
    assert [r.id for r in outbox(db) if r.status is EmailStatus.SENT] == list(range(1, BATCH + 1))
    written = {p.name: p.stat() for p in folder.glob("*.eml")}
    assert len(written) == kill_at - (when == "before")
    temp = [p for p in folder.iterdir() if p.suffix == ".tmp"]
    if when == "before":  # what the issue saw: a whole message under a temp name, left behind
        assert len(temp) == 1 and temp[0].name.startswith(".cancelproc.") and b"text 149" in temp[0].read_bytes()
    else:
        assert temp == []

    final = send(tmp_path, folder_env(url, folder))
    assert final.returncode == 0, final.stderr
    rows = assert_each_sent_once(db)
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == [f"{r.id:08d}-{r.template}.eml" for r in rows]  # no temp file, no extra
    for row, path in zip(rows, files, strict=True):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert message["Message-ID"] == message_id(row.id, row.key, row.created_at, row.from_address)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # as mkstemp makes them, before and after a crash
    # The files of the unrecorded batch were not written a second time: the same inode,
    # untouched since the killed sender renamed them into place.
    for name, before in written.items():
        after = (folder / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    db.dispose()
