"""The support desk at the command line (issue 16): the billing system's ids (`ext:ID`)
everywhere, lists that say how many there are, `requests list` with its client and
domain, `find`, resolving a request waiting out a backoff or a veto, and `requests
show` with its emails and hook outcomes. Through click's CliRunner, on SQLite and
PostgreSQL. Time is frozen at 2026-11-26T02:00Z.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine, event, func, select, text

from processor.cli import find
from processor.db import Database
from processor.models import (
    CancellationRequest,
    Client,
    OutboxEmail,
    Service,
)
from tests.cli_helpers import Invoke, as_json, ok, one_line_error
from tests.factories import support_desk

NOW = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def frozen() -> Iterator[Any]:
    with freeze_time(NOW) as frozen_time:
        yield frozen_time


@pytest.fixture
def desk(db: Database) -> Database:
    return support_desk(db, NOW)


def ids(result: Any) -> list[int]:
    return [r["id"] for r in as_json(result)["rows"]]


# --- ext:ID -----------------------------------------------------------------------------

def test_ext_ids_are_taken_wherever_an_id_is(invoke: Invoke, desk: Database) -> None:
    by_ext = as_json(invoke("services", "show", "ext:S-1003", "--json"))
    assert by_ext == as_json(invoke("services", "show", "3", "--json"))
    assert by_ext["external_id"] == "S-1003" and by_ext["client"] == "Bob Novak"
    assert as_json(invoke("requests", "show", "EXT:R-3", "--json"))["id"] == 3  # the prefix in any case
    assert ids(invoke("requests", "list", "--client", "ext:C-100", "--json")) == [2, 1]
    assert ids(invoke("requests", "list", "--service", "ext:S-1002", "--json")) == [2]
    assert ids(invoke("services", "list", "--client", "ext:C-200", "--json")) == [3]
    ok(invoke("requests", "withdraw", "ext:R-3", "--note", "client stays"))
    created = as_json(invoke("requests", "create", "ext:S-1003", "--reason-code", "other", "--json"))
    assert created["service_id"] == 3
    # R-1 has no emails; R-3 has its withdrawal notice; the new request has the others.
    assert ids(invoke("emails", "list", "--request", "ext:R-1", "--json")) == []
    withdrawal = ids(invoke("emails", "list", "--request", "ext:R-3", "--json"))
    assert len(withdrawal) == 1
    assert ids(invoke("emails", "list", "--request", f"{created['id']}", "--json")) == [
        e["id"] for e in as_json(invoke("emails", "list", "--json"))["rows"] if e["id"] not in withdrawal]


def test_an_unknown_ext_id_is_one_line_naming_the_argument_and_the_id(invoke: Invoke, desk: Database) -> None:
    with desk.read_session() as s:
        before = s.scalar(select(func.count()).select_from(CancellationRequest))
    one_line_error(invoke("services", "show", "ext:1003"), "SERVICE_ID", "no service has the external id '1003'")
    one_line_error(invoke("requests", "create", "ext:nope", "--reason-code", "other"),
                   "SERVICE_ID", "no service has the external id 'nope'")
    one_line_error(invoke("requests", "list", "--client", "ext:S-1001"), "--client",
                   "no client has the external id 'S-1001'")
    one_line_error(invoke("requests", "process", "1", "ext:R-9"), "REQUEST_ID", "'R-9'")
    one_line_error(invoke("requests", "show", "ext:"), "REQUEST_ID", "the external id is empty")
    one_line_error(invoke("services", "show", "abc"), "'abc' is not a service id", "ext:ID")
    one_line_error(invoke("services", "show", str(2**31)), "is not a service id")
    with desk.read_session() as s:
        assert s.scalar(select(func.count()).select_from(CancellationRequest)) == before


# --- lists --------------------------------------------------------------------------------

def test_lists_say_how_many_there_are(invoke: Invoke, desk: Database) -> None:
    page = as_json(invoke("services", "list", "--limit", "2", "--json"))
    assert (page["total"], page["limit"], page["offset"], [r["id"] for r in page["rows"]]) == (3, 2, 0, [1, 2])
    result = ok(invoke("services", "list", "--limit", "2"))
    assert result.stderr.strip() == "showing 2 of 3 (--limit, --offset)"
    assert len(result.stdout.splitlines()) == 3  # the header and two rows; the count is not in a pipe
    result = ok(invoke("services", "list", "--limit", "2", "--offset", "2"))
    assert result.stderr.strip() == "showing 1 of 3, from row 3 (--limit, --offset)"
    assert ok(invoke("services", "list")).stderr == ""  # all there is: nothing to say
    assert ids(invoke("services", "list", "--limit", "0", "--json")) == [1, 2, 3]  # 0: all
    assert ids(invoke("requests", "list", "--limit", "1", "--offset", "1", "--json")) == [2]
    assert as_json(invoke("requests", "list", "--offset", "9", "--json"))["total"] == 3
    assert ok(invoke("requests", "list", "--offset", "9")).stdout.strip() == "no rows from offset 9"
    assert as_json(invoke("runs", "list", "--json")) == {"total": 0, "limit": 20, "offset": 0, "rows": []}
    one_line_error(invoke("services", "list", "--limit", "-1"), "--limit")
    one_line_error(invoke("services", "list", "--offset", "x"), "--offset")


def test_requests_list_shows_the_client_and_domain_and_filters(invoke: Invoke, desk: Database) -> None:
    rows = as_json(invoke("requests", "list", "--json"))["rows"]
    assert [(r["id"], r["client"], r["client_id"], r["domain"], r["due_on"], r["reason_code"]) for r in rows] == [
        (3, "Bob Novak", 2, "WWW.Novak.TEST", "2026-11-24", "too_expensive"),  # Immediate: the day it was made
        (2, "Alice Martin", 1, "blog.alice.test", "2026-12-15", "too_expensive"),
        # Made 11-24 for a service due since 11-20: it takes effect the day it was made.
        (1, "Alice Martin", 1, "shop.alice.test", "2026-11-24", "too_expensive"),
    ]
    table = ok(invoke("requests", "list")).stdout.splitlines()
    assert table[0].split()[:7] == ["ID", "CLIENT", "DOMAIN", "ADDON", "TYPE", "DUE_ON", "STATUS"]
    assert "Bob Novak" in table[1] and "WWW.Novak.TEST" in table[1] and "2026-11-24" in table[1]
    assert ids(invoke("requests", "list", "--domain", "novak.test", "--json")) == [3]  # any case, partial
    assert ids(invoke("requests", "list", "--domain", "ALICE", "--json")) == [2, 1]
    assert ids(invoke("requests", "list", "--domain", "%", "--json")) == []  # no wildcards
    assert ids(invoke("requests", "list", "--type", "on-date", "--json")) == [2]
    assert ids(invoke("requests", "list", "--due-before", "2026-12-15", "--json")) == [3, 1]
    assert ids(invoke("requests", "list", "--due-before", "2026-12-16", "--json")) == [3, 2, 1]
    assert ids(invoke("requests", "list", "--due-before", "2026-11-25", "--type", "end-of-period", "--json")) == [1]
    assert ids(invoke("requests", "list", "--due-before", "2026-11-24", "--json")) == []
    assert ids(invoke("requests", "list", "--client", "2", "--status", "pending", "--json")) == [3]
    one_line_error(invoke("requests", "list", "--due-before", "soon"), "--due-before", "YYYY-MM-DD")
    one_line_error(invoke("requests", "list", "--type", "later"), "--type")


def test_services_list_by_domain_and_external_ids_shown(invoke: Invoke, desk: Database) -> None:
    assert ids(invoke("services", "list", "--domain", "www.novak", "--json")) == [3]
    table = ok(invoke("services", "list", "--domain", "alice")).stdout.splitlines()
    assert table[0].split()[:2] == ["ID", "EXTERNAL_ID"] and "S-1001" in table[1]
    shown = as_json(invoke("services", "show", "ext:S-1001", "--json"))
    assert [a["external_id"] for a in shown["addons"]] == ["AD-1"]
    assert [i["external_id"] for i in shown["invoices"]] == ["INV-1"]
    text = ok(invoke("services", "show", "1")).stdout
    assert "AD-1" in text and "INV-1" in text and "R-1" in text
    with desk.read_session() as s:
        assert s.scalar(select(func.count()).select_from(OutboxEmail)) == 0


# --- find ---------------------------------------------------------------------------------

def test_find_by_domain_email_name_and_external_id(invoke: Invoke, desk: Database) -> None:
    found = as_json(invoke("find", "novak", "--json"))
    assert [c["id"] for c in found["clients"]["rows"]] == [2]  # the name and the email
    assert [s["id"] for s in found["services"]["rows"]] == [3]
    assert [r["id"] for r in found["requests"]["rows"]] == [3]  # the service's request comes with it
    assert not any(found[kind]["more"] for kind in ("clients", "services", "requests"))

    email = as_json(invoke("find", "ALICE@example.TEST", "--json"))  # a client: their services and requests
    assert ([c["id"] for c in email["clients"]["rows"]], [s["id"] for s in email["services"]["rows"]],
            [r["id"] for r in email["requests"]["rows"]]) == ([1], [1, 2], [1, 2])
    whole = as_json(invoke("find", "www.novak.test", "--match", "whole", "--json"))
    assert [s["id"] for s in whole["services"]["rows"]] == [3]
    assert as_json(invoke("find", "www.novak", "--match", "whole", "--json"))["services"]["rows"] == []  # not whole
    start = as_json(invoke("find", "WWW.nov", "--match", "start", "--json"))
    assert [s["id"] for s in start["services"]["rows"]] == [3] and start["clients"]["rows"] == []
    assert as_json(invoke("find", "novak.test", "--match", "start", "--json"))["services"]["rows"] == []
    assert [c["id"] for c in as_json(invoke("find", "bob@", "--match", "start", "--json"))["clients"]["rows"]] == [2]
    assert as_json(invoke("find", "b_b", "--match", "start", "--json"))["clients"]["rows"] == []  # no wildcards
    # Whole matches first, then starts, then any part (by id within each pass): "blog.alice.test"
    # is the whole domain of service 2, and part of none other.
    assert [s["id"] for s in as_json(invoke("find", "alice.test", "--json"))["services"]["rows"]] == [1, 2]
    assert [s["id"] for s in as_json(invoke("find", "blog.alice.test", "--json"))["services"]["rows"]] == [2]
    by_ext = as_json(invoke("find", "S-1002", "--json"))
    assert [s["id"] for s in by_ext["services"]["rows"]] == [2] and by_ext["clients"]["rows"] == []
    assert [r["id"] for r in as_json(invoke("find", "r-3", "--json"))["requests"]["rows"]] == [3]
    for addon_or_invoice in ("AD-1", "INV-1"):  # whole ids: their service, and its requests
        found = as_json(invoke("find", addon_or_invoice, "--match", "whole", "--json"))
        assert [s["id"] for s in found["services"]["rows"]] == [1]
        assert [r["id"] for r in found["requests"]["rows"]] == [1]
    assert [c["id"] for c in as_json(invoke("find", "martin", "--json"))["clients"]["rows"]] == [1]

    limited = as_json(invoke("find", "alice", "--limit", "1", "--json"))
    assert [s["id"] for s in limited["services"]["rows"]] == [1] and limited["services"]["more"] is True
    text = ok(invoke("find", "alice", "--limit", "1")).stdout
    assert text.splitlines()[0] == "clients:" and "more than 1 services" in text and "shop.alice.test" in text
    assert ok(invoke("find", "nobody.test")).stdout.strip() == "nothing matches 'nobody.test'"
    assert as_json(invoke("find", "100%", "--json"))["clients"]["rows"] == []  # no wildcards
    one_line_error(invoke("find", "  "), "TEXT")


def test_find_whole_and_start_matches_use_the_indexes(invoke: Invoke, desk: Database, backend: str) -> None:
    """Migration 0008: `find`'s whole and start passes are index lookups, not scans, in
    the form find.py writes them."""
    with desk.session() as session:
        dialect = session.get_bind().dialect.name
        queries = [select(Service.id).where(func.lower(Service.domain) == "x"),
                   select(Service.id).where(find._starts(Service.domain, "x", dialect)),
                   select(Client.id).where(find._starts(Client.email, "x", dialect))]
        if backend == "postgresql":
            session.execute(text("SET enable_seqscan = off"))  # a tiny table: a scan would be cheaper
        for query in queries:
            compiled = query.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
            explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
            plan = " ".join(str(row) for row in session.execute(text(explain + str(compiled))))
            assert "_lower" in plan and ("USING INDEX" in plan or "Index" in plan), f"{compiled}: {plan}"


def test_find_whole_and_start_read_no_table_whole(invoke: Invoke, desk: Database, backend: str) -> None:
    """Every statement `find --match start` sends (whole values, then starts) is answered
    through indexes: none reads the clients, services or requests table from end to end
    (on PostgreSQL an OR with a subquery in it did, taking a second on a million services)."""
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "alembic_version" not in statement:
            statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        for text_ in ("WWW.nov", "alice@example.test", "S-1002", "INV-1", "R-3"):
            ok(invoke("find", text_, "--match", "start", "--json"))
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert statements
    scans = []
    with desk.engine.connect() as conn:
        if backend == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")  # tiny tables: make a scan show only when it must be
        for statement, parameters in statements:
            explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
            plan = [str(row[-1]) for row in conn.exec_driver_sql(explain + statement, parameters)]
            scans += [(statement, line) for line in whole_table_reads(plan)]
    assert not scans, "\n\n".join(f"{line}\n  in {statement}" for statement, line in scans)


TABLES = r"(clients|services|cancellation_requests)"


def whole_table_reads(plan: list[str]) -> list[str]:
    """The lines of a plan that read one of the big tables from end to end: SQLite's
    `SCAN table` (without an index), PostgreSQL's Seq Scan, or its Index Scan with no
    Index Cond (the whole table in index order, each row filtered)."""
    found = []
    for n, line in enumerate(plan):
        if re.search(rf"^SCAN {TABLES}\b(?! USING)", line.strip()) or re.search(rf"Seq Scan on {TABLES}\b", line):
            found.append(line)
        elif re.search(rf"Index (Only )?Scan using \S+ on {TABLES}\b", line):
            depth = len(line) - len(line.lstrip(" ->"))
            details = []
            for below in plan[n + 1:]:
                if "->" in below or len(below) - len(below.lstrip()) <= depth:
                    break
                details.append(below)
            if not any("Index Cond" in d for d in details):
                found.append(line)
    return found
