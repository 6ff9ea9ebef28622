"""The deploy against the lab's servers, for real: tiny busybox httpd images built in the lab's
engine, pushed to its registry, deployed over SSH to the servers' own engines.

Every test uses its own app name and host port, and removes its containers and state at the end.
"""
from __future__ import annotations

import secrets as _random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deployers import lock as locks
from deployers.base import DeployFailed
from deployers.spec import Target
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_connect import connect
from deployers.ssh_errors import HostKeyError
from pipelines.deploy import DeployStage
from runner.errors import StageFailed
from runner.model import Pipeline
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef
from runner.outputs import Outputs
from runner.stage import StageContext
from tests.doubles import checkout_outputs, push_outputs

from tests.lab.deploy_fixtures import (UID, Log, NoSecrets, _deployer, _get, _port, _run_until,
                                   _servers, _stage)

# --------------------------------------------------------------------------------------------

def test_deploy_upgrade_failed_upgrade_then_rollback(lab, images, app, tmp_path):
    name, _ = app
    port = _port()
    servers = _servers(lab, 2)
    hosts = [s["host"] for s in servers]
    stage = _stage(lab, servers, name, port)

    # v1 to two servers: both answer from the host.
    log = Log()
    d = _deployer(stage, images, "v1", name, log)
    report = d.apply(d.plan())
    d.close()
    assert report.ok and [s.status for s in report.servers] == ["deployed", "deployed"]
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]

    # v2: both answer v2.
    t0 = time.monotonic()
    d = _deployer(stage, images, "v2", name, Log())
    assert d.apply(d.plan()).ok
    d.close()
    v2_time = time.monotonic() - t0
    assert [_get(h, port) for h in hosts] == ["v2", "v2"]

    # Same digest again: nothing to do.
    d = _deployer(stage, images, "v2", name, Log())
    assert [s.status for s in d.apply(d.plan()).servers] == ["unchanged", "unchanged"]
    d.close()

    # v3 fails its health check, through the pipeline stage: the stage fails naming the
    # servers, the reason and the rollback; v2 still answers on both.
    fast = stage.model_copy(update={"healthcheck": stage.healthcheck.model_copy(
        update={"timeout": 3})})
    pipeline = Pipeline.model_validate({
        "name": name, "repository": {"url": "."}, "image": {"name": images["repo"]},
        "stages": {"deploy": fast.model_dump(by_alias=True)}})
    slog = Log()
    ctx = StageContext(run_id=f"r{UID}v3", pipeline=pipeline, workdir=tmp_path,
                       cache_dir=tmp_path, log=slog, secrets=NoSecrets(), cancel=threading.Event(),
                       outputs=Outputs(push=push_outputs(images["v3"]),
                                       checkout=checkout_outputs(commit="3" * 40)))
    with pytest.raises(StageFailed) as err:
        DeployStage().run(ctx)
    msg = str(err.value)
    for h in hosts:
        assert h in msg
    assert "404" in msg and "rolled back" in msg and "health check failed" in msg
    assert [_get(h, port) for h in hosts] == ["v2", "v2"]

    # `runner rollback PIPELINE.yaml` goes back to v1 (the version before v2).
    from runner.cli.deploy import make_commands
    rollback, status, _, _ = make_commands(lambda path, variables: pipeline)
    res = CliRunner().invoke(rollback, [str(tmp_path / "unused.yaml")])
    assert res.exit_code == 0, res.output
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]
    res = CliRunner().invoke(status, [str(tmp_path / "unused.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    import json
    rows = json.loads(res.output.strip().splitlines()[-1])
    assert [r["digest"] for r in rows] == [images["v1"].split("@")[1]] * 2
    assert all(r["running"] and r["commit"] == "v1" * 10 for r in rows)

    # And --to a digest goes anywhere kept on the servers.
    res = CliRunner().invoke(rollback, ["x.yaml", "--to", images["v2"].split("@")[1]])
    assert res.exit_code == 0, res.output
    assert [_get(h, port) for h in hosts] == ["v2", "v2"]
    print(f"v2 upgrade of 2 servers took {v2_time:.2f}s")


def test_secret_env_not_in_ps_nor_logs(lab, images, app):
    name, _ = app
    port = _port()
    server = _servers(lab, 1)[0]
    secret = f"s3cr3t-{_random.token_hex(12)}"
    stage = _stage(lab, [server], name, port, container={"secret_env": {"APP_TOKEN": "tok"},
                                                          "env": {"PLAIN": "visible"}})
    # Sample the server's process list as fast as a shell loop can while the deploy runs.
    d0 = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="sampler")
    conn = d0.connection(d0.targets[0])
    samples: list[str] = []

    stop = f"/tmp/runner-test-stop-{name}"

    def sample():
        r = conn.run(["sh", "-c", 'while [ ! -e "$1" ]; do ps -eo args; echo ====; sleep 0.01; '
                      'done; rm -f "$1"', "sh", stop], timeout=60)
        samples.append(r.stdout)
    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(0.5)
    log = Log()
    d = _deployer(stage, images, "v1", name, log, secret=lambda n: {"tok": secret}[n])
    assert d.apply(d.plan()).ok
    d.close()
    conn.run(["touch", stop])
    sampler.join(timeout=60)
    ps = samples[0]
    assert ps.count("====") > 20
    assert "--env-file" in ps  # the sampler did see the deploy's `docker run`
    assert secret not in ps
    assert secret not in log.text
    # The container got it; the env file is gone.
    r = conn.run(["docker", "exec", name, "sh", "-c", 'echo "$APP_TOKEN $PLAIN"'])
    assert r.stdout.strip() == f"{secret} visible"
    env_dir = f"{d0.runner_dir(conn)}/env"
    assert conn.sftp_do(lambda sftp: sftp.listdir(env_dir)) == []
    d0.close()


def test_leftovers_of_a_dead_run_are_swept(lab, images, app):
    """A run killed between writing an env file (or logging a server in) and removing it leaves
    a secret on the server: the next deploy of that app removes it. Logins only once old (a
    concurrent run may be pulling with its own), and never another app's files."""
    name, _ = app
    server = _servers(lab, 1)[0]
    stage = _stage(lab, [server], name, _port())
    d0 = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="sweep")
    conn = d0.connection(d0.targets[0])
    root = d0.runner_dir(conn)
    tok = lambda: _random.token_hex(16)  # noqa: E731
    dead_env = f"{root}/env/{name}--{tok()}.env"
    other_env = f"{root}/env/other{name}--{tok()}.env"
    old_login = f"{root}/auth/{name}--{tok()}"
    new_login = f"{root}/auth/{name}--{tok()}"
    conn.run(["mkdir", "-p", f"{root}/env", old_login, new_login], check=True)
    conn.run(["touch", dead_env, other_env, f"{old_login}/config.json",
              f"{new_login}/config.json"], check=True)
    conn.run(["touch", "-d", "2 hours ago", old_login], check=True)
    try:
        d = _deployer(stage, images, "v1", name, Log())
        assert d.apply().ok
        d.close()
        left = conn.run(["ls", "-a", f"{root}/env", f"{root}/auth"], check=True).stdout
        assert dead_env.rsplit("/", 1)[1] not in left
        assert old_login.rsplit("/", 1)[1] not in left
        assert other_env.rsplit("/", 1)[1] in left
        assert new_login.rsplit("/", 1)[1] in left
    finally:
        conn.run(["rm", "-rf", other_env, new_login, old_login, dead_env])
        d0.close()


def _keygen(tmp_path, kind: str) -> str:
    path = tmp_path / f"k_{kind}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return (tmp_path / f"k_{kind}.pub").read_text().split()[:2]


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa"])
def test_changed_host_key_is_refused(lab, images, app, tmp_path, kind):
    name, _ = app
    server = _servers(lab, 1)[0]
    ktype, b64 = _keygen(tmp_path, kind)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{server['host']} {ktype} {b64}\n")
    stage = _stage(lab, [server], name, _port(), ssh={"known_hosts": str(kh)})
    d = _deployer(stage, images, "v1", name, Log())
    t0 = time.monotonic()
    with pytest.raises(DeployFailed) as err:
        d.apply(d.plan())
    d.close()
    assert time.monotonic() - t0 < 5  # refused at once, not retried
    msg = str(err.value)
    assert "HOST KEY CHANGED" in msg and server["host"] in msg
    assert "nothing was changed" in msg


def test_pinned_host_key_mismatch_is_refused(lab):
    server = _servers(lab, 1)[0]
    stage = _stage(lab, [server], "x", 1)
    opts = SSHDockerDeployer(stage, pipeline="x", image_name="x", run_id="x").options()
    from dataclasses import replace

    from deployers.host_keys import HostKeyPolicy
    import base64

    import paramiko
    other = paramiko.ECDSAKey.generate()
    pin = f"{other.get_name()} {base64.b64encode(other.asbytes()).decode()}"
    policy = HostKeyPolicy(pinned=pin)
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
        connect(Target("s", server["host"], server["port"], "root"), replace(opts,
                                                                            host_keys=policy))


def test_unreachable_server_fails_fast(lab, images, app):
    name, _ = app
    stage = _stage(lab, [{"user": "root", "host": "10.87.53.99", "port": 22}], name, _port(),
                   ssh={"connect_timeout": 1, "retries": 1})
    d = _deployer(stage, images, "v1", name, Log())
    t0 = time.monotonic()
    with pytest.raises(DeployFailed) as err:
        d.apply(d.plan())
    elapsed = time.monotonic() - t0
    d.close()
    assert elapsed < 5, elapsed
    assert "10.87.53.99" in str(err.value) and "after 2 attempts" in str(err.value)


def test_concurrent_deploys_do_not_interleave(lab, images, app):
    name, _ = app
    server = _servers(lab, -1)[0]
    port = _port()
    stage = _stage(lab, [server], name, port)
    logs = {"a": Log(), "b": Log()}
    # a's health gate takes 3 s, so b surely asks while a holds the lock.
    slow = _stage(lab, [server], name, port, healthcheck={"http": None, "timeout": 20,
                                                          "cmd": "sleep 3; test -f /www/health"})
    deployers = {"a": _deployer(slow, images, "v1", name, logs["a"], run_id="runa"),
                  "b": _deployer(stage, images, "v2", name, logs["b"], run_id="runb")}
    results = {}

    def go(k):
        try:
            results[k] = deployers[k].apply()
        except Exception as exc:  # reported by the assertion below
            results[k] = exc
    # b starts once a holds the lock (both pull first, so starting them together would let
    # one finish before the other even asks for the lock).
    threads = [_run_until(logs["a"], "deploy lock taken", lambda: go("a"), timeout=60),
               threading.Thread(target=go, args=("b",))]
    threads[1].start()
    for t in threads:
        t.join(timeout=120)
    for d in deployers.values():
        d.close()
    assert all(getattr(r, "ok", False) for r in results.values()), results

    def window(log):
        taken = next(t for t, line in log.lines if "deploy lock taken" in line)
        released = next(t for t, line in log.lines if "deploy lock released" in line)
        return taken, released
    (a0, a1), (b0, b1) = window(logs["a"]), window(logs["b"])
    print(f"lock windows: a={a0:.2f}-{a1:.2f} b={b0:.2f}-{b1:.2f}")
    assert a1 <= b0 or b1 <= a0, f"lock windows overlap: a={a0:.2f}-{a1:.2f} b={b0:.2f}-{b1:.2f}"
    assert a1 <= b0 and "waiting up to" in logs["b"].text
    assert _get(server["host"], port) == "v2"  # b ran last


def test_lock_held_stale_inspect_and_break(lab, images, app):
    name, _ = app
    server = _servers(lab, -1)[0]
    port = _port()
    stage = _stage(lab, [server], name, port, lock={"wait": 1, "ttl": 3})
    holder_d = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="holder")
    conn = holder_d.connection(holder_d.targets[0])
    root = f"{holder_d.runner_dir(conn)}/locks"
    lease = locks.acquire(conn, root, name, locks.holder_info("held-by-test", name), ttl=3,
                          wait=0)
    try:
        d = _deployer(stage, images, "v1", name, Log())
        with pytest.raises(DeployFailed) as err:
            d.apply()
        d.close()
        assert "held by run held-by-test" in str(err.value)
        [(label, info, error)] = holder_d.lock_status()
        assert info is not None and info.holder["run_id"] == "held-by-test" and not info.stale
        # The holder "crashes": its heartbeat stops, the lease goes stale after ttl, and the
        # next deploy breaks it and proceeds.
        lease._stop.set()
        time.sleep(4.2)
        log = Log()
        d = _deployer(stage, images, "v1", name, log)
        assert d.apply().ok
        d.close()
        assert "broke a stale deploy lock held by run held-by-test" in log.text
        # Breaking on purpose.
        locks.acquire(conn, root, name, locks.holder_info("again", name), ttl=30, wait=0)
        assert holder_d.break_lock() == [(label, True, "")]
        assert holder_d.lock_status()[0][1] is None
    finally:
        holder_d.close()


