"""Property-based tests (hypothesis): the due rule, in Python and in SQL, agrees with
itself for any dates, types and time zones, and the request state machine never reaches
an impossible state."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from processor.due import business_today, days_late, due_clause, effective_date, is_due
from processor.models import CancellationRequest, Client, Product, RequestStatus, RequestType, Service, ServiceStatus

ZONES = ["UTC", "Europe/London", "America/New_York", "Pacific/Auckland", "Asia/Kolkata", "Pacific/Kiritimati"]
DAYS = st.dates(min_value=dt.date(2020, 1, 1), max_value=dt.date(2035, 12, 31))
INSTANTS = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 12, 31),
                        timezones=st.just(dt.UTC))


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


# --- the request state machine -------------------------------------------------------------

import tempfile  # noqa: E402 - the state machine's own imports, kept with it
from pathlib import Path  # noqa: E402

from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402
from sqlalchemy import func  # noqa: E402

from processor import cancellations  # noqa: E402
from processor.config import Settings  # noqa: E402
from processor.db import open_database, upgrade  # noqa: E402
from processor.errors import CancelprocError  # noqa: E402
from processor.models import AuditEntry, OutboxEmail, Run  # noqa: E402
from processor.run import Runner, RunOptions  # noqa: E402
from tests import factories  # noqa: E402

SERVICES = 4
GRACED = 2  # the last GRACED of the SERVICES are of a product with a grace period
GRACE_DAYS = 2


class RequestLife(RuleBasedStateMachine):
    """Staff create, withdraw, retry and process requests while nightly runs apply them;
    whatever the order, nothing impossible happens."""

    def __init__(self) -> None:
        super().__init__()
        folder = Path(tempfile.mkdtemp())
        self.settings = Settings(database_url=f"sqlite:///{folder / 'c.db'}", app_root=folder,
                                 email={"staff_address": ""}, retry_backoff_minutes=0,
                                 products={"Graced": {"grace_days": GRACE_DAYS}})
        self.db = open_database(self.settings.database_url, create=True)
        upgrade(self.db)
        self.now = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
        with self.db.session.begin() as s:
            self.services = [factories.service(s, next_due_date=self.now.date() + dt.timedelta(days=i)).id
                             for i in range(SERVICES)]
            # One client with no usable address: its requests fail and are retried.
            self.services.append(factories.service(s, email="").id)
            for service_id in self.services[SERVICES - GRACED:SERVICES]:  # suspended first, cancelled later
                s.get(Service, service_id).product.name = "Graced"
        self.requests: list[int] = []
        self.processed_now: set[int] = set()  # `requests process --now`: may end a grace period early

    def teardown(self) -> None:
        self.db.dispose()

    def _staff(self, action, *args, **kwargs) -> None:
        try:
            with self.db.session.begin() as s:
                action(s, *args, actor="staff", now=self.now, **kwargs)
        except CancelprocError:
            pass  # refused (a closed request, an open one already): refusing is allowed, breaking is not

    @rule(service=st.integers(0, SERVICES), type_=st.sampled_from(list(RequestType)))
    def create(self, service: int, type_: RequestType) -> None:
        try:
            with self.db.session.begin() as s:
                request = cancellations.create_request(
                    s, service_id=self.services[service], type_=type_, reason_code="other", reason="",
                    allowed_reasons=["other"], cancel_on=self.now.date() + dt.timedelta(days=1)
                    if type_ is RequestType.ON_DATE else None, actor="staff", now=self.now, today=self.now.date())
                self.requests.append(request.id)
        except CancelprocError:
            pass

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def withdraw(self, data) -> None:
        self._staff(cancellations.withdraw_request, data.draw(st.sampled_from(self.requests)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def retry(self, data) -> None:
        self._staff(cancellations.retry_request, data.draw(st.sampled_from(self.requests)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def process(self, data) -> None:
        request_id = data.draw(st.sampled_from(self.requests))
        with self.db.read_session() as s:
            if s.get(CancellationRequest, request_id).status is not RequestStatus.PENDING:
                return  # the CLI refuses this before a run starts
        self.processed_now.add(request_id)
        Runner(self.db, self.settings, clock=lambda: self.now).run(
            RunOptions(as_of=self.now.date(), request_ids=[request_id], ignore_due_date=True, digest=False))

    @rule(days=st.integers(0, 3))
    def nightly_run(self, days: int) -> None:
        self.now += dt.timedelta(days=days)
        Runner(self.db, self.settings, clock=lambda: self.now).run(RunOptions(as_of=self.now.date()))

    @invariant()
    def nothing_impossible(self) -> None:
        with self.db.read_session() as s:
            requests = s.scalars(select(CancellationRequest)).all()
            open_per_service: dict[int, int] = {}
            for r in requests:
                if r.status in (RequestStatus.PENDING, RequestStatus.FAILED):
                    open_per_service[r.service_id] = open_per_service.get(r.service_id, 0) + 1
                cancelled_by_it = s.scalar(select(func.count()).select_from(AuditEntry).where(
                    AuditEntry.request_id == r.id, AuditEntry.entity == "service", AuditEntry.action == "cancelled"))
                emails = s.scalar(select(func.count()).select_from(OutboxEmail).where(
                    OutboxEmail.request_id == r.id, OutboxEmail.template == "service_cancellation_confirmation"))
                if r.status is RequestStatus.WITHDRAWN:
                    assert cancelled_by_it == 0 and emails == 0, f"withdrawn request {r.id} cancelled its service"
                    assert r.processed_at is None
                if r.status is RequestStatus.COMPLETED:
                    assert r.service.status in (ServiceStatus.CANCELLED, ServiceStatus.TERMINATED)
                assert cancelled_by_it <= 1 and emails == cancelled_by_it  # once, with its one email
            assert all(n == 1 for n in open_per_service.values()), open_per_service
            for service_id in self.services:  # a service is cancelled once at most
                assert s.scalar(select(func.count()).select_from(AuditEntry).where(
                    AuditEntry.entity == "service", AuditEntry.entity_id == service_id,
                    AuditEntry.action == "cancelled")) <= 1


def _grace_invariants(machine: RequestLife) -> None:
    """The grace period: a suspended service has its request open (in its grace period); a
    service is never cancelled before its grace period ends, nor suspended twice or told
    twice; a withdrawn request never leaves its service suspended."""
    with machine.db.read_session() as s:
        for r in s.scalars(select(CancellationRequest)).all():
            suspended_by_it = s.scalar(select(func.count()).select_from(AuditEntry).where(
                AuditEntry.request_id == r.id, AuditEntry.entity == "service", AuditEntry.action == "suspended"))
            told = s.scalar(select(func.count()).select_from(OutboxEmail).where(
                OutboxEmail.request_id == r.id, OutboxEmail.template == "service_suspended_for_cancellation"))
            assert suspended_by_it <= 1 and told == suspended_by_it, f"request {r.id} suspended twice"
            assert (r.suspended_on is None) == (r.grace_ends_on is None) == (suspended_by_it == 0)
            if r.service.status is ServiceStatus.SUSPENDED:
                assert r.status is not RequestStatus.WITHDRAWN, f"withdrawn request {r.id} left its service suspended"
            if r.status is RequestStatus.COMPLETED and r.suspended_on is not None and r.id not in machine.processed_now:
                # cancelled by a run: not before the grace period ended (by the run's as-of date)
                assert r.run_id is not None
                as_of = s.get(Run, r.run_id).as_of
                assert as_of >= r.grace_ends_on, f"request {r.id} cancelled on {as_of}, grace ends {r.grace_ends_on}"
        for service in s.scalars(select(Service).where(Service.status == ServiceStatus.SUSPENDED)).all():
            open_requests = s.scalars(select(CancellationRequest).where(
                CancellationRequest.service_id == service.id,
                CancellationRequest.status.in_((RequestStatus.PENDING, RequestStatus.FAILED)))).all()
            assert [r.suspended_on is not None for r in open_requests] == [True], (
                f"service {service.id} suspended without its request open in its grace period")


RequestLife.grace_invariants = invariant()(_grace_invariants)  # type: ignore[attr-defined]

RequestLife.TestCase.settings = hsettings(max_examples=25, stateful_step_count=15, deadline=None)
# slow: one of the longest tests; started first (conftest.py), it does not hold up the end of the suite.
test_the_request_state_machine = pytest.mark.slow(RequestLife.TestCase)
