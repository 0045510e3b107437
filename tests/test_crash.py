"""Real processes, killed and raced: DESIGN.md guarantees 1, 2 and 7.

Each test spawns `python -m processor` subprocesses on a SQLite database filled with a few
thousand requests, and checks the outcome on the database itself (never on the processes'
own reports):

* test_kill_9_loses_nothing_and_does_nothing_twice: `run` is killed with SIGKILL at seeded
  random moments (before its first chunk commits, in the middle, near the end), again and
  again; then a run finishes the rest. Every due request is applied exactly once, nothing
  that was not due is touched, the killed runs are recorded as abandoned.
* test_two_runs_at_once: two `run` processes started at the same moment; one does all the
  work, the other exits 75 naming the active run; nothing is done twice.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest

from processor import credits, lease
from processor.terms import effective_on
from tests.cli_helpers import error_text, process_env

CHUNK_SIZE = 50
EXIT_LEASE_HELD = 75
CONFIRMATION = "service_cancellation_confirmation"
CHANGED_ENTITIES = {"service", "request", "addon", "invoice"}
PAID_AMOUNT = Decimal("9.99")

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


# --------------------------------------------------------------------------- processes


def cli_env(db_path: Path) -> dict[str, str]:
    # Credits on: the Immediate requests of services with a paid invoice are credited, and
    # the credits must come out exactly once too (assert_credited_exactly_once).
    return process_env(f"sqlite:///{db_path}", CANCELPROC_CHUNK_SIZE=str(CHUNK_SIZE), CANCELPROC_LOG_LEVEL="warning",
                       CANCELPROC_IMMEDIATE_REFUND="credit")


def start(app_root: Path, db_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "processor", *args],
        cwd=app_root, env={**cli_env(db_path), **env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def cli(app_root: Path, db_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        cwd=app_root, env=cli_env(db_path), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    due_requests: set[int]
    not_due_requests: set[int]
    due_services: set[int]
    not_due_services: set[int]
    addons_of_due: int
    addons_of_not_due: int
    unpaid_of_due: int
    unpaid_of_not_due: int
    paid: int
    # Due Immediate requests whose service has a paid invoice (PAID_AMOUNT): request id ->
    # the service's next due date. The others are never credited.
    creditable: dict[int, dt.date] = field(default_factory=dict)
    client_of: dict[int, int] = field(default_factory=dict)  # service id -> client id


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def make_database(app_root: Path, n_requests: int, not_due_every: int, seed: int) -> tuple[Path, Dataset]:
    """`cancelproc init`, then bulk-insert clients, services, add-ons, invoices and requests.

    Request i is not due when i % not_due_every == 0 (End of Billing Period with the next due
    date 10-60 days ahead, or On Date 10-60 days ahead); the others are due (Immediate,
    End of Billing Period with a past or no next due date, On Date in the past). Dates keep a
    margin of a day at least, so the test holds even if it runs across midnight.
    """
    app_root.mkdir(parents=True, exist_ok=True)
    db_path = app_root / "cancelproc.db"
    done = cli(app_root, db_path, "init")
    assert done.returncode == 0, f"init failed: {done.stderr}"

    rng = random.Random(seed)
    today = utc_today()
    created = (dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=3))
    created_s = created.strftime("%Y-%m-%d %H:%M:%S.%f")
    n_clients = max(1, n_requests // 5)
    clients = [(i, f"First{i}", f"Last{i}", "", f"client{i}@example.test", "en", 0) for i in range(1, n_clients + 1)]
    products = [(1, "Shared Hosting", "cpanel"), (2, "Domain Privacy", None)]
    services, requests, addons, invoices = [], [], [], []
    due_requests, not_due_requests, due_services, not_due_services = set(), set(), set(), set()
    counts = dict(addons_of_due=0, addons_of_not_due=0, unpaid_of_due=0, unpaid_of_not_due=0, paid=0)
    creditable: dict[int, dt.date] = {}
    client_of: dict[int, int] = {}
    for i in range(1, n_requests + 1):
        sid = rid = i
        due = i % not_due_every != 0
        cancel_on = None
        if due:  # Immediate and On Date are due whatever the service's next due date
            kind = rng.choice(["immediate", "eobp_past", "eobp_none", "on_date_past"])
            rtype = {"immediate": "Immediate", "eobp_past": "End of Billing Period",
                     "eobp_none": "End of Billing Period", "on_date_past": "On Date"}[kind]
            next_due = {"immediate": today + dt.timedelta(days=rng.randint(5, 40)),
                        "eobp_past": today - dt.timedelta(days=rng.randint(1, 20)),
                        "eobp_none": None,
                        "on_date_past": today + dt.timedelta(days=rng.randint(5, 40))}[kind]
            if kind == "on_date_past":
                cancel_on = today - dt.timedelta(days=rng.randint(1, 10))
            due_requests.add(rid)
            due_services.add(sid)
        else:
            rtype = rng.choice(["End of Billing Period", "On Date"])
            next_due = today + dt.timedelta(days=rng.randint(10, 60))
            if rtype == "On Date":
                cancel_on = today + dt.timedelta(days=rng.randint(10, 60))
            not_due_requests.add(rid)
            not_due_services.add(sid)
        client_of[sid] = rng.randint(1, n_clients)
        if due and kind == "immediate" and i % 3 == 0 and next_due is not None:  # paid below
            creditable[rid] = next_due
        services.append((sid, client_of[sid], rng.choice((1, 2)),
                         f"site{sid}.example.test", "Active", "Monthly", "9.99",
                         next_due.isoformat() if next_due else None, None))
        effective = effective_on(rtype, created_on=created.date(), next_due_date=next_due, cancel_on=cancel_on,
                                 billing_cycle="Monthly", registration_date=None).on
        requests.append((rid, sid, rtype, cancel_on.isoformat() if cancel_on else None, "too_expensive",
                         f"reason {rid}", "pending", created_s, "test", 0, "", effective.isoformat()))
        if i % 4 == 0:  # add-ons on a quarter of the services
            for k in range(1 + i % 2):
                addons.append((len(addons) + 1, sid, f"Addon {k}", "Active", "2.00"))
                counts["addons_of_due" if due else "addons_of_not_due"] += 1
        if i % 3 == 0:  # an unpaid and a paid invoice on a third of them
            invoices.append((len(invoices) + 1, sid, "9.99", "Unpaid", today.isoformat()))
            invoices.append((len(invoices) + 1, sid, str(PAID_AMOUNT), "Paid",
                             (today - dt.timedelta(days=30)).isoformat()))
            counts["unpaid_of_due" if due else "unpaid_of_not_due"] += 1
            counts["paid"] += 1

    con = sqlite3.connect(db_path)
    try:
        with con:
            con.executemany("INSERT INTO clients (id, first_name, last_name, company_name, email, language, balance)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)", clients)
            con.executemany("INSERT INTO products (id, name, module) VALUES (?, ?, ?)", products)
            con.executemany("INSERT INTO services (id, client_id, product_id, domain, status, billing_cycle, amount,"
                            " next_due_date, termination_date) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", services)
            con.executemany("INSERT INTO service_addons (id, service_id, name, status, amount)"
                            " VALUES (?, ?, ?, ?, ?)", addons)
            con.executemany("INSERT INTO invoices (id, service_id, amount, status, due_date) VALUES (?, ?, ?, ?, ?)",
                            invoices)
            con.executemany("INSERT INTO cancellation_requests (id, service_id, type, cancel_on, reason_code, reason,"
                            " status, created_at, created_by, attempts, note, effective_date)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            requests)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all in the main file: copy_database copies it
    finally:
        con.close()
    return db_path, Dataset(due_requests, not_due_requests, due_services, not_due_services, **counts,
                            creditable=creditable, client_of=client_of)


def copy_database(src: Path, app_root: Path) -> Path:
    """A fresh copy of a filled database (make_database checkpointed its WAL into the file)."""
    app_root.mkdir(parents=True, exist_ok=True)
    dst = app_root / "cancelproc.db"
    shutil.copyfile(src, dst)
    return dst


def query(db_path: Path, sql: str, *params: object) -> list[tuple]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def scalar(db_path: Path, sql: str, *params: object) -> object:
    return query(db_path, sql, *params)[0][0]


def completed_count(db_path: Path) -> int:
    return int(scalar(db_path, "SELECT count(*) FROM cancellation_requests WHERE status = 'completed'"))


def wait_for_run_row(db_path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Until the process has created its run row (taken the lease), or has exited."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if query(db_path, "SELECT 1 FROM runs WHERE pid = ?", proc.pid):
            return
        time.sleep(0.005)


def wait_for_first_commit(db_path: Path, proc: subprocess.Popen[str], before: int, timeout: float = 120) -> None:
    """Until the process has completed a request (its first chunk is committed), or has exited."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if completed_count(db_path) > before:
            return
        time.sleep(0.005)


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not path.exists():
        time.sleep(0.005)


