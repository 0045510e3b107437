"""Every hook point, declared once: its parameters, when it fires, what its return does.

A hook function names the parameters it wants (any subset, or **kwargs for all); asking
for one its point does not give is an error when the hook file loads. Every point also
gives `params` (or by WHMCS's usual name, `vars`): all of its parameters in one dict, as
WHMCS passes `$vars`. Beside ours, each point gives WHMCS's parameter names for it
(`HookPoint.whmcs`); at the module points `params["params"]` is WHMCS's module parameters.

What a hook's return value does is the point's `Policy`, applied in one place
(`HookRegistry.apply`); no caller reads return values itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Policy(enum.StrEnum):
    """What a hook's return value does at its point."""

    # Ignored. The point fires after the fact: an exception is logged and undoes nothing.
    NOTHING = "nothing"
    # {'abortcmd': True, 'reason': ...} vetoes: the hooks after it are not called and the
    # request stays pending. Any other dict merges its keys into `params` for the hooks after it.
    VETO = "veto"
    # {'error': ...}, an error string as WHMCS modules answer (anything but "success"), or
    # False fails the attempt; so does raising. None, True, "success" or a dict without
    # 'error' succeed.
    FAIL = "fail"
    # {'abortsend': True} stops the email (recorded, not an error). Any other dict merges its
    # keys into the email's merge fields (`fields`).
    ABORT_SEND = "abortsend"
    # Truthy suppresses what the point precedes (the staff digest). An exception is logged.
    SUPPRESS = "suppress"


# Where a hook's exception goes: the policies that decide a request fail it (fail closed),
# the others fire after the fact and only log it.
FAILS_THE_ATTEMPT = frozenset({Policy.VETO, Policy.FAIL, Policy.ABORT_SEND})


@dataclass(frozen=True)
class HookPoint:
    name: str
    params: tuple[str, ...]
    when: str
    returns: str  # the policy in words, for `hooks list` and docs/hooks.md
    policy: Policy = Policy.NOTHING
    whmcs: tuple[str, ...] = ()  # the parameters named as WHMCS names them (also in `params`)

    @property
    def fails_the_attempt(self) -> bool:
        """True: runs before anything is written for the request, and an exception (or
        error) fails the attempt. False: runs after the fact; an exception is logged."""
        return self.policy in FAILS_THE_ATTEMPT


# WHMCS's module parameters, `params["params"]` at the module points (params.module_params
# builds them). A dict a PreModuleTerminate hook returns may give new values for them.
MODULE_PARAMS = ("serviceid", "accountid", "userid", "pid", "packageid", "domain", "username", "producttype",
                 "moduletype", "clientsdetails")
# The points where WHMCS passes the module parameters as $vars['params'].
MODULE_POINTS = ("PreModuleTerminate", "TerminateAccount", "AfterModuleTerminate", "AfterModuleTerminateFailed",
                 "PreModuleSuspend", "SuspendAccount", "AfterModuleSuspend", "AfterModuleSuspendFailed",
                 "UnsuspendAccount")
# WHMCS's name of the one automation task a run is (PreAutomationTask / PostAutomationTask).
CANCELLATION_TASK = "CancellationRequests"

# What the suspension points of a grace period give besides REQUEST: the product's grace
# days, the date the run will cancel the service, and WHMCS's `suspendreason` (a module's
# SuspendAccount reads $params['suspendreason']).
SUSPENSION = ("grace_days", "grace_ends_on", "suspendreason")

# What every per-request point gives. `idempotency_key` is the request id as a string:
# TerminateAccount may run more than once for one request (at least once, see docs/hooks.md).
REQUEST = ("params", "request_id", "idempotency_key", "request", "service", "client", "product", "addon",
           "run_id", "as_of", "dry_run")

