"""Probing a release's container for its health gate over SSH (the wait itself is
deployers.health.wait_healthy): the probe the pipeline's `healthcheck` asks for (an HTTP GET
the server makes, the planned probe command, or the image's own HEALTHCHECK), what the gate
says it checks, and why it failed, with the container's last log lines."""
from __future__ import annotations

from collections.abc import Callable

import paramiko

from deployers import commands as cmd
from deployers.base import Switch
from deployers.health import ContainerState, ProbeResult, Verdict, parse_http_status
from deployers.http_over_ssh import http_get
from deployers.server_session import OnServer, Run, ServerSession
from deployers.spec import HealthSpec
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

# Why a gate had nothing to check (said as a warning, and in the report instead of "healthy").
NO_CHECK = ("the image has no HEALTHCHECK and the pipeline sets no healthcheck.cmd or "
            "healthcheck.http")

Probe = Callable[[ContainerState], ProbeResult]


def uptime_only(h: HealthSpec) -> str:
    """What the gate of a role without a health check of its own (a worker) checked: said in
    the report instead of "healthy"."""
    return (f"no health check of its own: it ran {h.min_uptime:g}s without exiting or "
            f"restarting (the image's HEALTHCHECK is off for it)")


def check_name(h: HealthSpec) -> str:
    """What the health gate of HealthSpec `h` runs, for the log."""
    if h.kind == "cmd":
        return "healthcheck.cmd"
    if h.kind == "http":
        return f"healthcheck.http GET {h.http_path} on port {h.http_port or 80}"
    return "the image's HEALTHCHECK"


def announce(s: ServerSession, sw: Switch, check: str, timeout: float) -> None:
    """Say what the health gate checks; with nothing to check, warn and mark the switch
    (the report then says "started, not health-checked", never "healthy")."""
    if check:
        s.d.log(f"{sw.server}: waiting for health ({check}, up to {timeout:g}s)")
        return
    health = sw.release.spec.health
    if health.kind == "uptime":  # a role meant to run without one: no warning
        sw.unchecked = uptime_only(health)
        s.d.log(f"{sw.server}: waiting until it has run {health.min_uptime:g}s without "
                f"exiting or restarting (no health check of its own)")
        return
    sw.unchecked = NO_CHECK
    s.d.log(f"{sw.server}: WARNING: no health check: {NO_CHECK}; it only has to stay "
            f"up {health.min_uptime:g}s, nothing checks that it answers "
            f"(set healthcheck.http or healthcheck.cmd)")


def probe_for(s: ServerSession, conn: Connection, run: Run, st: OnServer, cid: str
              ) -> Probe | None:
    """One readiness probe of container `cid` (the planned probe command, an HTTP GET
    from the server, or the image's own HEALTHCHECK test); None: nothing to probe (the gate
    then only checks that it stays up for min_uptime)."""
    plan, new = st.plan, {cmd.NEW: cid}
    h = plan.release.spec.health
    timeout = h.probe_timeout
    if h.kind == "http":
        forwarding = [True]

        def http(state: ContainerState) -> ProbeResult:
            host = state.ip or "127.0.0.1"
            if forwarding[0]:
                s.check_lease(conn.label)
                try:
                    raw = http_get(conn, host, h.http_port or 80, h.http_path, timeout)
                except paramiko.ChannelException as exc:
                    if exc.code == 1:  # administratively prohibited: no TCP forwarding
                        forwarding[0] = False
                    return ProbeResult(False, f"connection to {host}:{h.http_port} "
                                              f"from the server failed: {exc.text}")
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    if not conn.alive:
                        raise TransportError(conn.label, "the SSH connection dropped "
                                                         "during the health check") from None
                    return ProbeResult(False, f"HTTP probe failed: {exc}")
                status = parse_http_status(raw)
                head = raw.split(b"\r\n", 1)[0].decode("utf-8", "replace")
                body = raw.split(b"\r\n\r\n", 1)[-1][:200].decode("utf-8", "replace")
                return ProbeResult(status in h.http_status,
                                   f"GET {h.http_path} -> {head or 'no response'} {body}")
            r = run(plan.argv("probe_fallback", new), check=False, timeout=timeout + 5)
            return ProbeResult(r.ok, r.output[-500:])
        return http

    def run_test(argv: list[str]) -> ProbeResult:
        r = run(argv, check=False, timeout=timeout + 5)
        return ProbeResult(r.ok, r.output[-500:] or f"exit status {r.status}")

    if h.kind == "cmd":
        argv = plan.argv("probe", new)
        return lambda state: run_test(argv)
    if h.kind == "uptime":  # staying up is the check (docker runs no HEALTHCHECK)
        return None
    # The image's own HEALTHCHECK: known only once the container exists. Without one
    # there is nothing to probe: the poller falls back to "stays up for min_uptime".
    first = s.d.inspect(conn, cid, run)
    if first is None or not first.healthcheck_test:
        return None
    test = [str(w) for w in cmd.probe(cid, list(first.healthcheck_test))]
    return lambda state: run_test(test)


def unhealthy_reason(run: Run, st: OnServer, v: Verdict) -> str:
    """Why the gate failed: its verdict, the last probe, the container's last log lines."""
    reason = f"health check failed: {v.reason}"
    if v.last_probe:
        reason += f"; last probe: {v.last_probe[-300:]!r}"
    try:
        r = run(st.plan.argv("logs", {cmd.NEW: st.new_id}), check=False, timeout=15)
        tail = r.output.strip()
        reason += f"; logs tail: {tail[-600:]!r}" if tail else "; logs: (empty)"
    except TransportError:
        pass
    return reason
