#!/usr/bin/env python3
"""Benchmark: `cancelproc run` on N due cancellation requests, against the floor.

    python bench/run_bench.py [N] [--chunk-size K] [--hooks] [--skip-delivery] [--smtp] [--keep] [--setup-only]
                              [--profile] [--postgresql] [--workers W] [--io-bound] [--hook-concurrency K]
                              [--reminders M] [--no-reminders]

1. A temp app root; `python -m processor init` there; then N clients, N services, some
   add-ons and unpaid invoices, and N pending due requests are loaded FAST with stdlib
   sqlite3 (executemany, one transaction) in this process, never in a child.
2. `python -m processor run --trigger manual` as a subprocess: its wall time, the run's own
   duration (runs.finished_at - runs.started_at) and its peak RSS (os.wait4 on that one
   child, so no other child's peak can hide in it). Then N completed requests and N
   outbox rows are checked; anything else fails loudly (exit 1).
   The run does not deliver (email.send_after_run = false): the floor only queues.
3. `python -m processor emails send` as a subprocess, the folder backend: the delivery of
   the N confirmations and the staff digest, timed on its own (wall clock, peak RSS); every
   email must end sent, one .eml file each (--skip-delivery leaves this out). --smtp
   delivers over SMTP instead, to an aiosmtpd server on 127.0.0.1 started here (the
   tests' test extras): every email must end sent and the server must have had each.
4. shared/bench/floor.py (next to the repo, as CI clones it) with the same N.
5. Prints the figures; the last line is exactly `ratio: X.XX` (processor rate / floor rate).

--keep keeps the temp folder and prints its path. --setup-only stops after loading (implies
--keep), leaving a database of N pending requests to profile, e.g.
    cd <folder> && CANCELPROC_DATABASE_URL=sqlite:///<folder>/bench.db \
        PYTHONPATH=<repo> python -m cProfile -o run.prof -m processor run --trigger manual
--profile runs the processor under cProfile itself (rates are then inflated by the
profiler) and prints the top functions.

--postgresql does the same on a throwaway PostgreSQL server started here with the tests'
tests/pg_server.py (initdb + pg_ctl, as the `postgres` OS user under root; fsync,
synchronous_commit and full_page_writes off, as for the tests): the data goes in with
psycopg COPY (one transaction, in this process), `run` gets `--workers W` when --workers is
given, the result is checked with psycopg, and the floor is shared/bench/floor_pg.py on its
own database of the same server. With --workers the `run` process's children are the
workers: their peak RSS is each one's VmHWM (the kernel's own high-water mark) read from
/proc every 50 ms while they live (psutil finds them). The server is stopped and its
folder removed at the end, also on failure (--setup-only leaves it running, and says how
to stop it).

--reminders M adds M pending End of Billing Period requests that are not due, taking
effect 7 days (odd ones) or 1 day (even ones) after today: the run queues a reminder
(`cancellation_reminder`, the default reminder_days [7, 1]) for each, after the N due
requests, and the bench checks there are M. The rate stays N / the run's duration, so
it says what the reminders cost a night. --no-reminders sets reminder_days = [] (the
run then does no reminder query at all), to compare.

--io-bound (implies --postgresql; N = 2000 by default) adds a hook file whose
TerminateAccount sleeps 200 ms, as a call to a provisioning API would, runs with the
default settings (--hook-concurrency K and --workers W change them) and reports the wall
time against the target of 30 s; there is no floor comparison (the floor has no hooks).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FLOOR = REPO.parent / "shared" / "bench" / "floor.py"
FLOOR_PG = REPO.parent / "shared" / "bench" / "floor_pg.py"

TARGET_RATE = 15_000  # requests/s at N = 100,000
TARGET_RSS_MB = 150
TARGET_RATE_PG = 6_000  # requests/s on PostgreSQL, one worker
IO_BOUND_N = 2_000  # requests in the I/O-bound case
IO_BOUND_SLEEP_S = 0.2  # what its TerminateAccount hook waits, per request
TARGET_IO_WALL_S = 30  # the I/O-bound case's wall time, run process start to exit
SAMPLE_EVERY_S = 0.05  # how often the workers' peak RSS is read

PRODUCTS = [  # name, provisioning module, billing cycle, amount
    ("Shared Hosting Starter", "cpanel", "Monthly", "4.99"),
    ("Shared Hosting Pro", "cpanel", "Monthly", "9.99"),
    ("VPS 4GB", "proxmox", "Monthly", "24.00"),
    ("Dedicated Server E3", "ipmi", "Quarterly", "249.00"),
    (".com Domain Registration", None, "Annually", "12.99"),
    ("SSL Certificate", None, "Annually", "49.00"),
]
ADDONS = [("Daily Backups", "5.00"), ("Dedicated IP", "3.00"), ("Priority Support", "10.00")]
FIRST = ["Alice", "Bruno", "Chloé", "Dmitri", "Esther", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kavya", "Liam", "Maja", "Nikos", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tariq"]
LAST = ["Martin", "Schmidt", "Rossi", "Novak", "Kowalski", "Haddad", "Okafor", "Tanaka", "García", "Jensen",
        "Iyer", "Murphy", "Lindqvist", "Papadakis", "Ivanova", "Silva", "Baker", "Moreno", "Berg", "Aziz"]
ASCII = str.maketrans("éíá", "eia")


def fail(message: str) -> None:
    print(f"BENCH FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def child_env(database_url: str, chunk_size: int | None, hook_concurrency: int | None = None,
              no_reminders: bool = False) -> dict[str, str]:
    # Only our CANCELPROC_* settings: an operator's own must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELPROC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["CANCELPROC_DATABASE_URL"] = database_url
    env["CANCELPROC_LOG_LEVEL"] = "warning"
    # The run is measured as the floor works: apply and queue. Delivery is measured on its
    # own afterwards (`emails send`, folder backend), so each figure says what it costs.
    env["CANCELPROC_EMAIL__SEND_AFTER_RUN"] = "false"
    if chunk_size:
        env["CANCELPROC_CHUNK_SIZE"] = str(chunk_size)
    if hook_concurrency:
        env["CANCELPROC_HOOK_CONCURRENCY"] = str(hook_concurrency)
    if no_reminders:
        env["CANCELPROC_REMINDER_DAYS"] = "[]"
    return env


TRIVIAL_HOOKS = """\
# Written by bench/run_bench.py --hooks: one trivial hook on every hook point.
from processor.hooks import POINTS, add_hook

