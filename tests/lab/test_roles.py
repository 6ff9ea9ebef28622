"""Roles on two lab servers, for real: the session's busybox httpd images (tests.lab.
deploy_fixtures) as a web role on both servers and a worker role (a shell loop, no port, the
image's HEALTHCHECK off) on the second; one release, one rollout, one rollback."""
from __future__ import annotations

import json
import os
import secrets as _random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deployers.app_deployer import AppDeployer
from deployers.base import DeployFailed
from runner.model.image import ImageRef
from tests.lab.deploy_fixtures import UID, Log, _cleanup, _get, _port, _servers, _stage

WORKER = ["sh", "-c", "while true; do sleep 1; done"]
ROOT = Path(__file__).resolve().parents[2]


def _app(stage, images, version, name, log=None, run_id=None):
    return AppDeployer(stage, pipeline=name, image_name=images["repo"],
                       run_id=run_id or f"r{_random.token_hex(3)}",
                       image=ImageRef.parse(images[version]), commit=version * 10, log=log)


@pytest.fixture
def roles_app(lab):
    name = f"ro{UID}{_random.token_hex(2)}"
    yield name
    for app in (name, f"{name}-worker"):
        _cleanup(lab, app, lab["servers"])


def _containers(d: AppDeployer) -> dict[str, tuple[str, str]]:
    """unit -> (container id, digest label) of every role's running container."""
    out = {}
    for r in d.roles:
        rd = d.by_role[r.name]
        for t in rd.targets:
            st = rd.inspect(rd.connection(t), r.container)
            out[t.label] = (st.id, st.labels.get("runner.digest", "")) if st and st.running \
                else ("", "")
    return out


def test_web_and_worker_are_one_release_a_crash_looping_worker_puts_both_back(
        lab, images, roles_app, tmp_path):
    """One release on two servers: a crash-looping worker's deploy puts every role back, a
    deploy and a rollback move web and worker together; then the app commands: `runner app
    logs|exec --role worker` reach the worker's container on its server (by the server's own
    name), an unknown role is exit 2 naming the roles, and `runner app remove` removes every
    role's containers and history."""
    from click.testing import CliRunner

    from runner.cli.main import cli
    name = roles_app
    servers = _servers(lab, 2)
    hosts = [s["host"] for s in servers]
    second = servers[1]['host']
    port = _port()
    stage = _stage(lab, servers, name, port, roles={
        "web": {}, "worker": {"command": ["sh", "-c", "echo working; exec sleep 3600"],
                              "servers": [second], "env": {"QUEUE": "default"}}})
    log = Log()
    d = _app(stage, images, "v1", name, log)
    plan = d.plan()
    web1, web2 = (t.label for t in d.targets)
    worker = f"{web2}/worker"
    assert [s.server for s in plan.servers] == [web1, web2, worker]
    run = plan.server(worker).command("run").to_dict()["argv"]
    assert "--no-healthcheck" in run and "--publish" not in run
    assert run[-3:] == ["sh", "-c", "echo working; exec sleep 3600"]
    report = d.apply(plan)
    assert report.ok and [s.server for s in report.servers] == [web1, web2, worker]
    w = next(s for s in report.servers if s.server == worker)
    assert w.status == "deployed" and "no health check of its own" in w.reason, w
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]
    v1 = _containers(d)
    assert {u: dg for u, (_, dg) in v1.items()} == {
        u: images["v1"].split("@")[1] for u in (web1, web2, worker)}
    env = d.by_role["worker"].connection(d.by_role["worker"].targets[0]).run(
        ["docker", "exec", f"{name}-worker", "sh", "-c", "echo $QUEUE"]).stdout.strip()
    assert env == "default"
    d.close()

    # v2 whose worker exits after a second: docker restarts it, the rollout sees the restart,
    # and every role on every server is put back on v1 (the very same containers).
    crashing = _stage(lab, servers, name, port, roles={
        "web": {}, "worker": {"command": ["sh", "-c", "sleep 0.5; exit 3"],
                              "servers": [second], "healthcheck": {"min_uptime": 4}}})
    log = Log()
    d = _app(crashing, images, "v2", name, log)
    with pytest.raises(DeployFailed) as err:
        d.apply(d.plan())
    rows = {s.server: s for s in err.value.report.servers}
    assert rows[worker].status == "failed" and "restarted it" in rows[worker].reason + \
        rows[worker].reason, rows[worker]
    assert all(rows[u].status in ("rolled_back", "failed") for u in (web1, web2))
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]
    assert _containers(d) == v1
    d.close()

    # v2 for real, then one rollback: web and worker back to v1 together.
    d = _app(stage, images, "v2", name, Log())
    assert d.apply(d.plan()).ok
    assert {dg for _, dg in _containers(d).values()} == {images["v2"].split("@")[1]}
    d.close()
    d = _app(stage, images, "v2", name, Log())
    back = d.rollback()
    assert back.ok and {s.server for s in back.servers} == {web1, web2, worker}
    assert {dg for _, dg in _containers(d).values()} == {images["v1"].split("@")[1]}
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]
    d.close()

    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"name": name, "repository": {"url": "."},
                                "image": {"name": images["repo"]},
                                "stages": {"deploy": stage.model_dump(mode="json",
                                                                      exclude_none=True)}}))
    run = CliRunner().invoke
    r = run(cli, ["app", "exec", str(path), "--role", "worker", "--server", web2, "--",
                  "sh", "-c", "echo $QUEUE"])
    assert r.exit_code == 0 and r.output.strip() == "default", r.output
    r = run(cli, ["app", "logs", str(path), "--role", "worker"])
    assert r.exit_code == 0 and "working" in r.output, r.output
    r = run(cli, ["app", "logs", str(path), "--role", "cron"])
    assert r.exit_code == 2 and "unknown role 'cron': this pipeline's roles are web, worker" \
        in r.output, r.output
    r = run(cli, ["app", "exec", str(path), "--role", "worker", "--server", web1, "--", "true"])
    assert r.exit_code == 2 and "the role worker runs on " + web2 in r.output, r.output
    r = run(cli, ["app", "remove", str(path), "--yes"])
    assert r.exit_code == 0, r.output
    assert f"removed container {name}-worker " in r.output, r.output
    d = _app(stage, images, "v1", name)
    for role_d in d.by_role.values():  # nothing labelled with any role's app name is left
        for t in role_d.targets:
            assert role_d.app_containers(role_d.connection(t)) == []
            assert role_d.history(role_d.connection(t)) == []
    d.close()


