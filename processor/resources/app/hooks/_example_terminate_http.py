"""Example hook file: deprovision a service through an HTTP API, idempotently.

Copy it to `hooks/terminate_http.py` (without the leading underscore) to enable it,
and set TERMINATE_API_URL (and TERMINATE_API_TOKEN if the API wants one) in the
environment of the cron job. See docs/hooks.md, "TerminateAccount".

TerminateAccount runs at least once per request: if the process dies after this call
but before the run commits, the next run calls it again for the same request. So the
call carries an `Idempotency-Key` header built from `idempotency_key` (the request id):
an API that honours it answers a repeat with the first result instead of acting
twice. A 404 or 410 (the account is already gone) counts as done, for APIs that do not.

Returning {"error": ...} fails this attempt: nothing is changed in the database,
AfterModuleTerminateFailed fires, and the request is retried on a later run.
"""

import json
import os
import urllib.error
import urllib.request

from processor.hooks import add_hook

URL_VARIABLE = "TERMINATE_API_URL"
TOKEN_VARIABLE = "TERMINATE_API_TOKEN"
TIMEOUT_SECONDS = 30
ALREADY_GONE = (404, 410)


@add_hook("TerminateAccount")
def terminate_via_http(idempotency_key, service, client, product):
    """POST the termination to $TERMINATE_API_URL; {"error": ...} on any failure."""
    if not product["module"]:
        return None  # nothing is provisioned for this product: nothing to terminate
    url = os.environ.get(URL_VARIABLE)
    if not url:
        return {"error": f"{URL_VARIABLE} is not set; cannot terminate service {service['id']}"}
    body = json.dumps({
        "module": product["module"],
        "service_id": service["id"],
        "service_external_id": service["external_id"],
        "domain": service["domain"],
        "client_id": client["id"],
    }).encode()
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": f"cancelproc-terminate-{idempotency_key}",
    }
    token = os.environ.get(TOKEN_VARIABLE)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in ALREADY_GONE:
            return None
        return {"error": f"{url} answered HTTP {exc.code} {exc.reason}"}
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        return {"error": f"{url} unreachable: {getattr(exc, 'reason', exc)}"}
    return None
