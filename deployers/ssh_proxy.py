"""The zero-downtime cutover over SSH: an implementation of the per-server steps
(deployers.base.ServerSteps) beside the stop-start one (deployers.stop_start), over the same
building blocks (deployers.server_session and the modules it names), through the Caddy proxy each
server runs (deployers.proxy says how its config is made).

- prepare: as the stop-start cutover's (deployers.server_prepare); it also makes sure the
  runner's network and the proxy run there (booting the proxy with every app's current routes
  when it is missing; a host port taken by something else fails here, before anything
  changes).
- switch: the new container starts beside the old one, on the runner's network with an alias of
  its own, publishing no port. A rollback to a release whose container is kept (stopped) starts
  that very container again instead.
- verify: the health gate on the new container, probed the way the proxy reaches it (GET
  proxy.health.path with the route's Host header, or the `healthcheck` / the image's
  HEALTHCHECK, and with none of these GET / answering below 500); then the route
  moves (atomically, in-flight requests finish); then `watch` seconds of probing, switching
  straight back on a failure; then the old container is stopped (drained).
- restore: the route goes back first (starting the old container again if it was drained), and
  only then is the new container removed (deployers.restore_plan decides).
- commit: the old container is kept, stopped, for an instant rollback (pruned with the history:
  deployers.pruning.kept_to_prune).

Every command that changes the server is one of the server's plan (deployers.plan), so
`--dry-run` shows it; the proxy container's own (deployers.plan.proxy_container_commands) too.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import paramiko

from runner.errors import Cancelled

from deployers import commands as cmd
from deployers import lock as locks
from deployers.base import Restored, ServerPlan, StepFailed, Switch
from deployers.commands import bind
from deployers.container_switch import already_running, start_new, switch_server
from deployers.health import (ContainerState, ProbeResult, Verdict, explain_http,
                              parse_http_answer, wait_healthy)
from deployers.health_probe import Probe, announce, check_name, probe_for, unhealthy_reason
from deployers.http_over_ssh import http_get
from deployers.plan import RUNNING, STRAY, kept_name, proxy_container_commands
from deployers.previous_container import put_back_previous
from deployers.proxy import (CONFIG_DIR, CONFIG_FILE, LABEL_ALIAS, LABEL_PROXY, PROXY_CONTAINER,
                             PROXY_RECIPE, Route, config_bytes, in_maintenance, live, moved,
                             published, route_for)
from deployers.pruning import holding_ports, kept_to_prune
from deployers.remote_files import sweep
from deployers.restore_plan import route_back, unreuse
from deployers.server_commit import commit_release
from deployers.server_prepare import prepare_server
from deployers.server_session import OnServer, Run, SessionSteps, run_actions
from deployers.spec import LABEL_DIGEST, LABEL_RUN, HealthSpec, identity_of, record_identity
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

if TYPE_CHECKING:
    from deployers.ssh_docker import SSHDockerDeployer

PROXY_LOCK = "_proxy"  # the lock over the shared proxy config (no app name starts with "_")
LOCK_TTL, LOCK_WAIT = 30, 60  # seconds: the proxy lock's lease, and how long to wait for it
_TAKEN = ("port is already allocated", "address already in use", "bind for")
DEFAULT_PATH = "/"  # the gate of an app behind the proxy when nothing else is set


class ProxyOps:
    """The proxy of one server: boot it, read and switch routes. Used by the steps and by
    `runner proxy`. Every change of the config holds the server's proxy lock."""

    def __init__(self, d: SSHDockerDeployer):
        self.d = d
        self.proxy = d.stage.proxy
        # The proxy container's commands, as every proxy deploy's plan shows them.
        # None: an app without the proxy cutover (`runner app remove` still drops a route).
        self.commands = {c.key: c for c in proxy_container_commands(self.proxy)} \
            if self.proxy is not None else {}

    def argv(self, key: str, values: dict | None = None) -> list[str]:
        """The planned argv `key` (deployers.plan.proxy_container_commands), slots filled in."""
        return bind(self.commands[key].argv, values or {})

    def lock(self, conn: Connection, cancel: threading.Event | None = None) -> locks.Lease:
        """The server's proxy lock, waiting up to LOCK_WAIT seconds for another holder; held
        over every change of the proxy's config or of its container. cancel None: a wait
        Ctrl-C does not cut short."""
        holder = locks.holder_info(self.d.run_id, self.d.pipeline, ttl=LOCK_TTL)
        return locks.acquire(conn, self.d.lock_dir(conn), PROXY_LOCK, holder, ttl=LOCK_TTL,
                             wait=LOCK_WAIT, cancel=cancel, log=self.d.log)

    def dir(self, conn: Connection) -> str:
        return f"{self.d.runner_dir(conn)}/proxy"

    def routes(self, conn: Connection) -> dict[str, Route]:
        """Every app's route on this server, from the runner's route files."""
        directory = f"{self.dir(conn)}/routes"

        def read(sftp):
            out = {}
            try:
                names = sftp.listdir(directory)
            except FileNotFoundError:
                return out
            for n in names:
                if not n.endswith(".json"):
                    continue
                try:
                    with sftp.open(f"{directory}/{n}", "r") as f:
                        r = Route.from_dict(json.loads(f.read().decode()))
                    out[r.app] = r
                except (OSError, ValueError, KeyError):
                    continue
            return out
        return conn.sftp_do(read)

    def _write(self, conn: Connection, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"

        def op(sftp):
            with sftp.open(tmp, "w") as f:
                f.write(data)
            sftp.posix_rename(tmp, path)
        conn.sftp_do(op)

    def load(self, conn: Connection, run: Callable,
             argv_for: Callable[[str], list[str]] | None,
             change: Callable[[dict[str, Route]], dict[str, Route]]) -> dict[str, Route]:
        """Apply `change` to the routes and load the result into the proxy, atomically; the
        route files and config.json are written only once the proxy took it. argv_for None:
        no proxy runs there to load it; only the files change (what a proxy starts with)."""
        root = self.dir(conn)
        conn.ensure_private_dir(f"{root}/routes")
        lease = self.lock(conn)
        try:
            before = self.routes(conn)
            after = change(dict(before))
            name = f"config.next-{uuid.uuid4().hex[:8]}.json"
            self._write(conn, f"{root}/{name}", config_bytes(list(after.values())))
            try:
                r = run(argv_for(f"{CONFIG_DIR}/{name}"), check=False, timeout=60) \
                    if argv_for is not None else None
                if r is not None and not r.ok:
                    tail = " ".join(r.output.splitlines()[-3:])
                    raise StepFailed(conn.label, f"the proxy on {conn.label} did not take the "
                                                 f"new route: {tail}")
                conn.sftp_do(lambda sftp: sftp.posix_rename(f"{root}/{name}",
                                                            f"{root}/{CONFIG_FILE}"))
            finally:
                conn.sftp_do(lambda sftp: sweep(sftp, root, r"config\.next-.*"))
            for app in set(before) | set(after):
                path = f"{root}/routes/{app}.json"
                if app in after and after[app] != before.get(app):
                    self._write(conn, path, json.dumps(after[app].to_dict()).encode())
                elif app not in after:
                    conn.remove_file(path)
            return after
        finally:
            lease.release()

    def drop(self, conn: Connection, run: Callable, app: str) -> Route | None:
        """Take `app`'s route away on this server (`runner app remove`): the proxy then answers
        its own 404 for the app's hosts instead of sending requests to a container that is
        about to go. Returns the route there was, if any."""
        route = self.routes(conn).get(app)
        if route is None:
            return None

        def without(routes: dict[str, Route]) -> dict[str, Route]:
            routes.pop(app, None)
            return routes
        proxy = self.d.inspect(conn, PROXY_CONTAINER, run)
        self.load(conn, run, cmd.proxy_reload if proxy is not None and proxy.running else None,
                  without)
        return route

    def set_maintenance(self, conn: Connection, run: Callable, app: str,
                        message: str | None) -> tuple[Route | None, bool]:
        """`runner app maintenance` (message: the page's text) or `runner app live` (None):
        `app`'s route on this server switched to the 503 page, or back to its upstream; no
        container is touched. Returns (the route as it is now, None when the app has no route
        here; whether a proxy runs here to serve it; without one only the files change, what
        the proxy serves once it starts)."""
        proxy = self.d.inspect(conn, PROXY_CONTAINER, run)
        running = proxy is not None and proxy.running
        now: dict[str, Route | None] = {}

        def change(routes: dict[str, Route]) -> dict[str, Route]:
            r = routes.get(app)
            if r is not None:
                routes[app] = in_maintenance(r, message) if message is not None else live(r)
            now["route"] = routes.get(app)
            return routes
        self.load(conn, run, cmd.proxy_reload if running else None, change)
        return now.get("route"), running

    def ensure(self, conn: Connection, run: Callable, boot_argv: list[str],
               network_argv: list[str]) -> str:
        """The runner's network and a running proxy publishing this pipeline's ports. Returns
        what it did ("" when both were there)."""
        did = []
        if not run(cmd.network_inspect(), check=False).ok:
            r = run(network_argv, check=False)
            if not r.ok and "already exists" not in r.output:
                raise StepFailed(conn.label, f"cannot create the runner's network: "
                                             f"{r.output[-300:]}", touched=False)
            did.append("network created")
        st = self.d.inspect(conn, PROXY_CONTAINER, run)
        if st is not None and st.labels.get(LABEL_PROXY) != PROXY_RECIPE:
            self.d.log(f"{conn.label}: the proxy was made by an older runner (recipe "
                       f"{st.labels.get(LABEL_PROXY, '?')}, now {PROXY_RECIPE}): replacing it, "
                       f"a short gap this once")
            run(self.argv("proxy_replace"), check=True)
            did.append("outdated proxy removed")
            st = None
        want = set(published(self.proxy))
        if st is not None and not want <= set(st.published):
            raise StepFailed(conn.label, (
                f"the proxy on {conn.label} publishes {', '.join(st.published) or 'nothing'}, "
                f"this pipeline wants {', '.join(sorted(want))} (proxy.http_port/https_port); "
                f"`runner proxy reboot` replaces it (traffic stops for a moment)"), touched=False)
        if st is None:
            self._free_ports_from_kept(conn, run, want)
            root = self.dir(conn)
            conn.ensure_private_dir(f"{root}/routes")
            # What it serves from its first second: every app's route as last loaded.
            self._write(conn, f"{root}/{CONFIG_FILE}",
                        config_bytes(list(self.routes(conn).values())))
            r = run(boot_argv, check=False, timeout=120)
            if not r.ok:
                run(self.argv("proxy_boot_undo"), check=False)
                tail = " ".join(r.output.splitlines()[-3:])
                if any(t in tail.lower() for t in _TAKEN):
                    raise StepFailed(conn.label, (
                        f"the proxy cannot publish {', '.join(sorted(want))} on {conn.label}: "
                        f"a port is taken by something else ({tail}); free it or set "
                        f"proxy.http_port"), touched=False)
                raise StepFailed(conn.label, f"starting the proxy failed: {tail}",
                                 touched=False)
            did.append(f"proxy started ({self.proxy.image})")
        elif not st.running:
            self._free_ports_from_kept(conn, run, want)
            run(self.argv("proxy_start"), check=True)
            did.append("proxy started again")
        self.wait_ready(conn)
        return ", ".join(did)

    def _free_ports_from_kept(self, conn: Connection, run: Callable, want: set[str]) -> None:
        """A kept copy of a release (the runner's own, stopped on purpose) that an engine
        restart brought back must not hold the proxy's ports: it is stopped again, for good."""
        ids = run(cmd.list_kept_running(), check=False).stdout.split()
        found = [c for c in (self.d.inspect(conn, cid, run) for cid in ids) if c is not None]
        for c in holding_ports(want, found):
            self.d.log(f"{conn.label}: {c.name}, a kept copy, was started again by the "
                       f"engine and holds {', '.join(c.published)}: stopping it")
            run(self.argv("stray_kept_unrestart", {STRAY: c.id}), check=False)
            run(self.argv("stray_kept_stop", {STRAY: c.id}), check=False, timeout=60)

    def wait_ready(self, conn: Connection, timeout: float = 20) -> None:
        """Until the proxy answers HTTP on the server (any answer will do)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                raw = http_get(conn, "127.0.0.1", self.proxy.http_port, "/", 2,
                               host_header="runner-proxy.invalid")
                if raw.startswith(b"HTTP/"):
                    return
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise StepFailed(conn.label, f"the proxy on {conn.label} does not answer on port "
                                     f"{self.proxy.http_port} ({last or 'no answer'})",
                         touched=False)

    def through(self, conn: Connection, path: str, host: str, timeout: float = 5) -> bytes:
        """GET path with Host `host` through the proxy, from the server itself."""
        return http_get(conn, "127.0.0.1", self.proxy.http_port, path, timeout,
                        host_header=host)


class ProxySteps(SessionSteps):
    """See the module docstring."""

    def __init__(self, d: SSHDockerDeployer):
        super().__init__(d)
        self.ops = ProxyOps(d)
        self.p = d.stage.proxy

    # ------------------------------------------------------------------ prepare

    def prepare(self, plan: ServerPlan) -> Switch:
        s = self.s
        sw = prepare_server(s, plan)
        conn, run, st = s.on(sw)
        with s.as_step(sw.server, touched=False), s.phase(sw.server, "proxy"):
            self._leave_stop_start(conn, run, st)
            did = self.ops.ensure(conn, run, plan.argv("proxy_boot",
                                                       {cmd.PROXY_DIR: self.d.runner_dir(conn)}),
                                  plan.argv("network"))
            if did:
                self.d.log(f"{sw.server}: {did}")
        with s.as_step(sw.server, touched=True):
            self._route_to_current(conn, run, st)
        return sw

    def _leave_stop_start(self, conn: Connection, run: Run, st: OnServer) -> None:
        """An app deployed with the stop-start cutover holds the host port the proxy wants:
        the first proxy deploy stops it (the one gap of the move; it is still restorable)."""
        if self.d.inspect(conn, PROXY_CONTAINER, run) is not None:
            return
        cur = self.d.inspect(conn, self.d.app, run)
        if cur is not None and holding_ports(published(self.p), [cur]):
            self.d.log(f"{conn.label}: {self.d.app} publishes {', '.join(cur.published)} (a "
                       f"stop-start deploy); it stops now so that the proxy can take the port: "
                       f"a one-time gap while moving to the proxy")
            run(st.plan.argv("leave_stop_start", {RUNNING: cur.id}), check=True,
                timeout=self.p.drain_timeout + 30)

    def _route_to_current(self, conn: Connection, run: Run, st: OnServer) -> None:
        """After prepare's recovery, the route must serve the app's current container (an
        interrupted run may have left it on one that recovery removed)."""
        cur = self.d.inspect(conn, self.d.app, run)
        route = self.ops.routes(conn).get(self.d.app)
        alias = (cur.labels.get(LABEL_ALIAS) if cur else "") or ""
        if cur is None or not cur.running or not alias or (route and route.container == cur.id):
            return
        self.d.log(f"{conn.label}: the route of {self.d.app} did not point at its current "
                   f"container; moving it back there")
        self._route_to(conn, run, st, alias, cur.id, cur.labels.get(LABEL_DIGEST, ""),
                       "route_back")

    # ------------------------------------------------------------------ switch

    def switch(self, sw: Switch) -> None:
        switch_server(self.s, sw,
                      unchanged=lambda conn, st, cur: already_running(st, sw, cur)
                      and self._routed_to(conn, cur),
                      start=lambda conn, run, st: self._start(conn, run, sw, st))

    def _start(self, conn: Connection, run: Run, sw: Switch, st: OnServer) -> str:
        """A rollback to a kept release starts that very container again; else a new one."""
        kept = self._kept_of(conn, run, sw)
        if kept is None:
            return start_new(self.s, conn, run, sw, st)
        plan = st.plan
        run(plan.argv("reuse", {cmd.KEPT: kept.id}), check=True)
        st.reused = kept.name
        run(plan.argv("restart_reused"), check=True)
        run(plan.argv("start_reused"), check=True)
        self.d.log(f"{sw.server}: started the kept container of {sw.release.digest[:19]} "
                   f"again ({kept.name})")
        return kept.id

    def _kept_of(self, conn: Connection, run: Run, sw: Switch) -> ContainerState | None:
        """A kept, stopped container that is exactly this release (secret values included)."""
        for c in self.d.app_containers(conn, run):
            if c.name.startswith(f"{self.d.app}_kept_") and not c.running \
                    and identity_of(c.labels) == sw.release.identity:
                return c
        return None

    def _routed_to(self, conn: Connection, c: ContainerState) -> bool:
        r = self.ops.routes(conn).get(self.d.app)
        return r is not None and r.container == c.id

    # ------------------------------------------------------------------ verify

    def _gate_probe(self, conn: Connection, run: Run, st: OnServer, cid: str) -> Probe:
        return self._gate_check(conn, run, st, cid)[0]

    def _gate_check(self, conn: Connection, run: Run, st: OnServer, cid: str
                    ) -> tuple[Probe, str]:
        """The probe of the gate and what it checks: proxy.health, else the `healthcheck` (the
        pipeline's, or the image's HEALTHCHECK), else GET / the way the proxy reaches the app
        (an app behind the proxy must answer HTTP: one that answers nothing, or only on its own
        loopback, is not healthy; any answer below 500 passes)."""
        h = self.p.health
        if h is None:
            probe = probe_for(self.s, conn, run, st, cid)
            if probe is not None:
                return probe, check_name(st.plan.release.spec.health)
            return (self._http_probe(conn, st, DEFAULT_PATH,
                                     st.plan.release.spec.health.probe_timeout,
                                     lambda s: s < 500),
                    self._default_check())
        return (self._http_probe(conn, st, h.path, min(h.interval * 4, 5),
                                 lambda s: 200 <= s < 300),
                f"proxy.health GET {h.path} on port {self.p.app_port}")

    def _default_check(self) -> str:
        return f"GET {DEFAULT_PATH} on port {self.p.app_port}, any answer below 500"

    def _http_probe(self, conn: Connection, st: OnServer, path: str, timeout: float,
                    passes: Callable[[int], bool]) -> Probe:
        """GET `path` on the container's app_port over the runner's network, with the route's
        Host header; healthy when `passes(status)`."""
        host = self.p.hosts[0] if self.p.hosts else st.plan.target.host

        def probe(state: ContainerState) -> ProbeResult:
            self.s.check_lease(conn.label)
            if not state.ip:
                return ProbeResult(False, "the container has no address on the runner's "
                                          "network yet")
            try:
                raw = http_get(conn, state.ip, self.p.app_port, path, timeout,
                               host_header=host)
            except paramiko.ChannelException as exc:
                return ProbeResult(False, explain_http(path, host, self.p.app_port, None,
                                                       f"{exc.text} (code {exc.code})"))
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if not conn.alive:
                    raise TransportError(conn.label, "the SSH connection dropped during the "
                                                     "health check") from None
                return ProbeResult(False, explain_http(path, host, self.p.app_port, None,
                                                       str(exc) or type(exc).__name__))
            answer = parse_http_answer(raw)
            ok = answer.status is not None and passes(answer.status)
            return ProbeResult(ok, explain_http(path, host, self.p.app_port, answer))
        return probe

    def _gate_health(self, st: OnServer) -> HealthSpec:
        """The spec's HealthSpec with proxy.health's timeout and interval, when it is set."""
        health = st.plan.release.spec.health
        if self.p.health is not None:
            health = replace(health, timeout=self.p.health.timeout,
                             probe_interval=self.p.health.interval)
        return health

    def _gate(self, conn: Connection, run: Run, st: OnServer, cid: str,
              probe: Probe | None = None) -> Verdict:
        probe = probe or self._gate_probe(conn, run, st, cid)
        return wait_healthy(inspect=lambda: self.d.inspect(conn, cid, run), probe=probe,
                            health=self._gate_health(st), cancel=self.d.cancel)

    def verify(self, sw: Switch) -> None:
        s = self.s
        conn, run, st = s.on(sw)
        with s.as_step(sw.server, touched=True):
            with s.phase(sw.server, "health"):
                probe, check = self._gate_check(conn, run, st, st.new_id)
                if check == self._default_check():
                    self.d.log(f"{sw.server}: WARNING: no health check is set (no proxy.health, "
                               f"no healthcheck.http or .cmd, no HEALTHCHECK in the image): "
                               f"probing GET {DEFAULT_PATH} the way the proxy reaches the app; "
                               f"set proxy.health.path to a path that answers 200")
                announce(s, sw, check, self._gate_health(st).timeout)
                verdict = self._gate(conn, run, st, st.new_id, probe)
            if not verdict.healthy:
                raise StepFailed(sw.server, unhealthy_reason(run, st, verdict))
            new = self.d.inspect(conn, st.new_id, run)
            alias = (new.labels.get(LABEL_ALIAS) if new else "") or ""
            if not alias:
                raise StepFailed(sw.server, "the new container has no network alias")
            with s.phase(sw.server, "switch"):
                down = self._route_to(conn, run, st, alias, st.new_id, sw.release.digest,
                                      "route").maintenance
                st.routed = True
                if not down:  # in maintenance the proxy answers the 503 page: nothing to check
                    self._through_proxy(conn, sw)
            if down:
                self.d.log(f"{sw.server}: {self.d.app} is in maintenance (runner app "
                           f"maintenance): it stays on; the route now leads to "
                           f"{sw.release.digest[:19]} behind the 503 page, served once "
                           f"`runner app live` opens it; watching it for {self.p.watch:g}s")
            else:
                self.d.log(f"{sw.server}: traffic moved to {sw.release.digest[:19]}; watching "
                           f"it for {self.p.watch:g}s")
            with s.phase(sw.server, "watch"):
                self._watch(conn, run, st)
            if st.prev_name and st.prev_was_running and not st.prev_stopped:
                with s.phase(sw.server, "drain"):
                    run(st.plan.argv("stop_previous"), check=True,
                        timeout=self.p.drain_timeout + 30)
                st.prev_stopped = True

    def _route_to(self, conn: Connection, run: Run, st: OnServer, alias: str,
                  container: str, digest: str, key: str) -> Route:
        """The app's route to this container (in maintenance still, if it was); as loaded."""
        route = route_for(self.d.app, self.p, alias, digest, container)

        def change(routes: dict[str, Route]) -> dict[str, Route]:
            routes[self.d.app] = moved(route, routes.get(self.d.app))
            return routes
        return self.ops.load(conn, run, lambda f: st.plan.argv(key, {cmd.CONFIG: f}),
                             change)[self.d.app]

    def _through_proxy(self, conn: Connection, sw: Switch) -> None:
        """One request through the proxy, as a client would send it: the route must reach
        the new container (no 502/503/504 from the proxy, not the proxy's own 404)."""
        host = self.p.hosts[0] if self.p.hosts else sw.server
        path = self.p.health.path if self.p.health and \
            self.p.health.path.startswith(self.p.path_prefix) else self.p.path_prefix
        try:
            answer = parse_http_answer(self.ops.through(conn, path, host))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise StepFailed(sw.server, f"the proxy on {sw.server} did not answer after the "
                                        f"switch: {exc}") from None
        if answer.status in (502, 503, 504) or "no app is routed" in answer.body:
            raise StepFailed(sw.server, f"through the proxy, GET {path} (Host: {host}) got "
                                        f"{answer.status_line} {answer.body}: the route does "
                                        f"not reach the new container")

    def _watch(self, conn: Connection, run: Run, st: OnServer) -> None:
        """Probe the new container for `watch` seconds after the switch; a failure raises
        (the rollout then restores: the route goes back first)."""
        probe = self._gate_probe(conn, run, st, st.new_id)
        interval = self.p.health.interval if self.p.health else st.plan.release.spec.health \
            .probe_interval
        deadline = time.monotonic() + self.p.watch
        while time.monotonic() < deadline:
            if self.d.cancel.is_set():
                raise Cancelled("cancelled while watching the new container")
            state = self.d.inspect(conn, st.new_id, run)
            if state is None or not state.running or state.restart_count > 0 \
                    or state.health == "unhealthy":
                what = ("gone" if state is None else "unhealthy" if state.health == "unhealthy"
                        else f"exited with code {state.exit_code}" if not state.running
                        else "restarted by docker")
                raise StepFailed(conn.label, f"the new container failed within the watch window "
                                             f"({self.p.watch:g}s after the switch): {what}")
            if probe is not None:
                r = probe(state)
                if not r.ok:
                    raise StepFailed(conn.label, f"the new container failed within the watch "
                                                 f"window ({self.p.watch:g}s after the switch): "
                                                 f"{r.output}")
            time.sleep(interval)

    # ------------------------------------------------------------------ restore

    def restore(self, sw: Switch) -> Restored:
        return self.s.restore(sw, self._restore_once)

    def _restore_once(self, sw: Switch, conn: Connection, run: Run) -> Restored:
        """The route goes back first (starting the drained previous container and gating it),
        then a reused kept container is kept again, then the previous container is put back
        like the stop-start cutover does (deployers.previous_container)."""
        st: OnServer = sw.detail
        plan = st.plan
        if st.routed:
            prev = self.d.inspect(conn, st.prev_id, run) if st.prev_id else None
            back = route_back(st.prev_id, prev, LABEL_ALIAS)
            if back.kind == "gone":
                return Restored(False, kept=st.prev_name, note=(
                    "the previous container is gone or was never on the runner's network: "
                    "the route stays on the new container"))
            if back.kind == "start":
                run(plan.argv("start_drained", {cmd.PREVIOUS: st.prev_id}), check=True)
                verdict = self._gate(conn, run, st, st.prev_id)
                if not verdict.healthy:
                    return Restored(False, kept=st.prev_name, note=(
                        f"the previous container did not become healthy again: "
                        f"{verdict.reason}; the route stays on the new container"))
                st.prev_stopped = False
            if back.kind == "drop":
                def drop(routes: dict[str, Route]) -> dict[str, Route]:
                    routes.pop(self.d.app, None)
                    return routes
                self.ops.load(conn, run, lambda f: plan.argv("route_back", {cmd.CONFIG: f}),
                              drop)
            else:
                self._route_to(conn, run, st, back.alias, st.prev_id,
                               st.prev_labels.get(LABEL_DIGEST, ""), "route_back")
            st.routed = False
        if st.reused:
            # A kept container goes back to being kept (stopped), not removed.
            run_actions(run, plan, unreuse(st.new_id, st.reused,
                                           self.d.inspect(conn, st.reused, run) is None,
                                           self.p.drain_timeout))
            st.new_id = ""
        return put_back_previous(self.s, sw, conn, run)

    # ------------------------------------------------------------------ commit

    def commit(self, sw: Switch) -> None:
        commit_release(self.s, sw, self._retire)

    def _retire(self, conn: Connection, run: Run, st: OnServer, history: list[dict]) -> None:
        """Keep the previous container, stopped, for an instant rollback; prune kept ones
        that are no longer in the history."""
        app = self.d.app
        if st.prev_name:
            kept = kept_name(app, st.prev_labels.get(LABEL_RUN, "") or uuid.uuid4().hex[:8])
            if self.d.inspect(conn, kept, run) is not None:  # the same release kept before
                run(st.plan.argv("prune_kept", {cmd.KEPT: kept}), check=False)
            run(st.plan.argv("keep_previous", {cmd.KEPT: kept}), check=False)
            run(st.plan.argv("unrestart_kept", {cmd.KEPT: kept}), check=False)
        for cid in kept_to_prune(app, self.d.app_containers(conn, run),
                                 {record_identity(h) for h in history}):
            run(st.plan.argv("prune_kept", {cmd.KEPT: cid}), check=False)


def route_status(d: SSHDockerDeployer, conn: Connection) -> Route | None:
    """The app's route on this server (what the proxy sends its traffic to), if any."""
    return ProxyOps(d).routes(conn).get(d.app)
