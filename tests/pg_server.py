"""A throwaway PostgreSQL server for the tests, on 127.0.0.1 and a socket in a temp folder.

Started once per test session (initdb, pg_ctl start), stopped at the end. As root the
server runs as the `postgres` OS user, as PostgreSQL refuses to run as root. Durability
is switched off (fsync, synchronous_commit): the tests need a real server, not a safe one.
Each test gets its own database, copied from a migrated template (CREATE DATABASE ...
TEMPLATE), so no test sees another's rows.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.smtp_server import free_port

TEMPLATE = "cancelproc_template"
PORT_ATTEMPTS = 5


def find_bin(name: str) -> str | None:
    """initdb and pg_ctl: on PATH, or where Debian's postgresql package puts them."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


@dataclass
class PgServer:
    folder: Path
    port: int = 0
    _user: str | None = None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql")
        if os.geteuid() == 0:  # postgres will not run as root
            self._user = "postgres"
            pw = pwd.getpwnam(self._user)
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        data = self.folder / "data"
        done = self._run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                         "--locale=C.UTF-8", "--no-sync")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()}")
        # The port is picked free, then bound by the server a moment later: another process
        # (another pytest-xdist worker's server) may take it in between. Then another port.
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            log = self.folder / "server.log"
            log.unlink(missing_ok=True)
            options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            done = self._run(pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
            if not done.returncode:
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            if "could not bind" not in text and "could not create any TCP/IP sockets" not in text:
                break
        raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {text[-2000:]}")

    def restart(self) -> None:
        """Stop the server (fast: open connections are cut) and start it again, same options."""
        # -l: the new server logs to the file; else it would hold our output pipes open.
        done = self._run(find_bin("pg_ctl") or "pg_ctl", "-D", str(self.folder / "data"), "-l",
                         str(self.folder / "server.log"), "-m", "fast", "-w", "restart")
        if done.returncode:
            raise RuntimeError(f"pg_ctl restart failed: {done.stderr.strip()}")

    def stop(self) -> None:
        pg_ctl = find_bin("pg_ctl")
        if pg_ctl and (self.folder / "data").exists():
            self._run(pg_ctl, "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """A fresh database, migrated (a copy of the template); returns its URL."""
        name = f"test_{os.getpid()}_{next(self._ids)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)

    def empty_database(self) -> str:
        name = f"empty_{os.getpid()}_{next(self._ids)}"
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)


def start_server() -> PgServer:
    folder = Path(tempfile.mkdtemp(prefix="cancelproc-pg-"))
    server = PgServer(folder)
    try:
        server.start()
    except BaseException:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return server