for _point in POINTS:
    add_hook(_point, 0, lambda params: None)
"""

# The I/O-bound case: TerminateAccount waits as a call to a provisioning API would. Each
# call also appends one byte to a counter file (O_APPEND: safe from threads and processes),
# so the bench can check that every request's hook ran.
SLOW_TERMINATE_HOOK = """\
# Written by bench/run_bench.py --io-bound: TerminateAccount sleeps {sleep} s per request.
import os
import time

from processor.hooks import add_hook

_CALLS = os.open({counter!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@add_hook("TerminateAccount")
def slow_terminate(params):
    time.sleep({sleep})
    os.write(_CALLS, b".")
"""


def write_hooks(root: Path, files: dict[str, str]) -> Path:
    hooks_dir = root / "bench-hooks"
    hooks_dir.mkdir(exist_ok=True)
    for name, text in files.items():
        (hooks_dir / name).write_text(text)
    return hooks_dir


def ts(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def dataset(n: int, today: dt.date, now: dt.datetime,
            reminders: int = 0) -> Iterator[tuple[str, tuple[str, ...], Iterator[tuple]]]:
    """The bench's data, table by table in foreign-key order: (table, columns, rows). The
    same rows go into SQLite and PostgreSQL (dates, amounts and timestamps as text).
    `reminders`: that many more services and requests, not due, each due a reminder tonight."""
    from processor.demo import REASONS  # the demo's reasons, one per default reason code

    rnd = random.Random(1234)
    yield ("products", ("id", "external_id", "name", "module"),
           ((i, f"P{i}", name, module) for i, (name, module, _, _) in enumerate(PRODUCTS, 1)))

    def clients():
        for i in range(1, n + 1):
            first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST)) % len(LAST)]
            company = f"{last} Consulting Ltd" if i % 5 == 0 else ""
            email = f"{first.lower().translate(ASCII)}.{last.lower().translate(ASCII)}.{i}@example.test"
            balance = "48.00" if i % 50 == 0 else "0.00"
            yield (i, f"C{i}", first, last, company, email, "en", balance)

    yield ("clients", ("id", "external_id", "first_name", "last_name", "company_name", "email", "language",
                       "balance"), clients())

    def services():
        for i in range(1, n + reminders + 1):
            p = (i % len(PRODUCTS)) + 1
            _, module, cycle, amount = PRODUCTS[p - 1]
            domain = f"site{i}.example.test" if module in ("cpanel", None) else f"host{i}.example.test"
            due = today - dt.timedelta(days=i % 30)  # due today or up to 29 days ago: all due
            if i > n:  # --reminders: a week or a day ahead, a reminder due tonight
                due = today + dt.timedelta(days=7 if i % 2 else 1)
            yield (i, f"S{i}", (i - 1) % n + 1, p, domain, "Active", cycle, amount, due.isoformat(), None)

    yield ("services", ("id", "external_id", "client_id", "product_id", "domain", "status", "billing_cycle",
                        "amount", "next_due_date", "termination_date"), services())

    def addons():
        for k, i in enumerate(range(4, n + 1, 4), 1):
            name, amount = ADDONS[k % len(ADDONS)]
            yield (k, f"A{k}", i, name, "Active", amount)

    yield ("service_addons", ("id", "external_id", "service_id", "name", "status", "amount"), addons())

    def invoices():
        for k, i in enumerate(range(3, n + 1, 3), 1):
            due = today - dt.timedelta(days=i % 30)
            yield (k, f"INV{k}", i, PRODUCTS[i % len(PRODUCTS)][3], "Unpaid", due.isoformat())

    yield ("invoices", ("id", "external_id", "service_id", "amount", "status", "due_date"), invoices())

    def requests():
        for i in range(1, n + reminders + 1):
            code, text = REASONS[rnd.randrange(len(REASONS))]
            kind = "Immediate" if i % 10 == 0 and i <= n else "End of Billing Period"
            created = now - dt.timedelta(days=30 + i % 15, seconds=rnd.randrange(86_400))
            # As `requests create` stores it: Immediate the day it was made (UTC), End of Billing
            # Period its service's next due date (never before the day it was made).
            effective = created.date() if kind == "Immediate" else max(today - dt.timedelta(days=i % 30),
                                                                       created.date())
            yield (i, f"R{i}", i, kind, None, code, text, "pending", ts(created), "client", 0, None, None,
                   None, None, None, "", effective.isoformat())

    yield ("cancellation_requests", ("id", "external_id", "service_id", "type", "cancel_on", "reason_code",
                                     "reason", "status", "created_at", "created_by", "attempts", "last_error",
                                     "next_attempt_at", "processed_at", "run_id", "days_late", "note",
                                     "effective_date"),
           requests())


LOADED = ("clients", "products", "services", "service_addons", "invoices", "cancellation_requests")


def load(db_path: Path, n: int, today: dt.date, now: dt.datetime, reminders: int = 0) -> dict[str, int]:
    """Fill the migrated database with realistic data, in this process (not a child)."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("BEGIN")
    for table, columns, rows in dataset(n, today, now, reminders):
        db.executemany(f"INSERT INTO {table}({', '.join(columns)}) VALUES ({','.join('?' * len(columns))})", rows)
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in LOADED}
    db.close()
    return counts


def load_postgresql(dsn: str, n: int, today: dt.date, now: dt.datetime, reminders: int = 0) -> dict[str, int]:
    """The same data into PostgreSQL with COPY, one transaction, in this process (not a child)."""
    import psycopg

    with psycopg.connect(dsn) as conn, conn.cursor() as cur:  # commits at the end of the block
        for table, columns, rows in dataset(n, today, now, reminders):
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        # The ids were given: move each serial on past them, as an insert by the app expects.
        for table in LOADED:
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in LOADED}


