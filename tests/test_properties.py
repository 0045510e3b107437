"""Property-based tests (hypothesis): the due rule, in Python and in SQL, agrees with
itself for any dates, types and time zones, and the request state machine never reaches
an impossible state."""

from __future__ import annotations

import calendar
import datetime as dt
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from processor import credits
from processor.due import business_today, days_late, due_before_clause, due_clause, effective_date, is_due
from processor.models import CancellationRequest, Client, Product, RequestStatus, RequestType, Service, ServiceStatus
from processor.terms import CYCLE_MONTHS, NO_TERMS, Terms, add_months, cycle_months, effective_on

ZONES = ["UTC", "Europe/London", "America/New_York", "Pacific/Auckland", "Asia/Kolkata", "Pacific/Kiritimati"]
DAYS = st.dates(min_value=dt.date(2020, 1, 1), max_value=dt.date(2035, 12, 31))
INSTANTS = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 12, 31),
                        timezones=st.just(dt.UTC))


CYCLES = list(CYCLE_MONTHS)
# Month ends and leap days are where month arithmetic goes wrong: draw them often.
EDGE_DAYS = st.sampled_from([dt.date(2024, 1, 31), dt.date(2024, 2, 29), dt.date(2025, 2, 28), dt.date(2023, 12, 31),
                             dt.date(2028, 2, 29), dt.date(2025, 8, 31), dt.date(2026, 3, 30)])
ANY_DAYS = DAYS | EDGE_DAYS
TERMS = st.builds(Terms, notice_days=st.sampled_from([0, 0, 1, 7, 30, 45, 100, 366]),
                  minimum_term_months=st.sampled_from([0, 0, 1, 6, 12, 24, 120]))


def _stored(type_, next_due, cancel_on, created_on, cycle="Monthly", registration=None, terms=NO_TERMS):
    return effective_on(type_, created_on=created_on, next_due_date=next_due, cancel_on=cancel_on,
                        billing_cycle=cycle, registration_date=registration, terms=terms).on


@hsettings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(list(RequestType)), next_due=st.none() | DAYS, cancel_on=st.none() | DAYS,
       created_on=DAYS, as_of=DAYS)
def test_the_due_rule_in_python(type_, next_due, cancel_on, created_on, as_of):
    """With no notice period or term, the stored date gives the rule from before it was stored."""
    on = _stored(type_, next_due, cancel_on, created_on)
    due = is_due(on, as_of)
    due_on = effective_date(type_, next_due, cancel_on, created_on)
    # Never due before the client asked; otherwise due exactly when its date has come (or it has none).
    assert due == (created_on <= as_of and (due_on is None or due_on <= as_of))
    # Lateness is never negative, and only a due request can be late.
    late = days_late(type_, on, created_on, as_of)
    assert late >= 0 and (late == 0 or due)
    # Due stays due: a later as-of never makes a due request not due.
    assert not due or is_due(on, as_of + dt.timedelta(days=1))


@hsettings(max_examples=400, deadline=None)
@given(type_=st.sampled_from(list(RequestType)), next_due=st.none() | ANY_DAYS, cancel_on=st.none() | ANY_DAYS,
       created_on=ANY_DAYS, registration=st.none() | ANY_DAYS, cycle=st.sampled_from([*CYCLES, "One Time"]),
       terms=TERMS)
def test_the_effective_date_across_billing_cycles_month_ends_and_leap_years(
        type_, next_due, cancel_on, created_on, registration, cycle, terms):
    on = _stored(type_, next_due, cancel_on, created_on, cycle, registration, terms)
    plain = max(effective_date(type_, next_due, cancel_on, created_on) or created_on, created_on)
    # Never before the day it was made, nor before today's rule: a notice or a term only delays.
    assert on >= plain
    term_end = add_months(registration, terms.minimum_term_months) if registration else None
    if term_end is not None and terms.minimum_term_months:
        assert on >= term_end  # never inside the minimum term
    months = cycle_months(cycle)
    if type_ is RequestType.END_OF_BILLING_PERIOD and next_due is not None and months is not None:
        floor = max([plain] + ([created_on + dt.timedelta(days=terms.notice_days)] if terms.notice_days else [])
                    + ([term_end] if term_end and terms.minimum_term_months else []))
        if floor == plain:
            assert on == plain  # nothing to delay it
        else:
            # A due date of the service (next due date + whole cycles, each counted from it), the
            # first one on or after the notice and the term.
            k = next(k for k in range(0, 2000) if add_months(next_due, k * months) >= on)
            assert add_months(next_due, k * months) == on and on >= floor
            assert k == 0 or add_months(next_due, (k - 1) * months) < floor
            if terms.notice_days:
                assert (on - created_on).days >= terms.notice_days
    elif type_ is not RequestType.END_OF_BILLING_PERIOD or next_due is None:
        assert on == max([plain] + ([term_end] if term_end and terms.minimum_term_months else []))


