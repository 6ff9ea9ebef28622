"""`runner daemon` as a child process on 127.0.0.1: started on a free port, waited for until it
answers /healthz, stopped by its pid (SIGTERM, then SIGKILL if it outlives the timeout).

For whatever drives a real daemon process from Python: the daemon tests (tests/lab/test_daemon.py)
and the webhook benchmark (bench/webhooks.py) both start theirs with this.

    with daemon_subprocess(tmp, cfg, "first") as (proc, url):
        httpx.post(url + "/hooks/github", ...)

The config is written to WORKDIR/NAME.yaml with `listen` set to the chosen port, and the
daemon's output goes to WORKDIR/NAME.log (appended to, so a restart under the same name keeps
the first run's lines).
"""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from runner.proc import stop

# The directory holding this `runner` package: `python -m runner` run from there is this code.
SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent
RUNNER = (sys.executable, "-m", "runner")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


class DaemonStartError(RuntimeError):
    """The daemon exited, or did not answer /healthz in time. The message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_daemon(workdir: Path, cfg: dict, name: str = "daemon", *,
                 timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT,
                 runner: tuple[str, ...] = RUNNER) -> tuple[subprocess.Popen, str]:
    """`python -m runner daemon --config WORKDIR/NAME.yaml` (`runner`: what stands for
    `python -m runner`) listening on a free loopback port; returns (process, base URL) once
    /healthz answers 200. Raises DaemonStartError if the process exits first or `timeout`
    passes (it is stopped then)."""
    port = free_port()
    cfg = json.loads(json.dumps(cfg))  # a deep copy: the caller's dict stays as it was
    cfg["listen"] = {"host": "127.0.0.1", "port": port}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([*runner, "daemon", "--config", str(path)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=SOURCE_ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DaemonStartError(f"the daemon exited with code {proc.returncode} before "
                                   f"answering; {log} ends:\n{_tail(log)}")
        if healthy(url):
            return proc, url
        time.sleep(0.05)
    stop_daemon(proc, stop_timeout)
    raise DaemonStartError(f"the daemon did not answer {url}/healthz within {timeout:g} s; "
                           f"{log} ends:\n{_tail(log)}")


def stop_daemon(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to this process (its graceful shutdown), SIGKILL if it is still there after
    `timeout` seconds. Nothing else is signalled."""
    stop(proc, ((signal.SIGTERM, timeout), (signal.SIGKILL, None)))


@contextlib.contextmanager
def daemon_subprocess(workdir: Path, cfg: dict, name: str = "daemon", *,
                      timeout: float = START_TIMEOUT,
                      stop_timeout: float = STOP_TIMEOUT) -> Iterator[tuple[subprocess.Popen, str]]:
    """start_daemon() as a context manager: yields (process, URL), stops it on the way out
    (unless the caller already did)."""
    proc, url = start_daemon(workdir, cfg, name, timeout=timeout, stop_timeout=stop_timeout)
    try:
        yield proc, url
    finally:
        stop_daemon(proc, stop_timeout)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(unreadable: {exc})"