def _proc_status(pid: int) -> tuple[int, int] | None:
    """(VmHWM, VmRSS) in bytes from /proc/PID/status; None once the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f if line.startswith((b"VmHWM", b"VmRSS")))
        return int(fields[b"VmHWM"].split()[0]) * 1024, int(fields[b"VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class TreePeaks:
    """The peak RSS of a process's descendants (the workers of `run --workers`), while they live.

    Every SAMPLE_EVERY_S, psutil lists the process tree and each process's VmHWM (the
    kernel's own high-water mark of its RSS) is read from /proc: the peak is exact except for
    growth in a process's last interval before it exits. The sum of the tree's current RSS
    is sampled as well (a lower bound of the tree's true combined peak). Without /proc (not
    Linux), psutil's current RSS stands in for VmHWM: a sampled figure.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.peaks: dict[int, int] = {}  # pid -> peak RSS in bytes
        self.tree_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tree-peaks", daemon=True)

    def __enter__(self) -> TreePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import psutil

        try:
            top = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                pids = [self.pid, *(c.pid for c in top.children(recursive=True))]
            except psutil.NoSuchProcess:
                return
            total = 0
            for pid in pids:
                status = _proc_status(pid)
                if status is None and not os.path.exists("/proc/self/status"):
                    try:
                        rss = psutil.Process(pid).memory_info().rss
                    except psutil.Error:
                        continue
                    status = (rss, rss)
                if status is None:
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), status[0])
                total += status[1]
            self.tree_peak = max(self.tree_peak, total)
            self.samples += 1
            self._stop.wait(SAMPLE_EVERY_S)

    def workers(self) -> list[int]:
        return [peak for pid, peak in self.peaks.items() if pid != self.pid]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a child of ours and the processes it started (run --workers' workers)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.kill()
    proc.wait()


def run_processor(root: Path, env: dict[str, str], profile: Path | None,
                  command: tuple[str, ...] = ("run", "--trigger", "manual"),
                  tree: bool = False) -> tuple[int, float, int, str, str, TreePeaks | None]:
    """A processor command as a subprocess: exit code, wall seconds, peak RSS in bytes (this
    child; Linux folds into it the peaks of the children it waited for, i.e. run --workers'
    workers), output, and with tree=True the peaks of its own process tree (TreePeaks)."""
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "processor", *command]
    out_path, err_path = root / f"{command[0]}.stdout", root / f"{command[0]}.stderr"
    peaks = None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            if tree:
                peaks = TreePeaks(proc.pid)
                peaks.__enter__()
            # wait4: the resource usage of this one child (RUSAGE_CHILDREN would be the max of all).
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        except BaseException:
            if proc.poll() is None:  # Ctrl-C, a signal: leave neither it nor its workers behind
                kill_tree(proc)
            raise
        finally:
            if peaks is not None:
                peaks.__exit__()
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    return (proc.returncode, wall, rss, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
            peaks)


