"""The data: SQLAlchemy 2.0 typed models. Alembic migrations mirror them (tests check drift)."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Date,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so migrations can refer to them on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in Python, naive UTC in the column (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass an aware one")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], dt.datetime | None] | None:
        if dialect.name == "sqlite":
            return _utc_from_sqlite_text
        return super().result_processor(dialect, coltype)


def _utc_from_sqlite_text(value: str | None) -> dt.datetime | None:
    """SQLite keeps the naive UTC text ('2026-10-30 14:09:25.461272'): parsed as UTC in one
    C call. (Parsing, then `replace(tzinfo=...)`, costs several times as much, and a run
    reads one such column per request.)"""
    if value is None:
        return None
    try:
        return _FROM_ISO(value + "+00:00")
    except ValueError:  # text with its own offset, written by some other tool
        parsed = _FROM_ISO(value)
        return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


_FROM_ISO = dt.datetime.fromisoformat


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _enum(cls: type[enum.Enum], name: str, length: int = 32) -> Enum:
    # Store the readable value ("End of Billing Period"), checked by a CHECK constraint.
    # SQLAlchemy writes it as `col IN (...)`; on SQLite migration 0005 rewrites each as
    # the same rule in an OR chain, which SQLite checks without a temporary index per row.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=length,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class ServiceStatus(enum.StrEnum):
    """WHMCS service statuses."""

    PENDING = "Pending"
    ACTIVE = "Active"
    SUSPENDED = "Suspended"
    TERMINATED = "Terminated"
    CANCELLED = "Cancelled"
    FRAUD = "Fraud"


# A service in one of these states has nothing left to cancel.
CLOSED_SERVICE_STATUSES = (ServiceStatus.CANCELLED, ServiceStatus.TERMINATED)


class InvoiceStatus(enum.StrEnum):
    UNPAID = "Unpaid"
    PAID = "Paid"
    CANCELLED = "Cancelled"


class RequestType(enum.StrEnum):
    IMMEDIATE = "Immediate"  # the next run (or `requests process ID` at once)
    END_OF_BILLING_PERIOD = "End of Billing Period"  # the service's next due date
    ON_DATE = "On Date"  # a date chosen by the client or staff


# The short spellings `requests create --type` takes; imports accept them beside the values.
REQUEST_TYPE_WORDS = {"immediate": RequestType.IMMEDIATE, "end-of-period": RequestType.END_OF_BILLING_PERIOD,
                      "on-date": RequestType.ON_DATE}


class RequestStatus(enum.StrEnum):
    PENDING = "pending"  # waiting to be due, or retrying after an error
    COMPLETED = "completed"  # applied (or found already cancelled: a no-op)
    WITHDRAWN = "withdrawn"  # staff withdrew it before it was applied
    FAILED = "failed"  # gave up after max_attempts: manual cancellation required


# "Open" requests: at most one per service, and one per add-on (partial unique indexes below).
OPEN_REQUEST_STATUSES = (RequestStatus.PENDING, RequestStatus.FAILED)


class RunStatus(enum.StrEnum):
    RUNNING = "running"  # holds the lease
    COMPLETED = "completed"  # every due request was applied
    COMPLETED_WITH_FAILURES = "completed_with_failures"  # some requests failed or were vetoed
    ERROR = "error"  # stopped by an error (database, bad data); see the error column
    ABANDONED = "abandoned"  # its process died; a later run took the lease over
    STOPPED = "stopped"  # asked to stop (SIGTERM, SIGINT) and did, after a chunk; the next run does the rest


class RunTrigger(enum.StrEnum):
    CRON = "cron"
    SCHEDULE = "schedule"
    MANUAL = "manual"


class EmailStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting to be sent (again, after next_attempt_at when a send failed)
    SENT = "sent"  # handed to the mail server (or written to the outbox folder)
    FAILED = "failed"  # given up, or refused as unsafe: never sent; `emails retry` queues it again
    WITHDRAWN = "withdrawn"  # never sent: the request it is about was withdrawn while it was queued


class AuditEntity(enum.StrEnum):
    """What an audit row is about (its entity_id is that table's id; for EMAIL, an outbox id,
    or the request id when no email was queued)."""

    CLIENT = "client"  # imported or updated by `cancelproc import`
    PRODUCT = "product"  # imported or updated by `cancelproc import`
    SERVICE = "service"
    ADDON = "addon"
    INVOICE = "invoice"
    REQUEST = "request"
    EMAIL = "email"


class AuditAction(enum.StrEnum):
    """What happened to the entity of an audit row."""

    CREATED = "created"  # a request was created (`requests create`, the demo)
    WITHDRAWN = "withdrawn"  # staff withdrew a request; for an email: not sent because of that
    RETRY = "retry"  # staff sent a failed request or email back to pending / queued
    RESOLVED_BY_HAND = "resolved_by_hand"  # staff closed a failed request after cancelling by hand
    COMPLETED = "completed"  # a run completed the request (a no-op: the service was already closed)
    CANCELLED = "cancelled"  # a run cancelled the service, add-on or unpaid invoice
    ATTEMPT_FAILED = "attempt_failed"  # a run's attempt failed; the request is retried after a backoff
    VETOED = "vetoed"  # a PreModuleTerminate hook vetoed the request; retried like a failure
    FAILED = "failed"  # given up: a request (manual cancellation required) or an email (never sent)
    ABORTED = "aborted"  # an EmailPreSend hook returned abortsend: the email was not queued
    REFUSED = "refused"  # an email was refused as unsafe (e.g. header injection) and not queued
    IMPORTED = "imported"  # a row inserted by `cancelproc import`
    IMPORT_UPDATED = "import_updated"  # a row changed by `cancelproc import` (detail: old and new values)
    CREDITED = "credited"  # a run credited the client the unused part of a paid period (immediate_refund)
    SUSPENDED = "suspended"  # a run suspended the service of a request with a grace period (and its request)
    UNSUSPENDED = "unsuspended"  # its request was withdrawn in the grace period: the service is Active again


# Request audit actions that record a failed attempt: named as failures of their run
# (digest, `runs show`).
FAILURE_ACTIONS = (AuditAction.FAILED, AuditAction.ATTEMPT_FAILED, AuditAction.VETOED)


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100), default="")
    company_name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str] = mapped_column(String(254))
    language: Mapped[str] = mapped_column(String(16), default="en")
    balance: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0"))

    services: Mapped[list[Service]] = relationship(back_populates="client")

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # Provisioning module name (cpanel, proxmox, ...) or None for products with nothing to deprovision.
    module: Mapped[str | None] = mapped_column(String(64))


class Service(Base):
    __tablename__ = "services"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    domain: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[ServiceStatus] = mapped_column(_enum(ServiceStatus, "service_status"))
    billing_cycle: Mapped[str] = mapped_column(String(32), default="Monthly")
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0"))
    # None for free and one-time services: a request for them is due at once.
    next_due_date: Mapped[dt.date | None] = mapped_column(Date)
    termination_date: Mapped[dt.date | None] = mapped_column(Date)
    # When the service was registered (WHMCS's regdate): the merge field service_reg_date.
    registration_date: Mapped[dt.date | None] = mapped_column(Date)
    # The payment gateway's subscription (WHMCS subscriptionid): what a gateway hook cancels.
    subscription_id: Mapped[str | None] = mapped_column(String(255))

    client: Mapped[Client] = relationship(back_populates="services")
    product: Mapped[Product] = relationship()
    addons: Mapped[list[ServiceAddon]] = relationship(back_populates="service")


# What `cancelproc find` asks at once: a domain or an email, whole or its start, in any case
# (migration 0006). PostgreSQL: text_pattern_ops, so LIKE 'start%' can use them too.
Index("ix_services_domain_lower", func.lower(Service.domain).label("domain_lower"),
      postgresql_ops={"domain_lower": "text_pattern_ops"})
Index("ix_clients_email_lower", func.lower(Client.email).label("email_lower"),
      postgresql_ops={"email_lower": "text_pattern_ops"})


class ServiceAddon(Base):
    __tablename__ = "service_addons"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[ServiceStatus] = mapped_column(_enum(ServiceStatus, "addon_status"))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0"))
    # The add-on's own next due date (WHMCS tblhostingaddons.nextduedate): when an End of
    # Billing Period request for the add-on alone is due. None: due at once.
    next_due_date: Mapped[dt.date | None] = mapped_column(Date)

    service: Mapped[Service] = relationship(back_populates="addons")


class Invoice(Base):
    __tablename__ = "invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"), index=True)
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    status: Mapped[InvoiceStatus] = mapped_column(_enum(InvoiceStatus, "invoice_status"))
    due_date: Mapped[dt.date | None] = mapped_column(Date)


# The conditions of the two partial unique indexes (as migration 0013 writes them).
OPEN_SERVICE_REQUEST = "status IN ('pending', 'failed') AND addon_id IS NULL"
OPEN_ADDON_REQUEST = "status IN ('pending', 'failed') AND addon_id IS NOT NULL"


class CancellationRequest(Base):
    __tablename__ = "cancellation_requests"
    __table_args__ = (
        # The keyset scan of the run: pending requests in id order, with the effective date
        # in the index so a request not due yet is passed over without reading its row
        # (migration 0010).
        Index("ix_cancellation_requests_status_id_effective_date", "status", "id", "effective_date"),
        # One open request per service, whatever writes it (CLI, import, a hook); a request
        # for one add-on of the service is not one (migration 0013).
        Index(
            "uq_cancellation_requests_open_service",
            "service_id",
            unique=True,
            sqlite_where=text(OPEN_SERVICE_REQUEST),
            postgresql_where=text(OPEN_SERVICE_REQUEST),
        ),
        # One open request per add-on.
        Index(
            "uq_cancellation_requests_open_addon",
            "addon_id",
            unique=True,
            sqlite_where=text(OPEN_ADDON_REQUEST),
            postgresql_where=text(OPEN_ADDON_REQUEST),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    # A service's requests (services show, find); the unique index above has the open ones only.
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"), index=True)
    # A request for this one add-on of the service (its service_id is the add-on's service);
    # None: for the service, with all its add-ons.
    addon_id: Mapped[int | None] = mapped_column(ForeignKey("service_addons.id"))
    type: Mapped[RequestType] = mapped_column(_enum(RequestType, "request_type"))
    cancel_on: Mapped[dt.date | None] = mapped_column(Date)  # only for On Date
    # The day it takes effect (business time zone): computed once when it is made or
    # imported (terms.effective_on: notice period, minimum term), again when its type or
    # date changes; the due rule reads only this (due.py). Never before the day it was made.
    effective_date: Mapped[dt.date] = mapped_column(Date)
    reason_code: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[RequestStatus] = mapped_column(
        _enum(RequestStatus, "request_status"), default=RequestStatus.PENDING
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(100), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # After a failed attempt: not retried before this time (backoff).
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    # Days between the date the request became due and the run's as-of date (catch-up is visible).
    days_late: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(Text, default="")
    # Grace period (a product's grace_days): the run suspended the service on `suspended_on`
    # (its as-of date) and cancels it on `grace_ends_on`, the date the client was told. Both
    # None: not suspended. The request stays pending (open) meanwhile.
    suspended_on: Mapped[dt.date | None] = mapped_column(Date)
    grace_ends_on: Mapped[dt.date | None] = mapped_column(Date)

    service: Mapped[Service] = relationship()
    addon: Mapped[ServiceAddon | None] = relationship()

    @property
    def in_grace(self) -> bool:
        """Its service is suspended, waiting for the end of the grace period (pending or failed)."""
        return self.suspended_on is not None and self.status in OPEN_REQUEST_STATUSES


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    trigger: Mapped[RunTrigger] = mapped_column(_enum(RunTrigger, "run_trigger"))
    operator: Mapped[str] = mapped_column(String(100))
    as_of: Mapped[dt.date] = mapped_column(Date)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    due: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    noop: Mapped[int] = mapped_column(Integer, default=0)  # service was already closed
    retrying: Mapped[int] = mapped_column(Integer, default=0)  # failed this time, will be retried
    failed: Mapped[int] = mapped_column(Integer, default=0)  # gave up: manual cancellation required
    vetoed: Mapped[int] = mapped_column(Integer, default=0)  # a PreModuleTerminate hook said no (retried)
    # Services suspended for their grace period (cancelled by a later run): not in `completed`.
    suspended: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    emails_queued: Mapped[int] = mapped_column(Integer, default=0)
    emails_sent: Mapped[int] = mapped_column(Integer, default=0)  # delivered at the end of the run
    emails_failed: Mapped[int] = mapped_column(Integer, default=0)  # given up at the end of the run
    late: Mapped[int] = mapped_column(Integer, default=0)  # applied after the day they were due
    max_days_late: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    # A run's counts, named once here (tables, JSON, reports, metrics and the digest use
    # these): its requests by outcome, its emails, and how late it applied requests.
    REQUEST_COUNTS = ("due", "completed", "suspended", "noop", "retrying", "failed", "vetoed")
    DELIVERY_COUNTS = ("emails_sent", "emails_failed")  # the delivery at the end of the run
    EMAIL_COUNTS = ("emails_queued", *DELIVERY_COUNTS)
    LATENESS_COUNTS = ("late", "max_days_late")
    COUNTS = (*REQUEST_COUNTS, *EMAIL_COUNTS, *LATENESS_COUNTS)
    # The counts each chunk adds to (every process that works on the run); the delivery
    # at its end adds DELIVERY_COUNTS.
    CHUNK_COUNTS = (*REQUEST_COUNTS, "emails_queued", *LATENESS_COUNTS)


class Lease(Base):
    """Who may run now. A row per lease name; expires unless its holder renews it."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))  # the run holding it; none for delivery
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # The holder process's start time: tells a reused pid from the holder.
    process_started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    acquired_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_entity", "entity", "entity_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(100))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    request_id: Mapped[int | None] = mapped_column(ForeignKey("cancellation_requests.id"), index=True)
    entity: Mapped[AuditEntity] = mapped_column(_enum(AuditEntity, "audit_entity"))
    entity_id: Mapped[int] = mapped_column(Integer)
    action: Mapped[AuditAction] = mapped_column(_enum(AuditAction, "audit_action", length=64))
    detail: Mapped[str] = mapped_column(Text, default="")


