"""Every hook point, declared once: its parameters, what a return value means, when it fires.

A hook function names the parameters it wants (any subset, or **kwargs for all); asking
for one its point does not give is an error when the hook file loads. Every point also
gives `params`: all of its parameters in one dict, as WHMCS passes `$params`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HookPoint:
    name: str
    params: tuple[str, ...]
    when: str
    returns: str
    # True: runs before anything is written for the request, and its failure fails the
    # attempt (fail closed). False: runs after the fact; an exception is logged, never undoes.
    can_fail_request: bool = False


# What every per-request point gives. `idempotency_key` is the request id as a string:
# TerminateAccount may run more than once for one request (at least once, see docs/hooks.md).
REQUEST = ("params", "request_id", "idempotency_key", "request", "service", "client", "product",
           "run_id", "as_of", "dry_run")

POINTS: dict[str, HookPoint] = {p.name: p for p in (
    HookPoint("CancellationRequest",
              ("params", "request_id", "idempotency_key", "request", "service", "client", "product", "actor"),
              "a request was created (`requests create`), after it is committed",
              "ignored"),
    HookPoint("CancellationRequestWithdrawn",
              ("params", "request_id", "idempotency_key", "request", "service", "client", "product", "actor",
               "note"),
              "a request was withdrawn (`requests withdraw`), after it is committed",
              "ignored"),
    HookPoint("PreCronJob",
              ("params", "run_id", "as_of", "trigger", "operator"),
              "a run has taken the lease, before the first request",
              "ignored"),
    HookPoint("PreModuleTerminate", REQUEST,
              "before a due request is applied (also in --dry-run, so vetoes show in the preview)",
              "{'abortcmd': True, 'reason': ...} vetoes: the request stays pending and is retried; "
              "any other dict merges its keys into `params` for the hooks after it",
              can_fail_request=True),
    HookPoint("EmailPreSend",
              ("params", "template", "to_address", "fields", "language", "request_id", "run_id", "dry_run"),
              "before any email is rendered and queued: the client's confirmations, the staff notice of a new "
              "request, the staff digest (`template` says which)",
              "a dict: its keys become merge fields; {'abortsend': True} queues no email (recorded)",
              can_fail_request=True),
    HookPoint("TerminateAccount", REQUEST,
              "the external deprovisioning, after PreModuleTerminate; never in --dry-run",
              "{'error': ...} (or raising) fails the attempt: nothing is changed, "
              "AfterModuleTerminateFailed fires, the request is retried with backoff",
              can_fail_request=True),
    HookPoint("AfterModuleTerminate", REQUEST,
              "the cancellation was committed (service and request dicts show the committed state)",
              "ignored"),
    HookPoint("AfterModuleTerminateFailed", (*REQUEST, "error"),
              "an attempt to apply the request failed, after it is recorded: a PreModuleTerminate, EmailPreSend "
              "or TerminateAccount hook raised or returned an error, or the request's data was refused "
              "(not for a veto)",
              "ignored"),
    HookPoint("AddonCancelled", (*REQUEST, "addon_id", "addon"),
              "an add-on of a cancelled service was cancelled, after the commit",
              "ignored"),
    HookPoint("InvoiceCancelled", (*REQUEST, "invoice_id", "invoice"),
              "an unpaid invoice of a cancelled service was cancelled, after the commit",
              "ignored"),
    HookPoint("ServiceCancelled", (*REQUEST, "days_late"),
              "after the cancellation is committed (after AfterModuleTerminate and the add-on and invoice hooks)",
              "ignored"),
    HookPoint("AfterCronJob",
              ("params", "run_id", "summary"),
              "a run ended, with its summary (also when it stopped on an error: status 'error')",
              "ignored"),
    HookPoint("DailyCronJobPreEmail",
              ("params", "run_id", "summary"),
              "after AfterCronJob, before the staff digest would be sent",
              "truthy: suppress the digest"),
)}
