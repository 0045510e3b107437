"""The effective date of imported requests: computed once, as `requests create` does.

A new request gets its date from its service and its product's notice period and minimum
term (terms.effective_on), counted from the day the client asked (requested_at, else the
import's time) in the business time zone. A request the file changes gets a new date only
when what the date depends on in the request itself changes (type, cancel_on,
requested_at, its service): the change then shows in its import_updated audit entry, old
and new. A service's next due date changed by an import moves no request: the client was
told the date when the request was made.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from processor.due import business_today
from processor.importer.plan import Plan
from processor.models import Product, Service
from processor.terms import TermsOf, effective_on

# The request's own values its date depends on.
DEPENDS_ON = ("type", "cancel_on", "created_at", "service_id")


def add_effective_dates(s: Session, plan: Plan, *, now: dt.datetime, zone: ZoneInfo, terms_of: TermsOf) -> None:
    """Put `effective_date` into the plan's request inserts and, where it moves, updates."""
    updates = [u for u in plan.updates if any(name in u.changes for name in DEPENDS_ON)]
    if not plan.inserts and not updates:
        return
    services = _services(s, {i.values["service_id"] for i in plan.inserts}
                         | {u.values.get("service_id", u.existing.service_id) for u in updates})
    for i in plan.inserts:
        i.values["effective_date"] = _date(i.values, services, now, zone, terms_of)
    for u in updates:
        values = {name: u.values.get(name, getattr(u.existing, name)) for name in DEPENDS_ON}
        on = _date(values, services, now, zone, terms_of)
        if on != u.existing.effective_date:
            u.values["effective_date"] = on
            u.changes["effective_date"] = (u.existing.effective_date, on)


def _services(s: Session, ids: Iterable[int]) -> dict[int, Any]:
    """The services (with their product's external id and name) by id."""
    found: dict[int, Any] = {}
    wanted = sorted(ids)
    for start in range(0, len(wanted), 500):
        found.update((row.id, row) for row in s.execute(
            select(Service.id, Service.next_due_date, Service.billing_cycle, Service.registration_date,
                   Product.external_id, Product.name).join(Product, Product.id == Service.product_id)
            .where(Service.id.in_(wanted[start:start + 500]))))
    return found


def _date(values: dict[str, Any], services: dict[int, Any], now: dt.datetime, zone: ZoneInfo,
          terms_of: TermsOf) -> dt.date:
    service = services[values["service_id"]]
    return effective_on(values["type"], created_on=business_today(values.get("created_at") or now, zone),
                        next_due_date=service.next_due_date, cancel_on=values.get("cancel_on"),
                        billing_cycle=service.billing_cycle, registration_date=service.registration_date,
                        terms=terms_of(service.external_id, service.name)).on
