#!/usr/bin/env python3
"""Benchmark: `cancelproc run` on N due cancellation requests, against the floor.

    python bench/run_bench.py [N] [--chunk-size K] [--hooks] [--skip-delivery] [--keep] [--setup-only] [--profile]

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
   email must end sent, one .eml file each (--skip-delivery leaves this out).
4. shared/bench/floor.py (next to the repo, as CI clones it) with the same N.
5. Prints the figures; the last line is exactly `ratio: X.XX` (processor rate / floor rate).

--keep keeps the temp folder and prints its path. --setup-only stops after loading (implies
--keep), leaving a database of N pending requests to profile, e.g.
    cd <folder> && CANCELPROC_DATABASE_URL=sqlite:///<folder>/bench.db \
        PYTHONPATH=<repo> python -m cProfile -o run.prof -m processor run --trigger manual
--profile runs the processor under cProfile itself (rates are then inflated by the
profiler) and prints the top functions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOOR = REPO.parent / "shared" / "bench" / "floor.py"

TARGET_RATE = 15_000  # requests/s at N = 100,000
TARGET_RSS_MB = 150

# Kept in step with processor/config.py's default reason_codes.
REASONS = [
    ("too_expensive", "Found a cheaper plan elsewhere."),
    ("no_longer_needed", "Project finished, the site is no longer needed."),
    ("switching_provider", "Moving everything to our new provider."),
    ("poor_support", "Waited three days for a reply to a ticket."),
    ("technical_issues", "Frequent downtime in the last month."),
    ("other", "Company is closing."),
]
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


def child_env(db_path: Path, chunk_size: int | None) -> dict[str, str]:
    # Only our CANCELPROC_* settings: an operator's own must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELPROC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["CANCELPROC_DATABASE_URL"] = f"sqlite:///{db_path}"
    env["CANCELPROC_LOG_LEVEL"] = "warning"
    # The run is measured as the floor works: apply and queue. Delivery is measured on its
    # own afterwards (`emails send`, folder backend), so each figure says what it costs.
    env["CANCELPROC_EMAIL__SEND_AFTER_RUN"] = "false"
    if chunk_size:
        env["CANCELPROC_CHUNK_SIZE"] = str(chunk_size)
    return env


TRIVIAL_HOOKS = """\
# Written by bench/run_bench.py --hooks: one trivial hook on every hook point.
from processor.hooks import POINTS, add_hook

for _point in POINTS:
    add_hook(_point, 0, lambda params: None)
