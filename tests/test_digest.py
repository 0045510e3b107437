"""The staff digest (Cron Job Activity): queued and sent after each run, naming failures
("manual cancellation required"), vetoes, lateness and emails that could not be delivered."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import select

from processor.config import Settings
from processor.db import Database
from processor.delivery import Deliverer
from processor.hooks import HookRegistry, load_hooks
from processor.mailers import FolderMailer
from processor.models import EmailStatus, OutboxEmail
from processor.outbox import QueuedEmail, queue
from processor.run import Runner, RunOptions, RunSummary
from tests import factories

D = dt.date(2026, 11, 26)
DIGEST = "cron_job_activity"


def staff_settings(settings: Settings, **more: Any) -> Settings:
    return Settings(database_url=settings.database_url, app_root=settings.app_root, max_attempts=1,
                    email={"staff_address": "ops@example.test", **more})


def hooks(tmp_path: Path, source: str = "") -> HookRegistry:
    (tmp_path / "hooks").mkdir(exist_ok=True)
    (tmp_path / "hooks" / "rules.py").write_text("from processor.hooks import add_hook\n" + source)
    return load_hooks(tmp_path / "hooks", entry_points=False)


def run(db: Database, settings: Settings, now: dt.datetime, registry: HookRegistry | None = None,
        **options: Any) -> RunSummary:
    deliverer = Deliverer(db, FolderMailer(settings.app_root / "out"), settings, clock=lambda: now)
    return Runner(db, settings, clock=lambda: now, hooks=registry, deliverer=deliverer).run(
        RunOptions(as_of=D, **options))


def digests(db: Database) -> list[OutboxEmail]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail).where(OutboxEmail.template == DIGEST)))


def test_the_digest_names_failures_vetoes_lateness_and_undelivered_emails(db, settings, now, tmp_path):
    with db.session.begin() as s:
        late = factories.request(s, factories.service(s, next_due_date=D - dt.timedelta(days=3)))
        on_time = factories.request(s, factories.service(s))
        broken = factories.request(s, factories.service(s, email=""))  # no address: fails (max_attempts=1)
        vetoed = factories.request(s, factories.service(s, first_name="Vera"))
    with db.engine.begin() as conn:  # an older email whose recipient would inject headers
        queue(conn, [QueuedEmail("old:1", "service_cancellation_confirmation", None, "x@example.test\nBcc: y@z",
                                 "s", "t", "h")], run_id=None, now=now, from_address="billing@example.test")
    registry = hooks(tmp_path, "@add_hook('PreModuleTerminate')\n"
                               "def keep_vera(client):\n"
                               "    if client['first_name'] == 'Vera':\n"
                               "        return {'abortcmd': True, 'reason': 'balance due'}\n")
    summary = run(db, staff_settings(settings), now, registry)
    assert (summary.completed, summary.failed, summary.vetoed, summary.emails_failed) == (2, 2, 1, 1)
    assert summary.digest_queued and summary.exit_code == 1
    digest = digests(db)[0]
    assert (digest.to_address, digest.status, digest.run_id) == ("ops@example.test", EmailStatus.SENT, summary.run_id)
    assert digest.subject == "Cron Job Activity - run 1 - 2 cancelled, 2 need manual cancellation, 1 vetoed"
    text = digest.text_body
    for line in (
        "Due requests:                4", "Cancelled:                   2", "Vetoed by a hook:            1",
        "Failed for good:             2  <- MANUAL CANCELLATION REQUIRED",
        "Applied late (catch-up):     1 (up to 3 days late)", "  1 request(s) 3 day(s) late",
        f"- request {broken.id}, service {broken.service_id} (host",
        "client of service", "has no valid email address ('') [MANUAL CANCELLATION REQUIRED after 1 attempts]",
        f"- request {vetoed.id}, service {vetoed.service_id}",
        "vetoed by keep_vera (rules.py:2): balance due [MANUAL CANCELLATION REQUIRED after 1 attempts]",
        "Emails given up (not delivered):",
        "- email 1 (service_cancellation_confirmation) to x@example.test\nBcc: y@z: refused, never sent: "
        "recipient contains a line break (header injection)",
        "cancelproc emails retry --all-failed",
    ):
        assert line in text, f"{line!r} not in:\n{text}"
    assert f"request {late.id}," not in text and f"request {on_time.id}," not in text  # only those that did not go
    assert "MANUAL CANCELLATION REQUIRED" in digest.html_body and "<table" in digest.html_body
    assert (settings.app_root / "out" / f"{digest.id:08d}-{DIGEST}.eml").is_file()  # sent with the run


def test_daily_cron_job_pre_email_suppresses_it(db, settings, now, tmp_path):
    with db.session.begin() as s:
        factories.request(s, factories.service(s))
    registry = hooks(tmp_path, "@add_hook('DailyCronJobPreEmail')\ndef quiet_nights(summary):\n"
                               "    return summary['failed'] == 0\n")
    summary = run(db, staff_settings(settings), now, registry)
    assert (summary.digest_suppressed, summary.digest_queued, digests(db)) == (True, False, [])


def test_no_digest_without_a_staff_address_or_for_requests_process(db, settings, now):
    with db.session.begin() as s:
        rid = factories.request(s, factories.service(s)).id
        factories.request(s, factories.service(s))
    summary = run(db, staff_settings(settings), now, request_ids=[rid], digest=False)  # as `requests process`
    assert (summary.completed, summary.digest_queued, digests(db)) == (1, False, [])
    summary = run(db, staff_settings(settings, staff_address=""), now)
    assert (summary.completed, summary.digest_queued, digests(db)) == (1, False, [])


def test_a_digest_that_cannot_be_sent_stays_queued(db, settings, now, tmp_path):
    (tmp_path / "out").write_text("not a folder")  # the folder backend cannot write
    summary = run(db, staff_settings(settings), now)
    # The digest's own delivery is reported apart from the run's email counts (README, "Email counts").
    assert summary.digest_queued and not summary.digest_sent and summary.exit_code == 1
    assert "cannot write" in summary.digest_error and summary.delivery_error is None
    assert [d.status for d in digests(db)] == [EmailStatus.QUEUED]


def test_the_digest_gives_times_in_the_business_time_zone(db, settings, now):
    """now is 02:00 UTC on 2026-11-26: staff in Berlin read 03:00 CET, in both parts."""
    with db.session.begin() as s:
        factories.request(s, factories.service(s))
    berlin = staff_settings(settings).model_copy(update={"business_timezone": "Europe/Berlin"})
    run(db, berlin, now)
    digest = digests(db)[0]
    assert "Started 2026-11-26 03:00 CET, finished 2026-11-26 03:00 CET" in digest.text_body
    assert "Started 2026-11-26 03:00 CET" in digest.html_body
