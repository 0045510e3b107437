"""Reports for staff: why clients leave (by reason code and product, in monthly recurring
revenue), and the runs.

Dates are business-time-zone days, both ends included.

Money: a service's monthly recurring revenue (MRR) is its recurring amount divided by the
months of its billing cycle, rounded to the cent (half up) per service; every total is a
sum of those, so the rows of a report add up to its totals.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from processor.due import ONE_DAY, start_of_day
from processor.models import (
    AuditAction,
    AuditEntity,
    AuditEntry,
    CancellationRequest,
    Product,
    RequestStatus,
    Run,
    Service,
)

R = CancellationRequest
CENT = Decimal("0.01")
ZERO = Decimal("0.00")

# Months per billing cycle, by WHMCS's names (compared without case, spaces, '-' or '_').
CYCLE_MONTHS = {"monthly": 1, "quarterly": 3, "semiannually": 6, "annually": 12, "biennially": 24,
                "triennially": 36}
# Cycles that recur at no charge: they count 0 MRR.
NON_RECURRING_CYCLES = frozenset({"freeaccount", "free", "onetime"})

# How a completed request was closed. Only CANCELLED is churn made by a run; the other two
# are shown apart: a no-op found the service already closed (the client left earlier, by
# another way), and staff resolved a failed request by hand.
CANCELLED, NO_OP, RESOLVED_BY_HAND = "cancelled", "no_op", "resolved_by_hand"
PRODUCT_GONE = "(deleted outside cancelproc)"


def cycle_months(cycle: str) -> int | None:
    """Months of a billing cycle; 0 for a free or one-time one; None for one this does not know."""
    key = re.sub(r"[\s_-]", "", cycle).lower()
    if key in NON_RECURRING_CYCLES:
        return 0
    return CYCLE_MONTHS.get(key)


def monthly_amount(amount: Decimal, cycle: str) -> Decimal | None:
    """The MRR of a recurring amount, to the cent (half up); None for an unknown cycle (the
    report counts it 0 and names the cycle, rather than guess)."""
    months = cycle_months(cycle)
    if months is None:
        return None
    if months == 0:
        return ZERO
    return (Decimal(amount) / months).quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Closed:
    """A request completed in the window, with its service's recurring amount."""

    request_id: int
    kind: str  # CANCELLED, NO_OP or RESOLVED_BY_HAND
    reason_code: str
    product: str
    billing_cycle: str
    recurring_amount: Decimal
    mrr: Decimal | None  # None: unknown billing cycle
    processed_at: dt.datetime
    days_late: int | None