# A PreCronJob hook that says it was reached, then waits to be killed: a kill after the run
# took its lease and wrote its run row, before its first commit, whatever the machine's speed.
HOLD_AT_START = """import os, time
from pathlib import Path
from processor.hooks import add_hook

@add_hook("PreCronJob")
def hold(run_id):
    Path(os.environ["HOOKTEST_REACHED"]).write_text(str(run_id))
    while True:
        time.sleep(1)
"""


# The same, but it lets the run go on once the test says so (or after five minutes).
HOLD_UNTIL_RELEASED = """import os, time
from pathlib import Path
from processor.hooks import add_hook

@add_hook("PreCronJob")
def hold(run_id):
    Path(os.environ["HOOKTEST_REACHED"]).write_text(str(run_id))
    release, deadline = Path(os.environ["HOOKTEST_RELEASE"]), time.monotonic() + 300
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
"""


def pending_due_count(db_path: Path, data: Dataset) -> int:
    rows = query(db_path, "SELECT id FROM cancellation_requests WHERE status = 'pending'")
    return sum(1 for (rid,) in rows if rid in data.due_requests)


def utc_seconds(text: str) -> float:
    """A naive UTC datetime column value as a POSIX timestamp."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


# --------------------------------------------------------------------------- the checks


def assert_applied_exactly_once(db_path: Path, data: Dataset) -> list[tuple]:
    """Guarantee 1 on the database: every due request applied once, nothing else touched.

    Returns the runs table (id, pid, status, due, completed, emails_queued) for the caller.
    """
    n_due = len(data.due_requests)

    # Requests: due ones completed exactly once (attempts counts the committed applications).
    requests = {r[0]: r[1:] for r in query(
        db_path, "SELECT id, status, processed_at, run_id, attempts, last_error FROM cancellation_requests")}
    assert len(requests) == n_due + len(data.not_due_requests)
    not_completed = sorted(rid for rid in data.due_requests if requests[rid][0] != "completed")
    assert not not_completed, f"{len(not_completed)} due requests not completed, e.g. {not_completed[:10]}"
    bad = sorted(rid for rid in data.due_requests
                 if requests[rid][1] is None or requests[rid][2] is None or requests[rid][3] != 1
                 or requests[rid][4] is not None)
    assert not bad, f"{len(bad)} completed requests without processed_at/run_id, or attempts != 1: " \
                    f"{[(rid, requests[rid]) for rid in bad[:5]]}"
    touched = sorted(rid for rid in data.not_due_requests if requests[rid] != ("pending", None, None, 0, None))
    assert not touched, f"{len(touched)} requests that were not due were touched: " \
                        f"{[(rid, requests[rid]) for rid in touched[:5]]}"
    run_of = {rid: requests[rid][2] for rid in data.due_requests}

    # Services: due ones Cancelled with the as-of date of the run that applied them.
    as_of = dict(query(db_path, "SELECT id, as_of FROM runs"))
    services = {r[0]: r[1:] for r in query(db_path, "SELECT id, status, termination_date FROM services")}
    wrong = sorted(sid for sid in data.due_services
                   if services[sid] != ("Cancelled", as_of[run_of[sid]]))  # service id == request id
    assert not wrong, f"{len(wrong)} due services not Cancelled with the run's termination date: " \
                      f"{[(sid, services[sid]) for sid in wrong[:5]]}"
    touched = sorted(sid for sid in data.not_due_services if services[sid] != ("Active", None))
    assert not touched, f"{len(touched)} services that were not due were touched: {touched[:10]}"

    # Add-ons and invoices: those of cancelled services cancelled, the others untouched.
    addons = query(db_path, "SELECT service_id, status, count(*) FROM service_addons GROUP BY 1, 2")
    addon_states = {(sid in data.due_services, status): 0 for sid, status, _ in addons}
    for sid, status, n in addons:
        addon_states[(sid in data.due_services, status)] += n
    assert addon_states == {(True, "Cancelled"): data.addons_of_due, (False, "Active"): data.addons_of_not_due}, \
        f"add-ons by (service was due, status): {addon_states}"
    invoices = query(db_path, "SELECT service_id, status, count(*) FROM invoices GROUP BY 1, 2")
    invoice_states: dict[tuple[bool, str], int] = {}
    for sid, status, n in invoices:
        key = (sid in data.due_services, status)
        invoice_states[key] = invoice_states.get(key, 0) + n
    paid_of_due = data.unpaid_of_due  # one paid invoice next to each unpaid one
    assert invoice_states == {(True, "Cancelled"): data.unpaid_of_due, (True, "Paid"): paid_of_due,
                              (False, "Unpaid"): data.unpaid_of_not_due,
                              (False, "Paid"): data.paid - paid_of_due}, \
        f"invoices by (service was due, status): {invoice_states}"

    # Outbox: one confirmation per completed request, queued by the run that applied it.
    # (Other messages, such as a staff digest, are not about one request.)
    outbox = query(db_path, 'SELECT request_id, "key", run_id, template FROM email_outbox')
    others = [row for row in outbox if row[3] != CONFIRMATION]
    assert all(rid is None for rid, *_ in others), f"unexpected emails about requests: {others[:5]}"
    outbox = [row for row in outbox if row[3] == CONFIRMATION]
    per_request: dict[int, int] = {}
    for rid, *_ in outbox:
        per_request[rid] = per_request.get(rid, 0) + 1
    twice = {rid: n for rid, n in per_request.items() if n != 1}
    assert not twice, f"{len(twice)} requests have more than one outbox row, e.g. {list(twice.items())[:10]}"
    assert set(per_request) == data.due_requests, \
        f"outbox rows for {len(per_request)} requests, {n_due} were due"
    assert len({key for _, key, _, _ in outbox}) == len(outbox) == n_due
    odd = [row for row in outbox if row[1] != f"{CONFIRMATION}:request:{row[0]}" or row[2] != run_of[row[0]]]
    assert not odd, f"{len(odd)} outbox rows with a wrong key or run_id: {odd[:5]}"

    # Audit trail: one row per change, each by the run that applied the request; no row
    # about a request that was not due.
    audit = query(db_path, "SELECT entity, action, entity_id, request_id, run_id FROM audit_log")
    by_kind: dict[tuple[str, str], int] = {}
    service_cancelled: dict[int, int] = {}
    cancelled_for_request: dict[int, int] = {}  # the service row names the request that cancelled it
    for entity, action, entity_id, rid, run_id in audit:
        row = (entity, action, entity_id, rid, run_id)
        if rid is not None:
            assert rid in data.due_requests and run_id == run_of[rid], \
                f"audit row {row} is about a request that was not due, or by another run than the one applying it"
        if entity not in CHANGED_ENTITIES:
            continue
        assert rid is not None, f"audit row {row} names no request"
        by_kind[(entity, action)] = by_kind.get((entity, action), 0) + 1
        if (entity, action) == ("service", "cancelled"):
            service_cancelled[entity_id] = service_cancelled.get(entity_id, 0) + 1
            cancelled_for_request[rid] = cancelled_for_request.get(rid, 0) + 1
    twice = {sid: n for sid, n in service_cancelled.items() if n != 1}
    assert not twice, f"{len(twice)} services have more than one 'cancelled' audit row: {list(twice.items())[:10]}"
    assert set(service_cancelled) == data.due_services
    twice = {rid: n for rid, n in cancelled_for_request.items() if n != 1}
    assert not twice, f"{len(twice)} requests cancelled their service more than once: {list(twice.items())[:10]}"
    assert set(cancelled_for_request) == data.due_requests
    assert by_kind == {("service", "cancelled"): n_due,
                       ("addon", "cancelled"): data.addons_of_due, ("invoice", "cancelled"): data.unpaid_of_due}, \
        f"audit rows by (entity, action): {by_kind}"

    # Runs: each run's counts match what it committed (they are written in the chunk's
    # transaction); no run is left running and no lease is left behind.
    runs = query(db_path, "SELECT id, pid, status, due, completed, emails_queued FROM runs ORDER BY id")
    applied_by = dict(query(db_path, "SELECT run_id, count(*) FROM cancellation_requests"
                                     " WHERE run_id IS NOT NULL GROUP BY 1"))
    queued_by = dict(query(db_path, "SELECT run_id, count(*) FROM email_outbox WHERE template = ? GROUP BY 1",
                           CONFIRMATION))
    for run_id, _pid, status, due, completed, queued in runs:
        assert status != "running", f"run {run_id} is still 'running' after the last run finished"
        assert completed == applied_by.get(run_id, 0) == queued == queued_by.get(run_id, 0), \
            f"run {run_id} ({status}) counts {completed} completed / {queued} emails, but " \
            f"{applied_by.get(run_id, 0)} requests / {queued_by.get(run_id, 0)} emails carry its id"
        assert due == completed, f"run {run_id}: due {due} != completed {completed} (no failures expected)"
    assert sum(r[4] for r in runs) == n_due
    leases = query(db_path, "SELECT name, run_id, pid FROM leases")
    assert leases == [], f"a lease was left behind: {leases}"
    assert_credited_exactly_once(db_path, data, run_of, as_of)
    return runs


def assert_credited_exactly_once(db_path: Path, data: Dataset, run_of: dict[int, int],
                                 as_of: dict[int, str]) -> None:
    """Credits for unused time (immediate_refund = "credit"): one per credited request, by
    the run that applied it, of the amount the rule gives for that run's as-of date; each
    client's balance (0 before) lowered by the sum of its credits; one audit row each."""
    rows = query(db_path, "SELECT request_id, client_id, service_id, run_id, amount FROM credits")
    per_request: dict[int, int] = {}
    for rid, *_ in rows:
        per_request[rid] = per_request.get(rid, 0) + 1
    twice = {rid: n for rid, n in per_request.items() if n != 1}
    assert not twice, f"{len(twice)} requests were credited more than once: {list(twice.items())[:10]}"
    expected = {}
    for rid, next_due in data.creditable.items():
        credit = credits.unused_credit(data.client_of[rid], credits.PaidInvoice(0, PAID_AMOUNT), next_due, "Monthly",
                                       dt.date.fromisoformat(str(as_of[run_of[rid]])))
        if credit is not None:
            expected[rid] = (data.client_of[rid], rid, run_of[rid], credit.amount)
    got = {rid: (client_id, sid, run_id, Decimal(str(amount))) for rid, client_id, sid, run_id, amount in rows}
    assert expected, "no request of the data set is credited: the credit checks test nothing"
    wrong = {rid: (got.get(rid), expected.get(rid)) for rid in set(got) | set(expected)
             if got.get(rid) != expected.get(rid)}
    assert not wrong, f"{len(wrong)} credits differ from the rule (got, expected): {list(wrong.items())[:5]}"
    owed: dict[int, Decimal] = {}
    for client_id, _sid, _run, amount in got.values():
        owed[client_id] = owed.get(client_id, Decimal(0)) - amount
    # SQLite keeps NUMERIC as a REAL: to the cent, as the ORM reads it back.
    balances = {cid: Decimal(str(b)).quantize(credits.CENT)
                for cid, b in query(db_path, "SELECT id, balance FROM clients")}
    off = {cid: (b, owed.get(cid, Decimal(0))) for cid, b in balances.items() if b != owed.get(cid, Decimal(0))}
    assert not off, f"{len(off)} clients' balances are not minus the sum of their credits: {list(off.items())[:5]}"
    audited = query(db_path, "SELECT request_id, count(*) FROM audit_log WHERE action = 'credited' GROUP BY 1")
    assert dict(audited) == dict.fromkeys(got, 1), "not one 'credited' audit row per credit"


