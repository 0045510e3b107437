"""When a request is due, in the business time zone. One rule, used in SQL and in Python."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, case, or_

from processor.models import CancellationRequest, RequestType, Service, ServiceAddon

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


def period_end(service_next_due_date: dt.date | None, addon_id: int | None,
               addon_next_due_date: dt.date | None) -> dt.date | None:
    """The next due date an End of Billing Period request waits for: its add-on's own for a
    request for one add-on, else its service's."""
    return service_next_due_date if addon_id is None else addon_next_due_date


def request_due_on(request: CancellationRequest, zone: ZoneInfo) -> dt.date | None:
    """`effective_date` of a request whose service (and add-on) exists (loaded with it)."""
    return effective_date(request.type, _period_end_of(request), request.cancel_on,
                          business_today(request.created_at, zone))


def request_is_due(request: CancellationRequest, zone: ZoneInfo, as_of: dt.date) -> bool:
    """`is_due` for a request whose service (and add-on) exists (loaded with it)."""
    return is_due(request.type, _period_end_of(request), request.cancel_on,
                  business_today(request.created_at, zone), as_of)


def _period_end_of(request: CancellationRequest) -> dt.date | None:
    addon = request.addon if request.addon_id is not None else None
    return period_end(request.service.next_due_date, request.addon_id, addon.next_due_date if addon else None)


def period_end_sql() -> ColumnElement[dt.date]:
    """`period_end` in SQL, for a query joining requests to services and, outer, to the
    add-on they name (`params.request_select`, `join_addon`)."""
    r, s, a = CancellationRequest, Service, ServiceAddon
    return case((r.addon_id.is_(None), s.next_due_date), else_=a.next_due_date)


def join_addon(query: Any) -> Any:
    """A query of requests joined to their services, outer-joined to the add-on a request
    names: what `period_end_sql` and the due clauses read."""
    return query.outerjoin(ServiceAddon, ServiceAddon.id == CancellationRequest.addon_id)


def _period_ends_by(day: dt.date, inclusive: bool) -> ColumnElement[bool]:
    end = period_end_sql()
    return or_(end.is_(None), end <= day if inclusive else end < day)


def due_clause(as_of: dt.date, zone: ZoneInfo) -> ColumnElement[bool]:
    """The same rule as `is_due`, for a query joining requests to services and, outer, to
    the add-on they name (`params.request_select`)."""
    r = CancellationRequest
    return and_(
        r.created_at < start_of_day(as_of + ONE_DAY, zone),
        or_(
            r.type == RequestType.IMMEDIATE,
            and_(r.type == RequestType.ON_DATE, or_(r.cancel_on.is_(None), r.cancel_on <= as_of)),
            and_(r.type == RequestType.END_OF_BILLING_PERIOD, _period_ends_by(as_of, inclusive=True)),
        ),
    )


def due_before_clause(day: dt.date, zone: ZoneInfo) -> ColumnElement[bool]:
    """`effective_date` before `day` (or none: due at once), for a query joining requests to
    services and, outer, to the add-on they name: what `requests list --due-before` shows.
    Unlike `due_clause` it does not ask whether the request was made by then: it is about
    the date, not about a run."""
    r = CancellationRequest
    return or_(
        and_(r.type == RequestType.IMMEDIATE, r.created_at < start_of_day(day, zone)),
        and_(r.type == RequestType.ON_DATE, or_(r.cancel_on.is_(None), r.cancel_on < day)),
        and_(r.type == RequestType.END_OF_BILLING_PERIOD, _period_ends_by(day, inclusive=False)),
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
