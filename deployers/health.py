"""Deciding whether a freshly started container is healthy.

Two halves: pure parsers of `docker container inspect` output (tested on captured output) and a
poller whose clock, sleep, inspect and probe are injected (tested without docker).

Why the runner probes by itself: docker's own health status moves only once per `interval`
(30 s by default in images) and never restarts an unhealthy container. So the poller runs the
same check directly (`docker exec` of the health command, or an HTTP request made from the
server) every `probe_interval`, and accepts the container as soon as a probe passes while docker
does not call it `unhealthy`. Docker's `healthy` is accepted too. Exiting, restarting (a crash
loop) or docker's `unhealthy` fail at once; anything else fails when the timeout is reached.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.errors import Cancelled

from deployers.spec import HealthSpec


@dataclass(frozen=True)
class ContainerState:
    id: str
    name: str
    status: str  # created | running | restarting | paused | exited | dead | removing
    running: bool
    exit_code: int
    oom_killed: bool
    error: str
    started_at: str
    restart_count: int
    health: str | None  # None: no healthcheck; else starting | healthy | unhealthy
    failing_streak: int = 0
    last_health_output: str = ""
    healthcheck_test: tuple[str, ...] = ()
    image: str = ""  # the reference it was created from (Config.Image)
    image_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = ""  # first network address, "" if none
    restart_policy: str = ""
    published: tuple[str, ...] = ()  # "HOSTPORT:CONTAINERPORT", as docker -p took them
    # What it mounts that outlives it: "volume NAME" (a named volume), "host directory PATH".
    lasting: tuple[str, ...] = ()


def _ip(settings: dict) -> str:
    if settings.get("IPAddress"):
        return settings["IPAddress"]
    for net in (settings.get("Networks") or {}).values():
        if net and net.get("IPAddress"):
            return net["IPAddress"]
    return ""


def parse_state(obj: dict) -> ContainerState:
    """One element of `docker container inspect` output."""
    st = obj.get("State") or {}
    cfg = obj.get("Config") or {}
    health = st.get("Health")
    logs = (health or {}).get("Log") or []
    last = logs[-1] if logs else {}
    hc = cfg.get("Healthcheck") or {}
    test = tuple(hc.get("Test") or ())
    if test and test[0] == "NONE":
        test = ()
    return ContainerState(
        id=obj.get("Id", ""),
        name=(obj.get("Name") or "").lstrip("/"),
        status=st.get("Status", ""),
        running=bool(st.get("Running")),
        exit_code=int(st.get("ExitCode") or 0),
        oom_killed=bool(st.get("OOMKilled")),
        error=st.get("Error") or "",
        started_at=st.get("StartedAt") or "",
        restart_count=int(obj.get("RestartCount") or 0),
        health=(health or {}).get("Status") or None,
        failing_streak=int((health or {}).get("FailingStreak") or 0),
        last_health_output=(last.get("Output") or "").strip(),
        healthcheck_test=test,
        image=cfg.get("Image", ""),
        image_id=obj.get("Image", ""),
        labels=dict(cfg.get("Labels") or {}),
        ip=_ip(obj.get("NetworkSettings") or {}),
        restart_policy=((obj.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name", ""),
        published=_published((obj.get("HostConfig") or {}).get("PortBindings") or {}),
        lasting=_lasting(obj.get("Mounts") or []),
    )


_ANONYMOUS = re.compile(r"^[0-9a-f]{64}$")  # the name docker gives a volume nobody named


def _lasting(mounts: list) -> tuple[str, ...]:
    """The named volumes and host directories among a container's mounts (an anonymous
    volume is removed with the container by `docker container rm --volumes`)."""
    out = []
    for m in mounts:
        if not isinstance(m, dict):
            continue
        if m.get("Type") == "volume" and m.get("Name") and not _ANONYMOUS.match(m["Name"]):
            out.append(f"volume {m['Name']}")
        elif m.get("Type") == "bind" and m.get("Source"):
            out.append(f"host directory {m['Source']}")
    return tuple(out)


def _published(bindings: dict) -> tuple[str, ...]:
    out = []
    for port, hosts in sorted(bindings.items()):
        for h in hosts or ():
            if h.get("HostPort"):
                out.append(f"{h['HostPort']}:{port.split('/')[0]}")
    return tuple(out)


def parse_inspect(text: str) -> ContainerState | None:
    """Output of `docker container inspect NAME` -> its state, or None if there is no such
    container (docker prints `[]` and fails)."""
    text = text.strip()
    if not text:
        return None
    data = json.loads(text)
    if not data:
        return None
    return parse_state(data[0])


def parse_http_status(head: bytes) -> int | None:
    """b'HTTP/1.0 200 OK\\r\\n...' -> 200; None when it is not an HTTP response."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    output: str = ""


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str  # why not (or how it passed)
    last_probe: str = ""
    state: ContainerState | None = None
    waited: float = 0.0


