"""The per-request decision: what to do with one due request, in Python, with no SQL.

In this order: lateness, whether the service is already closed (a no-op), the
PreModuleTerminate hooks (a veto stops here), the confirmation email (EmailPreSend hooks,
then the template), and last TerminateAccount, the one step with an effect outside, so
that every step that can fail fails before it. Any exception becomes an ERROR outcome for
that request alone.

A request whose product has a grace period (grace_days) is decided twice: when due, its
service is suspended (PreModuleSuspend, the email service_suspended_for_cancellation,
SuspendAccount: the same order, the same failures); once its grace period has ended
(`grace_ends_on`, stored when suspended), it is cancelled as above.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from processor.credits import Credit, PaidInvoice, unused_credit
from processor.due import ONE_DAY, business_today, days_late
from processor.emails import (
    ADDON_CANCELLATION_CONFIRMATION,
    SERVICE_CANCELLATION_CONFIRMATION,
    SERVICE_SUSPENDED,
    Writing,
)
from processor.errors import InputError, one_line
from processor.hooks import HookFailed, HookRegistry
from processor.models import CLOSED_SERVICE_STATUSES, ServiceStatus
from processor.outbox import Composed, Composer, UnsafeEmail, addon_fields, email_key, request_fields
from processor.params import ModuleParams, request_params
from processor.run.outcome import Action, Outcome

# A client's language -> the run's common merge fields in the language its email is written in, and how it writes.
RunFields = Callable[[str | None], tuple[dict[str, Any], Writing]]
# A request row -> its product's grace_days (config.Settings.for_product).
GraceDays = Callable[[Any], int]

# The points that fire for each request: when none has a hook, no request's params are built.
PER_REQUEST_POINTS = ("PreModuleTerminate", "EmailPreSend", "TerminateAccount", "CancelSubscription",
                      "AfterModuleTerminate", "CreditIssued",
                      "AfterModuleTerminateFailed", "AddonCancelled", "InvoiceCancelled", "ServiceCancelled",
                      "PreModuleSuspend", "SuspendAccount", "AfterModuleSuspend", "AfterModuleSuspendFailed")


class Orphan(NamedTuple):
    """A pending request whose service, client or product was deleted outside cancelproc."""

    request_id: int
    service_id: int
    attempts: int
    missing: str  # what is gone: "service #5", "client #3 of service #5", ...


class Decider:
    """Decides requests. Everything it needs is passed in: the hooks, the email composer,
    the business time zone, and each product's grace days (None: no product has any, and
    no request is asked)."""

    def __init__(self, hooks: HookRegistry, composer: Composer, zone: ZoneInfo,
                 grace_days: GraceDays | None = None) -> None:
        self.hooks = hooks
        self.composer = composer
        self.zone = zone
        self.grace_days = grace_days
        # The common fields of the suspension and add-on emails, by template, day, language and
        # cancellation date (`_common`): few per run.
        self._common: dict[tuple[str, dt.date, str | None, dt.date], tuple[dict[str, Any], Writing]] = {}
        # Building a request's hook params costs time; only when some hook will read them.
        self.hooked = any(hooks.has(p) for p in PER_REQUEST_POINTS)
        self.cancels_subscriptions = hooks.has("CancelSubscription")

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

    def decide(self, row: Any, as_of: dt.date, run_fields: RunFields, run_id: int | None = None,
               dry_run: bool = False, paid: PaidInvoice | None = None) -> Outcome:
        """What to do with one due request (a `params.request_select` row): everything but
        the database write. Never raises. `paid`: the service's last paid invoice, given
        for an Immediate request when immediate_refund is "credit" (else None: no credit)."""
        params = None
        grace = 0  # > 0: this is the first phase of a grace period (suspend)
        try:
            if row.addon_id is not None:
                return self._decide_addon(row, as_of, run_id, dry_run)
            grace_ends_on = row.grace_ends_on
            if grace_ends_on is None:
                # Lateness counts from the due date, but never from before the request was made.
                late = days_late(row.type, row.effective_date, business_today(row.created_at, self.zone), as_of)
            else:  # suspended: its cancellation was due when its grace period ended
                late = max(0, (as_of - grace_ends_on).days)
            if row.service_status in CLOSED_SERVICE_STATUSES:
                return Outcome(row.id, row.service_id, Action.NOOP, late, row.attempts,
                               service_status=row.service_status._value_)
            if grace_ends_on is None and self.grace_days is not None:
                grace = self._grace(row)
            if grace:
                grace_ends_on = as_of + grace * ONE_DAY
            if self.hooked:
                # WHMCS's module parameters ride along as params["params"], built only if read.
                params = request_params(row, run_id=run_id, as_of=as_of, dry_run=dry_run, params=ModuleParams(row))
                if grace:
                    params.update(grace_days=grace, grace_ends_on=grace_ends_on,
                                  suspendreason=f"Cancellation requested: cancelled on {grace_ends_on}")
                veto = self.hooks.apply("PreModuleSuspend" if grace else "PreModuleTerminate", params).vetoed
                if veto is not None:
                    return Outcome(row.id, row.service_id, Action.VETOED, late, row.attempts, error=veto,
                                   params=params, suspending=bool(grace))
            credit = None
            if grace:
                composed = self._compose_suspension(row, as_of, grace_ends_on, run_id, dry_run)
            else:
                credit = None if paid is None else unused_credit(row.client_id, paid, row.next_due_date,
                                                                 row.billing_cycle, as_of)
                composed = self._compose(row, run_fields, run_id, dry_run, credit)
            if params is not None and not dry_run:
                if grace:  # the subscription runs on: a withdrawal in the grace period keeps the service
                    self.hooks.apply("SuspendAccount", params)  # raises HookFailed on an error
                else:
                    self.hooks.apply("TerminateAccount", params)  # raises HookFailed on an error
                    if self.cancels_subscriptions and row.subscription_id:
                        # After the deprovisioning: a service still running (TerminateAccount failed)
                        # keeps being billed until a later attempt has stopped it.
                        self.hooks.apply("CancelSubscription", subscription_params(params, row.subscription_id))
            return Outcome(row.id, row.service_id, Action.SUSPEND if grace else Action.CANCEL, late, row.attempts,
                           composed.email, service_status=row.service_status._value_, params=params,
                           email_aborted_by=composed.aborted_by, credit=credit, suspending=bool(grace),
                           grace_ends_on=grace_ends_on if grace else None)
        except Exception as exc:  # one bad request never stops the others
            message = str(exc) if isinstance(exc, HookFailed) else one_line(exc)
            return Outcome(row.id, row.service_id, Action.ERROR, attempts=row.attempts, error=message, params=params,
                           response=exc.response if isinstance(exc, HookFailed) else message,
                           suspending=bool(grace))

    def _grace(self, row: Any) -> int:
        """The grace days of this request's product; 0 for a service already Suspended (for
        unpaid invoices, say): it is cancelled at once, as without a grace period, and a
        withdrawal never unsuspends what cancelproc did not suspend."""
        assert self.grace_days is not None
        if row.service_status is ServiceStatus.SUSPENDED:
            return 0
        return self.grace_days(row)

    def _decide_addon(self, row: Any, as_of: dt.date, run_id: int | None, dry_run: bool) -> Outcome:
        """A request for one add-on: cancel the add-on alone and confirm it (Addon Cancellation
        Confirmation). No module point fires (PreModuleTerminate, TerminateAccount, ...): they
        are the service's provisioning, and a TerminateAccount hook would deprovision the
        service, which stays; the add-on's own hook is AddonCancelled, after the commit."""
        late = days_late(row.type, row.effective_date, business_today(row.created_at, self.zone), as_of)
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
        """The client's Addon Cancellation Confirmation: the add-on cancelled today, the
        service keeping its status."""
        common, writing = self._common_fields(ADDON_CANCELLATION_CONFIRMATION, as_of, row.language, as_of)
        fields = {**request_fields(row, common, writing), **addon_fields(row, writing)}
        return self._compose_to_client(ADDON_CANCELLATION_CONFIRMATION, row, fields, run_id, dry_run)

    def _compose(self, row: Any, run_fields: RunFields, run_id: int | None, dry_run: bool,
                 credit: Credit | None) -> Composed:
        """The Service Cancellation Confirmation of this request (the service now Cancelled)."""
        common, writing = run_fields(row.language)
        fields = request_fields(row, common, writing)
        if credit is not None:
            fields["credit_amount"] = writing.amount(credit.amount)
        return self._compose_to_client(SERVICE_CANCELLATION_CONFIRMATION, row, fields, run_id, dry_run)

    def _compose_suspension(self, row: Any, as_of: dt.date, grace_ends_on: dt.date, run_id: int | None,
                            dry_run: bool) -> Composed:
        """The client's Service Suspended for Cancellation: suspended today, cancelled on
        `grace_ends_on` (service_cancellation_date) unless they ask to keep it."""
        common, writing = self._common_fields(SERVICE_SUSPENDED, as_of, row.language, grace_ends_on,
                                              service_status=ServiceStatus.SUSPENDED.value)
        return self._compose_to_client(SERVICE_SUSPENDED, row, request_fields(row, common, writing), run_id, dry_run)

    def _common_fields(self, template: str, as_of: dt.date, language: str | None, cancellation_date: dt.date,
                       **more: Any) -> tuple[dict[str, Any], Writing]:
        """`Composer.common_fields` of a per-request email other than the confirmation
        (`run_fields`), made once per template, day, language and cancellation date."""
        key = (template, as_of, language, cancellation_date)
        if key not in self._common:
            writing = self.composer.writing(template, language)
            self._common[key] = (self.composer.common_fields(as_of, writing.language,
                                                             cancellation_date=cancellation_date, **more), writing)
        return self._common[key]

    def _compose_to_client(self, template: str, row: Any, fields: dict[str, Any], run_id: int | None,
                           dry_run: bool) -> Composed:
        """The request's email `template` to its client; a client without a usable address
        fails the attempt with a line saying so."""
        try:
            return self.composer.compose(
                template, key=email_key(template, "request", row.id), to_address=row.email, fields=fields,
                language=row.language, request_id=row.id, run_id=run_id, dry_run=dry_run)
        except UnsafeEmail as exc:
            if exc.header != "recipient":
                raise
            raise InputError(f"client of service {row.service_id} has no valid email address ({row.email!r})") \
                from None


def subscription_params(params: dict[str, Any], subscription_id: str) -> dict[str, Any]:
    """CancelSubscription's params: the request's, its own idempotency key (a gateway keeps
    its keys per account: not the bare request id another hook may already send it), and
    WHMCS's gateway-module name of the subscription id."""
    return {**params, "idempotency_key": subscription_key(params["request_id"]),
            "subscription_id": subscription_id, "subscriptionID": subscription_id}


def subscription_key(request_id: int) -> str:
    """The same for every attempt of a request, across retries and crashes."""
    return f"cancelproc:cancel-subscription:request:{request_id}"


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
