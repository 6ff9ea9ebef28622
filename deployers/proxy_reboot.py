"""Booting and replacing the proxy container of the zero-downtime cutover (deployers.ssh_proxy) on
one server: what `runner proxy boot` and `runner proxy reboot` do there, under the server's proxy
lock, with the plan's own `proxy_boot` and `network` argv.

- boot: the runner's docker network and a running proxy (ProxyOps.ensure), after removing the old
  proxy an interrupted reboot left aside.
- reboot: the network made and the new image pulled while the old proxy still serves; then the
  old container is set aside and stopped, the new one booted, and the old one removed once the
  new one answers. If the new one does not come up, the old one is put back (started again if it
  ran). From the stop on, Ctrl-C does not cut it short: a server is never left without a proxy.
  The time traffic was down (from the stop of the old proxy to the first HTTP answer of the new
  one, polled from the server) is measured.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko

from runner.errors import Cancelled

from deployers import commands as cmd
from deployers.base import DeployPlan, StepFailed
from deployers.http_over_ssh import http_get
from deployers.proxy import PROXY_CONTAINER, published
from deployers.spec import Target
from deployers.ssh_connection import Connection
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_errors import TransportError
from deployers.ssh_proxy import ProxyOps

ASIDE = f"{PROXY_CONTAINER}-replaced"  # the old proxy during a reboot, until the new one answers
PROBE_HOST = "runner-proxy.invalid"  # any HTTP answer will do (the proxy's own 404 is one)
STOP_TIMEOUT = 5  # seconds Caddy gets to finish in-flight requests when it is replaced
# What a failing docker command or a dropped connection raises while the proxy is replaced.
_FAULTS = (StepFailed, TransportError, OSError, EOFError, paramiko.SSHException)


@dataclass
class ProxyChange:
    """What boot or reboot did on one server, filled in as it goes: a failure keeps what was
    done before it (a note, how long traffic was down)."""

    did: str = ""
    notes: list[str] = field(default_factory=list)
    down: float | None = None  # reboot: seconds without an answer; None when not measured


def image_note(want: str, image: str) -> str:
    """What to say when the proxy runs another image than the pipeline's proxy.image ("" when it
    runs that one). Pure."""
    return "" if image == want else (f"it runs {image or '?'}, this pipeline says {want}: "
                                     f"`runner proxy reboot` replaces it")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (StepFailed, TransportError)):
        return exc.reason
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _runner(conn: Connection, cancel: threading.Event | None) -> Callable:
    """conn.run in the shape ProxyOps takes; cancel None: not cut short by Ctrl-C."""
    def run(argv, *, check: bool = False, stdin: bytes | None = None,
            timeout: float | None = None):
        return conn.run(argv, stdin=stdin, check=check, timeout=timeout, cancel=cancel)
    return run


def _no_restart(name: str, policy: str = "no") -> list[str]:
    return [cmd.DOCKER, "container", "update", "--restart", policy, name]


class _FirstAnswer(threading.Thread):
    """Polls the proxy's HTTP port from the server until it answers; `at` is when."""

    def __init__(self, conn: Connection, port: int):
        super().__init__(daemon=True, name=f"proxy-answer-{conn.label}")
        self.conn, self.port = conn, port
        self.at: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                raw = http_get(self.conn, "127.0.0.1", self.port, "/", 2,
                               host_header=PROBE_HOST)
                if raw.startswith(b"HTTP/"):
                    self.at = time.monotonic()
                    return
            except (OSError, EOFError, paramiko.SSHException, TransportError):
                if not self.conn.alive:
                    return
            self.halt.wait(0.02)