def wait_healthy(
    *,
    inspect: Callable[[], ContainerState | None],
    probe: Callable[[ContainerState], ProbeResult] | None,
    health: HealthSpec,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    cancel: threading.Event | None = None,
) -> Verdict:
    """Poll until the container is healthy, fails, or `health.timeout` passes.

    `probe(state)` runs one readiness check (None: rely on docker's health, or on staying up
    for `min_uptime` when the container has no healthcheck). Raises Cancelled when `cancel` is
    set. Never raises for an unhealthy container: the verdict says why."""
    start = clock()
    last_probe = ""
    state: ContainerState | None = None
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled while waiting for the container to be healthy")
        now = clock()
        waited = now - start
        state = inspect()
        if state is None:
            return Verdict(False, "the container disappeared", last_probe, None, waited)
        if state.status in ("exited", "dead") or (not state.running and state.status != "created"
                                                  and state.status != "restarting"):
            why = f"the container exited with code {state.exit_code}"
            if state.oom_killed:
                why += " (killed: out of memory)"
            if state.error:
                why += f": {state.error}"
            return Verdict(False, why, last_probe, state, waited)
        if state.status == "restarting" or state.restart_count > 0:
            code = f", last exit code {state.exit_code}" if not state.running else ""
            return Verdict(False, f"the container exited and docker restarted it "
                                  f"({state.restart_count} restart(s){code})",
                           last_probe, state, waited)
        if state.health == "unhealthy":
            out = state.last_health_output or last_probe
            return Verdict(False, f"docker reports it unhealthy after {state.failing_streak} "
                                  f"failed check(s)", out, state, waited)
        if state.running:
            if probe is not None:
                result = probe(state)
                last_probe = result.output.strip()
                if result.ok:
                    return Verdict(True, "probe passed", last_probe, state, clock() - start)
            if state.health == "healthy":
                return Verdict(True, "docker reports it healthy", last_probe, state,
                               clock() - start)
            if probe is None and state.health is None and waited >= health.min_uptime:
                return Verdict(True, f"no healthcheck: stayed up {health.min_uptime:g}s",
                               last_probe, state, waited)
        if clock() - start >= health.timeout:
            status = state.health or state.status
            return Verdict(False, f"not healthy after {health.timeout:g}s (status: {status})",
                           last_probe or state.last_health_output, state, clock() - start)
        sleep(health.probe_interval)


# ---------------------------------------------------------------- an HTTP probe, explained

@dataclass(frozen=True)
class HttpAnswer:
    status: int | None  # None: not an HTTP response
    status_line: str
    location: str = ""
    body: str = ""  # its first line


def parse_http_answer(raw: bytes) -> HttpAnswer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    location = next((line.split(":", 1)[1].strip() for line in lines[1:]
                     if line.lower().startswith("location:")), "")
    first = body.decode("utf-8", "replace").strip().splitlines()
    return HttpAnswer(parse_http_status(raw), lines[0] if lines else "", location,
                      first[0][:160] if first else "")


def explain_http(path: str, host: str, port: int, answer: HttpAnswer | None,
                 error: str = "") -> str:
    """What a health probe (GET `path` with Host `host` on the container's `port`) saw, said
    in the pipeline's terms, with the setting to change. Pure."""
    where = f"GET {path} (Host: {host}) on the container's port {port}"
    if answer is None:
        low = error.lower()
        if "refused" in low or "connect failed" in low or "code 2" in low:
            return (f"{where}: connection refused: nothing listens on port {port} in the "
                    f"container; set proxy.app_port to the port the app listens on (and make it "
                    f"listen on 0.0.0.0, not 127.0.0.1)")
        if "timed out" in low or "timeout" in low:
            return (f"{where}: no answer in time; the app is slow or stuck: raise "
                    f"proxy.health.timeout, or see the log tail")
        return f"{where} failed: {error}"
    s = answer.status
    said = f" ({answer.body})" if answer.body else ""
    if s is None:
        return (f"{where}: the answer is not HTTP ({answer.status_line[:60]!r}): is port "
                f"{port} the app's HTTP port? (proxy.app_port)")
    if 200 <= s < 300:
        return f"{where}: {answer.status_line}"
    if 300 <= s < 400:
        return (f"{where}: redirected ({s}) to {answer.location or '?'}: a health path must "
                f"answer 200 itself; if the app forces HTTPS or a canonical host, exempt "
                f"{path}, or set proxy.health.path to a path that does not redirect")
    if s == 404:
        return (f"{where}: 404 not found{said}: the app has no {path}; set proxy.health.path "
                f"to a path it answers with 200")
    if s == 421 or (s in (400, 403) and "host" in answer.body.lower()):
        return (f"{where}: the app rejected the Host header {host!r} ({s}{said}): allow that "
                f"host in the app (e.g. ALLOWED_HOSTS), or change proxy.hosts")
    if s >= 500:
        return f"{where}: {s}, the app failed{said}; see the log tail"
    return f"{where}: {answer.status_line}{said}; a healthy app answers 2xx"