def test_a_deploy_killed_after_its_release_command_is_recovered_role_by_role(lab, images,
                                                                             roles_app):
    """A deploy in a process of its own (tests/data/deploy/child.py) runs its release command,
    switches web on both servers and the worker, and is SIGKILLed (by pid) while the worker's
    gate waits: every role is left on the unverified release. The next deploy returns each
    role on each server to its last verified release first: the very containers that ran."""
    name = roles_app
    servers = _servers(lab, 2)
    port = _port()
    roles = {"web": {}, "worker": {"command": WORKER, "servers": [servers[1]["host"]]}}
    stage = _stage(lab, servers, name, port, roles=roles, lock={"ttl": 60, "wait": 20})
    d = _app(stage, images, "v1", name)
    assert d.apply(d.plan()).ok
    before = _containers(d)
    d.close()
    stuck = _stage(lab, servers, name, port, lock={"ttl": 60, "wait": 20},
                   release_command=["sh", "-c", "echo migrated"],
                   roles={**roles, "worker": {**roles["worker"], "healthcheck": {
                       "cmd": "false", "timeout": 60, "probe_interval": 0.2}}})
    cfg = {"stage": stuck.model_dump(by_alias=True), "app": name, "repo": images["repo"],
           "ref": images["v2"], "run_id": "killed", "commit": "2" * 40}
    child = subprocess.Popen([sys.executable, str(ROOT / "tests/data/deploy/child.py"),
                              json.dumps(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    said = []
    try:
        for line in child.stderr:
            said.append(line)
            if "/worker: waiting for health" in line:
                break
        else:
            pytest.fail("the child deploy never reached the worker's gate:\n" + "".join(said))
        assert any("release: migrated" in line for line in said), said
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    d = _app(stage, images, "v1", name)
    left = _containers(d)
    worker = next(u for u in left if u.endswith("/worker"))
    assert left[worker][1] == images["v2"].split("@")[1], left  # the killed run's, unverified
    log = Log()
    d = _app(stage, images, "v1", name, log)
    report = d.apply(d.plan())
    assert report.ok, report.summary()
    for row in report.servers:  # web on both servers and the worker: each recovered first
        assert "returned to the last verified release" in row.reason, (row, log.text)
    assert _containers(d) == before
    assert [_get(s["host"], port) for s in servers] == ["v1", "v1"]
    d.close()


def test_behind_the_proxy_web_and_worker_deploy_dropping_nothing(lab, images, roles_app):
    """The zero-downtime request loop of tests/lab/test_proxy.py with roles: web behind the
    proxy on two servers, a worker beside it on the second; a deploy under steady load fails
    no request, and the worker follows the web's release. (The rollback of both roles is the
    first test's; under load, test_proxy's.)"""
    import time

    from runner.model.deploy import DeploySettings
    from tests.lab.test_proxy import _assert_no_drop, _load, _proxy_stage, _via, \
        remove_proxied_app
    name = roles_app
    host = f"{name}.test"
    servers = _servers(lab, 2)
    base = _proxy_stage(lab, servers, name, hosts=[host])
    stage = DeploySettings.model_validate({
        **base.model_dump(by_alias=True, exclude_none=True),
        "roles": {"web": {}, "worker": {"command": WORKER, "servers": [servers[1]["host"]]}}})
    try:
        d = _app(stage, images, "v1", name)
        assert d.apply(d.plan()).ok
        d.close()
        log = Log()
        with _load(servers, host) as load:
            time.sleep(0.3)
            d = _app(stage, images, "v2", name, log)
            report = d.apply(d.plan())
            d.close()
            time.sleep(0.3)
        assert report.ok and len(report.servers) == 3, report.summary()
        _assert_no_drop(load, {"v1", "v2"}, log)
        assert [_via(s, host) for s in servers] == ["v2", "v2"]
        assert {dg for _, dg in _containers(d).values()} == {images["v2"].split("@")[1]}
        d.close()
    finally:
        remove_proxied_app(lab, lab["servers"], name)
