"""Reports for staff: why clients leave (by reason code and product), and the runs.

Dates are business-time-zone days, both ends included.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from processor.due import ONE_DAY, start_of_day
from processor.models import CancellationRequest, Product, RequestStatus, Run, Service

R = CancellationRequest


def _window(since: dt.date, until: dt.date, zone: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    return start_of_day(since, zone), start_of_day(until + ONE_DAY, zone)


def cancellations_by_reason(session: Session, *, since: dt.date, until: dt.date,
                            zone: ZoneInfo) -> list[dict[str, Any]]:
    """Completed cancellations per reason code and product, most frequent first: their count,
    share of all cancellations in the window, and the services' summed recurring amount.
    Services only: a request for one add-on (the service stays) is no service's churn."""
    start, end = _window(since, until, zone)
    rows = session.execute(
        select(R.reason_code, Product.name, func.count(), func.coalesce(func.sum(Service.amount), 0))
        .join(Service, Service.id == R.service_id).join(Product, Product.id == Service.product_id)
        .where(R.status == RequestStatus.COMPLETED, R.processed_at >= start, R.processed_at < end,
               R.addon_id.is_(None))
        .group_by(R.reason_code, Product.name)
        .order_by(func.count().desc(), R.reason_code, Product.name)
    ).all()
    total = sum(count for _, _, count, _ in rows)
    return [{"reason_code": code, "product": product, "cancellations": count,
             "share_percent": round(100 * count / total, 1), "recurring_amount": Decimal(amount)}
            for code, product, count, amount in rows]


def runs_between(session: Session, *, since: dt.date, until: dt.date, zone: ZoneInfo) -> list[dict[str, Any]]:
    """Runs started in the window, oldest first, with their counts and durations."""
    start, end = _window(since, until, zone)
    runs = session.scalars(select(Run).where(Run.started_at >= start, Run.started_at < end).order_by(Run.id))
    return [{"id": r.id, "started_at": r.started_at, "trigger": r.trigger, "operator": r.operator, "as_of": r.as_of,
             "status": r.status, "duration_seconds": round((r.finished_at - r.started_at).total_seconds(), 1)
             if r.finished_at else None,
             **{k: getattr(r, k) for k in (*Run.REQUEST_COUNTS, *Run.LATENESS_COUNTS, *Run.EMAIL_COUNTS)}}
            for r in runs]
