"""`cancelproc emails ...`: the outbox, previews and delivery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from sqlalchemy import select

from processor import outbox
from processor.cli.app import App, cli, pass_app, utc_now
from processor.cli.arguments import COUNT, ID, REQUEST, FreeTextType, LanguageType
from processor.cli.listing import echo_page, fetch_page, page_options
from processor.cli.output import echo_fields, echo_json, log_report
from processor.delivery import DeliveryReport, get_email, retry_emails
from processor.digest import preview_digest
from processor.emails import (
    CRON_JOB_ACTIVITY,
    TEMPLATES,
    language_folders,
    port_whmcs_template,
    template_for,
    write_template,
)
from processor.errors import (
    InputError,
)
from processor.mailers import build_message, message_id
from processor.models import (
    EmailStatus,
    OutboxEmail,
)
from processor.smarty import SmartyError

MAX_SUBJECT = 998  # the longest line an email may have (RFC 5322)


def _email_row(e: OutboxEmail) -> dict[str, Any]:
    return {"id": e.id, "key": e.key, "template": e.template, "request_id": e.request_id, "run_id": e.run_id,
            "to": e.to_address, "from": e.from_address, "subject": e.subject, "status": e.status,
            "attempts": e.attempts, "last_error": e.last_error, "next_attempt_at": e.next_attempt_at,
            "created_at": e.created_at, "sent_at": e.sent_at,
            "message_id": message_id(e.id, e.key, e.created_at, e.from_address)}


@cli.group("emails")
def emails_group() -> None:
    """The email outbox: list, show, preview, send and retry emails.

    \b
    Examples:
      cancelproc emails list --status failed
      cancelproc emails retry --all-failed
    """


@emails_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in EmailStatus]), help="Only emails in this state.")
@click.option("--request", "request_id", type=REQUEST, help="Only emails about this request (id or ext:ID).")
@click.option("--template", type=click.Choice(list(TEMPLATES)), help="Only this message.")
@page_options(50)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: total, limit, offset and rows (docs/json.md).")
@pass_app
def emails_list(app: App, status: str | None, request_id: int | None, template: str | None, limit: int, offset: int,
                as_json: bool) -> None:
    """List emails, newest first.

    \b
    Examples:
      cancelproc emails list --status failed
      cancelproc emails list --request ext:R-1001 --json
    """
    query = select(OutboxEmail).order_by(OutboxEmail.id.desc())
    if status:
        query = query.where(OutboxEmail.status == EmailStatus(status))
    if request_id is not None:
        query = query.where(OutboxEmail.request_id == request_id)
    if template:
        query = query.where(OutboxEmail.template == template)
    with app.database().read_session() as session:
        page = fetch_page(session, query, _email_row, limit=limit, offset=offset)
    echo_page(page, ["id", "template", "request_id", "to", "status", "attempts", "created_at", "sent_at",
                     "last_error"], as_json=as_json, empty="no emails")


@emails_group.command("show")
@click.argument("email_id", type=ID)
@click.option("--raw", is_flag=True, help="The whole message as it is sent (headers, text and HTML parts).")
@click.option("--html", is_flag=True, help="The HTML part instead of the text.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, with the text and HTML (docs/json.md).")
@pass_app
def emails_show(app: App, email_id: int, raw: bool, html: bool, as_json: bool) -> None:
    """One email: its state and its text (or HTML, or the raw message).

    \b
    Examples:
      cancelproc emails show 7
      cancelproc emails show 7 --raw
    """
    with app.database().read_session() as session:
        email = get_email(session, email_id)
        row = _email_row(email)
        row.update(text=email.text_body, html=email.html_body)
        message = build_message(email, app.settings.email.company_name) if raw else None
    if as_json:
        echo_json(row)
    elif message is not None:
        click.echo(message.as_string(), nl=False)
    else:
        echo_fields([(k, row[k]) for k in ("id", "key", "template", "request_id", "run_id", "from", "to", "subject",
                                           "message_id", "status", "attempts", "last_error", "next_attempt_at",
                                           "created_at", "sent_at")])
        click.echo()
        click.echo(row["html"] if html else row["text"])


@emails_group.command("preview")
@click.argument("template", type=click.Choice(list(TEMPLATES)), metavar="TEMPLATE")
@click.option("--request", "request_id", type=REQUEST, help="Render it for this request (client and request emails).")
@click.option("--run", "run_id", type=ID, help="Render it for this run (cron_job_activity).")
@click.option("--language", type=LanguageType(),
              help="Use this language's templates and dates instead of the client's (e.g. de, de_AT).")
@click.option("--html", is_flag=True, help="Print the HTML part instead of the text.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: template, file, to, subject, text, html (docs/json.md).")
@pass_app
def emails_preview(app: App, template: str, request_id: int | None, run_id: int | None, language: str | None,
                   html: bool, as_json: bool) -> None:
    """Render TEMPLATE with real data, as it would be queued now; nothing is written.

    \b
    Templates: cancellation_request_confirmation, new_cancellation_request,
    service_cancellation_confirmation (each --request ID), cron_job_activity (--run ID).

    \b
    Examples:
      cancelproc emails preview cancellation_request_confirmation --request ext:R-1001
      cancelproc emails preview cron_job_activity --run 12 --html
    """
    composer = app.composer()
    if template == CRON_JOB_ACTIVITY:
        if run_id is None or request_id is not None:
            raise click.UsageError(f"{template} needs --run RUN_ID (and no --request)")
        with app.database().read_engine.connect() as conn:
            composed = preview_digest(conn, composer, run_id, now=utc_now(), settings=app.settings)
    else:
        if request_id is None or run_id is not None:
            raise click.UsageError(f"{template} needs --request REQUEST_ID (and no --run)")
        with app.database().read_session() as session:
            composed, language = outbox.preview_request_email(session, template, request_id, composer=composer,
                                                              settings=app.settings, today=app.today(),
                                                              language=language)
    email = composed.email
    if email is None:
        raise InputError(f"{template}: an EmailPreSend hook ({composed.aborted_by}) would abort this email")
    if as_json:
        echo_json({"template": template, "file": app.templates.filename(template, language), "to": email.to_address,
                   "subject": email.subject, "text": email.text_body, "html": email.html_body})
        return
    click.echo(f"To: {email.to_address}\nSubject: {email.subject}\n")
    click.echo(email.html_body if html else email.text_body)


def _echo_delivery(report: DeliveryReport) -> None:
    click.echo(f"{report.sent} sent, {report.retrying} will be retried, {report.failed} failed for good, "
               f"{report.queued} still queued")
    for e in report.failed_emails:
        click.echo(f"  email {e['id']} ({e['template']}) to {e['to_address']}: {e['error']} [FAILED]")
    if report.stopped:
        click.echo(f"error: delivery stopped: {report.stopped}; the rest stays queued", err=True)


@emails_group.command("send")
@click.option("--limit", type=COUNT, help="Send at most N emails.")
@click.option("--now", "ignore_backoff", is_flag=True,
              help="Also send emails waiting for their next attempt after a failed send.")
@click.option("--json", "as_json", is_flag=True, help="Print the delivery's counts as one JSON object (docs/json.md).")
@pass_app
def emails_send(app: App, limit: int | None, ignore_backoff: bool, as_json: bool) -> int:
    """Send queued emails now (a run also sends them at its end).

    Exit 0 when everything due was sent, 1 when some could not be (they stay queued
    with their error, or failed for good after max_attempts), 75 when another sender
    is at work.

    \b
    Examples:
      cancelproc emails send
      cancelproc emails send --now --json
    """
    try:
        report = app.deliverer().deliver(limit=limit, ignore_backoff=ignore_backoff)
    finally:
        app.write_metrics()
    data = {k: getattr(report, k) for k in ("sent", "retrying", "failed", "queued", "stopped", "failed_emails")}
    if as_json:
        echo_json(data)
    elif app.json_logs:  # cron, systemd: one more JSON line of the log
        log_report("delivery summary", data, problem=not report.ok)
    else:
        _echo_delivery(report)
    return 0 if report.ok else 1


@emails_group.command("retry")
@click.argument("email_ids", type=ID, nargs=-1)
@click.option("--all-failed", is_flag=True, help="Every failed email.")
@pass_app
def emails_retry(app: App, email_ids: tuple[int, ...], all_failed: bool) -> None:
    """Queue failed emails again (attempts reset); the next run or `emails send` sends them.

    \b
    Examples:
      cancelproc emails retry 7 8
      cancelproc emails retry --all-failed
    """
    if bool(email_ids) == all_failed:
        raise click.UsageError("give EMAIL_IDS or --all-failed (not both)")
    with app.database().session.begin() as session:
        count = retry_emails(session, None if all_failed else email_ids, actor=app.operator, now=utc_now())
    click.echo(f"{count} email(s) queued again; `cancelproc emails send` sends them now")


@emails_group.command("convert")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--template", "name", type=click.Choice(list(TEMPLATES)),
              help="The message it is for (default: from FILE's name, e.g. 'Cancellation Request Confirmation.tpl').")
@click.option("--language", type=LanguageType(), help="Write it as this language's template (<folder>/<language>/).")
@click.option("--subject", type=FreeTextType(MAX_SUBJECT),
              help="The subject, Smarty as in WHMCS (default: the message's WHMCS title).")
@click.option("--force", is_flag=True, help="Replace the template if the folder has one already.")
@pass_app
def emails_convert(app: App, file: Path, name: str | None, language: str | None, subject: str | None,
                   force: bool) -> None:
    """Convert a WHMCS email template (Smarty) into a template in your templates folder.

    \b
    FILE is the template's body as WHMCS has it (HTML or plain text): {$var} and
    {$var|modifier}, {if}/{elseif}/{else}, {foreach}, {literal}. The text part is made
    from the HTML, as WHMCS does. What cannot be converted is named with its line and
    column, and nothing is written. The result is rendered once with sample fields.

    \b
    Examples:
      cancelproc emails convert "Cancellation Request Confirmation.tpl"
      cancelproc emails convert confirm-de.tpl --template cancellation_request_confirmation --language de
    """
    name = name or template_for(file.name)
    if name is None:
        raise click.UsageError(f"{file.name}: which message is it? Give --template ({', '.join(TEMPLATES)})")
    folder = app.settings.email.templates_dir
    if not folder:
        raise InputError('email.templates_dir is "" (no templates folder of your own): set it to convert into it')
    try:
        source = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{file}: cannot be read: {exc.strerror}") from None
    email = app.settings.email
    try:
        text = port_whmcs_template(source, name, subject=subject, source_name=file.name,
                                   company_name=email.company_name, signature=email.signature)
    except SmartyError as exc:
        raise InputError(f"{'--subject' if exc.part == 'subject' else file}: {exc}") from None
    except InputError as exc:
        raise InputError(f"{file}: {exc}") from None
    target = app.settings.path(folder) / (language_folders(language)[0] if language else "") / f"{name}.jinja"
    write_template(target, text, overwrite=force)
    click.echo(f"wrote {target}; try it: cancelproc emails preview {name} "
               f"{'--run RUN_ID' if name == CRON_JOB_ACTIVITY else '--request REQUEST_ID'}"
               f"{f' --language {language}' if language else ''}")
