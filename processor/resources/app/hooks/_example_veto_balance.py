"""Example hook file: do not cancel a service while its client still owes money.

Copy it to `hooks/veto_balance.py` (without the leading underscore) to enable it;
files starting with `_` are never loaded. See docs/hooks.md, "PreModuleTerminate".

A veto keeps the request pending: it is tried again on later runs (with the retry
backoff) until the balance is settled, and becomes failed after `max_attempts`
vetoed attempts, for staff to resolve by hand. The veto, with this file's name and
line and the reason, is in the request's audit trail and the run summary. It also
shows in `cancelproc run --dry-run`, since PreModuleTerminate runs in a preview too.
"""

from decimal import Decimal

from processor.hooks import add_hook

# Balances up to this amount do not block a cancellation (rounding, small credits).
TOLERANCE = Decimal("0.00")


@add_hook("PreModuleTerminate", priority=10)
def veto_outstanding_balance(client, service):
    """Veto while the client's balance is above the tolerance; otherwise say nothing."""
    balance = client["balance"] or Decimal(0)
    if balance > TOLERANCE:
        return {
            "abortcmd": True,
            "reason": f"client {client['id']} ({client['email']}) has an outstanding balance of {balance}; "
                      f"service {service['id']} stays {service['status']} until it is paid",
        }
    return None