class ProxyContainer:
    """The proxy container on the servers of a deployer whose stage has a `proxy:` section."""

    def __init__(self, d: SSHDockerDeployer):
        self.d = d
        self.ops = ProxyOps(d)
        self.plan: DeployPlan = d.plan()

    def _stopped(self) -> None:
        if self.d.cancel.is_set():
            raise Cancelled("interrupted")

    def _planned(self, conn: Connection, t: Target) -> tuple[list[str], list[str]]:
        """The plan's own `proxy_boot` and `network` argv for this server."""
        sp = self.plan.server(t.label)
        boot = sp.argv("proxy_boot", {cmd.PROXY_DIR: self.d.runner_dir(conn)})
        return boot, sp.argv("network")

    def boot(self, t: Target, change: ProxyChange) -> None:
        """The runner's network and a running proxy on this server, serving every app's routes
        (a running proxy is left alone); raises StepFailed or TransportError saying why not."""
        d, ops = self.d, self.ops
        self._stopped()
        conn = d.connection(t)
        boot, network = self._planned(conn, t)
        run = _runner(conn, d.cancel)
        lease = ops.lock(conn, d.cancel)
        try:
            if d.inspect(conn, ASIDE, run) is not None:  # what an interrupted reboot left
                run(cmd.remove(ASIDE), check=True)
                change.notes.append(f"removed {ASIDE}, the old proxy an interrupted reboot left")
            did = ops.ensure(conn, run, boot, network)
        finally:
            lease.release()
        st = d.inspect(conn, PROXY_CONTAINER, run)
        n = len(ops.routes(conn))
        change.did = f"{did or 'already running'}; serving {n} route{'' if n == 1 else 's'}"
        note = image_note(d.stage.proxy.image, st.image if st else "")
        if note:
            change.notes.append(note)

    def reboot(self, t: Target, change: ProxyChange) -> None:
        """Replace the proxy container on this server (see the module docstring); raises
        StepFailed saying why not and what became of the old proxy."""
        d, ops = self.d, self.ops
        self._stopped()
        p = d.stage.proxy
        conn = d.connection(t)
        boot, network = self._planned(conn, t)
        run = _runner(conn, d.cancel)
        lease = ops.lock(conn, d.cancel)
        try:
            # Everything that can be done while the old proxy still serves: the network, the
            # new image, no leftover of an interrupted reboot.
            if not run(cmd.network_inspect()).ok:
                r = run(network)
                if not r.ok and "already exists" not in r.output:
                    raise StepFailed(t.label, f"cannot create the runner's network: "
                                              f"{r.output[-300:]}")
            if not run(cmd.image_present(p.image)).ok:
                d.log(f"{t.label}: pulling {p.image}")
                r = run(cmd.pull(p.image), timeout=600)
                if not r.ok:
                    raise StepFailed(t.label, f"cannot pull the proxy image {p.image}: "
                                              f"{' '.join(r.output.splitlines()[-3:])}; the old "
                                              f"proxy was not touched")
            if d.inspect(conn, ASIDE, run) is not None:
                run(cmd.remove(ASIDE), check=True)
            old = d.inspect(conn, PROXY_CONTAINER, run)
            if old is None:
                did = ops.ensure(conn, run, boot, network)
                change.did = f"no proxy was there: {did}"
                return
            self._stopped()
            # From here on Ctrl-C does not cut it short: a server is never left without a proxy.
            safe = _runner(conn, None)
            safe(cmd.rename(PROXY_CONTAINER, ASIDE), check=True)
            poll = _FirstAnswer(conn, p.http_port)
            t0, stopped = time.monotonic(), False
            try:
                safe(_no_restart(ASIDE), check=True)
                t0 = time.monotonic()
                if old.running:
                    safe(cmd.stop(ASIDE, STOP_TIMEOUT), check=True, timeout=STOP_TIMEOUT + 60)
                    stopped = True
                    d.log(f"{t.label}: the old proxy stopped ({time.monotonic() - t0:.2f}s)")
                    poll.start()
                ops.ensure(conn, safe, boot, network)
            except _FAULTS as exc:
                poll.halt.set()
                back = self._put_back(conn, old.running)
                if stopped:
                    change.down = time.monotonic() - t0
                raise StepFailed(t.label, f"{_reason(exc)}; {back}") from None
            ready = time.monotonic()
            if old.running:
                poll.join(5)
                poll.halt.set()
                change.down = (poll.at or ready) - t0
            safe(cmd.remove(ASIDE), check=False)
            st = d.inspect(conn, PROXY_CONTAINER, safe)
            n = len(ops.routes(conn))
            change.did = (f"replaced the proxy ({old.image} -> {st.image if st else p.image}, "
                          f"publishes {', '.join(st.published if st else published(p))}); "
                          f"serving {n} route{'' if n == 1 else 's'}")
            if not old.running:
                change.notes.append(f"the old proxy was not running ({old.status}): traffic "
                                    f"was down before")
        finally:
            lease.release()

    def _put_back(self, conn: Connection, was_running: bool) -> str:
        """The new proxy did not come up: the old one back in its place."""
        safe = _runner(conn, None)
        try:
            safe(cmd.remove(PROXY_CONTAINER), check=False)
            safe(cmd.rename(ASIDE, PROXY_CONTAINER), check=True)
            safe(_no_restart(PROXY_CONTAINER, "always"), check=True)
            if not was_running:
                return "the old proxy is back in place (stopped, as it was)"
            safe(cmd.start(PROXY_CONTAINER), check=True)
            self.ops.wait_ready(conn)
            return "the old proxy runs again"
        except _FAULTS as exc:
            return (f"the old proxy could not be put back ({_reason(exc)}): it is kept as "
                    f"{ASIDE}; `runner proxy boot` starts a new one")
