"""The deploy lock's lease (deployers/lock.py) against a real lab server over SFTP: a lease
another run takes, a heartbeat that cannot write, a connection that drops, a clock past the ttl,
a stalled SFTP session, and release() of a lost lease.

Each test uses its own app name under one root directory in the server's home
(~/.runner-test-locks-<random>), removed at the end."""
from __future__ import annotations

import json
import os
import secrets as _random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployers import lock as locks
from deployers.lock import LockLost
from deployers.spec import Target
from deployers.host_keys import HostKeyPolicy
from deployers.ssh_connect import connect
from deployers.ssh_keys import load_private_key
from deployers.ssh_options import SSHOptions
from tests.helpers import ROOT, events, make_repo, stage_end
from tests.lab.deploy_fixtures import Log, _cleanup, _deployer, _get, _port, _stage
from tests.lab.deploy_fixtures import behind  # noqa: F401

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
                              f"started by "), msg
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


# --- two runs at once, a holder killed, an interrupted run: real processes -------------------
# (uses the deploy tests' images and app fixtures: tests/lab/deploy_fixtures.py)

@pytest.fixture
def deployed(lab, behind):
    """An app name for a deploy test; its containers, history and lock removed while the next
    test runs (deploy_fixtures.Behind: these tests look at nothing but their own app)."""
    name = f"lk{_random.token_hex(4)}"
    yield name
    behind.submit(_cleanup, lab, name, lab["servers"])


def _pipeline_file(tmp_path, lab, servers, app: str, port: int, images, **over) -> Path:
    """A pipeline file whose deploy is deploy_fixtures' settings (JSON is YAML)."""
    stage = _stage(lab, servers, app, port, **over)
    path = tmp_path / f"{app}.yaml"
    path.write_text(json.dumps({"name": app, "repository": {"url": "."},
                                "image": {"name": images["repo"]},
                                "stages": {"deploy": stage.model_dump(mode="json",
                                                                      exclude_none=True)}}))
    return path


def _start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# Two runs take ~4 s on the lab (7 s on a quiet CI machine, more on a busy one): 2 trials in the
# suite. Every trial is the whole race (two processes started together contend for the same
# three locks; the waiter says for whom, or the loser fails naming the holder), the second from
# the release the first left serving; the one order the locks are taken in is proven by
# tests/unit/test_rollout.py. RUNNER_LOCK_TRIALS=10 for the ten.
TRIALS = int(os.environ.get("RUNNER_LOCK_TRIALS", "2"))


def test_two_runs_at_once_on_three_servers_never_deadlock(lab, images, deployed, tmp_path):
    """`runner rollback` of one pipeline twice at once, each to another release already on the
    servers: locks taken in one order, so one run holds all three servers and the other waits
    for it (saying for whom), then deploys. Before, each could take some servers' locks in
    parallel and wait for the other's until both failed."""
    name = deployed
    port = _port()
    servers = lab["servers"][:3]
    stage = _stage(lab, servers, name, port, lock={"ttl": 10, "wait": 20})
    for version in ("v1", "v2"):  # both releases verified on every server
        d = _deployer(stage, images, version, name, Log())
        assert d.apply().ok
        d.close()
    p = _pipeline_file(tmp_path, lab, servers, name, port, images,
                       lock={"ttl": 10, "wait": 20})
    took = []
    for trial in range(TRIALS):
        t0 = time.monotonic()
        runs = {v: _start("rollback", str(p), "--to", images[v].split("@", 1)[1],
                          "--run-id", f"{v}-{trial}")
                for v in ("v1", "v2")}
        out = {v: proc.communicate(timeout=120) for v, proc in runs.items()}
        took.append(time.monotonic() - t0)
        codes = {v: runs[v].returncode for v in runs}
        said = "\n".join(f"--- {v}: exit {codes[v]}\n{out[v][1]}" for v in runs)
        assert 0 in codes.values(), f"trial {trial}: both runs failed\n{said}"
        assert "run ?" not in said, said
        waiter = None
        for v, other in (("v1", "v2"), ("v2", "v1")):
            if f"for the deploy lock held by run {other}-{trial}, " in out[v][1]:
                waiter = v
                assert "started by " in out[v][1], said
                # It waited at the first server of the lock order only, not at each.
                assert out[v][1].count("waiting up to") == 1, said
            if codes[v] != 0:
                assert f"is held by run {other}-{trial}, " in out[v][1], said
        # One after the other: every server ends on one release, the last run's.
        served = {_get(s["host"], port) for s in servers}
        assert len(served) == 1, f"trial {trial}: servers serve {served}\n{said}"
        if waiter is not None and codes[waiter] == 0:
            assert served == {waiter}, said
    print(f"{TRIALS} trials of two runs at once: {', '.join(f'{t:.1f}' for t in took)} s")


