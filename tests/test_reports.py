"""`cancelproc report reasons` and `report runs`: churn in monthly recurring revenue by
reason and product, checked against figures computed by hand, and the runs.

The dataset is made the way production makes it: requests applied by `cancelproc run` on
three nights in three months (so the audit trail is the run's own), a no-op (service
already cancelled), a request resolved by hand with `requests resolve`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, update

from processor import reports
from processor.db import Database
from processor.models import (
    CancellationRequest,
    Client,
    Product,
    RequestStatus,
    RequestType,
    Service,
    ServiceStatus,
)
from tests import factories
from tests.cli_helpers import Invoke, as_json, ok, one_line_error

NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
UTC = dt.UTC


@pytest.mark.parametrize(("cycle", "amount", "mrr"), [
    ("Monthly", "24.00", "24.00"),
    ("Quarterly", "10.00", "3.33"),
    ("Semi-Annually", "50.00", "8.33"),
    ("semiannually", "50.00", "8.33"),  # WHMCS's exports spell it both ways
    ("Annually", "100.00", "8.33"),
    ("Annually", "0.06", "0.01"),  # 0.005: half up, not to even
    ("Annually", "0.18", "0.02"),  # 0.015 -> 0.02 (half up)
    ("Biennially", "240.00", "10.00"),
    ("Triennially", "100.00", "2.78"),
    ("Free Account", "0.00", "0.00"),
    ("Free", "5.00", "0.00"),
    ("One Time", "50.00", "0.00"),
    ("Onetime", "50.00", "0.00"),
    ("Weekly", "7.00", None),  # not known: counted 0 and named, not guessed
])
def test_monthly_amount_per_billing_cycle(cycle: str, amount: str, mrr: str | None) -> None:
    assert reports.monthly_amount(Decimal(amount), cycle) == (Decimal(mrr) if mrr else None)


def _request(db: Database, night: dt.datetime, product: str, cycle: str, amount: str, code: str, *,
             status: ServiceStatus = ServiceStatus.ACTIVE, due: dt.date | None = None) -> int:
    """A service and a pending request on it, made the evening before `night`: Immediate,
    or End of Billing Period when the service has a next due date."""
    with db.session.begin() as s:
        found = s.scalars(select(Product).where(Product.name == product)).one_or_none()
        svc = Service(client=Client(first_name="Ada", email="ada@example.test"),
                      product=found or Product(name=product, module=None), domain="ada.example.test",
                      status=status, billing_cycle=cycle, amount=Decimal(amount), next_due_date=due)
        s.add(svc)
        s.flush()
        type_ = RequestType.IMMEDIATE if due is None else RequestType.END_OF_BILLING_PERIOD
        created_at = night - dt.timedelta(hours=1 if due is None else 24 * 10)
        req = CancellationRequest(service_id=svc.id, type=type_, reason_code=code, reason="",
                                  effective_date=factories.effective(s, svc.id, type_, None, created_at),
                                  status=RequestStatus.PENDING, created_by="test", created_at=created_at)
        s.add(req)
        s.flush()
        return req.id


def _night(invoke: Invoke, at: dt.datetime) -> None:
    with freeze_time(at):
        ok(invoke("run"))


SEP, OCT, NOV = (dt.datetime(2026, m, d, 2, 0, tzinfo=UTC) for m, d in ((9, 15), (10, 15), (11, 20)))


def hand_computed_dataset(invoke: Invoke, db: Database) -> None:
    """Cancellations made by runs (service MRR by hand):
      2026-09-15: VPS 4GB Monthly 24.00 too_expensive (24.00); VPS 4GB Annually 100.00 too_expensive (8.33)
      2026-10-15: Shared Hosting Quarterly 10.00 switched_service (3.33); Shared Hosting Semi-Annually
                  50.00 unused (8.33); Dedicated Biennially 240.00 too_expensive (10.00)
      2026-11-20: Dedicated Triennially 100.00 customer_service (2.78); Shared Hosting Free Account 0.00
                  unused (0); Shared Hosting One Time 50.00 other (0); VPS 4GB Weekly 7.00 other (unknown: 0);
                  VPS 4GB Annually 0.06 low_quality (0.01); Shared Hosting Monthly 12.00 no_longer_needed
                  (an old default code: 12.00), End of Billing Period due 11-17: 3 days late
    Apart: a no-op on 11-20 (VPS 4GB Monthly 30.00 switched_service, already Cancelled) and a
    request resolved by hand on 11-26 (VPS 4GB Monthly 15.00, the old code poor_support)."""
    _request(db, SEP, "VPS 4GB", "Monthly", "24.00", "too_expensive")
    _request(db, SEP, "VPS 4GB", "Annually", "100.00", "too_expensive")
    _night(invoke, SEP)
    _request(db, OCT, "Shared Hosting", "Quarterly", "10.00", "switched_service")
    _request(db, OCT, "Shared Hosting", "Semi-Annually", "50.00", "unused")
    _request(db, OCT, "Dedicated", "Biennially", "240.00", "too_expensive")
    _night(invoke, OCT)
    _request(db, NOV, "Dedicated", "Triennially", "100.00", "customer_service")
    _request(db, NOV, "Shared Hosting", "Free Account", "0.00", "unused")
    _request(db, NOV, "Shared Hosting", "One Time", "50.00", "other")
    _request(db, NOV, "VPS 4GB", "Weekly", "7.00", "other")
    _request(db, NOV, "VPS 4GB", "Annually", "0.06", "low_quality")
    _request(db, NOV, "Shared Hosting", "Monthly", "12.00", "no_longer_needed", due=dt.date(2026, 11, 17))
    _request(db, NOV, "VPS 4GB", "Monthly", "30.00", "switched_service", status=ServiceStatus.CANCELLED)
    by_hand = _request(db, NOV, "VPS 4GB", "Monthly", "15.00", "poor_support")
    with db.engine.begin() as conn:  # given up by an earlier run: staff cancel it by hand
        conn.execute(update(CancellationRequest).where(CancellationRequest.id == by_hand)
                     .values(status=RequestStatus.FAILED, attempts=5))
    _night(invoke, NOV)
    with freeze_time(NOW):
        ok(invoke("requests", "resolve", by_hand, "--note", "terminated in the panel by hand"))


def test_churn_in_mrr_against_a_hand_computed_dataset(invoke: Invoke, db: Database) -> None:
    hand_computed_dataset(invoke, db)
    with freeze_time(NOW):
        report = as_json(invoke("report", "reasons", "--since", "2026-09-01", "--json"))
        table = ok(invoke("report", "reasons", "--since", "2026-09-01")).stdout
        september = as_json(invoke("report", "reasons", "--since", "2026-09-01", "--until", "2026-09-30", "--json"))
    assert (report["since"], report["until"], report["cancellations"], report["lost_mrr"]) == (
        "2026-09-01", "2026-11-26", 11, "68.78")
    assert [(r["reason_code"], r["cancellations"], r["share_percent"], r["recurring_amount"], r["lost_mrr"])
            for r in report["by_reason"]] == [
        ("too_expensive", 3, 27.3, "364.00", "42.33"),
        ("unused", 2, 18.2, "50.00", "8.33"),
        ("other", 2, 18.2, "57.00", "0.00"),
        ("no_longer_needed", 1, 9.1, "12.00", "12.00"),  # an old default code keeps reporting
        ("switched_service", 1, 9.1, "10.00", "3.33"),
        ("customer_service", 1, 9.1, "100.00", "2.78"),
        ("low_quality", 1, 9.1, "0.06", "0.01")]
    assert [(r["product"], r["cancellations"], r["share_percent"], r["recurring_amount"], r["lost_mrr"])
            for r in report["by_product"]] == [
        ("Shared Hosting", 5, 45.5, "122.00", "23.66"),
        ("VPS 4GB", 4, 36.4, "131.06", "32.34"),
        ("Dedicated", 2, 18.2, "340.00", "12.78")]
    assert [(r["reason_code"], r["product"], r["cancellations"], r["share_percent"], r["recurring_amount"],
             r["lost_mrr"]) for r in report["rows"]] == [
        ("too_expensive", "VPS 4GB", 2, 18.2, "124.00", "32.33"),
        ("unused", "Shared Hosting", 2, 18.2, "50.00", "8.33"),  # Semi-Annually 50.00 and a free one
        ("no_longer_needed", "Shared Hosting", 1, 9.1, "12.00", "12.00"),  # ties: the most MRR first
        ("too_expensive", "Dedicated", 1, 9.1, "240.00", "10.00"),
        ("switched_service", "Shared Hosting", 1, 9.1, "10.00", "3.33"),
        ("customer_service", "Dedicated", 1, 9.1, "100.00", "2.78"),
        ("low_quality", "VPS 4GB", 1, 9.1, "0.06", "0.01"),
        ("other", "Shared Hosting", 1, 9.1, "50.00", "0.00"),  # then by name
        ("other", "VPS 4GB", 1, 9.1, "7.00", "0.00")]
    assert sum(Decimal(r["lost_mrr"]) for r in report["rows"]) == Decimal("68.78")
    assert report["no_ops"] == [{"reason_code": "switched_service", "product": "VPS 4GB", "requests": 1,
                                 "recurring_amount": "30.00", "mrr": "30.00"}]
    assert report["resolved_by_hand"] == [{"reason_code": "poor_support", "product": "VPS 4GB", "requests": 1,
                                           "recurring_amount": "15.00", "mrr": "15.00"}]
    assert report["unknown_cycles"] == [{"billing_cycle": "Weekly", "cancellations": 1, "recurring_amount": "7.00"}]
    assert (september["cancellations"], september["lost_mrr"], september["no_ops"]) == (2, "32.33", [])
    lines = table.splitlines()
    assert lines[0].split() == ["REASON_CODE", "PRODUCT", "CANCELLATIONS", "SHARE_PERCENT", "RECURRING_AMOUNT",
                                "LOST_MRR"]
    assert "cancellations made by runs: 11, monthly recurring revenue lost: 68.78" in lines
    assert "billing cycle 'Weekly' is not known: its 1 cancellation(s) (recurring amount 7.00) count 0 MRR" in lines
    assert lines[lines.index("no-ops (the service was already closed; not counted above):") + 2].split() == [
        "switched_service", "VPS", "4GB", "1", "30.00", "30.00"]


def test_months_and_lateness(invoke: Invoke, db: Database) -> None:
    hand_computed_dataset(invoke, db)
    zone = ZoneInfo("UTC")
    with db.session() as session:
        closed = reports.closed_requests(session, since=dt.date(2026, 8, 1), until=dt.date(2026, 11, 30), zone=zone)
    assert reports.by_month(closed, since=dt.date(2026, 8, 1), until=dt.date(2026, 11, 30), zone=zone) == [
        {"month": "2026-08", "cancellations": 0, "lost_mrr": Decimal("0.00"), "no_ops": 0, "resolved_by_hand": 0},
        {"month": "2026-09", "cancellations": 2, "lost_mrr": Decimal("32.33"), "no_ops": 0, "resolved_by_hand": 0},
        {"month": "2026-10", "cancellations": 3, "lost_mrr": Decimal("21.66"), "no_ops": 0, "resolved_by_hand": 0},
        {"month": "2026-11", "cancellations": 6, "lost_mrr": Decimal("14.79"), "no_ops": 1, "resolved_by_hand": 1}]
    assert reports.lateness(closed) == [{"days_late": 3, "cancellations": 1}]  # due 11-17, applied 11-20


def test_a_month_is_the_business_time_zone_s(invoke: Invoke, db: Database) -> None:
    """Applied at 2026-09-30 23:30 UTC: October in Berlin, September in UTC."""
    _request(db, SEP, "VPS 4GB", "Monthly", "24.00", "too_expensive")
    _night(invoke, dt.datetime(2026, 9, 30, 23, 30, tzinfo=UTC))
    with db.session() as session:
        for zone, month in (("UTC", "2026-09"), ("Europe/Berlin", "2026-10")):
            closed = reports.closed_requests(session, since=dt.date(2026, 9, 1), until=dt.date(2026, 10, 31),
                                             zone=ZoneInfo(zone))
            months = reports.by_month(closed, since=dt.date(2026, 9, 1), until=dt.date(2026, 10, 31),
                                      zone=ZoneInfo(zone))
            assert [m["month"] for m in months if m["cancellations"]] == [month], zone


def test_format_is_kept_and_json_is_one_object(invoke: Invoke, db: Database) -> None:
    _request(db, SEP, "VPS 4GB", "Quarterly", "30.00", "too_expensive")
    _night(invoke, SEP)
    with freeze_time(SEP + dt.timedelta(days=1)):
        listed = invoke("report", "reasons", "--format", "json")
        text = ok(invoke("report", "reasons", "--format", "csv")).stdout
        runs = as_json(invoke("report", "runs", "--json"))
        old_runs = invoke("report", "runs", "--format", "json")
        one_line_error(invoke("report", "reasons", "--json", "--format", "csv"),
                       "--json and --format csv: give one of them")
        assert "no runs from 2026-08-01 to 2026-08-31" in ok(
            invoke("report", "runs", "--since", "2026-08-01", "--until", "2026-08-31")).stdout
        one_line_error(invoke("report", "runs", "--since", "2026-12-01", "--until", "2026-11-01"),
                       "--since 2026-12-01 is after --until 2026-11-01")
    assert as_json(listed) == [{"reason_code": "too_expensive", "product": "VPS 4GB", "cancellations": 1,
                                "share_percent": 100.0, "recurring_amount": "30.00", "lost_mrr": "10.00"}]
    assert "--format json is deprecated: use --json" in listed.stderr
    assert list(csv.DictReader(io.StringIO(text))) == [
        {"reason_code": "too_expensive", "product": "VPS 4GB", "cancellations": "1", "share_percent": "100.0",
         "recurring_amount": "30.00", "lost_mrr": "10.00"}]
    assert (runs["since"], runs["until"]) == ("2026-08-17", "2026-09-16")  # 30 days before --until
    assert [(r["id"], r["status"], r["due"], r["completed"], r["emails_sent"]) for r in runs["rows"]] == [
        (1, "completed", 1, 1, 1)]  # the confirmation (the run record does not count the digest sent after it)
    assert as_json(old_runs) == runs["rows"]


CYCLES = ["Monthly", "Quarterly", "Semi-Annually", "Annually", "Biennially", "Triennially", "Free Account",
          "One Time", "Weekly"]
closed_request = st.builds(
    lambda n, kind, code, product, cycle, cents, day: reports.Closed(
        request_id=n, kind=kind, reason_code=code, product=product, billing_cycle=cycle,
        recurring_amount=Decimal(cents) / 100, mrr=reports.monthly_amount(Decimal(cents) / 100, cycle),
        processed_at=dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(days=day), days_late=day % 4),
    st.integers(1, 10**6), st.sampled_from([reports.CANCELLED, reports.CANCELLED, reports.NO_OP,
                                            reports.RESOLVED_BY_HAND]),
    st.sampled_from(["too_expensive", "unused", "other"]), st.sampled_from(["VPS", "Hosting"]),
    st.sampled_from(CYCLES), st.integers(0, 10**7), st.integers(0, 364))


@given(st.lists(closed_request, max_size=40))
def test_every_total_is_the_sum_of_its_rows(closed: list[reports.Closed]) -> None:
    """Per-service rounding: the rows, the reasons, the products and the months add up to the
    same lost MRR and count, whatever the data; no-ops and requests resolved by hand never count."""
    churn = reports.churn(closed)
    cancelled = [c for c in closed if c.kind == reports.CANCELLED]
    total = sum((c.mrr for c in cancelled if c.mrr is not None), Decimal("0.00"))
    assert churn["lost_mrr"] == total and churn["cancellations"] == len(cancelled)
    for key in ("rows", "by_reason", "by_product"):
        assert sum((r["lost_mrr"] for r in churn[key]), Decimal("0.00")) == total, key
        assert sum(r["cancellations"] for r in churn[key]) == len(cancelled), key
    months = reports.by_month(closed, since=dt.date(2026, 1, 1), until=dt.date(2026, 12, 31), zone=ZoneInfo("UTC"))
    assert sum((m["lost_mrr"] for m in months), Decimal("0.00")) == total
    assert sum(m["no_ops"] + m["resolved_by_hand"] for m in months) == len(closed) - len(cancelled)
    assert sum(r["requests"] for r in churn["no_ops"] + churn["resolved_by_hand"]) == len(closed) - len(cancelled)
    assert sum(u["cancellations"] for u in churn["unknown_cycles"]) == sum(c.mrr is None for c in cancelled)
