"""The run's lifecycle: start, work chunk by chunk, deliver, close the record, the digest.

    run_id = start()                    lease taken, run record open, PreCronJob,
                                        PreAutomationTask
    for each chunk:                     read (or, on PostgreSQL, claim) due requests,
        decide each (decide.py)         in Python; hooks, email, TerminateAccount
        write them (store.py)           one transaction: changes, counts, lease
        after-commit hooks              AfterModuleTerminate, ServiceCancelled, ...
    for each chunk of reminders due:    reminders.py: CancellationReminder, email, queued
    PostAutomationTask, deliver the outbox, close the run record, AfterCronJob,
    DailyCronJob, the staff digest (after DailyCronJobPreEmail)

A crash loses at most the chunk in flight, whose transaction never committed; the next
run picks it up.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import structlog
from sqlalchemy.exc import OperationalError
from tenacity import RetryCallState

from processor import lease
from processor.config import Settings
from processor.credits import PaidInvoice
from processor.db import Database, retrying_transaction
from processor.delivery import Deliverer
from processor.digest import queue_digest
from processor.emails import EmailTemplates
from processor.errors import DatabaseUnavailable, LeaseHeld, StateError, database_trouble, one_line
from processor.hooks import CANCELLATION_TASK, HookRegistry
from processor.models import RequestStatus, RunStatus, ServiceStatus
from processor.outbox import Composer
from processor.params import with_params
from processor.retry import RetryPolicy
from processor.run.decide import ChunkDecider, Decider, orphan_outcome
from processor.run.outcome import Action, Outcome, RunOptions, RunSummary, Tally
from processor.run.preview import preview
from processor.run.reminders import Reminders
from processor.run.store import RunStore, StoreRules, due_chunks, paid_for

# What the hooks after a cancellation's commit see as the new statuses (per request: the
# plain strings once, not an enum property read each time).
_CANCELLED = ServiceStatus.CANCELLED.value
_COMPLETED = RequestStatus.COMPLETED.value
_SUSPENDED = ServiceStatus.SUSPENDED.value

Clock = Callable[[], dt.datetime]
Progress = Callable[[int], None]
Chunks = Iterator[tuple[list[Outcome], Tally]]


def grace_days_of(settings: Settings) -> Callable[[Any], int] | None:
    """Each request row's product grace_days (`Settings.for_product`, once per product), or
    None when no product has any: then the run asks nothing per request."""
    if not any(p.grace_days for p in settings.products.values()):
        return None
    known: dict[tuple[str | None, str], int] = {}

    def grace_days(row: Any) -> int:
        key = (row.product_external_id, row.product_name)
        if key not in known:
            known[key] = settings.for_product(*key).grace_days
        return known[key]
    return grace_days


class RunStopped(Exception):
    """Asked to stop (SIGTERM, SIGINT): raised between chunks, never inside one."""


class Helpers(Protocol):
    """Other processes working on a run beside its own (`run --workers N`)."""

    def work_alongside(self, run_id: int, *, keep_alive: Callable[[], None],
                       should_stop: Callable[[], bool]) -> bool:
        """Let them work on the run until they end; True if they were asked to stop."""
        ...


class Runner:
    """One run over the due requests. Everything it needs is passed in (no globals).

    Its API: `run` (the whole run), `join` (a share of the run in progress), `preview`
    (the dry run), `count_due`, `check_ready`.
    """

    def __init__(self, db: Database, settings: Settings, *, clock: Clock, templates: EmailTemplates | None = None,
                 hooks: HookRegistry | None = None, deliverer: Deliverer | None = None,
                 progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.hooks = hooks or HookRegistry()
        self.templates = templates or EmailTemplates(
            settings.path(settings.email.templates_dir) if settings.email.templates_dir else None)
        self.composer = Composer(self.templates, self.hooks, settings.email)
        self.decider = Decider(self.hooks, self.composer, settings.zone, grace_days_of(settings))
        self.reminders = Reminders(settings, self.composer, self.hooks)
        self.deliverer = deliverer  # None: emails stay queued for `emails send`
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)  # checked between chunks
        self.rules = StoreRules(
            zone=settings.zone, cancel_unpaid_invoices=settings.cancel_unpaid_invoices,
            from_address=settings.email.from_address, lease_seconds=settings.lease_seconds,
            retry=RetryPolicy(settings.max_attempts, settings.retry_backoff_minutes,
                              settings.retry_backoff_max_minutes),
            hooked=self.decider.hooked, returning_addons=self.hooks.has("AddonCancelled"),
            returning_invoices=self.hooks.has("InvoiceCancelled"), credits=settings.immediate_refund == "credit")
        self.credits = self.rules.credits
        # The chunk in hand's last paid invoices by service (immediate_refund = "credit" only).
        self._paid: dict[int, PaidInvoice] = {}
        self.log = structlog.get_logger("cancelproc.run")
        self.started_run_id: int | None = None  # set once a run record exists (a failure after it is the run's)

    # --- the API ---------------------------------------------------------------------------

    def check_ready(self) -> None:
        """Fail before anything is touched: every email template must parse and render."""
        self.templates.check_all(self.settings.email.company_name, self.settings.email.signature)

    def count_due(self, options: RunOptions) -> int:
        with self._reading() as store:
            return store.count_due(options, self.clock())

    def preview(self, options: RunOptions) -> Iterator[dict[str, Any]]:
        """--dry-run: what the run would do to each due request. Reads only; no lease."""
        self.check_ready()
        return preview(self._reading, self.decider, options, now=self.clock(), chunk_size=self.settings.chunk_size,
                       cancel_unpaid_invoices=self.settings.cancel_unpaid_invoices, zone=self.settings.zone,
                       credits=self.credits, reminders=self.reminders)

    def run(self, options: RunOptions, *, helpers: Helpers | None = None) -> RunSummary:
        """Take the lease, apply every due request (with `helpers`, they do the work and this
        process sweeps up after them), record the run. Raises LeaseHeld."""
        run_id = self._start(options)
        summary = RunSummary(run_id=run_id, as_of=options.as_of, status=RunStatus.RUNNING)
        task_ended = False  # PostAutomationTask fired
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            try:
                if helpers is not None and helpers.work_alongside(
                        run_id, keep_alive=lambda: self._renew_lease(run_id), should_stop=self.should_stop):
                    self._reload_counts(run_id, summary)
                    raise RunStopped(f"stopped on request after {summary.due} requests; the next run does the rest")
                self._work(run_id, options, summary)  # with helpers: what a dead one left (usually nothing)
                self._fail_orphans(options, run_id, summary)
                self._remind(run_id, options, summary)
                task_ended = True
                self._post_automation_task(run_id, completed=True)
                summary.this_process = summary.share()
                if helpers is not None or self._joined(run_id, summary):
                    self._reload_counts(run_id, summary)
                summary.run_total = summary.share()
                if self.deliverer is not None:
                    self._deliver(summary)
            except RunStopped as exc:
                if not task_ended:
                    self._post_automation_task(run_id, completed=False)
                return self._stopped(run_id, summary, exc)
            except BaseException as exc:
                if not task_ended and isinstance(exc, Exception):  # not on Ctrl-C, as AfterCronJob
                    self._post_automation_task(run_id, completed=False)
                self._failed(run_id, summary, exc)
                raise
            return self._complete(run_id, options, summary)

    def join(self) -> RunSummary:
        """Work on the run in progress (a worker of `run --workers`, or another host):
        PostgreSQL only. The run's own process closes it. Raises StateError if none runs."""
        if not self.db.is_postgresql:
            raise StateError("only a run on PostgreSQL can be joined (SQLite runs one writer at a time)")
        self.check_ready()
        with self._reading() as store:
            running = store.running_run()
        if running is None:
            raise StateError("no run in progress to join")
        run_id, options = running
        summary = RunSummary(run_id=run_id, as_of=options.as_of, status=RunStatus.RUNNING)
        with structlog.contextvars.bound_contextvars(run_id=run_id, worker=os.getpid()):
            self.log.info("joined the run")
            self._work(run_id, options, summary)
            summary.counts_are, summary.this_process = "this_process", summary.share()
            with self._reading() as store:
                summary.run_total = store.recorded(run_id)[0]
            self.log.info("worker done", due=summary.due, completed=summary.completed, retrying=summary.retrying,
                          failed=summary.failed, vetoed=summary.vetoed)
        return summary

    # --- the lifecycle ---------------------------------------------------------------------

    def _start(self, options: RunOptions) -> int:
        """Check the templates, take the lease (creating the run record), fire PreCronJob."""
        self.check_ready()
        with self._writing() as store:
            run_id = store.open_run(options, self.clock)
        self.started_run_id = run_id
        self.log.info("run started", run_id=run_id, as_of=str(options.as_of), trigger=str(options.trigger),
                      operator=options.operator)
        self.hooks.apply("PreCronJob", with_params({}, run_id=run_id, as_of=options.as_of,
                                                   trigger=options.trigger.value, operator=options.operator))
        # WHMCS runs its cancellation requests as one automation task of its cron: a run is that task.
        self.hooks.apply("PreAutomationTask", with_params({}, task=CANCELLATION_TASK, run_id=run_id,
                                                          as_of=options.as_of))
        return run_id

    def _post_automation_task(self, run_id: int, *, completed: bool) -> None:
        """After the run's last request (completed False: it stopped or failed first)."""
        self.hooks.apply("PostAutomationTask", with_params({}, task=CANCELLATION_TASK, completed=completed,
                                                           run_id=run_id))

    def _work(self, run_id: int, options: RunOptions, summary: RunSummary) -> None:
        """Apply due requests of this run, chunk by chunk (on PostgreSQL, the share this
        process claims while others may work on the same run)."""
        fields = self.decider.run_fields(options.as_of)
        threads = self.settings.hook_concurrency if self.decider.hooked else 1
        with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
            if self.credits:
                paid = self._paid
                decide_all = ChunkDecider(lambda row: self.decider.decide(
                    row, options.as_of, fields, run_id, paid=paid.get(row.service_id)), pool, threads)
            else:
                decide_all = ChunkDecider(lambda row: self.decider.decide(row, options.as_of, fields, run_id), pool,
                                          threads)
            chunks = (self._claimed(options, run_id, decide_all) if self.db.is_postgresql
                      else self._keyset(options, run_id, decide_all))
            for outcomes, tally in chunks:
                summary.record(outcomes, tally)
                self._log_chunk(outcomes, tally)
                self._after_commit(outcomes)
                if self.progress:
                    self.progress(len(outcomes))
                if self.should_stop():
                    raise RunStopped(f"stopped on request after {summary.due} requests; the next run does the rest")

    def _keyset(self, options: RunOptions, run_id: int, decide_all: ChunkDecider) -> Chunks:
        """SQLite: read a chunk (its own short read), decide it, write it (the write claims
        each request again)."""
        for rows in due_chunks(self._reading, options, self.clock(), self.settings.chunk_size):
            if self.credits:
                with self._reading() as store:
                    self._read_paid(store, rows)
            outcomes = decide_all(rows)
            with self._writing() as store:
                tally = store.write_chunk(outcomes, run_id, options.as_of, self.clock())
            yield outcomes, tally

    def _claimed(self, options: RunOptions, run_id: int, decide_all: ChunkDecider) -> Chunks:
        """PostgreSQL: claim, decide and write chunk after chunk until nothing is left."""
        remaining = options.limit
        while remaining is None or remaining > 0:
            size = self.settings.chunk_size if remaining is None else min(self.settings.chunk_size, remaining)
            chunk = self._claim_and_apply(options, run_id, size, decide_all, wait=False)
            if chunk is None:
                # Nothing free: wait for chunks other processes still hold. What they commit is
                # no longer due; what a dead one held is free again, and taken here.
                chunk = self._claim_and_apply(options, run_id, size, decide_all, wait=True)
            if chunk is None:
                return
            yield chunk
            if remaining is not None:
                remaining -= len(chunk[0])

    def _claim_and_apply(self, options: RunOptions, run_id: int, size: int, decide_all: ChunkDecider, *,
                         wait: bool) -> tuple[list[Outcome], Tally] | None:
        """PostgreSQL: claim a chunk (FOR UPDATE SKIP LOCKED), decide and write it in one
        transaction. Another process working on the same run skips the rows this one holds;
        if this process dies, its transaction rolls back and the rows are claimable again.

        A chunk that loses a deadlock (to an import, say) is rolled back whole and done
        again: claimed, decided (its hooks called again, as after a crash: they get the
        request's idempotency_key) and written."""
        for attempt in retrying_transaction(self._rolled_back):
            with attempt, self._writing() as store:
                rows = store.claim_due(options, run_id, self.clock(), size, wait=wait)
                if not rows:
                    return None
                if self.credits:
                    self._read_paid(store, rows)
                outcomes = decide_all(rows)
                tally = store.write_chunk(outcomes, run_id, options.as_of, self.clock())
        return outcomes, tally

    def _read_paid(self, store: RunStore, rows: list[Any]) -> None:
        """The last paid invoices of the chunk's Immediate requests (immediate_refund =
        "credit"): one statement per chunk, before its requests are decided, so that the
        confirmation email can name the credit."""
        self._paid.clear()
        self._paid.update(store.last_paid(paid_for(rows)))

    def _rolled_back(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.log.warning("chunk rolled back by the database; doing it again", error=one_line(exc) if exc else "",
                         attempt=state.attempt_number)

    def _fail_orphans(self, options: RunOptions, run_id: int, summary: RunSummary) -> None:
        """Record each orphan (a request whose service, client or product was deleted
        outside cancelproc) as failed in this run: the digest, the exit code and `status`
        then show it. Done once, by the process that owns the run, after the chunks."""
        limit = None if options.limit is None else options.limit - summary.due
        if limit is not None and limit <= 0:
            return
        with self._reading() as store:
            orphans = [orphan_outcome(o) for o in store.orphans(options, limit)]
        if not orphans:
            return
        with self._writing() as store:
            now = self.clock()
            failed = store.fail_orphans(orphans, run_id, now)
            if not failed:
                return
            tally = store.close_chunk(run_id, failed, now)
        summary.record(failed, tally)
        self._log_chunk(failed, tally)

    def _remind(self, run_id: int, options: RunOptions, summary: RunSummary) -> None:
        """Queue the reminders due tonight (reminders.py), a chunk per transaction with the
        lease renewed, by the process that owns the run, after the due requests (the nightly
        run only: not `requests process`). A crash loses the chunk in flight; the rerun
        finds the committed ones by their keys and queues each exactly once."""
        if not self.reminders.enabled or options.request_ids is not None:
            return
        for planned in self.reminders.chunks(self._reading, options.as_of, self.settings.chunk_size):
            composed = [self.reminders.compose(r, options.as_of, run_id=run_id) for r in planned]
            for attempt in retrying_transaction(self._rolled_back):
                with attempt, self._writing() as store:
                    now = self.clock()
                    queued = self.reminders.write(store.conn, store.db, composed, run_id=run_id, now=now)
                    store.renew_lease(run_id, now)
            tally = self.reminders.log_outcomes(composed)
            summary.reminders_queued += queued
            summary.reminders_aborted += tally.aborted
            summary.reminders_failed += tally.failed
            self.log.info("reminders written", queued=queued, aborted=tally.aborted, failed=tally.failed)
            if self.should_stop():
                raise RunStopped(f"stopped on request after {summary.due} requests and {summary.reminders_queued} "
                                 "reminders; the next run does the rest")

    def _after_commit(self, outcomes: list[Outcome]) -> None:
        """Hooks on what was just committed (or failed). Their exceptions are logged, never undo."""
        if not self.decider.hooked:
            return
        apply = self.hooks.apply
        for o in outcomes:
            if o.params is None:
                continue
            if o.addon_id is not None:  # a request for one add-on: its add-on's hook alone
                if o.action is Action.CANCEL:
                    for addon in o.addons:
                        apply("AddonCancelled", addon_cancelled_params(
                            {**o.params, "request": {**o.params["request"], "status": _COMPLETED}}, addon))
            elif o.suspending:
                self._after_suspension(o)
            elif o.action is Action.CANCEL:
                # The params were read before the write; the hooks after it see what was committed
                # (new dicts: a hook before the write may have kept the old ones).
                params = {**o.params, "service": {**o.params["service"], "status": _CANCELLED},
                          "request": {**o.params["request"], "status": _COMPLETED}}
                apply("AfterModuleTerminate", params)
                for addon in o.addons:
                    apply("AddonCancelled", addon_cancelled_params(params, addon))
                for invoice in o.invoices:
                    apply("InvoiceCancelled", {**params, "invoice_id": invoice["id"], "invoice": invoice,
                                               "invoiceid": invoice["id"]})
                apply("ServiceCancelled", {**params, "days_late": o.days_late})
                if o.credit is not None:
                    apply("CreditIssued", credit_params(params, o))
            elif o.action is Action.ERROR:
                apply("AfterModuleTerminateFailed", {**o.params, "error": o.error,
                                                     "failureResponseMessage": o.response})

    def _after_suspension(self, o: Outcome) -> None:
        """AfterModuleSuspend (the suspension committed) or AfterModuleSuspendFailed."""
        assert o.params is not None
        if o.action is Action.SUSPEND:
            self.hooks.apply("AfterModuleSuspend", {
                **o.params, "service": {**o.params["service"], "status": _SUSPENDED},
                "request": {**o.params["request"], "grace_ends_on": o.grace_ends_on}})
        elif o.action is Action.ERROR:
            self.hooks.apply("AfterModuleSuspendFailed", {**o.params, "error": o.error,
                                                          "failureResponseMessage": o.response})

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

    def _complete(self, run_id: int, options: RunOptions, summary: RunSummary) -> RunSummary:
        """Close the record of a run that did its work; AfterCronJob; the staff digest."""
        summary.status = RunStatus.COMPLETED_WITH_FAILURES if summary.exit_code else RunStatus.COMPLETED
        self._finish(run_id, summary.status, summary=summary)
        self.log.info("run finished", status=str(summary.status), due=summary.due, completed=summary.completed,
                      suspended=summary.suspended,
                      noop=summary.noop, retrying=summary.retrying, failed=summary.failed, vetoed=summary.vetoed,
                      emails_queued=summary.emails_queued, reminders_queued=summary.reminders_queued,
                      emails_sent=summary.emails_sent,
                      emails_failed=summary.emails_failed, late=summary.late, max_days_late=summary.max_days_late)
        self._after_cron_job(run_id, summary)
        if options.request_ids is None:  # the nightly run; not `requests process` of a few requests
            self.hooks.apply("DailyCronJob", with_params({}, run_id=run_id, as_of=options.as_of))
        summary.digest_suppressed = self.hooks.apply(
            "DailyCronJobPreEmail", with_params({}, run_id=run_id, summary=summary.as_dict())).suppressed
        if options.digest and not summary.digest_suppressed and self.settings.email.staff_address:
            self._digest(run_id, summary)
        return summary

    def _stopped(self, run_id: int, summary: RunSummary, exc: RunStopped) -> RunSummary:
        """A clean stop between chunks: what is committed stays, the rest waits for the next run."""
        summary.status = RunStatus.STOPPED
        self._finish(run_id, RunStatus.STOPPED, error=str(exc), summary=summary)
        self.log.warning("run stopped", reason=str(exc), due=summary.due, completed=summary.completed)
        self._after_cron_job(run_id, summary)
        return summary

    def _failed(self, run_id: int, summary: RunSummary, exc: BaseException) -> None:
        """Close the record of a run an error stopped (the caller re-raises)."""
        self._finish(run_id, RunStatus.ERROR, error=one_line(exc))
        self.log.error("run stopped", error=one_line(exc))
        if isinstance(exc, Exception):  # not on Ctrl-C: an alerting hook wants to hear of this
            summary.status = RunStatus.ERROR
            self._after_cron_job(run_id, summary)
        if isinstance(exc, OperationalError):
            raise DatabaseUnavailable(f"run {run_id} stopped: {database_trouble(exc)}") from exc

    def _after_cron_job(self, run_id: int, summary: RunSummary) -> None:
        self.hooks.apply("AfterCronJob", with_params({}, run_id=run_id, summary=summary.as_dict()))

    def _digest(self, run_id: int, summary: RunSummary) -> None:
        """Queue the staff digest and send it. A failure here is logged: the run is done.

        The digest is not in the run's email counts (`emails_sent`...): it reports them, so
        it is written after they are final and cannot count itself. Its own delivery is
        `digest_sent` / `digest_error`, so the run output, `runs show`, the digest and the
        metrics give the same counts."""
        try:
            with self.db.engine.begin() as conn:
                digest_id = queue_digest(conn, self.composer, run_id=run_id, summary=summary.as_dict(),
                                         now=self.clock(), settings=self.settings)
        except Exception as exc:  # a digest hook or template failure must not turn a done run into an error
            self.log.error("staff digest not queued", error=one_line(exc))
            return
        summary.digest_queued = digest_id is not None
        if self.deliverer is None or digest_id is None:
            return
        if summary.delivery_error:  # not tried: it stays queued, and the output says why delivery stopped
            return
        try:
            report = self.deliverer.deliver(ids=[digest_id])
        except Exception as exc:  # it stays queued for the next delivery
            summary.digest_error = one_line(exc)
        else:
            summary.digest_sent = report.sent == 1
            if not summary.digest_sent:
                summary.digest_error = report.stopped or "; ".join(
                    str(e["error"]) for e in report.failed_emails) or "refused; it will be retried"
        if summary.digest_error:
            self.log.error("staff digest not sent", error=summary.digest_error)

    def _finish(self, run_id: int, status: RunStatus, error: str | None = None,
                summary: RunSummary | None = None) -> None:
        if error is None and summary is not None and summary.delivery_error:  # `runs show` and `status` name it
            error = f"email delivery stopped: {summary.delivery_error}"
        try:
            with self._writing() as store:
                store.finish_run(run_id, status, self.clock(), error=error,
                                 emails_sent=summary.emails_sent if summary else None,
                                 emails_failed=summary.emails_failed if summary else None)
        except OperationalError as exc:
            # The database is gone; the lease will expire by itself.
            self.log.error("could not close the run record", error=one_line(exc))

    def _renew_lease(self, run_id: int) -> None:
        with self._writing() as store:
            store.renew_lease(run_id, self.clock())

    def _joined(self, run_id: int, summary: RunSummary) -> bool:
        """Did another process (`run --join`, PostgreSQL) do part of this run?"""
        if not self.db.is_postgresql:
            return False
        with self._reading() as store:
            return store.recorded(run_id)[0]["due"] != summary.due

    def _reload_counts(self, run_id: int, summary: RunSummary) -> None:
        """The run's counts and failures as recorded by every process that worked on it."""
        with self._reading() as store:
            counts, summary.failures = store.recorded(run_id)
        for name, value in counts.items():
            setattr(summary, name, value)

    def _log_chunk(self, outcomes: list[Outcome], tally: Tally) -> None:
        """A line per chunk, and one per request that did not go through. Completed requests
        get no line of their own: the audit log has them, and a line each cost 3% of a run."""
        for o in outcomes if tally.has_failures else ():
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

    # --- transactions ----------------------------------------------------------------------

    def _reading(self) -> AbstractContextManager[RunStore]:
        """A store on a read-only connection (never takes SQLite's write lock)."""
        return self._store(self.db.read_engine.connect)

    def _writing(self) -> AbstractContextManager[RunStore]:
        """A store in a write transaction, committed when the block ends without an error."""
        return self._store(self.db.engine.begin)

    @contextmanager
    def _store(self, open_connection: Callable[[], AbstractContextManager[Any]]) -> Iterator[RunStore]:
        with open_connection() as conn:
            yield RunStore(conn, self.db, self.rules)


def credit_params(params: dict[str, Any], o: Outcome) -> dict[str, Any]:
    """CreditIssued's params: the request's (as committed) and the credit."""
    assert o.credit is not None
    return {**params, "idempotency_key": f"cancelproc:credit:request:{o.request_id}", "credit_id": o.credit_id,
            "credit": {"id": o.credit_id, **o.credit.as_dict()}, "amount": o.credit.amount}


def addon_cancelled_params(params: dict[str, Any], addon: dict[str, Any]) -> dict[str, Any]:
    """AddonCancelled's params: the request's (as committed) and the add-on, now Cancelled.
    WHMCS's names beside ours: its `addonid` is the add-on's product in its catalogue, which
    cancelproc does not keep (None)."""
    return {**params, "addon_id": addon["id"], "addon": {**addon, "status": _CANCELLED}, "id": addon["id"],
            "userid": params["client"]["id"], "serviceid": params["service"]["id"], "addonid": None}