def _seconds(started: Any, finished: Any) -> float:
    """finished - started: ISO text from SQLite, datetimes from psycopg."""
    if isinstance(started, str):
        started, finished = dt.datetime.fromisoformat(started), dt.datetime.fromisoformat(finished)
    return (finished - started).total_seconds()


def verify(connect: Callable[[], Any], n: int, reminders: int = 0) -> float:
    """N completed requests and N outbox rows (and `reminders` reminders), or fail. Returns
    the run's own duration in seconds."""
    db = connect()
    try:
        runs = db.execute("SELECT id, status, started_at, finished_at, due, completed, error FROM runs"
                          " ORDER BY id").fetchall()
        if len(runs) != 1:
            fail(f"expected 1 run record, found {len(runs)}")
        run_id, status, started, finished, due, completed, error = runs[0]
        if status != "completed" or finished is None:
            fail(f"run {run_id} is {status!r} (error: {error})")
        done = db.execute("SELECT count(*) FROM cancellation_requests WHERE status = 'completed'").fetchone()[0]
        outbox = db.execute("SELECT count(*) FROM email_outbox"
                            " WHERE template = 'service_cancellation_confirmation'").fetchone()[0]
        cancelled = db.execute("SELECT count(*) FROM services WHERE status = 'Cancelled'").fetchone()[0]
        reminded = db.execute("SELECT count(*) FROM email_outbox"
                              " WHERE template = 'cancellation_reminder'").fetchone()[0]
        problems = [f"{what}: {got:,} (expected {expected:,})" for what, got, expected in
                    (("completed requests", done, n), ("outbox rows", outbox, n), ("cancelled services", cancelled, n),
                     ("run.due", due, n), ("run.completed", completed, n), ("reminders", reminded, reminders))
                    if got != expected]
        if problems:
            fail("; ".join(problems))
        return _seconds(started, finished)
    finally:
        db.close()


