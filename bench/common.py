"""Shared parts of `python -m bench`: the lab, the images, timing, statistics, the results file.

Everything here drives real components (the lab's build engine, registry and SSH servers) with
plain subprocesses, so that each variant is timed as a whole process, the way a user runs it.
Names on the servers start with `bench-` and host ports are 18080+ so the test suite (8000/8080,
example-app) is never disturbed.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DOCKER = "/usr/bin/docker"  # Debian's 20.10 CLI: built-in BuildKit (the newer CLI lacks buildx)
CONTAINER = "bench-app"
HOST_PORT = 18080
APP_PORT = 8080


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ lab

def lab_status() -> dict:
    p = subprocess.run([sys.executable, "-m", "runner", "lab", "status", "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    try:
        return json.loads(p.stdout or "{}")
    except json.JSONDecodeError:
        return {}


def ensure_lab(servers: int) -> dict:
    """The lab with at least `servers` servers (`runner lab up` is idempotent and only adds)."""
    info = lab_status()
    if info.get("up") and len(info.get("servers") or []) >= servers:
        return info
    log(f"runner lab up --servers {servers}")
    p = subprocess.run([sys.executable, "-m", "runner", "lab", "up", "--servers",
                        str(max(servers, len(info.get("servers") or []))), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"runner lab up failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout)


def machine() -> dict:
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu": cpu, "memory": mem, "python": platform.python_version()}


# ------------------------------------------------------------------ ssh (OpenSSH: the plain variants)

def ssh_argv(server: dict, remote: str) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={server['known_hosts']}", "-o", "ConnectTimeout=10",
            "-i", server["key_file"], "-p", str(server["port"]),
            f"{server['user']}@{server['host']}", remote]


def ssh(server: dict, remote: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ssh_argv(server, remote), capture_output=True, text=True,
                          timeout=timeout)


def on_servers(servers: list[dict], remote: str, timeout: float = 120) -> list:
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        return list(pool.map(lambda s: ssh(s, remote, timeout), servers))


def cleanup_servers(servers: list[dict], refs: list[str] = ()) -> None:
    """Remove the bench containers (and the given images) from the servers."""
    rm_images = " ".join(shlex.quote(r) for r in refs)
    remote = ("ids=$(docker ps -aq --filter name=^bench-); "
              "[ -z \"$ids\" ] || docker rm -f $ids >/dev/null 2>&1; "
              + (f"docker image rm {rm_images} >/dev/null 2>&1; " if refs else "") + "true")
    on_servers(servers, remote)


# ------------------------------------------------------------------ images

TINY_DOCKERFILE = """\
FROM local/busybox:1
ARG CACHE_BUST=warm
RUN mkdir -p /www && echo "$CACHE_BUST" > /www/.build && echo ok > /www/healthz
COPY index.html /www/index.html
EXPOSE 8080
HEALTHCHECK --interval=1s --timeout=2s --start-period=10s --retries=3 \\
    CMD wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


def write_app(kind: str, dest: Path, version: str) -> dict[str, str]:
    """Write the app's build context into dest; returns the build args it needs.

    example: examples/app as it is, plus two ARGs in its dependency stage so that the cold
    build of the rebuild variant can miss every cache (CACHE_BUST) and pip's cache too
    (PIP_CACHE_DIR pointed away from the cache mount); warm builds pass the defaults.
    tiny: a busybox httpd with a 1 s HEALTHCHECK, for the smoke test."""
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "example":
        src = ROOT / "examples" / "app"
        for name in ("app.py", "requirements.txt"):
            shutil.copy2(src / name, dest / name)
        lines = (src / "Dockerfile").read_text().splitlines()
        out = []
        for line in lines:
            out.append(line)
            if line.startswith("FROM ") and " AS deps" in line:
                out += ["ARG CACHE_BUST=warm", "ARG PIP_CACHE_DIR=/root/.cache/pip"]
        (dest / "Dockerfile").write_text("\n".join(out) + "\n")
        set_version(kind, dest, version)
        return {"PYTHON_IMAGE": "local/python:3.11"}
    if kind == "tiny":
        (dest / "Dockerfile").write_text(TINY_DOCKERFILE)
        set_version(kind, dest, version)
        return {}
    raise ValueError(f"unknown image kind {kind!r}")


