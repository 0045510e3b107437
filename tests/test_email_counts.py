"""One definition of a run's email counts: the run's output, `runs show`, the staff digest
and the metrics agree (README, "Email counts"). Real SMTP server on localhost."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from freezegun import freeze_time
from prometheus_client.parser import text_string_to_metric_families

from processor.db import Database
from tests import factories
from tests.cli_helpers import as_json, ok
from tests.smtp_server import Handler, smtp_server
from tests.smtp_server import smtp_env as smtp_server_env

NIGHT = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
BUSY = "busy@example.test"


def smtp_env(port: int) -> dict[str, str]:
    return smtp_server_env(port, CANCELPROC_EMAIL__STAFF_ADDRESS="ops@example.test",
                           CANCELPROC_METRICS_FILE="var/cancelproc.prom")


def metric_emails(tmp_path: Path) -> dict[str, float]:
    text = (tmp_path / "var" / "cancelproc.prom").read_text()
    return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "cancelproc_last_run_emails"}


def digest_text(received: list[Any], run_id: int) -> str:
    for r in received:
        if r.message["Subject"].startswith(f"Cron Job Activity - run {run_id} "):
            body = r.message.get_body(("plain",))
            assert body is not None
            return str(body.get_content())
    raise AssertionError(f"no digest of run {run_id} among {len(received)} messages")


def test_run_output_runs_show_the_digest_and_the_metrics_give_the_same_email_counts(invoke, db: Database, tmp_path):
    with db.session.begin() as s:
        factories.request(s, factories.service(s, email=BUSY))
        factories.request(s, factories.service(s))
    handler = Handler(refuse={BUSY: "450 4.2.1 mailbox busy, try later"})
    with smtp_server(tmp_path, handler=handler) as server:
        env = smtp_env(server.port)
        # Night 1: two confirmations, one refused for now (it will retry); the digest is delivered.
        with freeze_time(NIGHT):
            first = as_json(invoke("run", "--json", env=env), code=1)
        assert (first["emails_queued"], first["emails_sent"], first["emails_retrying"], first["emails_failed"],
                first["emails_still_queued"], first["digest_sent"]) == (2, 1, 1, 0, 0, True)
        shown = as_json(invoke("runs", "show", 1, "--json", env=env))
        assert (shown["emails_sent"], shown["emails_failed"]) == (1, 0)
        assert metric_emails(tmp_path) == {"sent": 1, "failed": 0}
        text = digest_text(server.received, 1)
        for line in ("Emails sent:                 1", "Emails to retry:             1",
                     "Emails failed:               0", "Emails still queued:         0"):
            assert line in text, f"{line!r} not in:\n{text}"
        # Night 2: the mailbox takes it; the retried email is this run's only one sent.
        handler.refuse.clear()
        with freeze_time(NIGHT + dt.timedelta(days=1)):
            second = ok(invoke("run", env=env))
        lines = {line[:25].strip(): line[25:].strip() for line in second.stdout.splitlines()}
        assert (lines["emails sent"], lines["staff digest"]) == ("1", "sent")
        shown = as_json(invoke("runs", "show", 2, "--json", env=env))
        assert (shown["emails_sent"], shown["emails_failed"]) == (1, 0)
        assert metric_emails(tmp_path) == {"sent": 1, "failed": 0}
        assert "Emails sent:                 1" in digest_text(server.received, 2)
        # Every message arrived once: 2 confirmations, 2 digests.
        assert len(server.received) == 4


def test_emails_send_counts_a_retrying_email_once(invoke, db: Database, tmp_path):
    """`emails send`: "still queued" does not count again the emails it just tried (retrying)."""
    with db.session.begin() as s:
        factories.request(s, factories.service(s, email=BUSY))
        factories.request(s, factories.service(s))
    with freeze_time(NIGHT):
        ok(invoke("run", env={"CANCELPROC_EMAIL__SEND_AFTER_RUN": "false"}))
    handler = Handler(refuse={BUSY: "450 4.2.1 mailbox busy, try later"})
    with smtp_server(tmp_path, handler=handler) as server, freeze_time(NIGHT):
        report = as_json(invoke("emails", "send", "--json", env=smtp_env(server.port)), code=1)
    # The run's 2 confirmations and its digest were queued; 2 sent, 1 retrying, none besides.
    assert (report["sent"], report["retrying"], report["queued"]) == (2, 1, 0)
