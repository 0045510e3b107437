"""Every SQL statement of a run, behind one object that takes a Connection and never commits.

The caller owns the transaction (`with db.engine.begin() as conn: RunStore(conn, ...)`):
a chunk's claim, writes, counts and lease renewal commit together or not at all, so the
run record always matches what was committed.

Exactly once: inside the write transaction every request is claimed again
(`status = 'pending'`, under the write lock), so a request completed by an overlapping
run or by `requests process` is skipped, never applied twice.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import (
    Connection,
    Select,
    String,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError, StatementError
from sqlalchemy.orm import Session

from processor import lease
from processor.credits import PaidInvoice
from processor.db import Database
from processor.digest import recorded_failures
from processor.due import due_clause, ready_clause
from processor.emails import ADDON_CANCELLATION_CONFIRMATION, SERVICE_CANCELLATION_CONFIRMATION, SERVICE_SUSPENDED
from processor.errors import one_line
from processor.models import (
    CLOSED_SERVICE_STATUSES,
    OPEN_ADDON_REQUEST,
    OPEN_REQUEST_STATUSES,
    AuditAction,
    AuditEntity,
    AuditEntry,
    CancellationRequest,
    Client,
    Credit,
    Invoice,
    InvoiceStatus,
    Product,
    RequestStatus,
    RequestType,
    Run,
    RunStatus,
    Service,
    ServiceAddon,
    ServiceStatus,
    UTCDateTime,
)
from processor.outbox import queue
from processor.params import addon_select, plain_rows, request_select, with_addons
from processor.retry import RetryPolicy
from processor.run.decide import Orphan
from processor.run.outcome import FAILED_ATTEMPT, Action, Outcome, RunOptions, Tally

R, S, C, P = CancellationRequest, Service, Client, Product
# What an AddonCancelled hook gets of a cancelled add-on (RETURNING, only when one is registered).
_ADDON_COLUMNS = (ServiceAddon.id, ServiceAddon.service_id, ServiceAddon.external_id, ServiceAddon.name,
                  ServiceAddon.amount, ServiceAddon.next_due_date)
# The open requests for add-ons of a chunk's services, read through the partial unique index
# that holds only them (usually none, or a few). Without statistics SQLite's planner walks
# every pending request instead (the status index), for each chunk: a night's cost growing
# with its size squared. Its INDEXED BY has no SQLAlchemy form; PostgreSQL plans by its
# statistics (`_open_addon_requests`).
_OPEN_ADDON_REQUESTS_SQLITE = text(
    "SELECT id FROM cancellation_requests INDEXED BY uq_cancellation_requests_open_addon "
    f"WHERE {OPEN_ADDON_REQUEST} AND service_id IN (SELECT value FROM json_each(:service_ids))")
ACTOR = "cancelproc"
log = structlog.get_logger("cancelproc.run")


@dataclass(frozen=True)
class StoreRules:
    """The settings the run's SQL depends on, fixed for a run."""

    zone: ZoneInfo
    cancel_unpaid_invoices: bool
    from_address: str
    lease_seconds: int
    retry: RetryPolicy
    hooked: bool  # read the columns the hooks' params need
    returning_addons: bool  # an AddonCancelled hook wants the add-ons cancelled
    returning_invoices: bool  # an InvoiceCancelled hook wants the invoices cancelled
    credits: bool = False  # immediate_refund = "credit": outcomes may carry a credit to write


