"""The per-request decision: what to do with one due request, in Python, with no SQL.

In this order: lateness, whether the service is already closed (a no-op), the
PreModuleTerminate hooks (a veto stops here), the confirmation email (EmailPreSend hooks,
then the template), and last TerminateAccount, the one step with an effect outside, so
that every step that can fail fails before it. Any exception becomes an ERROR outcome for
that request alone.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from processor.due import business_today, days_late, period_end
from processor.emails import ADDON_CANCELLATION_CONFIRMATION, SERVICE_CANCELLATION_CONFIRMATION, Writing
from processor.errors import InputError, one_line
from processor.hooks import HookFailed, HookRegistry
from processor.models import CLOSED_SERVICE_STATUSES, ServiceStatus
from processor.outbox import Composed, Composer, UnsafeEmail, addon_fields, email_key, request_fields
from processor.params import ModuleParams, request_params
from processor.run.outcome import Action, Outcome

# A client's language -> the run's common merge fields in the language its email is written in, and how it writes.
RunFields = Callable[[str | None], tuple[dict[str, Any], Writing]]

# The points that fire for each request: when none has a hook, no request's params are built.
PER_REQUEST_POINTS = ("PreModuleTerminate", "EmailPreSend", "TerminateAccount", "AfterModuleTerminate",
                      "AfterModuleTerminateFailed", "AddonCancelled", "InvoiceCancelled", "ServiceCancelled")


class Orphan(NamedTuple):
    """A pending request whose service, client or product was deleted outside cancelproc."""

    request_id: int
    service_id: int
    attempts: int
    missing: str  # what is gone: "service #5", "client #3 of service #5", ...


class Decider:
    """Decides requests. Everything it needs is passed in: the hooks, the email composer,
    the business time zone."""

    def __init__(self, hooks: HookRegistry, composer: Composer, zone: ZoneInfo) -> None:
        self.hooks = hooks
        self.composer = composer
        self.zone = zone
        # Building a request's hook params costs time; only when some hook will read them.
        self.hooked = any(hooks.has(p) for p in PER_REQUEST_POINTS)
        # The Addon Cancellation Confirmation's run fields, made at the first add-on request of a run.
        self._addon_fields: tuple[dt.date, RunFields] | None = None

    def run_fields(self, as_of: dt.date) -> RunFields:
        """Merge fields that are the same for every confirmation of a run in one language."""
        by_language: dict[str | None, tuple[dict[str, Any], Writing]] = {}

        def fields(language: str | None) -> tuple[dict[str, Any], Writing]:
            if language not in by_language:
                writing = self.composer.writing(SERVICE_CANCELLATION_CONFIRMATION, language)
                by_language[language] = (self.composer.common_fields(
                    as_of, writing.language, cancellation_date=as_of, service_status=ServiceStatus.CANCELLED.value),
                    writing)
            return by_language[language]
        return fields

    def addon_run_fields(self, as_of: dt.date) -> RunFields:
        """`run_fields` of the Addon Cancellation Confirmation: the service keeps its status."""
        by_language: dict[str | None, tuple[dict[str, Any], Writing]] = {}

        def fields(language: str | None) -> tuple[dict[str, Any], Writing]:
            if language not in by_language:
                writing = self.composer.writing(ADDON_CANCELLATION_CONFIRMATION, language)
                by_language[language] = (self.composer.common_fields(as_of, writing.language,
                                                                     cancellation_date=as_of), writing)
            return by_language[language]
        return fields

    def decide(self, row: Any, as_of: dt.date, run_fields: RunFields, run_id: int | None = None,
               dry_run: bool = False) -> Outcome:
        """What to do with one due request (a `params.request_select` row): everything but
        the database write. Never raises."""
        params = None
        try:
            if row.addon_id is not None:
                return self._decide_addon(row, as_of, run_id, dry_run)
            # Lateness counts from the due date, but never from before the request was made.
            late = days_late(row.type, row.next_due_date, row.cancel_on, business_today(row.created_at, self.zone),
                             as_of)
            if row.service_status in CLOSED_SERVICE_STATUSES:
                return Outcome(row.id, row.service_id, Action.NOOP, late, row.attempts,
                               service_status=row.service_status._value_)
            if self.hooked:
                # WHMCS's module parameters ride along as params["params"], built only if read.
                params = request_params(row, run_id=run_id, as_of=as_of, dry_run=dry_run, params=ModuleParams(row))
                veto = self.hooks.apply("PreModuleTerminate", params).vetoed
                if veto is not None:
                    return Outcome(row.id, row.service_id, Action.VETOED, late, row.attempts, error=veto,
                                   params=params)
            composed = self._compose(row, run_fields, run_id, dry_run)
            if params is not None and not dry_run:
                self.hooks.apply("TerminateAccount", params)  # raises HookFailed on an error
            return Outcome(row.id, row.service_id, Action.CANCEL, late, row.attempts, composed.email,
                           service_status=row.service_status._value_, params=params,
                           email_aborted_by=composed.aborted_by)
        except Exception as exc:  # one bad request never stops the others
            message = str(exc) if isinstance(exc, HookFailed) else one_line(exc)
            return Outcome(row.id, row.service_id, Action.ERROR, attempts=row.attempts, error=message, params=params,
                           response=exc.response if isinstance(exc, HookFailed) else message)

    def _decide_addon(self, row: Any, as_of: dt.date, run_id: int | None, dry_run: bool) -> Outcome:
        """A request for one add-on: cancel the add-on alone and confirm it (Addon Cancellation
        Confirmation). No module point fires (PreModuleTerminate, TerminateAccount, ...): they
        are the service's provisioning, and a TerminateAccount hook would deprovision the
        service, which stays; the add-on's own hook is AddonCancelled, after the commit."""
        late = days_late(row.type, period_end(row.next_due_date, row.addon_id, row.addon_next_due_date),
                         row.cancel_on, business_today(row.created_at, self.zone), as_of)
        if row.addon_status is None:  # deleted outside cancelproc (foreign keys off)
            return Outcome(row.id, row.service_id, Action.ERROR, late, row.attempts, addon_id=row.addon_id,
                           error=f"add-on #{row.addon_id} of service #{row.service_id} no longer exists "
                                 "(deleted outside cancelproc); nothing was cancelled")
        closed = (f"add-on already {row.addon_status}" if row.addon_status in CLOSED_SERVICE_STATUSES
                  else f"service already {row.service_status._value_}"
                  if row.service_status in CLOSED_SERVICE_STATUSES else None)
        if closed:
            return Outcome(row.id, row.service_id, Action.NOOP, late, row.attempts, addon_id=row.addon_id,
                           service_status=row.service_status._value_, noop_reason=closed)
        params = (request_params(row, run_id=run_id, as_of=as_of, dry_run=dry_run)
                  if self.hooks.has("AddonCancelled") else None)
        composed = self._compose_addon(row, as_of, run_id, dry_run)
        return Outcome(row.id, row.service_id, Action.CANCEL, late, row.attempts, composed.email,
                       service_status=row.service_status._value_, params=params,
                       email_aborted_by=composed.aborted_by, addon_id=row.addon_id)

    def _compose_addon(self, row: Any, as_of: dt.date, run_id: int | None, dry_run: bool) -> Composed:
        if self._addon_fields is None or self._addon_fields[0] != as_of:
            self._addon_fields = (as_of, self.addon_run_fields(as_of))
        common, writing = self._addon_fields[1](row.language)
        fields = {**request_fields(row, common, writing), **addon_fields(row, writing)}
        try:
            return self.composer.compose(
                ADDON_CANCELLATION_CONFIRMATION, key=email_key(ADDON_CANCELLATION_CONFIRMATION, "request", row.id),
                to_address=row.email, fields=fields, language=row.language, request_id=row.id, run_id=run_id,
                dry_run=dry_run)
        except UnsafeEmail as exc:
            if exc.header != "recipient":
                raise
            raise InputError(f"client of service {row.service_id} has no valid email address ({row.email!r})") \
                from None

    def _compose(self, row: Any, run_fields: RunFields, run_id: int | None, dry_run: bool) -> Composed:
        """The Service Cancellation Confirmation of this request (the service now Cancelled)."""
        common, writing = run_fields(row.language)
        try:
            return self.composer.compose(
                SERVICE_CANCELLATION_CONFIRMATION,
                key=email_key(SERVICE_CANCELLATION_CONFIRMATION, "request", row.id), to_address=row.email,
                fields=request_fields(row, common, writing), language=row.language, request_id=row.id,
                run_id=run_id, dry_run=dry_run)
        except UnsafeEmail as exc:
            if exc.header != "recipient":
                raise
            raise InputError(f"client of service {row.service_id} has no valid email address ({row.email!r})") \
                from None


