"""Reminders before a cancellation takes effect: the email `cancellation_reminder`.

Setting `reminder_days` ([7, 1] by default; per product in `[products."ID"]`; [] sends
none): a pending End of Billing Period or On Date request whose effective date is k days
after the run's as-of date, k in its product's list, gets the reminder for k, queued by
the run. The rules a support team expects:

- Exactly once per request and k: the outbox key `cancellation_reminder:request:<id>:<k>`
  is unique, and the keys a request already has are read before composing.
- After missed nights only the latest reminder due goes out, never a burst: the reminder
  due is the smallest k at or above the days left. Runs skipped from 8 days ahead to 1
  day ahead send the 1-day reminder only; the 7-day one is never sent late after it.
- A reminder is due only if the request existed on its day (created on or before the
  effective date minus k): a request made 3 days before its date gets the 1-day
  reminder, not a "7-day" one the next night (its confirmation has just told the date).
- Never for a request that is due (the cancellation is its email) or no longer pending:
  the write re-reads which requests are still pending under the write lock (and on
  PostgreSQL locks them), so a withdrawal either comes first (no reminder) or finds the
  queued reminder and withdraws it (`outbox.withdraw_queued_emails`).

Per run: one candidate query per chunk (pending requests in id order on the index
`ix_cancellation_requests_status_id_effective_date`, with their effective date in the window of the
longest list), one query for the reminder keys they already have, and one write; nothing
per request in SQL. With every list empty, nothing at all.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection, Select, select

from processor.config import Settings
from processor.db import Database
from processor.due import ONE_DAY, business_today, start_of_day
from processor.emails import CANCELLATION_REMINDER
from processor.errors import one_line
from processor.hooks import HookFailed, HookRegistry
from processor.models import CancellationRequest, OutboxEmail, RequestStatus, RequestType
from processor.outbox import Composer, QueuedEmail, UnsafeEmail, email_key, queue, request_fields
from processor.params import ModuleParams, plain_rows, request_params, request_select
from processor.run.store import Reading

R = CancellationRequest
log = structlog.get_logger("cancelproc.run")

_SELECT = request_select(for_hooks=True)
_HOOK_ROW_WIDTH = len(_SELECT.selected_columns)  # the columns `params.request_params` unpacks


def reminder_key(request_id: int, days: int) -> str:
    """The outbox key of request `request_id`'s reminder `days` before its effective date."""
    return f"{email_key(CANCELLATION_REMINDER, 'request', request_id)}:{days}"


def reminder_due(days_list: Sequence[int], effective_on: dt.date, created_on: dt.date, as_of: dt.date) -> int | None:
    """Which reminder of `days_list` is due at `as_of` for a request taking effect on
    `effective_on`: the latest one (smallest k) whose day has come and that the request
    existed for; None if none (not yet, already due, or made after every reminder day)."""
    days_left = (effective_on - as_of).days
    if days_left <= 0:
        return None  # due: the cancellation itself is the email
    due = [k for k in days_list if k >= days_left and effective_on - dt.timedelta(days=k) >= created_on]
    return min(due) if due else None


@dataclass(frozen=True)
class Reminder:
    """One reminder to queue (or, in a dry run, to show)."""

    row: Any  # the candidate row: `params.request_select(for_hooks=True)` columns, then effective_on
    effective_on: dt.date
    days: int  # the reminder_days entry it is for
    days_left: int  # days from as_of to effective_on (days < days_left never; after missed nights days > it)
    key: str


@dataclass
class Composed:
    """A reminder after its hooks: the email, or why there is none."""

    reminder: Reminder
    email: QueuedEmail | None = None
    aborted_by: str | None = None  # a CancellationReminder or EmailPreSend hook said abortsend
    error: str | None = None  # a hook failed, or the address or subject was refused


@dataclass
class ReminderTally:
    """What the reminders of a run came to (RunSummary: reminders_queued and the others)."""

    queued: int = 0
    aborted: int = 0
    failed: int = 0