@hsettings(max_examples=300, deadline=None)
@given(day=ANY_DAYS, months=st.integers(min_value=0, max_value=240))
def test_month_arithmetic_keeps_the_day_or_takes_the_months_last(day, months):
    later = add_months(day, months)
    assert (later.year - day.year) * 12 + later.month - day.month == months
    assert later.day == min(day.day, calendar.monthrange(later.year, later.month)[1])


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(type_=st.sampled_from(list(RequestType)), next_due=st.none() | DAYS, cancel_on=st.none() | DAYS,
       created_at=INSTANTS, as_of=DAYS, zone=st.sampled_from(ZONES), cycle=st.sampled_from(CYCLES),
       registration=st.none() | DAYS, terms=TERMS)
def test_the_due_rule_in_sql_agrees_with_python(db, type_, next_due, cancel_on, created_at, as_of, zone, cycle,
                                                registration, terms):
    if type_ is RequestType.ON_DATE and cancel_on is None:
        cancel_on = as_of  # an On Date request always has its date (the CLI and the import require it)
    on = _stored(type_, next_due, cancel_on, business_today(created_at, ZoneInfo(zone)), cycle, registration, terms)
    with db.session.begin() as s:
        s.execute(delete(CancellationRequest))
        s.execute(delete(Service))
        service = Service(client=Client(first_name="A", email="a@example.test"), product=Product(name="P"),
                          domain="d", status=ServiceStatus.ACTIVE, billing_cycle=cycle, amount=1,
                          next_due_date=next_due, registration_date=registration)
        s.add(service)
        s.flush()
        s.add(CancellationRequest(service_id=service.id, type=type_, cancel_on=cancel_on, effective_date=on,
                                  reason_code="other", reason="", status=RequestStatus.PENDING,
                                  created_at=created_at, created_by="t"))
    with db.read_session() as s:
        in_sql = s.scalar(select(CancellationRequest.id).join(Service).where(due_clause(as_of)))
        before_sql = s.scalar(select(CancellationRequest.id).where(due_before_clause(as_of)))
    assert (in_sql is not None) == is_due(on, as_of)
    assert (before_sql is not None) == (on < as_of)


# --- the request state machine -------------------------------------------------------------

import tempfile  # noqa: E402 - the state machine's own imports, kept with it
from pathlib import Path  # noqa: E402

from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402
from sqlalchemy import func  # noqa: E402

from processor import cancellations  # noqa: E402
from processor.config import Settings  # noqa: E402
from processor.db import open_database, upgrade  # noqa: E402
from processor.emails import EmailTemplates  # noqa: E402
from processor.errors import CancelprocError  # noqa: E402
from processor.models import OPEN_REQUEST_STATUSES, AuditEntry, EmailStatus, OutboxEmail, Run  # noqa: E402
from processor.outbox import withdraw_queued_emails  # noqa: E402
from processor.run import Runner, RunOptions  # noqa: E402
from tests import factories  # noqa: E402

SERVICES = 4
GRACED = 2  # the last GRACED of the SERVICES are of a product with a grace period
GRACE_DAYS = 2
ADDONS = 2  # per service: requests for one add-on alone beside the service's


