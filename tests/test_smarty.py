"""`cancelproc emails convert`: WHMCS's Smarty email templates into Jinja. Each construct
on its own (converted, then rendered by Jinja's sandbox with StrictUndefined as the
emails are), what cannot be converted named by line and column, and WHMCS's own
Cancellation Request Confirmation converted, then sent through the real pipeline."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import select

from processor.emails import date_format, format_date, template_for
from processor.models import OutboxEmail
from processor.smarty import SmartyError, convert
from tests import factories
from tests.cli_helpers import ok


def render(smarty: str, part: str = "html", **fields: Any) -> str:
    """Convert, then render one part as the emails are rendered (sandbox, StrictUndefined;
    autoescape in the HTML part only)."""
    converted = convert(smarty)
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=part == "html")
    env.filters["date_format"] = date_format
    return env.from_string(converted.html if part == "html" else converted.text).render(**fields)


@pytest.mark.parametrize(("smarty", "fields", "html", "text"), [
    ("Hi {$client_name}!", {"client_name": "Jo <b>"}, "Hi Jo &lt;b&gt;!", "Hi Jo <b>!"),
    ("{$service.domain} {$items[1]} {$items.0} {$client->name}",
     {"service": {"domain": "a.test"}, "items": ["x", "y"], "client": {"name": "Jo"}}, "a.test y x Jo", None),
    ("{$a|upper} {$a|lower} {$a|capitalize}", {"a": "hello wORLD"}, "HELLO WORLD hello world Hello World", None),
    ("[{$a|default:'none'}] [{$b|default:\"-\"}]", {"a": "", "b": "set"}, "[none] [set]", None),
    ("{$a|truncate:10}|{$a|truncate:10:'~':true}", {"a": "a long sentence here"}, "a long...|a long se~", None),
    ("{$a|string_format:'%.2f'} {$a|string_format:'%05d'}", {"a": 3.14159}, "3.14 00003", None),
    ("{$a|nl2br}", {"a": "one\n<two>"}, "one<br>\n&lt;two&gt;", "one\n<two>"),
    ("{$a|escape}|{$a|escape:'url'}", {"a": "a&b c"}, "a&amp;b c|a%26b%20c", "a&b c|a%26b%20c"),
    ("{$a|cat:'!'|replace:'x':'y'} {$a|strip_tags} {$a|count_characters}", {"a": "xo"}, "yo! xo 2", None),
    ("{$d|date_format:'%d.%m.%Y'} {$d|date_format}", {"d": format_date(dt.date(2026, 3, 7))},
     "07.03.2026 Mar  7, 2026", None),
    ("{$d|date_format:'%d.%m.%Y'}", {"d": "not a date field"}, "not a date field", None),
], ids=["var-escaped-in-html-only", "keys-and-indexes", "case", "default-empty-too", "truncate", "string_format",
        "nl2br", "escape", "cat-replace-strip_tags-count", "date_format", "date_format-on-text"])
def test_variables_and_modifiers(smarty, fields, html, text):
    assert render(smarty, "html", **fields) == html
    assert render(smarty, "text", **fields) == (html if text is None else text)


@pytest.mark.parametrize(("condition", "true_for", "false_for"), [
    ('$t eq "Immediate"', {"t": "Immediate"}, {"t": "On Date"}),
    ('$t == "Immediate"', {"t": "Immediate"}, {"t": "x"}),
    ("$t neq 'x' && $n > 2", {"t": "y", "n": 3}, {"t": "x", "n": 3}),
    ("$t != 'x' and $n gt 2", {"t": "y", "n": 3}, {"t": "y", "n": 2}),
    ("$n lt 2 or $n gte 10", {"n": 10}, {"n": 5}),
    ("$n <= 2 || $n >= 10", {"n": 1}, {"n": 5}),
    ("not $a", {"a": ""}, {"a": "set"}),
    ("!$a", {"a": ""}, {"a": "set"}),
    ("($n mod 2) == 0 and $n ne 4", {"n": 6}, {"n": 4}),
    ("$n % 2 === 1", {"n": 3}, {"n": 4}),
    ("$flag == true", {"flag": True}, {"flag": False}),
    ("$a|upper eq 'X'", {"a": "x"}, {"a": "y"}),
], ids=["eq", "==", "neq-&&-gt", "!=-and", "lt-or-gte", "<=-||", "not", "!", "mod-ne", "%-===", "true",
        "modifier-in-condition"])
def test_if_with_smarty_operators(condition, true_for, false_for):
    smarty = "{if " + condition + "}yes{else}no{/if}"
    assert render(smarty, **true_for) == "yes" and render(smarty, **false_for) == "no"


def test_if_elseif_else_nested():
    smarty = ("{if $n == 1}one{elseif $n == 2}two{else if $n == 3}three{else}"
              "{if $n > 9}big{else}other{/if}{/if}")
    assert [render(smarty, n=n) for n in (1, 2, 3, 10, 5)] == ["one", "two", "three", "big", "other"]


def test_foreach_both_forms_and_foreachelse():
    items = [{"name": "a"}, {"name": "b"}]
    assert render("{foreach from=$items item=i name=list}[{$i.name}]{foreachelse}none{/foreach}", items=items) \
        == "[a][b]"
    assert render("{foreach $items as $i}({$i.name|upper}){/foreach}", items=items) == "(A)(B)"
    assert render("{foreach from=$items item=i}x{foreachelse}none{/foreach}", items=[]) == "none"
    # The loop variable is no merge field: only `items` is named.
    assert set(convert("{foreach $items as $i}{$i.name}{/foreach}").names) == {"items"}


def test_literal_ldelim_comments_and_braces_of_text():
    smarty = ("{literal}{$not_a_field} {if}{/literal} {ldelim}x{rdelim} {* a comment {$gone} *}"
              "<style>p { color: red }</style> {literal}{{ jinja }} {% not %} {# this #}{/literal}")
    html = render(smarty)
    assert html == ("{$not_a_field} {if} {x} <style>p { color: red }</style> {{ jinja }} {% not %} {# this #}")
    assert convert(smarty).names == {}
    assert render("{ldelim}{ldelim}{$a}{rdelim}{rdelim} {ldelim}%x%{rdelim}", a=1) == "{{1}} {%x%}"
    assert render(smarty, "text") == "{$not_a_field} {if} {x} {{ jinja }} {% not %} {# this #}"  # style dropped


def test_the_text_part_is_made_from_the_html_as_whmcs_does():
    smarty = ('<p>Dear {$name},</p>\n<p>Line one<br />\nline two &amp; more&nbsp;here</p>'
              '<table><tr><td>A</td><td>{$v}</td></tr></table><ul><li>x</li></ul>'
              '<p><a href="{$url}">{$url}</a></p>')
    text = render(smarty, "text", name="Jo", v="1", url="https://x.test/?a=1&b=2")
    assert text == ("Dear Jo,\n\nLine one\nline two & more here\n\nA 1\n\n- x\n\nhttps://x.test/?a=1&b=2")


def test_a_plain_text_template_keeps_its_lines_and_gets_an_html_part():
    smarty = "Dear {$name},\n\nYour <service> is cancelled.\n{$signature}"
    fields = dict(name="Jo", signature="Team")
    assert render(smarty, "text", **fields) == "Dear Jo,\n\nYour <service> is cancelled.\nTeam"
    assert render(smarty, "html", **fields) == "Dear Jo,<br>\n<br>\nYour &lt;service&gt; is cancelled.<br>\nTeam"


@pytest.mark.parametrize(("smarty", "line", "column", "message"), [
    ("Hi\n  {$a|money_format}", 2, 7, "|money_format: no Jinja equivalent"),
    ("{if $a}\nx", 1, 1, "{if} is not closed with {/if}"),
    ("x{/if}", 1, 2, "{/if} without an open {if}"),
    ("{foreach from=$a item=i}{/if}", 1, 25, "{/if} without an open {if}"),
    ("{include file='x.tpl'}", 1, 1, "not converted"),
    ("{assign var=x value=1}", 1, 1, "not converted"),
    ("{$smarty.now}", 1, 2, "Smarty's own variables"),
    ("{if count($a) > 1}x{/if}", 1, 5, "count(): PHP functions are not converted"),
    ("{if $a is even}x{/if}", 1, 8, "'is' is not an operator"),
    ("a\nb {$a", 2, 3, "'{' is not closed"),
    ("{* open", 1, 1, "comment {* is not closed"),
    ("{literal}x", 1, 1, "{literal} is not closed"),
    ('{$a|cat:"x$b"}', 1, 9, "variables inside a string"),
    ("{foreach $a as $k => $v}{/foreach}", 1, 1, "{foreach"),
    ("{foreach from=$a item=i key=k}{/foreach}", 1, 1, "key not converted"),
    ("{else}", 1, 1, "{else} without an open {if}"),
    ("{if}x{/if}", 1, 1, "a condition is missing"),
    ("{if $a}x{else}y\n{elseif $b}z{/if}", 2, 1, "{elseif} after the {if}'s else"),
], ids=["unknown-modifier", "unclosed-if", "stray-close", "crossed-blocks", "include", "assign", "$smarty",
        "php-function", "is-even", "unclosed-brace", "unclosed-comment", "unclosed-literal", "var-in-string",
        "foreach-key-arrow", "foreach-key", "stray-else", "empty-if", "elseif-after-else"])
def test_what_cannot_be_converted_is_named_by_line_and_column(smarty, line, column, message):
    with pytest.raises(SmartyError) as exc:
        convert(smarty)
    assert (exc.value.line, exc.value.column) == (line, column) and message in str(exc.value), str(exc.value)
    assert str(exc.value).startswith(f"line {line}, column {column}: ") and "\n" not in str(exc.value)


def test_the_message_comes_from_the_file_name():
    assert template_for("Cancellation Request Confirmation.tpl") == "cancellation_request_confirmation"
    assert template_for("new-cancellation-request.html") == "new_cancellation_request"
    assert template_for("Invoice Created.tpl") is None


# --- at the command line, then through the real pipeline ------------------------------------------

# WHMCS's default "Cancellation Request Confirmation" (client, product messages), as its
# template editor shows it.
WHMCS_CONFIRMATION = """\
<p>Dear {$client_name},</p>
<p>This email is to confirm that we have received your cancellation request for the following service:</p>
<p>Product/Service: {$service_product_name}<br />Domain: {$service_domain}</p>
<p>{if $service_cancellation_type eq "Immediate"}The service will be terminated within the next 24 hours.\
{else}The service will be cancelled at the end of your current billing period on {$service_next_due_date}.{/if}</p>
<p>Thank you for using {$company_name}, we hope to see you again in the future.</p>
<p>{$signature}</p>
"""

# WHMCS's "New Cancellation Request" (admin messages).
WHMCS_NEW_REQUEST = """\
<p>A new cancellation request has been submitted.</p>
<p>Client ID: {$client_id}<br>Client Name: {$clientname}<br>Service ID: {$service_id}<br>\
Product Name: {$product_name}<br>Cancellation Type: {$service_cancellation_type}<br>\
Cancellation Reason: {$service_cancellation_reason}</p>
<p>{$whmcs_admin_link}</p>
"""


@pytest.fixture
def frozen() -> Iterator[None]:
    with freeze_time(dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)):
        yield


def test_whmcs_templates_converted_then_sent_by_requests_create(invoke, db, tmp_path, frozen):
    (tmp_path / "Cancellation Request Confirmation.tpl").write_text(WHMCS_CONFIRMATION)
    (tmp_path / "admin.tpl").write_text(WHMCS_NEW_REQUEST)
    result = ok(invoke("emails", "convert", tmp_path / "Cancellation Request Confirmation.tpl"))
    target = tmp_path / "templates" / "cancellation_request_confirmation.jinja"
    assert result.stdout.startswith(f"wrote {target}; try it: cancelproc emails preview")
    ok(invoke("emails", "convert", tmp_path / "admin.tpl", "--template", "new_cancellation_request",
              "--subject", "[Ticket] New Cancellation Request for {$clientname|upper}"))
    with db.session.begin() as s:
        svc = factories.service(s, first_name="Grace", next_due_date=dt.date(2026, 12, 1))
        sid, client_id, name, domain = svc.id, svc.client.id, svc.client.name, svc.domain
    ok(invoke("requests", "create", sid, "--reason-code", "other", "--reason", "Moving <on>",
              env={"CANCELPROC_EMAIL__ADMIN_URL": "https://billing.example.com/admin/"}))
    with db.read_session() as s:
        client, staff = s.scalars(select(OutboxEmail).order_by(OutboxEmail.id)).all()
    assert client.subject == "Cancellation Request Confirmation"
    assert client.text_body == (
        f"Dear {name},\n\nThis email is to confirm that we have received your cancellation request for the "
        f"following service:\n\nProduct/Service: VPS 4GB\nDomain: {domain}\n\nThe service will be cancelled at "
        "the end of your current billing period on December 1, 2026.\n\nThank you for using Example Hosting, we "
        "hope to see you again in the future.\n\nExample Hosting Billing Team")
    assert f"<p>Product/Service: VPS 4GB<br />Domain: {domain}</p>" in client.html_body
    assert staff.subject == f"[Ticket] New Cancellation Request for {name.upper()}"
    assert (f"A new cancellation request has been submitted.\n\n"
            f"Client ID: {client_id}\nClient Name: {name}\nService ID: {sid}\nProduct Name: VPS 4GB\n"
            "Cancellation Type: End of Billing Period\nCancellation Reason: Moving <on>\n\n"
            "https://billing.example.com/admin/") == staff.text_body
    assert "Cancellation Reason: Moving &lt;on&gt;</p>" in staff.html_body
    assert ('<a href="https://billing.example.com/admin/">https://billing.example.com/admin/</a>'
            in staff.html_body)


def test_convert_refuses_in_one_line_and_writes_nothing(invoke, tmp_path):
    bad = tmp_path / "cancellation_request_confirmation.tpl"
    target = tmp_path / "templates" / "cancellation_request_confirmation.jinja"
    bad.write_text("<p>Dear {$client_name},</p>\n<p>{$service_password}</p>\n")
    result = invoke("emails", "convert", bad)
    assert result.exit_code == 2 and result.stderr == (
        f"error: {bad}: line 2, column 5: {{$service_password}}: no merge field service_password in cancelproc's "
        "cancellation_request_confirmation; docs/templates.md lists them\n"), result.output
    bad.write_text("<p>Dear {$client_name|money_format},</p>\n")
    result = invoke("emails", "convert", bad)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {bad}: line 1, column 23: |money_format")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert not target.exists()

    good = tmp_path / "ok.tpl"
    good.write_text("<p>Dear {$client_name},</p>\n")
    result = invoke("emails", "convert", good, "--template", "new_cancellation_request", "--subject", "Hi {$nobody}")
    assert result.exit_code == 2 and result.stderr == (
        "error: --subject: line 1, column 5: {$nobody}: no merge field nobody in cancelproc's "
        "new_cancellation_request; docs/templates.md lists them\n"), result.output
    assert not (tmp_path / "templates" / "new_cancellation_request.jinja").exists()

    unknown = tmp_path / "Invoice Created.tpl"
    unknown.write_text("x")
    result = invoke("emails", "convert", unknown)
    assert result.exit_code == 2 and "which message is it? Give --template" in result.stderr


def test_convert_never_overwrites_without_force(invoke, tmp_path):
    source = tmp_path / "whmcs.tpl"
    source.write_text("Hello {$client_first_name}\n")
    args = ("emails", "convert", source, "--template", "cancellation_request_confirmation", "--language", "de-AT")
    ok(invoke(*args))
    target = tmp_path / "templates" / "de_at" / "cancellation_request_confirmation.jinja"
    target.write_text("mine")
    result = invoke(*args)
    assert result.exit_code == 2 and result.stderr == f"error: {target} exists; --force replaces it\n"
    assert target.read_text() == "mine" and [p.name for p in target.parent.iterdir()] == [target.name]
    ok(invoke(*args, "--force"))
    assert "Hello {{ client_first_name }}" in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left


def test_convert_without_an_operator_folder_is_refused(invoke, tmp_path: Path):
    source = tmp_path / "cancellation_request_confirmation.tpl"
    source.write_text("x")
    result = invoke("emails", "convert", source, env={"CANCELPROC_EMAIL__TEMPLATES_DIR": ""})
    assert result.exit_code == 2 and 'email.templates_dir is ""' in result.stderr
