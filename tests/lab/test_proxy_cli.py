"""`runner proxy boot|reboot|status|logs` and the route column of `runner status`, against the
lab's servers: an app deployed through the proxy first (a tiny busybox httpd routed by a host
name of its own), the commands driven through click's CliRunner with the pipeline passed in
(make_proxy(lambda path, variables: pipeline)).

The proxies are the lab's shared ones (http_port 8000, as the example pipeline's); what is
rebooted, or removed and booted again, is the last server's only. The app's containers,
history, lock and route are removed at the end; the proxies stay.
"""
from __future__ import annotations

import _thread
import http.client
import json
import os
import threading
import time

import pytest
from click.testing import CliRunner

from deployers import lock as locks
from deployers.base import DeployFailed
from runner.cli.app import make_app
from runner.cli.deploy import make_commands
from deployers.proxy import PROXY_CONTAINER
from deployers.proxy_reboot import ASIDE
from runner.cli.proxy import make_proxy
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_proxy import PROXY_LOCK
from runner.model import Pipeline
from runner.model.deploy import DeploySettings
from tests.lab.deploy_fixtures import Log, _deployer, _servers, _stage
from tests.lab.test_proxy import HTTP_PORT, _proxy_stage, _via, remove_proxied_app

def _pipeline(stage: DeploySettings, app: str, images) -> Pipeline:
    return Pipeline.model_validate({
        "name": app, "repository": {"url": "."}, "image": {"name": images["repo"]},
        "stages": {"deploy": stage.model_dump(by_alias=True)}})