def test_canary_failure_stops_rollout_and_crash_and_port_taken(lab, images, app):
    name, _ = app
    port = _port()
    servers = lab["servers"][:3]
    hosts = [s["host"] for s in servers]
    stage = _stage(lab, servers, name, port, strategy={"type": "canary"},
                   healthcheck={"timeout": 3})
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    d.close()
    assert [_get(h, port) for h in hosts] == ["v1"] * 3

    # The canary fails: the other servers are never touched.
    d = _deployer(stage, images, "v3", name, Log())
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    statuses = [(s.server, s.status, s.rolled_back) for s in err.value.report.servers]
    assert statuses == [(hosts[0], "failed", True), (hosts[1], "skipped", False),
                        (hosts[2], "skipped", False)], err.value.report.summary()
    assert [_get(h, port) for h in hosts] == ["v1"] * 3

    # A container that crashes at start fails at once (no need to wait for the timeout).
    crash = _stage(lab, servers[:1], name, port, container={"command": ["sh", "-c", "exit 3"]},
                   healthcheck={"timeout": 30})
    d = _deployer(crash, images, "v2", name, Log())
    t0 = time.monotonic()
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert ("exited with code 3" in msg or "docker restarted it" in msg) and "rolled back" in msg
    assert _get(hosts[0], port) == "v1"

    # The host port is taken by something else: docker run fails, v1 comes back.
    conn_d = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="x")
    conn = conn_d.connection(conn_d.targets[1])
    other = port + 1 if port < 29000 else port - 1
    conn.run(["docker", "run", "-d", "--name", f"{name}-squatter", "--label",
              f"runner.app={name}", "-p", f"{other}:8080", images["v1"]], check=True)
    moved = _stage(lab, servers[1:2], name, other)
    d = _deployer(moved, images, "v2", name, Log())
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    assert "docker run failed" in str(err.value) and "rolled back" in str(err.value)
    assert _get(hosts[1], port) == "v1"
    conn_d.close()


