"""`run --dry-run`: what the run would do to each due request, reading only (no lease).

Each request is decided as the run would (vetoes and the email included; TerminateAccount
and SuspendAccount are never called), chunk by chunk, so memory stays flat however many
are due. A request whose product has a grace period shows `suspend` (its add-ons and
invoices are not touched then); one whose grace period has ended, `cancel`. Then the
reminders the run would queue (action `remind`; CancellationReminder and EmailPreSend
hooks see dry_run=True).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

from processor.run.decide import Decider, orphan_outcome
from processor.run.outcome import Action, Outcome, RunOptions
from processor.run.reminders import Reminders
from processor.run.store import Reading, due_chunks, paid_for

# The preview's columns, in order (the table and each JSON item).
PREVIEW_COLUMNS = ["request_id", "service_id", "addon_id", "client", "product", "domain", "type", "due_on",
                   "days_late", "action", "addons", "unpaid_invoices", "credit", "email_to", "detail"]


# The action of a reminder's line (the requests' are outcome.Action values).
REMIND = "remind"


def _detail(o: Outcome, row: Any) -> str:
    """What the preview says of a request: its error, else its email (or why none)."""
    if o.error:
        return o.error
    said = (o.email.subject if o.email else f"email aborted by {o.email_aborted_by}" if o.email_aborted_by
            else o.noop_reason or f"service already {row.service_status.value}")
    return f"suspended until {o.grace_ends_on}, then cancelled; {said}" if o.action is Action.SUSPEND else said


def preview(reading: Reading, decider: Decider, options: RunOptions, *, now: dt.datetime, chunk_size: int,
            cancel_unpaid_invoices: bool, zone: ZoneInfo, credits: bool = False,
            reminders: Reminders | None = None) -> Iterator[dict[str, Any]]:
    """Each due request as a PREVIEW_COLUMNS dict, then each orphan (which the run would
    fail), then each reminder the run would queue. `reading()` opens a read-only store for
    one short transaction."""
    fields = decider.run_fields(options.as_of)
    shown = 0
    for rows in due_chunks(reading, options, now, chunk_size):
        shown += len(rows)
        service_ids = [row.service_id for row in rows]
        with reading() as store:
            addons = store.open_addons(service_ids)
            invoices = store.unpaid_invoices(service_ids) if cancel_unpaid_invoices else {}
            paid = store.last_paid(paid_for(rows)) if credits else {}
        for row in rows:
            o = decider.decide(row, options.as_of, fields, dry_run=True, paid=paid.get(row.service_id))
            cancel = o.action is Action.CANCEL
            alone = row.addon_id is not None  # a request for one add-on: that add-on alone, no invoice
            yield {
                "request_id": row.id, "service_id": row.service_id, "addon_id": row.addon_id,
                "client": f"{row.first_name} {row.last_name}".strip(), "product": row.product_name,
                "domain": row.domain, "type": str(row.type),
                "due_on": row.effective_date,  # in a grace period: its end (the suspension moved it)
                "days_late": o.days_late, "action": str(o.action),
                "addons": (row.addon_name if alone else ", ".join(addons.get(row.service_id, []))) if cancel else "",
                "unpaid_invoices": ", ".join(invoices.get(row.service_id, [])) if cancel and not alone else "",
                "credit": o.credit.amount if cancel and o.credit is not None else None,
                "email_to": o.email.to_address if o.email else "",
                "detail": _detail(o, row),
            }
    limit = None if options.limit is None else options.limit - shown
    if limit is None or limit > 0:
        yield from _orphans(reading, options, limit)
    if reminders is not None and reminders.enabled and options.request_ids is None:
        yield from _reminders(reading, reminders, options.as_of, chunk_size)


def _reminders(reading: Reading, reminders: Reminders, as_of: dt.date, chunk_size: int) -> Iterator[dict[str, Any]]:
    """The reminders the run would queue, composed as it would (nothing written)."""
    for planned in reminders.chunks(reading, as_of, chunk_size):
        for reminder in planned:
            c = reminders.compose(reminder, as_of, run_id=None, dry_run=True)
            row = reminder.row
            yield {"request_id": row.id, "service_id": row.service_id, "addon_id": row.addon_id,
                   "client": f"{row.first_name} {row.last_name}".strip(), "product": row.product_name,
                   "domain": row.domain, "type": str(row.type), "due_on": reminder.effective_on, "days_late": 0,
                   "action": REMIND, "addons": "", "unpaid_invoices": "", "credit": None,
                   "email_to": c.email.to_address if c.email else "",
                   "detail": c.error or (f"{reminder.days}-day reminder ({reminder.days_left} days left): "
                                         f"{c.email.subject}" if c.email else
                                         f"{reminder.days}-day reminder aborted by {c.aborted_by}")}


def _orphans(reading: Reading, options: RunOptions, limit: int | None) -> Iterator[dict[str, Any]]:
    with reading() as store:
        orphans = store.orphans(options, limit)
    for orphan in orphans:
        o = orphan_outcome(orphan)
        yield {"request_id": o.request_id, "service_id": o.service_id, "addon_id": None, "client": "", "product": "",
               "domain": "", "type": "", "due_on": None, "days_late": 0, "action": str(Action.ERROR),
               "addons": "", "unpaid_invoices": "", "credit": None, "email_to": "", "detail": o.error}
