"""The zero-downtime cutover through a real Caddy proxy on the lab's servers, under a steady
request loop: a deploy, a deploy that fails its gate, a rollback, a release that fails within
the watch window, two apps behind one proxy, a crash-looping proxy, a taken port."""
from __future__ import annotations

import os
import signal
import time

import pytest

from bench.load import Load
from deployers.base import DeployFailed
from deployers.proxy import PROXY_CONTAINER
from deployers.ssh_docker import SSHDockerDeployer
from runner.model.deploy import DeploySettings
from tests.lab.deploy_fixtures import Log, _apply_until, _deployer, _servers
from tests.lab.deploy_fixtures import behind  # noqa: F401
from tests.helpers import remove_app_on_server

HTTP_PORT = 8000  # what the lab's proxy publishes (as the example pipeline)


def _proxy_stage(lab, servers, app, **proxy) -> DeploySettings:
    s0 = lab["servers"][0]
    return DeploySettings.model_validate({
        "enabled": True,
        "servers": [f"{s['user']}@{s['host']}:{s['port']}" for s in servers],
        "ssh": {"key_file": s0["key_file"], "known_hosts": s0["known_hosts"],
                "connect_timeout": 5, "retries": 1},
        "container": {"name": app, "stop_timeout": 2},
        "lock": {"ttl": 10, "wait": 60},
        "proxy": {"app_port": 8080, "http_port": HTTP_PORT, "image": lab["proxy_image"],
                  "health": {"path": "/health", "interval": 0.2, "timeout": 10},
                  "watch": 1, "drain_timeout": 2, **proxy},
    })


def _load(servers, host: str | None) -> Load:
    return Load([(s["host"], HTTP_PORT, host) for s in servers], rate=40, max_seconds=120)


def _assert_no_drop(load: Load, allowed: set[str], log: Log | None = None) -> None:
    rep = load.report()
    assert rep["requests"] > 20, rep
    assert rep["failed"] == 0, (rep["failures"], _around(load, log))
    assert set(rep["bodies"]) <= allowed, rep["bodies"]
    print(f"{rep['requests']} requests, longest gap {rep['longest_gap']:.3f}s, "
          f"p50 {rep['p50'] * 1000:.1f} ms, bodies {rep['bodies']}")


def _around(load: Load, log: Log | None) -> list[str]:
    """For a failed request: when it was sent and what the deploy logged in the 3 s around it
    (times in seconds from the first request), so that a rare drop says where in the cutover
    it fell."""
    if not load.hits:
        return []
    t0 = min(h.start for h in load.hits)
    out = [f"{h.start - t0:7.3f}s +{h.seconds:.3f}s {h.url} {h.body}" for h in load.failed()]
    for when in (h.start for h in load.failed()):
        out += [f"{t - t0:7.3f}s log: {line}" for t, line in (log.lines if log else ()) if abs(t - when) < 3]
    return out


@pytest.fixture
def proxy_app(lab, behind):
    """An app name routed by a host name of its own; its containers, history, lock and route
    are removed while the next test runs (the proxy itself stays, shared; these tests look at
    nothing on the servers but their own app and the proxy: deploy_fixtures.Behind)."""
    name = f"px{_random_suffix()}"
    yield name, f"{name}.test"
    behind.submit(remove_proxied_app, lab, lab["servers"], name)


def remove_proxied_app(lab, servers, name: str) -> None:
    """What a test app behind the proxy left on the servers: containers, history, lock and its
    route file (the proxy itself stays, shared)."""
    d = SSHDockerDeployer(_proxy_stage(lab, servers, name), pipeline=name, image_name="x",
                          run_id="cleanup")

    def clean(t):
        conn = d.connection(t)
        remove_app_on_server(d, conn, name)
        conn.run(["rm", "-f", f"{d.runner_dir(conn)}/proxy/routes/{name}.json"])
    d.each(clean, list(d.targets))
    d.close()


