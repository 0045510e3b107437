"""Deliver the outbox: build each queued email, hand it to a backend, record the result.

At least once, never lost: one sender at a time (the delivery lease), and a send is
recorded only after it was made, so a crash between a send and its record sends that
email again (with the same Message-ID, so a mail client shows it once) and never loses
one. A row is marked sent once (`status = 'queued'` guard). How many a crash can send
again depends on the backend:

- SMTP: each message is recorded in its own small commit as soon as the server accepted
  it, so a kill resends at most the one message in flight.
- folder: a batch is synced, then recorded; but a file's name is fixed per outbox row, so
  a file already there under its final name (written by a sender killed before its
  record) is recorded as sent, not written twice: exactly once while the files stay in
  the folder. The next delivery removes the temp files a killed writer left behind.

The backends (smtp, folder, console) and the message built from a row are in `mailers.py`.

Staff queue failed emails again (`emails retry`): `retry_emails`, which takes a session
and never commits.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import Connection, Row, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from processor import lease
from processor.config import Settings
from processor.db import Database
from processor.errors import NotFound, StateError
from processor.mailers import Mailer, MailerDown, SendFailed, build_message
from processor.models import AuditAction, AuditEntity, AuditEntry, EmailStatus, OutboxEmail
from processor.retry import RetryPolicy
from processor.text import address_problem, header_problem

Clock = Callable[[], dt.datetime]
BATCH = 100  # emails read per query, and recorded per transaction by a backend that syncs by batch (folder)

E = OutboxEmail


@dataclass
class DeliveryReport:
    sent: int = 0
    retrying: int = 0  # failed this time, queued for a later attempt
    failed: int = 0  # given up (or refused as unsafe): named in the digest
    queued: int = 0  # queued and not tried by this delivery (not due yet, or delivery stopped); not `retrying`
    stopped: str | None = None  # why delivery stopped early (server down, ...)
    failed_emails: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.retrying or self.failed or self.stopped)


_COLUMNS = (E.id, E.key, E.template, E.request_id, E.to_address, E.from_address, E.subject, E.text_body,
            E.html_body, E.attempts, E.created_at)


# An email sent is recorded as sent, even when its request was withdrawn while the email
# was in flight (outbox.withdraw_queued_emails): the record must not say it never went.
_SENDABLE = (EmailStatus.QUEUED, EmailStatus.WITHDRAWN)
# Built once (SQLAlchemy then reuses its compiled form): recorded per message over SMTP.
_MARK_ONE_SENT = update(E).where(E.id == bindparam("email_id"), E.status.in_(_SENDABLE)).values(
    status=EmailStatus.SENT, sent_at=bindparam("now"), attempts=E.attempts + 1, last_error=None,
    next_attempt_at=None)
_STATUS_OF_ONE = select(E.status).where(E.id == bindparam("email_id"))


class Deliverer:
    """Sends what the outbox holds. Everything it needs is passed in."""

    def __init__(self, db: Database, mailer: Mailer, settings: Settings, *, clock: Clock,
                 me: lease.Holder | None = None) -> None:
        self.db = db
        self.mailer = mailer
        self.settings = settings
        self.clock = clock
        self.me = me or lease.Holder.this_process()
        email = settings.email
        self.retry = RetryPolicy(email.max_attempts, email.retry_backoff_minutes, email.retry_backoff_max_minutes)
        self.log = structlog.get_logger("cancelproc.email")

    def deliver_request(self, request_id: int) -> DeliveryReport:
        """Send the emails queued about one request (those `requests create` just queued).
        Raises LeaseHeld when another sender is at work (it sends them)."""
        with self.db.read_engine.connect() as conn:
            ids = list(conn.scalars(select(E.id).where(E.request_id == request_id, E.status == EmailStatus.QUEUED)
                                    .order_by(E.id)))
        return self.deliver(ids=ids) if ids else DeliveryReport()

    def deliver(self, *, limit: int | None = None, ignore_backoff: bool = False,
                ids: list[int] | None = None) -> DeliveryReport:
        """Send queued emails (those whose next attempt time has come, unless ignore_backoff),
        in id order. Raises LeaseHeld when another sender is at work."""
        seconds = self.settings.lease_seconds
        with self.db.session.begin() as session:
            lease.acquire_delivery(session, clock=self.clock, seconds=seconds, me=self.me)
        report = DeliveryReport()
        try:
            self.mailer.start()
            after_id, remaining = 0, limit
            while remaining is None or remaining > 0:
                size = BATCH if remaining is None else min(BATCH, remaining)
                rows = self._due(after_id, size, ignore_backoff, ids)
                if not rows:
                    break
                results = self._durable(self._send_batch(rows, report), report)
                self._record(results, report)
                if report.stopped:
                    break
                after_id = rows[-1].id
                if remaining is not None:
                    remaining -= len(rows)
        finally:
            self.mailer.close()
            with self.db.session.begin() as session:
                lease.release_delivery(session, self.me)
        with self.db.read_engine.connect() as conn:
            queued = conn.scalar(select(func.count()).where(E.status == EmailStatus.QUEUED)) or 0
        # The retrying ones are queued too: counted once, as retrying (README, "Email counts").
        report.queued = max(0, queued - report.retrying)
        self.log.info("emails delivered", via=self.mailer.description, sent=report.sent, retrying=report.retrying,
                      failed=report.failed, still_queued=report.queued, stopped=report.stopped)
        return report

    def _due(self, after_id: int, size: int, ignore_backoff: bool, ids: list[int] | None) -> list[Row[Any]]:
        stmt = select(*_COLUMNS).where(E.status == EmailStatus.QUEUED, E.id > after_id).order_by(E.id).limit(size)
        if not ignore_backoff:
            stmt = stmt.where(or_(E.next_attempt_at.is_(None), E.next_attempt_at <= self.clock()))
        if ids is not None:
            stmt = stmt.where(E.id.in_(ids))
        with self.db.read_engine.connect() as conn:
            rows: list[Row[Any]] = list(conn.execute(stmt))
            return rows

    def _send_batch(self, rows: list[Row[Any]], report: DeliveryReport) -> list[tuple[Row[Any], str | None, bool]]:
        """Send each row: the outcomes still to record, (row, error or None, permanent).
        A send the mailer has for good at once (SMTP) is recorded right away instead, in its
        own commit on a connection kept for the batch: a kill then sends again at most the
        one in flight. Stops at MailerDown."""
        if not self.mailer.durable_at_send:
            return self._send_rows(rows, report, None)
        with self.db.engine.connect() as conn:
            return self._send_rows(rows, report, conn)

    def _send_rows(self, rows: list[Row[Any]], report: DeliveryReport,
                   record_now: Connection | None) -> list[tuple[Row[Any], str | None, bool]]:
        results: list[tuple[Row[Any], str | None, bool]] = []
        company = self.settings.email.company_name
        for row in rows:
            problem = address_problem(row.to_address)
            problem = f"recipient {problem}" if problem else (
                f"subject {p}" if (p := header_problem(row.subject)) else None)
            if problem:
                results.append((row, f"refused, never sent: {problem} (header injection)", True))
                continue
            if record_now is not None and not self._still_queued(record_now, row.id):
                continue  # withdrawn with its request since the batch was read: not sent
            try:
                self.mailer.send(build_message(row, company), sender=row.from_address, recipient=row.to_address,
                                 name=f"{row.id:08d}-{row.template}")
                if record_now is None:
                    results.append((row, None, False))
                else:
                    self._record_sent_now(record_now, row.id, report)
            except SendFailed as exc:
                results.append((row, str(exc), exc.permanent))
            except MailerDown as exc:
                results.append((row, str(exc), False))
                report.stopped = str(exc)
                break
        return results

    @staticmethod
    def _still_queued(conn: Connection, email_id: int) -> bool:
        """Read just before an SMTP send, which takes a round trip each: a batch's later
        emails may have been withdrawn while the earlier ones went. (A batch to the folder
        is written at once after it is read: what is withdrawn meanwhile was in flight.)"""
        status = conn.execute(_STATUS_OF_ONE, {"email_id": email_id}).scalar_one()
        conn.rollback()  # ends the read: the next check sees what was committed since
        return bool(status == EmailStatus.QUEUED)

    def _durable(self, results: list[tuple[Row[Any], str | None, bool]],
                 report: DeliveryReport) -> list[tuple[Row[Any], str | None, bool]]:
        """Recorded as sent only once the mailer has it for good. If it cannot sync the
        batch, its sent emails are not recorded: they stay queued as they were (no attempt
        counted: they are not at fault) and go again next time. Its failures stand."""
        sent = sum(error is None for _, error, _ in results)
        if not sent:
            return results
        try:
            self.mailer.flush()
        except MailerDown as exc:
            report.stopped = report.stopped or str(exc)
            self.log.error("email delivery stopped: sent emails could not be made durable; they stay queued",
                           error=str(exc), emails=sent)
            return [result for result in results if result[1] is not None]
        return results

    def _record_sent_now(self, conn: Connection, email_id: int, report: DeliveryReport) -> None:
        """One accepted message in its own commit: a prepared statement, on the batch's
        connection (a third of the cost of building and checking out one per message).
        PostgreSQL does not wait for this commit's WAL flush (synchronous_commit off for
        this transaction only): once committed, our own death cannot undo it; a crash of
        the database server itself may lose the last moment's records, whose emails are
        then sent again, never lost."""
        if self.db.is_postgresql:
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
        conn.execute(_MARK_ONE_SENT, {"email_id": email_id, "now": self.clock()})
        conn.commit()
        report.sent += 1

    def _mark_sent(self, conn: Connection, ids: list[int], now: dt.datetime, report: DeliveryReport) -> None:
        conn.execute(update(E).where(self.db.in_ids(E.id, ids), E.status.in_(_SENDABLE)).values(
            status=EmailStatus.SENT, sent_at=now, attempts=E.attempts + 1, last_error=None, next_attempt_at=None))
        report.sent += len(ids)

    def _record(self, results: list[tuple[Row[Any], str | None, bool]], report: DeliveryReport) -> None:
        """The batch's outcomes in one transaction; renews the delivery lease."""
        now = self.clock()
        sent = [row.id for row, error, _ in results if error is None]
        with self.db.engine.begin() as conn:
            if sent:
                self._mark_sent(conn, sent, now, report)
            for row, error, permanent in results:
                if error is None:
                    continue
                decision = self.retry.after_failure(row.attempts + 1, now)
                give_up = permanent or decision.give_up
                conn.execute(update(E).where(E.id == row.id, E.status == EmailStatus.QUEUED).values(
                    status=EmailStatus.FAILED if give_up else EmailStatus.QUEUED, attempts=E.attempts + 1,
                    last_error=error, next_attempt_at=None if give_up else decision.next_attempt_at))
                if give_up:
                    report.failed += 1
                    report.failed_emails.append({"id": row.id, "template": row.template, "to_address": row.to_address,
                                                 "error": error})
                    conn.execute(insert(AuditEntry).values(
                        at=now, actor="cancelproc", request_id=row.request_id, entity=AuditEntity.EMAIL,
                        entity_id=row.id, action=AuditAction.FAILED,
                        detail=f"{row.template} to {row.to_address}: {error}"
                        + ("" if permanent else f"; gave up after {row.attempts + 1} attempts")))
                    self.log.warning("email failed for good", email_id=row.id, to=row.to_address, error=error)
                else:
                    report.retrying += 1
                    self.log.warning("email not sent; will retry", email_id=row.id, to=row.to_address, error=error,
                                     next_attempt_at=str(decision.next_attempt_at))
            lease.renew_delivery(conn, now=now, seconds=self.settings.lease_seconds, me=self.me)


def get_email(session: Session, email_id: int) -> OutboxEmail:
    email = session.get(OutboxEmail, email_id)
    if email is None:
        raise NotFound(f"email {email_id} not found")
    return email


def retry_emails(session: Session, email_ids: Sequence[int] | None, *, actor: str, now: dt.datetime) -> int:
    """Queue failed emails again, attempts reset, each with an audit row; the next run or
    `emails send` sends them. `email_ids` None: every failed email. Returns how many."""
    if email_ids is None:
        emails = list(session.scalars(select(OutboxEmail).where(OutboxEmail.status == EmailStatus.FAILED)))
    else:
        emails = [get_email(session, i) for i in email_ids]
        for e in emails:
            if e.status is not EmailStatus.FAILED:
                raise StateError(f"email {e.id} is {e.status.value}; only a failed email can be retried")
    for e in emails:
        session.add(AuditEntry(at=now, actor=actor, request_id=e.request_id, entity=AuditEntity.EMAIL, entity_id=e.id,
                               action=AuditAction.RETRY, detail=f"was failed: {e.last_error or '-'}"))
        e.status, e.attempts, e.next_attempt_at = EmailStatus.QUEUED, 0, None
    return len(emails)