def test_the_lock_of_a_killed_run_is_taken_over_at_once(lab, images, deployed):
    """A deploy in a process of its own holds the lock (its health gate waits) and is killed
    (SIGKILL, by pid): the next run on this host sees that process is gone and takes the
    lock at once, not after the lock's ttl of 60 s."""
    name = deployed
    port = _port()
    server = lab["servers"][0]
    stage = _stage(lab, [server], name, port, lock={"ttl": 60, "wait": 20},
                   healthcheck={"timeout": 40})
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    d.close()
    cfg = {"stage": stage.model_dump(by_alias=True), "app": name, "repo": images["repo"],
           "ref": images["v3"], "run_id": "kill-me", "commit": "3" * 40}
    child = subprocess.Popen([sys.executable, str(ROOT / "tests/data/deploy/child.py"),
                              json.dumps(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in child.stderr:
            if "waiting for health" in line:  # v3 never gets healthy: the lock stays held
                break
        else:
            pytest.fail("the child deploy never reached its health gate")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        log = Log()
        d = _deployer(stage, images, "v2", name, log, run_id="next")
        t0 = time.monotonic()
        report = d.apply()
        took = time.monotonic() - t0
        d.close()
    finally:
        if child.poll() is None:
            child.kill()
    print(log.text)
    assert report.ok, report
    assert (f"took over the deploy lock held by run kill-me, pipeline {name}, commit "
            f"333333333333, started by ") in log.text
    assert f"its process (pid {child.pid} on this host) is gone" in log.text
    assert "waiting up to" not in log.text
    assert took < 30, f"took {took:.1f}s"  # generous; the ttl is 60 s, the wait 20 s
    assert _get(server["host"], port) == "v2"


def _volume_dir(server, volume: str) -> Path:
    """Where a named volume of the server's own docker engine lives (the lab's servers share
    this machine's filesystem)."""
    r = subprocess.run(["docker", "-H", server["docker_host"], "volume", "create", volume],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == volume
    r = subprocess.run(["docker", "-H", server["docker_host"], "volume", "inspect", "--format",
                        "{{.Mountpoint}}", volume], capture_output=True, text=True, check=True)
    return Path(r.stdout.strip())


def test_sigint_of_runner_exec_mid_batch_puts_every_server_back(lab, images, deployed, tmp_path):
    """`runner exec` deploys to two servers at once (strategy all); the first passes its health
    gate, the second's gate is slow; SIGINT: exit 130, and both servers are back on the last
    verified release, as the run's record says. Before, the interrupt left the rollout
    without its undo: the server already switched kept the new release, unverified."""
    name = deployed
    port = _port()
    fast, slow = lab["servers"][:2]
    volume = f"{name}-state"
    # Each probe leaves a mark of the release it probes in the container's volume (its own
    # engine's); on `slow`, a marker there keeps the probe failing.
    probe = 'touch "/state/probed-$(cat /www/index.html)"; test ! -e /state/slow'
    settings = dict(container={"volumes": [f"{volume}:/state"]},
                    healthcheck={"http": None, "cmd": probe,
                                 "timeout": 30, "probe_interval": 0.2})
    stage = _stage(lab, [fast, slow], name, port, **settings)
    dirs = {s["name"]: _volume_dir(s, volume) for s in (fast, slow)}
    try:
        d = _deployer(stage, images, "v1", name, Log())
        assert d.apply().ok
        labels = [t.label for t in d.targets]
        (dirs[slow["name"]] / "slow").write_text("")
        repo = make_repo(tmp_path / "repo", {"Dockerfile": (
            "FROM local/busybox:1\n"
            "RUN mkdir -p /www && echo new > /www/index.html && echo ok > /www/health\n"
            'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]\n')})
        p = tmp_path / "p.yaml"
        p.write_text(json.dumps({
            "name": name, "repository": {"url": str(repo)},
            "image": {"name": f"{lab['registry']}/test/{name}"},
            "stages": {"deploy": stage.model_dump(mode="json", exclude_none=True)}}))
        run = _start("exec", str(p), "--json", "--run-id", "interrupted", "--data-dir",
                     str(tmp_path / "data"))
        try:
            deadline = time.monotonic() + 120
            while not ((dirs[fast["name"]] / "probed-new").exists()
                       and (dirs[slow["name"]] / "probed-new").exists()):
                assert time.monotonic() < deadline and run.poll() is None, run.communicate()
                time.sleep(0.1)
            time.sleep(1)  # the fast server's gate passed at its first probe
            assert _get(fast["host"], port) == "new"
            run.send_signal(signal.SIGINT)
            stdout, stderr = run.communicate(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.returncode == 130, stdout[-3000:] + stderr[-3000:]
        for s in (fast, slow):
            assert _get(s["host"], port) == "v1", s["name"]
        for row in d.verify():
            assert row.running and row.verified and row.digest == \
                images["v1"].split("@", 1)[1], row
        d.close()
        deploy = stage_end(events(stdout), "deploy")
        assert deploy["status"] == "cancelled", deploy
        assert deploy["error"] == (f"cancelled: deploy of {name} stopped; "
                                   f"put back on the previous verified release: "
                                   f"{', '.join(labels)}"), deploy
    finally:
        _cleanup(lab, name, lab["servers"])  # the containers first: they use the volume
        for s in (fast, slow):
            subprocess.run(["docker", "-H", s["docker_host"], "volume", "rm", "-f", volume],
                           capture_output=True)