class RequestLife(RuleBasedStateMachine):
    """Staff create, withdraw, retry and process requests while nightly runs apply them;
    whatever the order, nothing impossible happens."""

    def __init__(self) -> None:
        super().__init__()
        folder = Path(tempfile.mkdtemp())
        self.settings = Settings(database_url=f"sqlite:///{folder / 'c.db'}", app_root=folder,
                                 email={"staff_address": ""}, retry_backoff_minutes=0,
                                 reminder_days=[3, 1],
                                 products={"Graced": {"grace_days": GRACE_DAYS}})
        self.db = open_database(self.settings.database_url, create=True)
        upgrade(self.db)
        # Compiled once for the whole machine, not at each run's start: most of a step's time.
        self.templates = EmailTemplates()
        self.now = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
        with self.db.session.begin() as s:
            made = [factories.service(s, next_due_date=self.now.date() + dt.timedelta(days=i), addons=ADDONS,
                                      addon_due=self.now.date() + dt.timedelta(days=SERVICES - i))
                    for i in range(SERVICES)]
            # One client with no usable address: its requests fail and are retried.
            made.append(factories.service(s, email="", addons=ADDONS))
            self.services = [svc.id for svc in made]
            self.addons = {svc.id: sorted(a.id for a in svc.addons) for svc in made}
            for service_id in self.services[SERVICES - GRACED:SERVICES]:  # suspended first, cancelled later
                s.get(Service, service_id).product.name = "Graced"
        self.requests: list[int] = []
        # The reminder keys of each request not pending, as first seen so: they must not grow.
        self.reminders_when_closed: dict[int, set[str]] = {}
        self.withdrawn_at_the_cli: set[int] = set()
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
        self.processed_now.add(request_id)
        Runner(self.db, self.settings, clock=lambda: self.now, templates=self.templates).run(
            RunOptions(as_of=self.now.date(), request_ids=[request_id], ignore_due_date=True, digest=False))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def withdraw_at_the_cli(self, data) -> None:
        """As `requests withdraw` does it: with the request's queued emails (a reminder too)."""
        request_id = data.draw(st.sampled_from(self.requests))

        def both(s, request_id, *, actor, now):
            cancellations.withdraw_request(s, request_id, actor=actor, now=now)
            withdraw_queued_emails(s, request_id, actor=actor, now=now)
            self.withdrawn_at_the_cli.add(request_id)
        self._staff(both, request_id)

    @rule(days=st.integers(0, 3))
    def nightly_run(self, days: int) -> None:
        self.now += dt.timedelta(days=days)
        Runner(self.db, self.settings, clock=lambda: self.now, templates=self.templates).run(
            RunOptions(as_of=self.now.date()))

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


    @invariant()
    def reminders_once_and_only_while_pending(self) -> None:
        """At most one reminder per request and reminder_days entry; none queued once the
        request left pending (withdrawn, completed, failed), none for a withdrawn request
        left queued by `requests withdraw`."""
        with self.db.read_session() as s:
            reminders = s.execute(select(OutboxEmail.request_id, OutboxEmail.key, OutboxEmail.status).where(
                OutboxEmail.template == "cancellation_reminder")).all()
            status = dict(s.execute(select(CancellationRequest.id, CancellationRequest.status)).all())
        by_request: dict[int, set[str]] = {}
        for request_id, key, _ in reminders:
            assert key.startswith(f"cancellation_reminder:request:{request_id}:"), key
            assert key not in by_request.get(request_id, set()), f"reminder {key} queued twice"
            by_request.setdefault(request_id, set()).add(key)
            assert int(key.rsplit(":", 1)[1]) in self.settings.reminder_days, key
        for request_id, state in status.items():
            keys = by_request.get(request_id, set())
            if state is RequestStatus.PENDING:
                self.reminders_when_closed.pop(request_id, None)  # retried: pending again
                continue
            first_seen = self.reminders_when_closed.setdefault(request_id, keys)
            assert keys == first_seen, f"request {request_id} ({state}) got reminders after it left pending"
        queued_withdrawn = [(rid, key) for rid, key, email_status in reminders if email_status is EmailStatus.QUEUED
                            and status[rid] is RequestStatus.WITHDRAWN and rid in self.withdrawn_at_the_cli]
        assert not queued_withdrawn, f"a withdrawn request's reminder is still queued: {queued_withdrawn}"


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
            if r.service.status is ServiceStatus.SUSPENDED and r.status is RequestStatus.WITHDRAWN:
                # Only a grace period suspends here: another request of the service holds it.
                assert any(other.suspended_on is not None and other.status in OPEN_REQUEST_STATUSES
                           for other in s.scalars(select(CancellationRequest).where(
                               CancellationRequest.service_id == r.service_id, CancellationRequest.id != r.id))), \
                    f"withdrawn request {r.id} left its service suspended"
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