# --------------------------------------------------------------------------- guarantees 1 and 2


N_REQUESTS = 4800  # 4,000 due, 800 not due
KILLS = 10
EARLY_KILLS = 2  # of them, at the start-up: after the run row, before the first commit
SEED = 20261126


@pytest.mark.slow
def test_kill_9_loses_nothing_and_does_nothing_twice(tmp_path: Path) -> None:
    template, data = make_database(tmp_path / "template", n_requests=N_REQUESTS, not_due_every=6, seed=SEED)
    assert len(data.due_requests) == 4000 and data.addons_of_due and data.unpaid_of_not_due

    # Calibrate on a copy: how long the process takes to start (Popen to the run's
    # started_at) and to apply a request, so that the kills below land all over a run.
    calibration = copy_database(template, tmp_path / "calibration")
    t0 = time.time()
    done = cli(tmp_path / "calibration", calibration, "run", "--trigger", "cron")
    assert done.returncode == 0, done.stderr
    assert_applied_exactly_once(calibration, data)  # the same checks hold for a run never killed
    started = utc_seconds(str(scalar(calibration, "SELECT started_at FROM runs")))
    last_commit = utc_seconds(str(scalar(calibration, "SELECT max(processed_at) FROM cancellation_requests")))
    startup = max(0.05, started - t0)
    per_request = max(1e-5, (last_commit - started) / len(data.due_requests))

    db_path = copy_database(template, tmp_path / "app")
    (tmp_path / "hold").mkdir()
    (tmp_path / "hold" / "hold_at_start.py").write_text(HOLD_AT_START)
    rng = random.Random(SEED)
    plan = ["early"] * EARLY_KILLS + ["mid"] * (KILLS - EARLY_KILLS)
    rng.shuffle(plan)
    kills: list[dict[str, object]] = []
    for aim in plan:
        before = completed_count(db_path)
        remaining = pending_due_count(db_path, data)
        if aim == "early":  # held by a hook at PreCronJob: killed there, before its first commit
            reached = tmp_path / f"reached-{len(kills)}"
            proc = start(tmp_path / "app", db_path, "run", "--trigger", "cron",
                         CANCELPROC_HOOKS_DIR=str(tmp_path / "hold"), HOOKTEST_REACHED=str(reached))
            wait_for_file(reached, proc)
            delay = 0.0
        else:
            # Counted from its first commit (start-up times vary a lot on a busy machine):
            # somewhere in the first half of what is left, so later kills find work.
            proc = start(tmp_path / "app", db_path, "run", "--trigger", "cron")
            wait_for_first_commit(db_path, proc, before)
            delay = rng.uniform(0.0, 0.5) * remaining * per_request
        time.sleep(delay)
        exited_first = proc.poll() is not None
        if not exited_first:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # reaps it, as cron would: its pid no longer exists
        assert proc.returncode != EXIT_LEASE_HELD, \
            f"the run after a killed run exited 75 instead of taking over the dead run's lease: {err.strip()}"
        if exited_first:  # it finished before the kill (all the work was done)
            assert proc.returncode == 0, f"run exited {proc.returncode} before the kill: {err.strip()}"
        else:
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
        kills.append(dict(aim=aim, delay=round(delay, 3), pid=proc.pid, killed=not exited_first,
                          before=before, after=completed_count(db_path), left=pending_due_count(db_path, data)))

    final = cli(tmp_path / "app", db_path, "run", "--trigger", "cron")
    assert final.returncode == 0, \
        f"the run after the kills exited {final.returncode} (75: it did not take over the dead run's lease): " \
        f"{final.stderr.strip()}"
    rerun = cli(tmp_path / "app", db_path, "run", "--trigger", "cron")
    assert rerun.returncode == 0, rerun.stderr

    # Guarantees 1 and 2: everything due applied exactly once, nothing else touched.
    runs = assert_applied_exactly_once(db_path, data)

    run_of_pid = {pid: (run_id, status, completed) for run_id, pid, status, _due, completed, _q in runs}
    for k in kills:
        k["run"] = run_of_pid.get(k["pid"], (None, "no run row", 0))[1]
    mid_run = [k for k in kills if k["killed"] and k["before"] < k["after"] and k["left"]]
    before_first_commit = [k for k in kills if k["killed"] and k["before"] == k["after"] and k["left"]]
    report = (f"{len(mid_run)} of {KILLS} kills landed mid-run (requests completed before and after it), "
              f"{len(before_first_commit)} before the run's first commit "
              f"({sum(k['run'] == 'no run row' for k in before_first_commit)} of them before its run row); "
              f"startup {startup:.2f}s, {per_request * 1000:.3f} ms/request; kills: {kills}")
    print(report)

    # The run records: a killed run that got as far as its run row is 'abandoned' (unless the
    # kill came after it had finished everything), the last two runs 'completed', the rerun
    # with nothing due; every row belongs to one of our processes.
    assert len(runs) == sum(k["run"] != "no run row" for k in kills) + 2, f"unexpected run rows: {runs}"
    for k in kills:
        if k["killed"] and k["run"] != "no run row":
            assert k["run"] == "abandoned" or (k["run"] == "completed" and k["left"] == 0), \
                f"killed run (pid {k['pid']}) recorded as {k['run']!r}, not 'abandoned': {runs}"
            assert k["after"] - k["before"] == run_of_pid[k["pid"]][2], (k, runs)
        elif not k["killed"]:
            assert k["run"] == "completed", k
    abandoned = query(db_path, "SELECT id, finished_at, error FROM runs WHERE status = 'abandoned'")
    assert all(f is not None and e == lease.ABANDONED for _, f, e in abandoned), abandoned
    assert [r[2] for r in runs[-2:]] == ["completed", "completed"], runs
    assert runs[-2][4] == kills[-1]["left"], f"the final run did not apply exactly what was left: {report}"
    assert runs[-1][3] == 0, f"the rerun found work after a run had finished: {runs[-1]}"

    # The kills really interrupted runs at different points.
    assert len(mid_run) >= 3, f"too few kills interrupted a run in its middle: {report}"
    assert before_first_commit, f"no kill landed before a run's first commit: {report}"



