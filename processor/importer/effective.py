"""The effective date of imported requests: computed once, as `requests create` does.

A new request gets its date from its service and its product's notice period and minimum
term (terms.effective_on), counted from the day the client asked (requested_at, else the
import's time) in the business time zone; a request for one add-on, from the add-on's own
next due date (terms.addon_effective_on). A request the file changes gets a new date only
when what the date depends on in the request itself changes (type, cancel_on,
requested_at, its service or add-on): the change then shows in its import_updated audit entry, old
and new. A service's next due date changed by an import moves no request: the client was
told the date when the request was made; nor does an add-on's.
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
from processor.models import Product, Service, ServiceAddon
from processor.terms import TermsOf, addon_effective_on, effective_on

# The request's own values its date depends on.
DEPENDS_ON = ("type", "cancel_on", "created_at", "service_id", "addon_id")


def add_effective_dates(s: Session, plan: Plan, *, now: dt.datetime, zone: ZoneInfo, terms_of: TermsOf) -> None:
    """Put `effective_date` into the plan's request inserts and, where it moves, updates."""
    updates = [u for u in plan.updates if any(name in u.changes for name in DEPENDS_ON)]
    if not plan.inserts and not updates:
        return
    updated = [{name: u.after(name) for name in DEPENDS_ON} for u in updates]
    written = [*(i.values for i in plan.inserts), *updated]
    services = _services(s, {v["service_id"] for v in written})
    addons = _addon_due_dates(s, {v["addon_id"] for v in written if v.get("addon_id") is not None})
    for i in plan.inserts:
        i.values["effective_date"] = _date(i.values, services, addons, now, zone, terms_of)
    for u, values in zip(updates, updated, strict=True):
        on = _date(values, services, addons, now, zone, terms_of)
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


def _addon_due_dates(s: Session, ids: Iterable[int]) -> dict[int, dt.date | None]:
    """The add-ons' next due dates by id."""
    found: dict[int, dt.date | None] = {}
    wanted = sorted(ids)
    for start in range(0, len(wanted), 500):
        found.update((addon_id, due) for addon_id, due in s.execute(
            select(ServiceAddon.id, ServiceAddon.next_due_date).where(ServiceAddon.id.in_(wanted[start:start + 500]))))
    return found


def _date(values: dict[str, Any], services: dict[int, Any], addons: dict[int, dt.date | None], now: dt.datetime,
          zone: ZoneInfo, terms_of: TermsOf) -> dt.date:
    created_on = business_today(values.get("created_at") or now, zone)
    addon_id = values.get("addon_id")
    if addon_id is not None:
        return addon_effective_on(values["type"], created_on=created_on, next_due_date=addons[addon_id],
                                  cancel_on=values.get("cancel_on")).on
    service = services[values["service_id"]]
    return effective_on(values["type"], created_on=created_on,
                        next_due_date=service.next_due_date, cancel_on=values.get("cancel_on"),
                        billing_cycle=service.billing_cycle, registration_date=service.registration_date,
                        terms=terms_of(service.external_id, service.name)).on
