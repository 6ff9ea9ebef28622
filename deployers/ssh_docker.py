"""The SSH + Docker deploy target: the docker CLI on each server, over one SSH connection each.

`SSHDockerSteps` implements the per-server steps (deployers.base.ServerSteps) that the one
rollout (deployers.rollout) drives, running the commands of the server's plan
(deployers.plan):

- reach, take_lock: connect to every server, then take the app's deploy lock on each, one at a
  time in the order of the lock's directory (which names the server's docker engine), within
  lock.wait in all.
- prepare: log in and pull by digest if the image is not there; if an earlier run left the
  server mid-switch (its newest container not the newest
  verified release of the history), put the last verified release back first; compute the
  keyed fingerprint of the secret values with the app's key kept on the server (0600).
- switch: the running container `<app>` is renamed `<app>_prev_<run>` and kept (stopped first
  when the spec publishes host ports, which two containers cannot share); the new one starts as
  `<app>` with env through a 0600 env file removed right after `docker run`.
- verify: the health gate (deployers.health) on the new container by its id; then the previous
  one stops.
- restore: remove what this run started, rename the previous container back, start it again.
- commit: record the release as verified in the server's history
  (~/.runner/engines/<engine>/apps/<app>/history.json), then remove the previous container and
  prune the images beyond keep_versions and those of releases never verified (the runner
  records each image it pulls for the app: deployers.pruning).

Every remote command first checks that this run still holds the server's lock: a lost lease
stops the deploy on that server at once.

`SSHDockerDeployer` is the facade the stage and the CLI use: plan, apply, rollback, verify,
and the app's own commands (locks, logs, exec, remove).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import paramiko

from runner.errors import Cancelled
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef
from runner.outputs import DeployOutputs, ServerResult

from deployers import commands as cmd
from deployers import history as hist
from deployers import lock as locks
from deployers import pruning
from deployers.base import (DeployFailed, Deployer, DeployPlan, LockLostStep, Restored,
                            ServerPlan, ServerStatus, ServerSteps, StepFailed, Switch)
from deployers.health import ContainerState, ProbeResult, Verdict, parse_http_status, \
    parse_inspect, wait_healthy
from deployers.accessory_check import check_before_switch
from deployers.plan import UNVERIFIED, VERIFIED, Needs, plan_deploy, plan_rollback
from deployers.release_command import ReleaseRun, run_release_command
from deployers.remote_files import remove_tree, sweep
from deployers.rollout import UNTOUCHED, headline, parallel, rollout
from deployers.ssh_config import UserConfig
from deployers.spec import (LABEL_COMMIT, LABEL_DIGEST, LABEL_RUN, HealthSpec, Release, Target,
                            app_name, env_file_content, identity_of, record_identity,
                            release_key, secret_fingerprint, targets)
from deployers.host_keys import HostKeyPolicy
from deployers.http_over_ssh import http_get
from deployers.ssh_connect import connect
from deployers.ssh_connection import CommandFailed, Connection
from deployers.ssh_errors import TransportError
from deployers.ssh_keys import load_private_key
from deployers.ssh_options import SSHOptions

# How docker says that a registry wants a login it did not get (or refused).
_REGISTRY_AUTH = re.compile(r"no basic auth credentials|unauthori[sz]ed|authentication required|"
                            r"denied", re.I)
_SCRATCH_TAIL = "--[0-9a-f]{32}"  # after the app name, in `_scratch_path` names
STALE_LOGIN_AGE = 3600.0  # seconds; far longer than any pull
_NET_ERRORS = (TransportError, OSError, EOFError, paramiko.SSHException)


# Why a gate had nothing to check (said as a warning, and in the report instead of "healthy").
NO_CHECK = ("the image has no HEALTHCHECK and the pipeline sets no healthcheck.cmd or "
            "healthcheck.http")


def uptime_only(h: HealthSpec) -> str:
    """What the gate of a role without a health check of its own (a worker) checked: said in
    the report instead of "healthy"."""
    return (f"no health check of its own: it ran {h.min_uptime:g}s without exiting or "
            f"restarting (the image's HEALTHCHECK is off for it)")


def _check_name(h: HealthSpec) -> str:
    """What the health gate of HealthSpec `h` runs, for the log."""
    if h.kind == "cmd":
        return "healthcheck.cmd"
    if h.kind == "http":
        return f"healthcheck.http GET {h.http_path} on port {h.http_port or 80}"
    return "the image's HEALTHCHECK"


class ConfigError(ValueError):
    """The deploy settings cannot work (missing key, bad known_hosts, unknown secret)."""


@dataclass
class _OnServer:
    """What the steps know about one server between prepare and commit (Switch.detail)."""

    plan: ServerPlan
    history: list[dict]
    secret_values: dict[str, str] = field(default_factory=dict, repr=False)
    prev_name: str = ""  # set once the previous container was renamed aside
    prev_id: str = ""
    prev_labels: dict[str, str] = field(default_factory=dict)
    prev_was_running: bool = False
    prev_stopped: bool = False
    new_id: str = ""
    reused: str = ""  # the proxy cutover: the kept container's name, when it is started again
    routed: bool = False  # the proxy cutover: the route points at the new container


class SSHDockerDeployer(Deployer):
    def __init__(
        self,
        stage: DeploySettings,
        *,
        pipeline: str,
        image_name: str,
        run_id: str,
        image: ImageRef | None = None,
        commit: str = "",
        secret: Callable[[str], str] | None = None,
        log: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        needs: Needs | None = None,
        destination: str = "",
    ):
        self.stage = stage
        self.pipeline = pipeline
        self.image_name = image_name
        self.run_id = run_id
        self.image = image
        self.commit = commit
        self.app = app_name(stage, pipeline)
        # The destination's own history and lock on each server (deployers.spec.release_key).
        self.destination = destination
        self.key = release_key(self.app, destination)
        # The user's own ~/.ssh/config and ssh-agent fill in what the pipeline leaves unset
        # (deployers.spec.resolve_target); read once, so that the plan shows what is used.
        self.ssh_config = UserConfig.load()
        self.targets = targets(stage, self.ssh_config)
        self._secret = secret
        self._log = log or (lambda line: None)
        self._log_lock = threading.Lock()
        self.cancel = cancel or threading.Event()
        self.needs = needs  # the accessories each server must run (deployers.accessory_plan)
        self._opts: SSHOptions | None = None
        self._conns: dict[str, Connection] = {}
        self._conns_lock = threading.Lock()
        self._homes: dict[str, str] = {}

    # ---------------------------------------------------------------- helpers

    def log(self, text: str) -> None:
        with self._log_lock:
            self._log(text)

    def secret_value(self, name: str) -> str:
        if self._secret is None:
            raise ConfigError(f"secret {name!r} is needed but no secrets were given")
        try:
            return self._secret(name)
        except KeyError:
            raise ConfigError(f"secret {name!r} is not defined or has no value") from None

    def options(self) -> SSHOptions:
        if self._opts is None:
            s = self.stage.ssh
            try:
                passphrase = (self.secret_value(s.key_passphrase_secret)
                              if s.key_passphrase_secret else None)
                # Without a key of the pipeline's own, the user's keys (ssh-agent,
                # IdentityFile, ~/.ssh/id_*) that each target names are offered alone.
                key = None
                if s.key_file or s.key_secret:
                    key = load_private_key(
                        path=s.key_file,
                        text=self.secret_value(s.key_secret) if s.key_secret else None,
                        passphrase=passphrase)
                # Pinned keys travel with each target (Target.host_key), so that a jump
                # host is checked against its own known_hosts entry, not a server's pin.
                policy = HostKeyPolicy(s.known_hosts, None, s.insecure_ignore_host_key)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if s.insecure_ignore_host_key:
                self.log("WARNING: ssh.insecure_ignore_host_key is on: host keys are NOT "
                         "checked, anyone in the network path can impersonate these servers")
            self._opts = SSHOptions(key=key, host_keys=policy,
                                    key_label=(f"ssh.key_file {s.key_file}" if s.key_file
                                               else f"ssh.key (secret {s.key_secret})"),
                                    connect_timeout=s.connect_timeout,
                                    command_timeout=s.command_timeout, retries=s.retries,
                                    io_timeout=s.io_timeout)
        return self._opts

    def connection(self, t: Target, fresh: bool = False,
                   on_new: Callable[[Connection], None] | None = None) -> Connection:
        with self._conns_lock:
            c = self._conns.get(t.label)
        if c is not None and c.alive and not fresh:
            return c
        if c is not None:
            c.close()
        c = connect(t, self.options(), cancel=self.cancel, log=self.log)
        with self._conns_lock:
            self._conns[t.label] = c
        if on_new is not None:
            on_new(c)
        # Starting the SFTP subsystem costs a server-side login too: do it while the first
        # commands run (errors surface when SFTP is first really used).
        threading.Thread(target=c.warm_sftp, daemon=True).start()
        return c

    def runner_dir(self, conn: Connection) -> str:
        """The runner's directory for this server's docker engine: ~/.runner/engines/<engine id>.
        Keyed by the engine, not the host name, so locks and history follow what they protect
        (two names for one server share them; engines sharing one filesystem do not). The id is a
        hash of the engine's `host` network id (or its ID and data root)."""
        if conn.label not in self._homes:
            # The predefined `host` network has a random id made when the engine's data root
            # was created: cheap to ask (docker info takes 150+ ms) and unique per engine
            # (the engine ID is not, where engines share /etc/docker/key.json). Asked first:
            # on a new connection this command pays the session's start while the SFTP
            # session (connect() warms it in a thread) opens beside it; asking SFTP first
            # made every deploy wait for the two one after the other.
            r = conn.run(cmd.engine_id(), check=False)
            if not r.ok or not r.stdout.strip():
                r = conn.run(cmd.engine_info(), check=True)
            home = conn.sftp_do(lambda sftp: sftp.normalize("."))
            engine = hashlib.sha256(r.stdout.strip().encode()).hexdigest()[:16]
            self._homes[conn.label] = f"{home}/{locks.BASE_DIR}/engines/{engine}"
        return self._homes[conn.label]

    def lock_dir(self, conn: Connection) -> str:
        """This server's locks (deployers.lock): each app's deploy lock and the proxy's."""
        return f"{self.runner_dir(conn)}/locks"

    def each(self, fn: Callable, items: list) -> list:
        """fn(item) for each item, in parallel; returns results or the exceptions raised."""
        return parallel(fn, items, self.stage.parallel)

    def history_path(self, conn: Connection) -> str:
        return f"{self.runner_dir(conn)}/apps/{self.key}/history.json"

    def history(self, conn: Connection) -> list[dict]:
        """The verified releases recorded on this server, oldest first."""
        path = self.history_path(conn)

        def read(sftp):
            try:
                with sftp.open(path, "r") as f:
                    return json.loads(f.read().decode() or "[]")
            except FileNotFoundError:
                return []
        try:
            data = conn.sftp_do(read)
        except ValueError:
            return []
        return [h for h in data if isinstance(h, dict) and h.get("digest")]

    def pulled_dir(self, conn: Connection) -> str:
        return f"{self.runner_dir(conn)}/apps/{self.key}/{pruning.PULLED_DIR}"

    def pulled_images(self, conn: Connection) -> list[str]:
        """The images the runner pulled for this app on this server and has not removed."""
        directory = self.pulled_dir(conn)

        def names(sftp):
            try:
                return sftp.listdir(directory)
            except FileNotFoundError:
                return []
        found = (pruning.marker_ref(n) for n in sorted(conn.sftp_do(names)))
        return [ref for ref in found if ref]

    def record_pull(self, conn: Connection, ref: str) -> None:
        path = f"{self.pulled_dir(conn)}/{pruning.marker_name(ref)}"

        def write(sftp):
            sftp.open(path, "w").close()
        try:
            conn.sftp_do(write)
        except FileNotFoundError:  # the app's first pull on this server
            conn.ensure_private_dir(self.pulled_dir(conn))
            conn.sftp_do(write)

    def forget_pull(self, conn: Connection, ref: str) -> None:
        conn.remove_file(f"{self.pulled_dir(conn)}/{pruning.marker_name(ref)}")

    def inspect(self, conn: Connection, name: str,
                run: Callable | None = None) -> ContainerState | None:
        r = (run or conn.run)(cmd.inspect_container(name), check=False)
        if not r.ok:
            if "No such" in r.stderr or "no such" in r.stderr or r.stdout.strip() in ("", "[]"):
                return None
            raise CommandFailed(conn.label, r)
        return parse_inspect(r.stdout)

    def app_containers(self, conn: Connection, run: Callable | None = None
                       ) -> list[ContainerState]:
        """Every container of this app on the server (by the runner's label), any state."""
        run = run or conn.run
        ids = run(cmd.list_app_ids(self.app), check=True).stdout.split()
        if not ids:
            return []
        r = run(cmd.inspect_container(*ids), check=False)
        try:
            data = json.loads(r.stdout or "[]")
        except ValueError:
            raise CommandFailed(conn.label, r) from None
        from deployers.health import parse_state
        return [parse_state(obj) for obj in data]

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()

    # ---------------------------------------------------------------- plan / apply

    def plan(self) -> DeployPlan:
        return plan_deploy(self.stage, pipeline=self.pipeline, image_name=self.image_name,
                           run_id=self.run_id, image=self.image, commit=self.commit,
                           servers=self.targets, needs=self.needs)

    def apply(self, plan: DeployPlan | None = None) -> DeployOutputs:
        plan = plan or self.plan()
        if plan.placeholder:
            raise ConfigError("no release to deploy: the push stage did not produce a digest")
        self.options()  # configuration errors before touching anything
        return rollout(plan, self.steps(), log=self.log, cancel=self.cancel)

    def steps(self) -> SSHDockerSteps:
        """The per-server steps of this deploy's cutover."""
        if self.stage.cutover == "proxy":
            from deployers.ssh_proxy import ProxySteps
            return ProxySteps(self)
        return SSHDockerSteps(self)

    def _refused(self, what: str, problems: dict[str, str]) -> DeployFailed:
        rows = tuple(ServerResult(t.label, "failed", reason=f"{problems[t.label]}; {UNTOUCHED}")
                     for t in self.targets if t.label in problems)
        return DeployFailed(DeployOutputs(self.app, what, rows, False,
                                          headline(what, self.app, rows, False)))

    def rollback(self, to: str | None = None) -> DeployOutputs:
        """Each server back to its previous verified release (or `to`: a position, a digest or
        a git commit, see deployers.history.choose), exactly as that release ran."""
        releases = self.rollback_releases(to)
        return self.apply(plan_rollback(self.stage, pipeline=self.pipeline, run_id=self.run_id,
                                        releases=releases, servers=self.targets,
                                        needs=self.needs))

    def rollback_releases(self, to: str | None = None) -> dict[str, Release]:
        """The release each server would go back to (server label -> Release), read from the
        servers and changing nothing. Raises DeployFailed naming every server without one."""
        self.options()

        def pick(t: Target) -> Release:
            conn = self.connection(t)
            cur = self.inspect(conn, self.app)
            entry = hist.choose(self.history(conn), identity_of(cur.labels) if cur else None, to)
            return Release.from_record(entry)

        releases: dict[str, Release] = {}
        problems: dict[str, str] = {}
        unknown = 0
        for t, r in zip(self.targets, self.each(pick, list(self.targets))):
            if isinstance(r, Release):
                releases[t.label] = r
                self.log(f"{t.label}: rolling back to {r.digest[:19]} (commit "
                         f"{r.commit[:12] or '-'}, run {r.run_id})")
            elif isinstance(r, (Cancelled, KeyboardInterrupt)):
                raise r
            elif isinstance(r, (ValueError, TransportError)):
                problems[t.label] = getattr(r, "reason", None) or str(r)
                unknown += isinstance(r, hist.NoSuchRelease)
            else:
                raise r
        if problems:
            refused = self._refused("rollback", problems)
            refused.invalid_input = unknown == len(problems)  # --to names nothing: exit 2
            raise refused
        return releases

    # ---------------------------------------------------------------- reading

    def verify(self) -> list[ServerStatus]:
        def one(t: Target) -> ServerStatus:
            try:
                conn = self.connection(t)
                st = self.inspect(conn, self.app)
                history = self.history(conn)
            except (TransportError, ConfigError) as exc:
                return ServerStatus(t.label, self.app, error=str(exc))
            newest = history[-1] if history else None
            if st is None:
                return ServerStatus(t.label, self.app, status="absent",
                                    previous_verified=newest["digest"] if newest else "")
            verified = newest is not None and identity_of(st.labels) == record_identity(newest)
            return ServerStatus(t.label, self.app, running=st.running, status=st.status,
                                health=st.health, digest=st.labels.get(LABEL_DIGEST, ""),
                                commit=st.labels.get(LABEL_COMMIT, ""),
                                run_id=st.labels.get(LABEL_RUN, ""), started_at=st.started_at,
                                verified=verified,
                                previous_verified="" if verified or not newest
                                else newest["digest"])
        out = self.each(one, list(self.targets))
        return [r if isinstance(r, ServerStatus) else
                ServerStatus(t.label, self.app, error=f"{type(r).__name__}: {r}")
                for t, r in zip(self.targets, out)]

    def releases(self) -> list[tuple[str, list[dict], str]]:
        """(server, history oldest first, error) for every server."""
        def one(t: Target):
            return self.history(self.connection(t))
        out = self.each(one, list(self.targets))
        return [(t.label, [], f"{r}") if isinstance(r, BaseException) else (t.label, r, "")
                for t, r in zip(self.targets, out)]

    # ---------------------------------------------------------------- locks, on purpose

    def lock_status(self) -> list[tuple[str, locks.LockInfo | None, str]]:
        """(server, holder or None, error) for this app's deploy lock on every server."""
        def one(t: Target):
            conn = self.connection(t)
            return locks.inspect(conn, self.lock_dir(conn), self.key)
        out = self.each(one, list(self.targets))
        return [(t.label, None, f"{r}") if isinstance(r, BaseException) else (t.label, r, "")
                for t, r in zip(self.targets, out)]

    def break_lock(self, server: str | None = None) -> list[tuple[str, bool, str]]:
        """Break this app's lock (on one server or all): (server, broken, error)."""
        chosen = [t for t in self.targets if server in (None, t.label, t.host)]

        def one(t: Target):
            conn = self.connection(t)
            return locks.break_lock(conn, self.lock_dir(conn), self.key)
        out = self.each(one, chosen)
        return [(t.label, False, f"{r}") if isinstance(r, BaseException) else (t.label, r, "")
                for t, r in zip(chosen, out)]


