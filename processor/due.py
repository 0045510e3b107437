"""When a request is due, in the business time zone. One rule, used in SQL and in Python."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, or_

from processor.models import CancellationRequest, RequestType, Service

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
    """The date a request is due on; None means due at once (a service with no next due date)."""
    if type_ == RequestType.IMMEDIATE:
        return created_on
    if type_ == RequestType.ON_DATE:
        return cancel_on
    return next_due_date


def is_due(
    type_: RequestType | str,
    next_due_date: dt.date | None,
    cancel_on: dt.date | None,
    created_on: dt.date,
    as_of: dt.date,
) -> bool:
    """DESIGN.md: Immediate, or the due date is on or before as_of, or the service has none.

    A request made after as_of is never due: a run re-done for a past night must not
    cancel a service before its client asked.
    """
    if created_on > as_of:
        return False
    due_on = effective_date(type_, next_due_date, cancel_on, created_on)
    return due_on is None or due_on <= as_of


def request_due_on(request: CancellationRequest, zone: ZoneInfo) -> dt.date | None:
    """`effective_date` of a request whose service exists (loaded with it)."""
    return effective_date(request.type, request.service.next_due_date, request.cancel_on,
                          business_today(request.created_at, zone))


def request_is_due(request: CancellationRequest, zone: ZoneInfo, as_of: dt.date) -> bool:
    """Whether a run on `as_of` takes this request (its service loaded with it): `is_due`,
    or, in its grace period, whether the grace period has ended (`grace_due`)."""
    if request.grace_ends_on is not None:
        return request.grace_ends_on <= as_of
    return is_due(request.type, request.service.next_due_date, request.cancel_on,
                  business_today(request.created_at, zone), as_of)


def due_clause(as_of: dt.date, zone: ZoneInfo) -> ColumnElement[bool]:
    """The same rule as `is_due`, for a query joining requests to services."""
    r, s = CancellationRequest, Service
    return and_(
        r.created_at < start_of_day(as_of + ONE_DAY, zone),
        or_(
            r.type == RequestType.IMMEDIATE,
            and_(r.type == RequestType.ON_DATE, or_(r.cancel_on.is_(None), r.cancel_on <= as_of)),
            and_(
                r.type == RequestType.END_OF_BILLING_PERIOD,
                or_(s.next_due_date.is_(None), s.next_due_date <= as_of),
            ),
        ),
    )


def run_due_clause(as_of: dt.date, zone: ZoneInfo) -> ColumnElement[bool]:
    """What a run takes on `as_of` (with `ready_clause` and a pending status): a request not
    suspended when `due_clause` says so; one whose service a grace period suspended when
    its grace period has ended, whatever its service's dates say now."""
    r = CancellationRequest
    return or_(and_(r.grace_ends_on.is_(None), due_clause(as_of, zone)), r.grace_ends_on <= as_of)


def due_before_clause(day: dt.date, zone: ZoneInfo) -> ColumnElement[bool]:
    """`effective_date` before `day` (or none: due at once), for a query joining requests to
    services: what `requests list --due-before` shows. Unlike `due_clause` it does not ask
    whether the request was made by then: it is about the date, not about a run."""
    r, s = CancellationRequest, Service
    return or_(
        and_(r.type == RequestType.IMMEDIATE, r.created_at < start_of_day(day, zone)),
        and_(r.type == RequestType.ON_DATE, or_(r.cancel_on.is_(None), r.cancel_on < day)),
        and_(r.type == RequestType.END_OF_BILLING_PERIOD, or_(s.next_due_date.is_(None), s.next_due_date < day)),
    )


def ready_clause(now: dt.datetime) -> ColumnElement[bool]:
    """Not waiting out a backoff: a request that failed or was vetoed waits for its next
    attempt time. With `due_clause`, the one rule of what a run takes now (the run, the
    dry run, `status` and the metrics all use it)."""
    r = CancellationRequest
    return or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now)


def days_late(
    type_: RequestType | str,
    next_due_date: dt.date | None,
    cancel_on: dt.date | None,
    created_on: dt.date,
    as_of: dt.date,
) -> int:
    """Days between the night a request should have been applied and as_of (catch-up).

    An Immediate request is for the first nightly run after it was made, the next day;
    an undated one is never late; nor is any request before the day it was made (one
    made after its date had passed is late from that day, not from the date).
    """
    if type_ == RequestType.IMMEDIATE:
        due_on: dt.date | None = created_on + ONE_DAY
    else:
        due_on = effective_date(type_, next_due_date, cancel_on, created_on)
        due_on = max(due_on, created_on) if due_on else None
    return max(0, (as_of - due_on).days) if due_on else 0
