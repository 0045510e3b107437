"""Credit for unused time: what an Immediate cancellation gives back of a paid period.

The rule (setting immediate_refund = "credit"), in one place:

- The period a service's last payment bought ends at its next due date and starts one
  billing cycle before it (Monthly 1, Quarterly 3, Semi-Annually 6, Annually 12,
  Biennially 24, Triennially 36 months; a day past the end of a shorter month is that
  month's last day, as billing systems move due dates). Free and one-time services, and
  services without a next due date, have no period: no credit.
- Cancelled on day `on` (the run's as-of date, the service's termination date), the days
  from `on` to the period's end are unused: days unused / days in the period, times the
  amount of the service's last paid invoice. No paid invoice: no credit. On or after the
  period's end: nothing is unused.
- Money is Decimal, rounded to the cent once, half to even (ROUND_HALF_EVEN, "banker's
  rounding": no bias either way over many credits). The credit never exceeds the invoice.

Pure functions of their arguments: no database, no clock.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

CENT = Decimal("0.01")
ROUNDING = ROUND_HALF_EVEN

# Months per billing cycle, by WHMCS's words (matched without regard to case).
CYCLE_MONTHS = {"monthly": 1, "quarterly": 3, "semi-annually": 6, "annually": 12, "biennially": 24,
                "triennially": 36}


@dataclass(frozen=True, slots=True)
class PaidInvoice:
    """The service's last paid invoice: what the period cost."""

    id: int
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Credit:
    """A credit decided for one request, before it is written."""

    client_id: int
    amount: Decimal
    invoice_id: int
    invoice_amount: Decimal
    period_start: dt.date
    period_end: dt.date
    days_unused: int
    days_in_period: int

    @property
    def description(self) -> str:
        return (f"credit {self.amount} for {self.days_unused} of {self.days_in_period} days unused of "
                f"{self.period_start}..{self.period_end} (invoice #{self.invoice_id}, {self.invoice_amount})")

    def as_dict(self) -> dict[str, object]:
        return {"amount": self.amount, "invoice_id": self.invoice_id, "invoice_amount": self.invoice_amount,
                "period_start": self.period_start, "period_end": self.period_end,
                "days_unused": self.days_unused, "days_in_period": self.days_in_period,
                "description": self.description}


def months_before(day: dt.date, months: int) -> dt.date:
    """The same day `months` earlier, or that month's last day if it is shorter."""
    index = day.year * 12 + day.month - 1 - months
    year, month = divmod(index, 12)
    month += 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def period(next_due_date: dt.date | None, billing_cycle: str | None) -> tuple[dt.date, dt.date] | None:
    """The paid period (start, end) that ends at the next due date; None without one."""
    months = CYCLE_MONTHS.get((billing_cycle or "").strip().lower())
    if months is None or next_due_date is None:
        return None
    return months_before(next_due_date, months), next_due_date


def prorate(amount: Decimal, days_unused: int, days_in_period: int) -> Decimal:
    """amount * days_unused / days_in_period, to the cent (ROUNDING)."""
    return (amount * days_unused / days_in_period).quantize(CENT, rounding=ROUNDING)


def unused_credit(client_id: int, paid: PaidInvoice | None, next_due_date: dt.date | None,
                  billing_cycle: str | None, on: dt.date) -> Credit | None:
    """The credit for cancelling on `on`, or None when nothing is owed back."""
    if paid is None or paid.amount <= 0:
        return None
    bounds = period(next_due_date, billing_cycle)
    if bounds is None:
        return None
    start, end = bounds
    days_in_period = (end - start).days
    days_unused = min((end - on).days, days_in_period)  # before the period began: all of it
    if days_unused <= 0:
        return None
    amount = prorate(paid.amount, days_unused, days_in_period)
    if amount <= 0:
        return None
    return Credit(client_id, amount, paid.id, paid.amount, start, end, days_unused, days_in_period)
