"""Property-based tests (hypothesis): the due rule, in Python and in SQL, agrees with
itself for any dates, types and time zones, and the request state machine never reaches
an impossible state."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import delete, select

from processor.due import business_today, days_late, due_clause, effective_date, is_due
from processor.models import CancellationRequest, Client, Product, RequestStatus, RequestType, Service, ServiceStatus

ZONES = ["UTC", "Europe/London", "America/New_York", "Pacific/Auckland", "Asia/Kolkata", "Pacific/Kiritimati"]
DAYS = st.dates(min_value=dt.date(2020, 1, 1), max_value=dt.date(2035, 12, 31))
INSTANTS = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 12, 31),
                        timezones=st.just(dt.timezone.utc))


@hsettings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(list(RequestType)), next_due=st.none() | DAYS, cancel_on=st.none() | DAYS,
       created_on=DAYS, as_of=DAYS)
def test_the_due_rule_in_python(type_, next_due, cancel_on, created_on, as_of):
    due = is_due(type_, next_due, cancel_on, created_on, as_of)
    due_on = effective_date(type_, next_due, cancel_on, created_on)
    # Never due before the client asked; otherwise due exactly when its date has come (or it has none).
    assert due == (created_on <= as_of and (due_on is None or due_on <= as_of))
    # Lateness is never negative, and only a due request can be late.
    late = days_late(type_, next_due, cancel_on, created_on, as_of)
    assert late >= 0 and (late == 0 or due or type_ is RequestType.IMMEDIATE)
    # Due stays due: a later as-of never makes a due request not due.
    assert not due or is_due(type_, next_due, cancel_on, created_on, as_of + dt.timedelta(days=1))


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(type_=st.sampled_from(list(RequestType)), next_due=st.none() | DAYS, cancel_on=st.none() | DAYS,
       created_at=INSTANTS, as_of=DAYS, zone=st.sampled_from(ZONES))
def test_the_due_rule_in_sql_agrees_with_python(db, type_, next_due, cancel_on, created_at, as_of, zone):
    if type_ is RequestType.ON_DATE and cancel_on is None:
        cancel_on = as_of  # an On Date request always has its date (the CLI and the import require it)
    with db.session.begin() as s:
        s.execute(delete(CancellationRequest))
        s.execute(delete(Service))
        service = Service(client=Client(first_name="A", email="a@example.test"), product=Product(name="P"),
                          domain="d", status=ServiceStatus.ACTIVE, billing_cycle="Monthly", amount=1,
                          next_due_date=next_due)
        s.add(service)
        s.flush()
        s.add(CancellationRequest(service_id=service.id, type=type_, cancel_on=cancel_on, reason_code="other",
                                  reason="", status=RequestStatus.PENDING, created_at=created_at, created_by="t"))
    with db.read_session() as s:
        in_sql = s.scalar(select(CancellationRequest.id).join(Service).where(due_clause(as_of, ZoneInfo(zone))))
    in_python = is_due(type_, next_due, cancel_on, business_today(created_at, ZoneInfo(zone)), as_of)
    assert (in_sql is not None) == in_python