"""


def write_trivial_hooks(root: Path) -> Path:
    hooks_dir = root / "bench-hooks"
    hooks_dir.mkdir()
    (hooks_dir / "trivial.py").write_text(TRIVIAL_HOOKS)
    return hooks_dir


def ts(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def load(db_path: Path, n: int, today: dt.date, now: dt.datetime) -> dict[str, int]:
    """Fill the migrated database with realistic data, in this process (not a child)."""
    rnd = random.Random(1234)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO products(id, external_id, name, module) VALUES (?,?,?,?)",
        ((i, f"P{i}", name, module) for i, (name, module, _, _) in enumerate(PRODUCTS, 1)),
    )

    def clients():
        for i in range(1, n + 1):
            first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST)) % len(LAST)]
            company = f"{last} Consulting Ltd" if i % 5 == 0 else ""
            email = f"{first.lower().translate(ASCII)}.{last.lower().translate(ASCII)}.{i}@example.test"
            balance = "48.00" if i % 50 == 0 else "0.00"
            yield (i, f"C{i}", first, last, company, email, "en", balance)

    db.executemany(
        "INSERT INTO clients(id, external_id, first_name, last_name, company_name, email, language, balance)"
        " VALUES (?,?,?,?,?,?,?,?)", clients())

    def services():
        for i in range(1, n + 1):
            p = (i % len(PRODUCTS)) + 1
            _, module, cycle, amount = PRODUCTS[p - 1]
            domain = f"site{i}.example.test" if module in ("cpanel", None) else f"host{i}.example.test"
            due = today - dt.timedelta(days=i % 30)  # due today or up to 29 days ago: all due
            yield (i, f"S{i}", i, p, domain, "Active", cycle, amount, due.isoformat(), None)

    db.executemany(
        "INSERT INTO services(id, external_id, client_id, product_id, domain, status, billing_cycle, amount,"
        " next_due_date, termination_date) VALUES (?,?,?,?,?,?,?,?,?,?)", services())

    def addons():
        for k, i in enumerate(range(4, n + 1, 4), 1):
            name, amount = ADDONS[k % len(ADDONS)]
            yield (k, f"A{k}", i, name, "Active", amount)

    db.executemany(
        "INSERT INTO service_addons(id, external_id, service_id, name, status, amount) VALUES (?,?,?,?,?,?)",
        addons())

    def invoices():
        for k, i in enumerate(range(3, n + 1, 3), 1):
            due = today - dt.timedelta(days=i % 30)
            yield (k, f"INV{k}", i, PRODUCTS[i % len(PRODUCTS)][3], "Unpaid", due.isoformat())

    db.executemany(
        "INSERT INTO invoices(id, external_id, service_id, amount, status, due_date) VALUES (?,?,?,?,?,?)",
        invoices())

    def requests():
        for i in range(1, n + 1):
            code, text = REASONS[rnd.randrange(len(REASONS))]
            kind = "Immediate" if i % 10 == 0 else "End of Billing Period"
            created = now - dt.timedelta(days=30 + i % 15, seconds=rnd.randrange(86_400))
            yield (i, f"R{i}", i, kind, None, code, text, "pending", ts(created), "client", 0, None, None,
                   None, None, None, "")

    db.executemany(
        "INSERT INTO cancellation_requests(id, external_id, service_id, type, cancel_on, reason_code, reason,"
        " status, created_at, created_by, attempts, last_error, next_attempt_at, processed_at, run_id, days_late,"
        " note) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", requests())
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("clients", "products", "services", "service_addons", "invoices", "cancellation_requests")}
    db.close()
    return counts


def run_processor(root: Path, env: dict[str, str], profile: Path | None,
                  command: tuple[str, ...] = ("run", "--trigger", "manual")) -> tuple[int, float, int, str, str]:
    """A processor command as a subprocess: exit code, wall seconds, peak RSS in bytes (this
    child only), output."""
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "processor", *command]
    out_path, err_path = root / f"{command[0]}.stdout", root / f"{command[0]}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        # wait4: the resource usage of this one child (RUSAGE_CHILDREN would be the max of all).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    return proc.returncode, wall, rss, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


def verify(db_path: Path, n: int) -> float:
    """N completed requests and N outbox rows, or fail. Returns the run's own duration in seconds."""
    db = sqlite3.connect(db_path)
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
        problems = [f"{what}: {got:,} (expected {n:,})" for what, got in
                    (("completed requests", done), ("outbox rows", outbox), ("cancelled services", cancelled),
                     ("run.due", due), ("run.completed", completed)) if got != n]
        if problems:
            fail("; ".join(problems))
        return (dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)).total_seconds()
    finally:
        db.close()


def verify_sent(db_path: Path, root: Path, n: int) -> None:
    """Every email sent (N confirmations and the staff digest), one .eml file each."""
    db = sqlite3.connect(db_path)
    try:
        by_status = dict(db.execute("SELECT status, count(*) FROM email_outbox GROUP BY status").fetchall())
    finally:
        db.close()
    files = sum(1 for p in (root / "var" / "outbox").iterdir() if p.suffix == ".eml")
    if by_status != {"sent": n + 1} or files != n + 1:
        fail(f"after `emails send`: outbox {by_status}, {files:,} .eml files (expected {n + 1:,} sent)")


