"""What a run is asked to do and what it comes to: options, one request's outcome, counts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from processor.credits import Credit
from processor.delivery import DeliveryReport
from processor.models import RunStatus, RunTrigger
from processor.outbox import QueuedEmail


class Action(StrEnum):
    CANCEL = "cancel"  # cancel the service, its add-ons and unpaid invoices (or one add-on alone); queue the email
    SUSPEND = "suspend"  # grace period: suspend the service, queue its email; cancelled on grace_ends_on
    NOOP = "no-op"  # the service is already Cancelled or Terminated: complete the request only
    ERROR = "error"  # this attempt failed; retried later, or failed after max_attempts
    VETOED = "vetoed"  # a PreModuleTerminate hook said no; retried like an error
    SKIPPED = "skipped"  # no longer pending when we came to write it (done by someone else)


# The actions that are a failed attempt of the request (retried, or failed for good).
FAILED_ATTEMPT = (Action.ERROR, Action.VETOED)


@dataclass
class RunOptions:
    as_of: dt.date
    trigger: RunTrigger = RunTrigger.MANUAL
    operator: str = ""
    limit: int | None = None
    request_ids: Sequence[int] | None = None  # `requests process`: only these
    ignore_due_date: bool = False  # `requests process --now`: apply before the due date
    digest: bool = True  # send the staff digest (Cron Job Activity) after the run


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
    response: str | None = None  # ERROR: what the failing hook said (WHMCS's failureResponseMessage)
    gave_up: bool = False  # an ERROR or VETOED that used the last attempt: the request is now failed
    service_status: str = ""
    params: dict[str, Any] | None = None  # the hooks' params, when any per-request hook is registered
    email_aborted_by: str | None = None  # the EmailPreSend hook that returned abortsend
    addons: Sequence[dict[str, Any]] = ()  # cancelled with it, for AddonCancelled
    invoices: Sequence[dict[str, Any]] = ()  # cancelled with it, for InvoiceCancelled
    credit: Credit | None = None  # immediate_refund = "credit": the unused part of the paid period
    credit_id: int | None = None  # the credits row, once written (for CreditIssued)
    suspending: bool = False  # the first phase of a grace period (SUSPEND, or its failed attempt)
    grace_ends_on: dt.date | None = None  # SUSPEND: the day the run cancels the service
    addon_id: int | None = None  # a request for this one add-on: the service stays
    noop_reason: str = ""  # NOOP of an add-on request: why there was nothing to cancel


@dataclass
class Tally:
    """Counts of a run, or of one chunk of it (the run record is updated chunk by chunk)."""

    due: int = 0
    completed: int = 0
    suspended: int = 0
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
            elif action is Action.SUSPEND:
                t.suspended += 1
                t.emails_queued += o.email is not None
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

    def share(self) -> dict[str, int]:
        """The counts alone (a share of a run, or its total)."""
        return {f.name: getattr(self, f.name) for f in fields(Tally)}

    def add(self, other: Tally) -> None:
        for f in fields(Tally):
            if f.name != "max_days_late":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.max_days_late = max(self.max_days_late, other.max_days_late)

    @property
    def has_failures(self) -> bool:
        """Some request of it failed, is retrying, was vetoed or was done elsewhere."""
        return bool(self.retrying or self.failed or self.vetoed or self.skipped)


@dataclass
class RunSummary(Tally):
    run_id: int | None = None
    as_of: dt.date | None = None
    status: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)
    # The emails delivered at the end of the run (this run's and older queued ones), the staff
    # digest aside (it reports these counts; see digest_sent). The same counts are in the run
    # record (`runs show`, the metrics) and in the digest.
    emails_sent: int = 0  # sent
    emails_retrying: int = 0  # tried, not sent; queued for a later attempt
    emails_failed: int = 0  # given up (named in the digest)
    emails_still_queued: int = 0  # queued and not tried by this delivery (not due yet, or delivery stopped)
    delivery_error: str | None = None  # why delivery stopped early (the emails stay queued)
    failed_emails: list[dict[str, Any]] = field(default_factory=list)  # given up at the end of the run
    digest_suppressed: bool = False  # a DailyCronJobPreEmail hook asked for no staff digest
    digest_queued: bool = False
    # A run shared between processes (run --workers, run --join): the top-level counts are
    # `counts_are` ("run_total" for the process that owns the run, "this_process" for a joined
    # one); `this_process` is this process's share, `run_total` the run's recorded counts
    # (for a joined process: when it finished, the run may still be going).
    counts_are: str = "run_total"
    this_process: dict[str, int] | None = None
    run_total: dict[str, int] | None = None
    # The reminders before a cancellation takes effect (reminders.py) this run queued (in the
    # outbox with its run_id: `runs show` counts them there), that a hook aborted, that
    # failed (a hook error, a refused address); not in emails_queued, which counts the
    # cancellations' confirmations.
    reminders_queued: int = 0
    reminders_aborted: int = 0
    reminders_failed: int = 0
    digest_sent: bool = False  # the staff digest was delivered after the run
    digest_error: str | None = None  # why the queued digest was not delivered (it stays queued)

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain data (for --json and the hooks)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["failures"] = [dict(f) for f in self.failures]
        data["failed_emails"] = [dict(e) for e in self.failed_emails]
        return data

    @property
    def exit_code(self) -> int:
        """0 all done; 1 some requests failed or were vetoed (they stay pending, or failed for
        good), or some emails (or the staff digest) could not be delivered, or the run was
        stopped before the end."""
        return 1 if (self.status == RunStatus.STOPPED or self.retrying or self.failed or self.vetoed
                     or self.emails_retrying or self.emails_failed or self.delivery_error
                     or self.digest_error) else 0

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
        if not (tally.retrying or tally.failed or tally.vetoed):
            return  # every ERROR or VETOED outcome is counted in one of these
        self.failures.extend(
            {"request_id": o.request_id, "service_id": o.service_id, "error": o.error, "gave_up": o.gave_up,
             "vetoed": o.action is Action.VETOED}
            for o in outcomes if o.action in FAILED_ATTEMPT
        )