def _random_suffix() -> str:
    return os.urandom(3).hex()


def _via(server, host: str) -> str:
    import http.client
    c = http.client.HTTPConnection(server["host"], HTTP_PORT, timeout=3)
    try:
        c.request("GET", "/", headers={"Host": host})
        return c.getresponse().read().decode().strip()
    finally:
        c.close()


def test_deploy_failed_deploy_rollback_and_watch_failure_drop_nothing(lab, images, proxy_app):
    name, host = proxy_app
    servers = _servers(lab, 3)
    stage = _proxy_stage(lab, servers, name, hosts=[host])
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok  # the first deploy boots the proxy where it is missing
    d.close()
    assert [_via(s, host) for s in servers] == ["v1"] * 3

    # A deploy to 3 servers under load.
    with _load(servers, host) as load:
        time.sleep(0.5)
        d = _deployer(stage, images, "v2", name, deploy_log := Log())
        report = d.apply()
        d.close()
        time.sleep(0.5)
    assert report.ok and [s.status for s in report.servers] == ["deployed"] * 3
    assert {"switch", "health", "watch", "drain"} <= set(report.servers[0].phases)
    _assert_no_drop(load, {"v1", "v2"}, deploy_log)
    assert [_via(s, host) for s in servers] == ["v2"] * 3

    # A version that never becomes healthy: the route never moves.
    with _load(servers, host) as load:
        d = _deployer(stage.model_copy(update={"proxy": stage.proxy.model_copy(update={
            "health": stage.proxy.health.model_copy(update={"timeout": 2})})}),
            images, "v3", name, failing_log := Log())
        with pytest.raises(DeployFailed) as err:
            d.apply()
        d.close()
    _assert_no_drop(load, {"v2"}, failing_log)
    assert "404 not found" in str(err.value) and "proxy.health.path" in str(err.value)

    # Rollback: back to v1, its kept container started again.
    log = Log()
    with _load(servers, host) as load:
        d = SSHDockerDeployer(stage, pipeline=name, image_name=images["repo"],
                              run_id="rb", log=log)
        report = d.rollback()
        d.close()
    _assert_no_drop(load, {"v1", "v2"}, log)
    assert [s.status for s in report.servers] == ["rolled_back"] * 3
    assert "started the kept container" in log.text
    assert [_via(s, host) for s in servers] == ["v1"] * 3
    # A kept copy does not come back by itself when the engine restarts (`always` would bring
    # even a stopped container back); the one started again runs with its own policy.
    d = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="look")
    conn = d.connection(d.targets[0])
    policies = dict(line.split() for line in conn.run(
        ["sh", "-c", f"docker inspect -f '{{{{.Name}}}} {{{{.HostConfig.RestartPolicy.Name}}}}' "
                     f"$(docker ps -aq --filter label=runner.app={name})"],
        check=True).stdout.split("\n") if line.strip())
    d.close()
    assert policies.pop(f"/{name}") == "always"
    assert policies and set(policies.values()) == {"no"}, policies

    # Passes the gate, then fails within the watch window: traffic goes straight back.
    flaky = _proxy_stage(lab, servers[:1], name, hosts=[host], watch=4)
    flaky = flaky.model_copy(update={"container": flaky.container.model_copy(update={
        "command": ("sh", "-c", "(sleep 1.5; rm -f /www/health) & "
                                "exec httpd -f -p 8080 -h /www")})})
    with _load(servers[:1], host) as load:
        d = _deployer(flaky, images, "v2", name, watch_log := Log())
        with pytest.raises(DeployFailed) as err:
            d.apply()
        d.close()
    _assert_no_drop(load, {"v1", "v2"}, watch_log)
    assert "within the watch window" in str(err.value)
    assert _via(servers[0], host) == "v1"


