"""When a request is due, in the business time zone. One rule, used in SQL and in Python."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, or_

from processor.models import CancellationRequest, RequestType

ONE_DAY = dt.timedelta(days=1)


def business_today(now: dt.datetime, zone: ZoneInfo) -> dt.date:
    """The calendar date in the business time zone at the instant `now`."""
    return now.astimezone(zone).date()


def start_of_day(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    """The instant (UTC) at which `day` begins in the business time zone."""
    return dt.datetime.combine(day, dt.time(), tzinfo=zone).astimezone(dt.UTC)


def effective_date(
    type_: RequestType | str,
    next_due_date: dt.date | None,
    cancel_on: dt.date | None,
    created_on: dt.date,
) -> dt.date | None:
    """Today's rule of the date a request takes effect, before a product's notice period and
    minimum term (terms.effective_on) and before the floor of the day it was made; None
    means at once (a service with no next due date). What migration 0010 stored for the
    requests made before the date was stored."""
    if type_ == RequestType.IMMEDIATE:
        return created_on
    if type_ == RequestType.ON_DATE:
        return cancel_on
    return next_due_date


# The run's due rule reads only the stored date, cancellation_requests.effective_date:
# computed once when the request was made or imported (terms.effective_on), never before
# the day it was made, so "due by as_of" is that one column, in SQL and in Python alike.

def is_due(effective_on: dt.date, as_of: dt.date) -> bool:
    """DESIGN.md: due when its (stored) effective date is on or before as_of. A request made
    after as_of is never due (its date is never before the day it was made): a run re-done
    for a past night must not cancel a service before its client asked."""
    return effective_on <= as_of


def request_due_on(request: CancellationRequest, zone: ZoneInfo | None = None) -> dt.date:
    """The date a request takes effect: its stored effective date (`zone` is not needed
    any more: the date was fixed in the business time zone when the request was made)."""
    return request.effective_date


def request_is_due(request: CancellationRequest, zone: ZoneInfo | None, as_of: dt.date) -> bool:
    """`is_due` of a request (in a grace period too: its suspension moved the effective date
    to the end of the grace period)."""
    return is_due(request.effective_date, as_of)


def due_clause(as_of: dt.date, zone: ZoneInfo | None = None) -> ColumnElement[bool]:
    """The same rule as `is_due`, in SQL: one column of the request, no join needed."""
    return CancellationRequest.effective_date <= as_of


def due_before_clause(day: dt.date, zone: ZoneInfo | None = None) -> ColumnElement[bool]:
    """Effective date before `day`: what `requests list --due-before` shows."""
    return CancellationRequest.effective_date < day


def ready_clause(now: dt.datetime) -> ColumnElement[bool]:
    """Not waiting out a backoff: a request that failed or was vetoed waits for its next
    attempt time. With `due_clause`, the one rule of what a run takes now (the run, the
    dry run, `status` and the metrics all use it)."""
    r = CancellationRequest
    return or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now)


def days_late(type_: RequestType | str, effective_on: dt.date, created_on: dt.date, as_of: dt.date) -> int:
    """Days between the night a request should have been applied and as_of (catch-up).

    A request that takes effect the day it was made (Immediate; one for a service with no
    next due date or an overdue one; an On Date request for that day) is for the first
    nightly run after it, the next day; any other from its effective date. (`type_` is
    kept for callers; the dates say it all.)
    """
    due_on = effective_on + ONE_DAY if effective_on <= created_on else effective_on
    return max(0, (as_of - due_on).days)
