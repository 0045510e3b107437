"""The run lease: one run at a time, and a dead run never blocks the next one for long.

WHMCS keeps an in_progress flag that sticks for 24 hours after a crash. Here the holder
renews an expiry time as it works; a lease past its expiry, or held by a process that no
longer exists on this host, is taken over and its run recorded as abandoned.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
from sqlalchemy import Connection, delete, select, update
from sqlalchemy.orm import Session

from processor.errors import CancelprocError, LeaseHeld
from processor.models import Lease, Run, RunStatus, RunTrigger

LEASE_NAME = "nightly-run"
DELIVERY_LEASE = "email-delivery"
ABANDONED = "abandoned: its process died or stopped renewing the lease; lease taken over"


class LeaseLost(CancelprocError):
    """Our lease expired and another run took it over: stop writing at once."""

    exit_code = 75


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started_at: dt.datetime | None = None  # the process's start time, when known

    @classmethod
    def this_process(cls) -> Holder:
        started = dt.datetime.fromtimestamp(psutil.Process().create_time(), dt.UTC)
        return cls(socket.gethostname(), os.getpid(), started)


def _holder_is_dead(lease: Lease, me: Holder) -> bool:
    """True when the lease's process is known to be gone. Only a process on our own host
    can be checked; elsewhere the expiry decides."""
    if lease.host != me.host:
        return False
    try:
        proc = psutil.Process(lease.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent
            return True
        started = dt.datetime.fromtimestamp(proc.create_time(), dt.UTC)
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
    # Same pid, different start time: the pid was reused by another process.
    return lease.process_started_at is not None and abs((started - lease.process_started_at).total_seconds()) > 1


def _locked(session: Session, name: str) -> Lease | None:
    return session.scalars(select(Lease).where(Lease.name == name).with_for_update()).one_or_none()


def _check_free(lease: Lease | None, *, now: dt.datetime, me: Holder, held: str) -> Lease | None:
    """The lease row if it may be taken over (expired or its holder dead); raise LeaseHeld if
    it is live. `held` names what holds it ("run 41", "email delivery")."""
    if lease is not None and lease.expires_at > now and not _holder_is_dead(lease, me):
        started = lease.acquired_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        raise LeaseHeld(
            f"{held} in progress on host {lease.host} (pid {lease.pid}) since {started}; "
            f"its lease expires at {lease.expires_at.astimezone().strftime('%H:%M:%S %Z')}"
        )
    return lease


def _grant(session: Session, name: str, *, now: dt.datetime, seconds: int, me: Holder, run_id: int | None) -> None:
    session.add(Lease(name=name, run_id=run_id, host=me.host, pid=me.pid, process_started_at=me.started_at,
                      acquired_at=now, expires_at=now + dt.timedelta(seconds=seconds)))
    session.flush()


def acquire(
    session: Session,
    *,
    clock: Callable[[], dt.datetime],
    seconds: int,
    trigger: RunTrigger,
    operator: str,
    as_of: dt.date,
    me: Holder,
) -> Run:
    """Create a running Run holding the lease, or raise LeaseHeld naming the active run."""
    # Read the clock only after the first statement: it may have waited for the write lock,
    # and a run that waited starts (and its lease runs) from when it got it.
    lease = _locked(session, LEASE_NAME)
    now = clock()
    lease = _check_free(lease, now=now, me=me, held=f"run {lease.run_id}" if lease else "")
    if lease is not None:
        session.execute(
            update(Run)
            .where(Run.id == lease.run_id, Run.status == RunStatus.RUNNING)
            .values(status=RunStatus.ABANDONED, finished_at=now, error=ABANDONED)
        )
        session.delete(lease)
        session.flush()
    run = Run(
        trigger=trigger,
        operator=operator,
        as_of=as_of,
        host=me.host,
        pid=me.pid,
        status=RunStatus.RUNNING,
        started_at=now,
        due=0, completed=0, noop=0, retrying=0, failed=0, vetoed=0, emails_queued=0, emails_sent=0,
        emails_failed=0, late=0, max_days_late=0,
    )
    session.add(run)
    session.flush()
    _grant(session, LEASE_NAME, now=now, seconds=seconds, me=me, run_id=run.id)
    return run


def acquire_delivery(session: Session, *, clock: Callable[[], dt.datetime], seconds: int, me: Holder) -> None:
    """Take the email delivery lease (one sender at a time, so no email goes out twice by
    two senders), or raise LeaseHeld."""
    lease = _locked(session, DELIVERY_LEASE)
    now = clock()
    lease = _check_free(lease, now=now, me=me, held="email delivery")
    if lease is not None:
        session.delete(lease)
        session.flush()
    _grant(session, DELIVERY_LEASE, now=now, seconds=seconds, me=me, run_id=None)


def renew_delivery(conn: Connection | Session, *, now: dt.datetime, seconds: int, me: Holder) -> None:
    """Push the delivery lease's expiry forward; raise LeaseLost if another sender took it."""
    changed = _rowcount(conn.execute(
        update(Lease)
        .where(Lease.name == DELIVERY_LEASE, Lease.host == me.host, Lease.pid == me.pid)
        .values(expires_at=now + dt.timedelta(seconds=seconds))
    ))
    if changed != 1:
        raise LeaseLost("email delivery stopped: its lease expired and another sender took it over")


def release_delivery(conn: Connection | Session, me: Holder) -> None:
    conn.execute(delete(Lease).where(Lease.name == DELIVERY_LEASE, Lease.host == me.host, Lease.pid == me.pid))


def renew(conn: Connection | Session, run_id: int, *, now: dt.datetime, seconds: int) -> None:
    """Push our expiry forward; raise LeaseLost if the lease is no longer ours."""
    changed = _rowcount(conn.execute(
        update(Lease)
        .where(Lease.name == LEASE_NAME, Lease.run_id == run_id)
        .values(expires_at=now + dt.timedelta(seconds=seconds))
    ))
    if changed != 1:
        raise LeaseLost(f"run {run_id} stopped: its lease expired and another run took it over "
                        "(raise lease_seconds if chunks take that long)")


def _rowcount(result: Any) -> int:
    """Rows an UPDATE changed (a CursorResult's; Session.execute types its result as Result)."""
    count: int = result.rowcount
    return count


def release(conn: Connection | Session, run_id: int) -> None:
    conn.execute(delete(Lease).where(Lease.name == LEASE_NAME, Lease.run_id == run_id))
