"""`runner app logs|exec|remove` and `runner deploy-lock show|break` against the lab's servers:
a tiny busybox httpd app deployed for real first, the commands driven through click's CliRunner
with the pipeline passed in (make_app(lambda path, variables: pipeline)).

Every test uses its own app name and host port, and removes its containers and state at the end.
"""
from __future__ import annotations

import _thread
import json
import secrets as _random
import threading
import time

import pytest
from click.testing import CliRunner

from deployers import lock as locks
from deployers.base import DeployFailed
from runner.cli.app import make_app
from runner.cli.deploy import make_commands
from deployers.ssh_docker import SSHDockerDeployer
from runner.model import Pipeline
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef
from tests.lab.deploy_fixtures import _port
from tests.lab.deploy_fixtures import _stage as deploy_stage
from tests.helpers import remove_app_on_server

UID = _random.token_hex(3)
SECRET_VAR = f"RUNNER_TEST_APP_TOKEN_{UID}"
UNREACHABLE = "10.87.53.99"  # in the lab's network, nobody there

# The app prints a marker with its secret on start (the masker must hide it), then serves.
COMMAND = ["sh", "-c", 'echo "app-marker token=$APP_TOKEN"; echo "app-err-marker" >&2; '
                       'exec httpd -f -p 8080 -h /www']


def _stage(lab, servers, app, port, **over) -> DeploySettings:
    """The deploy tests' settings, with this module's app: it prints a marker and its secret."""
    settings = {"container": {"command": COMMAND, "secret_env": {"APP_TOKEN": "tok"}},
                "healthcheck": {"timeout": 15}, "lock": {"ttl": 10, "wait": 30}}
    for k, v in over.items():
        settings[k] = {**settings.get(k, {}), **v} if isinstance(v, dict) else v
    return deploy_stage(lab, servers, app, port, **settings)


def _pipeline(stage: DeploySettings, app: str, images, unreadable: bool = False) -> Pipeline:
    """`unreadable`: with one more secret, which the commands do not use and cannot read."""
    secrets = {"tok": {"env": SECRET_VAR}}
    if unreadable:
        secrets["unused"] = {"file": f"/nonexistent/runner-test-{UID}"}
    return Pipeline.model_validate({
        "name": app, "repository": {"url": "."}, "image": {"name": images["repo"]},
        "secrets": secrets, "stages": {"deploy": stage.model_dump(by_alias=True)}})


class Log:
    def __init__(self):
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _deploy(stage, images, version: str, app: str, secret: str) -> None:
    """Deploy `version`; retried for a while, the deploy core is being reworked alongside."""
    last = None
    for _ in range(3):
        run_id = f"t{_random.token_hex(3)}"
        log = Log()
        d = SSHDockerDeployer(stage, pipeline=app, image_name=images["repo"], run_id=run_id,
                              image=ImageRef.parse(images[version]), commit=version * 10,
                              secret=lambda n: {"tok": secret}[n], log=log)
        try:
            report = d.apply()
            if report.ok:
                return
            last = report.summary()
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}\n{log.text}"
        finally:
            d.close()
        time.sleep(5)
    pytest.fail(f"deploying {version} of {app} failed: {last}")


class Server:
    """One server's docker and files, for checking what the commands did."""

    def __init__(self, lab, server, app: str):
        stage = _stage(lab, [server], app, 1)
        self.d = SSHDockerDeployer(stage, pipeline=app, image_name="x", run_id="check")
        self.app = app
        self.conn = self.d.connection(self.d.targets[0])
        self.root = self.d.runner_dir(self.conn)

    def run(self, *argv: str):
        return self.conn.run(list(argv))

    def containers(self) -> list[str]:
        return self.run("docker", "container", "ls", "--all", "--format", "{{.Names}}",
                        "--filter", f"label=runner.app={self.app}").stdout.split()

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path).ok

    @property
    def history(self) -> str:
        return f"{self.root}/apps/{self.app}/history.json"

    @property
    def lock(self) -> str:
        return f"{self.root}/locks/{self.app}"

    def close(self) -> None:
        self.d.close()


@pytest.fixture
def app(lab, monkeypatch):
    """A fresh app name and its secret (in the environment the pipeline reads it from)."""
    name = f"at{UID}{_random.token_hex(2)}"
    secret = f"s3cr3t-{_random.token_hex(12)}"
    monkeypatch.setenv(SECRET_VAR, secret)
    yield name, secret
    stage = _stage(lab, lab["servers"], name, 1)
    d = SSHDockerDeployer(stage, pipeline=name, image_name="x", run_id="cleanup")
    d.each(lambda t: remove_app_on_server(d, d.connection(t), name), list(d.targets))
    d.close()


