"""contrib/docker/Dockerfile: the daemon's image, built on the lab's engine, run, probed, stopped.

Built from the lab's own base image (nothing can be pulled from Docker Hub here) with BuildKit
(Debian's docker 20.10 CLI, DOCKER_BUILDKIT=1), then run as the image documents it: the config
directory mounted read-only, the engine's socket mounted and reached through its group, not as
root. The image must become healthy by its own HEALTHCHECK, answer /healthz and the API from
outside, reach the engine, and stop on SIGTERM by the daemon's own graceful path (exit 0).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "contrib" / "docker" / "Dockerfile"
DOCKER = "/usr/bin/docker"  # Debian's 20.10 CLI: BuildKit built in (the lab has no buildx plugin)
BASE = "local/python:3.11"  # the lab's Debian 12 python image, the stand-in for python:3.11-slim
TAG = "runner-daemon:lab-test"
TOKEN = "image-test-token-" + uuid.uuid4().hex


def _docker(*args: str, timeout: float = 60, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """What the image documents for /etc/runner: daemon.yaml and the secrets it names. Made
    readable for the image's own user (uid 10001), since the test runs as root with 0700 dirs."""
    cfg = tmp_path / "etc-runner"
    cfg.mkdir()
    (cfg / "daemon.yaml").write_text(
        "name: image-test\n"
        "listen: {host: 0.0.0.0, port: 8080}\n"
        "data_dir: /var/lib/runner\n"
        "api_token: {file: /etc/runner/api-token}\n")
    (cfg / "api-token").write_text(TOKEN + "\n")
    for p in (tmp_path, cfg):
        p.chmod(0o755)
    for f in cfg.iterdir():
        f.chmod(0o644)
    return cfg


def test_daemon_image_builds_runs_healthy_and_stops_gracefully(lab, config_dir):
    sock_url = lab["docker_host"]
    assert sock_url.startswith("unix://"), sock_url
    sock = sock_url[len("unix://"):]
    env = dict(os.environ, DOCKER_HOST=sock_url, DOCKER_BUILDKIT="1")

    started = time.monotonic()
    _docker("build", "-f", str(DOCKERFILE), "--build-arg", f"BASE={BASE}", "-t", TAG, str(ROOT),
            timeout=600, env=env)
    built = time.monotonic() - started

    name = f"runner-daemon-test-{uuid.uuid4().hex[:8]}"
    gid = str(os.stat(sock).st_gid)
    try:
        # --health-interval 1s: the image's own 15 s interval would make the first probe wait
        # 15 s; the probe itself (RUNNER_HEALTHZ, the HEALTHCHECK command) is the image's.
        _docker("run", "-d", "--name", name, "--group-add", gid, "--health-interval", "1s",
                "--stop-timeout", "60", "-p", "127.0.0.1::8080",
                "-v", f"{config_dir}:/etc/runner:ro", "-v", f"{sock}:/var/run/docker.sock",
                TAG, env=env)
        deadline = time.monotonic() + 60
        health = ""
        while time.monotonic() < deadline:
            health = _docker("inspect", "-f", "{{.State.Health.Status}}", name, env=env).stdout.strip()
            if health in ("healthy", "unhealthy"):
                break
            time.sleep(0.5)
        logs = _docker("logs", name, env=env, check=False)
        assert health == "healthy", f"health {health!r}; daemon log:\n{logs.stdout}\n{logs.stderr}"

        port = _docker("port", name, "8080/tcp", env=env).stdout.strip().splitlines()[0].rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"
        status, body = _get(f"{base}/healthz")
        assert status == 200 and body["ok"] is True, body
        assert body["daemon"].startswith("image-test@"), body
        # The token came from the read-only mount, read by the image's non-root user.
        assert _get(f"{base}/api/runs")[0] == 401
        status, body = _get(f"{base}/api/runs", TOKEN)
        assert status == 200 and body == {"runs": []}, body

        def inside(*argv: str) -> str:
            return _docker("exec", name, *argv, env=env).stdout.strip()

        assert inside("id", "-u") == "10001"
        # The engine through the mounted socket and its group: what the build stage needs.
        assert inside("docker", "version", "--format", "{{.Server.Version}}")
        # The build stage's test for a CLI with BuildKit built in (pipelines/buildkit.py).
        assert "--secret" in inside("sh", "-c", "DOCKER_BUILDKIT=1 docker build --help")
        assert inside("git", "--version").startswith("git version")
        assert "OpenSSH" in _docker("exec", name, "ssh", "-V", env=env).stderr
        # The default EXTRAS=scan: Trivy is where the scan stage looks for it (beside python).
        assert "Version" in inside("/opt/runner/bin/trivy", "--version")

        stop_started = time.monotonic()
        _docker("stop", name, env=env, timeout=90)
        stopped_in = time.monotonic() - stop_started
        state = json.loads(_docker("inspect", "-f", "{{json .State}}", name, env=env).stdout)
        logs = _docker("logs", name, env=env, check=False)
        # SIGTERM (STOPSIGNAL, through tini) reaches the daemon, which stops by itself: exit 0
        # and its last log line, well before the 60 s after which docker would SIGKILL it.
        assert state["ExitCode"] == 0, f"{state}\n{logs.stdout}\n{logs.stderr}"
        assert '"msg": "daemon stopped"' in logs.stdout, logs.stdout
        assert stopped_in < 30, stopped_in
    finally:
        _docker("rm", "-f", "-v", name, env=env, check=False)
        _docker("rmi", TAG, env=env, check=False)
    print(f"image built in {built:.1f}s")
