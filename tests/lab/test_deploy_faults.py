"""The deploy under real faults on the lab: a rollback after a config change, a rotated secret,
a server whose sshd is killed mid-switch, a run that loses its lock while stopped (SIGSTOP),
`--to` forms. Real sshd, real engines; faults injected by pid."""
from __future__ import annotations

import json
import os
import secrets as _random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deployers.base import DeployFailed
from runner.cli.deploy import make_commands
from deployers.ssh_docker import SSHDockerDeployer
from runner_lab.host import children
from runner.model import Pipeline
from tests.lab.deploy_fixtures import Log, _apply_until, _deployer, _get, _port, _servers, _stage
from tests.lab.deploy_fixtures import app_behind, behind  # noqa: F401
from tests.helpers import ROOT

# The app writes $GREETING into its index page, so what answers shows the command and env it
# was started with.
GREETING_CMD = ["sh", "-c", 'echo "$GREETING" > /www/index.html && exec httpd -f -p 8080 -h /www']


def _pipeline(name: str, repo: str, stage) -> Pipeline:
    return Pipeline.model_validate({
        "name": name, "repository": {"url": "."}, "image": {"name": repo},
        "stages": {"deploy": stage.model_dump(by_alias=True)}})


def _cli(pipeline: Pipeline, *args: str):
    rollback, status, _, releases = make_commands(lambda path, variables: pipeline)
    cmd = {"rollback": rollback, "status": status, "releases": releases}[args[0]]
    return CliRunner().invoke(cmd, ["unused.yaml", *args[1:]])


def _history(lab, stage, app: str, server: int = 0) -> list[dict]:
    d = SSHDockerDeployer(stage, pipeline=app, image_name="x", run_id="read")
    try:
        return d.history(d.connection(d.targets[server]))
    finally:
        d.close()


def _lab_sshd_pid(name: str) -> int:
    state = json.loads(Path("/var/lib/runner-lab/state.json").read_text())
    return int(state["procs"][f"{name}-sshd"]["pid"])


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for rec in children(todo.pop()):
            out.append(rec["pid"])
            todo.append(rec["pid"])
    return out


