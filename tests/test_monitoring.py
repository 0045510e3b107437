"""`cancelproc status` for each unhealthy condition, and the Prometheus metrics file."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from freezegun import freeze_time
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from processor.db import Database
from processor.models import CancellationRequest, EmailStatus, Lease, OutboxEmail, RequestStatus, Run, RunStatus
from tests import factories
from tests.cli_helpers import as_json, ok

NIGHT = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


def seed(db: Database, n: int = 2) -> None:
    with db.session.begin() as s:
        for _ in range(n):
            factories.request(s, factories.service(s))


def status(invoke, when: dt.datetime = NIGHT, *args: str):
    with freeze_time(when):
        return invoke("status", *args)


def problems(result) -> list[str]:
    return [line.removeprefix("problem: ") for line in result.stderr.splitlines() if line.startswith("problem: ")]


def test_healthy_after_a_run_and_the_metrics_file_parses(invoke, db, tmp_path):
    seed(db, 3)
    with freeze_time(NIGHT):
        ok(invoke("run", env={"CANCELPROC_METRICS_FILE": "metrics/cancelproc.prom"}))
    result = ok(status(invoke, NIGHT + dt.timedelta(hours=1)))
    assert "health                  OK" in result.stdout and problems(result) == []
    text = (tmp_path / "metrics" / "cancelproc.prom").read_text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("cancelproc_last_run_id", ())] == 1
    assert samples[("cancelproc_last_run_requests", (("outcome", "completed"),))] == 3
    assert samples[("cancelproc_last_run_emails", (("outcome", "sent"),))] == 3
    assert samples[("cancelproc_last_success_timestamp_seconds", ())] == NIGHT.timestamp()
    assert samples[("cancelproc_requests", (("status", "pending"),))] == 0
    assert samples[("cancelproc_emails", (("status", "queued"),))] == 0
    assert samples[("cancelproc_last_run_error", ())] == 0 and samples[("cancelproc_problems", ())] == 0
    assert samples[("cancelproc_last_run_duration_seconds", ())] >= 0
    assert not list((tmp_path / "metrics").glob("*.tmp*"))  # written atomically: no temp file left


def test_no_run_yet_and_a_due_request_waiting(invoke, db):
    seed(db, 1)
    result = ok(status(invoke), code=1)
    assert problems(result) == ["no scheduled run (cron or schedule) has completed yet: "
                                "is `cancelproc run` in the crontab?"]
    health = as_json(status(invoke, NIGHT, "--json"), code=1)
    assert (health["healthy"], health["requests_due"], health["requests_pending"]) == (False, 1, 1)
    assert health["oldest_due_request_age_seconds"] == 2 * 3600  # due since midnight of its next due date


def test_the_last_successful_run_is_too_old(invoke, db):
    with freeze_time(NIGHT):
        ok(invoke("run"))
    assert ok(status(invoke, NIGHT + dt.timedelta(hours=25))).exit_code == 0
    late = ok(status(invoke, NIGHT + dt.timedelta(hours=30)), code=1)
    assert problems(late) == ["the last successful scheduled run (1, cron) finished 30.0 hours ago (more than 26): "
                              "is cron running it?"]
    assert ok(status(invoke, NIGHT + dt.timedelta(hours=30), "--max-age-hours", "48")).exit_code == 0


def test_failed_requests_failed_emails_an_error_run_and_a_stale_lease_each_say_so(invoke, db):
    seed(db, 2)
    with freeze_time(NIGHT):
        ok(invoke("run"))
    with db.engine.begin() as conn:
        conn.execute(update(CancellationRequest).where(CancellationRequest.id == 1).values(status=RequestStatus.FAILED))
        conn.execute(update(OutboxEmail).where(OutboxEmail.id == 1).values(status=EmailStatus.FAILED))
    with db.session.begin() as s:  # a later run that died holding its lease, then one that hit an error
        dead = Run(trigger="cron", operator="", as_of=NIGHT.date(), host="billing1", pid=4242,
                   status=RunStatus.RUNNING, started_at=NIGHT + dt.timedelta(hours=1))
        s.add(dead)
        s.flush()
        s.add(Lease(name="nightly-run", run_id=dead.id, host="billing1", pid=4242, acquired_at=dead.started_at,
                    expires_at=dead.started_at + dt.timedelta(minutes=10)))
        s.add(Run(trigger="cron", operator="", as_of=NIGHT.date(), host="billing1", pid=4243,
                  status=RunStatus.ERROR, started_at=NIGHT + dt.timedelta(hours=2),
                  finished_at=NIGHT + dt.timedelta(hours=2), error="database error: disk I/O error"))
    result = ok(status(invoke, NIGHT + dt.timedelta(hours=3)), code=1)
    assert problems(result) == [
        "the last run (3) ended error: database error: disk I/O error",
        "1 request(s) need a manual cancellation: cancelproc requests list --status failed",
        "1 email(s) failed: cancelproc emails list --status failed",
        "run 2 on host billing1 (pid 4242) stopped renewing its lease at 2026-11-26 03:10 UTC: it died or hangs "
        "(the next run takes over)",
    ]
    assert "leases                  nightly-run: run 2 on billing1 pid 4242 (STALE)" in result.stdout


def test_a_metrics_file_that_cannot_be_written_does_not_fail_the_run(invoke, db, tmp_path: Path):
    seed(db, 1)
    (tmp_path / "blocked").write_text("a file, not a folder")
    with freeze_time(NIGHT):
        result = ok(invoke("run", env={"CANCELPROC_METRICS_FILE": "blocked/cancelproc.prom"}))
    assert "metrics file not written" in result.stderr


def test_emails_stuck_in_the_outbox_say_so(invoke, db):
    """Delivery broken for a day (a relay down, the outbox folder unwritable): the runs still
    succeed and the digest cannot get out, so `status` must say it."""
    seed(db, 2)
    with freeze_time(NIGHT):
        ok(invoke("run", env={"CANCELPROC_EMAIL__OUTBOX_DIR": "/dev/null/outbox"}), code=1)
        run = as_json(invoke("runs", "show", "1", "--json"))
    assert run["error"] == "email delivery stopped: folder /dev/null/outbox: cannot write: Not a directory"
    with freeze_time(NIGHT + dt.timedelta(hours=25)):
        ok(invoke("run", env={"CANCELPROC_EMAIL__SEND_AFTER_RUN": "false"}))  # a later run that succeeds
    assert problems(ok(status(invoke, NIGHT + dt.timedelta(hours=25)))) == []
    stuck = ok(status(invoke, NIGHT + dt.timedelta(hours=27)), code=1)
    # Delivery stopped at the first confirmation (tried, waiting out a backoff); the other
    # and both digests were never tried.
    assert problems(stuck) == ["3 queued email(s) never tried, the oldest queued 27.0 hours ago (more than 26): "
                               "is delivery working? cancelproc emails send"]


def test_an_email_that_is_tried_and_waits_out_its_backoff_is_no_problem(invoke, db):
    """A greylisting recipient: tried, refused for now, tried again later. Not a broken
    delivery, however long it takes (it ends sent, or failed and then named)."""
    seed(db, 1)
    with freeze_time(NIGHT):
        ok(invoke("run", env={"CANCELPROC_EMAIL__SEND_AFTER_RUN": "false"}))
    with db.engine.begin() as conn:
        conn.execute(update(OutboxEmail).values(attempts=4, next_attempt_at=NIGHT + dt.timedelta(hours=40),
                                                last_error="recipient refused: 450 greylisted"))
    with freeze_time(NIGHT + dt.timedelta(hours=25)):
        ok(invoke("run", env={"CANCELPROC_EMAIL__SEND_AFTER_RUN": "false"}))
        ok(invoke("emails", "send"))  # the new digest goes; the greylisted one waits its turn
    health = as_json(status(invoke, NIGHT + dt.timedelta(hours=30), "--json"))
    # The first night's confirmation and digest, both tried and waiting; the second digest went.
    assert (health["healthy"], health["emails_queued"], health["emails_untried"]) == (True, 2, 0)


WAITING_HOOKS = """\
from processor.hooks import add_hook