def set_version(kind: str, dest: Path, version: str) -> None:
    """A code-only change: the app's source differs, nothing else."""
    if kind == "example":
        path = dest / "app.py"
        text = path.read_text().split("\n# bench version", 1)[0].rstrip("\n")
        path.write_text(f"{text}\n# bench version {version}\n")
    else:
        (dest / "index.html").write_text(f"bench version {version}\n")


def docker_env(lab: dict) -> dict[str, str]:
    return dict(os.environ, DOCKER_HOST=lab["docker_host"], DOCKER_BUILDKIT="1")


def push_digest(output: str) -> str:
    """The digest from `docker push` output ("...: digest: sha256:... size: N")."""
    for line in output.splitlines():
        if "digest: sha256:" in line:
            return line.split("digest: ", 1)[1].split()[0]
    raise RuntimeError(f"no digest in docker push output:\n{output[-500:]}")


def build_push(lab: dict, context: Path, name: str, tag: str, args: dict[str, str]) -> str:
    env = docker_env(lab)
    argv = [DOCKER, "build", "-q", "-t", f"{name}:{tag}"]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    p = subprocess.run(argv + [str(context)], env=env, capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"docker build failed:\n{p.stderr[-2000:]}")
    p = subprocess.run([DOCKER, "push", f"{name}:{tag}"], env=env, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        raise SystemExit(f"docker push failed:\n{p.stderr[-2000:]}")
    return f"{name}@{push_digest(p.stdout)}"


def two_versions(lab: dict, kind: str, workdir: Path) -> list[str]:
    """Two versions of the app (a code-only difference) pushed to the lab's registry, by digest."""
    name = f"{lab['registry']}/bench/{kind}"
    refs = []
    nonce = secrets.token_hex(4)  # new digests each bench run
    for v in ("1", "2"):
        ctx = workdir / f"image-v{v}"
        args = write_app(kind, ctx, f"{nonce}-v{v}")
        refs.append(build_push(lab, ctx, name, f"v{v}", args))
    return refs


# ------------------------------------------------------------------ statistics

def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "runs": []}
    return {"n": len(values), "median": round(statistics.median(values), 4),
            "min": round(min(values), 4), "max": round(max(values), 4),
            "runs": [round(v, 4) for v in values]}


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("median") or not b.get("median"):
        return None
    return round(a["median"] / b["median"], 3)


def pair_range(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """min and max of the round-by-round ratios a[i]/b[i] (the pairs ran next to each other)."""
    pairs = [x / y for x, y in zip(a, b) if y]
    return (round(min(pairs), 3), round(max(pairs), 3)) if pairs else None


@dataclass
class Timer:
    """Wall time of a subprocess, start to exit."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    timeout: float = 600
    wall: float = 0.0
    started_epoch: float = 0.0
    result: subprocess.CompletedProcess | None = field(default=None, repr=False)

    def run(self) -> "Timer":
        self.started_epoch = time.time()
        t0 = time.monotonic()
        self.result = subprocess.run(self.argv, env=self.env, cwd=self.cwd, capture_output=True,
                                     text=True, timeout=self.timeout)
        self.wall = time.monotonic() - t0
        return self

    def check(self, what: str) -> "Timer":
        assert self.result is not None
        if self.result.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {self.result.returncode}):\n"
                               f"{self.result.stdout[-3000:]}\n{self.result.stderr[-3000:]}")
        return self


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="runner-bench-"))


def write_results(data: dict, path: str | None = None) -> Path:
    if path:
        out = Path(path)
    else:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return out
