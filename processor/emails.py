"""Email templates: find, check and render them. (Queueing is outbox.py, sending delivery.py.)

A template is one file with three blocks (subject, text, html) extending `_layout.jinja`.
Templates run in Jinja's sandbox (a template cannot reach Python internals), with
StrictUndefined (a misspelt merge field is an error, not an empty string). The html block
is rendered by an autoescaping environment, the subject and text by a plain one.

Per language: a client whose language is "de" (or "de_AT", "de-AT") gets
`<folder>/de/<name>.jinja` when it exists (the operator's folder, then the shipped one),
else `<name>.jinja`. The language of the text is the language of the dates, cancellation
types, amounts and signature: a language without a template of its own gets the default
(English) template with English dates, never English text with Japanese dates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.dates import format_date as babel_format_date
from babel.numbers import format_currency, format_decimal
from jinja2 import (
    BaseLoader,
    BytecodeCache,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PrefixLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    nodes,
)
from jinja2.bccache import Bucket
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup, escape

from processor.errors import InputError, one_line
from processor.models import Run
from processor.resources import shipped_folder
from processor.smarty import SmartyError, convert, convert_line, unknown_fields

# The built-in templates, shipped in the package: the fallback behind the operator's folder.
DEFAULT_TEMPLATES = shipped_folder("templates")
BLOCKS = ("subject", "text", "html")

# The messages, by template file name, with their WHMCS-style titles.
REQUEST_CONFIRMATION = "cancellation_request_confirmation"  # client, when a request is made
NEW_REQUEST = "new_cancellation_request"  # staff, when a request is made
SERVICE_CANCELLATION_CONFIRMATION = "service_cancellation_confirmation"  # client, when done
REQUEST_WITHDRAWN = "cancellation_request_withdrawn"  # client, when staff withdraw the request
CANCELLATION_REMINDER = "cancellation_reminder"  # client, reminder_days before the cancellation takes effect
ADDON_CANCELLATION_CONFIRMATION = "addon_cancellation_confirmation"  # client, when one add-on alone is cancelled
CRON_JOB_ACTIVITY = "cron_job_activity"  # staff digest after each run
# Grace period (a product's grace_days): client, when the run suspends the service of a due
# request; client, when staff withdraw a request in its grace period (instead of
# cancellation_request_withdrawn: the one email says both).
SERVICE_SUSPENDED = "service_suspended_for_cancellation"
SERVICE_UNSUSPENDED = "service_unsuspended"
TEMPLATES = {
    REQUEST_CONFIRMATION: "Cancellation Request Confirmation",
    NEW_REQUEST: "New Cancellation Request",
    SERVICE_CANCELLATION_CONFIRMATION: "Service Cancellation Confirmation",
    REQUEST_WITHDRAWN: "Cancellation Request Withdrawn",
    CANCELLATION_REMINDER: "Cancellation Reminder",
    ADDON_CANCELLATION_CONFIRMATION: "Addon Cancellation Confirmation",
    CRON_JOB_ACTIVITY: "Cron Job Activity",
    SERVICE_SUSPENDED: "Service Suspended for Cancellation",
    SERVICE_UNSUSPENDED: "Service Unsuspended",
}
DEFAULT_LANGUAGE = "en"


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


class TemplateProblem(InputError):
    """A template is missing, does not parse, or does not render with the given fields."""


def language_folders(language: str | None) -> list[str]:
    """Template sub-folders to try for a client's language, most specific first:
    "de_AT" -> ["de_at", "de"]. Anything that is not a plain language code gives none."""
    code = (language or "").strip().lower().replace("-", "_")
    if not code or len(code) > 16 or not code.replace("_", "").isalnum() or not code.isascii():
        return []
    primary = code.split("_")[0]
    return [code] if code == primary else [code, primary]


@functools.lru_cache(maxsize=64)
def _locale(language: str | None) -> Locale:
    for code in language_folders(language):
        try:
            return Locale.parse(code)
        except (UnknownLocaleError, ValueError):
            continue
    return Locale.parse(DEFAULT_LANGUAGE)


class DateText(str):
    """A date merge field: the text a template prints, and the day itself, so that a
    template ported from WHMCS can still write it its own way (`|date_format("%d.%m.%Y")`)."""

    day: dt.date


@functools.lru_cache(maxsize=4096)  # a run formats the same few dozen dates thousands of times
def format_date(value: dt.date | None, language: str | None = DEFAULT_LANGUAGE) -> str:
    """A date as the client's language writes it in full ("December 1, 2026", "1. Dezember 2026")."""
    if not value:
        return ""
    text = DateText(babel_format_date(value, format="long", locale=_locale(language)))
    text.day = value
    return text


