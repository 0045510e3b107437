"""Example hook file: tell another system that a service was cancelled.

Copy it to `hooks/notify.py` (without the leading underscore) to enable it. It
appends one JSON line per cancelled service to the file named by CANCELLATIONS_JSONL
(default: cancellations.jsonl in the working directory), for a CRM import or a log
shipper to pick up. See docs/hooks.md, "ServiceCancelled".

ServiceCancelled fires after the cancellation is committed: if this hook fails, the
error is logged and the cancellation stands. It is not retried either, so a notifier
that must not miss one should write somewhere durable (as here) and let another
process deliver from there.
"""

import json
import os
from pathlib import Path

from processor.hooks import add_hook

FILE_VARIABLE = "CANCELLATIONS_JSONL"


@add_hook("ServiceCancelled")
def append_cancellation(request, service, client, product, run_id, as_of, days_late):
    """One JSON line per cancelled service."""
    line = json.dumps({
        "event": "service_cancelled",
        "run_id": run_id,
        "as_of": as_of.isoformat(),
        "request_id": request["id"],
        "reason_code": request["reason_code"],
        "service_id": service["id"],
        "service_external_id": service["external_id"],
        "domain": service["domain"],
        "product": product["name"],
        "client_email": client["email"],
        "days_late": days_late,
    })
    path = Path(os.environ.get(FILE_VARIABLE, "cancellations.jsonl"))
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
