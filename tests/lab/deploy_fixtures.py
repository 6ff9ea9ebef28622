"""What the deploy tests on the lab share: tiny busybox httpd images built in the lab's engine
and pushed to its registry (once per session), deploy settings for the lab's servers, a log
that keeps lines with their time, and an app name per test whose containers and state are
removed at the end (`app`), or while the module's next test runs (`app_behind`)."""
from __future__ import annotations

import os
import secrets as _random
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from deployers.ssh_docker import SSHDockerDeployer
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef
from tests.helpers import remove_app_on_server

UID = _random.token_hex(3)
DOCKER = "/usr/bin/docker"  # Debian's CLI: built-in BuildKit

DOCKERFILE = """FROM local/busybox:1
ARG VERSION
ARG HEALTH=ok
RUN mkdir -p /www && echo "$VERSION" > /www/index.html && \\
    if [ "$HEALTH" = ok ]; then echo ok > /www/health; fi
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


def _docker(*args: str, cwd: Path | None = None) -> str:
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    p = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=120)
    assert p.returncode == 0, f"docker {' '.join(args)}: {p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="session")
def images(lab, tmp_path_factory):
    """v1, v2 (healthy: /health exists) and v3 (no /health): name@digest refs."""
    ctx = tmp_path_factory.mktemp("img")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    repo = f"{lab['registry']}/deploytest-{UID}/app"
    refs = {}
    for version, health in (("v1", "ok"), ("v2", "ok"), ("v3", "missing")):
        tag = f"{repo}:{version}"
        _docker("build", "-q", "--build-arg", f"VERSION={version}", "--build-arg",
                f"HEALTH={health}", "-t", tag, ".", cwd=ctx)
        _docker("push", tag)
        digest = _docker("inspect", "--format", "{{index .RepoDigests 0}}", tag).strip()
        refs[version] = digest
        assert "@sha256:" in digest
    refs["repo"] = repo
    return refs


def _servers(lab, n):
    return lab["servers"][:n] if n > 0 else lab["servers"][n:]


def _stage(lab, servers, app, port, **over) -> DeploySettings:
    s0 = lab["servers"][0]
    data = {
        "enabled": True,
        "servers": [f"{s['user']}@{s['host']}:{s['port']}" for s in servers],
        "ssh": {"key_file": s0["key_file"], "known_hosts": s0["known_hosts"],
                "connect_timeout": 5, "retries": 1},
        "container": {"name": app, "ports": [f"{port}:8080"], "stop_timeout": 2},
        "healthcheck": {"http": {"port": 8080, "path": "/health"}, "timeout": 10,
                        "probe_interval": 0.2},
        "lock": {"ttl": 10, "wait": 60},
    }
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return DeploySettings.model_validate(data)


class Log:
    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append((time.monotonic(), line))

    info = line = warn = __call__

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


class NoSecrets:
    def value(self, name: str) -> str:
        raise KeyError(name)


def _deployer(stage, images, version, app, log=None, run_id=None, secret=None, commit=None,
              cancel=None):
    run_id = run_id or f"t{_random.token_hex(3)}"
    return SSHDockerDeployer(stage, pipeline=app, image_name=images["repo"], run_id=run_id,
                             image=ImageRef.parse(images[version]),
                             commit=version * 10 if commit is None else commit,
                             secret=secret, log=log, cancel=cancel)


def _get(host: str, port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as r:
            return r.read().decode().strip()
    except OSError as exc:
        return f"error: {exc}"


def _cleanup(lab, app: str, servers) -> None:
    stage = _stage(lab, servers, app, 1)
    d = SSHDockerDeployer(stage, pipeline=app, image_name="x", run_id="cleanup")
    # errors ignored: best effort
    d.each(lambda t: remove_app_on_server(d, d.connection(t), app), list(d.targets))
    d.close()


@pytest.fixture
def app(lab):
    name = f"dt{UID}{_random.token_hex(2)}"
    created = []
    yield name, created
    _cleanup(lab, name, lab["servers"])


class Behind:
    """Removals that run while the module's next tests do, two at a time: a test's teardown
    hands its app over instead of waiting the 2-3 s of SSH and `docker rm` on every server.
    All have ended when the module's last teardown returns, so no other module's test sees
    them; `settle()` waits for them earlier, before a test kills what the servers share (their
    sshd). Only for modules whose tests look at nothing on the servers but their own apps (not
    at images other apps' containers may still use, as keep_versions' pruning does)."""

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._pending: list[Future] = []

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))

    def settle(self) -> None:
        """Wait for every removal handed over so far; raise what one raised."""
        wait(self._pending)
        for f in self._pending:
            f.result()


@pytest.fixture(scope="module")
def behind(lab):
    with ThreadPoolExecutor(max_workers=2) as pool:
        b = Behind(pool)
        yield b
        b.settle()


@pytest.fixture
def app_behind(lab, behind):
    """`app`, removed from the servers while the module's next test runs (see Behind)."""
    name = f"dt{UID}{_random.token_hex(2)}"
    yield name, []
    behind.submit(_cleanup, lab, name, lab["servers"])


def _port() -> int:
    return 20000 + int.from_bytes(os.urandom(2), "big") % 9000


def _run_until(log: Log, needle: str, target, timeout: float = 30) -> threading.Thread:
    """Start target() in a thread and return once `needle` has been logged."""
    th = threading.Thread(target=target)
    th.start()
    deadline = time.monotonic() + timeout
    while needle not in log.text:
        assert time.monotonic() < deadline, f"never logged {needle!r}:\n{log.text}"
        time.sleep(0.02)
    return th


def _apply_until(d, log: Log, needle: str, timeout: float = 30) -> tuple[threading.Thread, dict]:
    """d.apply() in a thread, returned once `needle` has been logged; out["r"] is then the
    report or the exception apply raised."""
    out: dict = {}

    def go():
        try:
            out["r"] = d.apply()
        except BaseException as exc:  # collected for the caller's assertions
            out["r"] = exc
    return _run_until(log, needle, go, timeout), out