def test_jump_host_key_from_secret_and_insecure_warning(lab, tmp_path):
    """Through srv1 as a bastion to srv2, with the key given as a secret's text."""
    s1, s2 = lab["servers"][:2]
    key_text = Path(s1["key_file"]).read_text()
    stage = DeploySettings.model_validate({
        "enabled": True, "servers": [f"root@{s2['host']}:22"],
        "ssh": {"key": "deploy_key", "known_hosts": s1["known_hosts"],
                "jump": f"root@{s1['host']}:22", "connect_timeout": 5}})
    log = Log()
    d = SSHDockerDeployer(stage, pipeline="jumpcheck", image_name="x", run_id="j",
                          secret=lambda n: {"deploy_key": key_text}[n], log=log)
    [row] = d.verify()
    assert row.error == "" and row.status == "absent"
    conn = d.connection(d.targets[0])
    assert conn.jump is not None and conn.jump.target.host == s1["host"]
    # The command really ran on srv2's engine.
    assert conn.run(["sh", "-c", "echo $DOCKER_HOST"]).stdout.strip().endswith("srv2/docker.sock")
    d.close()
    assert key_text.strip().splitlines()[1] not in log.text

    insecure = DeploySettings.model_validate({
        "enabled": True, "servers": [f"root@{s2['host']}:22"],
        "ssh": {"key_file": s1["key_file"], "insecure_ignore_host_key": True}})
    log = Log()
    d = SSHDockerDeployer(insecure, pipeline="jumpcheck", image_name="x", run_id="j", log=log)
    assert d.verify()[0].error == ""
    d.close()
    assert "insecure_ignore_host_key is on" in log.text


