"""Reminders before a cancellation takes effect (issue 14, item 2): the run queues
`cancellation_reminder` reminder_days before a pending dated request's effective date,
exactly once per request and reminder, only the latest after missed nights, never after
a withdrawal; per product; the CancellationReminder hook; the dry run; over real SMTP."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from processor import cancellations
from processor.cli import cli
from processor.config import Settings
from processor.db import Database
from processor.emails import CANCELLATION_REMINDER, DEFAULT_TEMPLATES
from processor.hooks import HookImpl, HookRegistry
from processor.hooks.registry import check_signature
from processor.models import (
    CancellationRequest,
    EmailStatus,
    OutboxEmail,
    Product,
    RequestStatus,
    RequestType,
    Service,
)
from processor.outbox import withdraw_queued_emails
from processor.run import REMIND, Runner, RunOptions
from processor.run.reminders import reminder_due
from tests import factories
from tests.smtp_server import smtp_env, smtp_server

D = dt.date(2026, 11, 26)  # the first night of these tests
CREATED = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)  # long before any reminder day


def night(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(2, 0), tzinfo=dt.UTC)


def run(db: Database, settings: Settings, day: dt.date, hooks: HookRegistry | None = None) -> Any:
    return Runner(db, settings, clock=lambda: night(day), hooks=hooks).run(RunOptions(as_of=day))


def reminders(db: Database) -> list[tuple[str, EmailStatus]]:
    with db.read_session() as s:
        return [(e.key, e.status) for e in s.scalars(
            select(OutboxEmail).where(OutboxEmail.template == "cancellation_reminder").order_by(OutboxEmail.id))]


def request_on(db: Database, days_ahead: int, *, type_: RequestType = RequestType.END_OF_BILLING_PERIOD,
               created_at: dt.datetime = CREATED, product: str | None = None, language: str = "en") -> int:
    """A pending request taking effect `days_ahead` days after D; its id."""
    effective = D + dt.timedelta(days=days_ahead)
    with db.session.begin() as s:
        svc = factories.service(s, next_due_date=effective if type_ is RequestType.END_OF_BILLING_PERIOD
                                else D + dt.timedelta(days=60), first_name="Grace", language=language)
        if product is not None:
            s.get(Product, svc.product_id).name = product
        return factories.request(s, svc, type_=type_, created_at=created_at,
                                 cancel_on=effective if type_ is RequestType.ON_DATE else None).id


def key(request_id: int, days: int) -> str:
    return f"cancellation_reminder:request:{request_id}:{days}"


Q = EmailStatus.QUEUED


def registry(point: str, *fns: Any) -> HookRegistry:
    hooks = HookRegistry()
    for seq, fn in enumerate(fns):
        hooks.register(HookImpl(point, fn, 0, "test.py", 10 + seq, seq, check_signature(point, fn, 0, "test.py")))
    return hooks


# --- which reminder is due (no database) ---------------------------------------------------

@pytest.mark.parametrize(("days_left", "created_days_before", "expected"), [
    (8, 30, None),  # not yet
    (7, 30, 7), (6, 30, 7), (2, 30, 7),  # the 7-day one's day has come (and, missed nights, still the latest)
    (1, 30, 1),  # the 1-day one: never the 7-day one in a burst beside it
    (0, 30, None), (-3, 30, None),  # due or late: the cancellation itself is the email
    (3, 3, None),  # made 3 days before its date: the 7-day reminder's day came before it existed
    (1, 3, 1),
])
def test_the_reminder_due_is_the_latest_whose_day_came_while_the_request_existed(days_left, created_days_before,
                                                                                 expected):
    effective = D + dt.timedelta(days=days_left)
    created = effective - dt.timedelta(days=created_days_before)
    assert reminder_due([7, 1], effective, created, D) == expected
    assert reminder_due([], effective, created, D) is None


# --- the run -------------------------------------------------------------------------------

def test_each_reminder_once_across_runs_the_same_night_and_nights_after(db, settings):
    eobp = request_on(db, 7)
    on_date = request_on(db, 7, type_=RequestType.ON_DATE)
    immediate = request_on(db, 7, type_=RequestType.IMMEDIATE)  # due at once: cancelled, never reminded
    summary = run(db, settings, D)
    assert summary.reminders_queued == 2 and summary.exit_code == 0
    assert reminders(db) == [(key(eobp, 7), Q), (key(on_date, 7), Q)]
    assert run(db, settings, D).reminders_queued == 0  # the same night again
    for day in range(1, 6):  # 6..2 days left: the 7-day reminder is the latest due, already queued
        assert run(db, settings, D + dt.timedelta(days=day)).reminders_queued == 0
    assert run(db, settings, D + dt.timedelta(days=6)).reminders_queued == 2  # 1 day left
    assert run(db, settings, D + dt.timedelta(days=6)).reminders_queued == 0
    cancelled = run(db, settings, D + dt.timedelta(days=7))
    assert (cancelled.completed, cancelled.reminders_queued) == (2, 0)
    assert reminders(db) == [(key(eobp, 7), Q), (key(on_date, 7), Q), (key(eobp, 1), Q), (key(on_date, 1), Q)]
    with db.read_session() as s:
        assert s.get(CancellationRequest, immediate).status is RequestStatus.COMPLETED
        email = s.scalars(select(OutboxEmail).where(OutboxEmail.key == key(eobp, 7))).one()
    assert email.request_id == eobp and email.run_id == summary.run_id
    assert email.subject.startswith("Reminder: your service will be cancelled on December 3, 2026 - VPS 4GB")
    assert "Dear Grace," in email.text_body and "withdraw your cancellation request" in email.text_body
    assert f"(request #{eobp})" in email.text_body and "<strong>VPS 4GB</strong>" in email.html_body


def test_after_missed_nights_only_the_latest_reminder_is_sent(db, settings):
    rid = request_on(db, 8)
    assert run(db, settings, D).reminders_queued == 0  # 8 days ahead: none due yet
    # No run for six nights: the next one is 1 day ahead. Only the 1-day reminder.
    assert run(db, settings, D + dt.timedelta(days=7)).reminders_queued == 1
    assert reminders(db) == [(key(rid, 1), Q)]


def test_a_request_made_after_a_reminder_day_gets_only_the_later_ones(db, settings):
    rid = request_on(db, 3, created_at=night(D) - dt.timedelta(hours=5))  # made 3 days before its date
    assert run(db, settings, D).reminders_queued == 0
    assert run(db, settings, D + dt.timedelta(days=2)).reminders_queued == 1
    assert reminders(db) == [(key(rid, 1), Q)]


def test_no_reminder_after_a_withdrawal_and_a_queued_one_is_withdrawn(db, settings):
    withdrawn_first = request_on(db, 7)
    reminded = request_on(db, 7)
    with db.session.begin() as s:
        cancellations.withdraw_request(s, withdrawn_first, actor="staff", now=night(D))
    assert run(db, settings, D).reminders_queued == 1
    assert reminders(db) == [(key(reminded, 7), Q)]
    # Withdrawn (as `requests withdraw` does it) while its reminder waits to be sent: the
    # reminder is withdrawn with it.
    with db.session.begin() as s:
        cancellations.withdraw_request(s, reminded, actor="staff", now=night(D))
        withdraw_queued_emails(s, reminded, now=night(D), actor="staff")
    assert reminders(db) == [(key(reminded, 7), EmailStatus.WITHDRAWN)]
    assert run(db, settings, D + dt.timedelta(days=6)).reminders_queued == 0  # nor its 1-day reminder


def test_per_product_reminder_days_and_none(db, settings):
    settings = settings.model_copy(update={"reminder_days": [], "products": Settings(
        database_url=settings.database_url, products={"Managed Server": {"reminder_days": [14, 3]}}).products})
    plain = request_on(db, 7)  # top-level []: no reminders
    managed = request_on(db, 14, product="Managed Server")
    assert run(db, settings, D).reminders_queued == 1
    assert run(db, settings, D + dt.timedelta(days=11)).reminders_queued == 1  # 3 days left
    assert reminders(db) == [(key(managed, 14), Q), (key(managed, 3), Q)]
    assert plain not in {int(k.split(":")[2]) for k, _ in reminders(db)}
    # Every list empty: not even the candidate query runs.
    off = settings.model_copy(update={"products": {}})
    assert not Runner(db, off, clock=lambda: night(D)).reminders.enabled


def test_the_hook_adds_a_field_or_aborts(db, settings, tmp_path):
    kept = request_on(db, 7)
    aborted = request_on(db, 7)
    seen: list[tuple[int, int, int, str]] = []

    def hook(request_id, days, days_left, cancellation_date, fields, dry_run):
        seen.append((request_id, days, days_left, str(cancellation_date)))
        if request_id == aborted:
            return {"abortsend": True}
        return {"account_manager": "Ida"}

    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "cancellation_reminder.jinja").write_text(
        '{% extends "default:cancellation_reminder.jinja" %}'
        "{% block subject %}Reminder from {{ account_manager | default('us') }}{% endblock %}")
    settings = settings.model_copy(update={"email": settings.email.model_copy(update={"templates_dir": "templates"})})
    summary = run(db, settings, D, hooks=registry("CancellationReminder", hook))
    assert (summary.reminders_queued, summary.reminders_aborted, summary.reminders_failed) == (1, 1, 0)
    assert sorted(seen) == sorted([(kept, 7, 7, "2026-12-03"), (aborted, 7, 7, "2026-12-03")])
    with db.read_session() as s:
        assert s.scalars(select(OutboxEmail.subject).where(OutboxEmail.key == key(kept, 7))).one() == \
            "Reminder from Ida"
    assert reminders(db) == [(key(kept, 7), Q)]
    # Aborted: asked again the next night while the 7-day reminder is still the latest due.
    run(db, settings, D + dt.timedelta(days=1), hooks=registry("CancellationReminder", hook))
    assert [s[:2] for s in seen[2:]] == [(aborted, 7)]


def test_a_failing_hook_fails_that_reminder_alone(db, settings):
    request_on(db, 7)
    ok = request_on(db, 7)

    def hook(request_id):
        if request_id != ok:
            raise RuntimeError("CRM down")

    summary = run(db, settings, D, hooks=registry("CancellationReminder", hook))
    assert (summary.reminders_queued, summary.reminders_failed, summary.exit_code) == (1, 1, 0)
    assert reminders(db) == [(key(ok, 7), Q)]


def test_the_dry_run_shows_the_reminders_and_writes_nothing(db, settings):
    rid = request_on(db, 7, language="de")
    due = request_on(db, 0)
    runner = Runner(db, settings, clock=lambda: night(D))
    items = list(runner.preview(RunOptions(as_of=D)))
    assert [(i["request_id"], i["action"]) for i in items] == [(due, "cancel"), (rid, REMIND)]
    item = items[1]
    assert item["due_on"] == D + dt.timedelta(days=7) and item["email_to"].endswith("@example.test")
    assert item["detail"].startswith("7-day reminder (7 days left): Erinnerung: Ihr Dienst wird am 3. Dezember 2026")
    assert reminders(db) == []


def test_the_cli_dry_run_requests_show_and_delivery_over_smtp(db, settings, tmp_path, monkeypatch):
    """What the operator runs: `run --dry-run`, `run` sending over a real SMTP server, then
    `requests show` and `runs show` of it."""
    rid = request_on(db, 7)
    monkeypatch.chdir(tmp_path)
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=settings.database_url, CANCELPROC_EMAIL__STAFF_ADDRESS="")

    def cancelproc(*args: str, **more: str) -> Any:
        return CliRunner().invoke(cli, list(args), env={**env, **more})

    dry = cancelproc("run", "--dry-run", "--as-of", str(D))
    assert dry.exit_code == 0, dry.output
    assert "0 to cancel, 0 no-op, 0 vetoed, 0 would fail, 1 reminders to queue; nothing was changed" in dry.output
    assert "remind" in dry.output
    dry_json = json.loads(cancelproc("run", "--dry-run", "--json", "--as-of", str(D)).stdout)
    assert dry_json["summary"][REMIND] == 1 and dry_json["requests"][0]["action"] == REMIND
    with smtp_server(tmp_path) as server:
        done = cancelproc("run", "--as-of", str(D), "--json", **smtp_env(server.port))
        assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert (summary["reminders_queued"], summary["emails_sent"]) == (1, 1)
    with db.read_session() as s:
        domain = s.get(CancellationRequest, rid).service.domain
    assert [r.message["Subject"] for r in server.received] == [
        f"Reminder: your service will be cancelled on December 3, 2026 - VPS 4GB ({domain})"]
    body = server.received[0].message.get_body(("plain",)).get_content()
    assert "will be cancelled on December 3, 2026" in body and "To keep the service, contact our support" in body
    shown = cancelproc("requests", "show", str(rid))
    assert shown.exit_code == 0 and "cancellation_reminder" in shown.output and "sent" in shown.output
    runs = json.loads(cancelproc("runs", "show", str(summary["run_id"]), "--json").stdout)
    assert runs["reminders_queued"] == 1
    preview = cancelproc("emails", "preview", "cancellation_reminder", "--request", str(rid))
    assert preview.exit_code == 0 and "will be cancelled on December 3, 2026" in preview.output


def test_a_reminder_follows_the_stored_date_and_stays_pending_only(db, settings):
    """The reminder counts to the stored effective date (what the client was told when the
    request was made): a renewal of the service does not move it; a new stored date (an
    import changing the request's date recomputes it) does; a request no longer pending gets
    none."""
    rid = request_on(db, 7)
    with db.session.begin() as s:
        s.execute(update(Service).where(Service.id == s.get(CancellationRequest, rid).service_id)
                  .values(next_due_date=D + dt.timedelta(days=30)))
    assert run(db, settings, D).reminders_queued == 1  # still 7 days ahead: the stored date
    moved = request_on(db, 7)
    with db.session.begin() as s:
        s.get(CancellationRequest, moved).effective_date = D + dt.timedelta(days=30)
        s.get(CancellationRequest, rid).status = RequestStatus.WITHDRAWN
    assert run(db, settings, D + dt.timedelta(days=1)).reminders_queued == 0
    assert run(db, settings, D + dt.timedelta(days=23)).reminders_queued == 1
    assert reminders(db) == [(key(rid, 7), Q), (key(moved, 7), Q)]


def test_templates_ship_in_every_language() -> None:
    shipped = Path(str(DEFAULT_TEMPLATES))
    for language in ("", "de", "fr", "es", "nl"):
        assert (shipped / language / f"{CANCELLATION_REMINDER}.jinja").is_file()
