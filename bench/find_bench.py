#!/usr/bin/env python3
"""Benchmark: `cancelproc find` on a SQLite database of N services (a million by default).

    python bench/find_bench.py [N] [--repeat R] [--keep]

1. A temp app root; `python -m processor init` there (the schema at head, with migration
   0006's indexes); then N/4 clients (each with 4 services) and N services, and a request
   on every 10th service, loaded fast with stdlib sqlite3 in this process (executemany,
   one transaction), then ANALYZE as `cancelproc db upgrade` leaves the planner without it.
2. `cancelproc find ... --json` in this process through click's CliRunner (the command as
   it runs, without the interpreter's start and imports), R times each (3 by default), for:
   a whole domain, email and external id (`--match whole`), the start of a domain and of
   an email (`--match start`), part of a domain that one service has (the tables are read
   to their end), and a part that thousands have (it stops at the first 20). Each result is checked (the service
   or client expected is found); anything else fails loudly (exit 1).
3. Prints, per case, the fastest and the slowest time of the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CREATED = "2026-11-20 12:00:00.000000"


def load(db: Path, n: int) -> None:
    """N services for N/4 clients, a request on every 10th service."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO products (id, name, module) VALUES (1, 'Shared Hosting', 'cpanel')")
        clients = max(1, n // 4)
        conn.executemany(
            "INSERT INTO clients (id, external_id, first_name, last_name, company_name, email, language, balance)"
            " VALUES (?, ?, ?, ?, '', ?, 'en', 0)",
            ((i, f"C{i}", f"First{i}", f"Last{i}", f"client{i}@mail{i % 97}.example") for i in range(1, clients + 1)))
        conn.executemany(
            "INSERT INTO services (id, external_id, client_id, product_id, domain, status, billing_cycle, amount,"
            " next_due_date) VALUES (?, ?, ?, 1, ?, 'Active', 'Monthly', 4.99, '2026-12-20')",
            ((i, f"S{i}", (i - 1) // 4 + 1, f"site{i}.Host{i % 1000}.example") for i in range(1, n + 1)))
        conn.executemany(
            "INSERT INTO cancellation_requests (id, external_id, service_id, type, reason_code, reason, status,"
            " created_at, created_by, attempts, note) VALUES (?, ?, ?, 'End of Billing Period', 'other', '',"
            " 'pending', ?, 'bench', 0, '')",
            ((i // 10, f"R{i // 10}", i, CREATED) for i in range(10, n + 1, 10)))
        conn.execute("ANALYZE")
    conn.close()


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """The command in this process (click's CliRunner): its own time, without the
    interpreter's start and the imports, which the machine's load makes vary by seconds."""
    from click.testing import CliRunner

    from processor.cli import cli

    start = time.perf_counter()
    result = CliRunner().invoke(cli, args, env=env)
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        sys.exit(f"find_bench: {' '.join(args)} exited {result.exit_code}: {result.stderr.strip()}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    opts = parser.parse_args()
    n = opts.n
    root = Path(tempfile.mkdtemp(prefix="find_bench."))
    db = root / "bench.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_DATABASE_URL=f"sqlite:///{db}", CANCELPROC_LOG_LEVEL="warning",
               CANCELPROC_LOG_FORMAT="console", PYTHONPATH=str(REPO))
    try:
        subprocess.run([sys.executable, "-m", "processor", "init"], env=env, cwd=root, check=True,
                       capture_output=True)
        start = time.perf_counter()
        load(db, n)
        print(f"loaded {n:,} services, {max(1, n // 4):,} clients, {n // 10:,} requests "
              f"in {time.perf_counter() - start:.1f} s ({db.stat().st_size / 1e6:.0f} MB)")
        middle = n // 2 + 3
        client = (middle - 1) // 4 + 1
        cases = [
            ("whole domain, any case", ["find", f"SITE{middle}.host{middle % 1000}.EXAMPLE", "--match", "whole"],
             "services", middle),
            ("whole email", ["find", f"client{client}@mail{client % 97}.example", "--match", "whole"], "clients",
             client),
            ("external id", ["find", f"S{middle}", "--match", "whole"], "services", middle),
            ("start of a domain", ["find", f"site{middle}.", "--match", "start"], "services", middle),
            ("start of an email", ["find", f"client{client}@", "--match", "start"], "clients", client),
            ("part of a domain, one match (reads the tables)", ["find", f"{middle}.host"], "services", middle),
            ("part, thousands match (stops at 20)", ["find", "host7.example"], "services", None),
        ]
        sys.path.insert(0, str(REPO))
        os.chdir(root)
        timed(["services", "list", "--limit", "1"], env)  # imports, settings: not what is measured
        for title, args, kind, expected in cases:
            times = []
            for _ in range(opts.repeat):
                elapsed, out = timed([*args, "--json"], env)
                rows = json.loads(out)[kind]["rows"]
                if expected is not None and expected not in [r["id"] for r in rows]:
                    sys.exit(f"find_bench: {' '.join(args)}: {kind} {expected} not found")
                if expected is None and len(rows) != 20:
                    sys.exit(f"find_bench: {' '.join(args)}: {len(rows)} {kind}, expected 20")
                times.append(elapsed)
            print(f"{title:48} `cancelproc {' '.join(args)}`: {min(times) * 1000:,.0f} to {max(times) * 1000:,.0f} ms")
    finally:
        if opts.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
