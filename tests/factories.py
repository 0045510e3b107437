"""Small builders for test data: a client with a service, and a request on it."""

from __future__ import annotations

import datetime as dt
import itertools
from decimal import Decimal

from sqlalchemy.orm import Session

from processor.db import Database
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
from processor.terms import addon_effective_on, effective_on

_seq = itertools.count(1)
CREATED = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


def effective(session: Session, service_id: int, type_: RequestType, cancel_on: dt.date | None,
              created_at: dt.datetime, zone: dt.tzinfo = dt.UTC) -> dt.date:
    """The effective date `requests create` would store (no notice period or minimum term)."""
    svc = session.get(Service, service_id)
    assert svc is not None
    return effective_on(type_, created_on=created_at.astimezone(zone).date(), next_due_date=svc.next_due_date,
                        cancel_on=cancel_on, billing_cycle=svc.billing_cycle,
                        registration_date=svc.registration_date).on


def service(
    session: Session,
    *,
    next_due_date: dt.date | None = dt.date(2026, 11, 26),
    status: ServiceStatus = ServiceStatus.ACTIVE,
    email: str | None = None,
    first_name: str = "Ada",
    language: str = "en",
    addons: int = 0,
    addon_due: dt.date | None = dt.date(2026, 11, 24),
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
                                 amount=Decimal("2"), next_due_date=addon_due))
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
    addon: ServiceAddon | None = None,
) -> CancellationRequest:
    on = (effective(session, svc.id, type_, cancel_on, created_at) if addon is None
          else addon_effective_on(type_, created_on=created_at.astimezone(dt.UTC).date(),
                                  next_due_date=addon.next_due_date, cancel_on=cancel_on).on)
    req = CancellationRequest(service_id=svc.id, addon_id=addon.id if addon else None, type=type_,
                              cancel_on=cancel_on, effective_date=on, reason_code="too_expensive",
                              reason=reason, status=RequestStatus.PENDING, created_at=created_at, created_by="test")
    session.add(req)
    session.flush()
    return req


def support_desk(db: Database, now: dt.datetime) -> Database:
    """Two clients as the billing system knows them.

    client 1 Alice Martin (C-100, alice@example.test): services 1 (S-1001, shop.alice.test, due 11-20,
      an add-on AD-1 and an invoice INV-1) and 2 (S-1002, blog.alice.test, due 12-10);
      request 1 (R-1) End of Billing Period on service 1 (due), request 2 (no external id) on On Date
      2026-12-15 on service 2
    client 2 Bob Novak (C-200, bob@novak.test): service 3 (S-1003, WWW.Novak.TEST, due 12-05);
      request 3 (R-3) Immediate
    """
    with db.session.begin() as s:
        alice = Client(external_id="C-100", first_name="Alice", last_name="Martin", email="alice@example.test")
        bob = Client(external_id="C-200", first_name="Bob", last_name="Novak", email="bob@novak.test")
        hosting = Product(name="Shared Hosting", module="cpanel")
        s.add_all([alice, bob, hosting])
        s.flush()
        services = [Service(external_id=ext, client_id=client.id, product_id=hosting.id, domain=domain,
                            status=ServiceStatus.ACTIVE, billing_cycle="Monthly", amount=Decimal("4.99"),
                            next_due_date=due)
                    for ext, client, domain, due in (("S-1001", alice, "shop.alice.test", dt.date(2026, 11, 20)),
                                                     ("S-1002", alice, "blog.alice.test", dt.date(2026, 12, 10)),
                                                     ("S-1003", bob, "WWW.Novak.TEST", dt.date(2026, 12, 5)))]
        s.add_all(services)
        s.flush()
        s.add_all([
            ServiceAddon(external_id="AD-1", service_id=services[0].id, name="Daily Backups",
                         status=ServiceStatus.ACTIVE, amount=Decimal("2.00")),
            Invoice(external_id="INV-1", service_id=services[0].id, amount=Decimal("4.99"),
                    status=InvoiceStatus.UNPAID, due_date=dt.date(2026, 11, 20)),
        ])
        for ext, svc, type_, cancel_on in (("R-1", services[0], RequestType.END_OF_BILLING_PERIOD, None),
                                           (None, services[1], RequestType.ON_DATE, dt.date(2026, 12, 15)),
                                           ("R-3", services[2], RequestType.IMMEDIATE, None)):
            s.add(CancellationRequest(external_id=ext, service_id=svc.id, type=type_, cancel_on=cancel_on,
                                      effective_date=effective(s, svc.id, type_, cancel_on,
                                                               now - dt.timedelta(days=2)),
                                      reason_code="too_expensive", reason="", status=RequestStatus.PENDING,
                                      created_at=now - dt.timedelta(days=2), created_by="test"))
    return db
