"""Email templates at run time: the operator's folder first, and a broken template stops
`cancelproc run` before anything is touched (DESIGN.md guarantee 6)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from freezegun import freeze_time
from sqlalchemy import func, select

import processor
from processor.cli import cli
from processor.emails import DEFAULT_TEMPLATES, EmailTemplates, sample_fields
from processor.models import CancellationRequest, OutboxEmail, RequestStatus, Run
from tests import factories

NAME = "service_cancellation_confirmation.jinja"
# The merge fields DESIGN.md promises (WHMCS names), every one used by the override below.
WHMCS_FIELDS = ("client_name", "client_first_name", "service_product_name", "service_domain",
                "service_next_due_date", "service_status", "service_billing_cycle", "service_cancellation_type",
                "service_cancellation_reason", "service_is_immediate_cancellation", "company_name", "signature",
                "date")


@pytest.fixture
def run(db, settings, tmp_path, monkeypatch):
    """`cancelproc run` on one due request, with the operator's template folder tmp_path/mine."""
    with db.session.begin() as s:
        factories.request(s, factories.service(s, first_name="Grace"))
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    env = {k: None for k in os.environ if k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=settings.database_url, CANCELPROC_EMAIL__TEMPLATES_DIR=str(tmp_path / "mine"),
               CANCELPROC_LOG_FORMAT="console")  # the line a person reads

    def _run(template: str):
        (tmp_path / "mine" / NAME).write_text(template)
        with freeze_time(dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)):
            return CliRunner().invoke(cli, ["run"], env=env)
    return _run


def untouched(db) -> bool:
    with db.read_session() as s:
        return (s.scalar(select(func.count()).select_from(Run)) == 0
                and s.scalar(select(func.count()).select_from(OutboxEmail)) == 0
                and s.scalars(select(CancellationRequest.status)).all() == [RequestStatus.PENDING])


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('{% extends "default:' + NAME + '" %}\n{% block subject %}{{ oops }{% endblock %}',
         f"{NAME}:2: unexpected '}}'"),
        ('{% extends "default:' + NAME + '" %}\n{% block subject %}{{ no_such_field }}{% endblock %}',
         "'no_such_field' is undefined"),
        ('{% extends "default:' + NAME + '" %}\n{% block subject %}{{ "".__class__.__mro__ }}{% endblock %}',
         "unsafe"),
    ],
    ids=["syntax", "undefined-field", "sandbox"],
)
def test_a_broken_template_stops_the_run_before_anything_is_written(db, run, template, message):
    result = run(template)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output
    assert untouched(db)


def test_a_template_not_found_says_where_it_looked(db, run, tmp_path):
    result = run('{% extends "no_such_layout.jinja" %}')
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: email template no_such_layout.jinja not found "
                                     f"(looked in {tmp_path / 'mine'}, {DEFAULT_TEMPLATES})")
    assert DEFAULT_TEMPLATES.is_relative_to(Path(processor.__file__).parent)  # in the package, wherever installed
    assert untouched(db)


def test_an_override_extends_the_default_it_replaces_and_gets_every_merge_field(db, run):
    body = " ".join(f"{name}=[{{{{ {name} }}}}]" for name in WHMCS_FIELDS)
    result = run('{% extends "default:' + NAME + '" %}\n'
                 "{% block subject %}Cancelled: {{ service_domain }}{% endblock %}\n"
                 "{% block body_text %}" + body + "{% endblock %}")
    assert result.exit_code == 0, result.output
    with db.read_session() as s:
        email = s.scalars(select(OutboxEmail).where(OutboxEmail.template == NAME.removesuffix('.jinja'))).one()
    assert email.subject.startswith("Cancelled: host") and email.subject.endswith(".example.test")
    for name in WHMCS_FIELDS:
        assert f"{name}=[" in email.text_body
    assert "client_first_name=[Grace]" in email.text_body and "service_status=[Cancelled]" in email.text_body
    assert "date=[November 26, 2026]" in email.text_body
    assert "Dear Grace," in email.html_body  # the html block is still the default's


def test_a_template_edited_between_two_runs_of_one_process_is_compiled_anew(tmp_path):
    """Compiled templates are kept for the process (`schedule` runs night after night in
    one): an operator's template edited in between is what the next run renders."""
    folder = tmp_path / "templates"
    folder.mkdir()
    override = folder / "cancellation_request_withdrawn.jinja"
    fields = sample_fields("cancellation_request_withdrawn", "Example Hosting", "")
    for subject in ("First wording", "Second wording"):
        override.write_text('{% extends "default:cancellation_request_withdrawn.jinja" %}\n'
                            "{% block subject %}" + subject + "{% endblock %}")
        assert EmailTemplates(folder).render("cancellation_request_withdrawn", fields).subject == subject
