"""SIGKILL during delivery (DESIGN.md guarantee 5): `cancelproc emails send` is killed while
it talks to a real SMTP server; after the rerun every queued email has been delivered at
least once, each row is marked sent exactly once, and a resend carries the same Message-ID."""

from __future__ import annotations

import collections
import datetime as dt
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from processor.db import open_database, upgrade
from processor.delivery import BATCH, message_id
from processor.models import EmailStatus, OutboxEmail
from processor.outbox import QueuedEmail, queue
from tests.cli_helpers import process_env
from tests.smtp_server import HOST, Handler, smtp_server

N = 600

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]


def env(db_path: Path, port: int) -> dict[str, str]:
    return process_env(f"sqlite:///{db_path}", CANCELPROC_LOG_LEVEL="warning", CANCELPROC_EMAIL__DELIVERY="smtp",
                       CANCELPROC_EMAIL__SMTP__HOST=HOST, CANCELPROC_EMAIL__SMTP__PORT=str(port),
                       CANCELPROC_EMAIL__SMTP__SECURITY="none")


def test_kill_9_during_delivery_delivers_every_email_and_marks_each_sent_once(tmp_path: Path) -> None:
    db_path = tmp_path / "c.db"
    db = open_database(f"sqlite:///{db_path}", create=True)
    upgrade(db)
    now = dt.datetime.now(dt.UTC)
    with db.engine.begin() as conn:
        queue(conn, [QueuedEmail(f"test:request:{i}", "service_cancellation_confirmation", None,
                                 f"client{i}@example.test", f"Cancelled {i}", f"text {i}", f"<p>{i}</p>")
                     for i in range(N)], run_id=None, now=now, from_address="billing@example.test")
    handler = Handler(delay=0.004)  # a server that takes a few ms per message: the kill lands mid-batch
    kills = 0
    with smtp_server(tmp_path, handler=handler) as server:
        for kill_after in (130, 333, 480):
            proc = subprocess.Popen([sys.executable, "-m", "processor", "emails", "send"], cwd=tmp_path,
                                    env=env(db_path, server.port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while len(handler.message_ids()) < kill_after and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.communicate(timeout=30)
        final = subprocess.run([sys.executable, "-m", "processor", "emails", "send"], cwd=tmp_path,
                               env=env(db_path, server.port), capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
    assert kills >= 2, "the sender finished before it could be killed; slow the server down"
    with db.read_session() as s:
        rows = s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)).all()
    # Each row marked sent exactly once: one successful recorded attempt, one sent_at.
    assert {(r.status, r.attempts) for r in rows} == {(EmailStatus.SENT, 1)}
    assert all(r.sent_at is not None for r in rows)
    # Every email delivered at least once; repeats only for sends a kill cut off before
    # their batch was recorded, each with its row's own Message-ID.
    received = collections.Counter(handler.message_ids())
    expected = {message_id(r.id, r.key, r.created_at, r.from_address) for r in rows}
    assert set(received) == expected
    repeats = sum(received.values()) - len(expected)
    assert repeats <= kills * BATCH, repeats
    db.dispose()
