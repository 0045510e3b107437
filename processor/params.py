"""What the code sees of one request: one query shape, and the params the hooks get.

The run reads due requests with `request_select()`; the staff commands read one request
the same way, so a hook sees the same `request`, `service`, `client` and `product` dicts
whether it fires in a run or at the CLI.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, Select, select

from processor.models import CancellationRequest as R
from processor.models import Client as C
from processor.models import Product as P
from processor.models import Service as S


def request_select() -> Select[Any]:
    """Requests joined to their service, client and product, one flat row each."""
    return (
        select(
            R.id, R.type, R.cancel_on, R.reason, R.reason_code, R.created_at, R.attempts,
            R.external_id.label("request_external_id"), R.status.label("request_status"),
            S.id.label("service_id"), S.status.label("service_status"), S.domain, S.next_due_date,
            S.billing_cycle, S.amount, S.external_id.label("service_external_id"),
            C.id.label("client_id"), C.external_id.label("client_external_id"), C.first_name, C.last_name,
            C.email, C.company_name, C.language, C.balance,
            P.id.label("product_id"), P.name.label("product_name"), P.module,
        )
        .select_from(R)
        .join(S, S.id == R.service_id)
        .join(C, C.id == S.client_id)
        .join(P, P.id == S.product_id)
    )


def request_params(row: Row[Any], **more: Any) -> dict[str, Any]:
    """The params of a per-request hook (docs/hooks.md); `more` adds the point's own."""
    return with_params({
        "request_id": row.id,
        "idempotency_key": str(row.id),
        "request": {"id": row.id, "external_id": row.request_external_id, "type": row.type.value,
                    "status": row.request_status.value, "reason_code": row.reason_code, "reason": row.reason,
                    "cancel_on": row.cancel_on, "created_at": row.created_at, "attempts": row.attempts},
        "service": {"id": row.service_id, "external_id": row.service_external_id, "domain": row.domain,
                    "status": row.service_status.value, "billing_cycle": row.billing_cycle,
                    "amount": row.amount, "next_due_date": row.next_due_date},
        "client": {"id": row.client_id, "external_id": row.client_external_id, "first_name": row.first_name,
                   "last_name": row.last_name, "company_name": row.company_name, "email": row.email,
                   "language": row.language, "balance": row.balance},
        "product": {"id": row.product_id, "name": row.product_name, "module": row.module},
    }, **more)


def with_params(params: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A point's params: `params` plus its own keys. (A hook asking for `params` gets this
    whole dict, WHMCS's $params; the registry hands it over.)"""
    return {**params, **more}


__all__ = ["request_params", "request_select", "with_params"]