def date_format(value: Any, pattern: str = "%b %e, %Y") -> str:
    """Smarty's date_format (strftime patterns) for the date merge fields; other text as it is."""
    day = getattr(value, "day", None) if isinstance(value, DateText) else None
    return day.strftime(pattern) if day is not None else str(value)


@functools.lru_cache(maxsize=4096)  # a few dozen prices, thousands of services
def format_amount(value: Decimal | None, language: str | None = DEFAULT_LANGUAGE, currency: str = "") -> str:
    """An amount as the language writes it: "$10.00" / "10,00 $" with a currency (ISO 4217
    code), "10.00" / "10,00" without."""
    if value is None:
        return ""
    locale = _locale(language)
    if currency:
        return format_currency(value, currency, locale=locale)
    return format_decimal(value, format="#,##0.00", locale=locale)


# The cancellation types as the shipped languages write them (service_cancellation_type_name).
# service_cancellation_type stays WHMCS's own value in every language, so that a ported
# template's {if $service_cancellation_type eq "Immediate"} holds for every client.
CANCELLATION_TYPE_NAMES: dict[str, dict[str, str]] = {
    "en": {"Immediate": "Immediate", "End of Billing Period": "End of Billing Period", "On Date": "On Date"},
    "de": {"Immediate": "Sofort", "End of Billing Period": "Zum Ende des Abrechnungszeitraums",
           "On Date": "Zu einem bestimmten Datum"},
    "fr": {"Immediate": "Immédiate", "End of Billing Period": "À la fin de la période de facturation",
           "On Date": "À une date précise"},
    "es": {"Immediate": "Inmediata", "End of Billing Period": "Al final del período de facturación",
           "On Date": "En una fecha concreta"},
    "nl": {"Immediate": "Onmiddellijk", "End of Billing Period": "Aan het einde van de factuurperiode",
           "On Date": "Op een bepaalde datum"},
}


# The shipped default signature (email.signature's default) as the shipped languages write
# it: an operator who keeps the default gets it in the client's language. An operator's
# own signature is theirs to translate (email.signatures); it is never replaced by these.
DEFAULT_SIGNATURES: dict[str, str] = {
    "de": "Ihr Abrechnungsteam von Example Hosting",
    "fr": "L'équipe de facturation d'Example Hosting",
    "es": "El equipo de facturación de Example Hosting",
    "nl": "Het facturatieteam van Example Hosting",
}


@functools.lru_cache(maxsize=64)
def cancellation_type_names(language: str | None) -> dict[str, str]:
    """The type names of a language ("de_AT" -> German), English for one we do not have."""
    return next((CANCELLATION_TYPE_NAMES[code] for code in language_folders(language)
                 if code in CANCELLATION_TYPE_NAMES), CANCELLATION_TYPE_NAMES[DEFAULT_LANGUAGE])


class Writing:
    """How an email in one language writes a request's values: dates, amounts and
    cancellation type names, each distinct value formatted once (a run writes the same
    few dozen dates and prices thousands of times; a dict lookup is a third of the cost of
    an lru_cache call with its key tuple)."""

    def __init__(self, language: str | None, currency: str = "") -> None:
        self.language = language
        self.currency = currency
        self.type_names = cancellation_type_names(language)
        self._dates: dict[dt.date | None, str] = {}
        self._amounts: dict[Decimal | None, str] = {}

    def date(self, value: dt.date | None) -> str:
        text = self._dates.get(value)
        if text is None:
            text = self._dates[value] = format_date(value, self.language)
        return text

    def amount(self, value: Decimal | None) -> str:
        text = self._amounts.get(value)
        if text is None:
            text = self._amounts[value] = format_amount(value, self.language, self.currency)
        return text


