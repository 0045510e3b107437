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
from processor.models import AuditEntry, OutboxEmail  # noqa: E402
from processor.run import Runner, RunOptions  # noqa: E402
from tests import factories  # noqa: E402

SERVICES = 4
ADDONS = 2  # per service: requests for one add-on alone beside the service's


class RequestLife(RuleBasedStateMachine):
    """Staff create, withdraw, retry and process requests while nightly runs apply them;
    whatever the order, nothing impossible happens."""

    def __init__(self) -> None:
        super().__init__()
        folder = Path(tempfile.mkdtemp())
        self.settings = Settings(database_url=f"sqlite:///{folder / 'c.db'}", app_root=folder,
                                 email={"staff_address": ""}, retry_backoff_minutes=0)
        self.db = open_database(self.settings.database_url, create=True)
        upgrade(self.db)
        self.now = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
        with self.db.session.begin() as s:
            made = [factories.service(s, next_due_date=self.now.date() + dt.timedelta(days=i), addons=ADDONS,
                                      addon_due=self.now.date() + dt.timedelta(days=SERVICES - i))
                    for i in range(SERVICES)]
            # One client with no usable address: its requests fail and are retried.
            made.append(factories.service(s, email="", addons=ADDONS))
            self.services = [svc.id for svc in made]
            self.addons = {svc.id: sorted(a.id for a in svc.addons) for svc in made}
        self.requests: list[int] = []

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

    @rule(service=st.integers(0, SERVICES), addon=st.integers(0, ADDONS - 1),
          type_=st.sampled_from(list(RequestType)))
    def create_for_addon(self, service: int, addon: int, type_: RequestType) -> None:
        """A request for one add-on (refused while the service has an open request, or the
        add-on has one, or is closed)."""
        service_id = self.services[service]
        try:
            with self.db.session.begin() as s:
                request = cancellations.create_request(
                    s, service_id=service_id, type_=type_, reason_code="other", reason="",
                    allowed_reasons=["other"], cancel_on=self.now.date() + dt.timedelta(days=2)
                    if type_ is RequestType.ON_DATE else None, actor="staff", now=self.now, today=self.now.date(),
                    addon_id=self.addons[service_id][addon])
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
                if r.addon_id is not None:
                    continue  # a request for one add-on: addon_requests_keep_their_word
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

    @invariant()
    def addon_requests_keep_their_word(self) -> None:
        """One open request per add-on; an add-on is cancelled at most once (alone, or with
        its service); an add-on request cancels its add-on alone, with its one email; a
        service cancelled by its request has every add-on cancelled and no add-on request
        left open."""
        with self.db.read_session() as s:
            open_per_addon: dict[int, int] = {}
            for r in s.scalars(select(CancellationRequest).where(CancellationRequest.addon_id.is_not(None))):
                if r.status in (RequestStatus.PENDING, RequestStatus.FAILED):
                    open_per_addon[r.addon_id] = open_per_addon.get(r.addon_id, 0) + 1
                own = s.scalar(select(func.count()).select_from(AuditEntry).where(
                    AuditEntry.request_id == r.id, AuditEntry.entity == "addon", AuditEntry.action == "cancelled"))
                emails = s.scalar(select(func.count()).select_from(OutboxEmail).where(
                    OutboxEmail.request_id == r.id, OutboxEmail.template == "addon_cancellation_confirmation"))
                assert own <= 1 and emails == own, f"add-on request {r.id}: {own} cancellations, {emails} emails"
                assert s.scalar(select(func.count()).select_from(AuditEntry).where(
                    AuditEntry.request_id == r.id, AuditEntry.entity == "service")) == 0  # never the service
                if r.status is RequestStatus.WITHDRAWN:
                    assert own == 0 and r.processed_at is None
                if r.status is RequestStatus.COMPLETED:
                    assert r.addon.status in (ServiceStatus.CANCELLED, ServiceStatus.TERMINATED)
            assert all(n == 1 for n in open_per_addon.values()), open_per_addon
            for addon_id in [a for addons in self.addons.values() for a in addons]:
                assert s.scalar(select(func.count()).select_from(AuditEntry).where(
                    AuditEntry.entity == "addon", AuditEntry.entity_id == addon_id,
                    AuditEntry.action == "cancelled")) <= 1, f"add-on {addon_id} cancelled twice"
            for service_id in self.services:
                if s.get(Service, service_id).status is not ServiceStatus.CANCELLED:
                    continue  # (the run is the only writer of Cancelled here)
                assert {a.status for a in s.get(Service, service_id).addons} == {ServiceStatus.CANCELLED}
                assert s.scalar(select(func.count()).select_from(CancellationRequest).where(
                    CancellationRequest.service_id == service_id, CancellationRequest.addon_id.is_not(None),
                    CancellationRequest.status.in_([RequestStatus.PENDING, RequestStatus.FAILED]))) == 0


RequestLife.TestCase.settings = hsettings(max_examples=25, stateful_step_count=15, deadline=None)
# slow: one of the longest tests; started first (conftest.py), it does not hold up the end of the suite.
test_the_request_state_machine = pytest.mark.slow(RequestLife.TestCase)
