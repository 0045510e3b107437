"""Debian's chromium, headless, for the tests that open a page the way a person would
(tests/test_report_html.py). `make chromium-binaries` installs it like PostgreSQL's.

The browser gets no network: every host name resolves to nothing and every request goes
to a proxy on a closed port, so a page that tried to load anything would log it (and the
page's own Content-Security-Policy refuses it first, logging that too). Scripts run in
virtual time (--virtual-time-budget): the dump is taken when the page is idle, whatever
the load on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

NAMES = ("chromium", "chromium-browser")
DEADLINE_S = 120  # generous: a loaded machine; the page itself takes well under a second


def find_chromium() -> str | None:
    return next((path for name in NAMES if (path := shutil.which(name))), None)


@dataclass(frozen=True)
class Opened:
    dom: str  # the document after its scripts ran
    log: str  # chromium's stderr: console messages are its ':CONSOLE' lines

    def console_lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if ":CONSOLE" in line]


def _command(binary: str, profile: Path, *args: str) -> list[str]:
    return [binary, "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            # root in a container has no user namespaces for the sandbox
            *(["--no-sandbox"] if os.geteuid() == 0 else []),
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", f"--user-data-dir={profile}", *args]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run chromium in a process group of its own; the whole group is killed if it does not
    finish by the deadline or the test is interrupted (no browser left behind)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def open_page(binary: str, page: Path, profile: Path) -> Opened:
    done = _run(_command(binary, profile, "--dump-dom", page.resolve().as_uri()))
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return Opened(dom=done.stdout, log=done.stderr)


def screenshot(binary: str, page: Path, profile: Path, png: Path, *, width: int, height: int) -> Opened:
    done = _run(_command(binary, profile, "--hide-scrollbars", f"--window-size={width},{height}",
                         f"--screenshot={png.resolve()}", page.resolve().as_uri()))
    assert done.returncode == 0 and png.exists(), f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return Opened(dom="", log=done.stderr)