def for_language(by_language: Mapping[str, str], default: str, language: str | None) -> str:
    """A setting given per language (email.signatures): the most specific entry, else `default`."""
    return next((by_language[code] for code in language_folders(language) if code in by_language), default)


class Link(str):
    """A URL merge field: the URL in the text part, an <a> to it in the HTML part (WHMCS's
    whmcs_admin_link is a link in its HTML emails). Autoescape calls __html__."""

    __slots__ = ()

    def __html__(self) -> Markup:
        return Markup('<a href="{0}">{0}</a>').format(escape(str(self))) if self else Markup("")


def _loader(override_dir: Path | None, default_dir: Path) -> BaseLoader:
    # The operator's folder first; "default:name" always reaches the shipped template,
    # so an override can {% extends "default:service_cancellation_confirmation.jinja" %}.
    default = FileSystemLoader(default_dir)
    loaders: list[BaseLoader] = [FileSystemLoader(override_dir)] if override_dir else []
    return ChoiceLoader([*loaders, default, PrefixLoader({"default": default}, delimiter=":")])


BlockFn = Any  # a compiled block: Callable[[Context], Iterator[str]]


def _block_chain(env: Environment, template: Template) -> dict[str, list[BlockFn]]:
    """Every block of the template and the layouts it extends, child first (as Jinja's
    own rendering would collect them), so one block can be rendered on its own."""
    blocks: dict[str, list[BlockFn]] = {}
    current: Template | None = template
    # The name each template was asked for: one reached through "default:" reports its
    # name without the prefix, which names the operator's override again.
    requested = template.name
    while current is not None:
        for name, fn in current.blocks.items():
            blocks.setdefault(name, []).append(fn)
        source, _, _ = env.loader.get_source(env, requested)  # type: ignore[union-attr,arg-type]
        extends = next(iter(env.parse(source, requested).find_all(nodes.Extends)), None)
        if extends is None:
            current = None
        elif isinstance(extends.template, nodes.Const):
            requested = extends.template.value
            current = env.get_template(requested, parent=current.name)
        else:
            raise TemplateProblem(f"{current.filename}:{extends.lineno}: extends needs a fixed template name")
    return blocks


@dataclass(frozen=True)
class _Compiled:
    template: Template
    blocks: dict[str, list[BlockFn]]

    def render_blocks(self, names: tuple[str, ...], fields: dict[str, Any]) -> list[str]:
        """Render these blocks in one context. `fields` must include the environment's
        globals (Jinja's new_context would copy them in). The block chain is shared, not copied: block
        functions only read it (the root render function, never called here, would write)."""
        ctx = Context(self.template.environment, fields, self.template.name, {})
        ctx.blocks = self.blocks
        return ["".join(self.blocks[name][0](ctx)) for name in names]


MAX_SEQUENCE = 100_000  # the longest string or list a template may build with `*`
MAX_EXPONENT = 1_000
CHECK_SECONDS = 5.0  # a template that uses more CPU time to render once at start is refused


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, and bounds on what it leaves open: `*` and `**` could
    build a string of gigabytes or a number with millions of digits (`range` is bounded
    by Jinja already; loops are bounded by the time check at start)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_SEQUENCE:
                    raise SecurityError(f"'*' would build a sequence longer than {MAX_SEQUENCE}")
        return super().call_binop(context, operator, left, right)


@contextlib.contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise TemplateProblem if the block uses more CPU time (a loop without end). CPU time,
    not the clock: on a machine busy with other work (or under valgrind) a render waits
    longer but does not work longer, and a run must not fail for that. Only in the main
    thread, where a timer signal can interrupt Python code; elsewhere unbounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise TemplateProblem(f"{what} used more than {seconds:g} s of CPU time to render once: a loop without end?")

    previous = signal.signal(signal.SIGVTALRM, expired)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


