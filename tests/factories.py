"""Small builders for test data: a client with a service, and a request on it."""

from __future__ import annotations

import datetime as dt
import itertools
from decimal import Decimal

from sqlalchemy.orm import Session

from processor.models import (
    CancellationRequest,
    Client,
    Invoice,
    InvoiceStatus,
    Product,
    RequestStatus,
    RequestType,
    Service,
    ServiceAddon,
    ServiceStatus,
)

_seq = itertools.count(1)
CREATED = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


def service(
    session: Session,
    *,
    next_due_date: dt.date | None = dt.date(2026, 11, 26),
    status: ServiceStatus = ServiceStatus.ACTIVE,
    email: str | None = None,
    first_name: str = "Ada",
    language: str = "en",
    addons: int = 0,
    unpaid: int = 0,
    paid: int = 0,
) -> Service:
    n = next(_seq)
    client = Client(first_name=first_name, last_name=f"Client{n}",
                    email=email if email is not None else f"c{n}@example.test", language=language)
    product = Product(name="VPS 4GB", module="proxmox")
    svc = Service(client=client, product=product, domain=f"host{n}.example.test", status=status,
                  billing_cycle="Monthly", amount=Decimal("24.00"), next_due_date=next_due_date)
    session.add(svc)
    session.flush()
    for i in range(addons):
        session.add(ServiceAddon(service_id=svc.id, name=f"Backup {i}", status=ServiceStatus.ACTIVE,
                                 amount=Decimal("2")))
    for _ in range(unpaid):
        session.add(Invoice(service_id=svc.id, amount=Decimal("24.00"), status=InvoiceStatus.UNPAID,
                            due_date=next_due_date))
    for _ in range(paid):
        session.add(Invoice(service_id=svc.id, amount=Decimal("24.00"), status=InvoiceStatus.PAID,
                            due_date=next_due_date))
    session.flush()
    return svc


def request(
    session: Session,
    svc: Service,
    *,
    type_: RequestType = RequestType.END_OF_BILLING_PERIOD,
    cancel_on: dt.date | None = None,
    reason: str = "Too expensive",
    created_at: dt.datetime = CREATED,
) -> CancellationRequest:
    req = CancellationRequest(service_id=svc.id, type=type_, cancel_on=cancel_on, reason_code="too_expensive",
                              reason=reason, status=RequestStatus.PENDING, created_at=created_at, created_by="test")
    session.add(req)
    session.flush()
    return req