def test_cancel_and_dropped_connection_mid_deploy_restore_previous(lab, images, app):
    """Interrupting the deploy while the new container is on probation (cancel, or the SSH
    connection dropping) puts the previous version back."""
    from runner.errors import Cancelled
    name, _ = app
    port = _port()
    server = _servers(lab, 1)[0]
    stage = _stage(lab, [server], name, port, healthcheck={"timeout": 30})
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    d.close()

    # Cancel while v3 (never healthy) is being probed.
    cancel = threading.Event()
    log = Log()
    d = _deployer(stage, images, "v3", name, log)
    d.cancel = cancel
    out = {}

    def go():
        try:
            out["r"] = d.apply()
        except BaseException as exc:  # collected for the assertion
            out["r"] = exc
    th = _run_until(log, "waiting for health", go)
    t0 = time.monotonic()
    cancel.set()
    th.join(timeout=30)
    d.close()
    assert isinstance(out["r"], Cancelled), out
    assert time.monotonic() - t0 < 5
    assert "rolled back to the previous container" in log.text
    assert _get(server["host"], port) == "v1"

    # The SSH connection drops while v3 is on probation: reconnect, restore, report.
    log = Log()
    d = _deployer(stage, images, "v3", name, log)
    th = _run_until(log, "waiting for health", go)
    d._conns[d.targets[0].label].transport.close()
    th.join(timeout=60)
    d.close()
    assert isinstance(out["r"], DeployFailed), out
    msg = str(out["r"])
    assert "connection" in msg and "rolled back" in msg, msg
    assert _get(server["host"], port) == "v1"
    # Its lock was released through the new connection: the next deploy does not wait.
    log = Log()
    d = _deployer(stage, images, "v2", name, log)
    assert d.apply().ok
    d.close()
    assert "waiting up to" not in log.text and "stale" not in log.text
    assert _get(server["host"], port) == "v2"