def run_floor(n: int, tmp: Path) -> float:
    if not FLOOR.is_file():
        fail(f"floor not found at {FLOOR} (the shared/ folder is expected next to the repo)")
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp))  # the floor's own database goes into our temp folder
    proc = subprocess.run([sys.executable, str(FLOOR), str(n)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"floor exited {proc.returncode}:\n{proc.stderr}")
    match = re.search(r"=\s*([\d,]+(?:\.\d+)?)/s", proc.stdout)
    if not match:
        fail(f"cannot find the rate in the floor's output: {proc.stdout!r}")
    print(proc.stdout.strip())
    return float(match.group(1).replace(",", ""))


def print_profile(path: Path, top: int = 30) -> None:
    import pstats

    for key in ("cumulative", "tottime"):
        print(f"\n--- cProfile, top {top} by {key} ---")
        pstats.Stats(str(path)).sort_stats(key).print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="due requests (default 100000)")
    parser.add_argument("--chunk-size", type=int, help="CANCELPROC_CHUNK_SIZE for the run (default: the setting's)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and print its path")
    parser.add_argument("--setup-only", action="store_true", help="load the data, print the folder, stop (implies --keep)")
    parser.add_argument("--profile", action="store_true", help="run the processor under cProfile (slower)")
    parser.add_argument("--hooks", action="store_true", help="register one trivial hook on every hook point")
    parser.add_argument("--skip-delivery", action="store_true", help="do not measure `emails send` after the run")
    args = parser.parse_args()
    n = args.n
    if n < 1:
        parser.error("N must be at least 1")
    keep = args.keep or args.setup_only

    root = Path(tempfile.mkdtemp(prefix="cancelproc-bench-"))
    db_path = root / "bench.db"
    env = child_env(db_path, args.chunk_size)
    if args.hooks:
        env["CANCELPROC_HOOKS_DIR"] = str(write_trivial_hooks(root))
    ok = False
    try:
        init = subprocess.run([sys.executable, "-m", "processor", "init"], cwd=root, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if init.returncode != 0:
            fail(f"`processor init` exited {init.returncode}:\n{init.stdout}{init.stderr}")

        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        t0 = time.perf_counter()
        counts = load(db_path, n, now.date(), now)
        load_s = time.perf_counter() - t0
        print(f"loaded in {load_s:.1f}s: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
        if args.setup_only:
            print(f"database ready (N={n:,} pending due requests): {db_path}")
            print(f"run it with: cd {root} && CANCELPROC_DATABASE_URL=sqlite:///{db_path} "
                  f"CANCELPROC_LOG_LEVEL=warning PYTHONPATH={REPO} {sys.executable} -m processor run --trigger manual")
            ok = True
            return

        profile = root / "run.prof" if args.profile else None
        code, wall, rss, out, err = run_processor(root, env, profile)
        if code != 0:
            fail(f"`processor run` exited {code}:\n{out}{err}")
        run_s = verify(db_path, n)
        if not args.skip_delivery:
            code, send_wall, send_rss, out, err = run_processor(root, env, None, ("emails", "send"))
            if code != 0:
                fail(f"`processor emails send` exited {code}:\n{out}{err}")
            verify_sent(db_path, root, n)
        floor_rate = run_floor(n, root / "floor")  # after the run: never competes with it
        if profile is not None:
            print_profile(profile)

        rate, wall_rate, rss_mb = n / run_s, n / wall, rss / 2**20
        ratio = rate / floor_rate
        print(f"N: {n:,}" + (f" (chunk size {args.chunk_size})" if args.chunk_size else "")
              + (" with a trivial hook on every point" if args.hooks else "")
              + (" [under cProfile]" if profile else ""))
        print(f"processor: {n:,} requests in {run_s:.3f}s (run record) = {rate:,.0f} requests/s")
        print(f"processor wall clock incl. process start: {wall:.3f}s = {wall_rate:,.0f} requests/s")
        print(f"peak RSS: {rss_mb:.1f} MB")
        if not args.skip_delivery:
            print(f"delivery (`emails send`, folder backend): {n + 1:,} emails in {send_wall:.3f}s wall = "
                  f"{(n + 1) / send_wall:,.0f} emails/s, peak RSS {send_rss / 2**20:.1f} MB")
        print(f"floor: {floor_rate:,.0f} requests/s")
        print(f"targets: rate >= {TARGET_RATE:,}/s {'ok' if rate >= TARGET_RATE else 'MISSED'}; "
              f"peak RSS < {TARGET_RSS_MB} MB {'ok' if rss_mb < TARGET_RSS_MB else 'MISSED'}")
        if keep:
            print(f"kept: {root}")
        ok = True
        print(f"ratio: {ratio:.2f}")
    finally:
        shutil.rmtree(root / "floor", ignore_errors=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            print(f"kept: {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
