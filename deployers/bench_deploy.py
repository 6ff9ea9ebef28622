"""Benchmark (not a test): deploy wall time to 1..N lab servers, and the plain shell loop.

    python -m deployers.bench_deploy [--counts 1,4,8]

Needs the lab up (`runner lab up --servers 8` for 8). Each measurement deploys a freshly built
image (so every server really pulls) under a fresh app name, then removes what it made. The
plain loop is `ssh host docker pull REF && docker run -d --restart=always ...` run sequentially
per server with OpenSSH: it does not wait for health, keep the previous version, lock or record
anything, so it is the floor, not an equivalent.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner.model.deploy import DeployStage

from deployers.spec import Release
from deployers.ssh_docker import SSHDockerDeployer

DOCKER = "/usr/bin/docker"


def _lab() -> dict:
    p = subprocess.run([sys.executable, "-m", "runner", "lab", "status", "--json"],
                       capture_output=True, text=True)
    info = json.loads(p.stdout or "{}")
    if not info.get("up"):
        sys.exit("the lab is not up: run `runner lab up` first")
    return info


def _image(lab: dict, tag: str) -> str:
    env = dict(os.environ, DOCKER_HOST=lab["docker_host"], DOCKER_BUILDKIT="1")
    repo = f"{lab['registry']}/bench/app"
    with tempfile.TemporaryDirectory() as ctx:
        Path(ctx, "Dockerfile").write_text(
            "FROM local/busybox:1\n"
            f"RUN mkdir -p /www && echo {tag} > /www/index.html\n"
            'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]\n')
        subprocess.run([DOCKER, "build", "-q", "-t", f"{repo}:{tag}", ctx], env=env,
                       check=True, capture_output=True)
    subprocess.run([DOCKER, "push", f"{repo}:{tag}"], env=env, check=True,
                   capture_output=True)
    out = subprocess.run([DOCKER, "inspect", "--format", "{{index .RepoDigests 0}}",
                          f"{repo}:{tag}"], env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _ssh(server: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={server['known_hosts']}",
         "-i", server["key_file"], "-p", str(server["port"]),
         f"{server['user']}@{server['host']}", *argv], capture_output=True, text=True)


def _cleanup(servers: list[dict], app: str) -> None:
    for s in servers:
        _ssh(s, "docker rm -f $(docker ps -aq --filter label=runner.app=" + app
             + ") " + app + " >/dev/null 2>&1; true")


def run_runner(lab: dict, servers: list[dict], port: int) -> float:
    tag = f"b{secrets.token_hex(4)}"
    ref = _image(lab, tag)
    app = f"bench{tag}"
    stage = DeployStage.model_validate({
        "enabled": True, "servers": [f"{s['user']}@{s['host']}:{s['port']}" for s in servers],
        "ssh": {"key_file": servers[0]["key_file"], "known_hosts": servers[0]["known_hosts"]},
        "container": {"name": app, "ports": [f"{port}:8080"]},
        "healthcheck": {"http": {"port": 8080, "path": "/"}, "timeout": 30},
        "parallel": 64})
    d = SSHDockerDeployer(stage, pipeline=app, image_name=ref.split("@")[0], run_id=tag,
                          release=Release(ref=ref, pipeline=app, run_id=tag))
    t0 = time.monotonic()
    try:
        d.apply()
        return time.monotonic() - t0
    finally:
        d.close()
        _cleanup(servers, app)


def run_plain(lab: dict, servers: list[dict], port: int) -> float:
    tag = f"p{secrets.token_hex(4)}"
    ref = _image(lab, tag)
    app = f"plain{tag}"
    t0 = time.monotonic()
    for s in servers:
        r = _ssh(s, f"docker pull -q {ref} && docker run -d --restart=always --init "
                    f"--name {app} -p {port}:8080 {ref}")
        if r.returncode != 0:
            raise SystemExit(f"plain loop failed on {s['host']}: {r.stderr}")
    elapsed = time.monotonic() - t0
    _cleanup(servers, app)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    lab = _lab()
    servers = lab["servers"]
    counts = [int(c) for c in args.counts.split(",")]
    print(f"lab has {len(servers)} servers; repeat {args.repeat}, best of each")
    port = 30000 + secrets.randbelow(5000)
    rows = []
    for n in counts:
        if n > len(servers):
            print(f"{n} servers: skipped (the lab has {len(servers)}; "
                  f"`runner lab up --servers {n}`)")
            continue
        chosen = servers[:n]
        ours = min(run_runner(lab, chosen, port) for _ in range(args.repeat))
        plain = min(run_plain(lab, chosen, port) for _ in range(args.repeat))
        rows.append((n, ours, plain))
        print(f"{n} server(s): runner {ours:.2f}s (pull, health-gated), "
              f"plain ssh loop {plain:.2f}s (no health gate)")
    if rows and rows[0][0] == 1:
        one = rows[0][1]
        for n, ours, _ in rows[1:]:
            print(f"{n} servers / 1 server: {ours / one:.2f}x (goal < 2x)")
        print(f"runner / plain loop for 1 server: {rows[0][1] / rows[0][2]:.2f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