def test_missing_image_and_keep_versions(lab, images, app):
    name, _ = app
    port = _port()
    server = _servers(lab, -1)[0]
    stage = _stage(lab, [server], name, port, keep_versions=1)
    for v in ("v1", "v2"):
        d = _deployer(stage, images, v, name, Log())
        assert d.apply().ok
        d.close()
    # keep_versions=1: v1's image is pruned, and there is nothing to roll back to.
    d = SSHDockerDeployer(stage, pipeline=name, image_name=images["repo"], run_id="chk")
    conn = d.connection(d.targets[0])
    assert not conn.run(["docker", "image", "inspect", images["v1"]]).ok
    assert conn.run(["docker", "image", "inspect", images["v2"]]).ok
    with pytest.raises(DeployFailed, match="no previous version is recorded"):
        d.rollback()
    d.close()
    # An image the registry does not have: the pull fails, nothing on the server changes.
    missing = images["repo"] + "@sha256:" + "0" * 64
    d = SSHDockerDeployer(stage, pipeline=name, image_name=images["repo"], run_id="miss",
                          image=ImageRef.parse(missing))
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    assert "pulling" in str(err.value) and "nothing was changed" in str(err.value)
    assert _get(server["host"], port) == "v2"


def test_images_of_unverified_releases_are_pruned_with_keep_versions(lab, images, app):
    """v1, then v3 (fails its health gate, rolled back), then v2, keeping 2 verified releases:
    v3's image goes at v2's commit; v1 (kept) and v2 (running) stay."""
    name, _ = app
    server, port = _servers(lab, -1)[0], _port()
    stage = _stage(lab, [server], name, port, keep_versions=2, healthcheck={"timeout": 2})
    check = SSHDockerDeployer(stage, pipeline=name, image_name=images["repo"], run_id="chk")
    conn = check.connection(check.targets[0])
    try:
        conn.run(["docker", "image", "rm", images["v3"]])  # so that this app's deploy pulls it
        for v, ok in (("v1", True), ("v3", False), ("v2", True)):
            log = Log()
            d = _deployer(stage, images, v, name, log)
            try:
                if ok:
                    assert d.apply().ok, log.text
                else:
                    with pytest.raises(DeployFailed, match="rolled back"):
                        d.apply()
            finally:
                d.close()
        assert f"pruned {images['v3'].split('@')[1][:19]} (pulled for a release that is not " \
               f"a kept verified one)" in log.text, log.text
        assert not conn.run(["docker", "image", "inspect", images["v3"]]).ok
        assert conn.run(["docker", "image", "inspect", images["v1"]]).ok
        assert conn.run(["docker", "image", "inspect", images["v2"]]).ok
        assert _get(server["host"], port) == "v2"
    finally:
        check.close()


