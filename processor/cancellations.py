"""What support staff do with cancellation requests: create, withdraw, retry, resolve,
process at once; and the hooks these actions fire.

Functions take a session and never commit: the caller owns the transaction. The hook
functions run after the caller's commit, each in its own read transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import select, text
from sqlalchemy.orm import Session, joinedload

from processor.db import Database
from processor.due import request_due_on, request_is_due
from processor.errors import FieldError, InputError, NotDue, NotFound, StateError
from processor.hooks import HookRegistry
from processor.models import (
    CLOSED_SERVICE_STATUSES,
    OPEN_ADDON_REQUEST,
    OPEN_REQUEST_STATUSES,
    AuditAction,
    AuditEntity,
    AuditEntry,
    CancellationRequest,
    RequestStatus,
    RequestType,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.params import ModuleParams, cancellation_request_names, request_params, request_select
from processor.terms import Effective, TermsOf, addon_effective_on, effective_on, no_terms


def get_service(session: Session, service_id: int) -> Service:
    service = session.get(Service, service_id, options=[joinedload(Service.client), joinedload(Service.product)])
    if service is None:
        raise NotFound(f"service {service_id} not found")
    return service


def get_request(session: Session, request_id: int) -> CancellationRequest:
    request = session.get(CancellationRequest, request_id, options=[joinedload(CancellationRequest.service)])
    if request is None:
        raise NotFound(f"request {request_id} not found")
    return request


def lock_request(session: Session, request_id: int) -> CancellationRequest:
    """The request, locked for this transaction (SELECT ... FOR UPDATE). On PostgreSQL a run
    may hold the row while it applies the request: we wait for its chunk to commit, then
    decide on what it did, never on what we read before (a lost update). On SQLite the
    write transaction is exclusive already."""
    request = session.scalars(select(CancellationRequest).where(CancellationRequest.id == request_id)
                              .with_for_update().execution_options(populate_existing=True)).one_or_none()
    if request is None:
        raise NotFound(f"request {request_id} not found")
    return request


def open_request_for(session: Session, service_id: int) -> CancellationRequest | None:
    """The service's open request for the whole service (not one for an add-on of it)."""
    r = CancellationRequest
    return session.scalars(
        select(r).where(r.service_id == service_id, r.addon_id.is_(None), r.status.in_(OPEN_REQUEST_STATUSES))
    ).one_or_none()


def open_addon_request_for(session: Session, addon_id: int) -> CancellationRequest | None:
    """The add-on's open request, found through the partial unique index of open add-on
    requests: its condition written out as the index has it (bound values would not match
    it, and SQLite would walk every pending request instead)."""
    r = CancellationRequest
    return session.scalars(select(r).where(r.addon_id == addon_id, text(OPEN_ADDON_REQUEST))).one_or_none()


def _check_addon(session: Session, service: Service, addon_id: int) -> ServiceAddon:
    """An add-on request's add-on: of this service, not closed, with no open request of its
    own, and the service has no open request (which cancels its add-ons too)."""
    addon = session.get(ServiceAddon, addon_id)
    if addon is None:
        raise NotFound(f"add-on {addon_id} not found")
    if addon.service_id != service.id:
        raise FieldError("addon_id", f"add-on {addon_id} belongs to service {addon.service_id}, not {service.id}")
    if addon.status in CLOSED_SERVICE_STATUSES:
        raise StateError(f"add-on {addon_id} is already {addon.status.value}")
    existing = open_addon_request_for(session, addon_id)
    if existing is not None:
        raise StateError(f"add-on {addon_id} already has open request {existing.id} ({existing.status.value})")
    existing = open_request_for(session, service.id)
    if existing is not None:
        raise StateError(f"service {service.id} already has open request {existing.id} ({existing.status.value}), "
                         f"which cancels add-on {addon_id} with the service")
    return addon


def _audit(session: Session, request: CancellationRequest, action: AuditAction, actor: str, now: dt.datetime,
           detail: str = "") -> None:
    session.add(AuditEntry(at=now, actor=actor, request_id=request.id, entity=AuditEntity.REQUEST,
                           entity_id=request.id, action=action, detail=detail))


