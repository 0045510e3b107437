"""The due rule: types, the business time zone (midnight and DST), undated services."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from processor.due import business_today, days_late, effective_date, is_due
from processor.models import CancellationRequest, RequestStatus, RequestType, Service, ServiceStatus
from processor.run import Runner, RunOptions
from processor.terms import effective_on
from tests import factories

EOBP, IMM, ON = RequestType.END_OF_BILLING_PERIOD, RequestType.IMMEDIATE, RequestType.ON_DATE
D = dt.date(2026, 11, 26)


CREATED = D - dt.timedelta(days=10)


@pytest.mark.parametrize(
    ("type_", "next_due", "cancel_on", "created_on", "due"),
    [
        (IMM, dt.date(2027, 1, 1), None, CREATED, True),  # Immediate ignores the due date
        (EOBP, D, None, CREATED, True),  # on the due date
        (EOBP, D - dt.timedelta(days=3), None, CREATED, True),  # missed nights catch up
        (EOBP, D + dt.timedelta(days=1), None, CREATED, False),
        (EOBP, None, None, CREATED, True),  # free / one-time service: no next due date
        (ON, dt.date(2027, 1, 1), D, CREATED, True),  # On Date follows its own date, not the service's
        (ON, D - dt.timedelta(days=10), D + dt.timedelta(days=1), CREATED, False),
        (IMM, None, None, D + dt.timedelta(days=1), False),  # made after as_of: not due on a re-run of as_of
        (EOBP, D - dt.timedelta(days=3), None, D + dt.timedelta(days=1), False),
    ],
)
def test_is_due(type_, next_due, cancel_on, created_on, due):
    """The stored date (as `requests create` computes it, no notice or term) against as_of."""
    on = effective_on(type_, created_on=created_on, next_due_date=next_due, cancel_on=cancel_on,
                      billing_cycle="Monthly", registration_date=None).on
    assert is_due(on, D) is due


def test_business_today_at_local_midnight():
    london = ZoneInfo("Europe/London")
    tokyo = ZoneInfo("Asia/Tokyo")
    # 23:30 UTC on the 25th is already the 26th in Tokyo, still the 25th in London (winter, UTC+0).
    instant = dt.datetime(2026, 11, 25, 23, 30, tzinfo=dt.UTC)
    assert business_today(instant, london) == dt.date(2026, 11, 25)
    assert business_today(instant, tokyo) == dt.date(2026, 11, 26)


def test_days_late_and_effective_date():
    assert days_late(EOBP, D - dt.timedelta(days=4), CREATED, D) == 4
    assert days_late(EOBP, D + dt.timedelta(days=4), CREATED, D) == 0
    assert days_late(ON, D - dt.timedelta(days=2), CREATED, D) == 2
    # Taking effect the day it was made (Immediate, no or a past next due date): the first
    # nightly run after that day is on time; each missed night counts.
    assert days_late(IMM, D - dt.timedelta(days=1), D - dt.timedelta(days=1), D) == 0
    assert days_late(IMM, D, D, D) == 0
    assert days_late(IMM, D - dt.timedelta(days=3), D - dt.timedelta(days=3), D) == 2
    assert days_late(EOBP, D - dt.timedelta(days=3), D - dt.timedelta(days=3), D) == 2
    # An Immediate request put off by a minimum term is due on the term's last day.
    assert days_late(IMM, D - dt.timedelta(days=2), CREATED, D) == 2
    assert effective_date(IMM, None, None, dt.date(2026, 11, 20)) == dt.date(2026, 11, 20)
    assert effective_date(ON, D, dt.date(2026, 12, 1), D) == dt.date(2026, 12, 1)


def _run_at(db, settings, instant: dt.datetime, zone: str):
    settings.business_timezone = zone
    runner = Runner(db, settings, clock=lambda: instant)
    return runner.run(RunOptions(as_of=business_today(instant, settings.zone)))


def _statuses(db) -> dict[int, RequestStatus]:
    with db.read_session() as s:
        return {r.service_id: r.status for r in s.scalars(select(CancellationRequest))}


@pytest.mark.parametrize(
    ("local", "zone", "expect_applied"),
    [
        # Due on 2026-11-26 in New York (UTC-5 in November).
        (dt.datetime(2026, 11, 25, 23, 30), "America/New_York", False),  # 23:30 local the day before
        (dt.datetime(2026, 11, 26, 0, 30), "America/New_York", True),  # 00:30 local on the day
        # Same instants seen from Sydney (UTC+11) are already later dates.
        (dt.datetime(2026, 11, 25, 23, 30), "Australia/Sydney", False),
        (dt.datetime(2026, 11, 26, 0, 30), "Australia/Sydney", True),
    ],
)
def test_run_around_local_midnight(db, settings, local, zone, expect_applied):
    with db.session.begin() as s:
        svc = factories.service(s, next_due_date=dt.date(2026, 11, 26))
        factories.request(s, svc)
        sid = svc.id
    instant = local.replace(tzinfo=ZoneInfo(zone)).astimezone(dt.UTC)
    summary = _run_at(db, settings, instant, zone)
    assert summary.as_of == local.date()
    assert (_statuses(db)[sid] is RequestStatus.COMPLETED) is expect_applied
    assert summary.completed == int(expect_applied)


@pytest.mark.parametrize(
    ("utc_instant", "expect_as_of"),
    [
        # Europe/Berlin leaves summer time on 2026-10-25 at 03:00 local (01:00 UTC).
        (dt.datetime(2026, 10, 24, 22, 30, tzinfo=dt.UTC), dt.date(2026, 10, 25)),  # 00:30 CEST
        (dt.datetime(2026, 10, 24, 21, 30, tzinfo=dt.UTC), dt.date(2026, 10, 24)),  # 23:30 CEST
        (dt.datetime(2026, 10, 25, 23, 30, tzinfo=dt.UTC), dt.date(2026, 10, 26)),  # 00:30 CET, after the change
        # It enters summer time on 2026-03-29 at 02:00 local (01:00 UTC): 00:30 CET is 23:30 UTC.
        (dt.datetime(2026, 3, 28, 23, 30, tzinfo=dt.UTC), dt.date(2026, 3, 29)),
    ],
)
def test_run_across_dst_changes(db, settings, utc_instant, expect_as_of):
    with db.session.begin() as s:
        due_today = factories.service(s, next_due_date=expect_as_of)
        due_tomorrow = factories.service(s, next_due_date=expect_as_of + dt.timedelta(days=1))
        factories.request(s, due_today, created_at=utc_instant - dt.timedelta(days=5))
        factories.request(s, due_tomorrow, created_at=utc_instant - dt.timedelta(days=5))
        ids = due_today.id, due_tomorrow.id
    summary = _run_at(db, settings, utc_instant, "Europe/Berlin")
    assert summary.as_of == expect_as_of
    statuses = _statuses(db)
    assert statuses[ids[0]] is RequestStatus.COMPLETED
    assert statuses[ids[1]] is RequestStatus.PENDING


def test_each_type_and_undated_service(db, settings, now):
    with db.session.begin() as s:
        cases = {
            "immediate_future_due": factories.request(
                s, factories.service(s, next_due_date=D + dt.timedelta(days=20)), type_=IMM),
            "eobp_past": factories.request(s, factories.service(s, next_due_date=D - dt.timedelta(days=2))),
            "eobp_future": factories.request(s, factories.service(s, next_due_date=D + dt.timedelta(days=1))),
            "eobp_undated": factories.request(s, factories.service(s, next_due_date=None)),
            "on_date_today": factories.request(
                s, factories.service(s, next_due_date=D + dt.timedelta(days=30)), type_=ON, cancel_on=D),
            "on_date_later": factories.request(
                s, factories.service(s, next_due_date=D - dt.timedelta(days=30)), type_=ON,
                cancel_on=D + dt.timedelta(days=1)),
        }
        ids = {k: r.id for k, r in cases.items()}
    Runner(db, settings, clock=lambda: now).run(RunOptions(as_of=D))
    with db.read_session() as s:
        status = {k: s.get(CancellationRequest, i).status for k, i in ids.items()}
        late = s.get(CancellationRequest, ids["eobp_past"]).days_late
    assert status == {
        "immediate_future_due": RequestStatus.COMPLETED,
        "eobp_past": RequestStatus.COMPLETED,
        "eobp_future": RequestStatus.PENDING,
        "eobp_undated": RequestStatus.COMPLETED,
        "on_date_today": RequestStatus.COMPLETED,
        "on_date_later": RequestStatus.PENDING,
    }
    assert late == 2


@pytest.mark.parametrize("closed", [ServiceStatus.CANCELLED, ServiceStatus.TERMINATED])
def test_already_closed_service_is_a_noop(db, settings, now, closed):
    from processor.models import AuditEntry, OutboxEmail

    with db.session.begin() as s:
        svc = factories.service(s, status=closed, addons=1, unpaid=1)
        svc.termination_date = dt.date(2026, 11, 1)
        req = factories.request(s, svc)
        sid, rid = svc.id, req.id
    summary = Runner(db, settings, clock=lambda: now).run(RunOptions(as_of=D))
    assert (summary.noop, summary.completed, summary.emails_queued) == (1, 0, 0)
    with db.read_session() as s:
        svc = s.get(Service, sid)
        assert (svc.status, svc.termination_date) == (closed, dt.date(2026, 11, 1))  # untouched
        assert s.get(CancellationRequest, rid).status is RequestStatus.COMPLETED
        audit = s.scalars(select(AuditEntry).where(AuditEntry.request_id == rid)).all()
        assert [(a.entity, a.action) for a in audit] == [("request", "completed")]
        assert f"no-op: service already {closed.value}" in audit[0].detail
        assert s.scalars(select(OutboxEmail)).all() == []