# --------------------------------------------------------------------------- guarantee 7


ROUNDS = 4
LEASE_HELD_LINE = re.compile(r"^error: run (\d+) in progress on host (\S+) \(pid (\d+)\) since (.+)$")


@pytest.mark.slow
def test_two_runs_at_once(tmp_path: Path) -> None:
    template, data = make_database(tmp_path / "template", n_requests=2400, not_due_every=6, seed=SEED + 7)
    assert len(data.due_requests) == 2000
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "hold_until_released.py").write_text(HOLD_UNTIL_RELEASED)
    outcomes = []
    for n in range(ROUNDS):
        app_root = tmp_path / f"round{n}"
        db_path = copy_database(template, app_root)
        if n == 0:
            # Overlapping for certain: the first run is held at PreCronJob, holding the lease,
            # until the second has started and ended. The other rounds race as cron makes them.
            reached, release = app_root / "reached", app_root / "release"
            a = start(app_root, db_path, "run", "--trigger", "cron", CANCELPROC_HOOKS_DIR=str(tmp_path / "held"),
                      HOOKTEST_REACHED=str(reached), HOOKTEST_RELEASE=str(release))
            try:
                wait_for_file(reached, a)
                b = start(app_root, db_path, "run", "--trigger", "cron")
                b.wait(timeout=120)
            finally:
                release.touch()
        else:
            a = start(app_root, db_path, "run", "--trigger", "cron")
            b = start(app_root, db_path, "run", "--trigger", "cron")
        results = {p.pid: (p, *p.communicate(timeout=120)) for p in (a, b)}
        codes = sorted(p.returncode for p, _, _ in results.values())
        outcomes.append(codes)
        errors = {pid: err.strip() for pid, (_, _, err) in results.items()}

        runs = assert_applied_exactly_once(db_path, data)  # nothing done twice, nothing lost
        if codes == [0, EXIT_LEASE_HELD]:
            winner = next(p for p, _, _ in results.values() if p.returncode == 0)
            loser = next(p for p, _, _ in results.values() if p.returncode == EXIT_LEASE_HELD)
            assert len(runs) == 1, f"round {n}: the run that exited 75 left a run row: {runs}"
            run_id, pid, status, due, completed, _ = runs[0]
            assert (pid, status, completed) == (winner.pid, "completed", 2000), runs
            lines = errors[loser.pid].splitlines()
            assert len(lines) == 1, f"round {n}: exit 75 should print one line, got: {errors[loser.pid]!r}"
            match = LEASE_HELD_LINE.match(error_text(lines[0]))  # a JSON line, as in the cron log
            assert match, f"round {n}: exit 75 does not name the active run: {lines[0]!r}"
            assert (int(match[1]), match[2], int(match[3])) == (run_id, socket.gethostname(), winner.pid), \
                f"round {n}: {lines[0]!r} names another run than run {run_id} (pid {winner.pid})"
        elif codes == [0, 0]:
            # The second one came after the first had finished: it found nothing due.
            assert [(r[2], r[4]) for r in runs] == [("completed", 2000), ("completed", 0)], runs
            (first_finished, second_started), = query(
                db_path,
                "SELECT (SELECT finished_at FROM runs WHERE id = ?), (SELECT started_at FROM runs WHERE id = ?)",
                runs[0][0], runs[1][0])
            assert second_started >= first_finished, f"round {n}: both runs held the lease at once: {runs}"
        else:
            pytest.fail(f"round {n}: exit codes {codes}, expected 0 and 75 (or 0 and 0): {errors}")
    print(f"exit codes per round: {outcomes}")
    assert outcomes[0] == [0, EXIT_LEASE_HELD], f"the held run did not keep the other out: {outcomes}"