def test_two_apps_behind_one_proxy_by_host_name(lab, images, proxy_app):
    name_a, host_a = proxy_app
    name_b = f"{name_a}b"
    server = _servers(lab, -1)[0]
    try:
        for name, host, version in ((name_a, host_a, "v1"), (name_b, f"{name_b}.test", "v2")):
            d = _deployer(_proxy_stage(lab, [server], name, hosts=[host]), images, version,
                          name, Log())
            assert d.apply().ok
            d.close()
        assert _via(server, host_a) == "v1"
        assert _via(server, f"{name_b}.test") == "v2"
        # Another host name reaches neither (the proxy's own 404, or an app routed for every
        # host, like the example pipeline's).
        assert _via(server, "nobody.test") not in ("v1", "v2")
    finally:
        remove_proxied_app(lab, [server], name_b)


def _proxy_pid(d: SSHDockerDeployer) -> int:
    conn = d.connection(d.targets[0])
    r = conn.run(["docker", "inspect", "--format", "{{.State.Pid}}", PROXY_CONTAINER])
    return int(r.stdout.strip() or 0)


def test_a_crashing_proxy_fails_the_deploy_and_the_previous_release_is_served(lab, images,
                                                                                proxy_app):
    """The proxy's process is killed by pid, again each time docker restarts it, while the new
    version is on probation: the deploy fails naming the server, and once the proxy stays up
    it serves the previous release."""
    name, host = proxy_app
    server = _servers(lab, 1)[0]
    stage = _proxy_stage(lab, [server], name, hosts=[host])
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    d.close()
    slow = stage.model_copy(update={"container": stage.container.model_copy(update={
        "command": ("sh", "-c", "mv /www/health /www/h; (sleep 2; mv /www/h /www/health) & "
                                "exec httpd -f -p 8080 -h /www")})})
    log = Log()
    d = _deployer(slow, images, "v2", name, log)
    killer = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="killer")
    th, out = _apply_until(d, log, "waiting for health")
    killed = 0
    while th.is_alive():
        pid = _proxy_pid(killer)
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        time.sleep(0.05)
    d.close()
    assert killed >= 1
    err = out["r"]
    assert isinstance(err, DeployFailed), err
    msg = str(err)
    assert server["host"] in msg and "proxy" in msg, msg
    [row] = err.report.servers
    assert row.rolled_back and row.verified, row
    deadline, seen = time.monotonic() + 60, ""
    while seen != "v1":  # docker brings the proxy back (with backoff) and its last config
        assert time.monotonic() < deadline, seen
        try:
            seen = _via(server, host)
        except OSError as exc:
            seen = str(exc)
            time.sleep(0.2)
    killer.close()


def test_a_taken_proxy_port_is_refused_before_anything_changes(lab, images, proxy_app):
    """The server has no proxy yet and something else holds the port the proxy must publish:
    a clear error before anything changes. (The server's proxy is removed first; the next
    deploy there boots it again with every app's routes.)"""
    name, host = proxy_app
    server = _servers(lab, 1)[0]
    stage = _proxy_stage(lab, [server], name, hosts=[host])
    d = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="squat")
    conn = d.connection(d.targets[0])
    squatter = f"{name}-squatter"
    conn.run(["docker", "rm", "-f", PROXY_CONTAINER], check=True)
    conn.run(["docker", "run", "-d", "--name", squatter, "-p", f"{HTTP_PORT}:8080",
              images["v1"]], check=True)
    try:
        d2 = _deployer(stage, images, "v1", name, Log())
        with pytest.raises(DeployFailed) as err:
            d2.apply()
        d2.close()
        msg = str(err.value)
        assert "taken by something else" in msg and server["host"] in msg, msg
        assert "proxy.http_port" in msg and "nothing was changed" in msg
        assert conn.run(["docker", "container", "ls", "-a", "-q", "--filter",
                         f"label=runner.app={name}"]).stdout.strip() == ""
        assert not conn.run(["docker", "container", "inspect", PROXY_CONTAINER]).ok
    finally:
        conn.run(["docker", "rm", "-f", squatter])
        d.close()
    # With the port free, the next deploy boots the proxy and serves.
    d2 = _deployer(stage, images, "v1", name, Log())
    assert d2.apply().ok
    d2.close()
    assert _via(server, host) == "v1"


