"""Example hook file: stop a service's Stripe subscription when the service is cancelled.

Copy it to `hooks/cancel_subscription.py` (without the leading underscore) to enable it,
and set STRIPE_API_KEY (a secret or restricted key allowed to write subscriptions) in
the environment of the cron job. See docs/hooks.md, "CancelSubscription".

CancelSubscription is called for each service being cancelled that has a
`subscription_id` (import column `subscription_id`, WHMCS's tblhosting.subscriptionid),
after TerminateAccount and before the cancellation is written. It runs at least once:
if the process dies after this call but before the run commits, the next run calls it
again. So the call carries Stripe's `Idempotency-Key` header, `idempotency_key`
(`cancelproc:cancel-subscription:request:<id>`, the same on every attempt): Stripe
answers a repeat with the first answer instead of acting twice. A 404 (no such
subscription: already gone) counts as done.

cancelproc does not know which gateway a service pays through: this file acts only on
Stripe's ids (`sub_...`) and leaves other ids to other hooks. Only the standard library
is used (urllib), so nothing needs installing.

Returning {"error": ...} fails this attempt: nothing is changed in the database,
AfterModuleTerminateFailed fires, and the request is retried on a later run.
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from processor.hooks import add_hook

KEY_VARIABLE = "STRIPE_API_KEY"
# Stripe's API; STRIPE_API_BASE points elsewhere for a test server (stripe-mock, say).
BASE_VARIABLE = "STRIPE_API_BASE"
DEFAULT_BASE = "https://api.stripe.com"
TIMEOUT_SECONDS = 30
ALREADY_GONE = (404,)


@add_hook("CancelSubscription")
def cancel_stripe_subscription(subscription_id, idempotency_key, service):
    """DELETE /v1/subscriptions/{id} (cancel now, no proration); {"error": ...} on any failure."""
    if not subscription_id.startswith("sub_"):
        return None  # not a Stripe subscription: another hook's
    key = os.environ.get(KEY_VARIABLE)
    if not key:
        return {"error": f"{KEY_VARIABLE} is not set; cannot cancel subscription {subscription_id} "
                         f"of service {service['id']}"}
    base = os.environ.get(BASE_VARIABLE, DEFAULT_BASE).rstrip("/")
    url = f"{base}/v1/subscriptions/{urllib.parse.quote(subscription_id, safe='')}"
    request = urllib.request.Request(url, method="DELETE", headers={
        "Authorization": f"Bearer {key}",
        "Idempotency-Key": idempotency_key,
    })
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in ALREADY_GONE:
            return None
        return {"error": f"Stripe answered HTTP {exc.code} for {subscription_id}: {_message(exc)}"}
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        return {"error": f"{base} unreachable: {getattr(exc, 'reason', exc)}"}
    if answer.get("status") != "canceled":
        return {"error": f"Stripe did not cancel {subscription_id}: status {answer.get('status')!r}"}
    return None


def _message(exc: urllib.error.HTTPError) -> str:
    """Stripe's error message ({"error": {"message": ...}}), or the HTTP reason."""
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
