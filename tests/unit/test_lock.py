"""Pure logic of the deploy lock's lease (deployers/lock.py): the ttl-since-renewal rule with an
injected clock, what a failed or stalled heartbeat means, bounded verify/release, and the texts
of LockLost. The connection here is a stand-in whose sftp_do never touches a server: the SFTP
side of the lease is tested against the lab's real servers in tests/lab/test_lock.py."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from deployers import lock as locks
from deployers.lock_holder import Here, describe_holder, gone, here, holder_info
from runner.proc import start_time
from deployers.lock import Lease, LockLost
from deployers.ssh_errors import TransportError

HOLDER = {"token": "f" * 32, "run_id": "r1", "pipeline": "web", "commit": "c" * 40,
          "who": "ci@box pid 7", "ttl": 30}


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class NoIO:
    """A connection that must not be used."""
    label = "srv9"

    def sftp_do(self, fn):
        raise AssertionError("no I/O expected")


class Failing:
    label = "srv9"

    def __init__(self, error: Exception):
        self.error = error
        self.calls = 0

    def sftp_do(self, fn):
        self.calls += 1
        raise self.error


class Stalled:
    """A server that stopped answering: every SFTP operation blocks until `go` is set."""
    label = "srv9"

    def __init__(self):
        self.go = threading.Event()

    def sftp_do(self, fn):
        self.go.wait(30)
        raise TransportError(self.label, "SFTP failed: gone")


def lease(conn, clock=None, ttl=30.0) -> Lease:
    return Lease(conn, "/home/x/locks", "web", dict(HOLDER), ttl, clock=clock or FakeClock())


def test_lost_by_the_clock_after_ttl_without_io():
    clock = FakeClock()
    le = lease(NoIO(), clock)
    le.check()
    assert not le.is_lost and not le.lost.is_set()
    clock.now += 30  # exactly ttl: not more than ttl yet
    le.check()
    clock.now += 0.5
    assert le.is_lost and le.lost.is_set()
    with pytest.raises(LockLost) as err:
        le.check()
    assert str(err.value) == (
        "srv9: the deploy lock for 'web' was lost: it could not be renewed (no heartbeat "
        "succeeded for 30.5s, more than the lease's ttl of 30s: this process was stopped or the "
        "server stalled), so another run may take it. Nothing more is done on srv9 by this run.")
    assert err.value.server == "srv9" and err.value.app == "web" and err.value.holder is None
    assert isinstance(err.value, TransportError)
    # verify() checks the clock before any I/O, and the heartbeat does not try either.
    with pytest.raises(LockLost):
        le.verify()
    assert le._heartbeat() is False


def test_lost_is_final_even_if_a_late_renewal_lands():
    clock = FakeClock()
    le = lease(NoIO(), clock)
    clock.now += 31
    assert le.is_lost
    le._renewed_at(clock.now)  # a stalled heartbeat that finally finished
    clock.now += 0
    assert le.is_lost
    with pytest.raises(LockLost):
        le.check()


def test_a_renewal_resets_the_clock_rule():
    clock = FakeClock()
    le = lease(NoIO(), clock)
    clock.now += 20
    le._renewed_at(clock.now)
    clock.now += 25  # 45 since the lease was taken, 25 since the renewal
    le.check()
    le._renewed_at(clock.now - 100)  # an older start time never moves it back
    le.check()


def test_a_failed_heartbeat_counts_as_lost_and_stops_beating():
    conn = Failing(TransportError("srv9", "SFTP failed: Socket is closed"))
    le = lease(conn)
    assert le._heartbeat() is False
    assert le.lost.is_set() and conn.calls == 1
    with pytest.raises(LockLost) as err:
        le.check()
    msg = str(err.value)
    assert "could not be renewed (SFTP failed: Socket is closed)" in msg, msg
    assert err.value.failure == "SFTP failed: Socket is closed"
    assert le._heartbeat() is False and conn.calls == 1  # lost: no more attempts


def test_other_errors_are_named_by_type():
    le = lease(Failing(PermissionError(13, "Permission denied")))
    le._heartbeat()
    with pytest.raises(LockLost, match=r"could not be renewed \(PermissionError: \[Errno 13\] "
                                       r"Permission denied\)"):
        le.check()


def test_stalled_server_heartbeat_verify_and_release_are_bounded():
    conn = Stalled()
    try:
        # The heartbeat waits no longer than what is left of the ttl.
        le = lease(conn, clock=time.monotonic, ttl=0.6)
        t0 = time.monotonic()
        assert le._heartbeat() is False
        assert 0.4 < time.monotonic() - t0 < 2
        with pytest.raises(LockLost, match="did not answer the heartbeat within 0.6s"):
            le.check()
        # verify() cannot confirm within its timeout: lost ("could not be confirmed").
        le = lease(conn)
        t0 = time.monotonic()
        with pytest.raises(LockLost) as err:
            le.verify(timeout=0.3)
        assert time.monotonic() - t0 < 2
        assert "could not be confirmed (the server did not answer within 0.3s)" in str(err.value)
        # release() gives up after its timeout and does not raise.
        le = lease(conn)
        t0 = time.monotonic()
        le.release(timeout=0.3)
        assert time.monotonic() - t0 < 2
    finally:
        conn.go.set()


def test_release_stops_a_heartbeat_stuck_on_a_stalled_server():
    conn = Stalled()
    try:
        le = lease(conn, clock=time.monotonic, ttl=1.5).start()  # beats every 0.5s
        time.sleep(0.8)  # the first beat is now stuck
        t0 = time.monotonic()
        le.release(timeout=0.5)
        assert time.monotonic() - t0 < 2
        assert not le._thread.is_alive()
        assert not le.lost.is_set()  # released: what the stuck beat meets is no longer news
    finally:
        conn.go.set()


def test_release_of_a_lease_another_run_took_does_no_io():
    le = lease(NoIO())
    le._mark_lost(holder={"token": "0" * 32, "run_id": "r2"})
    le.release()  # NoIO would raise inside; release must not even try
    assert le._released


def test_first_cause_wins():
    le = lease(NoIO())
    le._mark_lost(holder={"token": "0" * 32, "run_id": "r2", "pipeline": "web"})
    le._mark_lost(failure="later")
    with pytest.raises(LockLost, match="another run took it: run r2, pipeline web"):
        le.check()


def test_lock_lost_texts():
    other = {"token": "0" * 32, "run_id": "r2", "pipeline": "web", "commit": "a" * 40,
             "who": "ci@other pid 9"}
    assert str(LockLost("srv1", "web", holder=other)) == (
        "srv1: the deploy lock for 'web' was lost: another run took it: run r2, pipeline web, "
        "commit aaaaaaaaaaaa, started by ci@other pid 9. Nothing more is done on srv1 by this "
        "run.")
    assert str(LockLost("srv1", "web")) == (
        "srv1: the deploy lock for 'web' was lost: another run broke it (who holds it now could "
        "not be read). Nothing more is done on srv1 by this run.")
    assert str(LockLost("srv1", "web", failure="SFTP failed: EOF")) == (
        "srv1: the deploy lock for 'web' was lost: it could not be renewed (SFTP failed: EOF), "
        "so another run may take it. Nothing more is done on srv1 by this run.")
    assert "could not be confirmed (x)" in str(
        LockLost("srv1", "web", failure="x", action="confirmed"))


def test_lock_info_describe_names_the_holder_and_when_it_started():
    info = locks.LockInfo(app="web", holder=dict(HOLDER, acquired=1796662982.5), age=12.4,
                          ttl=30)
    assert info.describe() == ("run r1, pipeline web, commit cccccccccccc, started by ci@box "
                               "pid 7 at 2026-12-07 17:03:02 UTC (last heartbeat 12s ago, "
                               "ttl 30s, alive)")


def test_a_holder_without_a_run_id_is_described_by_what_is_known():
    # holder.json of an older runner, or of a command that has no run id: never "run ?".
    assert describe_holder({"token": "t", "pipeline": "web", "who": "ci@box pid 7",
                            "acquired": 1796662982}) == \
        "a run of pipeline web, started by ci@box pid 7 at 2026-12-07 17:03:02 UTC"
    assert describe_holder({"token": "t", "who": "ci@box pid 7"}) == \
        "a run, started by ci@box pid 7"
    # The lock directory exists, its holder.json not yet (or never: its taker died).
    assert describe_holder({}) == ("a run that has not written its holder.json yet (it is "
                                   "taking the lock right now, or died while taking it)")
    for h in ({}, {"token": "t"}, {"pipeline": "web"}, HOLDER):
        assert "?" not in describe_holder(h)


def _holder_of(pid: int) -> dict:
    """holder.json as another process of this host, `pid`, would write it."""
    return dict(holder_info("r1", "web", ttl=30), pid=pid, pid_start=start_time(pid))


def test_a_holder_process_of_this_host_that_is_gone_is_known_gone():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        holder = _holder_of(proc.pid)
        assert gone(holder) is None
        info = locks.LockInfo(app="web", holder=holder, age=1, ttl=60)
        assert info.gone is None and info.describe().endswith("alive)")
    finally:
        proc.kill()
    # Killed, not reaped yet (a zombie): it holds nothing any more.
    deadline = time.monotonic() + 5
    while start_time(proc.pid) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert gone(holder) == f"its process (pid {proc.pid} on this host) is gone"
    proc.wait()
    assert gone(holder) == f"its process (pid {proc.pid} on this host) is gone"
    assert info.describe().endswith(f"ttl 60s, abandoned: its process (pid {proc.pid} on this "
                                    f"host) is gone)")
    # The same pid, another process (the pid was reused): gone too.
    mine = holder_info("r1", "web")
    assert gone(mine) is None
    assert gone(dict(mine, pid_start=mine["pid_start"] - 1)) is not None


def test_a_holder_elsewhere_is_judged_by_its_ttl_only_unless_its_host_restarted():
    me = here()
    mine = holder_info("r1", "web")
    gone_pid = dict(mine, pid_start=-1)
    # Another host, another pid namespace on this one, an older record: not judged.
    other = Here("ci-2", "b" * 32, "pid:[1]", "m" * 32)
    assert gone(gone_pid, other) is None
    assert gone(gone_pid, Here(me.host, me.boot_id, "pid:[1]", me.machine_id)) is None
    for key in ("pid", "pid_start", "boot_id", "pid_ns"):
        assert gone({k: v for k, v in gone_pid.items() if k != key}) is None
    # This very machine, booted since: every process of that boot is gone.
    rebooted = Here(me.host, "0" * 32, me.pid_ns, me.machine_id)
    if me.machine_id:
        assert gone(mine, rebooted) == f"its host {me.host} has restarted since it took the lock"
    # Same name, another machine: not judged.
    assert gone(mine, Here(me.host, "0" * 32, me.pid_ns, "x" * 32)) is None