# An app in the lab's python image (the proxy image is one: it has python3): health, an echo
# of the request body with a header of its own, and a websocket that echoes one message.
ECHO_APP = r'''
import base64, hashlib, http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] +
                "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket"); self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept); self.end_headers()
            self.wfile.flush()
            b1, b2 = self.rfile.read(2)
            n, mask = b2 & 127, self.rfile.read(4)
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(self.rfile.read(n)))
            self.wfile.write(bytes([0x81, len(data)]) + data); self.wfile.flush()
            return
        body = b"ok\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("X-App", "echo")
        self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
'''


def test_bodies_headers_and_websockets_pass_through(lab, proxy_app):
    import base64
    import socket
    import subprocess
    name, host = proxy_app
    server = _servers(lab, 1)[0]
    docker = ["/usr/bin/docker", "-H", lab["docker_host"]]
    subprocess.run([*docker, "pull", "-q", lab["proxy_image"]], check=True, capture_output=True)
    ref = subprocess.run([*docker, "inspect", "--format", "{{index .RepoDigests 0}}",
                          lab["proxy_image"]], check=True, capture_output=True,
                         text=True).stdout.strip()
    stage = _proxy_stage(lab, [server], name, hosts=[host], health={"path": "/health"})
    stage = stage.model_copy(update={"container": stage.container.model_copy(update={
        "command": ("python3", "-c", ECHO_APP)})})
    from runner.model.image import ImageRef
    d = SSHDockerDeployer(stage, pipeline=name, image_name=ref.split("@")[0], run_id="echo",
                          image=ImageRef.parse(ref), log=Log())
    assert d.apply().ok
    d.close()

    import http.client
    c = http.client.HTTPConnection(server["host"], HTTP_PORT, timeout=5)
    payload = os.urandom(3000).hex()
    c.request("POST", "/echo", body=payload, headers={"Host": host})
    r = c.getresponse()
    assert r.read().decode() == payload and r.getheader("X-App") == "echo"
    assert r.getheader("Via") is None or "runner" not in r.getheader("Via")
    c.close()

    with socket.create_connection((server["host"], HTTP_PORT), timeout=5) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.split(b"\r\n")[0].split()[1] == b"101", head
        mask, msg = os.urandom(4), b"hello through the proxy"
        s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask +
                  bytes(c ^ mask[i % 4] for i, c in enumerate(msg)))
        frame = b""
        while len(frame) < 2 + len(msg):
            frame += s.recv(64)
        assert frame[2:] == msg


def test_config_loads_under_load_reset_no_connection(lab, images, proxy_app):
    """Caddy opens a new listening socket at every config load and closes the old one; the
    proxy container's tcp_migrate_req hands queued connections over instead of resetting them
    (without it, about one load in fifteen reset a connection at 100 req/s here)."""
    name, host = proxy_app
    server = _servers(lab, 1)[0]
    stage = _proxy_stage(lab, [server], name, hosts=[host])
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply().ok
    conn = d.connection(d.targets[0])
    assert conn.run(["docker", "exec", PROXY_CONTAINER, "cat",
                     "/proc/sys/net/ipv4/tcp_migrate_req"], check=True).stdout.strip() == "1"
    with Load([(server["host"], HTTP_PORT, host)], rate=100, max_seconds=60) as load:
        for _ in range(40):
            conn.run(["docker", "exec", PROXY_CONTAINER, "caddy", "reload", "--config",
                      "/etc/runner-proxy/config.json", "--force"], check=True)
            time.sleep(0.2)
    d.close()
    _assert_no_drop(load, {"v1"})
