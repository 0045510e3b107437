"""What a run does to each due request, and how one bad request stays alone."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import func, insert, select

from processor import cancellations, lease
from processor.errors import LeaseHeld
from processor.models import (
    AuditEntry,
    CancellationRequest,
    Invoice,
    InvoiceStatus,
    Lease,
    OutboxEmail,
    RequestStatus,
    Run,
    RunStatus,
    RunTrigger,
    Service,
    ServiceAddon,
    ServiceStatus,
)
from processor.run import Runner, RunOptions
from processor.run.store import RunStore
from tests import factories

D = dt.date(2026, 11, 26)


def run(db, settings, now, **options):
    return Runner(db, settings, clock=lambda: now).run(RunOptions(as_of=options.pop("as_of", D), **options))


def count(db, model, *where) -> int:
    with db.read_session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_a_due_request_is_applied_whole(db, settings, now):
    with db.session.begin() as s:
        svc = factories.service(s, next_due_date=D - dt.timedelta(days=2), addons=2, unpaid=1, paid=1,
                                first_name="Grace")
        rid = factories.request(s, svc, reason="Moving <b>everything</b> elsewhere").id
        sid = svc.id
    summary = run(db, settings, now, trigger=RunTrigger.CRON, operator="cron")
    assert summary.exit_code == 0
    assert (summary.due, summary.completed, summary.emails_queued, summary.late, summary.max_days_late) == (
        1, 1, 1, 1, 2)
    with db.read_session() as s:
        svc = s.get(Service, sid)
        assert (svc.status, svc.termination_date) == (ServiceStatus.CANCELLED, D)
        assert {a.status for a in s.scalars(select(ServiceAddon).where(ServiceAddon.service_id == sid))} == {
            ServiceStatus.CANCELLED}
        invoices = {i.status for i in s.scalars(select(Invoice).where(Invoice.service_id == sid))}
        assert invoices == {InvoiceStatus.CANCELLED, InvoiceStatus.PAID}  # the paid one is left alone
        req = s.get(CancellationRequest, rid)
        assert (req.status, req.run_id, req.days_late, req.attempts) == (RequestStatus.COMPLETED, summary.run_id, 2, 1)
        assert req.processed_at == now
        audit = sorted((a.entity, a.action) for a in s.scalars(select(AuditEntry).where(AuditEntry.request_id == rid)))
        # The service row names the request; the request row itself records its completion.
        assert audit == [("addon", "cancelled"), ("addon", "cancelled"), ("invoice", "cancelled"),
                         ("service", "cancelled")]
        email = s.scalars(select(OutboxEmail)).one()
        assert email.key == f"service_cancellation_confirmation:request:{rid}"
        assert email.to_address == svc.client.email and email.request_id == rid
        assert email.subject == f"Service Cancellation Confirmation - VPS 4GB ({svc.domain})"
        assert "Dear Grace," in email.text_body and "November 26, 2026" in email.text_body
        assert "Moving <b>everything</b> elsewhere" in email.text_body
        assert "Moving &lt;b&gt;everything&lt;/b&gt; elsewhere" in email.html_body  # autoescaped
        assert email.status.value == "queued"
        record = s.get(Run, summary.run_id)
        assert (record.status, record.trigger, record.due, record.completed, record.late) == (
            RunStatus.COMPLETED, RunTrigger.CRON, 1, 1, 1)
        assert record.finished_at is not None
    assert count(db, Lease) == 0  # released


def test_unpaid_invoices_kept_when_the_setting_is_off(db, settings, now):
    settings.cancel_unpaid_invoices = False
    with db.session.begin() as s:
        svc = factories.service(s, unpaid=2)
        factories.request(s, svc)
    run(db, settings, now)
    assert count(db, Invoice, Invoice.status == InvoiceStatus.UNPAID) == 2


def test_a_rerun_changes_nothing(db, settings, now):
    with db.session.begin() as s:
        for _ in range(5):
            factories.request(s, factories.service(s, addons=1, unpaid=1))
    first = run(db, settings, now)
    audit_after_first = count(db, AuditEntry)
    second = run(db, settings, now)
    assert (first.completed, second.due, second.completed) == (5, 0, 0)
    assert count(db, AuditEntry) == audit_after_first
    assert count(db, OutboxEmail) == 5


def test_chunks_and_limit(db, settings, now):
    settings.chunk_size = 3
    with db.session.begin() as s:
        for _ in range(10):
            factories.request(s, factories.service(s))
    progress: list[int] = []
    runner = Runner(db, settings, clock=lambda: now, progress=progress.append)
    assert runner.count_due(RunOptions(as_of=D, limit=7)) == 7
    summary = runner.run(RunOptions(as_of=D, limit=7))
    assert summary.completed == 7 and progress == [3, 3, 1]
    assert count(db, CancellationRequest, CancellationRequest.status == RequestStatus.PENDING) == 3


def test_one_bad_request_fails_alone_then_retries_with_backoff_then_fails(db, settings, now):
    settings.max_attempts = 3
    settings.retry_backoff_minutes = 60
    with db.session.begin() as s:
        good = [factories.request(s, factories.service(s)).id for _ in range(3)]
        bad_svc = factories.service(s, email="")  # no address to confirm to: bad data
        bad = factories.request(s, bad_svc).id

    first = run(db, settings, now)
    assert (first.completed, first.retrying, first.failed, first.exit_code) == (3, 1, 0, 1)
    assert first.failures == [{"request_id": bad, "service_id": bad_svc.id, "gave_up": False, "vetoed": False,
                               "error": f"client of service {bad_svc.id} has no valid email address ('')"}]
    with db.read_session() as s:
        req = s.get(CancellationRequest, bad)
        assert (req.status, req.attempts, req.next_attempt_at) == (
            RequestStatus.PENDING, 1, now + dt.timedelta(minutes=60))
        assert "no valid email address" in req.last_error
        assert all(s.get(CancellationRequest, g).status is RequestStatus.COMPLETED for g in good)
        assert s.get(Run, first.run_id).status is RunStatus.COMPLETED_WITH_FAILURES

    # Within the backoff: not tried again.
    assert run(db, settings, now + dt.timedelta(minutes=30)).due == 0
    # After it: second attempt, wait doubles.
    later = now + dt.timedelta(minutes=61)
    second = run(db, settings, later)
    assert (second.due, second.retrying) == (1, 1)
    with db.read_session() as s:
        assert s.get(CancellationRequest, bad).next_attempt_at == later + dt.timedelta(minutes=120)
    # Third attempt is the last: failed, manual cancellation required.
    last = run(db, settings, later + dt.timedelta(minutes=121))
    assert (last.failed, last.retrying, last.exit_code) == (1, 0, 1)
    assert last.failures[0]["gave_up"] is True
    with db.read_session() as s:
        req = s.get(CancellationRequest, bad)
        assert (req.status, req.attempts) == (RequestStatus.FAILED, 3)
        actions = [a.action for a in s.scalars(
            select(AuditEntry).where(AuditEntry.request_id == bad).order_by(AuditEntry.id))]
        assert actions == ["attempt_failed", "attempt_failed", "failed"]
        assert s.get(Service, bad_svc.id).status is ServiceStatus.ACTIVE
    assert count(db, OutboxEmail) == 3


def test_a_row_the_database_rejects_is_isolated_by_savepoints(db, settings, now):
    """The chunk's set-based write fails on one row; rewritten row by row, only that row fails."""
    with db.session.begin() as s:
        ids = [factories.request(s, factories.service(s, addons=1)).id for _ in range(5)]
        # An email already queued under the key the run will use for ids[2]: UNIQUE violation.
        s.execute(insert(OutboxEmail).values(
            key=f"service_cancellation_confirmation:request:{ids[2]}", template="x", to_address="a@b.c",
            from_address="a@b.c", subject="s", text_body="t", html_body="h", status="queued", attempts=0,
            created_at=now))
    summary = run(db, settings, now)
    assert (summary.completed, summary.retrying) == (4, 1)
    with db.read_session() as s:
        statuses = {i: s.get(CancellationRequest, i).status for i in ids}
        assert statuses[ids[2]] is RequestStatus.PENDING
        assert "IntegrityError" in s.get(CancellationRequest, ids[2]).last_error
        assert [i for i in ids if statuses[i] is RequestStatus.COMPLETED] == [i for i in ids if i != ids[2]]
        bad_service = s.get(CancellationRequest, ids[2]).service
        assert bad_service.status is ServiceStatus.ACTIVE  # its savepoint rolled back the service update
        assert {a.status for a in bad_service.addons} == {ServiceStatus.ACTIVE}
    assert count(db, OutboxEmail) == 5  # 4 new + the one that was there