class Credit(Base):
    """Credit for the unused part of a paid period, given when an Immediate request is
    applied (setting immediate_refund = "credit"). One per request at most: written in the
    transaction that cancels the service, with the client's balance lowered by `amount`."""

    __tablename__ = "credits"

    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"), index=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"), index=True)
    # Exactly once: a second credit for the same request cannot be written.
    request_id: Mapped[int] = mapped_column(ForeignKey("cancellation_requests.id"), unique=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    invoice_id: Mapped[int | None] = mapped_column(ForeignKey("invoices.id"))  # the paid invoice prorated
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    period_start: Mapped[dt.date] = mapped_column(Date)
    period_end: Mapped[dt.date] = mapped_column(Date)  # the service's next due date: the period's end
    days_unused: Mapped[int] = mapped_column(Integer)
    days_in_period: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    description: Mapped[str] = mapped_column(Text, default="")


class OutboxEmail(Base):
    __tablename__ = "email_outbox"
    __table_args__ = (Index("ix_email_outbox_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # "<template>:<entity>:<id>": the same email can never be queued twice.
    key: Mapped[str] = mapped_column(String(200), unique=True)
    template: Mapped[str] = mapped_column(String(100))
    request_id: Mapped[int | None] = mapped_column(ForeignKey("cancellation_requests.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    to_address: Mapped[str] = mapped_column(String(254))
    from_address: Mapped[str] = mapped_column(String(254))
    subject: Mapped[str] = mapped_column(String(998))
    text_body: Mapped[str] = mapped_column(Text)
    html_body: Mapped[str] = mapped_column(Text)
    status: Mapped[EmailStatus] = mapped_column(_enum(EmailStatus, "email_status"), default=EmailStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # backoff after a failed send
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