def create_request(
    session: Session,
    *,
    service_id: int,
    type_: RequestType,
    reason_code: str,
    reason: str,
    allowed_reasons: Sequence[str],
    cancel_on: dt.date | None,
    actor: str,
    now: dt.datetime,
    today: dt.date,
    terms_of: TermsOf = no_terms,
    addon_id: int | None = None,
) -> CancellationRequest:
    """Record a new pending request; one open request per service, and one per add-on. Its
    effective date is computed here, once, with its product's notice period and minimum
    term (`terms_of`). With `addon_id`, the request cancels that add-on of the service
    alone, at its own date (`terms.addon_effective_on`). A service request may be made while
    requests for its add-ons are open: when it is applied it cancels them too and closes
    their requests."""
    if reason_code not in allowed_reasons:
        raise FieldError("reason_code",
                         f"{reason_code!r} is not a configured reason (allowed: {', '.join(allowed_reasons)})")
    if type_ is RequestType.ON_DATE:
        if cancel_on is None:
            raise FieldError("cancel_on", "an On Date request needs the date (YYYY-MM-DD)")
        if cancel_on < today:
            raise FieldError("cancel_on", f"{cancel_on} is in the past (today is {today} in the business time zone)")
    elif cancel_on is not None:
        raise FieldError("cancel_on", f"only an On Date request takes a date, not {type_.value}")
    service = get_service(session, service_id)
    if service.status in CLOSED_SERVICE_STATUSES:
        raise StateError(f"service {service_id} is already {service.status.value}")
    if addon_id is not None:
        addon = _check_addon(session, service, addon_id)
        effective = addon_effective_on(type_, created_on=today, next_due_date=addon.next_due_date, cancel_on=cancel_on)
    else:
        existing = open_request_for(session, service_id)
        if existing is not None:
            raise StateError(f"service {service_id} already has open request {existing.id} ({existing.status.value})")
        effective = service_effective_on(service, type_, cancel_on, today, terms_of)
    request = CancellationRequest(
        service_id=service_id, addon_id=addon_id, type=type_, cancel_on=cancel_on, effective_date=effective.on,
        reason_code=reason_code, reason=reason, status=RequestStatus.PENDING, created_at=now, created_by=actor,
        attempts=0, note="",
    )
    session.add(request)
    session.flush()
    _audit(session, request, AuditAction.CREATED, actor, now, created_detail(type_, reason_code, effective, addon_id))
    return request


def service_effective_on(service: Service, type_: RequestType, cancel_on: dt.date | None, created_on: dt.date,
                         terms_of: TermsOf) -> Effective:
    """When a request made on `created_on` for this service (its product loaded) takes effect."""
    return effective_on(type_, created_on=created_on, next_due_date=service.next_due_date, cancel_on=cancel_on,
                        billing_cycle=service.billing_cycle, registration_date=service.registration_date,
                        terms=terms_of(service.product.external_id, service.product.name))


def created_detail(type_: RequestType, reason_code: str, effective: Effective, addon_id: int | None = None) -> str:
    """The audit detail of a new request: its type, the add-on it is for, its reason, and the
    date it takes effect with why."""
    addon = (f"add-on {addon_id}",) if addon_id is not None else ()
    return "; ".join((type_.value, *addon, f"reason {reason_code}", f"takes effect {effective.on}", *effective.why))


class Withdrawal(NamedTuple):
    request: CancellationRequest
    unsuspended: bool  # it was in its grace period: its service is Active again


def withdraw_request(session: Session, request_id: int, *, actor: str, now: dt.datetime,
                     note: str = "", hooks: HookRegistry | None = None,
                     today: dt.date | None = None) -> Withdrawal:
    """Staff withdraw a request that has not been applied. One in its grace period (its
    service suspended by a run) is unsuspended with it (`unsuspend_withdrawn`, with the
    UnsuspendAccount `hooks`; `today` is their as_of)."""
    request = lock_request(session, request_id)
    if request.status not in OPEN_REQUEST_STATUSES:
        when = f" on {request.processed_at:%Y-%m-%d}" if request.processed_at else ""
        raise StateError(f"request {request_id} is {request.status.value}{when}; "
                         "only a pending or failed request can be withdrawn")
    request.status = RequestStatus.WITHDRAWN
    request.next_attempt_at = None
    request.note = note
    _audit(session, request, AuditAction.WITHDRAWN, actor, now, note)
    unsuspended = unsuspend_withdrawn(session, request, hooks or HookRegistry(), actor=actor, now=now,
                                      today=today or now.date(), note=note)
    return Withdrawal(request, unsuspended)


def unsuspend_withdrawn(session: Session, request: CancellationRequest, hooks: HookRegistry, *, actor: str,
                        now: dt.datetime, today: dt.date, note: str = "") -> bool:
    """A request withdrawn in its grace period (by `withdraw_request`, in its transaction):
    the UnsuspendAccount hooks undo the suspension outside, then the service is Active
    again, audited. True if it was unsuspended (the client is told so).

    A failing UnsuspendAccount raises HookFailed before anything here is changed: the
    caller's transaction rolls back, so the request stays open and in its grace period and
    the service Suspended, and the withdrawal can be tried again (the hook gets the same
    idempotency_key). A service no longer Suspended (changed by an import meanwhile) is
    left as it is, with no hook call."""
    if request.suspended_on is None:
        return False
    service = session.get(Service, request.service_id)
    if service is None or service.status is not ServiceStatus.SUSPENDED:
        return False
    if hooks.has("UnsuspendAccount"):
        row = session.execute(request_select().where(CancellationRequest.id == request.id)).one()
        hooks.apply("UnsuspendAccount", request_params(row, run_id=None, as_of=today, dry_run=False,
                                                       params=ModuleParams(row), actor=actor, note=note))
    service.status = ServiceStatus.ACTIVE
    session.add(AuditEntry(at=now, actor=actor, request_id=request.id, entity=AuditEntity.SERVICE,
                           entity_id=service.id, action=AuditAction.UNSUSPENDED,
                           detail=f"request withdrawn in its grace period (suspended {request.suspended_on})"))
    _audit(session, request, AuditAction.UNSUSPENDED, actor, now,
           f"service {service.id} Active again; it would have been cancelled on {request.grace_ends_on}")
    return True


