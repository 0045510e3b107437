"""The date a new request takes effect, under its product's notice period and minimum term.

Computed once, when the request is made (`requests create`, the demo) or imported, and
stored in `cancellation_requests.effective_date`; the run's due rule (due.py) reads only
that column. Pure functions: no database, no settings object, no clock.

Today's rule (due.effective_date) first: Immediate the day it was made, On Date its date,
End of Billing Period the service's next due date (none: the day it was made). Then:

- notice_days (End of Billing Period only): the first due date at least that many days
  after the day the request was made. Usually the due date after the next one; with a
  notice longer than the billing cycle, as many cycles on as it takes.
- minimum_term_months (every type): never before registration date + that many months;
  an End of Billing Period request goes on to the first due date on or after the end of
  the term (the client pays whole periods). A service without a registration date has no
  term to count: the rule is not applied, and the audit entry says so.
- a request for one add-on (`addon_effective_on`) takes the add-on's own next due date
  and neither rule above: they are a product's, for its services.
- never before the day the request was made: an overdue service's past due date, or a
  past On Date date from an import, takes effect the day the request was made (as the
  run applied them before the date was stored: at once).

Due dates step from the service's next due date by whole months of its billing cycle,
each counted from that date (Jan 31 + 1 month = Feb 28 or 29, + 2 months = Mar 31), as
billing systems renew a service registered on a month's last days.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Callable
from typing import NamedTuple

from processor.config import Settings
from processor.due import effective_date
from processor.models import RequestType

# Months per WHMCS billing cycle. "One Time" and "Free Account" have no next due date.
CYCLE_MONTHS = {"monthly": 1, "quarterly": 3, "semi-annually": 6, "annually": 12, "biennially": 24,
                "triennially": 36}


class Terms(NamedTuple):
    """A product's notice period and minimum term (config: [products."ID"])."""

    notice_days: int = 0
    minimum_term_months: int = 0


NO_TERMS = Terms()

# A product's terms by its external id and name: `Settings.for_product`'s, or none.
TermsOf = Callable[[str | None, str], Terms]


def no_terms(external_id: str | None, name: str) -> Terms:
    """No notice period and no minimum term, for any product."""
    return NO_TERMS


def terms_of(settings: Settings) -> TermsOf:
    """The products' terms as configured ([products."ID"] tables, README)."""
    def lookup(external_id: str | None, name: str) -> Terms:
        product = settings.for_product(external_id, name)
        return Terms(product.notice_days, product.minimum_term_months)
    return lookup


class Effective(NamedTuple):
    """When a request takes effect, and why when that is not today's rule (for the audit)."""

    on: dt.date
    why: tuple[str, ...] = ()


def add_months(day: dt.date, months: int) -> dt.date:
    """`day` plus whole months, on the same day of the month or the month's last day."""
    year, month0 = divmod(day.month - 1 + months, 12)
    year += day.year
    return dt.date(year, month0 + 1, min(day.day, calendar.monthrange(year, month0 + 1)[1]))


def cycle_months(billing_cycle: str) -> int | None:
    """Months of a billing cycle; None for one with no period (One Time, Free Account, unknown)."""
    return CYCLE_MONTHS.get(billing_cycle.strip().lower())


def first_due_on_or_after(next_due_date: dt.date, months: int, day: dt.date) -> dt.date:
    """The first due date of the series next_due_date + k * months (k >= 0) on or after `day`."""
    if next_due_date >= day:
        return next_due_date
    # Start a little before the answer (whole cycles between the two dates), then step.
    k = max(0, ((day.year - next_due_date.year) * 12 + day.month - next_due_date.month) // months - 1)
    while (due := add_months(next_due_date, k * months)) < day:
        k += 1
    return due


def effective_on(type_: RequestType | str, *, created_on: dt.date, next_due_date: dt.date | None,
                 cancel_on: dt.date | None, billing_cycle: str, registration_date: dt.date | None,
                 terms: Terms = NO_TERMS) -> Effective:
    """The date a request takes effect (see the module's docstring), never before `created_on`."""
    why: list[str] = []  # what moved the date
    unapplied: list[str] = []  # a configured rule that could not be applied
    not_before = created_on  # a date the request may not take effect before
    if terms.minimum_term_months:
        if registration_date is None:
            unapplied.append(f"minimum term of {terms.minimum_term_months} months not applied: "
                       "the service has no registration date")
        else:
            term_end = add_months(registration_date, terms.minimum_term_months)
            if term_end > created_on:
                not_before = term_end
                why.append(f"minimum term of {terms.minimum_term_months} months from {registration_date} "
                           f"ends {term_end}")
    on = effective_date(type_, next_due_date, cancel_on, created_on) or created_on
    if type_ == RequestType.END_OF_BILLING_PERIOD and next_due_date is not None:
        if terms.notice_days and next_due_date < created_on + dt.timedelta(days=terms.notice_days):
            notice_end = created_on + dt.timedelta(days=terms.notice_days)
            why.append(f"notice period of {terms.notice_days} days: made {created_on}, "
                       f"next due date {next_due_date}")
            not_before = max(not_before, notice_end)
        if not_before > max(on, created_on):
            months = cycle_months(billing_cycle)
            if months is None:
                unapplied.append(f"billing cycle {billing_cycle!r} has no period: "
                                 f"taking effect {not_before}, not on a due date")
                on = not_before
            else:
                on = first_due_on_or_after(next_due_date, months, not_before)
    final = max(on, not_before)
    moved = final != max(effective_date(type_, next_due_date, cancel_on, created_on) or created_on, created_on)
    return Effective(final, tuple((why if moved else []) + unapplied))


def addon_effective_on(type_: RequestType | str, *, created_on: dt.date, next_due_date: dt.date | None,
                       cancel_on: dt.date | None) -> Effective:
    """When a request for one add-on alone takes effect: the add-on's own next due date for
    End of Billing Period (`next_due_date`), else as for a service. The notice period and
    the minimum term are a product's, for its services: an add-on has none."""
    return effective_on(type_, created_on=created_on, next_due_date=next_due_date, cancel_on=cancel_on,
                        billing_cycle="", registration_date=None)