def _blocks(out: str) -> dict[str, str]:
    """`runner app remove`'s report: server -> its indented lines."""
    blocks: dict[str, str] = {}
    server = None
    for line in out.splitlines():
        if line and not line[0].isspace() and ":" in line:
            server = line.split(":", 1)[0]
            blocks[server] = ""
        elif server is not None:
            blocks[server] += line + "\n"
    return blocks


def _invoke(group, args, **kw):
    return CliRunner().invoke(group, args, catch_exceptions=False, **kw)


# --------------------------------------------------------------------------------------------

def test_logs_and_exec_on_two_servers(lab, images, app):
    name, secret = app
    servers = lab["servers"][:2]
    hosts = [s["host"] for s in servers]
    stage = _stage(lab, servers, name, _port())
    _deploy(stage, images, "v1", name, secret)
    cli = make_app(lambda path, variables: _pipeline(stage, name, images))

    # logs from both servers: each line prefixed with its server, stderr too, secret masked.
    res = _invoke(cli, ["logs", "p.yaml"])
    assert res.exit_code == 0, res.output
    assert secret not in res.output
    for h in hosts:
        assert f"{h} | app-marker token=***" in res.output
        assert f"{h} | app-err-marker" in res.output
    # One server: no prefix; --lines bounds the output.
    res = _invoke(cli, ["logs", "p.yaml", "--server", hosts[0], "--lines", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() in (["app-marker token=***"], ["app-err-marker"])
    assert hosts[1] not in res.output and secret not in res.output
    # Unknown server: bad input, nothing run.
    res = _invoke(cli, ["logs", "p.yaml", "--server", "nope"])
    assert res.exit_code == 2 and "unknown server 'nope'" in res.output
    assert hosts[0] in res.output

    # A secret the commands do not use and cannot read stops neither (it stopped both: every
    # secret was read first); the app's own secret is still read, so still masked.
    unused = make_app(lambda path, variables: _pipeline(stage, name, images, unreadable=True))
    res = _invoke(unused, ["logs", "p.yaml", "--server", hosts[0]])
    assert res.exit_code == 0, res.output
    assert "app-marker token=***" in res.output and secret not in res.output
    res = _invoke(unused, ["exec", "p.yaml", "--server", hosts[0], "--", "cat", "/www/index.html"])
    assert (res.exit_code, res.output) == (0, "v1\n")

    # exec: the version the container serves; the command's exit status is ours.
    res = _invoke(cli, ["exec", "p.yaml", "--server", hosts[0], "--", "cat", "/www/index.html"])
    assert (res.exit_code, res.output) == (0, "v1\n")
    res = _invoke(cli, ["exec", "p.yaml", "--server", hosts[1], "--", "false"])
    assert res.exit_code == 1, res.output
    res = _invoke(cli, ["exec", "p.yaml", "--server", hosts[1], "--", "sh", "-c", "exit 3"])
    assert res.exit_code == 3, res.output
    # Arguments stay words: no shell on the way, `$APP_TOKEN; echo` is one argument of echo.
    res = _invoke(cli, ["exec", "p.yaml", "--server", hosts[0], "--", "echo", "$APP_TOKEN; x"])
    assert (res.exit_code, res.output) == (0, "$APP_TOKEN; x\n")
    # The secret, printed by the command, is masked.
    res = _invoke(cli, ["exec", "p.yaml", "--server", hosts[0], "--", "sh", "-c",
                        'echo "token=$APP_TOKEN"'])
    assert (res.exit_code, res.output) == (0, "token=***\n")
    # Every server with --all, prefixed; several servers need --server or --all.
    res = _invoke(cli, ["exec", "p.yaml", "--all", "--", "cat", "/www/index.html"])
    assert res.exit_code == 0, res.output
    assert sorted(res.output.splitlines()) == sorted(f"{h} | v1" for h in hosts)
    res = _invoke(cli, ["exec", "p.yaml", "--", "cat", "/www/index.html"])
    assert res.exit_code == 2 and "--server" in res.output
    res = _invoke(cli, ["exec", "p.yaml", "--server", hosts[0]])
    assert res.exit_code == 2 and "no command" in res.output
    res = _invoke(cli, ["exec", "p.yaml", "--server", "nope", "--", "true"])
    assert res.exit_code == 2 and "unknown server 'nope'" in res.output


def test_logs_follow_streams_until_interrupted(lab, images, app):
    name, secret = app
    server = lab["servers"][0]
    stage = _stage(lab, [server], name, _port())
    _deploy(stage, images, "v1", name, secret)
    cli = make_app(lambda path, variables: _pipeline(stage, name, images))
    check = Server(lab, server, name)
    late = f"late-line-{_random.token_hex(4)}"
    done = threading.Event()

    def later():
        # A line the app writes after `logs --follow` started, then Ctrl-C.
        time.sleep(2)
        check.run("docker", "exec", name, "sh", "-c", f'echo "{late} $APP_TOKEN" > /proc/1/fd/1')
        time.sleep(2)
        if not done.is_set():
            _thread.interrupt_main()
    t = threading.Thread(target=later, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        res = _invoke(cli, ["logs", "p.yaml", "--follow", "--lines", "5"])
    finally:
        done.set()
        t.join()
        check.close()
    assert time.monotonic() - t0 >= 3.5, res.output  # it did wait for new lines
    assert res.exit_code == 130, res.output
    # Its streaming threads ended before it returned (none left writing to the terminal).
    assert not [th for th in threading.enumerate() if th.name.startswith("app-")]
    assert "app-marker token=***" in res.output
    assert f"{late} ***" in res.output
    assert secret not in res.output


def test_remove_asks_then_removes_everything(lab, images, app):
    name, secret = app
    servers = lab["servers"][:2]
    hosts = [s["host"] for s in servers]
    stage = _stage(lab, servers, name, _port(), lock={"ttl": 2, "wait": 10})
    checks = [Server(lab, s, name) for s in servers]
    for c in checks:  # so that this app's deploy of v3 pulls it
        c.run("docker", "image", "rm", images["v3"])
    _deploy(stage, images, "v1", name, secret)
    _deploy(stage, images, "v2", name, secret)
    # v3 fails its health gate and is rolled back: its image is in no release history.
    fast = stage.model_copy(update={"healthcheck": stage.healthcheck.model_copy(
        update={"timeout": 2})})
    d = SSHDockerDeployer(fast, pipeline=name, image_name=images["repo"], run_id="v3",
                          image=ImageRef.parse(images["v3"]), commit="v3" * 10,
                          secret=lambda n: {"tok": secret}[n])
    try:
        with pytest.raises(DeployFailed, match="rolled back"):
            d.apply()
    finally:
        d.close()
    assert all(c.run("docker", "image", "inspect", images["v3"]).ok for c in checks)
    cli = make_app(lambda path, variables: _pipeline(stage, name, images))
    try:
        first = checks[0]
        # A kept previous version (as an interrupted deploy leaves it), and a stale lock of a
        # run that died.
        r = first.run("docker", "container", "create", "--name", f"{name}_prev_old",
                      "--label", f"runner.app={name}", images["v1"])
        assert r.ok, r.output
        lease = locks.acquire(first.conn, f"{first.root}/locks", name,
                              locks.holder_info("dead-run", name), ttl=2, wait=0)
        lease._stop.set()  # its heartbeat stops: stale after 2s
        assert sorted(first.containers()) == sorted([name, f"{name}_prev_old"])
        assert all(c.exists(c.history) for c in checks)

        # Asked, answered no: nothing is removed.
        res = _invoke(cli, ["remove", "p.yaml"], input="n\n")
        assert res.exit_code == 1, res.output
        assert "nothing removed" in res.output and all(h in res.output for h in hosts)
        assert sorted(first.containers()) == sorted([name, f"{name}_prev_old"])
        assert checks[1].containers() == [name]
        assert all(c.exists(c.history) for c in checks) and first.exists(first.lock)

        time.sleep(2.5)
        res = _invoke(cli, ["remove", "p.yaml", "--yes"])
        assert res.exit_code == 0, res.output
        out = res.output
        print(out)
        blocks = _blocks(out)
        assert f"removed container {name} " in blocks[hosts[0]]
        assert f"removed container {name}_prev_old " in blocks[hosts[0]]
        assert f"removed container {name} " in blocks[hosts[1]]
        for v in ("v1", "v2", "v3"):
            assert all(f"removed image {images[v]}" in blocks[h] for h in hosts), out
        assert "removed release history" in blocks[hosts[1]]
        assert "removed stale deploy lock of run dead-run" in out
        for c in checks:
            assert c.containers() == []
            assert not c.exists(c.history) and not c.exists(f"{c.root}/apps/{name}")
            assert not c.exists(c.lock)
            # No image of the app's repository is left (the session's images are v1 to v3).
            assert c.run("docker", "image", "ls", "--quiet", images["repo"]).stdout.split() == []
        # Again: there is nothing left to remove.
        res = _invoke(cli, ["remove", "p.yaml", "--yes"])
        assert res.exit_code == 0, res.output
        assert all(f"{h}: nothing of {name} was there" in res.output for h in hosts)
    finally:
        for c in checks:
            c.close()


def test_deploy_lock_show_break_json_and_unreachable(lab, images, app):
    name, secret = app
    server = lab["servers"][2]
    stage = _stage(lab, [server], name, _port(), lock={"ttl": 30, "wait": 1})
    _deploy(stage, images, "v1", name, secret)
    bad = _stage(lab, [server, {"user": "root", "host": UNREACHABLE, "port": 22}], name,
                 _port(), ssh={"connect_timeout": 1, "retries": 0}, lock={"ttl": 30, "wait": 1})
    _, _, lock_cli, _ = make_commands(lambda path, variables: _pipeline(stage, name, images))
    _, _, lock_bad, _ = make_commands(lambda path, variables: _pipeline(bad, name, images))
    app_cli = make_app(lambda path, variables: _pipeline(stage, name, images))
    check = Server(lab, server, name)
    host = server["host"]
    lease = locks.acquire(check.conn, f"{check.root}/locks", name,
                          locks.holder_info("held-by-test", name, commit="c0ffee" * 4), ttl=30,
                          wait=0)
    try:
        res = _invoke(lock_cli, ["show", "p.yaml", "--json"])
        assert res.exit_code == 0, res.output
        [row] = json.loads(res.output)
        assert (row["server"], row["state"]) == (host, "held")
        assert row["holder"]["run_id"] == "held-by-test" and "token" not in row["holder"]
        assert row["ttl"] == 30 and row["age"] < 30
        # The text form says the same.
        res = _invoke(lock_cli, ["show", "p.yaml"])
        assert res.exit_code == 0 and f"{host}: run held-by-test" in res.output

        # A server that cannot be asked: its row says which and why; exit 1.
        t0 = time.monotonic()
        res = _invoke(lock_bad, ["show", "p.yaml", "--json"])
        assert time.monotonic() - t0 < 10
        assert res.exit_code == 1, res.output
        rows = {r["server"]: r for r in json.loads(res.output)}
        assert rows[host]["state"] == "held"
        assert rows[UNREACHABLE]["state"] == "error"
        assert f"cannot reach {UNREACHABLE}:22" in rows[UNREACHABLE]["error"]
        res = _invoke(lock_bad, ["show", "p.yaml"])
        assert res.exit_code == 1
        assert f"{UNREACHABLE}: error: cannot reach {UNREACHABLE}:22" in res.output

        # remove while a live deploy holds the lock: refused on that server, named, nothing gone.
        res = _invoke(app_cli, ["remove", "p.yaml", "--yes"])
        assert res.exit_code == 1, res.output
        assert f"remove of {name} failed on {host}" in res.output
        assert "held by run held-by-test" in res.output
        assert check.containers() == [name] and check.exists(check.history)

        # break: unknown server is bad input; the unreachable one fails the command (1).
        res = _invoke(lock_bad, ["break", "p.yaml", "--server", "nope"])
        assert res.exit_code == 2 and "unknown server 'nope'" in res.output
        res = _invoke(lock_bad, ["break", "p.yaml", "--json"])
        assert res.exit_code == 1, res.output
        rows = {r["server"]: r for r in json.loads(res.output)}
        assert rows[host] == {"server": host, "broken": True, "error": ""}
        assert not rows[UNREACHABLE]["broken"] and UNREACHABLE in rows[UNREACHABLE]["error"]
        res = _invoke(lock_cli, ["break", "p.yaml", "--server", host, "--json"])
        assert res.exit_code == 0
        assert json.loads(res.output) == [{"server": host, "broken": False, "error": ""}]
        res = _invoke(lock_cli, ["show", "p.yaml", "--json"])
        assert res.exit_code == 0 and json.loads(res.output)[0]["state"] == "free"
    finally:
        lease.release()
        check.close()