class Reminders:
    """Finds, composes and queues a run's reminders. Everything it needs is passed in."""

    def __init__(self, settings: Settings, composer: Composer, hooks: HookRegistry) -> None:
        self.settings = settings
        self.composer = composer
        self.hooks = hooks
        lists = [settings.reminder_days, *(p.reminder_days for p in settings.products.values()
                                           if p.reminder_days is not None)]
        # The window of the candidate query: a request further ahead has no reminder due.
        self.horizon = max((max(days) for days in lists if days), default=0)
        self._days_by_product: dict[int, list[int]] = {}

    @property
    def enabled(self) -> bool:
        """Some product has reminders (every list [] : no query at all)."""
        return self.horizon > 0

    # --- SQL -------------------------------------------------------------------------------

    def candidate_query(self, as_of: dt.date, after_id: int) -> Select:
        """Pending dated requests made by `as_of`, whose effective date is 1 to `horizon`
        days after it, in id order (the caller sets the limit)."""
        effective = R.effective_date  # stored; with the id in the scan's index, tested before the row is read
        zone = self.settings.zone
        return (_SELECT.add_columns(effective.label("effective_on"))
                # Not in a grace period: the suspension's email told the client the date, and
                # the service is off already (its effective date is the end of the grace period).
                .where(R.status == RequestStatus.PENDING, R.id > after_id, R.suspended_on.is_(None),
                       R.type.in_((RequestType.END_OF_BILLING_PERIOD, RequestType.ON_DATE)),
                       R.created_at < start_of_day(as_of + ONE_DAY, zone),
                       effective > as_of, effective <= as_of + dt.timedelta(days=self.horizon))
                .order_by(R.id))

    def candidates(self, conn: Connection, as_of: dt.date, after_id: int, size: int) -> list[Any]:
        return list(conn.execute(self.candidate_query(as_of, after_id).limit(size)).all())

    @staticmethod
    def sent_keys(conn: Connection, db: Database, request_ids: Sequence[int]) -> set[str]:
        """The reminder keys these requests already have in the outbox (any status)."""
        if not request_ids:
            return set()
        return set(conn.scalars(select(OutboxEmail.key).where(
            db.in_ids(OutboxEmail.request_id, request_ids), OutboxEmail.template == CANCELLATION_REMINDER)))

    # --- Python ----------------------------------------------------------------------------

    def days_for(self, row: Any) -> list[int]:
        """The reminder_days of the row's product (its table by external id or name, else the top-level)."""
        days = self._days_by_product.get(row.product_id)
        if days is None:
            found = self.settings.for_product(row.product_external_id, row.product_name).reminder_days
            days = self._days_by_product[row.product_id] = list(found or [])
        return days

    def plan(self, rows: Sequence[Any], sent: set[str], as_of: dt.date) -> list[Reminder]:
        """The reminders due at `as_of` among the candidate rows, leaving out those sent."""
        zone = self.settings.zone
        planned = []
        for row in rows:
            days = reminder_due(self.days_for(row), row.effective_on, business_today(row.created_at, zone), as_of)
            if days is None:
                continue
            key = reminder_key(row.id, days)
            if key not in sent:
                planned.append(Reminder(row, row.effective_on, days, (row.effective_on - as_of).days, key))
        return planned

    def compose(self, reminder: Reminder, as_of: dt.date, *, run_id: int | None, dry_run: bool = False) -> Composed:
        """The CancellationReminder hooks, then the email (EmailPreSend, template, header
        checks). Never raises: a failure is this reminder's alone."""
        row = reminder.row
        composer = self.composer
        try:
            writing = composer.writing(CANCELLATION_REMINDER, row.language)
            common = composer.common_fields(as_of, writing.language, cancellation_date=reminder.effective_on,
                                            reminder_days=reminder.days, days_until_cancellation=reminder.days_left)
            fields = request_fields(row, common, writing)
            if self.hooks.has("CancellationReminder"):
                hook_row = plain_rows([row[:_HOOK_ROW_WIDTH]], True)[0]
                # As at every per-request point of a run, WHMCS's module parameters ride along as
                # params["params"], built only if a hook reads them.
                params = request_params(hook_row, run_id=run_id, as_of=as_of, dry_run=dry_run, fields=fields,
                                        days=reminder.days, days_left=reminder.days_left,
                                        cancellation_date=reminder.effective_on, params=ModuleParams(hook_row))
                aborted_by = self.hooks.apply("CancellationReminder", params).stopped_by
                if aborted_by:
                    return Composed(reminder, aborted_by=aborted_by)
            composed = composer.compose(CANCELLATION_REMINDER, key=reminder.key, to_address=row.email, fields=fields,
                                        language=row.language, request_id=row.id, run_id=run_id, dry_run=dry_run)
        except (HookFailed, UnsafeEmail) as exc:
            return Composed(reminder, error=str(exc))
        except Exception as exc:  # a template or hook problem: this reminder's alone, logged
            return Composed(reminder, error=one_line(exc))
        return Composed(reminder, email=composed.email, aborted_by=composed.aborted_by)

    def write(self, conn: Connection, db: Database, composed: Sequence[Composed], *, run_id: int,
              now: dt.datetime) -> int:
        """Queue the composed reminders of requests still pending (re-read under the write
        lock; on PostgreSQL locked until the commit, so a withdrawal waits and then finds
        them queued). Returns how many were queued. The caller owns the transaction."""
        emails = [c.email for c in composed if c.email is not None]
        if not emails:
            return 0
        ids = [e.request_id for e in emails if e.request_id is not None]
        still_pending = set(conn.scalars(
            select(R.id).where(db.in_ids(R.id, ids), R.status == RequestStatus.PENDING).with_for_update()))
        emails = [e for e in emails if e.request_id in still_pending]
        queue(conn, emails, run_id=run_id, now=now, from_address=self.settings.email.from_address)
        return len(emails)

    # --- a run -----------------------------------------------------------------------------

    def chunks(self, reading: Reading, as_of: dt.date, size: int) -> Iterator[list[Reminder]]:
        """The run's reminders due, a chunk at a time (keyset over the candidates), each
        chunk read in its own short read transaction (`reading()`: a read-only RunStore)."""
        after_id = 0
        while True:
            with reading() as store:
                rows = self.candidates(store.conn, as_of, after_id, size)
                if not rows:
                    return
                planned = self.plan(rows, self.sent_keys(store.conn, store.db, [r.id for r in rows]), as_of)
            after_id = rows[-1].id
            if planned:
                yield planned
            if len(rows) < size:
                return

    def log_outcomes(self, composed: Sequence[Composed]) -> ReminderTally:
        """A line for each reminder not queued; the tally of those aborted or failed."""
        tally = ReminderTally()
        for c in composed:
            if c.error:
                tally.failed += 1
                log.warning("reminder not queued", request_id=c.reminder.row.id, days=c.reminder.days, error=c.error)
            elif c.email is None:
                tally.aborted += 1
                log.info("reminder aborted by a hook", request_id=c.reminder.row.id, days=c.reminder.days,
                         hook=c.aborted_by)
        return tally

