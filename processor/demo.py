"""Demo data for `cancelproc init --demo`: a small hosting company, dated around today.

Deterministic (seeded), so the demo shows the same picture every time: requests due
today, some overdue from missed nights (catch-up), some not due yet, an Immediate one,
On Date ones, a service already cancelled by hand (a no-op), and a free service with no
next due date.
"""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from decimal import Decimal

from sqlalchemy.orm import Session

from processor.models import (
    AuditAction,
    AuditEntity,
    AuditEntry,
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

FIRST = ["Alice", "Bruno", "Chloé", "Dmitri", "Esther", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kavya", "Liam", "Maja", "Nikos", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tariq",
         "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoë", "Amara", "Björn", "Carmen", "Deniz"]
LAST = ["Martin", "Schmidt", "Rossi", "Novak", "Kowalski", "Haddad", "Okafor", "Tanaka", "García", "Jensen",
        "Iyer", "Murphy", "Lindqvist", "Papadakis", "Ivanova", "Silva", "Baker", "Moreno", "Berg", "Aziz",
        "Patel", "Horvath", "Li", "López", "Demir", "Dubois", "Mensah", "Larsen", "Ruiz", "Yilmaz"]

PRODUCTS = [
    ("Shared Hosting Starter", "cpanel", "Monthly", Decimal("4.99")),
    ("VPS 4GB", "proxmox", "Monthly", Decimal("24.00")),
    ("Dedicated Server E3", "ipmi", "Quarterly", Decimal("249.00")),
    (".com Domain Registration", None, "Annually", Decimal("12.99")),
    ("SSL Certificate", None, "Annually", Decimal("49.00")),
    ("Website Builder (free)", "sitebuilder", "Free Account", Decimal("0.00")),
]

REASONS = [
    ("too_expensive", "Found a cheaper plan elsewhere."),
    ("missing_features", "We need Node.js hosting, which the plan does not offer."),
    ("switched_service", "Moving everything to our new provider."),
    ("unused", "Project finished, the site is no longer needed."),
    ("customer_service", "Waited three days for a reply to a ticket."),
    ("too_complex", "The control panel is too complicated for us."),
    ("low_quality", "Frequent downtime in the last month."),
    ("other", "Company is closing."),
]


def _ascii(name: str) -> str:
    """'Chloé' -> 'chloe', for addresses and host names."""
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()


def load_demo(session: Session, *, today: dt.date, now: dt.datetime) -> dict[str, int]:
    """Insert the demo company; returns how many rows of each kind were created."""
    rnd = random.Random(42)
    products = [Product(external_id=f"P{i + 1}", name=n, module=m) for i, (n, m, _, _) in enumerate(PRODUCTS)]
    session.add_all(products)
    clients = [
        Client(external_id=f"C{1000 + i}", first_name=first, last_name=last, company_name="",
               email=f"{_ascii(first)}.{_ascii(last)}@example.test",
               language="en", balance=Decimal("0"))
        for i, (first, last) in enumerate(zip(FIRST, LAST, strict=True))
    ]
    clients[3].balance = Decimal("48.00")  # owes money: a veto hook example in docs uses it
    session.add_all(clients)
    session.flush()

    services: list[Service] = []
    for i, client in enumerate(clients):
        for j in range(1 + (i % 2)):
            k = (i + j) % len(PRODUCTS)
            name, _, cycle, amount = PRODUCTS[k]
            free = cycle == "Free Account"
            services.append(Service(
                external_id=f"S{5000 + len(services)}", client_id=client.id, product_id=products[k].id,
                domain=f"{_ascii(client.first_name)}{i}.example.test",
                status=ServiceStatus.ACTIVE, billing_cycle=cycle, amount=amount,
                next_due_date=None if free else today + dt.timedelta(days=rnd.randint(-3, 25)),
            ))
    session.add_all(services)
    session.flush()

    addons, invoices = [], []
    for s in services:
        if s.product_id in (products[0].id, products[1].id):
            addons.append(ServiceAddon(external_id=f"A{s.id}", service_id=s.id, name="Daily Backups",
                                       status=ServiceStatus.ACTIVE, amount=Decimal("2.00")))
        if s.next_due_date is not None:
            invoices.append(Invoice(external_id=f"I{s.id}-1", service_id=s.id, amount=s.amount,
                                    status=InvoiceStatus.PAID, due_date=s.next_due_date - dt.timedelta(days=30)))
            if s.next_due_date <= today + dt.timedelta(days=7):
                invoices.append(Invoice(external_id=f"I{s.id}-2", service_id=s.id, amount=s.amount,
                                        status=InvoiceStatus.UNPAID, due_date=s.next_due_date))
    session.add_all([*addons, *invoices])

    # Requests: every third service, with a spread of types; one service already cancelled by hand.
    requests: list[CancellationRequest] = []
    for n, s in enumerate(services[::3]):
        code, text = REASONS[n % len(REASONS)]
        type_, on = RequestType.END_OF_BILLING_PERIOD, None
        if n % 7 == 3:
            type_ = RequestType.IMMEDIATE
        elif n % 7 == 5:
            type_, on = RequestType.ON_DATE, today + dt.timedelta(days=(n % 3) - 1)
        created = now - dt.timedelta(days=rnd.randint(1, 20), hours=rnd.randint(0, 23))
        requests.append(CancellationRequest(
            external_id=f"R{700 + n}", service_id=s.id, type=type_, cancel_on=on, reason_code=code, reason=text,
            status=RequestStatus.PENDING, created_at=created, created_by="client portal", attempts=0, note="",
        ))
    services[6].status = ServiceStatus.CANCELLED  # cancelled by hand in the billing system: a no-op
    services[6].termination_date = today - dt.timedelta(days=2)
    services[6].next_due_date = today - dt.timedelta(days=1)
    session.add_all(requests)
    session.flush()
    session.add_all(
        AuditEntry(at=now, actor="demo", request_id=r.id, entity=AuditEntity.REQUEST, entity_id=r.id,
                   action=AuditAction.CREATED, detail=f"{r.type.value}; reason {r.reason_code}")
        for r in requests
    )
    return {"clients": len(clients), "products": len(products), "services": len(services),
            "addons": len(addons), "invoices": len(invoices), "requests": len(requests)}