def _lab_up() -> None:
    n = os.environ.get("RUNNER_TEST_SERVERS", "3")
    p = subprocess.run([sys.executable, "-m", "runner", "lab", "up", "--servers", n],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.fixture
def app(app_behind):
    """These tests look at nothing on the servers but their own app: each app is removed while
    the next test runs (deploy_fixtures.Behind)."""
    return app_behind


# ------------------------------------------------------------------------------------------

def test_rollback_restores_the_release_exactly_as_it_ran(lab, images, app):
    """Release 1 runs [--name One]-like settings, release 2 a new image with other settings:
    a rollback brings back the old image with ITS command and env, whatever the file says."""
    name, _ = app
    port = _port()
    server = _servers(lab, 1)[0]
    one = _stage(lab, [server], name, port, container={"command": GREETING_CMD,
                                                       "env": {"GREETING": "Hello, One!"}})
    two = _stage(lab, [server], name, port, container={"command": GREETING_CMD,
                                                       "env": {"GREETING": "Hello, Two!"}})
    c1, c2 = "1" * 7 + _random.token_hex(16) + "a", "2" * 7 + _random.token_hex(16) + "b"
    d = _deployer(one, images, "v1", name, Log(), commit=c1)
    assert d.apply().ok
    d.close()
    d = _deployer(two, images, "v2", name, Log(), commit=c2)
    assert d.apply().ok
    d.close()
    assert _get(server["host"], port) == "Hello, Two!"

    # The file now says release 2's settings; the rollback ignores them.
    res = _cli(_pipeline(name, images["repo"], two), "rollback", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    [row] = report["servers"]
    assert _get(server["host"], port) == "Hello, One!"
    assert (row["status"], row["rolled_back"]) == ("rolled_back", True)
    assert row["digest"] == images["v1"].split("@")[1]
    assert row["previous_digest"] == images["v2"].split("@")[1]
    assert set(row["phases"]) >= {"connect", "switch", "start", "health", "commit"}
    # The container is release 1 as recorded: its run id and commit, not "rollback-rollback-".
    res = _cli(_pipeline(name, images["repo"], two), "status", "--json")
    [st] = json.loads(res.output.strip().splitlines()[-1])
    assert st["commit"] == c1 and st["verified"] and not st["run_id"].startswith("rollback")

    # --to: a short git sha, a full one, a position, garbage.
    p = _pipeline(name, images["repo"], two)
    res = _cli(p, "rollback", "--to", c2[:9])
    assert res.exit_code == 0, res.output
    assert _get(server["host"], port) == "Hello, Two!"
    res = _cli(p, "rollback", "--to", c1)
    assert res.exit_code == 0 and _get(server["host"], port) == "Hello, One!", res.output
    res = _cli(p, "releases")
    assert res.exit_code == 0 and res.output.index(c1[:12]) < res.output.index(c2[:12])
    res = _cli(p, "rollback", "--to", "1")  # the one before the newest: release 2
    assert res.exit_code == 0 and _get(server["host"], port) == "Hello, Two!", res.output
    for bad, says in (("deadbeef99", "no recorded release has commit deadbeef99"),
                      ("7", "position 7 is beyond"), ("not-a-release", "is not a position")):
        res = _cli(p, "rollback", "--to", bad)
        assert res.exit_code == 2, res.output
        assert says in res.output and "nothing was changed" in res.output
        assert _get(server["host"], port) == "Hello, Two!"


def test_a_rotated_secret_redeploys_and_never_shows(lab, images, app):
    name, _ = app
    port = _port()
    server = _servers(lab, 1)[0]
    stage = _stage(lab, [server], name, port, container={"secret_env": {"API_TOKEN": "tok"}})
    old, new = f"old-{_random.token_hex(10)}", f"new-{_random.token_hex(10)}"
    values = {"tok": old}
    log = Log()

    def deploy():
        d = _deployer(stage, images, "v1", name, log, secret=lambda n: values[n])
        try:
            return d.apply()
        finally:
            d.close()
    assert [s.status for s in deploy().servers] == ["deployed"]
    assert [s.status for s in deploy().servers] == ["unchanged"]  # same value: nothing to do
    values["tok"] = new
    report = deploy()
    assert [s.status for s in report.servers] == ["deployed"]
    d = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="look")
    conn = d.connection(d.targets[0])
    r = conn.run(["docker", "exec", name, "sh", "-c", 'echo "$API_TOKEN"'], check=True)
    assert r.stdout.strip() == new
    inspect = conn.run(["docker", "container", "inspect", "--format",
                        "{{json .Config.Labels}} {{json .Args}}", name], check=True).stdout
    history = json.dumps(d.history(conn))
    key = conn.run(["stat", "-c", "%a", f"{d.runner_dir(conn)}/apps/{name}/secrets.key"],
                   check=True).stdout.strip()
    d.close()
    for text in (log.text, json.dumps(report.to_dict()), inspect, history):
        assert old not in text and new not in text
    assert "runner.secrets" in inspect and key == "600"
    values["tok"] = old  # rotating back is a change too
    assert [s.status for s in deploy().servers] == ["deployed"]


def test_sshd_killed_mid_switch_ends_on_the_last_verified_release(lab, images, app, behind):
    """srv1's sshd (listener and sessions, by pid) dies while the new version is on probation:
    the run says srv1 is unverified with its previous release kept; once sshd is back, the next
    (failing) deploy first returns srv1 to the last verified release, and ends there."""
    name, _ = app
    port = _port()
    servers = _servers(lab, 2)
    hosts = [s["host"] for s in servers]
    # srv1 is killed within a tenth of a second of its start; srv2 waits the health timeout out.
    stage = _stage(lab, servers, name, port, healthcheck={"timeout": 4},
                   ssh={"connect_timeout": 2, "retries": 1})
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    d.close()

    log = Log()
    d = _deployer(stage, images, "v3", name, log)  # v3 never becomes healthy
    behind.settle()  # no removal of an earlier test's app is cut off by the kill below
    th, out = _apply_until(d, log, f"{servers[0]['host']}: started")
    listener = _lab_sshd_pid(servers[0]["name"])
    pids = [listener, *_descendants(listener)]
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # a session's short-lived command that ended by itself meanwhile
        th.join(timeout=90)
    finally:
        d.close()
    err = out["r"]
    assert isinstance(err, DeployFailed), err
    rows = {s.server: s for s in err.report.servers}
    bad, good = rows[hosts[0]], rows[hosts[1]]
    assert bad.status == "failed" and not bad.verified and not bad.rolled_back
    assert bad.kept.startswith(f"{name}_prev_") and "ROLLBACK FAILED" in bad.reason
    assert good.rolled_back and good.verified
    text = str(err)
    assert "every changed server was rolled back" not in text
    assert f"{hosts[0]}: NOT restored" in text and f"previous verified kept as {bad.kept}" in text
    assert _get(hosts[1], port) == "v1"

    _lab_up()  # the lab restarts its dead sshd
    p = _pipeline(name, images["repo"], stage)
    res = _cli(p, "status", "--json")
    rows = json.loads(res.output.strip().splitlines()[-1])
    assert res.exit_code == 1
    assert rows[0]["digest"] == images["v3"].split("@")[1] and not rows[0]["verified"]
    assert rows[0]["previous_verified"] == images["v1"].split("@")[1]
    res = _cli(p, "status")
    assert f"unverified: {images['v3'].split('@')[1][:19]}; previous verified: " \
           f"{images['v1'].split('@')[1][:19]}" in res.output

    # A later deploy that fails too: srv1 goes back to v1 first, and stays there.
    log = Log()
    d = _deployer(stage.model_copy(update={"healthcheck": stage.healthcheck.model_copy(
        update={"timeout": 3})}), images, "v3", name, log)
    with pytest.raises(DeployFailed):
        d.apply()
    d.close()
    assert "returning to the last verified one" in log.text
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]
    rows = json.loads(_cli(p, "status", "--json").output.strip().splitlines()[-1])
    assert [(r["verified"], r["digest"]) for r in rows] == [
        (True, images["v1"].split("@")[1])] * 2