class RunStore:
    """The run's SQL on one connection, in the caller's transaction."""

    def __init__(self, conn: Connection, db: Database, rules: StoreRules) -> None:
        self.conn = conn
        self.db = db  # for the dialect's way of passing a chunk's ids
        self.rules = rules

    # --- reading -------------------------------------------------------------------------

    def due_query(self, options: RunOptions, now: dt.datetime, after_id: int = 0) -> Select:
        """Due requests after `after_id`, in id order (the caller sets the limit)."""
        stmt = (
            request_select(for_hooks=self.rules.hooked, addons=False)
            .where(R.status == RequestStatus.PENDING, R.id > after_id)
            .order_by(R.id)
        )
        if options.request_ids is not None:
            stmt = stmt.where(R.id.in_(options.request_ids))
        else:
            # Backoff: a request that failed recently waits for its next attempt time.
            stmt = stmt.where(ready_clause(now))
        if not options.ignore_due_date:
            stmt = stmt.where(due_clause(options.as_of))
        return stmt

    def read_due(self, options: RunOptions, now: dt.datetime, after_id: int, size: int) -> list[Any]:
        """The next `size` due requests after `after_id` (keyset pagination)."""
        return self._rows(self.conn.execute(self.due_query(options, now, after_id).limit(size)).all())

    def claim_due(self, options: RunOptions, run_id: int, now: dt.datetime, size: int, *, wait: bool) -> list[Any]:
        """PostgreSQL: lock up to `size` due requests this run has not tried yet, skipping
        those other processes hold (or, with `wait`, waiting for them)."""
        claim = (self.due_query(options, now)
                 .where(or_(R.run_id.is_(None), R.run_id != run_id))
                 .limit(size).with_for_update(skip_locked=not wait, of=R))
        return self._rows(self.conn.execute(claim).all())

    def _rows(self, rows: Sequence[Any]) -> list[Any]:
        """The due query's rows as the run reads them: with the add-on of each request for one
        add-on, read apart (most chunks have none)."""
        plain = plain_rows(rows, self.rules.hooked)
        addon_ids = [row.addon_id for row in plain if row.addon_id is not None]
        if not addon_ids:
            return plain
        addons = {row[0]: row for row in self.conn.execute(
            addon_select().where(self.db.in_ids(ServiceAddon.id, addon_ids)))}
        return with_addons(plain, addons)

    def count_due(self, options: RunOptions, now: dt.datetime) -> int:
        query = self.due_query(options, now).with_only_columns(R.id).order_by(None)
        total: int = self.conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        return total if options.limit is None else min(total, options.limit)

    def orphans(self, options: RunOptions, limit: int | None = None) -> list[Orphan]:
        """Pending requests whose service, or that service's client or product, is gone:
        deleted outside cancelproc with the foreign keys off. They never join to the due
        query, so without this they would wait, unseen, for ever."""
        query = (select(R.id, R.service_id, R.attempts, S.id, S.client_id, C.id, S.product_id, P.id)
                 .select_from(R).outerjoin(S, S.id == R.service_id).outerjoin(C, C.id == S.client_id)
                 .outerjoin(P, P.id == S.product_id)
                 .where(R.status == RequestStatus.PENDING, or_(S.id.is_(None), C.id.is_(None), P.id.is_(None)))
                 .order_by(R.id).limit(limit))
        if options.request_ids is not None:
            query = query.where(R.id.in_(options.request_ids))
        orphans = []
        for request_id, service_id, attempts, found_service, client_id, found_client, product_id, _ in \
                self.conn.execute(query):
            missing = (f"service #{service_id}" if found_service is None
                       else f"client #{client_id} of service #{service_id}" if found_client is None
                       else f"product #{product_id} of service #{service_id}")
            orphans.append(Orphan(request_id, service_id, attempts, missing))
        return orphans

    def open_addons(self, service_ids: Sequence[int]) -> dict[int, list[str]]:
        """The names of the open add-ons of these services (for the dry run)."""
        found: dict[int, list[str]] = {}
        for service_id, name in self.conn.execute(select(ServiceAddon.service_id, ServiceAddon.name).where(
                self.db.in_ids(ServiceAddon.service_id, service_ids),
                ServiceAddon.status.not_in(CLOSED_SERVICE_STATUSES))):
            found.setdefault(service_id, []).append(name)
        return found

    def unpaid_invoices(self, service_ids: Sequence[int]) -> dict[int, list[str]]:
        """'#id amount' of the unpaid invoices of these services (for the dry run)."""
        found: dict[int, list[str]] = {}
        for service_id, invoice_id, amount in self.conn.execute(select(Invoice.service_id, Invoice.id, Invoice.amount)
                .where(self.db.in_ids(Invoice.service_id, service_ids), Invoice.status == InvoiceStatus.UNPAID)):
            found.setdefault(service_id, []).append(f"#{invoice_id} {amount}")
        return found

    def last_paid(self, service_ids: Sequence[int]) -> dict[int, PaidInvoice]:
        """The last paid invoice of each of these services (latest due date, then highest
        id): what the period being cut short cost. One statement for the chunk."""
        if not service_ids:
            return {}
        rank = func.row_number().over(partition_by=Invoice.service_id,
                                      order_by=(Invoice.due_date.desc().nulls_last(), Invoice.id.desc()))
        ranked = (select(Invoice.service_id, Invoice.id, Invoice.amount, rank.label("n"))
                  .where(self.db.in_ids(Invoice.service_id, service_ids), Invoice.status == InvoiceStatus.PAID)
                  .subquery())
        return {service_id: PaidInvoice(invoice_id, amount) for service_id, invoice_id, amount in self.conn.execute(
            select(ranked.c.service_id, ranked.c.id, ranked.c.amount).where(ranked.c.n == 1))}

    # --- writing a chunk -------------------------------------------------------------------

    def write_chunk(self, outcomes: list[Outcome], run_id: int, as_of: dt.date, now: dt.datetime) -> Tally:
        """Write a chunk's outcomes, count them into the run record and renew the lease. The
        set-based write runs in a savepoint; if a row's data breaks it, the rows are written
        again one by one, each in its own savepoint, so that row fails alone."""
        try:
            with self.conn.begin_nested():
                self._write(outcomes, run_id, as_of, now)
        except (DBAPIError, StatementError) as exc:
            if not _is_row_error(exc):
                raise
            log.warning("chunk write failed; isolating rows", error=one_line(exc), requests=len(outcomes))
            self._write_rows_alone(outcomes, run_id, as_of, now)
        return self.close_chunk(run_id, outcomes, now)

    def _write_rows_alone(self, outcomes: list[Outcome], run_id: int, as_of: dt.date, now: dt.datetime) -> None:
        """Each outcome in its own savepoint: a row the database refuses fails alone."""
        for o in outcomes:
            try:
                with self.conn.begin_nested():
                    self._write([o], run_id, as_of, now)
            except (DBAPIError, StatementError) as exc:
                if not _is_row_error(exc):
                    raise
                o.action, o.email, o.error = Action.ERROR, None, one_line(exc)
                with self.conn.begin_nested():
                    self._write([o], run_id, as_of, now)

    def _write(self, outcomes: list[Outcome], run_id: int, as_of: dt.date, now: dt.datetime) -> None:
        """Write outcomes with set-based statements."""
        ids = [o.request_id for o in outcomes if o.action is not Action.SKIPPED]
        if not ids:
            return
        # Claim again under the write lock: only requests still pending are ours to write (and
        # a suspension only of one not suspended yet: each phase of a grace period once).
        still_pending = {request_id: grace_ends_on for request_id, grace_ends_on in self.conn.execute(
            select(R.id, R.grace_ends_on).where(self.db.in_ids(R.id, ids), R.status == RequestStatus.PENDING)
            .with_for_update())}
        for o in outcomes:
            if o.request_id not in still_pending or (
                    o.suspending and still_pending[o.request_id] is not None):
                o.action = Action.SKIPPED
        cancels = [o for o in outcomes if o.action is Action.CANCEL]
        addon_cancels = [o for o in cancels if o.addon_id is not None]
        if addon_cancels:  # requests for one add-on: the service stays
            cancels = [o for o in cancels if o.addon_id is None]
            addon_cancels = self._not_cascaded(addon_cancels, cancels)
        noops = [o for o in outcomes if o.action is Action.NOOP]
        audit = _Audit(self.conn, run_id, now)
        suspends = [o for o in outcomes if o.action is Action.SUSPEND]
        if suspends:
            self._suspend_services(audit, suspends, run_id, as_of)
            queue(self.conn, [o.email for o in suspends if o.email], run_id=run_id, now=now,
                  from_address=self.rules.from_address)
            audit.rows([(o.request_id, AuditEntity.EMAIL, o.request_id, AuditAction.ABORTED,
                         f"{SERVICE_SUSPENDED} not queued: abortsend from {o.email_aborted_by}")
                        for o in suspends if o.email_aborted_by])
        if cancels:
            self._cancel_services(audit, cancels, as_of)
            credited = [o for o in cancels if o.credit is not None] if self.rules.credits else None
            if credited:
                self._credit(audit, credited, run_id, now)
            queue(self.conn, [o.email for o in cancels if o.email], run_id=run_id, now=now,
                  from_address=self.rules.from_address)
        if addon_cancels:
            self._cancel_addons(audit, addon_cancels)
            queue(self.conn, [o.email for o in addon_cancels if o.email], run_id=run_id, now=now,
                  from_address=self.rules.from_address)
        self._complete_requests(cancels + addon_cancels + noops, run_id, now)
        if cancels:
            self._close_addon_requests(audit, cancels, run_id, now)
        audit.rows([(o.request_id, AuditEntity.REQUEST, o.request_id, AuditAction.COMPLETED,
                     f"no-op: {o.noop_reason or f'service already {o.service_status}'}; "
                     "request completed without changes")
                    for o in noops])
        audit.rows([(o.request_id, AuditEntity.EMAIL, o.request_id, AuditAction.ABORTED,
                     f"{ADDON_CANCELLATION_CONFIRMATION if o.addon_id else SERVICE_CANCELLATION_CONFIRMATION} "
                     f"not queued: abortsend from {o.email_aborted_by}")
                    for o in cancels + addon_cancels if o.email_aborted_by])
        for o in outcomes:
            if o.action in FAILED_ATTEMPT:
                self._record_failure(audit, o, run_id, now)

    def _suspend_services(self, audit: _Audit, suspends: list[Outcome], run_id: int, as_of: dt.date) -> None:
        """The first phase of a grace period: suspend these requests' services and record, on
        each request, the day it was suspended and the day its grace period ends. The request
        stays pending (open); its attempts start again from 0 for the cancellation. Audited."""
        chunk = self.db.in_ids(R.id, [o.request_id for o in suspends])
        audit.select(AuditEntity.SERVICE, select(R.id, S.id, literal(AuditAction.SUSPENDED.value),
                                                 literal("was ") + S.status + literal(f"; suspended {as_of}"))
                     .join(S, S.id == R.service_id).where(chunk))
        audit.rows([(o.request_id, AuditEntity.REQUEST, o.request_id, AuditAction.SUSPENDED,
                     f"grace period: service suspended; cancelled on {o.grace_ends_on} unless withdrawn")
                    for o in suspends])
        services = select(R.service_id).where(chunk).scalar_subquery()
        self.conn.execute(update(S).where(S.id.in_(services), S.status.not_in(CLOSED_SERVICE_STATUSES))
                          .values(status=ServiceStatus.SUSPENDED))
        by_end: dict[dt.date, list[int]] = {}  # few distinct ends (one per grace_days value): one UPDATE each
        for o in suspends:
            assert o.grace_ends_on is not None
            by_end.setdefault(o.grace_ends_on, []).append(o.request_id)
        for grace_ends_on, request_ids in by_end.items():
            self.conn.execute(update(R).where(self.db.in_ids(R.id, request_ids)).values(
                # The cancellation now takes effect at the end of the grace period: the due scan
                # (the effective date, in its index) takes it again then, and nothing before.
                effective_date=grace_ends_on,
                suspended_on=as_of, grace_ends_on=grace_ends_on, run_id=run_id, days_late=None,
                attempts=0, last_error=None, next_attempt_at=None))

    @staticmethod
    def _not_cascaded(addon_cancels: list[Outcome], cancels: list[Outcome]) -> list[Outcome]:
        """The add-on requests of this chunk whose service is not cancelled in it too. Those
        whose service is become no-ops (no email of their own): the service's cancellation
        cancels the add-on with it."""
        by_service = {o.service_id: o.request_id for o in cancels}
        kept = []
        for o in addon_cancels:
            if o.service_id in by_service:
                o.action, o.email, o.params = Action.NOOP, None, None
                o.noop_reason = f"add-on cancelled with its service by request #{by_service[o.service_id]}"
            else:
                kept.append(o)
        return kept

    def _cancel_addons(self, audit: _Audit, cancels: list[Outcome]) -> None:
        """Cancel the add-ons of requests for one add-on, each alone: the service, its other
        add-ons and its invoices stay as they are. Audited as `_cancel_services` does."""
        chunk = self.db.in_ids(R.id, [o.request_id for o in cancels])
        addon, open_addon = ServiceAddon, ServiceAddon.status.not_in(CLOSED_SERVICE_STATUSES)
        audit.select(AuditEntity.ADDON, select(R.id, addon.id, literal(AuditAction.CANCELLED.value),
                                               literal("alone, by its own request; the service stays"))
                     .join(addon, addon.id == R.addon_id).where(chunk, open_addon))
        addon_ids = self.db.in_ids(addon.id, [o.addon_id for o in cancels if o.addon_id is not None])
        changed = self._update(update(addon).where(addon_ids, open_addon).values(status=ServiceStatus.CANCELLED),
                               _ADDON_COLUMNS,
                               self.rules.returning_addons)
        for o in cancels:
            o.addons = [a for a in changed.get(o.service_id, ()) if a["id"] == o.addon_id]

    def _close_addon_requests(self, audit: _Audit, cancels: list[Outcome], run_id: int, now: dt.datetime) -> None:
        """The open requests for add-ons of the services just cancelled are done: the service's
        cancellation cancelled those add-ons too. Completed (not withdrawn: what they asked
        for happened), each audited naming the service's request. One statement per chunk;
        the audit only when it closed some."""
        by_service = {o.service_id: o.request_id for o in cancels}
        found = self._open_addon_requests(list(by_service))
        if not found:
            return
        closed = self.conn.execute(
            update(R).where(self.db.in_ids(R.id, found), R.status.in_(OPEN_REQUEST_STATUSES))
            .values(status=RequestStatus.COMPLETED, processed_at=now, run_id=run_id, next_attempt_at=None)
            .returning(R.id, R.service_id)).all()
        audit.rows([(request_id, AuditEntity.REQUEST, request_id, AuditAction.COMPLETED,
                     f"closed: its add-on was cancelled with the service by request #{by_service[service_id]}")
                    for request_id, service_id in closed])

    def _open_addon_requests(self, service_ids: list[int]) -> list[int]:
        """The ids of the open requests for add-ons of these services."""
        if self.db.is_sqlite:
            query: Any = _OPEN_ADDON_REQUESTS_SQLITE.bindparams(service_ids=json.dumps(service_ids))
        else:
            query = select(R.id).where(text(OPEN_ADDON_REQUEST), self.db.in_ids(R.service_id, service_ids))
        return [row[0] for row in self.conn.execute(query)]

    def _cancel_services(self, audit: _Audit, cancels: list[Outcome], as_of: dt.date) -> None:
        """Cancel the services of these requests, their add-ons and unpaid invoices; audit each.

        Each audit INSERT ... SELECT runs before its UPDATE, so it sees (and can name) what
        the row was. Rows come back into Python (RETURNING) only for hooks that want them.
        """
        chunk = self.db.in_ids(R.id, [o.request_id for o in cancels])
        open_addon = ServiceAddon.status.not_in(CLOSED_SERVICE_STATUSES)
        cancelled = literal(AuditAction.CANCELLED.value)
        audit.select(AuditEntity.SERVICE, select(R.id, S.id, cancelled,
                                                 literal("was ") + S.status + literal(f"; termination date {as_of}"))
                     .join(S, S.id == R.service_id).where(chunk))
        audit.select(AuditEntity.ADDON, select(R.id, ServiceAddon.id, cancelled, literal(""))
                     .join(ServiceAddon, ServiceAddon.service_id == R.service_id).where(chunk, open_addon))
        if self.rules.cancel_unpaid_invoices:
            audit.select(AuditEntity.INVOICE, select(R.id, Invoice.id, cancelled,
                                                     literal("unpaid amount ") + cast(Invoice.amount, String))
                         .join(Invoice, Invoice.service_id == R.service_id)
                         .where(chunk, Invoice.status == InvoiceStatus.UNPAID))
        services = select(R.service_id).where(chunk).scalar_subquery()
        self.conn.execute(update(S).where(S.id.in_(services), S.status.not_in(CLOSED_SERVICE_STATUSES))
                          .values(status=ServiceStatus.CANCELLED, termination_date=as_of))
        addon, invoice = ServiceAddon, Invoice
        addons = self._update(update(addon).where(addon.service_id.in_(services), open_addon)
                              .values(status=ServiceStatus.CANCELLED),
                              _ADDON_COLUMNS,
                              self.rules.returning_addons)
        invoices = self._update(update(invoice).where(invoice.service_id.in_(services),
                                                      invoice.status == InvoiceStatus.UNPAID)
                                .values(status=InvoiceStatus.CANCELLED),
                                (invoice.id, invoice.service_id, invoice.external_id, invoice.amount,
                                 invoice.due_date),
                                self.rules.returning_invoices) if self.rules.cancel_unpaid_invoices else {}
        for o in cancels:
            o.addons, o.invoices = addons.get(o.service_id, ()), invoices.get(o.service_id, ())

    def _credit(self, audit: _Audit, credited: list[Outcome], run_id: int, now: dt.datetime) -> None:
        """Record each credit, lower its client's balance by it, audit it: in the chunk's
        transaction, so a credit exists exactly when its cancellation does (a request is
        credited once: its request_id is unique in credits)."""
        rows = []
        for o in credited:
            c = o.credit
            assert c is not None
            rows.append(dict(client_id=c.client_id, service_id=o.service_id, request_id=o.request_id, run_id=run_id,
                             invoice_id=c.invoice_id, amount=c.amount, period_start=c.period_start,
                             period_end=c.period_end, days_unused=c.days_unused, days_in_period=c.days_in_period,
                             created_at=now, description=c.description))
        written = insert(Credit).returning(Credit.request_id, Credit.id, sort_by_parameter_order=True)
        ids = {request_id: credit_id for request_id, credit_id in self.conn.execute(written, rows)}
        totals: dict[int, Any] = {}
        for o in credited:
            assert o.credit is not None
            o.credit_id = ids[o.request_id]
            totals[o.credit.client_id] = totals.get(o.credit.client_id, 0) + o.credit.amount
        # Above 0 the client owes money (params' client["balance"]): a credit lowers it.
        self.conn.execute(update(Client).where(Client.id == bindparam("client")).values(
            balance=Client.balance - bindparam("credit", type_=Client.balance.type)),
            [{"client": client_id, "credit": total} for client_id, total in totals.items()])
        audit.rows([(o.request_id, AuditEntity.CLIENT, o.credit.client_id, AuditAction.CREDITED,
                     o.credit.description) for o in credited if o.credit is not None])

    def _update(self, stmt: Any, columns: tuple[Any, ...], returning: bool) -> dict[int, list[dict[str, Any]]]:
        """Run an UPDATE; with `returning`, the rows it changed by service id."""
        if not returning:
            self.conn.execute(stmt)
            return {}
        by_service: dict[int, list[dict[str, Any]]] = {}
        names = [c.key for c in columns]
        for row in self.conn.execute(stmt.returning(*columns)).all():
            fields = dict(zip(names, row, strict=True))  # as .mappings() gives, without a RowMapping per row
            by_service.setdefault(fields.pop("service_id"), []).append(fields)
        return by_service

    def _complete_requests(self, done: list[Outcome], run_id: int, now: dt.datetime) -> None:
        """Mark requests completed, each with its lateness, in one statement."""
        if not done:
            return
        late = self.db.id_values([(o.request_id, o.days_late) for o in done])
        self.conn.execute(update(R).where(R.id == late.c.id).values(
            status=RequestStatus.COMPLETED, processed_at=now, run_id=run_id, days_late=late.c.value,
            attempts=R.attempts + 1, last_error=None, next_attempt_at=None))

    def _record_failure(self, audit: _Audit, o: Outcome, run_id: int, now: dt.datetime) -> None:
        """One more failed (or vetoed) attempt: retry later with backoff, or give up (manual
        cancellation required)."""
        decision = self.rules.retry.after_failure(o.attempts + 1, now)
        o.gave_up = decision.give_up
        self.conn.execute(update(R).where(R.id == o.request_id).values(
            attempts=R.attempts + 1, last_error=o.error, run_id=run_id, next_attempt_at=decision.next_attempt_at,
            status=RequestStatus.FAILED if decision.give_up else RequestStatus.PENDING))
        if decision.give_up:
            audit.rows([(o.request_id, AuditEntity.REQUEST, o.request_id, AuditAction.FAILED,
                         f"{o.error}; gave up after {o.attempts + 1} attempts: manual cancellation required")])
        else:
            action = AuditAction.VETOED if o.action is Action.VETOED else AuditAction.ATTEMPT_FAILED
            audit.rows([(o.request_id, AuditEntity.REQUEST, o.request_id, action,
                         f"{o.error}; next attempt after {decision.next_attempt_at:%Y-%m-%d %H:%M} UTC")])

    def fail_orphans(self, orphans: list[Outcome], run_id: int, now: dt.datetime) -> list[Outcome]:
        """Record orphans (see `orphans`) as failed for good in this run; return those that
        were still pending."""
        audit = _Audit(self.conn, run_id, now)
        failed = []
        for o in orphans:
            if self.conn.execute(update(R).where(R.id == o.request_id, R.status == RequestStatus.PENDING).values(
                    status=RequestStatus.FAILED, attempts=R.attempts + 1, last_error=o.error, run_id=run_id,
                    next_attempt_at=None)).rowcount:
                audit.rows([(o.request_id, AuditEntity.REQUEST, o.request_id, AuditAction.FAILED,
                             f"{o.error}: manual cancellation required")])
                failed.append(o)
        return failed

    def close_chunk(self, run_id: int, outcomes: list[Outcome], now: dt.datetime) -> Tally:
        """Count the chunk into the run record and renew the lease, in the chunk's transaction.
        The caller counts it into its summary once the transaction has committed."""
        t = Tally.of(outcomes)
        added = {name: getattr(Run, name) + getattr(t, name) for name in Run.CHUNK_COUNTS if name != "max_days_late"}
        self.conn.execute(update(Run).where(Run.id == run_id).values(
            **added,
            max_days_late=case((Run.max_days_late > t.max_days_late, Run.max_days_late), else_=t.max_days_late)))
        # From now, not from when the chunk was read: hooks may have taken most of the lease.
        self.renew_lease(run_id, now)
        return t

    # --- the run record --------------------------------------------------------------------

    def open_run(self, options: RunOptions, clock: Callable[[], dt.datetime]) -> int:
        """Take the lease, creating the run record (the clock is read once the lock is had).
        Raises LeaseHeld naming the run that holds it."""
        # lease.py speaks ORM; this session only flushes into our transaction, never commits it.
        with Session(bind=self.conn, join_transaction_mode="rollback_only") as session:
            run = lease.acquire(session, clock=clock, seconds=self.rules.lease_seconds, trigger=options.trigger,
                                operator=options.operator, as_of=options.as_of, me=lease.Holder.this_process())
            return run.id

    def renew_lease(self, run_id: int, now: dt.datetime) -> None:
        lease.renew(self.conn, run_id, now=now, seconds=self.rules.lease_seconds)

    def running_run(self) -> tuple[int, RunOptions] | None:
        """The run in progress (holding the lease), to join it."""
        row = self.conn.execute(select(Run.id, Run.as_of, Run.trigger, Run.operator)
                                .join(lease.Lease, lease.Lease.run_id == Run.id)
                                .where(lease.Lease.name == lease.LEASE_NAME, Run.status == RunStatus.RUNNING)
                                ).one_or_none()
        if row is None:
            return None
        return row.id, RunOptions(as_of=row.as_of, trigger=row.trigger, operator=row.operator)

    def recorded(self, run_id: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """The run's counts and failures as recorded (by every process that worked on it)."""
        counts = self.conn.execute(select(*(getattr(Run, name) for name in Run.CHUNK_COUNTS))
                                   .where(Run.id == run_id)).one()
        return dict(zip(Run.CHUNK_COUNTS, counts, strict=True)), recorded_failures(self.conn, run_id)

    def finish_run(self, run_id: int, status: RunStatus, now: dt.datetime, *, error: str | None = None,
                   emails_sent: int | None = None, emails_failed: int | None = None) -> None:
        """Close the run record (if still running) and release the lease."""
        delivered = {} if emails_sent is None else dict(emails_sent=emails_sent, emails_failed=emails_failed)
        self.conn.execute(update(Run).where(Run.id == run_id, Run.status == RunStatus.RUNNING)
                          .values(status=status, finished_at=now, error=error, **delivered))
        lease.release(self.conn, run_id)


class _Audit:
    """Audit rows of one chunk: the run, actor and time are bound once, not per row."""

    def __init__(self, conn: Connection, run_id: int, now: dt.datetime) -> None:
        self.conn = conn
        self.constants = dict(at=now, actor=ACTOR, run_id=run_id)

    def rows(self, rows: list[tuple[int, AuditEntity, int, AuditAction, str]]) -> None:
        """(request_id, entity, entity_id, action, detail) tuples."""
        if rows:
            self.conn.execute(insert(AuditEntry).values(**self.constants), [
                dict(request_id=r, entity=e, entity_id=i, action=a, detail=d) for r, e, i, a, d in rows])

    def select(self, entity: AuditEntity, query: Any) -> None:
        """Audit rows from a query selecting (request_id, entity_id, action, detail)."""
        q = query.add_columns(literal(self.constants["at"], UTCDateTime()), literal(ACTOR),
                              literal(self.constants["run_id"]), literal(entity.value))
        self.conn.execute(insert(AuditEntry).from_select(
            ["request_id", "entity_id", "action", "detail", "at", "actor", "run_id", "entity"], q))


Reading = Callable[[], AbstractContextManager[RunStore]]


def due_chunks(reading: Reading, options: RunOptions, now: dt.datetime, chunk_size: int) -> Iterator[list[Any]]:
    """Due requests a chunk at a time, in id order (keyset pagination, never the whole
    table), at most `options.limit` in all; each read is its own short transaction
    (`reading()` opens a read-only store), so no lock is held between chunks."""
    after_id, remaining = 0, options.limit
    while remaining is None or remaining > 0:
        size = chunk_size if remaining is None else min(chunk_size, remaining)
        with reading() as store:
            rows = store.read_due(options, now, after_id, size)
        if not rows:
            return
        yield rows
        after_id = rows[-1].id
        if remaining is not None:
            remaining -= len(rows)


def paid_for(rows: list[Any]) -> list[int]:
    """The services whose last paid invoice a chunk needs: those of its Immediate requests
    still open (only they can be credited)."""
    return [row.service_id for row in rows
            if row.type is RequestType.IMMEDIATE and row.service_status not in CLOSED_SERVICE_STATUSES]


def _is_row_error(exc: BaseException) -> bool:
    """A failure caused by one row's data (isolate it), not by the database being unusable
    or by a statement that is wrong for every row (a bug)."""
    return not isinstance(exc, (OperationalError, InterfaceError, ProgrammingError))
