"""When a request is due, in the business time zone. One rule, used in SQL and in Python."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, or_

from processor.models import CancellationRequest, RequestType, Service


def business_today(now: dt.datetime, zone: ZoneInfo) -> dt.date:
    """The calendar date in the business time zone at the instant `now`."""
    return now.astimezone(zone).date()


def effective_date(
    type_: RequestType | str,
    next_due_date: dt.date | None,
    cancel_on: dt.date | None,
    created_on: dt.date,
) -> dt.date | None:
    """The date a request becomes due; None means due at once (no next due date)."""
    if type_ == RequestType.IMMEDIATE:
        return created_on
    if type_ == RequestType.ON_DATE:
        return cancel_on
    return next_due_date


def is_due(type_: RequestType | str, next_due_date: dt.date | None, cancel_on: dt.date | None, as_of: dt.date) -> bool:
    """DESIGN.md: Immediate, or the due date is on or before as_of, or the service has none."""
    if type_ == RequestType.IMMEDIATE:
        return True
    if type_ == RequestType.ON_DATE:
        return cancel_on is None or cancel_on <= as_of
    return next_due_date is None or next_due_date <= as_of


def due_clause(as_of: dt.date) -> ColumnElement[bool]:
    """The same rule as `is_due`, for a query joining requests to services."""
    r, s = CancellationRequest, Service
    return or_(
        r.type == RequestType.IMMEDIATE,
        and_(r.type == RequestType.ON_DATE, or_(r.cancel_on.is_(None), r.cancel_on <= as_of)),
        and_(
            r.type == RequestType.END_OF_BILLING_PERIOD,
            or_(s.next_due_date.is_(None), s.next_due_date <= as_of),
        ),
    )


def days_late(due_on: dt.date | None, as_of: dt.date) -> int:
    """How many days after its due date a request is applied (0 when on time or undated)."""
    return max(0, (as_of - due_on).days) if due_on else 0


__all__ = ["business_today", "effective_date", "is_due", "due_clause", "days_late"]
