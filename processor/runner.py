"""The run: apply due cancellation requests. Decide per request, write per chunk.

A chunk of due requests is read (keyset pagination on the request id, never the whole
table), each request is decided in Python (what to do, the rendered confirmation email),
then the chunk's results are written in one transaction with a few set-based statements.
If that transaction fails on a row's data, the chunk is written again row by row, each in
its own savepoint, so one bad row fails alone.

Exactly once: inside the write transaction every request is claimed again
(`status = 'pending'`, under the write lock), so a request completed by an overlapping
run or by `requests process` is skipped, never applied twice. A crash loses at most the
chunk in flight, whose transaction never committed; the next run picks it up.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import structlog
from sqlalchemy import Connection, Row, String, case, cast, func, insert, literal, or_, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError, StatementError
from tenacity import RetryCallState

from processor import lease
from processor.config import Settings
from processor.db import Database, retrying_transaction
from processor.due import business_today, days_late, due_clause, effective_date
from processor.delivery import Deliverer, DeliveryReport
from processor.digest import queue_digest, recorded_failures
from processor.emails import SERVICE_CANCELLATION_CONFIRMATION, EmailTemplates
from processor.errors import DatabaseUnavailable, InputError, LeaseHeld, StateError, database_trouble, one_line
from processor.hooks import HookFailed, HookRegistry
from processor.outbox import Composer, QueuedEmail, UnsafeEmail, email_key, queue, request_fields
from processor.params import plain_rows, request_params, request_select, with_params
from processor.models import (
    CLOSED_SERVICE_STATUSES,
    AuditEntry,
    CancellationRequest,
    Client,
    Invoice,
    InvoiceStatus,
    Product,
    RequestStatus,
    Run,
    RunStatus,
    RunTrigger,
    Service,
    ServiceAddon,
    ServiceStatus,
    UTCDateTime,
)
from processor.retry import RetryPolicy

Clock = Callable[[], dt.datetime]
Progress = Callable[[int], None]
RunFields = Callable[[str | None], dict[str, Any]]
DecideAll = Callable[[list[Any]], "list[Outcome]"]

R, S, C, P = CancellationRequest, Service, Client, Product
PER_REQUEST_POINTS = ("PreModuleTerminate", "EmailPreSend", "TerminateAccount", "AfterModuleTerminate",
                      "AfterModuleTerminateFailed", "AddonCancelled", "InvoiceCancelled", "ServiceCancelled")


class RunStopped(Exception):
    """Asked to stop (SIGTERM, SIGINT): raised between chunks, never inside one."""


class Action(StrEnum):
    CANCEL = "cancel"  # cancel the service, its add-ons and unpaid invoices; queue the email
    NOOP = "no-op"  # the service is already Cancelled or Terminated: complete the request only
    ERROR = "error"  # this attempt failed; retried later, or failed after max_attempts
    VETOED = "vetoed"  # a PreModuleTerminate hook said no; retried like an error
    SKIPPED = "skipped"  # no longer pending when we came to write it (done by someone else)


@dataclass(slots=True)
class Outcome:
    """What one request comes to, decided before anything is written."""

    request_id: int
    service_id: int
    action: Action
    days_late: int = 0
    attempts: int = 0  # attempts before this one
    email: QueuedEmail | None = None
    error: str | None = None
    gave_up: bool = False  # an ERROR or VETOED that used the last attempt: the request is now failed
    service_status: str = ""
    params: dict[str, Any] | None = None  # the hooks' params, when any per-request hook is registered
    email_aborted_by: str | None = None  # the EmailPreSend hook that returned abortsend
    addons: Sequence[dict[str, Any]] = ()  # cancelled with it, for AddonCancelled
    invoices: Sequence[dict[str, Any]] = ()  # cancelled with it, for InvoiceCancelled


@dataclass
class RunOptions:
    as_of: dt.date
    trigger: RunTrigger = RunTrigger.MANUAL
    operator: str = ""
    limit: int | None = None
    request_ids: Sequence[int] | None = None  # `requests process`: only these
    ignore_due_date: bool = False  # `requests process --now`: apply before the due date
    digest: bool = True  # send the staff digest (Cron Job Activity) after the run


@dataclass
class Tally:
    """Counts of a run, or of one chunk of it (the run record is updated chunk by chunk)."""

    due: int = 0
    completed: int = 0
    noop: int = 0
    retrying: int = 0
    failed: int = 0
    vetoed: int = 0
    skipped: int = 0
    emails_queued: int = 0
    late: int = 0
    max_days_late: int = 0

    @classmethod
    def of(cls, outcomes: Sequence[Outcome]) -> Tally:
        t = cls(due=len(outcomes))
        for o in outcomes:
            action = o.action
            if action is Action.CANCEL or action is Action.NOOP:
                if action is Action.CANCEL:
                    t.completed += 1
                    t.emails_queued += o.email is not None
                else:
                    t.noop += 1
                if o.days_late > 0:
                    t.late += 1
                    t.max_days_late = max(t.max_days_late, o.days_late)
            elif action is Action.SKIPPED:
                t.skipped += 1
            else:  # ERROR or VETOED: a failed attempt
                t.vetoed += action is Action.VETOED
                t.failed += o.gave_up
                t.retrying += action is Action.ERROR and not o.gave_up
        return t

    def add(self, other: Tally) -> None:
        for f in fields(Tally):
            if f.name != "max_days_late":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.max_days_late = max(self.max_days_late, other.max_days_late)


@dataclass
class RunSummary(Tally):
    run_id: int | None = None
    as_of: dt.date | None = None
    status: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)
    emails_sent: int = 0  # delivered at the end of the run (this run's and older queued ones)
    emails_retrying: int = 0  # not sent at the end of the run; queued for a later attempt
    emails_failed: int = 0  # given up at the end of the run (named in the digest)
    emails_still_queued: int = 0  # in the outbox after the run's delivery
    delivery_error: str | None = None  # why delivery stopped early (the emails stay queued)
    failed_emails: list[dict[str, Any]] = field(default_factory=list)  # given up at the end of the run
    digest_suppressed: bool = False  # a DailyCronJobPreEmail hook asked for no staff digest
    digest_queued: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain data (for --json and the hooks)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["failures"] = [dict(f) for f in self.failures]
        data["failed_emails"] = [dict(e) for e in self.failed_emails]
        return data

    @property
    def exit_code(self) -> int:
        """0 all done; 1 some requests failed or were vetoed (they stay pending, or failed for
        good), or some emails could not be delivered, or the run was stopped before the end."""
        return 1 if (self.status == RunStatus.STOPPED or self.retrying or self.failed or self.vetoed or self.emails_retrying or self.emails_failed
                     or self.delivery_error) else 0

    def count_delivery(self, report: DeliveryReport) -> None:
        self.emails_sent += report.sent
        self.emails_retrying += report.retrying
        self.emails_failed += report.failed
        self.emails_still_queued = report.queued
        self.failed_emails.extend(report.failed_emails)
        self.delivery_error = self.delivery_error or report.stopped

    def record(self, outcomes: Sequence[Outcome], tally: Tally) -> None:
        """Count a committed chunk (its `Tally.of(outcomes)`) and keep its failures."""
        self.add(tally)
        self.failures.extend(
            {"request_id": o.request_id, "service_id": o.service_id, "error": o.error, "gave_up": o.gave_up,
             "vetoed": o.action is Action.VETOED}
            for o in outcomes if o.action in (Action.ERROR, Action.VETOED)
        )


class _Audit:
    """Audit rows of one chunk: the run, actor and time are bound once, not per row."""

    ACTOR = "cancelproc"

    def __init__(self, conn: Connection, run_id: int, now: dt.datetime) -> None:
        self.conn = conn
        self.constants = dict(at=now, actor=self.ACTOR, run_id=run_id)

    def rows(self, rows: list[tuple[int, str, int, str, str]]) -> None:
        """(request_id, entity, entity_id, action, detail) tuples."""
        if rows:
            self.conn.execute(insert(AuditEntry).values(**self.constants), [
                dict(request_id=r, entity=e, entity_id=i, action=a, detail=d) for r, e, i, a, d in rows])

    def select(self, entity: str, query: Any) -> None:
        """Audit rows from a query selecting (request_id, entity_id, action, detail)."""
        q = query.add_columns(literal(self.constants["at"], UTCDateTime()), literal(self.ACTOR),
                              literal(self.constants["run_id"]), literal(entity))
        self.conn.execute(insert(AuditEntry).from_select(
            ["request_id", "entity_id", "action", "detail", "at", "actor", "run_id", "entity"], q))


class Runner:
    """One run over the due requests. Everything it needs is passed in (no globals)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        clock: Clock,
        templates: EmailTemplates | None = None,
        hooks: HookRegistry | None = None,
        deliverer: Deliverer | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.db = db
        self.hooks = hooks or HookRegistry()
        # Building a request's hook params costs time; only when some hook will read them.
        self._hooked = any(self.hooks.has(p) for p in PER_REQUEST_POINTS)
        self.settings = settings
        self.clock = clock
        self.templates = templates or EmailTemplates(
            settings.path(settings.email.templates_dir) if settings.email.templates_dir else None
        )
        self.composer = Composer(self.templates, self.hooks, settings.email)
        self.deliverer = deliverer  # None: emails stay queued for `emails send`
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)  # checked between chunks
        self.retry = RetryPolicy(settings.max_attempts, settings.retry_backoff_minutes, settings.retry_backoff_max_minutes)
        self.log = structlog.get_logger("cancelproc.run")

    # --- reading -------------------------------------------------------------------------

    def _due_query(self, options: RunOptions, now: dt.datetime, after_id: int = 0) -> Any:
        """Due requests after `after_id`, in id order (the caller sets the limit)."""
        stmt = (
            request_select(for_hooks=self._hooked)
            .where(R.status == RequestStatus.PENDING, R.id > after_id)
            .order_by(R.id)
        )
        if options.request_ids is not None:
            stmt = stmt.where(R.id.in_(options.request_ids))
        else:
            # Backoff: a request that failed recently waits for its next attempt time.
            stmt = stmt.where(or_(R.next_attempt_at.is_(None), R.next_attempt_at <= now))
        if not options.ignore_due_date:
            stmt = stmt.where(due_clause(options.as_of, self.settings.zone))
        return stmt

    def _chunks(self, options: RunOptions, now: dt.datetime) -> Iterator[list[Row[Any]]]:
        """Due requests, a chunk at a time, in id order; each read is its own short transaction."""
        after_id, remaining = 0, options.limit
        while remaining is None or remaining > 0:
            size = self.settings.chunk_size if remaining is None else min(self.settings.chunk_size, remaining)
            with self.db.read_engine.connect() as conn:
                rows = plain_rows(conn.execute(self._due_query(options, now, after_id).limit(size)), self._hooked)
            if not rows:
                return
            yield rows
            after_id = rows[-1].id
            if remaining is not None:
                remaining -= len(rows)

    def orphans(self, options: RunOptions, limit: int | None = None) -> list[Outcome]:
        """Pending requests whose service, or that service's client or product, is gone:
        deleted outside cancelproc with the foreign keys off. They never join to the due
        query, so without this they would wait, unseen, for ever. Each comes out as a
        failure that gives up at once: nothing can be cancelled for it, and staff must look."""
        query = (select(R.id, R.service_id, R.attempts, S.id, S.client_id, C.id, S.product_id, P.id)
                 .select_from(R).outerjoin(S, S.id == R.service_id).outerjoin(C, C.id == S.client_id)
                 .outerjoin(P, P.id == S.product_id)
                 .where(R.status == RequestStatus.PENDING, or_(S.id.is_(None), C.id.is_(None), P.id.is_(None)))
                 .order_by(R.id).limit(limit))
        if options.request_ids is not None:
            query = query.where(R.id.in_(options.request_ids))
        with self.db.read_engine.connect() as conn:
            rows = conn.execute(query).all()
        outcomes = []
        for request_id, service_id, attempts, found_service, client_id, found_client, product_id, _ in rows:
            missing = (f"service #{service_id}" if found_service is None
                       else f"client #{client_id} of service #{service_id}" if found_client is None
                       else f"product #{product_id} of service #{service_id}")
            outcomes.append(Outcome(request_id, service_id, Action.ERROR, attempts=attempts, gave_up=True,
                                    error=f"{missing} no longer exists (deleted outside cancelproc); "
                                          "nothing was cancelled"))
        return outcomes

    def fail_orphans(self, options: RunOptions, run_id: int, summary: RunSummary) -> None:
        """Record each orphan (see `orphans`) as failed in this run: the digest, the exit
        code and `status` then show it. Done once, by the process that owns the run, after
        the chunks."""
        limit = None if options.limit is None else options.limit - summary.due
        if limit is not None and limit <= 0:
            return
        orphans = self.orphans(options, limit)
        if not orphans:
            return
        now = self.clock()
        with self.db.engine.begin() as conn:
            audit = _Audit(conn, run_id, now)
            failed = []
            for o in orphans:
                if conn.execute(update(R).where(R.id == o.request_id, R.status == RequestStatus.PENDING).values(
                        status=RequestStatus.FAILED, attempts=R.attempts + 1, last_error=o.error, run_id=run_id,
                        next_attempt_at=None)).rowcount:
                    audit.rows([(o.request_id, "request", o.request_id, "failed",
                                 f"{o.error}: manual cancellation required")])
                    failed.append(o)
            if not failed:
                return
            tally = self._close_chunk(conn, run_id, failed, now)
        summary.record(failed, tally)
        self._log_chunk(failed, tally)

    def count_due(self, options: RunOptions) -> int:
        query = self._due_query(options, self.clock()).with_only_columns(R.id).order_by(None)
        with self.db.read_engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        return total if options.limit is None else min(total, options.limit)

    # --- deciding --------------------------------------------------------------------------

    def run_fields(self, as_of: dt.date) -> Callable[[str | None], dict[str, Any]]:
        """Merge fields that are the same for every confirmation of a run in one language."""
        by_language: dict[str | None, dict[str, Any]] = {}

        def fields(language: str | None) -> dict[str, Any]:
            if language not in by_language:
                by_language[language] = self.composer.common_fields(
                    as_of, language, cancellation_date=as_of, service_status=ServiceStatus.CANCELLED.value)
            return by_language[language]
        return fields

    def merge_fields(self, row: Row[Any], run_fields: Callable[[str | None], dict[str, Any]]) -> dict[str, Any]:
        """The WHMCS merge fields of the confirmation email (the service is now Cancelled)."""
        return request_fields(row, run_fields(row.language))

    def decide(self, row: Row[Any], as_of: dt.date, run_fields: Callable[[str | None], dict[str, Any]],
               run_id: int | None = None, dry_run: bool = False) -> Outcome:
        """What to do with one due request: everything but the database write. Never raises.

        Order matters: every step that can fail (vetoes, bad data, rendering) comes before
        TerminateAccount, the one step with an effect outside, so a failure after it is rare.
        """
        params = None
        try:
            # Lateness counts from the due date, but never from before the request was made.
            late = days_late(row.type, row.next_due_date, row.cancel_on,
                             business_today(row.created_at, self.settings.zone), as_of)
            if row.service_status in CLOSED_SERVICE_STATUSES:
                return Outcome(row.id, row.service_id, Action.NOOP, late, row.attempts,
                               service_status=row.service_status.value)
            params = request_params(row, run_id=run_id, as_of=as_of, dry_run=dry_run) if self._hooked else None
            veto = self._pre_terminate(params) if params is not None else None
            if veto is not None:
                return Outcome(row.id, row.service_id, Action.VETOED, late, row.attempts, error=veto, params=params)
            try:
                composed = self.composer.compose(
                    SERVICE_CANCELLATION_CONFIRMATION,
                    key=email_key(SERVICE_CANCELLATION_CONFIRMATION, "request", row.id), to_address=row.email,
                    fields=self.merge_fields(row, run_fields), language=row.language, request_id=row.id,
                    run_id=run_id, dry_run=dry_run)
            except UnsafeEmail as exc:
                if exc.header != "recipient":
                    raise
                raise InputError(f"client of service {row.service_id} has no valid email address ({row.email!r})") \
                    from None
            email, aborted_by = composed.email, composed.aborted_by
            if params is not None and not dry_run:
                self._terminate(params)
            return Outcome(row.id, row.service_id, Action.CANCEL, late, row.attempts, email,
                           service_status=row.service_status.value, params=params, email_aborted_by=aborted_by)
        except Exception as exc:  # one bad request never stops the others
            message = str(exc) if isinstance(exc, HookFailed) else one_line(exc)
            return Outcome(row.id, row.service_id, Action.ERROR, attempts=row.attempts, error=message, params=params)

    def _pre_terminate(self, params: dict[str, Any]) -> str | None:
        """PreModuleTerminate hooks in order: a veto stops them; other dicts merge into params."""
        for impl in self.hooks.of("PreModuleTerminate"):
            result = self.hooks.call_one(impl, params)
            if isinstance(result, dict):
                if result.get("abortcmd"):
                    return f"vetoed by {impl.label}: {result.get('reason') or 'no reason given'}"
                params.update((k, v) for k, v in result.items() if k not in ("abortcmd", "reason", "params"))
        return None

    def _terminate(self, params: dict[str, Any]) -> None:
        """TerminateAccount hooks: the external deprovisioning. Raising or {'error': ...} fails it."""
        for impl in self.hooks.of("TerminateAccount"):
            result = self.hooks.call_one(impl, params)
            if isinstance(result, dict) and result.get("error"):
                raise HookFailed(impl, f"returned error: {result['error']}")

    def preview(self, options: RunOptions) -> Iterator[dict[str, Any]]:
        """--dry-run: what the run would do to each due request. Reads only; no lease."""
        self.check_ready()
        now = self.clock()
        fields = self.run_fields(options.as_of)
        shown = 0
        for rows in self._chunks(options, now):
            shown += len(rows)
            service_ids = [row.service_id for row in rows]
            with self.db.read_engine.connect() as conn:
                addons = conn.execute(select(ServiceAddon.service_id, ServiceAddon.name).where(
                    self.db.in_ids(ServiceAddon.service_id, service_ids), ServiceAddon.status.not_in(CLOSED_SERVICE_STATUSES))).all()
                invoices = conn.execute(select(Invoice.service_id, Invoice.id, Invoice.amount).where(
                    self.db.in_ids(Invoice.service_id, service_ids), Invoice.status == InvoiceStatus.UNPAID)).all() \
                    if self.settings.cancel_unpaid_invoices else []
            addons_of: dict[int, list[str]] = {}
            for a in addons:
                addons_of.setdefault(a.service_id, []).append(a.name)
            invoices_of: dict[int, list[str]] = {}
            for i in invoices:
                invoices_of.setdefault(i.service_id, []).append(f"#{i.id} {i.amount}")
            for row in rows:
                o = self.decide(row, options.as_of, fields, dry_run=True)
                created_on = business_today(row.created_at, self.settings.zone)
                cancel = o.action is Action.CANCEL
                yield {
                    "request_id": row.id, "service_id": row.service_id,
                    "client": f"{row.first_name} {row.last_name}".strip(), "product": row.product_name,
                    "domain": row.domain, "type": str(row.type),
                    "due_on": effective_date(row.type, row.next_due_date, row.cancel_on, created_on),
                    "days_late": o.days_late, "action": str(o.action),
                    "addons": ", ".join(addons_of.get(row.service_id, [])) if cancel else "",
                    "unpaid_invoices": ", ".join(invoices_of.get(row.service_id, [])) if cancel else "",
                    "email_to": o.email.to_address if o.email else "",
                    "detail": o.error or (o.email.subject if o.email else
                                          f"email aborted by {o.email_aborted_by}" if o.email_aborted_by else
                                          f"service already {row.service_status.value}"),
                }
        limit = None if options.limit is None else options.limit - shown
        for o in self.orphans(options, limit) if limit is None or limit > 0 else ():
            yield {"request_id": o.request_id, "service_id": o.service_id, "client": "", "product": "",
                   "domain": "", "type": "", "due_on": None, "days_late": 0, "action": str(Action.ERROR),
                   "addons": "", "unpaid_invoices": "", "email_to": "", "detail": o.error}

    # --- writing ---------------------------------------------------------------------------

    def _write(self, conn: Connection, outcomes: list[Outcome], run_id: int, as_of: dt.date, now: dt.datetime) -> None:
        """Write one chunk's outcomes with set-based statements. The caller owns the transaction."""
        ids = [o.request_id for o in outcomes if o.action is not Action.SKIPPED]
        if not ids:
            return
        # Claim again under the write lock: only requests still pending are ours to write.
        still_pending = set(
            conn.scalars(select(R.id).where(self.db.in_ids(R.id, ids), R.status == RequestStatus.PENDING)
                         .with_for_update())
        )
        for o in outcomes:
            if o.request_id not in still_pending:
                o.action = Action.SKIPPED
        cancels = [o for o in outcomes if o.action is Action.CANCEL]
        noops = [o for o in outcomes if o.action is Action.NOOP]
        failures = [o for o in outcomes if o.action in (Action.ERROR, Action.VETOED)]
        audit = _Audit(conn, run_id, now)
        if cancels:
            self._cancel_services(conn, audit, cancels, as_of)
            queue(conn, [o.email for o in cancels if o.email], run_id=run_id, now=now,
                  from_address=self.settings.email.from_address)
        self._complete_requests(conn, cancels + noops, run_id, now)
        audit.rows([(o.request_id, "request", o.request_id, "completed",
                     f"no-op: service already {o.service_status}; request completed without changes")
                    for o in noops])
        audit.rows([(o.request_id, "email", o.request_id, "aborted",
                     f"{SERVICE_CANCELLATION_CONFIRMATION} not queued: abortsend from {o.email_aborted_by}")
                    for o in cancels if o.email_aborted_by])
        for o in failures:
            self._record_failure(conn, audit, o, run_id, now)

    def _cancel_services(self, conn: Connection, audit: _Audit, cancels: list[Outcome], as_of: dt.date) -> None:
        """Cancel the services of these requests, their add-ons and unpaid invoices; audit each.

        Each audit INSERT ... SELECT runs before its UPDATE, so it sees (and can name) what
        the row was. Rows come back into Python (RETURNING) only for hooks that want them.
        """
        chunk = self.db.in_ids(R.id, [o.request_id for o in cancels])
        open_addon = ServiceAddon.status.not_in(CLOSED_SERVICE_STATUSES)
        audit.select("service", select(R.id, S.id, literal("cancelled"),
                                       literal("was ") + S.status + literal(f"; termination date {as_of}"))
                     .join(S, S.id == R.service_id).where(chunk))
        audit.select("addon", select(R.id, ServiceAddon.id, literal("cancelled"), literal(""))
                     .join(ServiceAddon, ServiceAddon.service_id == R.service_id).where(chunk, open_addon))
        if self.settings.cancel_unpaid_invoices:
            audit.select("invoice", select(R.id, Invoice.id, literal("cancelled"),
                                           literal("unpaid amount ") + cast(Invoice.amount, String))
                         .join(Invoice, Invoice.service_id == R.service_id)
                         .where(chunk, Invoice.status == InvoiceStatus.UNPAID))
        services = select(R.service_id).where(chunk).scalar_subquery()
        conn.execute(update(S).where(S.id.in_(services), S.status.not_in(CLOSED_SERVICE_STATUSES))
                     .values(status=ServiceStatus.CANCELLED, termination_date=as_of))
        A, I = ServiceAddon, Invoice
        addons = self._update(conn, update(A).where(A.service_id.in_(services), open_addon)
                              .values(status=ServiceStatus.CANCELLED),
                              (A.id, A.service_id, A.external_id, A.name, A.amount), "AddonCancelled")
        invoices = self._update(conn, update(I).where(I.service_id.in_(services), I.status == InvoiceStatus.UNPAID)
                                .values(status=InvoiceStatus.CANCELLED),
                                (I.id, I.service_id, I.external_id, I.amount, I.due_date), "InvoiceCancelled") \
            if self.settings.cancel_unpaid_invoices else {}
        for o in cancels:
            o.addons, o.invoices = addons.get(o.service_id, ()), invoices.get(o.service_id, ())

    def _update(self, conn: Connection, stmt: Any, columns: tuple[Any, ...], point: str) -> dict[int, list[dict[str, Any]]]:
        """Run an UPDATE; if hooks on `point` will want the rows, return them by service id."""
        if not self.hooks.has(point):
            conn.execute(stmt)
            return {}
        by_service: dict[int, list[dict[str, Any]]] = {}
        for row in conn.execute(stmt.returning(*columns)).mappings():
            fields = dict(row)
            by_service.setdefault(fields.pop("service_id"), []).append(fields)
        return by_service

    def _complete_requests(self, conn: Connection, done: list[Outcome], run_id: int, now: dt.datetime) -> None:
        """Mark requests completed, each with its lateness, in one statement."""
        if not done:
            return
        late = self.db.id_values([(o.request_id, o.days_late) for o in done])
        conn.execute(
            update(R).where(R.id == late.c.id).values(
                status=RequestStatus.COMPLETED, processed_at=now, run_id=run_id, days_late=late.c.value,
                attempts=R.attempts + 1, last_error=None, next_attempt_at=None,
            )
        )

    def _record_failure(self, conn: Connection, audit: _Audit, o: Outcome, run_id: int, now: dt.datetime) -> None:
        """One more failed (or vetoed) attempt: retry later with backoff, or give up (manual
        cancellation required)."""
        decision = self.retry.after_failure(o.attempts + 1, now)
        o.gave_up = decision.give_up
        conn.execute(
            update(R).where(R.id == o.request_id).values(
                attempts=R.attempts + 1, last_error=o.error, run_id=run_id, next_attempt_at=decision.next_attempt_at,
                status=RequestStatus.FAILED if decision.give_up else RequestStatus.PENDING,
            )
        )
        action = "vetoed" if o.action is Action.VETOED else "attempt_failed"
        if decision.give_up:
            audit.rows([(o.request_id, "request", o.request_id, "failed",
                         f"{o.error}; gave up after {o.attempts + 1} attempts: manual cancellation required")])
        else:
            audit.rows([(o.request_id, "request", o.request_id, action,
                         f"{o.error}; next attempt after {decision.next_attempt_at:%Y-%m-%d %H:%M} UTC")])

    def _write_chunk(self, outcomes: list[Outcome], run_id: int, as_of: dt.date, now: dt.datetime,
                     summary: RunSummary) -> Tally:
        """Write a chunk in one transaction (see `_write_isolating`) and count it."""
        with self.db.engine.begin() as conn:
            self._write_isolating(conn, outcomes, run_id, as_of, now)
            tally = self._close_chunk(conn, run_id, outcomes, now)
        summary.record(outcomes, tally)
        return tally

    def _write_isolating(self, conn: Connection, outcomes: list[Outcome], run_id: int, as_of: dt.date,
                         now: dt.datetime) -> None:
        """The chunk's set-based write in a savepoint; if a row's data breaks it, the rows
        again one by one, each in its own savepoint, so that row fails alone."""
        try:
            with conn.begin_nested():
                self._write(conn, outcomes, run_id, as_of, now)
        except (DBAPIError, StatementError) as exc:
            if not _is_row_error(exc):
                raise
            self.log.warning("chunk write failed; isolating rows", error=one_line(exc), requests=len(outcomes))
            self._write_rows_alone(conn, outcomes, run_id, as_of, now)

    def _write_rows_alone(self, conn: Connection, outcomes: list[Outcome], run_id: int, as_of: dt.date,
                          now: dt.datetime) -> None:
        """Each outcome in its own savepoint: a row the database refuses fails alone."""
        for o in outcomes:
            try:
                with conn.begin_nested():
                    self._write(conn, [o], run_id, as_of, now)
            except (DBAPIError, StatementError) as exc:
                if not _is_row_error(exc):
                    raise
                o.action, o.email, o.error = Action.ERROR, None, one_line(exc)
                with conn.begin_nested():
                    self._write(conn, [o], run_id, as_of, now)

    def _claim_and_apply(self, options: RunOptions, run_id: int, size: int, summary: RunSummary,
                         decide_all: DecideAll, *, wait: bool = False) -> tuple[list[Outcome], Tally] | None:
        """PostgreSQL: claim a chunk (FOR UPDATE SKIP LOCKED), decide and write it in one
        transaction. Another process working on the same run skips the rows this one holds;
        if this process dies, its transaction rolls back and the rows are claimable again.
        With `wait`, wait for rows other processes hold instead of skipping them.

        A chunk that loses a deadlock (to an import, say) is rolled back whole and done
        again: claimed, decided (its hooks called again, as after a crash: they get the
        request's idempotency_key) and written."""
        for attempt in retrying_transaction(self._rolled_back):
            with attempt, self.db.engine.begin() as conn:
                claim = (self._due_query(options, self.clock())
                         .where(or_(R.run_id.is_(None), R.run_id != run_id))  # not tried by this run yet
                         .limit(size).with_for_update(skip_locked=not wait, of=R))
                rows = plain_rows(conn.execute(claim), self._hooked)
                if not rows:
                    return None
                outcomes = decide_all(rows)
                now = self.clock()
                self._write_isolating(conn, outcomes, run_id, options.as_of, now)
                tally = self._close_chunk(conn, run_id, outcomes, now)
        summary.record(outcomes, tally)
        return outcomes, tally

    def _rolled_back(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.log.warning("chunk rolled back by the database; doing it again", error=one_line(exc) if exc else "",
                         attempt=state.attempt_number)

    def _close_chunk(self, conn: Connection, run_id: int, outcomes: list[Outcome], now: dt.datetime) -> Tally:
        """Count the chunk into the run record and renew the lease, in the chunk's transaction.
        The caller counts it into the summary once the transaction has committed."""
        t = Tally.of(outcomes)
        conn.execute(
            update(Run).where(Run.id == run_id).values(
                due=Run.due + t.due, completed=Run.completed + t.completed, noop=Run.noop + t.noop,
                retrying=Run.retrying + t.retrying, failed=Run.failed + t.failed, vetoed=Run.vetoed + t.vetoed,
                emails_queued=Run.emails_queued + t.emails_queued, late=Run.late + t.late,
                max_days_late=case((Run.max_days_late > t.max_days_late, Run.max_days_late), else_=t.max_days_late),
            )
        )
        # From now, not from when the chunk was read: hooks may have taken most of the lease.
        lease.renew(conn, run_id, now=self.clock(), seconds=self.settings.lease_seconds)
        return t

    # --- the run ---------------------------------------------------------------------------

    def check_ready(self) -> None:
        """Fail before anything is touched: every email template must parse and render."""
        self.templates.check_all(self.settings.email.company_name, self.settings.email.signature)

    def start(self, options: RunOptions) -> int:
        """Check the templates, take the lease (creating the run record), fire PreCronJob.
        Raises LeaseHeld."""
        self.check_ready()
        with self.db.session.begin() as session:
            run = lease.acquire(session, clock=self.clock, seconds=self.settings.lease_seconds,
                                trigger=options.trigger, operator=options.operator, as_of=options.as_of,
                                me=lease.Holder.this_process())
            run_id = run.id
        self.log.info("run started", run_id=run_id, as_of=str(options.as_of), trigger=str(options.trigger),
                      operator=options.operator)
        self.hooks.notify("PreCronJob", with_params({}, run_id=run_id, as_of=options.as_of,
                                                    trigger=options.trigger.value, operator=options.operator))
        return run_id

    def run(self, options: RunOptions) -> RunSummary:
        """Take the lease, apply every due request, record the run. Raises LeaseHeld."""
        run_id = self.start(options)
        def work(summary: RunSummary) -> None:
            self.work(run_id, options, summary)
            self.fail_orphans(options, run_id, summary)

        return self.complete(run_id, options, work)

    def work(self, run_id: int, options: RunOptions, summary: RunSummary) -> None:
        """Apply due requests of this run, chunk by chunk (on PostgreSQL, the share this
        process claims while others may work on the same run)."""
        fields = self.run_fields(options.as_of)
        threads = self.settings.hook_concurrency if self._hooked else 1
        with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
            decider = _Decider(lambda row: self.decide(row, options.as_of, fields, run_id), pool, threads)
            chunks = (self._claimed(options, run_id, summary, decider.decide_all) if self.db.is_postgresql
                      else self._keyset(options, run_id, summary, decider.decide_all))
            for outcomes, tally in chunks:
                self._log_chunk(outcomes, tally)
                self._after_commit(outcomes)
                if self.progress:
                    self.progress(len(outcomes))
                if self.should_stop():
                    raise RunStopped(f"stopped on request after {summary.due} requests; the next run does the rest")

    def _keyset(self, options: RunOptions, run_id: int, summary: RunSummary,
                decide_all: DecideAll) -> Iterator[tuple[list[Outcome], Tally]]:
        """SQLite: read a chunk, decide it, write it (the write claims each request again)."""
        for rows in self._chunks(options, self.clock()):
            outcomes = decide_all(rows)
            yield outcomes, self._write_chunk(outcomes, run_id, options.as_of, self.clock(), summary)

    def _claimed(self, options: RunOptions, run_id: int, summary: RunSummary,
                 decide_all: DecideAll) -> Iterator[tuple[list[Outcome], Tally]]:
        """PostgreSQL: claim, decide and write chunk after chunk until nothing is left."""
        remaining = options.limit
        while remaining is None or remaining > 0:
            size = self.settings.chunk_size if remaining is None else min(self.settings.chunk_size, remaining)
            chunk = self._claim_and_apply(options, run_id, size, summary, decide_all)
            if chunk is None:
                # Nothing free: wait for chunks other processes still hold. What they commit is
                # no longer due; what a dead one held is free again, and taken here.
                chunk = self._claim_and_apply(options, run_id, size, summary, decide_all, wait=True)
            if chunk is None:
                return
            yield chunk
            if remaining is not None:
                remaining -= len(chunk[0])

    def join(self) -> RunSummary:
        """Work on the run in progress (a worker of `run --workers`, or another host):
        PostgreSQL only. The run's own process closes it. Raises StateError if none runs."""
        if not self.db.is_postgresql:
            raise StateError("only a run on PostgreSQL can be joined (SQLite runs one writer at a time)")
        self.check_ready()
        with self.db.read_session() as session:
            run = session.execute(select(Run).join(lease.Lease, lease.Lease.run_id == Run.id)
                                  .where(lease.Lease.name == lease.LEASE_NAME, Run.status == RunStatus.RUNNING)
                                  ).scalar_one_or_none()
            if run is None:
                raise StateError("no run in progress to join")
            options = RunOptions(as_of=run.as_of, trigger=run.trigger, operator=run.operator)
            run_id = run.id
        summary = RunSummary(run_id=run_id, as_of=options.as_of, status=RunStatus.RUNNING)
        with structlog.contextvars.bound_contextvars(run_id=run_id, worker=os.getpid()):
            self.log.info("joined the run")
            self.work(run_id, options, summary)
            self.log.info("worker done", due=summary.due, completed=summary.completed, retrying=summary.retrying,
                          failed=summary.failed, vetoed=summary.vetoed)
        return summary

    def reload_counts(self, run_id: int, summary: RunSummary) -> None:
        """The run's counts and failures as recorded (by every process that worked on it)."""
        with self.db.read_session() as session:
            run = session.get(Run, run_id)
            assert run is not None
            for name in Run.CHUNK_COUNTS:
                setattr(summary, name, getattr(run, name))
            summary.failures = recorded_failures(session, run_id)

    def renew_lease(self, run_id: int) -> None:
        with self.db.engine.begin() as conn:
            lease.renew(conn, run_id, now=self.clock(), seconds=self.settings.lease_seconds)

    def complete(self, run_id: int, options: RunOptions, work: Callable[[RunSummary], None]) -> RunSummary:
        """Do the run's work, deliver the outbox, close the run record, fire AfterCronJob,
        send the digest. Closes the record (as error) whatever happens."""
        summary = RunSummary(run_id=run_id, as_of=options.as_of, status=RunStatus.RUNNING)
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            try:
                work(summary)
                if self.deliverer is not None:
                    self._deliver(summary)
            except RunStopped as exc:
                # A clean stop between chunks: what is committed stays, the rest waits for the next run.
                summary.status = RunStatus.STOPPED
                self._finish(run_id, RunStatus.STOPPED, error=str(exc), summary=summary)
                self.log.warning("run stopped", reason=str(exc), due=summary.due, completed=summary.completed)
                self.hooks.notify("AfterCronJob", with_params({}, run_id=run_id, summary=summary.as_dict()))
                return summary
            except BaseException as exc:
                self._finish(run_id, RunStatus.ERROR, error=one_line(exc))
                self.log.error("run stopped", error=one_line(exc))
                if isinstance(exc, Exception):  # not on Ctrl-C: an alerting hook wants to hear of this
                    summary.status = RunStatus.ERROR
                    self.hooks.notify("AfterCronJob", with_params({}, run_id=run_id, summary=summary.as_dict()))
                if isinstance(exc, OperationalError):
                    raise DatabaseUnavailable(f"run {run_id} stopped: {database_trouble(exc)}") from exc
                raise
            summary.status = RunStatus.COMPLETED_WITH_FAILURES if summary.exit_code else RunStatus.COMPLETED
            self._finish(run_id, summary.status, summary=summary)
            self.log.info("run finished", status=str(summary.status), due=summary.due, completed=summary.completed,
                          noop=summary.noop, retrying=summary.retrying, failed=summary.failed,
                          vetoed=summary.vetoed, emails_queued=summary.emails_queued,
                          emails_sent=summary.emails_sent, emails_failed=summary.emails_failed, late=summary.late,
                          max_days_late=summary.max_days_late)
            self.hooks.notify("AfterCronJob", with_params({}, run_id=run_id, summary=summary.as_dict()))
            suppress = self.hooks.notify("DailyCronJobPreEmail",
                                         with_params({}, run_id=run_id, summary=summary.as_dict()))
            summary.digest_suppressed = any(suppress)
            if options.digest and not summary.digest_suppressed and self.settings.email.staff_address:
                self._digest(run_id, summary)
        return summary

    def _deliver(self, summary: RunSummary) -> None:
        """Send the outbox (this run's emails and any older ones due a retry)."""
        assert self.deliverer is not None
        try:
            summary.count_delivery(self.deliverer.deliver())
        except LeaseHeld as exc:
            # Another `emails send` is at work: it sends these too.
            self.log.info("emails left to the sender already at work", detail=str(exc))
        except lease.LeaseLost as exc:
            # Delivery stalled past its lease and another sender took over: the run itself is done.
            summary.delivery_error = str(exc)
            self.log.error("email delivery stopped", error=str(exc))

    def _digest(self, run_id: int, summary: RunSummary) -> None:
        """Queue the staff digest and send it. A failure here is logged: the run is done."""
        try:
            with self.db.engine.begin() as conn:
                summary.digest_queued = queue_digest(conn, self.composer, run_id=run_id, summary=summary.as_dict(),
                                                     now=self.clock(), settings=self.settings)
        except Exception as exc:  # a digest hook or template failure must not turn a done run into an error
            self.log.error("staff digest not queued", error=one_line(exc))
            return
        if self.deliverer is not None and summary.digest_queued and not summary.delivery_error:
            try:
                self._deliver(summary)
            except Exception as exc:  # it stays queued for the next delivery
                summary.delivery_error = one_line(exc)
                self.log.error("staff digest not sent", error=summary.delivery_error)

    def _after_commit(self, outcomes: list[Outcome]) -> None:
        """Hooks on what was just committed (or failed). Their exceptions are logged, never undo."""
        if not self._hooked:
            return
        for o in outcomes:
            if o.params is None:
                continue
            if o.action is Action.CANCEL:
                # The params were read before the write; the hooks after it see what was committed
                # (new dicts: a hook before the write may have kept the old ones).
                params = {**o.params,
                          "service": {**o.params["service"], "status": ServiceStatus.CANCELLED.value},
                          "request": {**o.params["request"], "status": RequestStatus.COMPLETED.value}}
                self.hooks.notify("AfterModuleTerminate", params)
                for addon in o.addons:
                    self.hooks.notify("AddonCancelled", with_params(params, addon_id=addon["id"], addon=addon))
                for invoice in o.invoices:
                    self.hooks.notify("InvoiceCancelled", with_params(params, invoice_id=invoice["id"], invoice=invoice))
                self.hooks.notify("ServiceCancelled", with_params(params, days_late=o.days_late))
            elif o.action is Action.ERROR:
                self.hooks.notify("AfterModuleTerminateFailed", with_params(o.params, error=o.error))

    def _log_chunk(self, outcomes: list[Outcome], tally: Tally) -> None:
        """A line per chunk, and one per request that did not go through. Completed requests
        get no line of their own: the audit log has them, and a line each cost 3% of a run."""
        for o in outcomes if tally.retrying or tally.failed or tally.vetoed or tally.skipped else ():
            if o.action in (Action.ERROR, Action.VETOED):
                self.log.warning("request failed: manual cancellation required" if o.gave_up
                                 else "request vetoed; will retry" if o.action is Action.VETOED
                                 else "request attempt failed; will retry", request_id=o.request_id,
                                 service_id=o.service_id, error=o.error, attempts=o.attempts + 1)
            elif o.action is Action.SKIPPED:
                self.log.info("request skipped: no longer pending", request_id=o.request_id,
                              service_id=o.service_id)
        self.log.info("chunk written", first_request_id=outcomes[0].request_id,
                      last_request_id=outcomes[-1].request_id, **{k: v for k, v in vars(tally).items() if v})

    def _finish(self, run_id: int, status: RunStatus, error: str | None = None,
                summary: RunSummary | None = None) -> None:
        delivered = dict(emails_sent=summary.emails_sent, emails_failed=summary.emails_failed) if summary else {}
        if error is None and summary is not None and summary.delivery_error:  # `runs show` and `status` name it
            error = f"email delivery stopped: {summary.delivery_error}"
        try:
            with self.db.session.begin() as session:
                session.execute(update(Run).where(Run.id == run_id, Run.status == RunStatus.RUNNING)
                                .values(status=status, finished_at=self.clock(), error=error, **delivered))
                lease.release(session, run_id)
        except OperationalError as exc:
            # The database is gone; the lease will expire by itself.
            self.log.error("could not close the run record", error=one_line(exc))


class _Decider:
    """Decides a chunk's requests: one after another while the hooks are quick, in threads
    once they wait (network calls), so slow hooks of different requests wait side by side.

    Threads cost quick hooks a fifth of their speed (GIL hand-offs), so the first few
    requests of each chunk are timed first; threads are used from the first chunk whose
    requests take SLOW_SECONDS or more each, and from then on.
    """

    PROBE = 4
    SLOW_SECONDS = 0.002

    def __init__(self, decide: Callable[[Any], Outcome], pool: ThreadPoolExecutor | None, threads: int) -> None:
        self.decide = decide
        self.pool = pool
        self.threads = threads
        self.threaded = False

    def decide_all(self, rows: list[Any]) -> list[Outcome]:
        if self.pool is None:
            return [self.decide(row) for row in rows]
        if self.threaded:
            return self._in_threads(rows)
        started = time.perf_counter()
        head = [self.decide(row) for row in rows[:self.PROBE]]
        self.threaded = (time.perf_counter() - started) / max(len(head), 1) >= self.SLOW_SECONDS
        rest = rows[self.PROBE:]
        return head + (self._in_threads(rest) if self.threaded else [self.decide(row) for row in rest])

    def _in_threads(self, rows: list[Any]) -> list[Outcome]:
        """A share of the rows per thread (interleaved, so slow ones spread evenly), each
        decided in a copy of this thread's context (the log's run_id)."""
        assert self.pool is not None
        context = contextvars.copy_context()
        shares = [rows[i::self.threads] for i in range(self.threads)]
        done = self.pool.map(lambda share: context.copy().run(lambda: [self.decide(row) for row in share]), shares)
        outcomes: list[Any] = [None] * len(rows)
        for i, share_outcomes in enumerate(done):
            outcomes[i::self.threads] = share_outcomes
        return outcomes


def _is_row_error(exc: BaseException) -> bool:
    """A failure caused by one row's data (isolate it), not by the database being unusable
    or by a statement that is wrong for every row (a bug)."""
    return not isinstance(exc, (OperationalError, InterfaceError, ProgrammingError))