# --- credit for unused time (processor/credits.py) --------------------------------------------

CYCLES = st.sampled_from(["Monthly", "Quarterly", "Semi-Annually", "Annually", "Biennially", "Triennially"])
# Leap days and month ends on purpose: 2028-02-29, 2024-02-29, the 31sts.
DUE_DATES = st.one_of(DAYS, st.sampled_from([dt.date(2028, 2, 29), dt.date(2024, 2, 29), dt.date(2025, 3, 31),
                                             dt.date(2028, 3, 31), dt.date(2026, 8, 31), dt.date(2029, 2, 28)]))
AMOUNTS = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99999.99"), places=2)


@hsettings(max_examples=400, deadline=None)
@given(cycle=CYCLES, next_due=DUE_DATES, amount=AMOUNTS, offset=st.integers(min_value=-40, max_value=1200))
def test_proration_credit_and_used_part_add_up_to_the_invoice(cycle, next_due, amount, offset):
    start, end = credits.period(next_due, cycle)
    months = credits.CYCLE_MONTHS[cycle.lower()]
    # The period is one billing cycle: as many months back, the day kept or clamped to the month's end.
    assert start < end and (end.year * 12 + end.month) - (start.year * 12 + start.month) == months
    assert start.day == min(end.day, calendar.monthrange(start.year, start.month)[1])
    days = (end - start).days
    assert 28 * months <= days <= 31 * months
    on = start + dt.timedelta(days=offset)
    paid = credits.PaidInvoice(7, amount)
    credit = credits.unused_credit(3, paid, next_due, cycle, on)
    left = min(max((end - on).days, 0), days)
    if left == 0:  # on or after the period's end: nothing is unused
        assert credit is None
        return
    got = credit.amount if credit is not None else Decimal(0)
    exact = amount * left / days
    # To the cent, half to even: never more than half a cent off the exact share, and
    # the credit plus the used part (rounded the same way) is the invoice, within a cent.
    assert abs(got - exact) <= Decimal("0.005") and got == got.quantize(Decimal("0.01"))
    used = credits.prorate(amount, days - left, days)
    assert abs(got + used - amount) <= Decimal("0.01")
    assert Decimal(0) <= got <= amount
    if credit is not None:
        assert (credit.days_unused, credit.days_in_period, credit.period_start, credit.period_end) == (
            left, days, start, end)
    # Monotonic: a day later never gives more back.
    later = credits.unused_credit(3, paid, next_due, cycle, on + dt.timedelta(days=1))
    assert (later.amount if later else Decimal(0)) <= got


@given(cycle=CYCLES, next_due=DUE_DATES, amount=AMOUNTS)
def test_cancelling_on_the_first_day_credits_everything_and_nothing_without_a_period(cycle, next_due, amount):
    start, _ = credits.period(next_due, cycle)
    paid = credits.PaidInvoice(1, amount)
    assert credits.unused_credit(1, paid, next_due, cycle, start).amount == amount
    for no_period in ("Free Account", "One Time", "", None):
        assert credits.unused_credit(1, paid, next_due, no_period, start) is None
    assert credits.unused_credit(1, paid, None, cycle, start) is None
    assert credits.unused_credit(1, None, next_due, cycle, start) is None  # no paid invoice: no credit


def test_leap_years_count_their_day():
    """An annual period over 29 February has 366 days; the day is worth 1/366 of the invoice."""
    assert credits.period(dt.date(2028, 3, 1), "Annually") == (dt.date(2027, 3, 1), dt.date(2028, 3, 1))
    credit = credits.unused_credit(1, credits.PaidInvoice(1, Decimal("366.00")), dt.date(2028, 3, 1), "Annually",
                                   dt.date(2028, 2, 29))
    assert (credit.amount, credit.days_unused, credit.days_in_period) == (Decimal("1.00"), 1, 366)
    # A due date on the 31st: the month before ends on its own last day.
    assert credits.period(dt.date(2028, 3, 31), "Monthly") == (dt.date(2028, 2, 29), dt.date(2028, 3, 31))
    # Half a cent goes to the even cent.
    assert credits.prorate(Decimal("0.05"), 1, 2) == Decimal("0.02")
    assert credits.prorate(Decimal("0.07"), 1, 2) == Decimal("0.04")
