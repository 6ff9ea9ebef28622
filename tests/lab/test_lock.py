"""The deploy lock's lease (deployers/lock.py) against a real lab server over SFTP: a lease
another run takes, a heartbeat that cannot write, a connection that drops, a clock past the ttl,
a stalled SFTP session, and release() of a lost lease.

Each test uses its own app name under one root directory in the server's home
(~/.runner-test-locks-<random>), removed at the end."""
from __future__ import annotations

import secrets as _random
import time

import pytest

from deployers import lock as locks
from deployers.lock import LockLost
from deployers.spec import Target
from deployers.transport import HostKeyPolicy, SSHOptions, connect, load_private_key

TTL = 3.0  # heartbeat every second
MARGIN = 1.5


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@pytest.fixture(scope="module")
def server(lab):
    return lab["servers"][0]


def _connect(server):
    opts = SSHOptions(key=load_private_key(path=server["key_file"]),
                      host_keys=HostKeyPolicy(known_hosts=server["known_hosts"]),
                      connect_timeout=5, retries=1)
    target = Target(label=server["name"], host=server["host"], port=server["port"],
                    user=server["user"])
    return connect(target, opts)


@pytest.fixture(scope="module")
def conns(server):
    """Two connections to the same server: this run's and another run's."""
    a, b = _connect(server), _connect(server)
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def root(conns):
    conn = conns[1]
    home = conn.sftp_do(lambda sftp: sftp.normalize("."))
    path = f"{home}/.runner-test-locks-{_random.token_hex(4)}"
    yield path
    conn.run(["rm", "-rf", path], check=True)


@pytest.fixture
def app():
    return f"locktest-{_random.token_hex(3)}"


def _holder(run_id: str, commit: str = "") -> dict:
    return locks.holder_info(run_id, pipeline="locktest", commit=commit, ttl=TTL)


def _until_check_raises(lease, within: float) -> tuple[LockLost, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        try:
            lease.check()
        except LockLost as exc:
            return exc, time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"check() did not raise within {within:g}s")


def test_a_healthy_lease_is_renewed_past_its_ttl(conns, root, app):
    mine, other = conns
    lease = locks.acquire(mine, root, app, _holder("run-one"), ttl=TTL, wait=0)
    try:
        time.sleep(TTL + 1)
        lease.check()
        lease.verify()
        info = locks.inspect(other, root, app)
        assert info.token == lease.token and not info.stale and info.age < TTL
    finally:
        lease.release()
    assert locks.inspect(other, root, app) is None


def test_lease_taken_by_another_run(conns, root, app, server):
    mine, other = conns
    label = server["name"]
    first = locks.acquire(mine, root, app, _holder("run-one"), ttl=TTL, wait=0)
    first.verify()
    # Another run breaks the lease on purpose and takes a fresh one.
    assert locks.break_lock(other, root, app)
    second = locks.acquire(other, root, app, _holder("run-two", commit="c0ffee" * 5),
                           ttl=30, wait=0)
    try:
        with pytest.raises(LockLost) as err:
            first.verify()
        msg = str(err.value)
        assert msg.startswith(f"{label}: the deploy lock for {app!r} was lost: another run "
                              f"took it: run run-two, pipeline locktest, commit c0ffeec0ffee, "
                              f"by "), msg
        assert msg.endswith(f"Nothing more is done on {label} by this run."), msg
        assert err.value.holder["token"] == second.token
        assert first.is_lost and first.lost.is_set()
        # (d) Releasing the lost lease leaves the other run's lock alone.
        first.release()
        info = locks.inspect(other, root, app)
        assert info is not None and info.token == second.token
        second.verify()
    finally:
        second.release()
    assert locks.inspect(other, root, app) is None


def test_heartbeat_notices_another_run_took_it(conns, root, app):
    mine, other = conns
    first = locks.acquire(mine, root, app, _holder("run-one"), ttl=TTL, wait=0)
    assert locks.break_lock(other, root, app)
    second = locks.acquire(other, root, app, _holder("run-two"), ttl=30, wait=0)
    try:
        err, took = _until_check_raises(first, TTL / 3 + MARGIN)
        assert "another run took it: run run-two" in str(err), err
        print(f"the heartbeat noticed in {took:.2f}s")
        first._thread.join(2)
        assert first.lost.is_set() and not first._thread.is_alive()  # it stopped beating
        first.release()
        assert locks.inspect(other, root, app).token == second.token
    finally:
        second.release()


