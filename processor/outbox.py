"""Queue emails: merge fields, EmailPreSend hooks, rendering, header checks, outbox rows.

An email is rendered when it is queued and written to the outbox in the same transaction
as the change it reports, under a unique key ("<template>:<entity>:<id>"), so it can
never be queued twice. delivery.py sends what is queued.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import Connection, Row, select
from sqlalchemy.orm import Session

from processor.config import EmailSettings, Settings
from processor.db import insert_rows
from processor.due import business_today
from processor.emails import (
    ADDON_CANCELLATION_CONFIRMATION,
    CANCELLATION_REMINDER,
    CRON_JOB_ACTIVITY,
    DEFAULT_SIGNATURES,
    NEW_REQUEST,
    REQUEST_CONFIRMATION,
    REQUEST_WITHDRAWN,
    SERVICE_CANCELLATION_CONFIRMATION,
    SERVICE_UNSUSPENDED,
    EmailTemplates,
    Link,
    Writing,
    for_language,
    format_date,
    sample_fields,
)
from processor.errors import InputError, NotFound, StateError
from processor.hooks import HookRegistry
from processor.models import (
    AuditAction,
    AuditEntity,
    AuditEntry,
    CancellationRequest,
    EmailStatus,
    OutboxEmail,
    RequestType,
)
from processor.params import request_select
from processor.text import address_problem, header_problem

OUTBOX = OutboxEmail.metadata.tables[OutboxEmail.__tablename__]


class QueuedEmail(NamedTuple):
    """An outbox row's own columns, rendered; those shared by a batch are bound once."""

    key: str
    template: str
    request_id: int | None
    to_address: str
    subject: str
    text_body: str
    html_body: str


class UnsafeEmail(InputError):
    """A recipient or subject that would break the message's headers (header injection)."""

    def __init__(self, message: str, *, header: str) -> None:
        super().__init__(message)
        self.header = header  # "recipient" or "subject"


def email_key(template: str, entity: str, entity_id: int) -> str:
    return f"{template}:{entity}:{entity_id}"


def request_fields(row: Row[Any], common: dict[str, Any], writing: Writing) -> dict[str, Any]:
    """The WHMCS merge fields of an email about one request (a `params.request_select` row),
    written as `writing` writes (`Composer.writing`: in the client's language when the
    message has a template in it, else the default; the default for staff emails).

    `common` holds the fields that do not come from the row: company_name, signature,
    date, service_cancellation_date, the URLs (see `Composer.common_fields`, in the same
    language), and service_status when the email reports a status other than the
    service's current one. In a run it is built once per language, not per request.
    """
    name = f"{row.first_name} {row.last_name}".strip()
    type_ = row.type._value_  # per request: an enum's plain `_value_`, not the `.value` property (five times the cost)
    return {
        "service_status": row.service_status._value_,
        "request_id": row.id,
        "client_id": row.client_id,
        "client_name": name,
        "clientname": name,  # WHMCS's New Cancellation Request spells it so
        "client_first_name": row.first_name,
        "client_last_name": row.last_name,
        "client_company_name": row.company_name,
        "client_email": row.email,
        "service_id": row.service_id,
        "service_product_name": row.product_name,
        "product_name": row.product_name,  # WHMCS's New Cancellation Request
        "service_domain": row.domain,
        "service_next_due_date": writing.date(row.next_due_date),
        "service_reg_date": writing.date(row.registration_date),
        "service_recurring_amount": writing.amount(row.amount),
        "service_billing_cycle": row.billing_cycle,
        "service_cancellation_type": type_,
        "service_cancellation_type_name": writing.type_names[type_],
        "service_cancellation_reason": row.reason,
        "service_cancellation_reason_code": row.reason_code,
        "service_is_immediate_cancellation": row.type is RequestType.IMMEDIATE,
        "addon_name": row.addon_name or "",  # a request for one add-on names it
        **common,
    }


def addon_fields(row: Any, writing: Writing) -> dict[str, Any]:
    """The merge fields of the add-on a request for one add-on names (a `request_select`
    row with the hooks' columns or without), beside `request_fields`: in the email that
    confirms it was cancelled."""
    return {
        "addon_id": row.addon_id,
        "addon_name": row.addon_name,
        "addon_status": "Cancelled",
        "addon_recurring_amount": writing.amount(row.addon_amount),
        "addon_next_due_date": writing.date(row.addon_next_due_date),
    }


class Composed(NamedTuple):
    email: QueuedEmail | None  # None: an EmailPreSend hook aborted it
    aborted_by: str | None = None  # that hook's name


# Our email templates by the names WHMCS gives its own (EmailPreSend's `messagename`).
WHMCS_TEMPLATE_NAMES = {
    REQUEST_CONFIRMATION: "Cancellation Request Confirmation",
    NEW_REQUEST: "New Cancellation Request",
    SERVICE_CANCELLATION_CONFIRMATION: "Service Cancellation Confirmation",
    ADDON_CANCELLATION_CONFIRMATION: "Addon Cancellation Confirmation",
    CRON_JOB_ACTIVITY: "Cron Job Activity",
}


