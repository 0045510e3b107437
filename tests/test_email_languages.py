"""WHMCS's merge fields and the shipped languages: an email is written in one language
throughout (text, dates, cancellation type, amount, signature), and a template written
for WHMCS's fields renders under StrictUndefined."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import pytest
from freezegun import freeze_time
from sqlalchemy import select, update

from processor.db import Database
from processor.models import OutboxEmail, Service
from tests import factories
from tests.cli_helpers import ok

CLIENT = "cancellation_request_confirmation"
SIGNATURES = json.dumps({"de": "Ihr Abrechnungsteam", "fr": "Le service facturation", "es": "El equipo de facturación",
                         "nl": "Het facturatieteam"})


@pytest.fixture(autouse=True)
def frozen() -> Iterator[None]:
    with freeze_time(dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)):
        yield


def emails(db: Database) -> list[OutboxEmail]:
    with db.read_session() as s:
        return list(s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)))


# language: (subject start, the End of Billing Period type, the next due date 2026-11-26, the signature)
SHIPPED = {
    "de": ("Eingang Ihrer Kündigung", "Zum Ende des Abrechnungszeitraums", "26. November 2026", "Ihr Abrechnungsteam"),
    "fr": ("Confirmation de votre demande de résiliation", "À la fin de la période de facturation",
           "26 novembre 2026", "Le service facturation"),
    "es": ("Confirmación de su solicitud de cancelación", "Al final del período de facturación",
           "26 de noviembre de 2026", "El equipo de facturación"),
    "nl": ("Bevestiging van uw opzeggingsverzoek", "Aan het einde van de factuurperiode", "26 november 2026",
           "Het facturatieteam"),
}


@pytest.mark.parametrize("language", sorted(SHIPPED))
def test_each_shipped_language_writes_the_whole_email_in_it(invoke, db, language):
    """Today's German email said `Art der Kündigung: Immediate` and ended with the English
    signature: now the type and the signature are the language's too; the staff copy stays English."""
    subject, type_name, due, signature = SHIPPED[language]
    with db.session.begin() as s:
        sid = factories.service(s, first_name="Kim", language=f"{language}-XX").id  # a region we do not have
    ok(invoke("requests", "create", sid, "--reason-code", "other", "--reason", "",
              env={"CANCELPROC_EMAIL__SIGNATURES": SIGNATURES}))
    client, staff = emails(db)
    assert client.subject.startswith(subject), client.subject
    for part in (client.text_body, client.html_body):
        assert type_name in part and due in part and signature in part
        assert "End of Billing Period" not in part and "Example Hosting Billing Team" not in part
    assert staff.subject.startswith("New Cancellation Request")
    assert "End of Billing Period" in staff.text_body and "on November 26, 2026" in staff.text_body
    assert "Example Hosting Billing Team" in staff.text_body


def test_the_default_signature_comes_in_the_clients_language_and_an_operators_own_stays_theirs(invoke, db):
    """With the shipped config a German email ends with the German default signature; a
    signature the operator wrote is never replaced by a translation of the default."""
    with db.session.begin() as s:
        first = factories.service(s, first_name="Jonas", language="de").id
        second = factories.service(s, first_name="Lena", language="de").id
    ok(invoke("requests", "create", first, "--reason-code", "other"))
    ok(invoke("requests", "create", second, "--reason-code", "other",
              env={"CANCELPROC_EMAIL__SIGNATURE": "Acme Billing"}))
    default_de, staff, own, _ = emails(db)
    assert default_de.text_body.endswith("Ihr Abrechnungsteam von Example Hosting\nExample Hosting")
    assert "Example Hosting Billing Team" in staff.text_body  # the staff copy: English
    assert own.text_body.endswith("Acme Billing\nExample Hosting") and "Abrechnungsteam" not in own.text_body


def test_a_language_we_do_not_ship_gets_english_text_and_english_dates(invoke, db):
    with db.session.begin() as s:
        sid = factories.service(s, first_name="Yuki", language="ja").id
    ok(invoke("requests", "create", sid, "--reason-code", "other",
              env={"CANCELPROC_EMAIL__SIGNATURES": json.dumps({"ja": "請求チーム"})}))
    client = emails(db)[0]
    assert "Dear Yuki," in client.text_body and "on November 26, 2026" in client.text_body
    assert "End of Billing Period" in client.text_body and "Example Hosting Billing Team" in client.text_body
    assert "2026年" not in client.text_body and "請求チーム" not in client.text_body


def test_an_english_variant_keeps_its_date_format(invoke, db):
    with db.session.begin() as s:
        sid = factories.service(s, first_name="Ian", language="en_GB").id
    ok(invoke("requests", "create", sid, "--reason-code", "other"))
    assert "on 26 November 2026" in emails(db)[0].text_body


def test_an_operator_template_in_another_language_gets_its_dates_and_signature(invoke, db, tmp_path):
    (tmp_path / "mine" / "ja").mkdir(parents=True)
    (tmp_path / "mine" / "ja" / f"{CLIENT}.jinja").write_text(
        '{% extends "_layout.jinja" %}{% block subject %}解約のお知らせ{% endblock %}'
        "{% block body_text %}{{ service_cancellation_date }} {{ service_cancellation_type_name }}{% endblock %}"
        "{% block body_html %}{{ service_cancellation_date }}{% endblock %}", encoding="utf-8")
    with db.session.begin() as s:
        sid = factories.service(s, language="ja").id
    ok(invoke("requests", "create", sid, "--reason-code", "other",
              env={"CANCELPROC_EMAIL__TEMPLATES_DIR": "mine", "CANCELPROC_EMAIL__SIGNATURES": '{"ja": "請求チーム"}'}))
    client = emails(db)[0]
    # Japanese date and signature; the type name has no Japanese entry: English (its WHMCS value).
    assert client.text_body.startswith("2026年11月26日 End of Billing Period") and "請求チーム" in client.text_body


