"""`cancelproc run --workers N`: one run's requests spread over N worker processes.

This process takes the lease and opens the run, starts N workers (`cancelproc run
--join`), renews the lease while they work, then picks up whatever a worker that died
left behind, delivers the outbox and closes the run. The workers claim chunks with
FOR UPDATE SKIP LOCKED (PostgreSQL): no request is taken by two workers, and a dead
worker's chunk rolls back and is claimed again by the others or by this sweep.
A worker on another host joins the same run with `cancelproc run --join`.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

import structlog

from processor.runner import RunOptions, Runner, RunStopped, RunSummary

RENEW_EVERY_SECONDS = 5.0


def run_with_workers(runner: Runner, options: RunOptions, *, workers: int, worker_command: Sequence[str],
                     env: Mapping[str, str] | None = None) -> RunSummary:
    """The whole run, done by `workers` processes started with `worker_command`."""
    log = structlog.get_logger("cancelproc.workers")
    run_id = runner.start(options)

    def work(summary: RunSummary) -> None:
        procs = [subprocess.Popen(list(worker_command), env=dict(env) if env is not None else None,
                                  stdin=subprocess.DEVNULL) for _ in range(workers)]
        log.info("workers started", pids=[p.pid for p in procs])
        stopping = False
        try:
            last_renewal = time.monotonic()
            while any(p.poll() is None for p in procs):
                time.sleep(0.2)
                if not stopping and runner.should_stop():
                    stopping = True  # each worker finishes its chunk and stops
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                if time.monotonic() - last_renewal >= RENEW_EVERY_SECONDS:
                    runner.renew_lease(run_id)  # workers renew it after each chunk; this covers slow chunks
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
        if not stopping:
            runner.work(run_id, options, summary)  # what dead workers left (usually nothing)
            runner.fail_orphans(options, run_id, summary)
        runner.reload_counts(run_id, summary)
        if stopping:
            raise RunStopped(f"stopped on request after {summary.due} requests; the next run does the rest")

    return runner.complete(run_id, options, work)