class Composer:
    """EmailPreSend hooks, then the template, then the header checks: one email, ready to queue."""

    def __init__(self, templates: EmailTemplates, hooks: HookRegistry, settings: EmailSettings) -> None:
        self.templates = templates
        self.hooks = hooks
        self.settings = settings
        # The signature per language: the operator's, or the shipped default's translations
        # while the signature is the shipped default.
        default = settings.signature == EmailSettings.model_fields["signature"].default
        self._signatures = settings.signatures or (DEFAULT_SIGNATURES if default else {})

    def check(self, *templates: str) -> None:
        """Render these templates (each language's too) once with sample fields, under the
        time limit: what a run does for all of them at its start, for a command that renders
        just these (a template that loops for ever stops it with one line, not a hang)."""
        for name in templates:
            self.templates.check(name, sample_fields(name, self.settings.company_name, self.settings.signature))

    def writing(self, template: str, language: str | None) -> Writing:
        """How `template` for a client of `language` writes its values (None: staff)."""
        return Writing(self.templates.text_language(template, language), self.settings.currency)

    def common_fields(self, date: dt.date, language: str | None = None, *,
                      cancellation_date: dt.date | None = None, **more: Any) -> dict[str, Any]:
        """The merge fields not read from a request: the company's, and dates in `language`."""
        settings = self.settings
        fields = dict(company_name=settings.company_name, date=format_date(date, language),
                      signature=for_language(self._signatures, settings.signature, language),
                      currency=settings.currency, whmcs_url=settings.system_url,
                      whmcs_admin_url=settings.admin_url, whmcs_admin_link=Link(settings.admin_url),
                      credit_amount="")  # a run names a credit in the confirmation it composes (decide.py)
        fields.update(more)
        fields["service_cancellation_date"] = format_date(cancellation_date, language)
        return fields

    def compose(self, template: str, *, key: str, to_address: str, fields: dict[str, Any], language: str | None = None,
                request_id: int | None = None, run_id: int | None = None, dry_run: bool = False) -> Composed:
        """Raise UnsafeEmail for a recipient or subject that could inject headers, a hook's
        HookFailed, or TemplateProblem. `fields` may be changed (hooks add to it)."""
        problem = address_problem(to_address)
        if problem:
            raise UnsafeEmail(f"{template} to {to_address!r} refused: recipient {problem}", header="recipient")
        if self.hooks.has("EmailPreSend"):
            params: dict[str, Any] = {"template": template, "to_address": to_address, "fields": fields,
                                      "language": language, "request_id": request_id, "run_id": run_id,
                                      "dry_run": dry_run,
                                      # WHMCS's names: its template's name, the service (None for the
                                      # digest), and the merge fields (the same dict as `fields`).
                                      "messagename": WHMCS_TEMPLATE_NAMES.get(template, template),
                                      "relid": fields.get("service_id"), "mergefields": fields}
            aborted_by = self.hooks.apply("EmailPreSend", params).stopped_by  # other answers merge into fields
            if aborted_by:
                return Composed(None, aborted_by)
        rendered = self.templates.render(template, fields, language)
        problem = header_problem(rendered.subject)
        if problem:
            raise UnsafeEmail(f"{template} to {to_address} refused: subject {problem}", header="subject")
        return Composed(QueuedEmail(key, template, request_id, to_address, rendered.subject, rendered.text,
                                    rendered.html))


def queue(conn: Connection, emails: Sequence[QueuedEmail], *, run_id: int | None, now: dt.datetime,
          from_address: str) -> None:
    """Insert outbox rows, queued; the caller owns the transaction (the change they report)."""
    insert_rows(conn, OUTBOX, QueuedEmail._fields, emails,
                dict(run_id=run_id, status=EmailStatus.QUEUED, attempts=0, created_at=now, from_address=from_address))


def queue_request_emails(session: Session, request_id: int, *, composer: Composer, settings: Settings,
                         now: dt.datetime, actor: str,
                         templates: Sequence[str] = (REQUEST_CONFIRMATION, NEW_REQUEST)) -> list[str]:
    """The emails of a staff action on a request, queued in the caller's transaction: when
    it is recorded, the client's Cancellation Request Confirmation and the staff's New
    Cancellation Request; when it is withdrawn, the client's Cancellation Request Withdrawn
    (dated the day it is withdrawn). An email that a hook aborted or that is refused as
    unsafe is not queued but audited; the action stands. Returns a line for each email not
    queued."""
    composer.check(*templates)
    row = session.execute(request_select(for_hooks=False).where(CancellationRequest.id == request_id)).one()
    created_on = business_today(row.created_at, settings.zone)
    applied_on = row.effective_date  # stored when the request was made: what the client is told
    email = settings.email
    queued: list[QueuedEmail] = []
    not_queued: list[str] = []
    for template in templates:
        to_address, language = (email.staff_address, None) if template == NEW_REQUEST else (row.email, row.language)
        if not to_address:
            continue  # no staff address: no staff notice
        date = business_today(now, settings.zone) if template in (REQUEST_WITHDRAWN, SERVICE_UNSUSPENDED) \
            else created_on
        writing = composer.writing(template, language)
        fields = request_fields(
            row, composer.common_fields(date, writing.language, cancellation_date=applied_on,
                                        **_deferred(row, created_on)), writing)
        try:
            composed = composer.compose(template, key=email_key(template, "request", request_id), to_address=to_address,
                                        fields=fields, language=language, request_id=request_id)
        except UnsafeEmail as exc:
            not_queued.append(str(exc))
            action = AuditAction.REFUSED
        else:
            if composed.email is not None:
                queued.append(composed.email)
                continue
            not_queued.append(f"{template} not queued: abortsend from {composed.aborted_by}")
            action = AuditAction.ABORTED
        session.add(AuditEntry(at=now, actor=actor, request_id=request_id, entity=AuditEntity.EMAIL,
                               entity_id=request_id, action=action, detail=not_queued[-1]))
    queue(session.connection(), queued, run_id=None, now=now, from_address=email.from_address)
    return not_queued


