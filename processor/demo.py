"""Demo data for `cancelproc init --demo`: a small hosting company, dated around today.

Deterministic (seeded), so the demo shows the same picture every time: requests due
today, some overdue from missed nights (catch-up), some not due yet, an Immediate one,
On Date ones, a service already cancelled by hand (a no-op), and a free service with no
next due date. And a year of history, so that `report reasons` and `report html` have
something to show: a nightly cron run in each of the last eleven months that cancelled a
few services (some a night or two late, after a missed night), a no-op now and then, and
one request that failed and was resolved by hand.
"""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from processor.due import business_today
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
    Run,
    RunStatus,
    RunTrigger,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.terms import TermsOf, effective_on, no_terms

UTC = ZoneInfo("UTC")

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


def load_demo(session: Session, *, today: dt.date, now: dt.datetime, zone: ZoneInfo = UTC,
              terms_of: TermsOf = no_terms) -> dict[str, int]:
    """Insert the demo company; returns how many rows of each kind were created. Each
    request's effective date as `requests create` computes it (`terms_of`: the products'
    notice periods and minimum terms)."""
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
    by_id = {s.id: s for s in services}
    product_of = {p.id: p for p in products}
    for r in requests:
        s = by_id[r.service_id]
        product = product_of[s.product_id]
        r.effective_date = effective_on(
            r.type, created_on=business_today(r.created_at, zone), next_due_date=s.next_due_date,
            cancel_on=r.cancel_on, billing_cycle=s.billing_cycle, registration_date=s.registration_date,
            terms=terms_of(product.external_id, product.name)).on
    session.add_all(requests)
    session.flush()
    session.add_all(
        AuditEntry(at=now, actor="demo", request_id=r.id, entity=AuditEntity.REQUEST, entity_id=r.id,
                   action=AuditAction.CREATED,
                   detail=f"{r.type.value}; reason {r.reason_code}; takes effect {r.effective_date}")
        for r in requests
    )
    past_services, past_requests = _history(session, rnd, products, clients, today=today)
    return {"clients": len(clients), "products": len(products), "services": len(services) + past_services,
            "addons": len(addons), "invoices": len(invoices), "requests": len(requests) + past_requests}


def _month_day(today: dt.date, months_back: int, day: int) -> dt.date:
    year, month = divmod(today.year * 12 + today.month - 1 - months_back, 12)
    return dt.date(year, month + 1, day)


def _history(session: Session, rnd: random.Random, products: list[Product], clients: list[Client], *,
             today: dt.date) -> tuple[int, int]:
    """Runs of past months and what they did, as a run would have recorded it (requests
    completed by the run, audit rows, the run's counts). Returns (services, requests) added."""
    added_services = added_requests = 0
    for back in range(11, 0, -1):
        night = _month_day(today, back, rnd.randint(2, 27))
        started = dt.datetime.combine(night, dt.time(2, 5), tzinfo=dt.UTC)
        run = Run(trigger=RunTrigger.CRON, operator="cron", as_of=night, host="billing-01", pid=4000 + back,
                  status=RunStatus.COMPLETED, started_at=started,
                  finished_at=started + dt.timedelta(seconds=rnd.randint(3, 40)))
        session.add(run)
        session.flush()
        kinds = ["cancelled"] * rnd.randint(1, 5) + (["no_op"] if back % 4 == 1 else []) \
            + (["failed"] if back == 5 else [])
        for kind in kinds:
            k = rnd.randrange(len(PRODUCTS) - 1)  # not the free product: churn that costs revenue
            name, _, cycle, amount = PRODUCTS[k]
            late = rnd.choice([0, 0, 0, 1, 2]) if kind == "cancelled" else 0
            service = Service(external_id=f"S{4000 + added_services}", client_id=rnd.choice(clients).id,
                              product_id=products[k].id, domain=f"old{added_services}.example.test",
                              status=ServiceStatus.CANCELLED, billing_cycle=cycle, amount=amount,
                              next_due_date=night - dt.timedelta(days=late),
                              termination_date=night if kind == "cancelled" else night - dt.timedelta(days=9))
            session.add(service)
            session.flush()
            code, text = REASONS[rnd.randrange(len(REASONS))]
            request = CancellationRequest(
                external_id=f"R{600 + added_requests}", service_id=service.id,
                type=RequestType.END_OF_BILLING_PERIOD, effective_date=service.next_due_date, reason_code=code,
                reason=text, status=RequestStatus.COMPLETED, created_by="client portal",
                created_at=started - dt.timedelta(days=rnd.randint(5, 25)), attempts=1, note="",
                processed_at=started + dt.timedelta(seconds=2), run_id=run.id, days_late=late)
            session.add(request)
            session.flush()
            added_services, added_requests = added_services + 1, added_requests + 1
            _history_audit(session, run, request, service, kind)
            run.due += 1
            if kind == "cancelled":
                run.completed += 1
                run.late += 1 if late else 0
                run.max_days_late = max(run.max_days_late, late)
            elif kind == "no_op":
                run.noop += 1
            else:
                run.failed += 1
                run.status = RunStatus.COMPLETED_WITH_FAILURES
    return added_services, added_requests


def _history_audit(session: Session, run: Run, request: CancellationRequest, service: Service, kind: str) -> None:
    """The audit rows a run (and staff, for the failed one) would have written."""
    at = request.processed_at or run.started_at

    def audit(entity: AuditEntity, entity_id: int, action: AuditAction, detail: str, *, actor: str = "cancelproc",
              when: dt.datetime = at, run_id: int | None = run.id) -> AuditEntry:
        return AuditEntry(at=when, actor=actor, run_id=run_id, request_id=request.id, entity=entity,
                          entity_id=entity_id, action=action, detail=detail)

    rows = [audit(AuditEntity.REQUEST, request.id, AuditAction.CREATED, f"{request.type.value}; reason "
                  f"{request.reason_code}", actor="demo", when=request.created_at, run_id=None)]
    if kind == "cancelled":
        rows.append(audit(AuditEntity.SERVICE, service.id, AuditAction.CANCELLED,
                          f"was Active; termination date {run.as_of}"))
    elif kind == "no_op":
        rows.append(audit(AuditEntity.REQUEST, request.id, AuditAction.COMPLETED,
                          "no-op: service already Cancelled; request completed without changes"))
    else:  # the panel refused; staff terminated it by hand the next morning
        request.processed_at = at + dt.timedelta(hours=7)
        request.note = "terminated in the panel by hand"
        rows += [audit(AuditEntity.REQUEST, request.id, AuditAction.FAILED, "TerminateAccount: panel timeout"),
                 audit(AuditEntity.REQUEST, request.id, AuditAction.RESOLVED_BY_HAND, request.note, actor="alice",
                       when=request.processed_at, run_id=None)]
    session.add_all(rows)
