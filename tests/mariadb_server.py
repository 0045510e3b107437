"""A throwaway MariaDB server for the WHMCS import tests, on 127.0.0.1 and a socket in a temp folder.

Started once per test session (mariadb-install-db into a fresh datadir, then mariadbd),
killed and removed at the end. As root the server runs as the `mysql` OS user, as the
postgres server of tests/pg_server.py runs as `postgres`. Durability is off: the tests
need a real server, not a safe one. The binaries are Debian's mariadb-server package
(`make test` installs it, as it does PostgreSQL's).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql

from tests.smtp_server import free_port

START_DEADLINE = 120.0  # seconds for a first start on a loaded machine


def find_bin(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)


@dataclass
class MariaDbServer:
    folder: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.folder / "mysqld.sock")

    def start(self) -> None:
        install, mariadbd = find_bin("mariadb-install-db"), find_bin("mariadbd")
        if not install or not mariadbd:
            raise RuntimeError("MariaDB server binaries (mariadb-install-db, mariadbd) not found; "
                               "install Debian's mariadb-server")
        user: list[str] = []
        if os.geteuid() == 0:  # mariadbd will not run as root unless told to
            pw = pwd.getpwnam("mysql")
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
            user = ["--user=mysql"]
        data = self.folder / "data"
        done = subprocess.run([install, "--no-defaults", f"--datadir={data}", "--skip-test-db",
                               "--auth-root-authentication-method=normal", *user],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"mariadb-install-db failed: {done.stderr.strip()[-2000:]}")
        self.port = free_port()
        log = self.folder / "server.log"
        self.process = subprocess.Popen(
            [mariadbd, "--no-defaults", f"--datadir={data}", f"--socket={self.socket}", f"--port={self.port}",
             "--bind-address=127.0.0.1", "--skip-name-resolve", f"--log-error={log}", f"--pid-file={self.folder}/pid",
             "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=0", "--skip-log-bin", *user],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_DEADLINE
        while True:  # waiting for a condition, with a generous deadline
            try:
                self.admin("SELECT 1")
                return
            except pymysql.err.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"mariadbd did not start: {text}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        # Killed, not shut down: its folder is removed next, and a clean shutdown (SIGTERM)
        # took 30 s at the end of each test worker's session.
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def admin(self, *statements: str, database: str | None = None,
              rows: tuple[tuple[str, list[Any]], ...] = ()) -> None:
        """Run statements as root over the socket; `rows`: (INSERT statement, parameter rows)."""
        conn = pymysql.connect(unix_socket=self.socket, user="root", database=database, autocommit=True)
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
                for sql, params in rows:
                    cur.executemany(sql, params)
        finally:
            conn.close()

    def url(self, user: str, password: str, database: str) -> str:
        return f"mysql+pymysql://{user}:{password}@127.0.0.1:{self.port}/{database}"


def start_server() -> MariaDbServer:
    folder = Path(tempfile.mkdtemp(prefix="cancelproc-mariadb-"))
    server = MariaDbServer(folder)
    try:
        server.start()
    except BaseException:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return server
