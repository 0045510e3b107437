"""The emails at the CLI: queued with the change they report, per language, previewed,
listed, shown, retried; templates checked before anything is touched; the sandbox holds."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from collections.abc import Iterator
from pathlib import Path

import pytest
from freezegun import freeze_time
from sqlalchemy import select, update

from processor.db import Database
from processor.models import AuditEntry, CancellationRequest, EmailStatus, OutboxEmail, Run
from tests import factories
from tests.cli_helpers import as_json, ok, one_line_error

CLIENT = "cancellation_request_confirmation"
STAFF = "new_cancellation_request"
DONE = "service_cancellation_confirmation"
DIGEST = "cron_job_activity"


@pytest.fixture(autouse=True)
def frozen() -> Iterator[None]:
    """2026-11-26T02:00Z: the dates in the emails are known."""
    with freeze_time(dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)):
        yield


def outbox(db: Database) -> list[OutboxEmail]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)))


def hook_file(tmp_path: Path, source: str) -> None:
    (tmp_path / "hooks").mkdir(exist_ok=True)
    (tmp_path / "hooks" / "mail.py").write_text("from processor.hooks import add_hook\n" + source)


# Emails queued by `requests create` and left for `emails send` (the command sends them by default).
NOT_SENT_AT_ONCE = {"CANCELPROC_EMAIL__SEND_AFTER_CREATE": "false"}


@pytest.fixture
def service(db: Database) -> int:
    with db.session.begin() as s:
        return factories.service(s, first_name="Grace", next_due_date=None).id


# --- queued when a request is made --------------------------------------------------------------

def test_creating_a_request_queues_the_client_confirmation_and_the_staff_notice(invoke, db, service):
    row = as_json(invoke("requests", "create", service, "--reason-code", "too_expensive", "--reason",
                         "Cheaper <elsewhere>", "--json"))
    client, staff = outbox(db)
    # Queued with the request, then sent by the command itself (email.send_after_create).
    assert (client.template, client.key, client.request_id, client.status) == (
        CLIENT, f"{CLIENT}:request:{row['id']}", row["id"], EmailStatus.SENT)
    assert (row["emails_sent"], row["emails_not_sent"], staff.status) == (2, None, EmailStatus.SENT)
    assert client.to_address.endswith("@example.test") and staff.to_address == "support@example.test"
    assert client.subject.startswith("Cancellation Request Confirmation - VPS 4GB (host")
    assert "Dear Grace," in client.text_body and "Reason given: Cheaper <elsewhere>" in client.text_body
    assert "Cheaper &lt;elsewhere&gt;" in client.html_body  # autoescaped in HTML only
    assert staff.template == STAFF and staff.subject.startswith("New Cancellation Request - Grace Client")
    assert f"cancelproc requests withdraw {row['id']}" in staff.text_body
    assert row["emails_not_queued"] == []


def test_a_client_in_german_gets_german_templates_and_dates(invoke, db):
    with db.session.begin() as s:
        sid = factories.service(s, first_name="Hans", language="de-AT").id  # falls back from de_at to de
    ok(invoke("requests", "create", sid, "--reason-code", "other"))
    client, staff = outbox(db)
    assert client.subject.startswith("Eingang Ihrer Kündigung") and "Hallo Hans," in client.text_body
    assert "am 26. November 2026 gekündigt" in client.text_body  # the service's next due date, in German
    assert staff.subject.startswith("New Cancellation Request")  # staff read the default language


def test_a_client_address_that_would_inject_headers_is_refused_and_recorded(invoke, db):
    with db.session.begin() as s:
        sid = factories.service(s, email="grace@example.test\nBcc: all@example.test").id
    result = ok(invoke("requests", "create", sid, "--reason-code", "other"))
    assert "warning: cancellation_request_confirmation to 'grace@example.test\\nBcc: all@example.test' refused: " \
           "recipient contains a line break" in result.stderr
    assert [e.template for e in outbox(db)] == [STAFF]  # the request stands; staff still hear of it
    with db.read_session() as s:
        audit = s.scalars(select(AuditEntry).where(AuditEntry.entity == "email")).one()
    assert audit.action == "refused" and "line break" in audit.detail


def test_email_pre_send_abort_at_request_time_is_recorded(invoke, db, service, tmp_path):
    hook_file(tmp_path, "@add_hook('EmailPreSend')\n"
                        "def quiet(template):\n"
                        "    return {'abortsend': template == 'new_cancellation_request'}\n")
    ok(invoke("requests", "create", service, "--reason-code", "other"))
    assert [e.template for e in outbox(db)] == [CLIENT]
    with db.read_session() as s:
        audit = s.scalars(select(AuditEntry).where(AuditEntry.entity == "email")).one()
    assert (audit.action, audit.detail) == ("aborted", f"{STAFF} not queued: abortsend from quiet (mail.py:2)")


def test_an_email_pre_send_hook_that_raises_at_request_time_records_nothing(invoke, db, service, tmp_path):
    hook_file(tmp_path, "@add_hook('EmailPreSend')\ndef broken(fields):\n    raise RuntimeError('CRM down')\n")
    one_line_error(invoke("requests", "create", service, "--reason-code", "other"),
                   "request not created: EmailPreSend hook broken (mail.py:2): RuntimeError: CRM down")
    with db.read_session() as s:
        assert s.scalars(select(CancellationRequest)).all() == []
    assert outbox(db) == []


# --- templates checked first; the sandbox -------------------------------------------------------

@pytest.mark.parametrize("name", [CLIENT, STAFF, DONE, DIGEST, f"de/{DONE}", f"pt_br/{CLIENT}"])
@pytest.mark.parametrize(("body", "message"), [
    ("{{ oops }", "unexpected '}'"),
    ("{{ no_such_field }}", "'no_such_field' is undefined"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ cycler.__init__.__globals__.os }}", "unsafe"),
    ("{{ self.__init__.__globals__ }}", "unsafe"),
    ("{{ 'x' * 1000000000 }}", "'*' would build a sequence longer than 100000"),
    ("{{ range(1000000000)|list }}", "OverflowError: Range too big"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ('{% include "../../../../../etc/passwd" %}', "../../../../../etc/passwd"),
])
def test_any_broken_template_stops_the_run_before_anything_is_written(invoke, db, service, tmp_path, name, body,
                                                                      message):
    with db.session.begin() as s:
        factories.request(s, s.get(factories.Service, service))
    mine = tmp_path / "mine"
    (mine / name).parent.mkdir(parents=True, exist_ok=True)
    (mine / f"{name}.jinja").write_text('{% extends "_layout.jinja" %}\n'
                                        "{% block subject %}" + body + "{% endblock %}")
    line = one_line_error(invoke("run", env={"CANCELPROC_EMAIL__TEMPLATES_DIR": str(mine)}), message)
    assert f"{name}.jinja:2: " in line  # the file and the line of the subject block
    with db.read_session() as s:
        assert s.scalars(select(Run)).all() == [] and s.scalar(select(CancellationRequest.status)).value == "pending"
    assert outbox(db) == []


def test_an_operator_language_override_wins_over_the_shipped_one(invoke, db, tmp_path):
    with db.session.begin() as s:
        sid = factories.service(s, language="de").id
    (tmp_path / "mine" / "de").mkdir(parents=True)
    (tmp_path / "mine" / "de" / f"{CLIENT}.jinja").write_text(
        '{% extends "default:de/' + CLIENT + '.jinja" %}{% block subject %}Unsere Bestätigung{% endblock %}')
    ok(invoke("requests", "create", sid, "--reason-code", "other", env={"CANCELPROC_EMAIL__TEMPLATES_DIR": "mine"}))
    client = outbox(db)[0]
    assert client.subject == "Unsere Bestätigung" and "Hallo Ada," in client.text_body  # the rest: shipped German


# --- the emails commands ------------------------------------------------------------------------

def test_preview_renders_each_template_with_real_data_and_writes_nothing(invoke, db, service):
    rid = as_json(invoke("requests", "create", service, "--reason-code", "other", "--json"))["id"]
    before = [(e.id, e.status) for e in outbox(db)]
    for template, words in ((CLIENT, "We have received your request"), (STAFF, "A new cancellation request"),
                            (DONE, "has been cancelled on November 26, 2026")):
        out = ok(invoke("emails", "preview", template, "--request", rid)).stdout
        assert out.startswith("To: ") and words in out, out
    german = as_json(invoke("emails", "preview", DONE, "--request", rid, "--language", "de", "--json"))
    assert german["subject"].startswith("Bestätigung der Kündigung") and german["file"] == f"de/{DONE}.jinja"
    assert "<p>Dear Grace,</p>" in ok(invoke("emails", "preview", DONE, "--request", rid, "--html")).stdout
    ok(invoke("requests", "process", rid, "--now"))
    digest = ok(invoke("emails", "preview", DIGEST, "--run", 1)).stdout
    assert "Subject: Cron Job Activity - run 1 - 1 cancelled" in digest and "Cancelled:                   1" in digest
    assert [(e.id, e.status) for e in outbox(db)][:2] == [(i, EmailStatus.SENT) for i, _ in before]  # sent by process


@pytest.mark.parametrize(("args", "fragments"), [
    (["emails", "preview", DONE], ["needs --request REQUEST_ID"]),
    (["emails", "preview", DIGEST, "--request", "1"], ["needs --run RUN_ID"]),
    (["emails", "preview", DONE, "--request", "99"], ["request 99 not found"]),
    (["emails", "preview", DIGEST, "--run", "99"], ["run 99 not found"]),
    (["emails", "preview", "welcome_email", "--request", "1"], ["'welcome_email' is not one of"]),
    (["emails", "show", "99"], ["email 99 not found"]),
    (["emails", "retry"], ["give EMAIL_IDS or --all-failed"]),
    (["emails", "retry", "99"], ["email 99 not found"]),
])
def test_emails_commands_reject_bad_input_in_one_line(invoke, db, service, args, fragments):
    one_line_error(invoke(*args), *fragments)


def test_list_show_send_and_retry(invoke, db, service, tmp_path):
    rid = as_json(invoke("requests", "create", service, "--reason-code", "other", "--json",
                         env=NOT_SENT_AT_ONCE))["id"]
    rows = as_json(invoke("emails", "list", "--json"))["rows"]
    assert [(r["template"], r["status"]) for r in rows] == [(STAFF, "queued"), (CLIENT, "queued")]
    assert "cancellation_request_confirmation" in ok(invoke("emails", "list", "--request", rid)).stdout
    shown = ok(invoke("emails", "show", 1)).stdout
    assert "Dear Grace," in shown and "message_id" in shown
    raw = email.message_from_string(ok(invoke("emails", "show", 1, "--raw")).stdout, policy=email.policy.default)
    assert raw["Message-ID"] == rows[1]["message_id"] and raw.get_content_type() == "multipart/alternative"
    one_line_error(invoke("emails", "retry", 1), "email 1 is queued; only a failed email can be retried")
    sent = as_json(invoke("emails", "send", "--json"))
    assert (sent["sent"], sent["queued"], sent["stopped"]) == (2, 0, None)
    assert sorted(p.name for p in (tmp_path / "var" / "outbox").iterdir()) == [
        f"00000001-{CLIENT}.eml", f"00000002-{STAFF}.eml"]
    with db.engine.begin() as conn:  # as after max_attempts failed sends
        conn.execute(update(OutboxEmail).values(status=EmailStatus.FAILED, attempts=10, last_error="550 gone"))
    assert [r["id"] for r in as_json(invoke("emails", "list", "--status", "failed", "--json"))["rows"]] == [2, 1]
    assert "2 email(s) queued again" in ok(invoke("emails", "retry", "--all-failed")).stdout
    assert [(e.status, e.attempts) for e in outbox(db)] == [(EmailStatus.QUEUED, 0)] * 2
    with db.read_session() as s:
        assert [a.action for a in s.scalars(select(AuditEntry).where(AuditEntry.entity == "email"))] == ["retry"] * 2
    assert "2 sent, 0 will be retried, 0 failed for good, 0 still queued" in ok(invoke("emails", "send")).stdout


def test_send_exits_1_and_says_why_when_delivery_stops(invoke, db, service, tmp_path):
    ok(invoke("requests", "create", service, "--reason-code", "other", env=NOT_SENT_AT_ONCE))
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "outbox").write_text("not a folder")
    result = ok(invoke("emails", "send"), code=1)
    assert "0 sent, 1 will be retried" in result.stdout
    assert result.stderr.splitlines()[-1].startswith(  # after the log lines
        f"error: delivery stopped: folder {tmp_path / 'var' / 'outbox'}: cannot write")


def test_a_template_that_loops_without_end_is_refused_at_start(tmp_path):
    from processor.emails import EmailTemplates, TemplateProblem, sample_fields

    (tmp_path / f"{DONE}.jinja").write_text(
        '{% extends "default:' + DONE + '.jinja" %}{% block subject %}'
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endblock %}")
    templates = EmailTemplates(tmp_path, check_seconds=0.5)
    with pytest.raises(TemplateProblem,
                       match=f"email template {DONE}.jinja used more than 0.5 s of CPU time to render once"):
        templates.check(DONE, sample_fields(DONE, "Example", "Team"))


def test_the_render_limit_counts_cpu_time_not_waiting():
    """A busy machine (or valgrind) makes a render wait, not work: waiting is not counted,
    so the nightly run is not failed for the load beside it."""
    import time

    from processor.emails import TemplateProblem, _time_limit

    with _time_limit(0.05, "waiting"):
        time.sleep(0.3)  # six times the limit on the clock, no CPU time
    with pytest.raises(TemplateProblem, match="working used more than 0.05 s of CPU time"), \
            _time_limit(0.05, "working"):
        while True:
            pass


def test_a_template_that_loops_without_end_stops_requests_create_in_one_line(invoke, db, service, tmp_path):
    """`requests create` renders its two emails itself: their templates get the same
    start-time check as a run's (5 s), so the command ends with one line instead of hanging."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / f"{CLIENT}.jinja").write_text(
        '{% extends "default:' + CLIENT + '.jinja" %}{% block subject %}'
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endblock %}")
    result = invoke("requests", "create", service, "--reason-code", "other",
                    env={"CANCELPROC_EMAIL__TEMPLATES_DIR": str(mine)})
    one_line_error(result, f"email template {CLIENT}.jinja used more than 5 s of CPU time to render once: "
                           "a loop without end?")
    with db.read_session() as s:
        assert s.scalars(select(CancellationRequest)).all() == []  # no request without its confirmation
    assert outbox(db) == []
