"""What the code sees of one request: one query shape, and the params the hooks get.

The run reads due requests with `request_select()`; the staff commands read one request
the same way, so a hook sees the same `request`, `service`, `client` and `product` dicts
whether it fires in a run or at the CLI.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import Row, Select, String, select, type_coerce

from processor.models import CancellationRequest as R
from processor.models import Client as C
from processor.models import Product as P
from processor.models import Service as S
from processor.models import ServiceAddon as A

# What the run needs for every request (the due rule, the email), then what only hooks read.
_RUN_COLUMNS = (
    R.id, R.type, R.cancel_on, R.reason, R.reason_code, R.created_at, R.attempts,
    S.id.label("service_id"), S.status.label("service_status"), S.domain, S.next_due_date, S.billing_cycle,
    C.first_name, C.last_name, C.email, C.language, P.name.label("product_name"),
    # The WHMCS merge fields beside ours (client_id, client_company_name, service_recurring_amount, ...).
    C.id.label("client_id"), C.company_name, S.amount, S.registration_date,
    R.effective_date,  # the day it takes effect (stored: the due rule, the dates of the emails)
    # Grace period: the end of the request's (None: not suspended); the product's settings by its id.
    R.grace_ends_on, P.external_id.label("product_external_id"),
    R.addon_id,  # a request for one add-on; None for a service request
)
_HOOK_COLUMNS = (
    # Hooks get the status as its plain string: read as stored, no enum made per row to be undone.
    R.external_id.label("request_external_id"), type_coerce(R.status, String).label("request_status"),
    S.external_id.label("service_external_id"), S.subscription_id,
    C.external_id.label("client_external_id"), C.balance,
    P.id.label("product_id"), P.module,
)
# The add-on a request for one add-on names, last: the run reads them apart (`addon_select`),
# for the few rows that have one, instead of an outer join costing every row.
_ADDON_COLUMNS = (
    A.name.label("addon_name"), type_coerce(A.status, String).label("addon_status"),
    A.next_due_date.label("addon_next_due_date"), A.amount.label("addon_amount"),
    A.external_id.label("addon_external_id"),
)


def _names(*columns: Any) -> tuple[str, ...]:
    return tuple(str(c.key) for c in select(*columns).selected_columns)


def _row_type(*columns: Any) -> Any:
    # The add-on's fields default to None: a row read without them is one with no add-on yet.
    return namedtuple("RequestRow", _names(*columns), defaults=(None,) * len(_ADDON_COLUMNS))


_RUN_ROW = _row_type(*_RUN_COLUMNS, *_ADDON_COLUMNS)
_HOOKED_ROW = _row_type(*_RUN_COLUMNS, *_HOOK_COLUMNS, *_ADDON_COLUMNS)
ADDON_FIELDS = _names(*_ADDON_COLUMNS)


def plain_rows(rows: Iterable[Row[Any]], for_hooks: bool) -> list[Any]:
    """`request_select(addons=False)` rows as named tuples, same names, the add-on's fields
    None (`with_addons` fills them in). For the run's hot path: reading a field of a
    SQLAlchemy Row by name costs about 0.2 µs, of a named tuple next to nothing, and a
    request's fields are read some thirty times."""
    make = _HOOKED_ROW if for_hooks else _RUN_ROW
    return [make(*row) for row in rows]


def addon_select() -> Select:
    """The add-on columns of `request_select`, by add-on id (`with_addons`)."""
    query: Select = select(A.id, *_ADDON_COLUMNS)
    return query


def with_addons(rows: list[Any], addons: Mapping[int, Any]) -> list[Any]:
    """`plain_rows` with the fields of the add-on each request for one add-on names
    (`addons`: `addon_select` rows by id); a row whose add-on is gone keeps None."""
    return [row if row.addon_id is None or row.addon_id not in addons
            else row._replace(**dict(zip(ADDON_FIELDS, addons[row.addon_id][1:], strict=True)))
            for row in rows]


def request_select(for_hooks: bool = True, addons: bool = True) -> Select:
    """Requests joined to their service, client and product, and (with `addons`) the add-on
    a request for one add-on names (an outer join: none for a service request), one flat
    row each. Without `for_hooks`, only the columns the run itself needs (reading is per
    request); the run reads without `addons` too, and the add-ons apart (`with_addons`)."""
    # A bare Select: its type parameters differ between SQLAlchemy 2.0 and 2.1.
    query: Select = (
        select(*_RUN_COLUMNS, *(_HOOK_COLUMNS if for_hooks else ()), *(_ADDON_COLUMNS if addons else ()))
        .select_from(R)
        .join(S, S.id == R.service_id)
        .join(C, C.id == S.client_id)
        .join(P, P.id == S.product_id)
    )
    return query.outerjoin(A, A.id == R.addon_id) if addons else query