def _window(since: dt.date, until: dt.date, zone: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    return start_of_day(since, zone), start_of_day(until + ONE_DAY, zone)


def _audited(action: AuditAction, entity: AuditEntity | None = None) -> Any:
    audit = exists().where(AuditEntry.request_id == R.id, AuditEntry.action == action)
    return audit.where(AuditEntry.entity == entity) if entity is not None else audit


def closed_requests(session: Session, *, since: dt.date, until: dt.date, zone: ZoneInfo) -> list[Closed]:
    """Requests completed in the window, oldest first. A request counts as a cancellation
    made by a run unless its audit trail says staff resolved it by hand or the run found the
    service already closed (completed, nothing cancelled); a completed request with no
    audit trail (imported history) counts as a cancellation. Services only: a request for
    one add-on (the service stays) is no service's churn."""
    start, end = _window(since, until, zone)
    rows = session.execute(
        select(R.id, R.reason_code, Product.name, Service.billing_cycle, Service.amount, R.processed_at,
               R.days_late, _audited(AuditAction.RESOLVED_BY_HAND).label("by_hand"),
               _audited(AuditAction.COMPLETED, AuditEntity.REQUEST).label("completed"),
               _audited(AuditAction.CANCELLED, AuditEntity.SERVICE).label("cancelled"))
        .join(Service, Service.id == R.service_id).outerjoin(Product, Product.id == Service.product_id)
        .where(R.status == RequestStatus.COMPLETED, R.processed_at >= start, R.processed_at < end,
               R.addon_id.is_(None))
        .order_by(R.processed_at, R.id)
    ).all()
    return [Closed(request_id=row.id,
                   kind=RESOLVED_BY_HAND if row.by_hand else NO_OP if row.completed and not row.cancelled
                   else CANCELLED,
                   reason_code=row.reason_code, product=row.name if row.name is not None else PRODUCT_GONE,
                   billing_cycle=row.billing_cycle, recurring_amount=Decimal(row.amount).quantize(CENT),
                   mrr=monthly_amount(row.amount, row.billing_cycle), processed_at=row.processed_at,
                   days_late=row.days_late)
            for row in rows]


def _money(values: Iterable[Decimal | None]) -> Decimal:
    return sum((v for v in values if v is not None), ZERO)


def _groups(closed: list[Closed], keys: tuple[str, ...], total: int) -> list[dict[str, Any]]:
    """One row per value of `keys`: count, share of `total`, recurring amount and MRR lost;
    most cancellations first, then the most MRR, then by name."""
    groups: dict[tuple[str, ...], list[Closed]] = defaultdict(list)
    for c in closed:
        groups[tuple(getattr(c, k) for k in keys)].append(c)
    rows = [{**dict(zip(keys, key, strict=True)), "cancellations": len(items),
             "share_percent": round(100 * len(items) / total, 1) if total else 0.0,
             "recurring_amount": _money(c.recurring_amount for c in items),
             "lost_mrr": _money(c.mrr for c in items)}
            for key, items in groups.items()]
    return sorted(rows, key=lambda r: (-r["cancellations"], -r["lost_mrr"], *(r[k] for k in keys)))


def _apart(closed: list[Closed], kind: str) -> list[dict[str, Any]]:
    rows = _groups([c for c in closed if c.kind == kind], ("reason_code", "product"), 0)
    return [{"reason_code": r["reason_code"], "product": r["product"], "requests": r["cancellations"],
             "recurring_amount": r["recurring_amount"], "mrr": r["lost_mrr"]} for r in rows]


def churn(closed: list[Closed]) -> dict[str, Any]:
    """Lost MRR of the cancellations made by runs, by reason code and product (`rows`), by
    reason, by product; the no-ops and the requests resolved by hand apart; and the billing
    cycles not known (counted 0)."""
    cancelled = [c for c in closed if c.kind == CANCELLED]
    total = len(cancelled)
    unknown: dict[str, list[Closed]] = defaultdict(list)
    for c in cancelled:
        if c.mrr is None:
            unknown[c.billing_cycle].append(c)
    return {
        "cancellations": total,
        "lost_mrr": _money(c.mrr for c in cancelled),
        "rows": _groups(cancelled, ("reason_code", "product"), total),
        "by_reason": _groups(cancelled, ("reason_code",), total),
        "by_product": _groups(cancelled, ("product",), total),
        "no_ops": _apart(closed, NO_OP),
        "resolved_by_hand": _apart(closed, RESOLVED_BY_HAND),
        "unknown_cycles": [{"billing_cycle": cycle, "cancellations": len(items),
                            "recurring_amount": _money(c.recurring_amount for c in items)}
                           for cycle, items in sorted(unknown.items())],
    }


def months_of(since: dt.date, until: dt.date) -> list[str]:
    """The months ('2026-11') from since to until, both included."""
    months, month = [], since.replace(day=1)
    while month <= until:
        months.append(month.strftime("%Y-%m"))
        month = (month + dt.timedelta(days=32)).replace(day=1)
    return months


def by_month(closed: list[Closed], *, since: dt.date, until: dt.date, zone: ZoneInfo) -> list[dict[str, Any]]:
    """Per business-time-zone month of the window (every month, also an empty one): the
    cancellations made by runs and the MRR they lost, the no-ops and those resolved by hand."""
    rows: dict[str, dict[str, Any]] = {
        m: {"month": m, "cancellations": 0, "lost_mrr": ZERO, "no_ops": 0, "resolved_by_hand": 0}
        for m in months_of(since, until)}
    for c in closed:
        row = rows[c.processed_at.astimezone(zone).strftime("%Y-%m")]
        if c.kind == CANCELLED:
            row["cancellations"] += 1
            row["lost_mrr"] += c.mrr or ZERO
        else:
            row["no_ops" if c.kind == NO_OP else "resolved_by_hand"] += 1
    return list(rows.values())


def lateness(closed: list[Closed]) -> list[dict[str, Any]]:
    """Catch-up cancellations (applied days after they were due): how many, per days late."""
    counts = Counter(c.days_late for c in closed if c.kind == CANCELLED and c.days_late)
    return [{"days_late": days, "cancellations": n} for days, n in sorted(counts.items())]


def runs_between(session: Session, *, since: dt.date, until: dt.date, zone: ZoneInfo) -> list[dict[str, Any]]:
    """Runs started in the window, oldest first, with their counts and durations."""
    start, end = _window(since, until, zone)
    runs = session.scalars(select(Run).where(Run.started_at >= start, Run.started_at < end).order_by(Run.id))
    return [{"id": r.id, "started_at": r.started_at, "trigger": r.trigger, "operator": r.operator, "as_of": r.as_of,
             "status": r.status, "duration_seconds": round((r.finished_at - r.started_at).total_seconds(), 1)
             if r.finished_at else None,
             **{k: getattr(r, k) for k in (*Run.REQUEST_COUNTS, *Run.LATENESS_COUNTS, *Run.EMAIL_COUNTS)}}
            for r in runs]