def verify_sent(connect: Callable[[], Any], root: Path, n: int, smtp_received: int | None = None) -> None:
    """Every email sent (N confirmations and the staff digest), one .eml file each, or
    (over SMTP) as many messages received by the server."""
    db = connect()
    try:
        by_status = dict(db.execute("SELECT status, count(*) FROM email_outbox GROUP BY status").fetchall())
    finally:
        db.close()
    if smtp_received is not None:
        if by_status != {"sent": n + 1} or smtp_received != n + 1:
            fail(f"after `emails send`: outbox {by_status}, {smtp_received:,} messages received by the SMTP "
                 f"server (expected {n + 1:,} sent)")
        return
    files = sum(1 for p in (root / "var" / "outbox").iterdir() if p.suffix == ".eml")
    if by_status != {"sent": n + 1} or files != n + 1:
        fail(f"after `emails send`: outbox {by_status}, {files:,} .eml files (expected {n + 1:,} sent)")


class CountingHandler:
    """An SMTP server's handler that accepts every message and only counts them (the
    tests' Handler parses each one, which would slow the server the sender waits for)."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1  # the server's one event loop thread: no lock needed
        return "250 Message accepted for delivery"


@contextlib.contextmanager
def smtp_server() -> Iterator[tuple[CountingHandler, int]]:
    """A local SMTP server (aiosmtpd, as the tests run theirs) for --smtp."""
    sys.path.insert(0, str(REPO))
    try:
        from aiosmtpd.controller import Controller

        from tests.smtp_server import HOST, free_port
    except ImportError as exc:  # aiosmtpd is a test extra (pip install -e '.[test]')
        fail(f"--smtp uses aiosmtpd and tests/smtp_server.py, which cannot be imported: {exc} "
             "(install the test extras: pip install -e '.[test]')")
    handler, port = CountingHandler(), free_port()
    controller = Controller(handler, hostname=HOST, port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def deliver(root: Path, env: dict[str, str], smtp: bool) -> tuple[float, int, int | None]:
    """`emails send`: its wall time, peak RSS and (over SMTP) the messages the server received."""
    if not smtp:
        code, wall, rss, out, err, _ = run_processor(root, env, None, ("emails", "send"))
        if code != 0:
            fail(f"`processor emails send` exited {code}:\n{out}{err}")
        return wall, rss, None
    with smtp_server() as (handler, port):
        env = {**env, "CANCELPROC_EMAIL__DELIVERY": "smtp", "CANCELPROC_EMAIL__SMTP__HOST": "127.0.0.1",
               "CANCELPROC_EMAIL__SMTP__PORT": str(port), "CANCELPROC_EMAIL__SMTP__SECURITY": "none"}
        code, wall, rss, out, err, _ = run_processor(root, env, None, ("emails", "send"))
        if code != 0:
            fail(f"`processor emails send` exited {code}:\n{out}{err}")
        return wall, rss, handler.received


def run_floor(cmd: list[str], env: dict[str, str]) -> float:
    """A floor script; prints its output and returns its rate."""
    if not Path(cmd[1]).is_file():
        fail(f"floor not found at {cmd[1]} (the shared/ folder is expected next to the repo)")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"floor exited {proc.returncode}:\n{proc.stderr}")
    match = re.search(r"=\s*([\d,]+(?:\.\d+)?)/s", proc.stdout)
    if not match:
        fail(f"cannot find the rate in the floor's output: {proc.stdout!r}")
    print(proc.stdout.strip())
    return float(match.group(1).replace(",", ""))


def run_sqlite_floor(n: int, tmp: Path) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp))  # the floor's own database goes into our temp folder
    return run_floor([sys.executable, str(FLOOR), str(n)], env)


def print_profile(path: Path, top: int = 30) -> None:
    import pstats

    for key in ("cumulative", "tottime"):
        print(f"\n--- cProfile, top {top} by {key} ---")
        pstats.Stats(str(path)).sort_stats(key).print_stats(top)


def start_postgresql() -> Any:
    """A throwaway server, started as the tests start theirs (tests/pg_server.py)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from tests.pg_server import start_server
    except ImportError as exc:  # tests/pg_server.py needs the test extras (pip install -e '.[test]')
        fail(f"--postgresql uses tests/pg_server.py, which cannot be imported: {exc} "
             "(install the test extras: pip install -e '.[test]')")
    try:
        return start_server()
    except RuntimeError as exc:
        fail(f"cannot start a PostgreSQL server: {exc} (`make postgresql-binaries` installs Debian's postgresql)")


