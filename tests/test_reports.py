"""`cancelproc report reasons` and `report runs`: churn by reason and product, and the runs."""

from __future__ import annotations

import csv
import datetime as dt
import io

from freezegun import freeze_time
from sqlalchemy import update

from processor.db import Database
from processor.models import CancellationRequest, RequestStatus
from tests import factories
from tests.cli_helpers import as_json, ok, one_line_error

NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


def completed(db: Database, reason_code: str, processed: dt.datetime) -> None:
    with db.session.begin() as s:
        r = factories.request(s, factories.service(s))
        r.reason_code = reason_code
    with db.engine.begin() as conn:
        conn.execute(update(CancellationRequest).where(CancellationRequest.id == r.id).values(
            status=RequestStatus.COMPLETED, processed_at=processed))


def test_reasons_by_code_and_product_in_the_window(invoke, db):
    for code in ("too_expensive", "too_expensive", "poor_support"):
        completed(db, code, NOW - dt.timedelta(days=2))
    completed(db, "other", NOW - dt.timedelta(days=60))  # before the window
    with db.session.begin() as s:
        factories.request(s, factories.service(s))  # pending: not a cancellation
    with freeze_time(NOW):
        rows = as_json(invoke("report", "reasons", "--format", "json"))
        table = ok(invoke("report", "reasons")).stdout
        text = ok(invoke("report", "reasons", "--format", "csv", "--since", "2026-09-01")).stdout
    assert rows == [
        {"reason_code": "too_expensive", "product": "VPS 4GB", "cancellations": 2, "share_percent": 66.7,
         "recurring_amount": "48.00"},
        {"reason_code": "poor_support", "product": "VPS 4GB", "cancellations": 1, "share_percent": 33.3,
         "recurring_amount": "24.00"}]
    assert table.splitlines()[0].split() == ["REASON_CODE", "PRODUCT", "CANCELLATIONS", "SHARE_PERCENT",
                                             "RECURRING_AMOUNT"]
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [(r["reason_code"], r["cancellations"]) for r in parsed] == [
        ("too_expensive", "2"), ("other", "1"), ("poor_support", "1")]


def test_runs_report_and_a_bad_window(invoke, db):
    with db.session.begin() as s:
        factories.request(s, factories.service(s))
    with freeze_time(NOW):
        ok(invoke("run"))
        rows = as_json(invoke("report", "runs", "--format", "json"))
        assert "no runs from 2026-10-01 to 2026-10-31" in ok(
            invoke("report", "runs", "--since", "2026-10-01", "--until", "2026-10-31")).stdout
        one_line_error(invoke("report", "runs", "--since", "2026-12-01", "--until", "2026-11-01"),
                       "--since 2026-12-01 is after --until 2026-11-01")
    assert [(r["id"], r["status"], r["due"], r["completed"], r["emails_sent"]) for r in rows] == [
        (1, "completed", 1, 1, 1)]  # the confirmation (the run record does not count the digest sent after it)