# Every WHMCS merge field of the two request emails and the common ones, as a WHMCS template names them.
WHMCS_FIELDS = ("client_name", "service_product_name", "service_domain", "service_cancellation_type",
                "service_next_due_date", "company_name", "signature", "client_id", "clientname", "service_id",
                "product_name", "service_cancellation_reason", "whmcs_admin_link", "client_first_name",
                "client_last_name", "client_company_name", "service_recurring_amount", "service_reg_date", "whmcs_url")


def test_whmcs_merge_fields_render_under_strict_undefined_in_a_run(invoke, db, tmp_path):
    body = "\n".join(f"{name}=[{{{{ {name} }}}}]" for name in WHMCS_FIELDS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "service_cancellation_confirmation.jinja").write_text(
        "{% block subject %}{{ service_product_name }}{% endblock %}"
        "{% block text %}" + body + "{% endblock %}{% block html %}" + body + "{% endblock %}")
    with db.session.begin() as s:
        svc = factories.service(s, first_name="Anna", language="pt", next_due_date=dt.date(2026, 11, 25))
        s.execute(update(Service).where(Service.id == svc.id).values(registration_date=dt.date(2024, 3, 1)))
        svc.client.company_name = "Anna GmbH"
        factories.request(s, svc, reason="Zu teuer")
        ids = (svc.client.id, svc.id, svc.client.last_name, svc.domain)
    ok(invoke("run", env={"CANCELPROC_EMAIL__TEMPLATES_DIR": "mine", "CANCELPROC_EMAIL__CURRENCY": "EUR",
                          "CANCELPROC_EMAIL__ADMIN_URL": "https://billing.example.com/admin/?a=1&b=2",
                          "CANCELPROC_EMAIL__SYSTEM_URL": "https://billing.example.com/"}))
    done = next(e for e in emails(db) if e.template == "service_cancellation_confirmation")
    text = dict(line.split("=", 1) for line in done.text_body.splitlines())
    client_id, service_id, last_name, domain = ids
    # No pt/ template: the email is written in English throughout (dates, amount, type).
    assert text == {
        "client_name": f"[Anna {last_name}]", "clientname": f"[Anna {last_name}]", "client_first_name": "[Anna]",
        "client_last_name": f"[{last_name}]", "client_company_name": "[Anna GmbH]", "client_id": f"[{client_id}]",
        "service_id": f"[{service_id}]", "service_product_name": "[VPS 4GB]", "product_name": "[VPS 4GB]",
        "service_domain": f"[{domain}]", "service_cancellation_type": "[End of Billing Period]",
        "service_next_due_date": "[November 25, 2026]", "service_reg_date": "[March 1, 2024]",
        "service_recurring_amount": "[€24.00]", "service_cancellation_reason": "[Zu teuer]",
        "company_name": "[Example Hosting]", "signature": "[Example Hosting Billing Team]",
        "whmcs_url": "[https://billing.example.com/]",
        "whmcs_admin_link": "[https://billing.example.com/admin/?a=1&b=2]",  # the text part: the URL
    }
    # The HTML part: a link, escaped as any merge field is.
    assert ('whmcs_admin_link=[<a href="https://billing.example.com/admin/?a=1&amp;b=2">'
            'https://billing.example.com/admin/?a=1&amp;b=2</a>]') in done.html_body


def test_the_amount_and_type_follow_the_language_of_the_text(invoke, db, tmp_path):
    (tmp_path / "mine" / "de").mkdir(parents=True)
    (tmp_path / "mine" / "de" / "service_cancellation_confirmation.jinja").write_text(
        '{% extends "default:de/service_cancellation_confirmation.jinja" %}'
        "{% block body_text %}{{ service_recurring_amount }} | {{ service_cancellation_type_name }} | "
        "{{ service_cancellation_type }}{% endblock %}")
    with db.session.begin() as s:
        factories.request(s, factories.service(s, language="de_DE", next_due_date=dt.date(2026, 11, 25)))
    ok(invoke("run", env={"CANCELPROC_EMAIL__TEMPLATES_DIR": "mine", "CANCELPROC_EMAIL__CURRENCY": "EUR"}))
    done = next(e for e in emails(db) if e.template == "service_cancellation_confirmation")
    # WHMCS's own value stays, so that {if $service_cancellation_type eq "End of Billing Period"} holds.
    assert done.text_body.startswith("24,00\xa0€ | Zum Ende des Abrechnungszeitraums | End of Billing Period")


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("CANCELPROC_EMAIL__ADMIN_URL", "billing.example.com/admin", "email.admin_url: 'billing.example.com/admin' is not"
                                                                   " a web address"),
    ("CANCELPROC_EMAIL__CURRENCY", "EURO", "email.currency: 'EURO' is not an ISO 4217 currency code"),
    ("CANCELPROC_EMAIL__SIGNATURES", '{"german": "x"}', "email.signatures: 'german' is not a language code"),
])
def test_bad_email_settings_are_one_line(invoke, db, setting, value, message):
    result = invoke("requests", "list", env={setting: value})
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.output