@pytest.mark.sqlite_only  # on PostgreSQL the chunk's rows are locked from the start: see the next test
def test_a_request_done_elsewhere_meanwhile_is_skipped(db, settings, now):
    """Read as due, then completed by someone else before the chunk is written: not applied twice."""
    with db.session.begin() as s:
        ids = [factories.request(s, factories.service(s)).id for _ in range(2)]
    runner = Runner(db, settings, clock=lambda: now)
    decide = runner.decider.decide

    def decide_then_race(row, *args):
        outcome = decide(row, *args)
        if row.id == ids[0]:
            with db.session.begin() as s:
                s.get(CancellationRequest, ids[0]).status = RequestStatus.WITHDRAWN
        return outcome

    runner.decider.decide = decide_then_race
    summary = runner.run(RunOptions(as_of=D))
    assert (summary.completed, summary.skipped) == (1, 1)
    with db.read_session() as s:
        assert s.get(CancellationRequest, ids[0]).status is RequestStatus.WITHDRAWN
        assert s.get(CancellationRequest, ids[0]).service.status is ServiceStatus.ACTIVE
    assert count(db, OutboxEmail) == 1


@pytest.mark.postgresql_only
def test_a_claimed_request_is_locked_until_its_chunk_commits(db, settings, now):
    """PostgreSQL: the run claims a chunk's rows (FOR UPDATE SKIP LOCKED) before deciding
    them; a staff withdrawal meanwhile waits for the chunk, then finds the request done."""
    with db.session.begin() as s:
        ids = [factories.request(s, factories.service(s)).id for _ in range(2)]
    runner = Runner(db, settings, clock=lambda: now)
    decide = runner.decider.decide
    staff: dict[str, object] = {}

    def withdraw() -> None:
        try:
            with db.session.begin() as s:
                cancellations.withdraw_request(s, ids[0], actor="staff", now=now)
        except Exception as exc:  # noqa: BLE001 - what the staff command would print
            staff["error"] = exc

    def decide_then_race(row, *args):
        if row.id == ids[0]:
            staff["thread"] = threading.Thread(target=withdraw)
            staff["thread"].start()
            time.sleep(0.2)  # the withdrawal is now waiting on the row lock
            assert staff["thread"].is_alive()
        return decide(row, *args)

    runner.decider.decide = decide_then_race
    summary = runner.run(RunOptions(as_of=D))
    staff["thread"].join(timeout=30)
    assert (summary.completed, summary.skipped) == (2, 0)
    assert str(staff["error"]).startswith(f"request {ids[0]} is completed")