@add_hook("PreModuleTerminate")
def hold_service_1(service):
    if service["id"] == 1:
        return {"abortcmd": True, "reason": "on hold"}


@add_hook("TerminateAccount")
def provisioning_down_for_service_2(service):
    if service["id"] == 2:
        return {"error": "provisioning API unreachable"}
"""


def test_requests_waiting_out_a_veto_or_a_backoff_are_not_due_now(invoke, db, tmp_path):
    """One rule of "due now" for the run, the dry run, `status` and the metrics: a request
    vetoed, or failed and backing off, waits for its next attempt time."""
    seed(db, 3)
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "waiting.py").write_text(WAITING_HOOKS)
    with freeze_time(NIGHT):
        summary = as_json(invoke("run", "--json", env={"CANCELPROC_METRICS_FILE": "var/cancelproc.prom"}), code=1)
    assert (summary["vetoed"], summary["retrying"], summary["completed"]) == (1, 1, 1)
    later = NIGHT + dt.timedelta(minutes=30)  # before either's next attempt time
    health = as_json(status(invoke, later, "--json"))
    assert (health["requests_pending"], health["requests_due"]) == (2, 0)
    assert health["oldest_due_request_age_seconds"] is None
    with freeze_time(later):
        assert "nothing is due" in ok(invoke("run", "--dry-run")).stdout
    assert "2 (0 due now" in ok(status(invoke, later)).stdout
    with freeze_time(later):
        assert as_json(invoke("requests", "show", 1, "--json"))["due_now"] is False
    text = (tmp_path / "var" / "cancelproc.prom").read_text()
    due_metric = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "cancelproc_requests_due"]
    assert due_metric == [0]
    # A new request is due at once: status and the dry run agree on it too.
    seed(db, 1)
    assert as_json(status(invoke, later, "--json"))["requests_due"] == 1
    with freeze_time(later):
        assert "1 to cancel, 0 no-op, 0 vetoed, 0 would fail" in ok(invoke("run", "--dry-run")).stdout


def test_a_manual_run_does_not_keep_a_dead_nightly_job_green(invoke, db, tmp_path):
    """Cron stopped two days ago; staff ran `run` by hand and `requests process` today. The
    nightly job is still reported stale, naming its last run; the metrics say the same."""
    seed(db, 2)
    with freeze_time(NIGHT):
        ok(invoke("run", "--limit", "1"))  # not on a terminal: trigger cron
    today = NIGHT + dt.timedelta(days=2)
    with freeze_time(today):
        ok(invoke("run", "--trigger", "manual", env={"CANCELPROC_METRICS_FILE": "var/cancelproc.prom"}))
        seed(db, 1)
        ok(invoke("requests", "process", "3"))
    result = ok(status(invoke, today + dt.timedelta(minutes=5)), code=1)
    assert problems(result) == ["the last successful scheduled run (1, cron) finished 48.1 hours ago (more than 26): "
                                "is cron running it?"]
    assert "last scheduled run      1 cron completed" in result.stdout
    assert "last run                3 manual completed" in result.stdout
    health = as_json(status(invoke, today + dt.timedelta(minutes=5), "--json"), code=1)
    assert (health["last_successful_scheduled_run"]["id"], health["last_successful_run"]["id"]) == (1, 3)
    text = (tmp_path / "var" / "cancelproc.prom").read_text()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["cancelproc_last_success_timestamp_seconds"] == NIGHT.timestamp()  # the cron run, not the manual
    assert samples["cancelproc_problems"] == 1
    # A scheduled run that ended in error is named too.
    with db.session.begin() as s:
        s.add(Run(trigger="schedule", operator="", as_of=today.date(), host="billing1", pid=4243,
                  status=RunStatus.ERROR, started_at=today + dt.timedelta(minutes=6),
                  finished_at=today + dt.timedelta(minutes=6), error="database error: disk I/O error"))
    stale = problems(ok(status(invoke, today + dt.timedelta(minutes=7)), code=1))
    assert stale[0] == ("the last successful scheduled run (1, cron) finished 48.1 hours ago (more than 26); "
                        "the last scheduled run, 4, ended error: is cron running it?")