def test_worker_without_ports_uses_command_probe(lab, images, app):
    name, _ = app
    server = _servers(lab, -1)[0]
    stage = _stage(lab, [server], name, 1, container={"ports": []},
                   healthcheck={"http": None, "cmd": "test -f /www/health", "timeout": 4})
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    d.close()
    d = _deployer(stage, images, "v3", name, Log())  # v3 has no /www/health
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    assert "health check failed" in str(err.value) and "rolled back" in str(err.value)
    deadline = time.monotonic() + 30
    while True:  # the rollback waited for our probe; docker's own status follows at its tick
        [row] = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="s").verify()
        if row.health != "starting" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert row.running and row.digest == images["v1"].split("@")[1]
    assert row.health == "healthy"  # docker runs the same command (--health-cmd)


def test_refused_key(lab, images, app, tmp_path):
    name, _ = app
    server = _servers(lab, 1)[0]
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    stage = _stage(lab, [server], name, _port(), ssh={"key_file": str(key)})
    d = _deployer(stage, images, "v1", name, Log())
    with pytest.raises(DeployFailed, match="refused the SSH key for user 'root'"):
        d.apply()
    d.close()


def test_reports_say_what_happened_first_failure_no_health_check_env_only_change(lab, images, app):
    """Issue 23 item 6 on one server (stop-start): a first deploy that fails says nothing ran
    before and names the failing digest; a release nothing checks is said so, never
    "healthy"; `runner releases` tells apart releases that differ only in env. (A failed
    upgrade's line naming the failing digest: test_proxy_cli.)"""
    name, _ = app
    server = _servers(lab, 1)[0]
    host, port = server["host"], _port()
    v1, v3 = (images[v].split("@", 1)[1] for v in ("v1", "v3"))
    quick = {"stop_timeout": 0}  # httpd needs no grace; SIGKILL saves seconds per switch
    gated = _stage(lab, [server], name, port, container=quick, healthcheck={"timeout": 1})
    unchecked = _stage(lab, [server], name, port, container=quick,
                       healthcheck={"http": None, "timeout": 5, "min_uptime": 0.5})

    # A first deploy that fails its gate (v3 has no /health): nothing to put back.
    d = _deployer(gated, images, "v3", name, Log())
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    text = str(err.value)
    print(text)
    assert "put back on the previous verified release" not in text
    assert f"removed what this run started, nothing was running before: {host}" in text
    assert f"{host}: failed ({v3[:19]}): health check failed" in text
    assert "removed the failed container, nothing was running before" in text

    # No health check at all: warned, and never called healthy.
    log = Log()
    d = _deployer(unchecked, images, "v1", name, log)
    report = d.apply()
    d.close()
    assert report.ok and _get(host, port) == "v1"
    assert (f"{host}: WARNING: no health check: the image has no HEALTHCHECK and the pipeline "
            f"sets no healthcheck.cmd or healthcheck.http") in log.text
    assert f"{host}: started, not health-checked {v1[:19]}" in log.text
    assert "healthy" not in log.text and "waiting for health" not in log.text
    assert "started, not health-checked" in report.summary()

    # The same image with one more env variable: another release, and `runner releases`
    # shows how they differ (names only, values never).
    with_env = unchecked.model_copy(update={"container": unchecked.container.model_copy(
        update={"env": {"GREETING": "hello-value"}})})
    d = _deployer(with_env, images, "v1", name, Log())
    assert d.apply().ok
    d.close()
    from runner.cli.deploy import make_commands
    pipeline = Pipeline.model_validate({
        "name": name, "repository": {"url": "."}, "image": {"name": images["repo"]},
        "stages": {"deploy": with_env.model_dump(by_alias=True)}})
    releases = make_commands(lambda path, variables: pipeline)[3]
    res = CliRunner().invoke(releases, ["p.yaml", "--json"])
    assert res.exit_code == 0, res.output
    import json
    [row] = json.loads(res.stdout)
    newest, older = row["releases"]
    assert newest["digest"] == older["digest"] == v1
    assert newest["env"] != older["env"] and newest["env_changes"] == ["+GREETING"]
    res = CliRunner().invoke(releases, ["p.yaml"])
    print(res.output)
    lines = [x for x in res.output.splitlines() if v1[:19] in x]
    assert len(lines) == 2 and lines[0] != lines[1]
    assert f"env {newest['env']}" in lines[0] and "env changed: +GREETING" in lines[0]
    assert "hello-value" not in res.output