def test_heartbeat_that_cannot_write_is_lost(conns, root, app):
    mine, other = conns
    lease = locks.acquire(mine, root, app, _holder("run-one"), ttl=TTL, wait=0)
    # The heartbeat writes holder.json.tmp-<token> then renames it: a directory in its place
    # makes the write fail (chmod would not: the lab's user is root).
    tmp = f"{root}/{app}/holder.json.tmp-{lease.token[:8]}"
    other.sftp_do(lambda sftp: sftp.mkdir(tmp))
    err, _ = _until_check_raises(lease, TTL / 3 + MARGIN)
    msg = str(err)
    print(msg)
    assert f"the deploy lock for {app!r} was lost: it could not be renewed (" in msg, msg
    assert "so another run may take it" in msg and err.failure
    with pytest.raises(LockLost):
        lease.verify()
    t0 = time.monotonic()
    lease.release()  # tries to remove its own lock; must not raise nor hang
    assert time.monotonic() - t0 < 5


def test_heartbeat_on_a_dropped_connection_is_lost(server, conns, root, app):
    other = conns[1]
    mine = _connect(server)
    try:
        lease = locks.acquire(mine, root, app, _holder("run-one"), ttl=TTL, wait=0)
        mine.transport.close()
        err, _ = _until_check_raises(lease, TTL / 3 + MARGIN)
        print(err)
        assert "could not be renewed (" in str(err), err
        t0 = time.monotonic()
        lease.release()
        assert time.monotonic() - t0 < 5
        # It could not remove its lock: the lock stays, and goes stale by itself.
        info = locks.inspect(other, root, app)
        assert info is not None and info.token == lease.token
    finally:
        mine.close()
    assert locks.break_lock(other, root, app)


def test_clock_past_ttl_is_lost_without_io(conns, root, app):
    mine, other = conns
    clock = FakeClock()
    lease = locks.acquire(mine, root, app, _holder("run-one"), ttl=30, wait=0, clock=clock,
                          sleep=clock.sleep)
    lease.verify()
    clock.now += 31  # as if this process had been stopped for 31s
    # Holding the connection's SFTP lock: any SFTP operation would block.
    with mine._sftp_lock:
        t0 = time.monotonic()
        with pytest.raises(LockLost) as err:
            lease.check()
        with pytest.raises(LockLost):
            lease.verify()
        assert time.monotonic() - t0 < 0.5
    assert "no heartbeat succeeded for 31.0s, more than the lease's ttl of 30s" in str(err.value)
    assert lease.lost.is_set()
    # The lock is still ours on the server (nobody took it): release removes it.
    assert locks.inspect(other, root, app).token == lease.token
    lease.release()
    assert locks.inspect(other, root, app) is None


def test_stalled_sftp_session_verify_release_and_heartbeat_are_bounded(conns, root, app):
    mine, other = conns
    a = locks.acquire(mine, root, app, _holder("run-one"), ttl=TTL, wait=0)
    b = locks.acquire(mine, root, f"{app}-b", _holder("run-one"), ttl=TTL, wait=0)
    # The SFTP session stops answering (its lock is held, as by an operation that hangs).
    with mine._sftp_lock:
        t0 = time.monotonic()
        with pytest.raises(LockLost, match=r"could not be confirmed \(the server did not "
                                           r"answer within 0.5s\)"):
            a.verify(timeout=0.5)
        a.release(timeout=1)
        assert time.monotonic() - t0 < 3
        # The heartbeat does not wait past the ttl for an answer.
        assert b.lost.wait(TTL + MARGIN)
        with pytest.raises(LockLost, match="could not be renewed"):
            b.check()
        t0 = time.monotonic()
        b.release(timeout=1)
        assert time.monotonic() - t0 < 3
    # The session answers again: what release() left running removes only its own locks.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (locks.inspect(other, root, app) is not None or
                                           locks.inspect(other, root, f"{app}-b") is not None):
        time.sleep(0.2)
    assert locks.inspect(other, root, app) is None
    assert locks.inspect(other, root, f"{app}-b") is None