class SSHDockerSteps(ServerSteps):
    """The per-server steps over SSH for one rollout; see the module docstring."""

    def __init__(self, d: SSHDockerDeployer):
        self.d = d
        self._leases: dict[str, locks.Lease] = {}
        self._reclaimed: set[str] = set()  # servers whose lost lease was ours still: restorable
        self._timings: dict[str, dict[str, float]] = {}
        self._shield = threading.local()
        self._lock_roots: dict[str, str] = {}
        self._lock_deadline: float | None = None  # lock.wait from the first take_lock on

    # ---------------------------------------------------------------- plumbing

    def timings(self, server: str) -> dict[str, float]:
        return dict(self._timings.get(server, {}))

    @contextmanager
    def _phase(self, server: str, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            got = self._timings.setdefault(server, {})
            got[name] = got.get(name, 0.0) + time.monotonic() - t0

    @contextmanager
    def _as_step(self, server: str, touched: bool) -> Iterator[None]:
        """What the transport, the lock and the settings raise, as the rollout's StepFailed."""
        try:
            yield
        except locks.LockLost as exc:
            raise LockLostStep(server, exc.reason) from None
        except (ConfigError, ValueError) as exc:
            raise StepFailed(server, str(exc), touched=touched) from None
        except TransportError as exc:
            raise StepFailed(server, exc.reason, touched=touched) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise StepFailed(server, f"{type(exc).__name__}: {exc}", touched=touched) from None

    def _cancel(self) -> threading.Event | None:
        # Undoing or recording a change (restore, commit) must not be cut short by the cancel
        # that caused it.
        return None if getattr(self._shield, "on", False) else self.d.cancel

    @contextmanager
    def _shielded(self) -> Iterator[None]:
        self._shield.on = True
        try:
            yield
        finally:
            self._shield.on = False

    def _conn(self, t: Target, fresh: bool = False) -> Connection:
        def moved(c: Connection) -> None:
            lease = self._leases.get(t.label)
            if lease is not None:
                lease.conn = c  # heartbeat and release go through the new connection
        return self.d.connection(t, fresh=fresh, on_new=moved)

    def _runner(self, conn: Connection) -> Callable:
        """conn.run, after checking the lock is still ours (when we hold one there)."""
        def run(argv, *, check: bool = False, stdin: bytes | None = None,
                timeout: float | None = None):
            lease = self._leases.get(conn.label)
            if lease is not None and conn.label not in self._reclaimed:
                lease.check()
            return conn.run(argv, stdin=stdin, check=check, timeout=timeout,
                            cancel=self._cancel())
        return run

    def _on(self, sw: Switch) -> tuple[Connection, Callable, _OnServer]:
        st: _OnServer = sw.detail
        conn = self._conn(st.plan.target)
        return conn, self._runner(conn), st

    # ---------------------------------------------------------------- locks

    def reach(self, plan: ServerPlan) -> str:
        """Connect, and check that the accessories the server needs run there (before any
        server is touched: deployers.accessory_check); the lock's directory on the server,
        which is per docker engine: the order key (two names for one server sort alike)."""
        t = plan.target
        with self._as_step(t.label, touched=False):
            with self._phase(t.label, "connect"):
                conn = self._conn(t)
                self._lock_roots[t.label] = self.d.lock_dir(conn)
                check_before_switch(conn, plan, app=self.d.app, cancel=self.d.cancel)
        return self._lock_roots[t.label]

    def take_lock(self, plan: ServerPlan) -> None:
        t, d = plan.target, self.d
        if self._lock_deadline is None:
            self._lock_deadline = time.monotonic() + d.stage.lock.wait
        with self._as_step(t.label, touched=False), self._phase(t.label, "lock"):
            holder = locks.holder_info(d.run_id, d.pipeline, plan.release.commit,
                                       d.stage.lock.ttl)
            self._leases[t.label] = locks.acquire(
                self._conn(t), self._lock_roots[t.label], d.key, holder, ttl=d.stage.lock.ttl,
                wait=max(0.0, self._lock_deadline - time.monotonic()), cancel=d.cancel,
                log=d.log)
        d.log(f"{t.label}: deploy lock taken (run {d.run_id})")

    # ---------------------------------------------------------------- prepare

    def prepare(self, plan: ServerPlan) -> Switch:
        t, d = plan.target, self.d
        with self._as_step(t.label, touched=False):
            conn = self._conn(t)
            with self._phase(t.label, "pull"):
                self._pull(conn, plan)
        with self._as_step(t.label, touched=False):
            found = d.app_containers(conn, self._runner(conn))
            before = next((c for c in found if c.name == plan.release.spec.name), None)
        with self._as_step(t.label, touched=True):
            history = d.history(conn)
            recovered = self._recover(conn, plan, history, found)
        with self._as_step(t.label, touched=bool(recovered)):
            release, values = self._with_secrets(conn, plan.release)
        return Switch(t.label, release, recovered=recovered,
                      previous_digest=before.labels.get(LABEL_DIGEST, "") if before else "",
                      detail=_OnServer(plan, history, values))

    def _pull(self, conn: Connection, plan: ServerPlan) -> None:
        ref = str(plan.release.image)
        if conn.run(cmd.image_present(ref), check=False, cancel=self.d.cancel).ok:
            return
        registry = plan.release.image.registry
        user = self.d.stage.registry.username
        auth_dir = None
        try:
            values = {}
            if user:
                auth_dir = self._login(conn, plan, registry, user)
                values[cmd.LOGIN_DIR] = auth_dir
            t0 = time.monotonic()
            r = conn.run(plan.argv("pull", values), check=False, cancel=self.d.cancel)
        finally:
            if auth_dir:
                self._forget_login(conn, auth_dir)
        if not r.ok:
            tail = " ".join(r.output.splitlines()[-3:])
            reason = f"pulling {ref} failed: {tail}"
            if _REGISTRY_AUTH.search(tail):
                reason += (f"; registry {registry} refused the server's login as {user!r}"
                           if user else
                           f"; registry {registry} wants a login: set "
                           "stages.deploy.registry.username and password")
            raise StepFailed(conn.label, reason, touched=False)
        # Recorded at once: if this release never gets verified, a later commit removes it.
        self.d.record_pull(conn, ref)
        self.d.log(f"{conn.label}: pulled {plan.release.digest[:19]} in "
                   f"{time.monotonic() - t0:.1f}s")

    def _login(self, conn: Connection, plan: ServerPlan, registry: str, user: str) -> str:
        """`docker login` into a docker config dir of this deploy's own (0700), so that the
        registry password is not left behind in the server's ~/.docker/config.json."""
        password = self.d.secret_value(self.d.stage.registry.password_secret or "")
        auth_dir = self._scratch_path(conn, "auth")
        conn.sftp_do(lambda sftp: sftp.mkdir(auth_dir, 0o700))
        r = conn.run(plan.argv("login", {cmd.LOGIN_DIR: auth_dir}), stdin=password.encode(),
                     check=False, cancel=self.d.cancel)
        if not r.ok:
            self._forget_login(conn, auth_dir)
            tail = " ".join(r.output.splitlines()[-3:])
            raise StepFailed(conn.label, f"docker login to {registry} as {user!r} failed: "
                             f"{tail}; check stages.deploy.registry", touched=False)
        return auth_dir

    def _forget_login(self, conn: Connection, auth_dir: str) -> None:
        try:
            conn.sftp_do(lambda sftp: remove_tree(sftp, auth_dir))
        except (OSError, TransportError) as exc:
            self.d.log(f"{conn.label}: WARNING: could not remove the login in {auth_dir} "
                       f"({exc}); the next deploy of {self.d.app} removes it")

    def _scratch_path(self, conn: Connection, kind: str, suffix: str = "") -> str:
        """A fresh name `<app>--<random><suffix>` in the runner's 0700 dir `<root>/<kind>` on the
        server, for a secret that lives only as long as one command: if a run dies before removing
        it, `_recover` of the next deploy of this app finds it by that form."""
        directory = f"{self.d.runner_dir(conn)}/{kind}"
        conn.ensure_private_dir(directory)
        return f"{directory}/{self.d.app}--{uuid.uuid4().hex}{suffix}"

    def _with_secrets(self, conn: Connection, release: Release) -> tuple[Release, dict[str, str]]:
        """The release with the fingerprint of its secret values on this server, and the
        values of its whole env (plain and secret) for the env file."""
        spec = release.spec
        values = dict(spec.env)
        for var, name in spec.secret_env:
            values[var] = self.d.secret_value(name)
        if not spec.secret_env:
            return release, values
        fp = secret_fingerprint(self._app_key(conn), spec, values)
        if release.secrets and release.secrets != fp:
            self.d.log(f"{conn.label}: the secret values differ from those this release was "
                       f"recorded with (rotated since): the current values are used")
        return release.with_secrets(fp), values

    def _app_key(self, conn: Connection) -> bytes:
        """The app's fingerprint key on this server (32 random bytes, 0600), made once."""
        directory = f"{self.d.runner_dir(conn)}/apps/{self.d.key}"
        conn.ensure_private_dir(directory)
        path = f"{directory}/secrets.key"

        def read(sftp):
            try:
                with sftp.open(path, "r") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        key = conn.sftp_do(read)
        if not key:
            try:
                conn.write_private_file(path, os.urandom(32))
            except OSError:
                pass  # made by another run in between: read that one
            key = conn.sftp_do(read)
        if not key or len(key) < 32:
            raise TransportError(conn.label, f"the app's fingerprint key {path} is unreadable")
        return bytes(key)

    def _recover(self, conn: Connection, plan: ServerPlan, history: list[dict],
                 found: list[ContainerState]) -> str:
        """Return the server to its last verified release when an earlier run left it
        mid-switch, deciding by the history (verified releases only), never by which
        containers happen to exist. Also sweeps a dead run's env files and old logins.
        Returns what it did to what runs ("" when nothing)."""
        root, app = self.d.runner_dir(conn), self.d.app
        own = re.escape(app) + _SCRATCH_TAIL
        # Env files left by a run that died between writing and removing them; logins left by
        # one that died before its pull ended: only old ones, as a runner of an earlier version
        # pulled before it took the lock and may be pulling right now.
        conn.sftp_do(lambda sftp: (sweep(sftp, f"{root}/env", own + r"\.env"),
                                   sweep(sftp, f"{root}/auth", own, STALE_LOGIN_AGE)))
        run = self._runner(conn)
        current = next((c for c in found if c.name == app), None)
        aside = sorted((c for c in found if c.name.startswith(f"{app}_prev_")),
                       key=lambda c: c.started_at, reverse=True)
        verified = record_identity(history[-1]) if history else None
        if current is not None and verified is not None and \
                identity_of(current.labels) == verified:
            for c in aside:  # older versions a dead run never removed
                run(cmd.remove(c.id), check=False)
            return ""
        if verified is None:
            if current is None and aside:  # an older runner's interrupted deploy
                self.d.log(f"{conn.label}: an interrupted deploy left {aside[0].name} aside; "
                           f"restoring it")
                run(plan.argv("recover_rename", {VERIFIED: aside[0].id}), check=True)
                run(plan.argv("recover_start"), check=False)
                return f"restored {aside[0].name}, left aside by an interrupted deploy"
            return ""
        good = next((c for c in aside if identity_of(c.labels) == verified), None)
        if good is None:
            if current is not None:
                self.d.log(f"{conn.label}: WARNING: {app} runs "
                           f"{current.labels.get(LABEL_DIGEST, '?')[:19]}, which was never "
                           f"verified, and no container of the last verified release "
                           f"{history[-1]['digest'][:19]} is left; this run replaces it")
            return ""
        if current is not None:
            self.d.log(f"{conn.label}: {app} runs an unverified release "
                       f"({current.labels.get(LABEL_DIGEST, '?')[:19]}, left by an interrupted "
                       f"run); returning to the last verified one "
                       f"{history[-1]['digest'][:19]} first")
            run(plan.argv("recover_remove", {UNVERIFIED: current.id}), check=True)
        else:
            self.d.log(f"{conn.label}: an interrupted run left the last verified release "
                       f"aside ({good.name}); restoring it")
        run(plan.argv("recover_rename", {VERIFIED: good.id}), check=True)
        run(plan.argv("recover_start"), check=True)
        for c in aside:
            if c.id != good.id:
                run(cmd.remove(c.id), check=False)
        return f"returned to the last verified release {history[-1]['digest'][:19]} first"

    # ---------------------------------------------------------------- release command

    def release(self, sw: Switch) -> None:
        """The plan's release command on this server (deployers.release_command)."""
        conn, run, st = self._on(sw)

        def remove(argv: list[str]) -> None:  # also after a cancel or a dropped connection
            with self._shielded():
                for fresh in (False, True):
                    try:
                        self._conn(st.plan.target, fresh=fresh).run(argv, check=False)
                        return
                    except _NET_ERRORS:
                        pass
            self.d.log(f"{sw.server}: WARNING: could not remove {argv[-1]}; the next deploy "
                       f"of {self.d.app} removes it")
        with self._as_step(sw.server, touched=False), self._phase(sw.server, "release"):
            run_release_command(ReleaseRun(
                conn=conn, run=run, remove=remove, plan=st.plan, env_values=st.secret_values,
                env_path=lambda: self._scratch_path(conn, "env", ".env"),
                timeout=self.d.stage.release_timeout, log=self.d.log))

    # ---------------------------------------------------------------- switch / verify

    def switch(self, sw: Switch) -> None:
        conn, run, st = self._on(sw)
        spec, plan = sw.release.spec, st.plan
        with self._as_step(sw.server, touched=True):
            cur = self.d.inspect(conn, spec.name, run)
            if cur is not None and self._already_running(conn, sw, st, cur):
                sw.unchanged = True
                return
            with self._phase(sw.server, "switch"):
                if cur is not None:
                    st.prev_id, st.prev_was_running = cur.id, cur.running
                    st.prev_labels = dict(cur.labels)
                    run(plan.argv("rename_previous"), check=True)
                    st.prev_name = plan.command("rename_previous").argv[-1]
                if st.prev_name and st.prev_was_running and spec.ports:
                    run(plan.argv("stop_previous"), check=True,
                        timeout=spec.stop_timeout + 30)
                    st.prev_stopped = True
            with self._phase(sw.server, "start"):
                st.new_id = self._start(conn, run, sw, st)

    def _already_running(self, conn: Connection, sw: Switch, st: _OnServer,
                         cur: ContainerState) -> bool:
        """`cur` is this very release, verified, running well: nothing to switch."""
        verified = record_identity(st.history[-1]) if st.history else None
        return (identity_of(cur.labels) == sw.release.identity == verified and cur.running
                and cur.health != "unhealthy" and cur.restart_count == 0)

    def _start(self, conn: Connection, run: Callable, sw: Switch, st: _OnServer) -> str:
        spec = sw.release.spec
        values: dict = {}
        if spec.secret_env:
            values[cmd.SECRETS] = sw.release.secrets
        env_path = None
        if spec.has_env:
            env_path = self._scratch_path(conn, "env", ".env")
            conn.write_private_file(env_path, env_file_content(st.secret_values))
            values[cmd.ENV_FILE] = env_path
        try:
            r = run(st.plan.argv("run", values), check=False,
                    timeout=self.d.stage.ssh.command_timeout)
        finally:
            if env_path:
                conn.remove_file(env_path)
        if not r.ok:
            raise StepFailed(sw.server, f"docker run failed: {r.output[-500:]}")
        new_id = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        self.d.log(f"{sw.server}: started {spec.name} ({sw.release.digest[:19]})")
        return new_id

    def _announce(self, sw: Switch, check: str, timeout: float) -> None:
        """Say what the health gate checks; with nothing to check, warn and mark the switch
        (the report then says "started, not health-checked", never "healthy")."""
        if check:
            self.d.log(f"{sw.server}: waiting for health ({check}, up to {timeout:g}s)")
            return
        health = sw.release.spec.health
        if health.kind == "uptime":  # a role meant to run without one: no warning
            sw.unchecked = uptime_only(health)
            self.d.log(f"{sw.server}: waiting until it has run {health.min_uptime:g}s without "
                       f"exiting or restarting (no health check of its own)")
            return
        sw.unchecked = NO_CHECK
        self.d.log(f"{sw.server}: WARNING: no health check: {NO_CHECK}; it only has to stay "
                   f"up {sw.release.spec.health.min_uptime:g}s, nothing checks that it answers "
                   f"(set healthcheck.http or healthcheck.cmd)")

    def verify(self, sw: Switch) -> None:
        conn, run, st = self._on(sw)
        spec = sw.release.spec
        with self._as_step(sw.server, touched=True):
            with self._phase(sw.server, "health"):
                probe = self._probe(conn, run, st, st.new_id)
                self._announce(sw, _check_name(spec.health) if probe else "",
                               spec.health.timeout)
                verdict = wait_healthy(inspect=lambda: self.d.inspect(conn, st.new_id, run),
                                       probe=probe, health=spec.health, cancel=self.d.cancel)
            if not verdict.healthy:
                raise StepFailed(sw.server, self._unhealthy_reason(run, st, verdict))
            if st.prev_name and st.prev_was_running and not st.prev_stopped:
                with self._phase(sw.server, "switch"):
                    run(st.plan.argv("stop_previous"), check=True,
                        timeout=spec.stop_timeout + 30)
                st.prev_stopped = True

    def _probe(self, conn: Connection, run: Callable, st: _OnServer, cid: str
               ) -> Callable[[ContainerState], ProbeResult] | None:
        """One readiness probe of container `cid` (the planned probe command, an HTTP GET
        from the server, or the image's own HEALTHCHECK test)."""
        plan, new = st.plan, {cmd.NEW: cid}
        h = plan.release.spec.health
        timeout = h.probe_timeout
        if h.kind == "http":
            forwarding = [True]

            def http(state: ContainerState) -> ProbeResult:
                host = state.ip or "127.0.0.1"
                if forwarding[0]:
                    lease = self._leases.get(conn.label)
                    if lease is not None:
                        lease.check()
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
        first = self.d.inspect(conn, cid, run)
        if first is None or not first.healthcheck_test:
            return None
        test = [str(w) for w in cmd.probe(cid, list(first.healthcheck_test))]
        return lambda state: run_test(test)

    def _unhealthy_reason(self, run: Callable, st: _OnServer, v: Verdict) -> str:
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

    # ---------------------------------------------------------------- restore

    def restore(self, sw: Switch) -> Restored:
        st: _OnServer = sw.detail
        if sw.unchanged:
            return Restored(True, running=sw.release.digest, note="unchanged")
        kept = st.prev_name or (st.plan.release.spec.name if st.prev_id else "")
        lease = self._leases.get(sw.server)
        with self._shielded():
            for attempt in (1, 2):
                try:
                    conn = self._conn(st.plan.target, fresh=attempt == 2)
                    if lease is not None and lease.is_lost:
                        # A renewal that failed (a dropped connection) is no reason to leave
                        # the server unverified, as long as no other run took the lock.
                        if not lease.reclaim():
                            return Restored(False, kept=kept,
                                            note="not restored: the deploy lock is no longer "
                                                 "this run's; whoever holds it now decides "
                                                 "what runs there")
                        self._reclaimed.add(sw.server)
                    return self._restore_once(sw, conn, self._runner(conn))
                except locks.LockLost as exc:
                    return Restored(False, kept=kept, note=f"not restored: {exc.reason}")
                except (*_NET_ERRORS, StepFailed) as exc:
                    if attempt == 2 or isinstance(exc, StepFailed):
                        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                        return Restored(
                            False, kept=kept,
                            note=f"{reason}; the previous verified release is kept as "
                                 f"{kept or 'nothing'}; the next deploy or `runner rollback` "
                                 f"returns the server to it first")
                except Exception as exc:  # restore never raises: say what stopped it
                    return Restored(False, kept=kept,
                                    note=f"{type(exc).__name__}: {exc} (a bug in runner)")
        return Restored(False, kept=kept, note="not restored")

    def _restore_once(self, sw: Switch, conn: Connection, run: Callable) -> Restored:
        st: _OnServer = sw.detail
        plan, name = st.plan, sw.release.spec.name
        if st.new_id:
            run(plan.argv("remove_new", {cmd.NEW: st.new_id}), check=False)
        current = self.d.inspect(conn, name, run)
        if current is not None and current.id != st.prev_id:
            # `docker run` may have made it before the connection dropped, without its id
            run(plan.argv("remove_new", {cmd.NEW: current.id}), check=False)
            current = None
        if not st.prev_id:
            return Restored(True, note="new container removed", none_before=True)
        if current is None:
            run(plan.argv("rename_back"), check=True)
        if st.prev_was_running:
            run(plan.argv("start_previous"), check=True)
            back = self.d.inspect(conn, name, run)
            if back is None or not back.running:
                return Restored(False, kept=name,
                                note=f"the previous container {name} did not start again "
                                     f"({back.status if back else 'gone'})")
        self.d.log(f"{sw.server}: rolled back to the previous container "
                   f"({sw.previous_digest[:19] or 'unlabelled'})")
        return Restored(True, running=sw.previous_digest,
                        note=f"rolled back: previous version {sw.previous_digest[:19] or name} "
                             f"{'running' if st.prev_was_running else 'restored'} again")

    # ---------------------------------------------------------------- commit

    def commit(self, sw: Switch) -> None:
        conn, run, st = self._on(sw)
        d = self.d
        with self._shielded(), self._as_step(sw.server, touched=True), \
                self._phase(sw.server, "commit"):
            lease = self._leases[sw.server]
            lease.verify()
            history = d.history(conn)
            newest = record_identity(history[-1]) if history else None
            dropped: list[dict] = []
            if newest != sw.release.identity:
                history = [h for h in history if record_identity(h) != sw.release.identity]
                history.append(sw.release.record(time.time()))
                keep = d.stage.keep_versions
                dropped, history = history[:-keep], history[-keep:]
                self._write_history(conn, history)
            # Only now, with its successor recorded as verified, is the previous one not needed.
            self._retire_previous(run, st, history)
            pulled = d.pulled_images(conn)
            for item in pruning.images_to_prune(
                    pulled=pulled, dropped=[h["ref"] for h in dropped if h.get("ref")],
                    kept=[h["ref"] for h in history if h.get("ref")],
                    running=str(sw.release.image)):
                # `docker image rm` refuses an image a container (another app's too) still uses.
                r = run(st.plan.argv("prune", {cmd.PRUNED: item.ref}), check=False)
                if item.ref in pulled and (r.ok or "no such image" in r.output.lower()):
                    d.forget_pull(conn, item.ref)
                if r.ok:
                    d.log(f"{conn.label}: pruned {item.ref.split('@', 1)[1][:19]} ({item.why})")

    def _retire_previous(self, run: Callable, st: _OnServer, history: list[dict]) -> None:
        """After the commit: the stop-start cutover removes the previous container."""
        if st.prev_name:
            run(st.plan.argv("remove_previous"), check=False)

    def _write_history(self, conn: Connection, history: list[dict]) -> None:
        conn.ensure_private_dir(f"{self.d.runner_dir(conn)}/apps/{self.d.key}")
        path = self.d.history_path(conn)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        data = json.dumps(history, indent=1).encode()

        def op(sftp):
            with sftp.open(tmp, "w") as f:
                f.write(data)
            sftp.posix_rename(tmp, path)
        conn.sftp_do(op)

    def finish(self) -> None:
        # In the reverse of the lock order: a run waiting for the first lock finds the others
        # free by the time it gets it.
        for label, lease in reversed(list(self._leases.items())):
            try:
                lease.release()
                self.d.log(f"{label}: deploy lock released (run {self.d.run_id})")
            except Exception as exc:  # the lease expires by itself after its ttl
                self.d.log(f"{label}: could not release the deploy lock ({exc}); it expires "
                           f"after {self.d.stage.lock.ttl:g}s")
        self._leases.clear()


def deployer_for(stage: DeploySettings, **kwargs) -> SSHDockerDeployer:
    return SSHDockerDeployer(stage, **kwargs)


__all__ = ["ConfigError", "SSHDockerDeployer", "SSHDockerSteps", "deployer_for"]