def orphan_outcome(orphan: Orphan) -> Outcome:
    """An orphan fails and gives up at once: nothing can be cancelled for it; staff must look."""
    return Outcome(orphan.request_id, orphan.service_id, Action.ERROR, attempts=orphan.attempts, gave_up=True,
                   error=f"{orphan.missing} no longer exists (deleted outside cancelproc); nothing was cancelled")


class ChunkDecider:
    """Decides a chunk's requests: one after another while the hooks are quick, in threads
    once they wait (network calls), so slow hooks of different requests wait side by side.

    Threads cost quick hooks a fifth of their speed (GIL hand-offs), so the first few
    requests of each chunk are timed first; threads are used from the first chunk whose
    requests take SLOW_SECONDS or more each, and from then on.
    """

    PROBE = 4
    SLOW_SECONDS = 0.002

    def __init__(self, decide: Callable[[Any], Outcome], pool: ThreadPoolExecutor | None, threads: int,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.decide = decide
        self.pool = pool
        self.threads = threads
        self.timer = timer
        self.threaded = False

    def __call__(self, rows: list[Any]) -> list[Outcome]:
        if self.pool is None:
            return [self.decide(row) for row in rows]
        if self.threaded:
            return self._in_threads(rows)
        started = self.timer()
        head = [self.decide(row) for row in rows[:self.PROBE]]
        self.threaded = (self.timer() - started) / max(len(head), 1) >= self.SLOW_SECONDS
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
