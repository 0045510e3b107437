#!/usr/bin/env python3
"""Benchmark: `cancelproc find` on a database of N services (a million by default).

    python bench/find_bench.py [N] [--repeat R] [--keep] [--postgresql]

1. A temp app root; `python -m processor init` there (the schema at head, with migration
   0008's and 0009's indexes); then N/4 clients (each with 4 services) and N services, and a request
   on every 10th service, loaded fast with stdlib sqlite3 in this process (executemany,
   one transaction), then ANALYZE as `cancelproc db upgrade` leaves the planner without it.
   --postgresql: the same on a throwaway PostgreSQL server started with the tests'
   tests/pg_server.py (loaded with psycopg COPY), stopped and removed at the end.
2. `cancelproc find ... --json` in this process through click's CliRunner (the command as
   it runs, without the interpreter's start and imports), R times each (3 by default), for:
   a whole domain, email and external id (`--match whole`), the start of a domain and of
   an email (`--match start`), part of a domain that one service has, a part that thousands
   have (it stops at the first 20), and part of an email and of a name (any part: the
   trigram index of migration 0009, or the tables read where the database has none). Each result
   is checked (the service or client expected is found); anything else fails loudly
   (exit 1).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CREATED = "2026-11-20 12:00:00.000000"  # as UTCDateTime stores it on SQLite


def dataset(n: int) -> list[tuple[str, list[str], Iterator[tuple[Any, ...]]]]:
    """N services for N/4 clients, a request on every 10th service: (table, columns, rows)."""
    clients = max(1, n // 4)
    return [
        ("products", ["id", "name", "module"], iter([(1, "Shared Hosting", "cpanel")])),
        ("clients", ["id", "external_id", "first_name", "last_name", "company_name", "email", "language", "balance"],
         ((i, f"C{i}", f"First{i}", f"Last{i}", "", f"client{i}@mail{i % 97}.example", "en", 0)
          for i in range(1, clients + 1))),
        ("services", ["id", "external_id", "client_id", "product_id", "domain", "status", "billing_cycle", "amount",
                      "next_due_date"],
         ((i, f"S{i}", (i - 1) // 4 + 1, 1, f"site{i}.Host{i % 1000}.example", "Active", "Monthly", "4.99",
           "2026-12-20") for i in range(1, n + 1))),
        ("cancellation_requests", ["id", "external_id", "service_id", "type", "reason_code", "reason", "status",
                                   "created_at", "created_by", "attempts", "note", "effective_date"],
         ((i // 10, f"R{i // 10}", i, "End of Billing Period", "other", "", "pending", CREATED, "bench", 0, "",
           "2026-12-20")
          for i in range(10, n + 1, 10))),
    ]


def load_sqlite(db: Path, n: int) -> None:
    conn = sqlite3.connect(db)
    with conn:
        for table, columns, rows in dataset(n):
            conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                             rows)
        conn.execute("ANALYZE")
    conn.close()


def load_postgresql(dsn: str, n: int) -> None:
    """COPY, one transaction, in this process; then ANALYZE."""
    import psycopg

    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for table, columns, rows in dataset(n):
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")


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
    parser.add_argument("--postgresql", action="store_true",
                        help="on a throwaway PostgreSQL server (tests/pg_server.py) instead of SQLite")
    opts = parser.parse_args()
    n = opts.n
    root = Path(tempfile.mkdtemp(prefix="find_bench."))
    server = None
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCELPROC_")}
    env.update(CANCELPROC_LOG_LEVEL="warning", CANCELPROC_LOG_FORMAT="console", PYTHONPATH=str(REPO))
    try:
        if opts.postgresql:
            sys.path.insert(0, str(REPO))
            from tests.pg_server import start_server

            server = start_server()
            server.admin("CREATE DATABASE bench")
            env["CANCELPROC_DATABASE_URL"] = server.url("bench")
        else:
            env["CANCELPROC_DATABASE_URL"] = f"sqlite:///{root / 'bench.db'}"
        subprocess.run([sys.executable, "-m", "processor", "init"], env=env, cwd=root, check=True,
                       capture_output=True)
        start = time.perf_counter()
        if server is not None:
            load_postgresql(f"host=127.0.0.1 port={server.port} user=postgres dbname=bench", n)
        else:
            load_sqlite(root / "bench.db", n)
        print(f"{'PostgreSQL' if server else 'SQLite'}: loaded {n:,} services, {max(1, n // 4):,} clients, "
              f"{n // 10:,} requests in {time.perf_counter() - start:.1f} s")
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
            ("part of a domain, one match", ["find", f"{middle}.host"], "services", middle),
            ("part, thousands match (stops at 20)", ["find", "host7.example"], "services", None),
            ("part of an email, one match", ["find", f"ent{client}@mail"], "clients", client),
            ("part of a name, one match", ["find", f"rst{client} last"], "clients", client),
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
                if expected is None and len(rows) != min(20, n // 1000):  # one service in a thousand
                    sys.exit(f"find_bench: {' '.join(args)}: {len(rows)} {kind}, expected {min(20, n // 1000)}")
                times.append(elapsed)
            print(f"{title:48} `cancelproc {' '.join(args)}`: {min(times) * 1000:,.0f} to {max(times) * 1000:,.0f} ms")
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)
        if opts.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