def request_params(row: Any, **more: Any) -> dict[str, Any]:
    """The params of a per-request hook (docs/hooks.md); `more` adds the point's own."""
    # One tuple unpack instead of 28 attribute lookups: this runs for every request. An
    # enum's `_value_` is a plain attribute; `.value` is a property, five times the cost.
    (request_id, type_, cancel_on, reason, reason_code, created_at, attempts, service_id, service_status, domain,
     next_due_date, billing_cycle, first_name, last_name, email, language, product_name,
     client_id, company_name, amount, _registration_date, effective_date, grace_ends_on, product_external_id,
     addon_id, request_external_id, request_status, service_external_id, subscription_id,
     client_external_id, balance, product_id, module,
     addon_name, addon_status, addon_next_due_date, addon_amount, addon_external_id) = row
    return {
        "request_id": request_id,
        "idempotency_key": str(request_id),
        "request": {"id": request_id, "external_id": request_external_id, "type": type_._value_,
                    "status": request_status, "reason_code": reason_code, "reason": reason,
                    "cancel_on": cancel_on, "effective_date": effective_date, "created_at": created_at,
                    "attempts": attempts, "grace_ends_on": grace_ends_on},
        "service": {"id": service_id, "external_id": service_external_id, "domain": domain,
                    "status": service_status._value_, "billing_cycle": billing_cycle, "amount": amount,
                    "next_due_date": next_due_date, "subscription_id": subscription_id},
        "client": {"id": client_id, "external_id": client_external_id, "first_name": first_name,
                   "last_name": last_name, "company_name": company_name, "email": email, "language": language,
                   "balance": balance},
        "product": {"id": product_id, "external_id": product_external_id, "name": product_name, "module": module},
        # A request for one add-on: that add-on (the service stays); None for a service request.
        "addon": None if addon_id is None else {
            "id": addon_id, "external_id": addon_external_id, "name": addon_name, "status": addon_status,
            "amount": addon_amount, "next_due_date": addon_next_due_date},
        **more,
    }


# --- WHMCS's names -------------------------------------------------------------------------
# Beside our own parameters every point gives WHMCS's names for that point (docs/hooks.md,
# "Coming from WHMCS"), so a hook file ported from WHMCS reads what it read there. The ids
# are cancelproc's, as WHMCS's are WHMCS's; after `import` the billing system's id of each
# record is its `external_id` in our dicts.

class ModuleParams(Mapping[str, Any]):
    """WHMCS's module parameters of a request's service ($vars['params'] at the module
    points; the names are `hooks.points.MODULE_PARAMS`), built on first read.

    Every request at the module points gets one (shared by all its points, so a
    PreModuleTerminate override reaches TerminateAccount and the points after the commit),
    but most hooks never read it: building the dicts only when one does keeps the run's
    per-request cost at one small object.
    """

    __slots__ = ("_data", "_row")

    def __init__(self, row: Any) -> None:
        self._row = row
        self._data: dict[str, Any] | None = None

    def _built(self) -> dict[str, Any]:
        if self._data is None:
            self._data = module_params(self._row)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._built()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __repr__(self) -> str:
        return repr(self._built())

    def override(self, values: Mapping[str, Any]) -> None:
        """New values from a PreModuleTerminate hook, for the hooks after it."""
        self._built().update(values)


def module_params(row: Any) -> dict[str, Any]:
    """WHMCS's module parameters (developers.whmcs.com/provisioning-modules/module-parameters)
    from a `request_select` row: what cancelproc has of them. No password, server or
    configurable options: cancelproc keeps none."""
    return {
        "serviceid": row.service_id, "accountid": row.service_id, "userid": row.client_id,
        "pid": row.product_id, "packageid": row.product_id, "domain": row.domain,
        # cancelproc keeps no hosting username: "" (as WHMCS for a service without one);
        # a PreModuleTerminate hook may return the real one.
        "username": "",
        "producttype": "other",  # cancelproc has no product types: WHMCS's catch-all
        "moduletype": row.module or "",
        "clientsdetails": {
            "userid": row.client_id, "id": row.client_id, "client_id": row.client_id,
            "firstname": row.first_name, "lastname": row.last_name,
            "fullname": f"{row.first_name} {row.last_name}".strip(), "companyname": row.company_name,
            "email": row.email, "language": row.language,
        },
    }


def cancellation_request_names(params: Mapping[str, Any]) -> dict[str, Any]:
    """WHMCS's CancellationRequest parameters, from ours."""
    request = params["request"]
    return {"userid": params["client"]["id"], "relid": params["service"]["id"], "reason": request["reason"],
            "type": request["type"]}


def with_params(params: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A point's params: `params` plus its own keys. (A hook asking for `params` gets this
    whole dict, WHMCS's $params; the registry hands it over.)"""
    return {**params, **more}


__all__ = ["ModuleParams", "addon_select", "cancellation_request_names", "module_params", "plain_rows",
           "request_params", "request_select", "with_addons", "with_params"]