POINTS: dict[str, HookPoint] = {p.name: p for p in (
    HookPoint("CancellationRequest",
              ("params", "request_id", "idempotency_key", "request", "service", "client", "product", "addon",
               "actor", "userid", "relid", "reason", "type"),
              "a request was created (`requests create`), after it is committed",
              "ignored", whmcs=("userid", "relid", "reason", "type")),
    HookPoint("CancellationRequestWithdrawn",
              ("params", "request_id", "idempotency_key", "request", "service", "client", "product", "addon",
               "actor", "note"),
              "a request was withdrawn (`requests withdraw`), after it is committed",
              "ignored"),
    HookPoint("PreCronJob",
              ("params", "run_id", "as_of", "trigger", "operator"),
              "a run has taken the lease, before the first request",
              "ignored"),
    HookPoint("PreAutomationTask",
              ("params", "task", "run_id", "as_of"),
              "once per run, after PreCronJob, before the first request (task 'CancellationRequests')",
              "ignored", whmcs=("task",)),
    HookPoint("PreModuleTerminate", REQUEST,
              "before a due request is applied (also in --dry-run, so vetoes show in the preview)",
              "{'abortcmd': True, 'reason': ...} vetoes: the request stays pending and is retried; "
              "any other dict merges its keys into `params` for the hooks after it (WHMCS's module parameter "
              "names also into `params['params']`)",
              Policy.VETO, whmcs=("params",)),
    HookPoint("EmailPreSend",
              ("params", "template", "to_address", "fields", "language", "request_id", "run_id", "dry_run",
               "messagename", "relid", "mergefields"),
              "before any email is rendered and queued: the client's confirmations, the staff notice of a new "
              "request, the staff digest (`template` says which)",
              "a dict: its keys become merge fields; {'abortsend': True} queues no email (recorded)",
              Policy.ABORT_SEND, whmcs=("messagename", "relid", "mergefields")),
    HookPoint("CancellationReminder",
              (*REQUEST, "fields", "days", "days_left", "cancellation_date"),
              "a run is about to queue a reminder (email cancellation_reminder) for a pending request that "
              "takes effect `days_left` days after `as_of` (`days`: the reminder_days entry it is for); also "
              "in --dry-run; before EmailPreSend",
              "a dict: its keys become merge fields; {'abortsend': True} queues no reminder tonight (logged; "
              "asked again at the next run while this reminder is the latest due)",
              Policy.ABORT_SEND),
    HookPoint("TerminateAccount", REQUEST,
              "the external deprovisioning, after PreModuleTerminate; never in --dry-run",
              "{'error': ...}, an error string as a WHMCS module returns (anything but 'success'), False, "
              "or raising fails the attempt: nothing is changed, AfterModuleTerminateFailed fires, the "
              "request is retried with backoff",
              Policy.FAIL, whmcs=("params",)),
    HookPoint("CancelSubscription", (*REQUEST, "subscription_id", "subscriptionID"),
              "stop the payment gateway's recurring billing of a service that has a `subscription_id`, after "
              "TerminateAccount, before the cancellation is written; never in --dry-run. `idempotency_key` is "
              "'cancelproc:cancel-subscription:request:<id>' here, the same on every attempt",
              "{'error': ...}, WHMCS's gateway answer {'status': 'error', ...}, an error string, False, or "
              "raising fails the attempt as TerminateAccount does (nothing is changed, retried with backoff)",
              Policy.FAIL, whmcs=("subscriptionID",)),
    HookPoint("AfterModuleTerminate", REQUEST,
              "the cancellation was committed (service and request dicts show the committed state)",
              "ignored", whmcs=("params",)),
    HookPoint("AfterModuleTerminateFailed", (*REQUEST, "error", "failureResponseMessage"),
              "an attempt to apply the request failed, after it is recorded: a PreModuleTerminate, EmailPreSend "
              "or TerminateAccount hook raised or returned an error, or the request's data was refused "
              "(not for a veto)",
              "ignored", whmcs=("params", "failureResponseMessage")),
    HookPoint("AddonCancelled", (*REQUEST, "addon_id", "id", "userid", "serviceid", "addonid"),
              "an add-on was cancelled, after the commit: with its service (a service request), or alone (a "
              "request for that add-on; `addon` is the add-on either way)",
              "ignored", whmcs=("id", "userid", "serviceid", "addonid")),
    HookPoint("InvoiceCancelled", (*REQUEST, "invoice_id", "invoice", "invoiceid"),
              "an unpaid invoice of a cancelled service was cancelled, after the commit",
              "ignored", whmcs=("invoiceid",)),
    HookPoint("ServiceCancelled", (*REQUEST, "days_late"),
              "after the cancellation is committed (after AfterModuleTerminate and the add-on and invoice hooks)",
              "ignored"),
    HookPoint("CreditIssued", (*REQUEST, "credit_id", "credit", "amount"),
              "a credit for the unused part of a paid period was committed with the cancellation "
              "(immediate_refund = 'credit'), after ServiceCancelled: book it in the billing system. "
              "`idempotency_key` is 'cancelproc:credit:request:<id>' here",
              "ignored"),
    HookPoint("PreModuleSuspend", (*REQUEST, *SUSPENSION),
              "before a due request of a product with grace_days suspends its service (also in --dry-run)",
              "as PreModuleTerminate: {'abortcmd': True, 'reason': ...} vetoes (the request stays pending and is "
              "retried); any other dict merges its keys into `params` for the hooks after it",
              Policy.VETO, whmcs=("params", "suspendreason")),
    HookPoint("SuspendAccount", (*REQUEST, *SUSPENSION),
              "the external suspension, after PreModuleSuspend and the email; never in --dry-run",
              "as TerminateAccount: an error fails the attempt (nothing is changed, AfterModuleSuspendFailed "
              "fires, the request is retried with backoff)",
              Policy.FAIL, whmcs=("params", "suspendreason")),
    HookPoint("AfterModuleSuspend", (*REQUEST, *SUSPENSION),
              "the suspension was committed (the service Suspended, the request pending in its grace period)",
              "ignored", whmcs=("params", "suspendreason")),
    HookPoint("AfterModuleSuspendFailed", (*REQUEST, *SUSPENSION, "error", "failureResponseMessage"),
              "an attempt to suspend failed, after it is recorded (as AfterModuleTerminateFailed)",
              "ignored", whmcs=("params", "suspendreason", "failureResponseMessage")),
    HookPoint("UnsuspendAccount", (*REQUEST, "actor", "note"),
              "a request in its grace period is being withdrawn (`requests withdraw`): the external "
              "unsuspension, before the withdrawal is committed",
              "an error (as TerminateAccount) or raising: the request is not withdrawn, the service stays "
              "suspended, `requests withdraw` exits 2 saying why",
              Policy.FAIL, whmcs=("params",)),
    HookPoint("PostAutomationTask",
              ("params", "task", "completed", "run_id"),
              "once per run, after its last request (task 'CancellationRequests'; completed False when the run "
              "stopped or failed), before the emails are sent",
              "ignored", whmcs=("task", "completed")),
    HookPoint("AfterCronJob",
              ("params", "run_id", "summary"),
              "a run ended, with its summary (also when it stopped on an error: status 'error')",
              "ignored"),
    HookPoint("DailyCronJob",
              ("params", "run_id", "as_of"),
              "once per run that went through (not `requests process`), at its very end: after AfterCronJob, "
              "before DailyCronJobPreEmail",
              "ignored"),
    HookPoint("DailyCronJobPreEmail",
              ("params", "run_id", "summary"),
              "after DailyCronJob, before the staff digest would be sent",
              "truthy: suppress the digest",
              Policy.SUPPRESS),
)}