def _deferred(row: Any, created_on: dt.date) -> dict[str, Any]:
    """An Immediate request a minimum term put off is not cancelled "within the next day":
    the templates then give its date (service_cancellation_date), as for the other types."""
    if row.type is RequestType.IMMEDIATE and row.effective_date > created_on:
        return {"service_is_immediate_cancellation": False}
    return {}


def withdraw_queued_emails(session: Session, request_id: int, *, now: dt.datetime, actor: str) -> list[OutboxEmail]:
    """The request was withdrawn: the emails about it still queued (its confirmation, the
    staff notice) are not sent. Each becomes `withdrawn`, saying why, with an audit row. An
    email a sender has in flight at this moment is recorded as sent once sent (delivery.py
    marks a withdrawn email sent): the record never says an email was not sent when it was."""
    emails = list(session.scalars(select(OutboxEmail).where(
        OutboxEmail.request_id == request_id, OutboxEmail.status == EmailStatus.QUEUED).order_by(OutboxEmail.id)))
    for e in emails:
        e.status, e.next_attempt_at = EmailStatus.WITHDRAWN, None
        e.last_error = f"not sent: request {request_id} was withdrawn while this was queued"
        session.add(AuditEntry(at=now, actor=actor, request_id=request_id, entity=AuditEntity.EMAIL, entity_id=e.id,
                               action=AuditAction.WITHDRAWN, detail=f"{e.template} to {e.to_address}: {e.last_error}"))
    return emails


def preview_request_email(session: Session, template: str, request_id: int, *, composer: Composer,
                          settings: Settings, today: dt.date,
                          language: str | None = None) -> tuple[Composed, str | None]:
    """A request's email as it would be queued now (EmailPreSend hooks see dry_run=True),
    and the language it was rendered in. Nothing is written. `language` overrides the client's."""
    composer.check(template)
    row = session.execute(request_select(for_hooks=False).where(CancellationRequest.id == request_id)).one_or_none()
    if row is None:
        if session.get(CancellationRequest, request_id) is None:
            raise NotFound(f"request {request_id} not found")
        raise StateError(f"request {request_id}: its service, client or product no longer exists "
                         "(deleted outside cancelproc); there is no email to preview")
    lang = language if language is not None else row.language
    applied_on: dt.date | None
    if template == SERVICE_CANCELLATION_CONFIRMATION:  # as the run sends it: cancelled today
        date, applied_on, status = today, today, "Cancelled"
    elif template == ADDON_CANCELLATION_CONFIRMATION:  # as the run sends it: the add-on cancelled today
        if row.addon_id is None:
            raise StateError(f"request {request_id} is for its whole service, not for one add-on: "
                             f"there is no {template} to preview")
        date, applied_on, status = today, today, None
    elif template in (REQUEST_WITHDRAWN, CANCELLATION_REMINDER):  # as sent today
        date, status = today, None
        applied_on = row.effective_date
    else:  # as sent when the request was made
        date = business_today(row.created_at, settings.zone)
        applied_on, status = row.effective_date, None
    to_address = settings.email.staff_address if template == NEW_REQUEST else row.email
    more: dict[str, Any] = {"service_status": status} if status else {}
    if template != SERVICE_CANCELLATION_CONFIRMATION:
        more.update(_deferred(row, business_today(row.created_at, settings.zone)))
    if template == CANCELLATION_REMINDER:  # as if today were its day (0 for an undated or past date)
        left = max(0, (applied_on - today).days) if applied_on else 0
        more.update(reminder_days=left, days_until_cancellation=left)
    lang = None if template == NEW_REQUEST else lang
    writing = composer.writing(template, lang)
    fields = request_fields(row, composer.common_fields(date, writing.language, cancellation_date=applied_on, **more),
                            writing)
    if template == ADDON_CANCELLATION_CONFIRMATION:
        fields.update(service_status=row.service_status.value, **addon_fields(row, writing))
    return composer.compose(template, key=email_key(template, "request", request_id), to_address=to_address,
                            fields=fields, language=lang, request_id=request_id, dry_run=True), lang