def _invoke(group, args):
    return CliRunner().invoke(group, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def routed(lab, images):
    """v1 of an app of its own, deployed through the proxy on the last two servers, routed by
    host name `<app>.test`; removed at the end (its route too), like test_proxy_lab's
    proxy_app."""
    name = f"pc{os.urandom(3).hex()}"
    host = f"{name}.test"
    servers = _servers(lab, -2)
    stage = _proxy_stage(lab, servers, name, hosts=[host])
    d = _deployer(stage, images, "v1", name, Log())
    try:
        assert d.apply().ok
    finally:
        d.close()
    pipeline = _pipeline(stage, name, images)
    yield {"name": name, "host": host, "servers": servers, "stage": stage,
           "pipeline": pipeline, "digest": images["v1"].split("@", 1)[1],
           "proxy": make_proxy(lambda path, variables: pipeline)}
    remove_proxied_app(lab, servers, name)


def _on(lab, server, app: str):
    """A connection to one server and its runner dir, for looking behind the commands."""
    d = SSHDockerDeployer(_proxy_stage(lab, [server], app), pipeline=app, image_name="x",
                          run_id="check")
    conn = d.connection(d.targets[0])
    return d, conn


def _write(conn, path: str, data: bytes) -> None:
    def op(sftp):
        with sftp.open(path, "w") as f:
            f.write(data)
    conn.sftp_do(op)


def test_status_lists_every_route_with_the_digest_it_serves(routed):
    res = _invoke(routed["proxy"], ["status", "p.yaml", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["server"] for r in rows] == [s["host"] for s in routed["servers"]]
    for row in rows:
        assert row["running"] and row["state"] == "running" and row["error"] == "", row
        assert "8000:80" in row["published"] and row["image"] == routed["stage"].proxy.image
        [mine] = [r for r in row["routes"] if r["app"] == routed["name"]]
        assert mine["digest"] == routed["digest"]
        assert mine["hosts"] == [routed["host"]] and mine["path_prefix"] == "/"
        assert mine["upstream"].startswith(f"{routed['name']}--") and \
            mine["upstream"].endswith(":8080")

    res = _invoke(routed["proxy"], ["status", "p.yaml"])
    print(res.output)
    assert res.exit_code == 0, res.output
    assert res.output.count(f"hosts {routed['host']}  path /") == 2
    assert routed["digest"][:19] in res.output and "proxy running since" in res.output


def test_boot_starts_a_missing_proxy_and_is_idempotent(lab, routed):
    last = routed["servers"][-1]
    d, conn = _on(lab, last, routed["name"])
    try:
        res = _invoke(routed["proxy"], ["boot", "p.yaml"])
        print(res.output)
        assert res.exit_code == 0, res.output
        for s in routed["servers"]:
            assert f"{s['host']}: already running; serving" in res.output

        # No proxy on the last server: boot starts one, with every app's routes.
        conn.run(["docker", "rm", "-f", PROXY_CONTAINER], check=True)
        res = _invoke(routed["proxy"], ["boot", "p.yaml", "--server", last["host"], "--json"])
        print(res.output)
        assert res.exit_code == 0, res.output
        [row] = json.loads(res.stdout)
        assert row["ok"] and row["did"].startswith("proxy started (") and \
            "serving" in row["did"], row
        assert _via(last, routed["host"]) == "v1"

        for _ in range(2):
            res = _invoke(routed["proxy"], ["boot", "p.yaml", "--server", last["host"],
                                            "--json"])
            assert res.exit_code == 0, res.output
            [row] = json.loads(res.stdout)
            assert row["ok"] and row["did"].startswith("already running"), row
    finally:
        d.close()


def test_reboot_replaces_the_proxy_keeps_serving_and_says_how_long_traffic_was_down(
        lab, routed):
    last = routed["servers"][-1]
    d, conn = _on(lab, last, routed["name"])
    try:
        before = d.inspect(conn, PROXY_CONTAINER)
        assert before is not None and before.running
        res = _invoke(routed["proxy"], ["reboot", "p.yaml", "--server", last["host"],
                                        "--json"])
        print(res.output)
        assert res.exit_code == 0, res.output
        [row] = json.loads(res.stdout)
        assert row["ok"] and row["error"] == "", row
        down = row["down_seconds"]
        assert isinstance(down, float) and 0 < down < 30, row
        after = d.inspect(conn, PROXY_CONTAINER)
        assert after is not None and after.running and after.id != before.id
        assert after.restart_policy == "always"
        assert d.inspect(conn, ASIDE) is None  # the old one is gone
        assert _via(last, routed["host"]) == "v1"
        assert _via(routed["servers"][0], routed["host"]) == "v1"  # the other one untouched

        res = _invoke(routed["proxy"], ["reboot", "p.yaml", "--server", last["host"]])
        print(res.output)
        assert res.exit_code == 0, res.output
        assert f"{last['host']}: replaced the proxy" in res.output
        assert "; traffic was down for " in res.output and res.output.rstrip().endswith("s")
        assert _via(last, routed["host"]) == "v1"
    finally:
        d.close()


def test_logs_prints_the_proxys_lines(routed):
    last = routed["servers"][-1]
    res = _invoke(routed["proxy"], ["logs", "p.yaml", "--server", last["host"], "-n", "5"])
    print(res.output)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert 0 < len(lines) <= 5
    assert all(json.loads(line)["level"] for line in lines)  # Caddy's JSON log lines

    res = _invoke(routed["proxy"], ["logs", "p.yaml", "-n", "2"])
    assert res.exit_code == 0, res.output
    for s in routed["servers"]:
        assert f"{s['host']} | {{\"level\":" in res.stdout

    res = _invoke(routed["proxy"], ["logs", "p.yaml", "-n", "1", "--json"])
    rows = json.loads(res.stdout)
    assert [len(r["lines"]) for r in rows] == [1, 1] and not any(r["error"] for r in rows)


def test_runner_status_shows_where_the_route_points(lab, routed):
    status = make_commands(lambda path, variables: routed["pipeline"])[1]
    res = _invoke(status, ["p.yaml", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["route"] for r in rows] == [routed["digest"]] * 2
    assert all(r["digest"] == r["route"] and r["running"] and r["verified"] for r in rows)
    res = _invoke(status, ["p.yaml"])
    print(res.output)
    assert res.exit_code == 0 and "ROUTE" in res.output and "route ->" not in res.output

    # The route of the last server pointing elsewhere (as an interrupted run could leave it):
    # flagged, exit 1. (Only the runner's route file is changed: the proxy is not reloaded.)
    last = routed["servers"][-1]
    d, conn = _on(lab, last, routed["name"])
    path = f"{d.runner_dir(conn)}/proxy/routes/{routed['name']}.json"
    original = conn.run(["cat", path], check=True).stdout
    other = dict(json.loads(original), container="0" * 64, digest="sha256:" + "ab" * 32)
    try:
        _write(conn, path, json.dumps(other).encode())
        res = _invoke(status, ["p.yaml"])
        print(res.output)
        assert res.exit_code == 1
        [line] = [x for x in res.output.splitlines() if x.startswith(last["host"])]
        assert "route -> sha256:ababababab" in line and "not the running container" in line
        res = _invoke(status, ["p.yaml", "--json"])
        assert [r["route"] for r in json.loads(res.stdout)] == [routed["digest"],
                                                                other["digest"]]
    finally:
        _write(conn, path, original.encode())
        d.close()
    assert _invoke(status, ["p.yaml"]).exit_code == 0


def test_bad_input_exits_2(lab, images, routed):
    stop_start = _stage(lab, routed["servers"], routed["name"], 1)
    plain = make_proxy(lambda path, variables: _pipeline(stop_start, routed["name"], images))
    for sub in ("boot", "reboot", "status", "logs"):
        res = _invoke(plain, [sub, "p.yaml"])
        assert res.exit_code == 2, (sub, res.output)
        assert "p.yaml: stages.deploy has no `proxy:` section" in res.output
    plain_app = make_app(lambda path, variables: _pipeline(stop_start, routed["name"], images))
    for sub in ("maintenance", "live"):
        res = _invoke(plain_app, [sub, "p.yaml"])
        assert res.exit_code == 2, (sub, res.output)
        assert f"`runner app {sub}` needs the proxy cutover" in res.output
    res = _invoke(routed["proxy"], ["reboot", "p.yaml", "--server", "nope"])
    assert res.exit_code == 2 and "unknown server 'nope'" in res.output
    res = _invoke(routed["proxy"], ["status", "p.yaml", "--var", "novalue"])
    assert res.exit_code == 2


def test_a_reboot_whose_new_proxy_cannot_start_puts_the_old_one_back(lab, images, routed):
    """The pipeline now wants the proxy on a host port something else holds: the new proxy
    cannot start, the old one (on 8000) runs again, exit 1 naming the server and why."""
    last = routed["servers"][-1]
    d, conn = _on(lab, last, routed["name"])
    port = 18000 + int.from_bytes(os.urandom(1), "big")
    squatter = f"{routed['name']}-squatter"
    stage = routed["stage"]
    moved = stage.model_copy(update={"proxy": stage.proxy.model_copy(update={
        "http_port": port})})
    proxy = make_proxy(lambda path, variables: _pipeline(moved, routed["name"], images))
    before = d.inspect(conn, PROXY_CONTAINER)
    conn.run(["docker", "run", "-d", "--name", squatter, "-p", f"{port}:8080",
              images["v1"]], check=True)
    try:
        res = _invoke(proxy, ["reboot", "p.yaml", "--server", last["host"]])
        print(res.output)
        assert res.exit_code == 1
        assert f"{last['host']}: FAILED: " in res.output
        assert "taken by something else" in res.output
        assert "the old proxy runs again (traffic was down for " in res.output
        assert f"proxy reboot failed on {last['host']}" in res.output
        after = d.inspect(conn, PROXY_CONTAINER)
        assert after is not None and after.id == before.id and after.running
        assert after.restart_policy == "always" and d.inspect(conn, ASIDE) is None
        assert _via(last, routed["host"]) == "v1"
        # And status says that this pipeline wants another port.
        res = _invoke(proxy, ["status", "p.yaml", "--server", last["host"]])
        assert res.exit_code == 0 and f"wants {port}:80 published" in res.output, res.output
    finally:
        conn.run(["docker", "rm", "-f", squatter])
        d.close()


def test_ctrl_c_while_waiting_for_the_proxy_lock_exits_130_and_changes_nothing(lab, routed):
    last = routed["servers"][-1]
    d, conn = _on(lab, last, routed["name"])
    before = d.inspect(conn, PROXY_CONTAINER)
    lease = locks.acquire(conn, f"{d.runner_dir(conn)}/locks", PROXY_LOCK,
                          locks.holder_info("someone-else", "other", ttl=30), ttl=30, wait=5)
    timer = threading.Timer(2, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    try:
        res = _invoke(routed["proxy"], ["reboot", "p.yaml", "--server", last["host"]])
    finally:
        timer.cancel()
        lease.release()
    print(res.output)
    assert res.exit_code == 130, res.output
    assert "waiting up to 60s for the deploy lock held by run someone-else" in res.output
    assert res.output.rstrip().endswith("interrupted")
    assert time.monotonic() - t0 < 15
    after = d.inspect(conn, PROXY_CONTAINER)
    assert after is not None and after.id == before.id and after.running
    d.close()


# The last tests change the app for good: a release that fails, v2 deployed in maintenance,
# then its removal.

def _unguarded(routed, **container):
    """The module's app with no health check of any kind (no proxy.health, no healthcheck,
    none in the image), and `container` settings."""
    stage = routed["stage"]
    return stage.model_copy(update={
        "proxy": stage.proxy.model_copy(update={"health": None}),
        "healthcheck": stage.healthcheck.model_copy(update={"timeout": 2}),
        "container": stage.container.model_copy(update={"stop_timeout": 0, **container})})


def test_without_any_health_check_the_gate_gets_slash_and_a_silent_app_fails_it(images,
                                                                                 routed):
    """An app that answers only on its own loopback (as Flask's default): not healthy, the
    route never moves, v1 serves on; the failure line names v2's digest, not v1's."""
    loopback = ["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/www"]
    log = Log()
    d = _deployer(_unguarded(routed, command=loopback), images, "v2", routed["name"], log)
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    text = str(err.value)
    print(text)
    assert "WARNING: no health check is set" in log.text
    assert "waiting for health (GET / on port 8080, any answer below 500" in log.text
    assert "traffic moved" not in log.text and "healthy" not in log.text
    assert "health check failed" in text and "nothing listens on port 8080" in text
    v1, v2 = routed["digest"], images["v2"].split("@", 1)[1]
    for s in routed["servers"]:
        assert f"{s['host']}: failed ({v2[:19]}): health check failed" in text
        assert _via(s, routed["host"]) == "v1"
    assert f"previous version {v1[:19]} running again" in text and \
        "put back on the previous verified release" in text


def _get(server, host: str) -> tuple[int, dict, str]:
    c = http.client.HTTPConnection(server["host"], HTTP_PORT, timeout=5)
    try:
        c.request("GET", "/", headers={"Host": host})
        answer = c.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read().decode().strip()
    finally:
        c.close()


def test_maintenance_serves_a_503_page_through_deploys_and_live_ends_it(lab, images, routed):
    """`runner app maintenance`: the proxy answers 503 with the message (escaped) and
    Retry-After while the app's container runs on untouched; a server that cannot be reached
    is named, the others are switched; a deploy keeps maintenance on and says so; `runner app
    live` brings the app back."""
    name, host, servers = routed["name"], routed["host"], routed["servers"]
    checks = [_on(lab, s, name) for s in servers]
    before = [d.inspect(conn, name).id for d, conn in checks]
    # A third server nothing listens on (port 1 of the loopback: refused at once).
    dead = DeploySettings.model_validate({
        **routed["stage"].model_dump(by_alias=True),
        "servers": [*(f"{s['user']}@{s['host']}:{s['port']}" for s in servers),
                    f"{servers[0]['user']}@127.0.0.1:1"]})
    app_cli = make_app(lambda path, variables: _pipeline(dead, name, images))
    message = 'Back at <b>5</b> & "soon" {env.HOME}'
    try:
        res = _invoke(app_cli, ["maintenance", "p.yaml", "--message", message])
        print(res.output)
        assert res.exit_code == 1
        assert "127.0.0.1:1: FAILED: cannot reach 127.0.0.1:1: " in res.output
        for s in servers:
            assert f"{s['host']}: in maintenance" in res.output
        assert (f"maintenance of {name} failed on 127.0.0.1:1; in maintenance on "
                f"{', '.join(s['host'] for s in servers)}") in res.output
        for s in servers:
            status, headers, body = _get(s, host)
            assert status == 503 and headers["Retry-After"] == "60", (status, headers, body)
            assert ("Back at &lt;b&gt;5&lt;/b&gt; &amp; &quot;soon&quot; &#123;env.HOME&#125;"
                    in body), body
        for (d, conn), cid in zip(checks, before):
            now = d.inspect(conn, name)
            assert now is not None and now.id == cid and now.running
        res = _invoke(routed["proxy"], ["status", "p.yaml"])
        assert res.exit_code == 0 and res.output.count("MAINTENANCE") == 2, res.output
        status_cli = make_commands(lambda path, variables: routed["pipeline"])[1]
        res = _invoke(status_cli, ["p.yaml", "--json"])
        assert res.exit_code == 0 and all(r["maintenance"] for r in json.loads(res.stdout))

        # A deploy in maintenance: the new release runs behind the 503 page.
        log = Log()
        d = _deployer(routed["stage"], images, "v2", name, log)
        assert d.apply().ok
        d.close()
        assert log.text.count(f"{name} is in maintenance (runner app maintenance): it stays "
                              f"on") == 2, log.text
        assert [_get(s, host)[0] for s in servers] == [503, 503]

        res = _invoke(make_app(lambda path, variables: routed["pipeline"]),
                      ["live", "p.yaml"])
        print(res.output)
        assert res.exit_code == 0, res.output
        assert res.output.count("live: the route leads to sha256:") == 2
        assert [_get(s, host)[:3:2] for s in servers] == [(200, "v2"), (200, "v2")]
    finally:
        for d, _ in checks:
            d.close()


def test_app_remove_takes_the_route_kept_copies_and_history_away(lab, images, routed):
    """After `runner app remove`, the proxy no longer routes the app (its host gets the proxy's
    own 404 at once, not a hang then 502), `runner proxy status` does not list it, and no
    container (the kept copy of v1 too), history or record of pulls is left."""
    name, host, servers = routed["name"], routed["host"], routed["servers"]
    log = Log()
    d = _deployer(_unguarded(routed), images, "v2", name, log)  # v1 is kept, stopped
    assert d.apply().ok
    d.close()
    assert "WARNING: no health check is set" in log.text and "healthy sha256:" in log.text
    assert [_via(s, host) for s in servers] == ["v2", "v2"]
    checks = [_on(lab, s, name) for s in servers]
    try:
        kept = 0  # v1's on each server, and v2's of the maintenance test when it ran
        for d, conn in checks:
            mine = [c for c in d.app_containers(conn) if c.name.startswith(f"{name}_kept_")]
            assert mine
            kept += len(mine)
        res = _invoke(make_app(lambda path, variables: routed["pipeline"]),
                      ["remove", "p.yaml", "--yes"])
        print(res.output)
        assert res.exit_code == 0, res.output
        assert res.output.startswith(f"{name} mounts no named volume or host directory")
        assert res.output.count(f"removed proxy route (hosts {host}, path /)") == 2
        assert res.output.count(f"removed container {name}_kept_") == kept
        res = _invoke(routed["proxy"], ["status", "p.yaml", "--json"])
        assert res.exit_code == 0, res.output
        assert all(r["app"] != name for row in json.loads(res.stdout) for r in row["routes"])
        for s in servers:
            # The proxy's own 404, or another app that routes every host (the proxies are
            # shared): an answer at once, never a 502 from a route to a removed container.
            t0 = time.monotonic()
            c = http.client.HTTPConnection(s["host"], HTTP_PORT, timeout=10)
            try:
                c.request("GET", "/", headers={"Host": host})
                answer = c.getresponse()
                status, body = answer.status, answer.read().decode().strip()
            finally:
                c.close()
            assert status != 502 and body not in ("v1", "v2"), (status, body)
            assert time.monotonic() - t0 < 2
        for d, conn in checks:
            root = d.runner_dir(conn)
            assert d.app_containers(conn) == []
            for gone in (f"{root}/apps/{name}", f"{root}/proxy/routes/{name}.json"):
                assert not conn.run(["test", "-e", gone]).ok, gone
    finally:
        for d, _ in checks:
            d.close()