def test_preview_changes_nothing(db, settings, now):
    with db.session.begin() as s:
        factories.request(s, factories.service(s, addons=1, unpaid=1))
        factories.request(s, factories.service(s, status=ServiceStatus.CANCELLED))
        factories.request(s, factories.service(s, email="nobody"))
    before = [count(db, m) for m in (AuditEntry, OutboxEmail, Run)]
    items = list(Runner(db, settings, clock=lambda: now).preview(RunOptions(as_of=D)))
    assert [i["action"] for i in items] == ["cancel", "no-op", "error"]
    assert items[0]["addons"] == "Backup 0" and items[0]["unpaid_invoices"].endswith("24.00")
    assert items[0]["detail"].startswith("Service Cancellation Confirmation")
    assert [count(db, m) for m in (AuditEntry, OutboxEmail, Run)] == before
    assert count(db, CancellationRequest, CancellationRequest.status == RequestStatus.PENDING) == 3


# --- the lease ---------------------------------------------------------------------------

def _hold(db, now, *, host="other-host", pid=4242, expires_in=600) -> int:
    with db.session.begin() as s:
        held = lease.acquire(s, clock=lambda: now, seconds=expires_in, trigger=RunTrigger.CRON, operator="cron",
                             as_of=D, me=lease.Holder(host, pid))
        return held.id