class _CompiledInMemory(BytecodeCache):
    """Jinja's compiled templates, kept for the process: another EmailTemplates (the next
    run of `schedule`, a test's) loads them instead of compiling them again, most of a
    run's start-up. Jinja checks each entry against its template's source, so an edited
    template is compiled anew."""

    def __init__(self) -> None:
        self._code: dict[str, bytes] = {}

    def load_bytecode(self, bucket: Bucket) -> None:
        code = self._code.get(bucket.key)
        if code is not None:
            bucket.bytecode_from_string(code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        self._code[bucket.key] = bucket.bytecode_to_string()


# One per autoescape setting: the plain and the HTML part of a template compile differently.
_COMPILED = {False: _CompiledInMemory(), True: _CompiledInMemory()}


class EmailTemplates:
    """Compiled templates; `check` at start so a broken template stops a run before any write."""

    def __init__(self, override_dir: Path | None = None, default_dir: Path = DEFAULT_TEMPLATES, *,
                 check_seconds: float = CHECK_SECONDS) -> None:
        self.check_seconds = check_seconds
        self.folders = [d for d in (override_dir, default_dir) if d is not None]
        loader = _loader(override_dir, default_dir)
        common: dict[str, Any] = dict(loader=loader, undefined=StrictUndefined, keep_trailing_newline=False)
        self._plain = _Sandbox(autoescape=False, bytecode_cache=_COMPILED[False], **common)
        self._html = _Sandbox(autoescape=True, bytecode_cache=_COMPILED[True], **common)
        for env in (self._plain, self._html):
            env.filters["date_format"] = date_format
        self._cache: dict[str, tuple[_Compiled, _Compiled]] = {}
        self._resolved: dict[tuple[str, str | None], str] = {}

    def _compile(self, env: Environment, filename: str) -> _Compiled:
        template = env.get_template(filename)
        return _Compiled(template, _block_chain(env, template))

    def filename(self, name: str, language: str | None = None) -> str:
        """The template file for this message and language: `<lang>/<name>.jinja` when one
        exists in either folder, else `<name>.jinja`."""
        key = (name, language)
        if key not in self._resolved:
            candidates = [f"{folder}/{name}.jinja" for folder in language_folders(language)]
            found = next((c for c in candidates if any((d / c).is_file() for d in self.folders)), None)
            self._resolved[key] = found or f"{name}.jinja"
        return self._resolved[key]

    def text_language(self, name: str, language: str | None) -> str:
        """The language this message is written in for a client of `language`: theirs when
        a template of that language exists, else the default. Dates, cancellation types,
        amounts and the signature follow it, so an email is in one language throughout.
        English variants (en_GB) keep their own: the default template is English."""
        folders = language_folders(language)
        if language and ("/" in self.filename(name, language) or folders[-1:] == [DEFAULT_LANGUAGE]):
            return language
        return DEFAULT_LANGUAGE

    def languages(self) -> list[str]:
        """Language folders present (in the operator's folder or the shipped one)."""
        return sorted({p.name for d in self.folders if d.is_dir() for p in d.iterdir()
                       if p.is_dir() and language_folders(p.name)[:1] == [p.name]})

    def _load(self, filename: str) -> tuple[_Compiled, _Compiled]:
        if filename not in self._cache:
            try:
                self._cache[filename] = (self._compile(self._plain, filename), self._compile(self._html, filename))
            except TemplateNotFound as exc:
                looked_in = ", ".join(str(folder) for folder in self.folders)
                raise TemplateProblem(f"email template {exc.name} not found (looked in {looked_in})") from None
            except TemplateSyntaxError as exc:
                raise TemplateProblem(f"{exc.filename or exc.name}:{exc.lineno}: {exc.message}") from None
        return self._cache[filename]

    def check(self, name: str, sample: Mapping[str, Any]) -> None:
        """Parse the template (each language's too) and render it once with sample fields;
        raise TemplateProblem."""
        for language in (None, *self.languages()):
            with _time_limit(self.check_seconds, f"email template {self.filename(name, language)}"):
                self.render(name, sample, language)

    def check_all(self, company_name: str, signature: str) -> None:
        """Every message's templates, before anything is touched."""
        for name in TEMPLATES:
            self.check(name, sample_fields(name, company_name, signature))

    def render(self, name: str, fields: Mapping[str, Any], language: str | None = None) -> RenderedEmail:
        filename = self.filename(name, language)
        plain, html = self._load(filename)
        fields = {**self._plain.globals, **fields}  # both environments have the same globals
        try:
            subject, text = (part.strip() for part in plain.render_blocks(("subject", "text"), fields))
            html_body = html.render_blocks(("html",), fields)[0].strip()
        except KeyError as exc:
            raise TemplateProblem(
                f"email template {filename} has no block {exc.args[0]!r} (needs {', '.join(BLOCKS)})") from None
        except TemplateProblem:
            raise  # the time limit at start
        except Exception as exc:  # noqa: BLE001 - whatever a template does wrong (1/0, a range too big) is its problem
            message = str(exc) if isinstance(exc, TemplateError) else one_line(exc)
            raise TemplateProblem(f"email template {_where(exc, filename)}: {message}") from None
        if "\n" in subject or "\r" in subject:
            raise TemplateProblem(f"email template {filename}: subject renders to more than one line")
        return RenderedEmail(subject, text, html_body)


def _where(exc: BaseException, filename: str) -> str:
    """FILE:LINE in the template where rendering failed (the innermost template frame of
    the traceback, its line mapped back from the compiled code as Jinja's own tracebacks
    do), else the template's name."""
    where = filename
    tb = exc.__traceback__
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if template is not None:
            where = f"{template.filename or template.name}:{template.get_corresponding_lineno(tb.tb_lineno)}"
        tb = tb.tb_next
    return where


def sample_fields(name: str, company_name: str, signature: str) -> dict[str, Any]:
    """Merge fields with plausible values for this message, to check templates before a
    run touches anything."""
    common = dict(company_name=company_name, signature=signature, date=format_date(dt.date(2026, 12, 1)),
                  **SAMPLE_URLS)
    if name == CRON_JOB_ACTIVITY:
        return {**common, **SAMPLE_DIGEST}
    if name == CANCELLATION_REMINDER:
        return {**common, **SAMPLE_REQUEST, **SAMPLE_REMINDER}
    if name == ADDON_CANCELLATION_CONFIRMATION:
        return {**common, **SAMPLE_REQUEST, **SAMPLE_ADDON}
    return {**common, **SAMPLE_REQUEST}


SAMPLE_URLS: dict[str, Any] = dict(
    currency="", whmcs_url="https://billing.example.test/", whmcs_admin_url="https://billing.example.test/admin/",
    whmcs_admin_link=Link("https://billing.example.test/admin/"),
)

SAMPLE_REQUEST: dict[str, Any] = dict(
    request_id=1,
    client_id=1,
    client_name="Jane Doe",
    clientname="Jane Doe",
    client_first_name="Jane",
    client_last_name="Doe",
    client_company_name="Doe Ltd",
    client_email="jane@example.test",
    service_id=1,
    service_product_name="VPS 4GB",
    product_name="VPS 4GB",
    service_domain="vps1.example.test",
    service_next_due_date=format_date(dt.date(2026, 12, 1)),
    service_reg_date=format_date(dt.date(2025, 12, 1)),
    service_recurring_amount=format_amount(Decimal("10.00")),
    service_status="Active",
    service_billing_cycle="Monthly",
    service_cancellation_type="End of Billing Period",
    service_cancellation_type_name="End of Billing Period",
    service_cancellation_reason="Too expensive",
    service_cancellation_reason_code="too_expensive",
    service_cancellation_date=format_date(dt.date(2026, 12, 1)),
    service_is_immediate_cancellation=False,
    credit_amount=format_amount(Decimal("4.84")),  # a credit, so that its sentence is checked too
    addon_name="",  # a request for one add-on names it (the request emails)
)

# An add-on's fields (`outbox.addon_fields`), beside a request's.
SAMPLE_ADDON: dict[str, Any] = dict(
    addon_id=1,
    addon_name="Daily Backups",
    addon_status="Cancelled",
    addon_recurring_amount=format_amount(Decimal("2.00")),
    addon_next_due_date=format_date(dt.date(2026, 12, 1)),
)

# What a reminder adds to a request's fields (outbox.reminder_fields).
SAMPLE_REMINDER: dict[str, Any] = dict(reminder_days=7, days_until_cancellation=7)

SAMPLE_DIGEST: dict[str, Any] = dict(
    dict.fromkeys((*Run.COUNTS, "skipped"), 0),  # every count a template may name; the sample's below
    run_id=1, as_of=format_date(dt.date(2026, 12, 1)), status="completed with failures", trigger="cron",
    operator="root", host="billing1", started_at="2026-12-01 02:00 UTC", finished_at="2026-12-01 02:01 UTC",
    due=3, completed=1, retrying=1, failed=1, vetoed=1, late=1, max_days_late=2,
    late_by_days=[{"days": 2, "count": 1}],
    emails_queued=1, emails_sent=1, emails_retrying=1, emails_failed=1, emails_queued_now=0, emails_failed_total=1,
    delivery_error="",
    failures=[
        {"request_id": 7, "service_id": 7, "client_name": "Jane Doe", "domain": "vps7.example.test",
         "error": "TerminateAccount hook failed", "attempts": 5, "gave_up": True, "vetoed": False},
        {"request_id": 8, "service_id": 8, "client_name": "John Roe", "domain": "", "error": "vetoed by a hook",
         "attempts": 1, "gave_up": False, "vetoed": True},
    ],
    failures_not_listed=0,
    failed_emails=[{"id": 3, "template": "service_cancellation_confirmation", "to_address": "jane@example.test",
                    "error": "550 mailbox unavailable"}],
)


# --- templates ported from WHMCS (`cancelproc emails convert`) ---------------------------------

def template_for(file_name: str) -> str | None:
    """The message a WHMCS template file is for, from its name: "Cancellation Request
    Confirmation.tpl" or "cancellation_request_confirmation.txt"; None when it says none."""
    stem = re.sub(r"[^a-z0-9]+", "_", Path(file_name).stem.lower()).strip("_")
    return next((name for name, title in TEMPLATES.items()
                 if stem in (name, re.sub(r"[^a-z0-9]+", "_", title.lower()))), None)


def port_whmcs_template(source: str, name: str, *, subject: str | None = None, source_name: str = "",
                        company_name: str = "Example Hosting", signature: str = "") -> str:
    """A WHMCS email template (Smarty) as a cancelproc template of message `name`: the
    file's text. Raises SmartyError (what cannot be converted, where) or TemplateProblem
    (it names a merge field we do not have, or does not render with sample fields)."""
    body = convert(source)
    title = convert_line(subject if subject is not None else TEMPLATES[name])
    known = sample_fields(name, company_name, signature)
    for converted, part in ((title, "subject"), (body, "body")):
        missing = unknown_fields(converted, known)
        if missing:
            field, line, column = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise SmartyError(line, column, f"{{${field}}}: no merge field {field} in cancelproc's "
                                            f"{name}{more}; docs/templates.md lists them", part=part)
    html_part = body.html if re.search(r"<html\b", body.html, re.IGNORECASE) else \
        f"<!DOCTYPE html>\n<html><body>\n{body.html}\n</body></html>"
    origin = re.sub(r"[{}#%\n]", "_", source_name) or "a WHMCS template"
    text = (f"{{#- {TEMPLATES[name]}: converted from {origin} by `cancelproc emails convert`.\n"
            f"    docs/templates.md lists the merge fields and the blocks. -#}}\n"
            f"{{% block subject %}}{title.text}{{% endblock %}}\n"
            f"{{% block text %}}{body.text}{{% endblock %}}\n"
            f"{{% block html %}}{html_part}{{% endblock %}}\n")
    _check_ported(text, name, known)
    return text


def _check_ported(text: str, name: str, fields: Mapping[str, Any]) -> None:
    """Render the converted template once, as a run would, with sample fields."""
    with tempfile.TemporaryDirectory(prefix="cancelproc-convert-") as folder:
        (Path(folder) / f"{name}.jinja").write_text(text, encoding="utf-8")
        templates = EmailTemplates(Path(folder))
        with _time_limit(templates.check_seconds, f"converted template {name}"):
            templates.render(name, fields)


def write_template(path: Path, text: str, *, overwrite: bool = False) -> None:
    """Write a template file whole (a temporary file, then linked or renamed into place);
    an existing one only with `overwrite`. Raises InputError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    try:
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails when the file exists: never replaced unasked
    except FileExistsError:
        raise InputError(f"{path} exists; --force replaces it") from None
    finally:
        temporary.unlink(missing_ok=True)
