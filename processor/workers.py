"""`cancelproc run --workers N`: one run's requests spread over N worker processes.

The run's own process takes the lease and opens the run, starts N workers (`cancelproc
run --join`), renews the lease while they work, then picks up whatever a worker that died
left behind, delivers the outbox and closes the run (`Runner.run(helpers=...)`). The
workers claim chunks with FOR UPDATE SKIP LOCKED (PostgreSQL): no request is taken by two
workers, and a dead worker's chunk rolls back and is claimed again by the others or by the
sweep. A worker on another host joins the same run with `cancelproc run --join`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

RENEW_EVERY_SECONDS = 5.0


@dataclass
class WorkerProcesses:
    """N `run --join` processes started with `command` (a `run.Helpers`)."""

    count: int
    command: Sequence[str]
    env: Mapping[str, str] | None = None

    def work_alongside(self, run_id: int, *, keep_alive: Callable[[], None],
                       should_stop: Callable[[], bool]) -> bool:
        """Start the workers and wait for them, renewing the run's lease; on a stop request,
        ask each to finish its chunk and stop. True if they were asked to stop."""
        log = structlog.get_logger("cancelproc.workers")
        # Their stdout goes to this process's stderr, with the log: this process's stdout
        # holds its own report alone (a `--json` document).
        procs = [subprocess.Popen(list(self.command), env=dict(self.env) if self.env is not None else None,
                                  stdin=subprocess.DEVNULL, stdout=_stderr_fd()) for _ in range(self.count)]
        log.info("workers started", pids=[p.pid for p in procs])
        stopping = False
        try:
            last_renewal = time.monotonic()
            while any(p.poll() is None for p in procs):
                time.sleep(0.2)
                if not stopping and should_stop():
                    stopping = True  # each worker finishes its chunk and stops
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                if time.monotonic() - last_renewal >= RENEW_EVERY_SECONDS:
                    keep_alive()  # workers renew it after each chunk; this covers slow chunks
                    last_renewal = time.monotonic()
        finally:
            for p in procs:
                if p.poll() is None:  # we are stopping (Ctrl-C, an error): so do they
                    p.terminate()
            for p in procs:
                p.wait()
        # Exit 1 is a worker whose requests partly failed: normal. Anything else: it died.
        died = [(p.pid, p.returncode) for p in procs if p.returncode not in (0, 1)]
        if died:
            log.warning("workers ended abnormally; their unfinished chunks are taken up again", workers=died)
        return stopping


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no file behind it (a test's capture): inherit stdout
        return None