def retry_request(session: Session, request_id: int, *, actor: str, now: dt.datetime) -> CancellationRequest:
    """A failed request (or one waiting for its backoff) goes back to pending, tried at the next run."""
    request = lock_request(session, request_id)
    if request.status is RequestStatus.PENDING and request.next_attempt_at is None:
        raise StateError(f"request {request_id} is already pending and will be tried at the next run that finds it due")
    if request.status not in OPEN_REQUEST_STATUSES:
        raise StateError(f"request {request_id} is {request.status.value}; "
                         "only a failed or pending request can be retried")
    previous = request.status.value
    request.status = RequestStatus.PENDING
    request.attempts = 0
    request.next_attempt_at = None
    _audit(session, request, AuditAction.RETRY, actor, now, f"was {previous}; last error: {request.last_error or '-'}")
    return request


def resolve_request(session: Session, request_id: int, *, actor: str, now: dt.datetime,
                    note: str) -> CancellationRequest:
    """Staff cancelled the service by hand: close the request without touching the service.
    A failed request, or a pending one waiting out the backoff of a failed or vetoed
    attempt (the run would try it again, on a service already cancelled)."""
    request = lock_request(session, request_id)
    waiting = request.status is RequestStatus.PENDING and request.next_attempt_at is not None
    if request.status is not RequestStatus.FAILED and not waiting:
        raise StateError(f"request {request_id} is {request.status.value}"
                         f"{' and not waiting out a backoff' if request.status is RequestStatus.PENDING else ''}; "
                         "only a failed request, or a pending one waiting out the backoff of a failed or vetoed "
                         "attempt, can be resolved by hand")
    if not note.strip():
        raise FieldError("note", "say what was done by hand (it goes into the audit log)")
    detail = (f"{note} (was pending after {request.attempts} attempt(s), next attempt "
              f"{request.next_attempt_at.isoformat()}; last error: {request.last_error or '-'})"
              if waiting and request.next_attempt_at else note)
    request.status = RequestStatus.COMPLETED
    request.processed_at = now
    request.next_attempt_at = None
    request.note = note
    _audit(session, request, AuditAction.RESOLVED_BY_HAND, actor, now, detail)
    return request


def check_processable(session: Session, request_ids: Sequence[int], *, today: dt.date, zone: ZoneInfo,
                      ignore_due_date: bool) -> None:
    """Before `requests process` applies these requests at once: each is pending and, unless
    its due date is ignored, due today. A request whose service was deleted outside
    cancelproc passes: the run fails it, saying so."""
    for request_id in request_ids:
        request = get_request(session, request_id)
        if request.status is not RequestStatus.PENDING:
            raise InputError(f"request {request_id} is {request.status.value}; only a pending request can be processed")
        if request.service is not None and not ignore_due_date and not request_is_due(request, zone, today):
            raise NotDue(request_id, request.grace_ends_on or request_due_on(request, zone))


# --- hooks of staff actions ----------------------------------------------------------------

def fire_request_created(db: Database, hooks: HookRegistry, request_id: int, *, actor: str) -> None:
    """The CancellationRequest hooks of a request just created (after its commit)."""
    _fire(db, hooks, "CancellationRequest", request_id, actor=actor)


def fire_request_withdrawn(db: Database, hooks: HookRegistry, request_id: int, *, actor: str, note: str) -> None:
    """The CancellationRequestWithdrawn hooks of a request just withdrawn (after its commit)."""
    _fire(db, hooks, "CancellationRequestWithdrawn", request_id, actor=actor, note=note)


def _fire(db: Database, hooks: HookRegistry, point: str, request_id: int, **more: Any) -> None:
    """Call a staff action's hook point with the request's params; a hook's failure is
    logged, not raised (the change is committed already)."""
    if not hooks.has(point):
        return
    with db.read_engine.connect() as conn:
        row = conn.execute(request_select().where(CancellationRequest.id == request_id)).one_or_none()
    if row is None:  # its service, client or product was deleted outside cancelproc: no params to give
        structlog.get_logger("cancelproc").warning(
            "hook not called: the request's service, client or product no longer exists", point=point,
            request_id=request_id)
        return
    params = request_params(row, **more)
    if point == "CancellationRequest":  # WHMCS's names for it too
        params.update(cancellation_request_names(params))
    hooks.apply(point, params)