def libpq_dsn(server: Any, database: str) -> str:
    return f"host=127.0.0.1 port={server.port} user=postgres dbname={database}"


def setting_in(root: Path, env: dict[str, str], name: str) -> str:
    """A setting as the processor sees it with this env in this app root (a tiny child)."""
    proc = subprocess.run([sys.executable, "-c", f"from processor.config import load_settings; "
                           f"print(load_settings().{name})"], cwd=root, env=env, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else f"? ({proc.stderr.strip().splitlines()[-1:]})"


def mb(value: int) -> str:
    return f"{value / 2**20:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int,
                        help=f"due requests (default 100000; {IO_BOUND_N} with --io-bound)")
    parser.add_argument("--chunk-size", type=int, help="CANCELPROC_CHUNK_SIZE for the run (default: the setting's)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and print its path")
    parser.add_argument("--setup-only", action="store_true",
                        help="load the data, print the folder, stop (implies --keep)")
    parser.add_argument("--profile", action="store_true", help="run the processor under cProfile (slower)")
    parser.add_argument("--hooks", action="store_true", help="register one trivial hook on every hook point")
    parser.add_argument("--skip-delivery", action="store_true", help="do not measure `emails send` after the run")
    parser.add_argument("--smtp", action="store_true",
                        help="deliver over SMTP to a local aiosmtpd server instead of to the outbox folder")
    parser.add_argument("--postgresql", action="store_true",
                        help="on a throwaway PostgreSQL server (tests/pg_server.py) instead of SQLite; "
                             "floor: shared/bench/floor_pg.py")
    parser.add_argument("--workers", type=int, metavar="W",
                        help="`run --workers W` (PostgreSQL); the workers' peak RSS is reported too")
    parser.add_argument("--io-bound", action="store_true",
                        help=f"TerminateAccount sleeps {IO_BOUND_SLEEP_S * 1000:.0f} ms per request; N = {IO_BOUND_N} "
                             f"by default; target: wall < {TARGET_IO_WALL_S} s; no floor (implies --postgresql)")
    parser.add_argument("--hook-concurrency", type=int, metavar="K",
                        help="CANCELPROC_HOOK_CONCURRENCY for the run (default: the setting's)")
    parser.add_argument("--reminders", type=int, metavar="M", default=0,
                        help="add M pending requests a week or a day ahead: a reminder due for each tonight")
    parser.add_argument("--no-reminders", action="store_true",
                        help="reminder_days = [] for the run (no reminder query at all)")
    args = parser.parse_args()
    postgresql = args.postgresql or args.io_bound
    n = args.n if args.n is not None else (IO_BOUND_N if args.io_bound else 100_000)
    if n < 1:
        parser.error("N must be at least 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers is not None and not postgresql:
        parser.error("--workers needs --postgresql (parallel workers need PostgreSQL)")
    if args.hook_concurrency is not None and args.hook_concurrency < 1:
        parser.error("--hook-concurrency must be at least 1")
    if args.reminders < 0 or (args.reminders and args.no_reminders):
        parser.error("--reminders M needs M >= 0, and reminders on (not --no-reminders)")
    if args.reminders and not args.skip_delivery:
        parser.error("--reminders needs --skip-delivery (the delivery check counts the confirmations only)")
    workers = args.workers or 1
    keep = args.keep or args.setup_only

    root = Path(tempfile.mkdtemp(prefix="cancelproc-bench-"))
    server = None
    leave_server_running = False
    ok = False
    try:
        if postgresql:
            # A SIGTERM (a CI timeout, kill) must still stop the server: make it an exit.
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
            server = start_postgresql()
            server.admin("CREATE DATABASE bench")
            database_url, dsn = server.url("bench"), libpq_dsn(server, "bench")

            def connect() -> Any:
                import psycopg
                return psycopg.connect(dsn)
        else:
            db_path = root / "bench.db"
            database_url = f"sqlite:///{db_path}"

            def connect() -> Any:
                return sqlite3.connect(db_path)
        env = child_env(database_url, args.chunk_size, args.hook_concurrency, args.no_reminders)
        hook_files = {}
        if args.hooks:
            hook_files["trivial.py"] = TRIVIAL_HOOKS
        calls_file = root / "terminate-calls"
        if args.io_bound:
            hook_files["slow_terminate.py"] = SLOW_TERMINATE_HOOK.format(sleep=IO_BOUND_SLEEP_S,
                                                                         counter=str(calls_file))
        if hook_files:
            env["CANCELPROC_HOOKS_DIR"] = str(write_hooks(root, hook_files))

        init = subprocess.run([sys.executable, "-m", "processor", "init"], cwd=root, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if init.returncode != 0:
            fail(f"`processor init` exited {init.returncode}:\n{init.stdout}{init.stderr}")

        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        t0 = time.perf_counter()
        counts = (load_postgresql(dsn, n, now.date(), now, args.reminders) if postgresql
                  else load(db_path, n, now.date(), now, args.reminders))
        load_s = time.perf_counter() - t0
        print(f"loaded in {load_s:.1f}s: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
        run_command = ("run", "--trigger", "manual") + (("--workers", str(workers)) if workers > 1 else ())
        if args.setup_only:
            print(f"database ready (N={n:,} pending due requests): {database_url if postgresql else db_path}")
            if server is None:
                print(f"run it with: cd {root} && CANCELPROC_DATABASE_URL=sqlite:///{db_path} "
                      f"CANCELPROC_LOG_LEVEL=warning PYTHONPATH={REPO} {sys.executable} "
                      "-m processor run --trigger manual")
            else:
                settings = " ".join(f"{k}={v}" for k, v in env.items()
                                    if k.startswith("CANCELPROC_") and k != "CANCELPROC_EMAIL__SEND_AFTER_RUN")
                print(f"run it with: cd {root} && {settings} "
                      f"PYTHONPATH={REPO} {sys.executable} -m processor {' '.join(run_command)}")
                from tests.pg_server import find_bin

                leave_server_running = True
                runuser = f"runuser -u {server._user} -- " if server._user else ""
                print(f"the PostgreSQL server is left running; stop it with: {runuser}{find_bin('pg_ctl')} "
                      f"-D {server.folder / 'data'} -m immediate stop && rm -rf {server.folder} {root}")
            ok = True
            return

        if args.io_bound:
            concurrency = setting_in(root, env, "hook_concurrency")
            chunk = setting_in(root, env, "chunk_size")
        profile = root / "run.prof" if args.profile else None
        code, wall, rss, out, err, peaks = run_processor(root, env, profile, run_command, tree=workers > 1)
        if code != 0:
            fail(f"`processor run` exited {code}:\n{out}{err}")
        run_s = verify(connect, n, args.reminders)
        if args.io_bound:
            calls = calls_file.stat().st_size if calls_file.exists() else 0
            if calls < n:
                fail(f"TerminateAccount ran {calls:,} times for {n:,} requests")
        if not args.skip_delivery:
            send_wall, send_rss, received = deliver(root, env, args.smtp)
            verify_sent(connect, root, n, received)
        floor_rate = None
        if postgresql and not args.io_bound:
            server.admin("CREATE DATABASE bench_floor")
            floor_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # only our DSN counts
            floor_rate = run_floor([sys.executable, str(FLOOR_PG), libpq_dsn(server, "bench_floor"), str(n)],
                                   floor_env)  # after the run: never competes with it
        elif not postgresql:
            floor_rate = run_sqlite_floor(n, root / "floor")  # after the run: never competes with it
        if profile is not None:
            print_profile(profile)

        rate, wall_rate, rss_mb = n / run_s, n / wall, rss / 2**20
        if postgresql:
            with connect() as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
            print(f"N: {n:,} on PostgreSQL {version} (throwaway server from tests/pg_server.py: fsync, "
                  "synchronous_commit and full_page_writes off)"
                  + (f", {workers} workers" if workers > 1 else ", one worker")
                  + (f" (chunk size {args.chunk_size})" if args.chunk_size and not args.io_bound else "")
                  + (" with a trivial hook on every point" if args.hooks else "")
                  + (f"; TerminateAccount sleeps {IO_BOUND_SLEEP_S * 1000:.0f} ms, hook_concurrency "
                     f"{concurrency}, chunk_size {chunk}" if args.io_bound else "")
                  + (" [under cProfile]" if profile else ""))
        else:
            print(f"N: {n:,}" + (f" (chunk size {args.chunk_size})" if args.chunk_size else "")
                  + (" with a trivial hook on every point" if args.hooks else "")
                  + (f", {args.reminders:,} reminders queued too" if args.reminders else "")
                  + (", reminder_days = []" if args.no_reminders else "")
                  + (" [under cProfile]" if profile else ""))
        print(f"processor: {n:,} requests in {run_s:.3f}s (run record) = {rate:,.0f} requests/s")
        print(f"processor wall clock incl. process start: {wall:.3f}s = {wall_rate:,.0f} requests/s")
        rss_peaks = [rss]
        if peaks is None:
            print(f"peak RSS: {rss_mb:.1f} MB")
        else:
            each = sorted(peaks.workers(), reverse=True)
            rss_peaks += each
            print(f"peak RSS: {rss_mb:.1f} MB (os.wait4 on `run`: Linux folds into it the peaks of the workers it "
                  "waited for, so it stands for the largest process, not `run` alone)")
            print(f"peak RSS per process (VmHWM from /proc, read every {SAMPLE_EVERY_S * 1000:.0f} ms, "
                  f"{peaks.samples:,} reads): `run` {mb(peaks.peaks.get(peaks.pid, 0))}; "
                  f"{len(each)} workers: " + (", ".join(mb(p) for p in each) if each else "none seen")
                  + f"; whole tree at once (sampled): {mb(peaks.tree_peak)}")
            if len(each) != workers:
                print(f"  (saw {len(each)} worker processes, expected {workers})")
        if args.io_bound:
            print(f"TerminateAccount calls: {calls:,} (each sleeps {IO_BOUND_SLEEP_S * 1000:.0f} ms: "
                  f"{calls * IO_BOUND_SLEEP_S:,.0f} s if one at a time)")
        if not args.skip_delivery:
            backend = "SMTP to aiosmtpd on 127.0.0.1" if args.smtp else "folder backend"
            print(f"delivery (`emails send`, {backend}): {n + 1:,} emails in {send_wall:.3f}s wall = "
                  f"{(n + 1) / send_wall:,.0f} emails/s, peak RSS {send_rss / 2**20:.1f} MB")
        if args.io_bound:
            if keep:
                print(f"kept: {root}")
            print("no ratio: the floor has no hooks, so an I/O-bound run (the hook's waits) is not compared with it")
            ok = True
            print(f"target: wall < {TARGET_IO_WALL_S} s {'ok' if wall < TARGET_IO_WALL_S else 'MISSED'}")
            return
        print(f"floor: {floor_rate:,.0f} requests/s")
        target_rate = TARGET_RATE_PG if postgresql else TARGET_RATE
        rss_ok = max(rss_peaks) / 2**20 < TARGET_RSS_MB
        print(f"targets: rate >= {target_rate:,}/s{' (one worker)' if postgresql else ''} "
              f"{'ok' if rate >= target_rate else 'MISSED'}; "
              f"peak RSS < {TARGET_RSS_MB} MB{' (each process)' if peaks is not None else ''} "
              f"{'ok' if rss_ok else 'MISSED'}")
        if keep:
            print(f"kept: {root}")
        ok = True
        print(f"ratio: {rate / floor_rate:.2f}")
    finally:
        shutil.rmtree(root / "floor", ignore_errors=True)
        if server is not None and not leave_server_running:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            print(f"kept: {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
