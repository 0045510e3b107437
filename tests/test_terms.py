"""Notice periods and minimum terms (issue 14 item 4): the effective date computed once when
a request is made or imported, stored, shown everywhere, and the one date the run goes by.
Through the CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import select

from processor.db import Database
from processor.models import AuditEntry, CancellationRequest, Client, OutboxEmail, Product, Service, ServiceStatus
from tests.cli_helpers import Invoke, as_json, ok

NOW = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)
TODAY = NOW.date()
CONFIG = """\
[products."P-VPS"]
notice_days = 30
[products."Dedicated Server"]
minimum_term_months = 12
"""


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as frozen_time:
        yield frozen_time


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config" / "processor.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG + '[email]\nsend_after_create = false\nstaff_address = ""\n', encoding="utf-8")
    return path


@pytest.fixture
def shop(db: Database) -> Database:
    """Services 1-2: VPS (external id P-VPS, 30 days' notice), Monthly due 12-10 and Quarterly
    due 2027-01-31; 3: Dedicated Server (12 months' minimum term) registered 2026-05-31,
    Monthly due 12-31; 4: the same without a registration date; 5: Shared Hosting (no terms),
    due 12-10."""
    with db.session.begin() as s:
        client = Client(first_name="Ada", last_name="Lovelace", email="ada@example.test")
        vps = Product(external_id="P-VPS", name="VPS 4GB", module="proxmox")
        dedicated = Product(name="Dedicated Server", module=None)
        shared = Product(name="Shared Hosting", module="cpanel")
        s.add_all([client, vps, dedicated, shared])
        s.flush()
        for product, cycle, due, registered in ((vps, "Monthly", dt.date(2026, 12, 10), None),
                                                (vps, "Quarterly", dt.date(2027, 1, 31), None),
                                                (dedicated, "Monthly", dt.date(2026, 12, 31), dt.date(2026, 5, 31)),
                                                (dedicated, "Monthly", dt.date(2026, 12, 31), None),
                                                (shared, "Monthly", dt.date(2026, 12, 10), None)):
            s.add(Service(client_id=client.id, product_id=product.id, domain=f"{cycle.lower()}.example.test",
                          status=ServiceStatus.ACTIVE, billing_cycle=cycle, amount=Decimal("10"),
                          next_due_date=due, registration_date=registered))
    return db


def create(invoke: Invoke, config: Path, service: int, *more: str) -> dict[str, Any]:
    return as_json(invoke("--config", config, "requests", "create", service, "--reason-code", "too_expensive",
                          "--json", *more))


def test_notice_period_moves_an_end_of_period_request_to_the_following_due_date(
        invoke: Invoke, shop: Database, config: Path) -> None:
    """Made 14 days before the next due date with 30 days' notice: the due date after it,
    one billing cycle on (Monthly: 12-10 -> 2027-01-10). 66 days before a quarterly due
    date: enough notice, the next due date. A product without terms: today's rule."""
    monthly = create(invoke, config, 1)
    assert monthly["effective_date"] == "2027-01-10"
    assert create(invoke, config, 2)["effective_date"] == "2027-01-31"
    assert create(invoke, config, 5)["effective_date"] == "2026-12-10"
    shown = as_json(invoke("--config", config, "requests", "show", monthly["id"], "--json"))
    assert (shown["effective_date"], shown["due_on"], shown["due_now"]) == ("2027-01-10", "2027-01-10", False)
    assert "takes effect 2027-01-10; notice period of 30 days: made 2026-11-26, next due date 2026-12-10" in \
        shown["audit"][0]["detail"]
    listed = {r["id"]: r for r in as_json(invoke("--config", config, "requests", "list", "--json"))["rows"]}
    assert (listed[monthly["id"]]["effective_date"], listed[monthly["id"]]["due_on"]) == ("2027-01-10", "2027-01-10")
    before = as_json(invoke("--config", config, "requests", "list", "--due-before", "2027-01-01", "--json"))
    assert [r["service_id"] for r in before["rows"]] == [5]
    # The client's confirmation names the stored date, not the service's next due date.
    with shop.read_session() as s:
        body = s.scalars(select(OutboxEmail.text_body).where(OutboxEmail.request_id == monthly["id"])).one()
    assert "10/01/2027" in body or "2027-01-10" in body or "January 10, 2027" in body or "10 January 2027" in body


def test_minimum_term_and_a_service_without_a_registration_date(invoke: Invoke, shop: Database,
                                                                 config: Path) -> None:
    """Registered 2026-05-31 with 12 months' minimum term: the term ends 2027-05-31; an End
    of Billing Period request goes to the first due date on or after it (Monthly from 12-31:
    2027-05-31, month ends kept), an Immediate one to the end of the term itself. Without a
    registration date the term cannot be counted: today's rule, and the audit says why."""
    eobp = create(invoke, config, 3)
    assert eobp["effective_date"] == "2027-05-31"
    ok(invoke("--config", config, "requests", "withdraw", eobp["id"]))
    immediate = create(invoke, config, 3, "--type", "immediate")
    assert immediate["effective_date"] == "2027-05-31"
    undated = create(invoke, config, 4)
    assert undated["effective_date"] == "2026-12-31"
    with shop.read_session() as s:
        detail = s.scalars(select(AuditEntry.detail).where(AuditEntry.request_id == undated["id"])).first()
        body = s.scalars(select(OutboxEmail.text_body).where(OutboxEmail.request_id == immediate["id"])).one()
    assert "minimum term of 12 months not applied: the service has no registration date" in detail
    # A deferred Immediate request is not "cancelled within the next day".
    assert "within the next day" not in body


def test_the_run_goes_by_the_stored_date_not_the_services_next_due_date(
        invoke: Invoke, shop: Database, config: Path, frozen: Any) -> None:
    """The date was fixed when the request was made: a service's next due date changed
    later (paid, imported) moves nothing. The dry run shows the stored date."""
    request = create(invoke, config, 5)  # no terms: 12-10
    later = create(invoke, config, 1)  # notice: 2027-01-10
    with shop.session.begin() as s:
        s.get(Service, 5).next_due_date = dt.date(2027, 3, 10)
        s.get(Service, 1).next_due_date = dt.date(2026, 11, 1)
    preview = as_json(invoke("--config", config, "run", "--dry-run", "--as-of", "2026-12-10", "--json"))
    assert [(r["request_id"], r["due_on"]) for r in preview["requests"]] == [(request["id"], "2026-12-10")]
    frozen.move_to(dt.datetime(2026, 12, 10, 2, 0, tzinfo=dt.UTC))
    ok(invoke("--config", config, "run"))
    with shop.read_session() as s:
        statuses = {r.id: r.status.value for r in s.scalars(select(CancellationRequest))}
    assert statuses == {request["id"]: "completed", later["id"]: "pending"}


def test_import_computes_the_date_and_recomputes_it_when_the_type_changes(
        invoke: Invoke, shop: Database, config: Path, tmp_path: Path) -> None:
    with shop.session.begin() as s:
        s.get(Service, 1).external_id = "S-1"
    path = tmp_path / "requests.csv"
    path.write_text("external_id,service_external_id,type,reason_code,requested_at\n"
                    "R-1,S-1,End of Billing Period,other,2026-11-20\n", encoding="utf-8")
    ok(invoke("--config", config, "import", path))
    shown = as_json(invoke("--config", config, "requests", "show", "ext:R-1", "--json"))
    assert shown["effective_date"] == "2027-01-10"  # 20 days before 12-10, 30 days' notice
    path.write_text("external_id,service_external_id,type,reason_code,requested_at,cancel_on\n"
                    "R-1,S-1,On Date,other,2026-11-20,2026-12-24\n", encoding="utf-8")
    ok(invoke("--config", config, "import", path))
    shown = as_json(invoke("--config", config, "requests", "show", "ext:R-1", "--json"))
    assert shown["effective_date"] == "2026-12-24"  # notice is for End of Billing Period only
    assert '"effective_date": ["2027-01-10", "2026-12-24"]' in shown["audit"][-1]["detail"]
