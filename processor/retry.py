"""Retry policy for a request whose attempt failed: its own small object, as in procrastinate."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryDecision:
    give_up: bool  # True: the request becomes failed (manual cancellation required)
    next_attempt_at: dt.datetime | None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_minutes: int  # wait after the first failure; doubles with each further one
    backoff_max_minutes: int

    def after_failure(self, attempts: int, now: dt.datetime) -> RetryDecision:
        """Decide what happens after the `attempts`-th failed attempt."""
        if attempts >= self.max_attempts:
            return RetryDecision(True, None)
        wait = min(self.backoff_minutes * 2 ** (attempts - 1), self.backoff_max_minutes)
        return RetryDecision(False, now + dt.timedelta(minutes=wait))