def test_a_run_that_loses_its_lock_fails_and_records_nothing(lab, images, app):
    """Run A is stopped (SIGSTOP) during its health wait past its lease's ttl; run B breaks the
    stale lock and deploys v2. A, resumed, must fail saying it lost the lock, and neither the
    history nor the server may carry A's release."""
    name, _ = app
    port = _port()
    server = _servers(lab, 1)[0]
    stage = _stage(lab, [server], name, port, lock={"ttl": 3, "wait": 60},
                   healthcheck={"timeout": 40})
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    d.close()

    cfg = {"stage": stage.model_dump(by_alias=True), "app": name, "repo": images["repo"],
           "ref": images["v3"], "run_id": "run-a", "commit": "a" * 40}
    child = subprocess.Popen([sys.executable, str(ROOT / "tests/data/deploy/child.py"),
                              json.dumps(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(child.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("waiting for health" in line for line in seen):
            assert time.monotonic() < deadline and child.poll() is None, seen
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGSTOP)
        log = Log()
        d = _deployer(stage, images, "v2", name, log, run_id="run-b")
        assert d.apply().ok  # waits for A's lease to go stale, breaks it
        d.close()
        assert "broke a stale deploy lock held by run run-a" in log.text
        assert _get(server["host"], port) == "v2"
    finally:
        os.kill(child.pid, signal.SIGCONT)
    stdout, _ = child.communicate(timeout=60)
    reader.join(timeout=5)
    assert child.returncode == 1, (stdout, seen)
    [row] = json.loads(stdout)["servers"]
    assert row["status"] == "lock_lost" and "lock" in row["reason"], row
    assert _get(server["host"], port) == "v2"
    digests = [h["digest"] for h in _history(lab, stage, name)]
    assert images["v3"].split("@")[1] not in digests
    assert digests[-1] == images["v2"].split("@")[1]