def test_a_live_lease_stops_a_second_run(db, settings, now):
    held = _hold(db, now)
    with pytest.raises(LeaseHeld) as exc:
        run(db, settings, now + dt.timedelta(minutes=1))
    assert exc.value.exit_code == 75
    assert str(exc.value).startswith(f"run {held} in progress on host other-host (pid 4242) since ")
    assert count(db, Run) == 1  # nothing written


def test_an_expired_lease_is_taken_over_and_the_dead_run_recorded(db, settings, now):
    held = _hold(db, now, expires_in=600)
    summary = run(db, settings, now + dt.timedelta(seconds=601))
    with db.read_session() as s:
        dead = s.get(Run, held)
        assert dead.status is RunStatus.ABANDONED and "lease taken over" in dead.error
        assert s.get(Run, summary.run_id).status is RunStatus.COMPLETED


def test_a_dead_process_on_this_host_is_taken_over_at_once(db, settings, now):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = _hold(db, now, host=lease.Holder.this_process().host, pid=int(gone.stdout), expires_in=3600)
    summary = run(db, settings, now + dt.timedelta(seconds=5))
    with db.read_session() as s:
        assert s.get(Run, held).status is RunStatus.ABANDONED
    assert summary.status == RunStatus.COMPLETED


def test_renewing_a_lease_taken_over_raises(db, now):
    held = _hold(db, now, expires_in=10)
    _hold(db, now + dt.timedelta(seconds=11), host="third-host")
    with db.session.begin() as s, pytest.raises(lease.LeaseLost) as exc:
        lease.renew(s, held, now=now + dt.timedelta(seconds=12), seconds=10)
    assert exc.value.exit_code == 75 and f"run {held} stopped: its lease expired" in str(exc.value)


def test_a_killed_but_unreaped_holder_is_dead(db, settings, now):
    """A zombie (killed, its parent has not waited for it yet) still has a pid: it is not alive."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc.send_signal(signal.SIGKILL)
        import psutil

        for _ in range(100):  # until the kernel has made it a zombie
            if psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE:
                break
            import time

            time.sleep(0.01)
        held = _hold(db, now, host=lease.Holder.this_process().host, pid=proc.pid, expires_in=3600)
        assert run(db, settings, now).status == RunStatus.COMPLETED
        with db.read_session() as s:
            assert s.get(Run, held).status is RunStatus.ABANDONED
    finally:
        proc.wait()


def test_a_reused_pid_is_not_the_holder(db, settings, now):
    """The lease names a live pid of this host, but that process started at another time."""
    me = lease.Holder.this_process()
    with db.session.begin() as s:
        lease.acquire(s, clock=lambda: now, seconds=3600, trigger=RunTrigger.CRON, operator="cron", as_of=D, me=me)
    with pytest.raises(LeaseHeld):  # the same process, really alive: held
        run(db, settings, now)
    with db.session.begin() as s:
        s.get(Lease, lease.LEASE_NAME).process_started_at = me.started_at - dt.timedelta(days=3)
    assert run(db, settings, now).status == RunStatus.COMPLETED  # a different process with that pid: dead


def test_after_cron_job_hears_of_a_run_that_stopped_on_an_error(db, settings, now, tmp_path, monkeypatch):
    from processor.hooks import load_hooks

    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "alert.py").write_text(
        "from processor.hooks import add_hook\n"
        "SEEN = []\n"
        "@add_hook('AfterCronJob')\n"
        "def alert(summary):\n"
        "    SEEN.append(summary)\n"
        "    raise RuntimeError('pager unreachable')  # its own failure is only logged\n"
    )
    hooks = load_hooks(tmp_path / "hooks", entry_points=False)
    seen = hooks.of("AfterCronJob")[0].fn.__globals__["SEEN"]
    with db.session.begin() as s:
        factories.request(s, factories.service(s))
    runner = Runner(db, settings, clock=lambda: now, hooks=hooks)

    def broken_write(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(RunStore, "write_chunk", broken_write)  # a failure in the middle of the run
    with pytest.raises(RuntimeError, match="disk on fire"):
        runner.run(RunOptions(as_of=D))
    assert [(s["status"], s["run_id"]) for s in seen] == [("error", 1)]
    with db.read_session() as s:
        assert s.get(Run, 1).status is RunStatus.ERROR and "disk on fire" in s.get(Run, 1).error
    assert count(db, Lease) == 0
