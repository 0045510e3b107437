"""`run --dry-run`: what the run would do to each due request, reading only (no lease).

Each request is decided as the run would (vetoes and the email included; TerminateAccount
is never called), chunk by chunk, so memory stays flat however many are due.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

from processor.due import business_today, effective_date, period_end
from processor.run.decide import Decider, orphan_outcome
from processor.run.outcome import Action, RunOptions
from processor.run.store import Reading, due_chunks

# The preview's columns, in order (the table and each JSON item).
PREVIEW_COLUMNS = ["request_id", "service_id", "addon_id", "client", "product", "domain", "type", "due_on", "days_late",
                   "action", "addons", "unpaid_invoices", "email_to", "detail"]


def preview(reading: Reading, decider: Decider, options: RunOptions, *, now: dt.datetime, chunk_size: int,
            cancel_unpaid_invoices: bool, zone: ZoneInfo) -> Iterator[dict[str, Any]]:
    """Each due request as a PREVIEW_COLUMNS dict, then each orphan (which the run would
    fail). `reading()` opens a read-only store for one short transaction."""
    fields = decider.run_fields(options.as_of)
    shown = 0
    for rows in due_chunks(reading, options, now, chunk_size):
        shown += len(rows)
        service_ids = [row.service_id for row in rows]
        with reading() as store:
            addons = store.open_addons(service_ids)
            invoices = store.unpaid_invoices(service_ids) if cancel_unpaid_invoices else {}
        for row in rows:
            o = decider.decide(row, options.as_of, fields, dry_run=True)
            cancel = o.action is Action.CANCEL
            alone = row.addon_id is not None  # a request for one add-on: that add-on alone, no invoice
            yield {
                "request_id": row.id, "service_id": row.service_id, "addon_id": row.addon_id,
                "client": f"{row.first_name} {row.last_name}".strip(), "product": row.product_name,
                "domain": row.domain, "type": str(row.type),
                "due_on": effective_date(row.type, period_end(row.next_due_date, row.addon_id, row.addon_next_due_date),
                                         row.cancel_on, business_today(row.created_at, zone)),
                "days_late": o.days_late, "action": str(o.action),
                "addons": (row.addon_name if alone else ", ".join(addons.get(row.service_id, []))) if cancel else "",
                "unpaid_invoices": ", ".join(invoices.get(row.service_id, [])) if cancel and not alone else "",
                "email_to": o.email.to_address if o.email else "",
                "detail": o.error or (o.email.subject if o.email else
                                      f"email aborted by {o.email_aborted_by}" if o.email_aborted_by else
                                      o.noop_reason or f"service already {row.service_status.value}"),
            }
    limit = None if options.limit is None else options.limit - shown
    if limit is not None and limit <= 0:
        return
    with reading() as store:
        orphans = store.orphans(options, limit)
    for orphan in orphans:
        o = orphan_outcome(orphan)
        yield {"request_id": o.request_id, "service_id": o.service_id, "addon_id": None, "client": "", "product": "",
               "domain": "", "type": "", "due_on": None, "days_late": 0, "action": str(Action.ERROR),
               "addons": "", "unpaid_invoices": "", "email_to": "", "detail": o.error}
