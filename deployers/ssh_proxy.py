"""The zero-downtime cutover over SSH: a second implementation of the per-server steps, through
the Caddy proxy each server runs (deployers.proxy says how its config is made).

Against the stop-start steps (deployers.ssh_docker) it changes what switch, verify, restore and
commit do, not the rollout:
- prepare: also makes sure the runner's network and the proxy run there (booting the proxy
  with every app's current routes when it is missing; a host port taken by something else
  fails here, before anything changes).
- switch: the new container starts beside the old one, on the runner's network with an alias of
  its own, publishing no port. A rollback to a release whose container is kept (stopped) starts
  that very container again instead.
- verify: the health gate on the new container, probed the way the proxy reaches it (GET
  proxy.health.path with the route's Host header, or the `healthcheck` / the image's
  HEALTHCHECK, and with none of these GET / answering below 500); then the route
  moves (atomically, in-flight requests finish); then `watch` seconds of probing, switching
  straight back on a failure; then the old container is stopped (drained).
- restore: the route goes back first (starting the old container again if it was drained), and
  only then is the new container removed.
- commit: the old container is kept, stopped, for an instant rollback (pruned with the history).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable

import paramiko

from deployers import commands as cmd
from deployers import lock as locks
from deployers.base import Restored, StepFailed, Switch
from deployers.health import (ContainerState, ProbeResult, explain_http, parse_http_answer,
                              wait_healthy)
from deployers.plan import kept_name
from deployers.proxy import (CONFIG_DIR, CONFIG_FILE, LABEL_ALIAS, LABEL_PROXY, PROXY_CONTAINER,
                             PROXY_RECIPE, Route, config_bytes, in_maintenance, live, moved,
                             published, route_for)
from deployers.remote_files import sweep
from deployers.spec import LABEL_RUN, identity_of, record_identity
from deployers.ssh_docker import SSHDockerDeployer, SSHDockerSteps, _check_name, _OnServer
from deployers.http_over_ssh import http_get
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

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
            run(cmd.remove(PROXY_CONTAINER), check=True)
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
                run(cmd.remove(PROXY_CONTAINER), check=False)
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
            run(cmd.start(PROXY_CONTAINER), check=True)
            did.append("proxy started again")
        self.wait_ready(conn)
        return ", ".join(did)

    def _free_ports_from_kept(self, conn: Connection, run: Callable, want: set[str]) -> None:
        """A kept copy of a release (the runner's own, stopped on purpose) that an engine
        restart brought back must not hold the proxy's ports: it is stopped again, for good."""
        ports = {p.split(":")[0] for p in want}
        ids = run([cmd.DOCKER, "container", "ls", "--quiet", "--no-trunc", "--filter",
                   "label=runner.app", "--filter", "name=_kept_"], check=False).stdout.split()
        for cid in ids:
            c = self.d.inspect(conn, cid, run)
            if c is not None and c.running and ports & {p.split(":")[0] for p in c.published}:
                self.d.log(f"{conn.label}: {c.name}, a kept copy, was started again by the "
                           f"engine and holds {', '.join(c.published)}: stopping it")
                run(cmd.set_restart(cid, "no"), check=False)
                run(cmd.stop(cid, 10), check=False, timeout=60)

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


class ProxySteps(SSHDockerSteps):
    """See the module docstring."""

    def __init__(self, d: SSHDockerDeployer):
        super().__init__(d)
        self.ops = ProxyOps(d)
        self.p = d.stage.proxy

    # ------------------------------------------------------------------ prepare

    def prepare(self, plan) -> Switch:
        sw = super().prepare(plan)
        conn, run, st = self._on(sw)
        with self._as_step(sw.server, touched=False), self._phase(sw.server, "proxy"):
            self._leave_stop_start(conn, run)
            did = self.ops.ensure(conn, run, plan.argv("proxy_boot",
                                                       {cmd.PROXY_DIR: self.d.runner_dir(conn)}),
                                  plan.argv("network"))
            if did:
                self.d.log(f"{sw.server}: {did}")
        with self._as_step(sw.server, touched=True):
            self._route_to_current(conn, run, st)
        return sw

    def _leave_stop_start(self, conn: Connection, run: Callable) -> None:
        """An app deployed with the stop-start cutover holds the host port the proxy wants:
        the first proxy deploy stops it (the one gap of the move; it is still restorable)."""
        if self.d.inspect(conn, PROXY_CONTAINER, run) is not None:
            return
        cur = self.d.inspect(conn, self.d.app, run)
        want = {p.split(":")[0] for p in published(self.p)}
        if cur is not None and cur.running and want & {p.split(":")[0] for p in cur.published}:
            self.d.log(f"{conn.label}: {self.d.app} publishes {', '.join(cur.published)} (a "
                       f"stop-start deploy); it stops now so that the proxy can take the port: "
                       f"a one-time gap while moving to the proxy")
            run(cmd.stop(cur.id, self.p.drain_timeout), check=True,
                timeout=self.p.drain_timeout + 30)

    def _route_to_current(self, conn: Connection, run: Callable, st: _OnServer) -> None:
        """After prepare's recovery, the route must serve the app's current container (an
        interrupted run may have left it on one that recovery removed)."""
        cur = self.d.inspect(conn, self.d.app, run)
        route = self.ops.routes(conn).get(self.d.app)
        alias = (cur.labels.get(LABEL_ALIAS) if cur else "") or ""
        if cur is None or not cur.running or not alias or (route and route.container == cur.id):
            return
        self.d.log(f"{conn.label}: the route of {self.d.app} did not point at its current "
                   f"container; moving it back there")
        self._route_to(conn, run, st, alias, cur.id, cur.labels.get("runner.digest", ""),
                       "route_back")

    # ------------------------------------------------------------------ switch

    def _already_running(self, conn: Connection, sw: Switch, st: _OnServer,
                         cur: ContainerState) -> bool:
        return super()._already_running(conn, sw, st, cur) and self._routed_to(conn, cur)

    def _start(self, conn: Connection, run: Callable, sw: Switch, st: _OnServer) -> str:
        """A rollback to a kept release starts that very container again; else a new one."""
        kept = self._kept_of(conn, run, sw)
        if kept is None:
            return super()._start(conn, run, sw, st)
        plan = st.plan
        run(plan.argv("reuse", {cmd.KEPT: kept.id}), check=True)
        st.reused = kept.name
        run(plan.argv("restart_reused"), check=True)
        run(plan.argv("start_reused"), check=True)
        self.d.log(f"{sw.server}: started the kept container of {sw.release.digest[:19]} "
                   f"again ({kept.name})")
        return kept.id

    def _kept_of(self, conn: Connection, run: Callable, sw: Switch) -> ContainerState | None:
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

    def _gate_probe(self, conn: Connection, run: Callable, st: _OnServer, cid: str
                    ) -> Callable[[ContainerState], ProbeResult]:
        return self._gate_check(conn, run, st, cid)[0]

    def _gate_check(self, conn: Connection, run: Callable, st: _OnServer, cid: str
                    ) -> tuple[Callable[[ContainerState], ProbeResult], str]:
        """The probe of the gate and what it checks: proxy.health, else the `healthcheck` (the
        pipeline's, or the image's HEALTHCHECK), else GET / the way the proxy reaches the app
        (an app behind the proxy must answer HTTP: one that answers nothing, or only on its own
        loopback, is not healthy; any answer below 500 passes)."""
        h = self.p.health
        if h is None:
            probe = self._probe(conn, run, st, cid)
            if probe is not None:
                return probe, _check_name(st.plan.release.spec.health)
            return (self._http_probe(conn, st, DEFAULT_PATH,
                                     st.plan.release.spec.health.probe_timeout,
                                     lambda s: s < 500),
                    self._default_check())
        return (self._http_probe(conn, st, h.path, min(h.interval * 4, 5),
                                 lambda s: 200 <= s < 300),
                f"proxy.health GET {h.path} on port {self.p.app_port}")

    def _default_check(self) -> str:
        return f"GET {DEFAULT_PATH} on port {self.p.app_port}, any answer below 500"

    def _http_probe(self, conn: Connection, st: _OnServer, path: str, timeout: float,
                    passes: Callable[[int], bool]) -> Callable[[ContainerState], ProbeResult]:
        """GET `path` on the container's app_port over the runner's network, with the route's
        Host header; healthy when `passes(status)`."""
        host = self.p.hosts[0] if self.p.hosts else st.plan.target.host

        def probe(state: ContainerState) -> ProbeResult:
            lease = self._leases.get(conn.label)
            if lease is not None and conn.label not in self._reclaimed:
                lease.check()
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

    def _gate_health(self, st: _OnServer):
        """The spec's HealthSpec with proxy.health's timeout and interval, when it is set."""
        health = st.plan.release.spec.health
        if self.p.health is not None:
            from dataclasses import replace
            health = replace(health, timeout=self.p.health.timeout,
                             probe_interval=self.p.health.interval)
        return health

    def _gate(self, conn: Connection, run: Callable, st: _OnServer, cid: str,
              probe: Callable[[ContainerState], ProbeResult] | None = None):
        probe = probe or self._gate_probe(conn, run, st, cid)
        return wait_healthy(inspect=lambda: self.d.inspect(conn, cid, run), probe=probe,
                            health=self._gate_health(st), cancel=self.d.cancel)

    def verify(self, sw: Switch) -> None:
        conn, run, st = self._on(sw)
        with self._as_step(sw.server, touched=True):
            with self._phase(sw.server, "health"):
                probe, check = self._gate_check(conn, run, st, st.new_id)
                if check == self._default_check():
                    self.d.log(f"{sw.server}: WARNING: no health check is set (no proxy.health, "
                               f"no healthcheck.http or .cmd, no HEALTHCHECK in the image): "
                               f"probing GET {DEFAULT_PATH} the way the proxy reaches the app; "
                               f"set proxy.health.path to a path that answers 200")
                self._announce(sw, check, self._gate_health(st).timeout)
                verdict = self._gate(conn, run, st, st.new_id, probe)
            if not verdict.healthy:
                raise StepFailed(sw.server, self._unhealthy_reason(run, st, verdict))
            new = self.d.inspect(conn, st.new_id, run)
            alias = (new.labels.get(LABEL_ALIAS) if new else "") or ""
            if not alias:
                raise StepFailed(sw.server, "the new container has no network alias")
            with self._phase(sw.server, "switch"):
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
            with self._phase(sw.server, "watch"):
                self._watch(conn, run, st)
            if st.prev_name and st.prev_was_running and not st.prev_stopped:
                with self._phase(sw.server, "drain"):
                    run(st.plan.argv("stop_previous"), check=True,
                        timeout=self.p.drain_timeout + 30)
                st.prev_stopped = True

    def _route_to(self, conn: Connection, run: Callable, st: _OnServer, alias: str,
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

    def _watch(self, conn: Connection, run: Callable, st: _OnServer) -> None:
        """Probe the new container for `watch` seconds after the switch; a failure raises
        (the rollout then restores: the route goes back first)."""
        probe = self._gate_probe(conn, run, st, st.new_id)
        interval = self.p.health.interval if self.p.health else st.plan.release.spec.health \
            .probe_interval
        deadline = time.monotonic() + self.p.watch
        while time.monotonic() < deadline:
            if self.d.cancel.is_set():
                from runner.errors import Cancelled
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

    def _restore_once(self, sw: Switch, conn: Connection, run: Callable) -> Restored:
        st: _OnServer = sw.detail
        plan = st.plan
        if st.routed:
            if st.prev_id:
                prev = self.d.inspect(conn, st.prev_id, run)
                alias = (prev.labels.get(LABEL_ALIAS) if prev else "") or ""
                if prev is None or not alias:
                    return Restored(False, kept=st.prev_name, note=(
                        "the previous container is gone or was never on the runner's network: "
                        "the route stays on the new container"))
                if not prev.running:
                    run(cmd.start(st.prev_id), check=True)
                    verdict = self._gate(conn, run, st, st.prev_id)
                    if not verdict.healthy:
                        return Restored(False, kept=st.prev_name, note=(
                            f"the previous container did not become healthy again: "
                            f"{verdict.reason}; the route stays on the new container"))
                    st.prev_stopped = False
                self._route_to(conn, run, st, alias, st.prev_id,
                               st.prev_labels.get("runner.digest", ""), "route_back")
            else:
                def drop(routes: dict[str, Route]) -> dict[str, Route]:
                    routes.pop(self.d.app, None)
                    return routes
                self.ops.load(conn, run, lambda f: plan.argv("route_back", {cmd.CONFIG: f}),
                              drop)
            st.routed = False
        if st.reused:
            # A kept container goes back to being kept (stopped), not removed.
            run(cmd.set_restart(st.new_id, "no"), check=False)
            run(cmd.stop(st.new_id, self.p.drain_timeout), check=False,
                timeout=self.p.drain_timeout + 30)
            if self.d.inspect(conn, st.reused, run) is None:
                run(cmd.rename(st.new_id, st.reused), check=False)
            st.new_id = ""
        return super()._restore_once(sw, conn, run)

    # ------------------------------------------------------------------ commit

    def _retire_previous(self, run: Callable, st: _OnServer, history: list[dict]) -> None:
        """Keep the previous container, stopped, for an instant rollback; prune kept ones
        that are no longer in the history."""
        app, conn = self.d.app, self._conn(st.plan.target)
        if st.prev_name:
            kept = kept_name(app, st.prev_labels.get(LABEL_RUN, "") or uuid.uuid4().hex[:8])
            if self.d.inspect(conn, kept, run) is not None:  # the same release kept before
                run(st.plan.argv("prune_kept", {cmd.KEPT: kept}), check=False)
            run(st.plan.argv("keep_previous", {cmd.KEPT: kept}), check=False)
            run(st.plan.argv("unrestart_kept", {cmd.KEPT: kept}), check=False)
        wanted = {record_identity(h) for h in history}
        for c in self.d.app_containers(conn, run):
            if c.name.startswith(f"{app}_kept_") and identity_of(c.labels) not in wanted:
                run(st.plan.argv("prune_kept", {cmd.KEPT: c.id}), check=False)


def route_status(d: SSHDockerDeployer, conn: Connection) -> Route | None:
    """The app's route on this server (what the proxy sends its traffic to), if any."""
    return ProxyOps(d).routes(conn).get(d.app)