# --------------------------------------------------------------------------- reminders (issue 14, item 2)


# A CancellationReminder hook that lets HOOKTEST_HOLD_AT - 1 reminders through, then says it
# was reached and waits to be killed: a kill in the middle of the reminders, after some of
# their chunks committed and with one in flight, whatever the machine's speed.
HOLD_AT_REMINDER = """import os, time
from pathlib import Path
from processor.hooks import add_hook

CALLS = []

@add_hook("CancellationReminder")
def hold(request_id):
    CALLS.append(request_id)
    if len(CALLS) >= int(os.environ["HOOKTEST_HOLD_AT"]):
        Path(os.environ["HOOKTEST_REACHED"]).write_text(str(request_id))
        while True:
            time.sleep(1)
"""

REMINDER = "cancellation_reminder"


@pytest.mark.slow
def test_kill_9_during_reminders_queues_each_exactly_once(tmp_path: Path) -> None:
    """Runs killed with SIGKILL in the middle of their reminders (held by a hook after one
    chunk and a half), twice; then a run does the rest. Each reminder due is queued
    exactly once, with its key; the killed runs' committed chunks stay."""
    app_root = tmp_path / "app"
    db_path, data = make_database(app_root, n_requests=600, not_due_every=2, seed=SEED + 14)
    today = utc_today()
    # The not-due requests take effect 1 to 7 days from today; made 20 days ago (before
    # every reminder day): 1 day ahead gets the 1-day reminder, the others the 7-day one.
    ahead = {rid: 1 + rid % 7 for rid in data.not_due_requests}
    con = sqlite3.connect(db_path)
    try:
        with con:
            created = (dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=20))
            con.execute("UPDATE cancellation_requests SET created_at = ?",
                        (created.strftime("%Y-%m-%d %H:%M:%S.%f"),))
            for rid, days in ahead.items():  # service id == request id
                effective = (today + dt.timedelta(days=days)).isoformat()
                con.execute("UPDATE services SET next_due_date = ? WHERE id = ?", (effective, rid))
                con.execute("UPDATE cancellation_requests SET cancel_on = ? WHERE id = ? AND type = 'On Date'",
                            (effective, rid))
                # The date the run goes by, stored when a request is made (as an import recomputes it).
                con.execute("UPDATE cancellation_requests SET effective_date = ? WHERE id = ?", (effective, rid))
    finally:
        con.close()
    expected = {f"{REMINDER}:request:{rid}:{1 if days == 1 else 7}" for rid, days in ahead.items()}
    assert len(expected) == 300
    hooks = tmp_path / "hold"
    hooks.mkdir()
    (hooks / "hold_at_reminder.py").write_text(HOLD_AT_REMINDER)

    def reminder_keys() -> list[str]:
        return [k for (k,) in query(db_path, 'SELECT "key" FROM email_outbox WHERE template = ?', REMINDER)]

    for kill in range(2):
        reached = tmp_path / f"reached-{kill}"
        proc = start(app_root, db_path, "run", "--trigger", "cron", CANCELPROC_HOOKS_DIR=str(hooks),
                     HOOKTEST_REACHED=str(reached), HOOKTEST_HOLD_AT=str(CHUNK_SIZE + CHUNK_SIZE // 2))
        try:
            wait_for_file(reached, proc)
            assert reached.exists(), f"the run never reached its reminders: {proc.communicate(timeout=60)}"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        # Its first chunk of reminders committed, the one in flight did not.
        assert len(reminder_keys()) == CHUNK_SIZE * (kill + 1)
    assert completed_count(db_path) == len(data.due_requests)  # the due ones went in the first run

    final = cli(app_root, db_path, "run", "--trigger", "cron")
    assert final.returncode == 0, final.stderr
    again = cli(app_root, db_path, "run", "--trigger", "cron")  # the same night again: nothing more
    assert again.returncode == 0, again.stderr
    keys = reminder_keys()
    assert len(keys) == len(set(keys)) == 300, "a reminder was queued twice (or lost)"
    assert set(keys) == expected
    # Each belongs to the run that committed it; the killed runs are abandoned.
    runs = query(db_path, "SELECT id, status FROM runs ORDER BY id")
    assert [s for _, s in runs] == ["abandoned", "abandoned", "completed", "completed"], runs
    per_run = dict(query(db_path, "SELECT run_id, count(*) FROM email_outbox WHERE template = ? GROUP BY 1",
                         REMINDER))
    assert per_run == {runs[0][0]: CHUNK_SIZE, runs[1][0]: CHUNK_SIZE, runs[2][0]: 300 - 2 * CHUNK_SIZE}
# --------------------------------------------------------------------------- the grace period


GRACE_DAYS = 3
SUSPENDED_EMAIL = "service_suspended_for_cancellation"


def progress_count(db_path: Path) -> int:
    """Requests a run has done something to: completed, or suspended for a grace period."""
    return int(scalar(db_path, "SELECT count(*) FROM cancellation_requests "
                               "WHERE status = 'completed' OR suspended_on IS NOT NULL"))


def kill_mid_run(app_root: Path, db_path: Path, delay: float, progress: Callable[[Path], int],
                 *args: str) -> bool:
    """Start `run ARGS`, kill it with SIGKILL `delay` seconds after its first commit
    (`progress` grew); True if the kill landed before it finished (with no delay, it has
    a chunk of 50 out of hundreds done: it has)."""
    before = progress(db_path)
    proc = start(app_root, db_path, "run", "--trigger", "cron", *args)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and progress(db_path) == before:
            time.sleep(0.005)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if killed else 0), (proc.returncode, err)
    return killed


def per_request(db_path: Path, sql: str, *params: object) -> dict[int, int]:
    return {rid: n for rid, n in query(db_path, sql, *params)}


@pytest.mark.slow
def test_kill_9_suspends_once_then_cancels_once(tmp_path: Path) -> None:
    """A product with grace_days (Shared Hosting): runs killed with SIGKILL while they suspend,
    then a run that finishes; later runs killed while they cancel, then one that finishes.
    Each such service is suspended once with one email, later cancelled once with one
    confirmation; the other product's services are cancelled once at the first night."""
    app_root = tmp_path / "app"
    db_path, data = make_database(app_root, n_requests=1500, not_due_every=10**9, seed=SEED + 14)
    with (app_root / "config" / "processor.toml").open("a") as config:
        config.write(f'\n[products."Shared Hosting"]\ngrace_days = {GRACE_DAYS}\n')
    # Every request Immediate, made ten days ago: due on a night five days ago (--as-of), when
    # the graced ones are suspended; their grace period has ended by today.
    first_night = utc_today() - dt.timedelta(days=5)
    created = (dt.datetime.now(dt.UTC) - dt.timedelta(days=10)).strftime("%Y-%m-%d %H:%M:%S.%f")
    con = sqlite3.connect(db_path)
    try:
        with con:
            con.execute("UPDATE cancellation_requests SET type = 'Immediate', cancel_on = NULL, created_at = ?, "
                        "effective_date = ?", (created, created[:10]))  # Immediate: the day it was made
    finally:
        con.close()
    graced = {rid for (rid,) in query(db_path, "SELECT r.id FROM cancellation_requests r JOIN services s "
                                               "ON s.id = r.service_id WHERE s.product_id = 1")}
    plain = data.due_requests - graced
    assert graced and plain

    rng = random.Random(SEED + 14)
    killed = [kill_mid_run(app_root, db_path, delay, progress_count, "--as-of", str(first_night))
              for delay in (0.0, rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.3))]
    done = cli(app_root, db_path, "run", "--trigger", "cron", "--as-of", str(first_night))
    assert done.returncode == 0, done.stderr

    grace_ends = first_night + dt.timedelta(days=GRACE_DAYS)
    states = {rid: rest for rid, *rest in query(
        db_path, "SELECT r.id, r.status, s.status, r.suspended_on, r.grace_ends_on FROM cancellation_requests r "
                 "JOIN services s ON s.id = r.service_id")}
    wrong = {rid: states[rid] for rid in graced
             if states[rid] != ["pending", "Suspended", str(first_night), str(grace_ends)]}
    assert not wrong, f"{len(wrong)} graced requests not suspended as expected: {list(wrong.items())[:5]}"
    assert all(states[rid][:2] == ["completed", "Cancelled"] for rid in plain)
    suspended_audit = per_request(db_path, "SELECT request_id, count(*) FROM audit_log WHERE entity = 'service' "
                                           "AND action = 'suspended' GROUP BY 1")
    assert suspended_audit == dict.fromkeys(graced, 1)
    emails = per_request(db_path, "SELECT request_id, count(*) FROM email_outbox WHERE template = ? GROUP BY 1",
                         SUSPENDED_EMAIL)
    assert emails == dict.fromkeys(graced, 1)
    suspended_by_runs = int(scalar(db_path, "SELECT sum(suspended) FROM runs"))
    assert suspended_by_runs == len(graced), "the runs' suspended counts disagree with what they committed"

    # Nights later: the grace period has ended; runs killed while they cancel.
    killed += [kill_mid_run(app_root, db_path, delay, completed_count) for delay in (0.0, rng.uniform(0.0, 0.3))]
    done = cli(app_root, db_path, "run", "--trigger", "cron")
    assert done.returncode == 0, done.stderr
    states = dict(query(db_path, "SELECT r.id, r.status || '/' || s.status FROM cancellation_requests r "
                                 "JOIN services s ON s.id = r.service_id"))
    assert set(states.values()) == {"completed/Cancelled"}, set(states.values())
    cancelled = per_request(db_path, "SELECT request_id, count(*) FROM audit_log WHERE entity = 'service' "
                                     "AND action = 'cancelled' GROUP BY 1")
    assert cancelled == dict.fromkeys(data.due_requests, 1)
    confirmations = per_request(db_path, "SELECT request_id, count(*) FROM email_outbox WHERE template = ? "
                                         "GROUP BY 1", CONFIRMATION)
    assert confirmations == dict.fromkeys(data.due_requests, 1)
    assert per_request(db_path, "SELECT request_id, count(*) FROM email_outbox WHERE template = ? GROUP BY 1",
                       SUSPENDED_EMAIL) == dict.fromkeys(graced, 1)
    terminated_on = dict(query(db_path, "SELECT id, termination_date FROM services"))
    assert {terminated_on[rid] for rid in graced} == {str(utc_today())}  # service id == request id
    assert query(db_path, "SELECT name FROM leases") == []
    print(f"kills that landed before the run finished: {killed}")
    assert killed[0] and killed[3], f"a kill right after a run's first commit came after its end: {killed}"
