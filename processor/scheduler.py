"""`cancelproc schedule`: the nightly job for hosts without cron, in the foreground.

The `schedule` package runs the job daily at the configured times in the business time
zone (it follows daylight saving changes). The loop sleeps until the next run, logs when
that is, and ends on SIGTERM/SIGINT; a run in progress finishes its chunk first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import schedule
import structlog


class StopRequest(Protocol):
    """What tells the loop to end: a threading.Event, or the CLI's signal flag (whose
    handler must not take the Event's lock)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


def nightly(times: Sequence[str], zone: str, job: Callable[[], Any]) -> schedule.Scheduler:
    """A scheduler with `job` every day at each HH:MM of `times`, local time in `zone`."""
    scheduler = schedule.Scheduler()
    for at in times:
        scheduler.every().day.at(at, zone).do(job)
    return scheduler


def next_run(scheduler: schedule.Scheduler, zone: dt.tzinfo) -> dt.datetime | None:
    """The next run as an aware time in the business zone (schedule keeps naive local times)."""
    when = scheduler.get_next_run()
    return when.astimezone(zone) if when else None


def serve(scheduler: schedule.Scheduler, stop: StopRequest, zone: dt.tzinfo, *, longest_sleep: float = 60) -> None:
    """Run due jobs until `stop` is set; sleep in between (at most `longest_sleep` seconds,
    so a changed clock is noticed)."""
    log = structlog.get_logger("cancelproc.schedule")
    announced: dt.datetime | None = None
    while not stop.is_set():
        scheduler.run_pending()
        upcoming = next_run(scheduler, zone)
        if upcoming != announced:
            log.info("next run", at=upcoming.isoformat() if upcoming else None)
            announced = upcoming
        idle = scheduler.idle_seconds
        stop.wait(timeout=min(max(idle if idle is not None else longest_sleep, 0.5), longest_sleep))
    log.info("scheduler stopped")
