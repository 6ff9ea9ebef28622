"""The SSH + Docker deployer: the docker CLI on each server, driven over one SSH connection.

Per batch of servers (see spec.batches): connect, take the app's lock, log in and pull the image
by digest on every server of the batch first (a registry problem fails before anything is
touched), then on each server in parallel:

1. the running container `<app>` is renamed `<app>_prev_<run>` and kept (stopped first when the
   spec publishes host ports, which two containers cannot share);
2. the new one starts as `<app>` with the restart policy, --init, the labels that record pipeline,
   run, commit and digest, and env through a 0600 env file removed right after `docker run`;
3. the health gate (deployers.health) decides; on failure the new container is removed and the
   previous one renamed back and started again as it was, and the server reports why.

A failed batch rolls back what it changed (and the earlier batches unless on_failure is
keep_done). When the whole rollout is healthy, the previous containers are removed, the
release is recorded in the server's history (.runner/apps/<app>/history.json) and images beyond
keep_versions are pruned. Locks are held until then.
"""
from __future__ import annotations

import hashlib
import json
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import paramiko

from runner.errors import Cancelled
from runner.model.deploy import DeployStage, parse_server

from deployers import commands as cmd
from deployers import lock as locks
from deployers.base import (DeployFailed, Deployer, DeployPlan, DeployReport, ServerPlan,
                            ServerResult, ServerStatus)
from deployers.health import ContainerState, ProbeResult, Verdict, parse_http_status, \
    parse_inspect, wait_healthy
from deployers.spec import (LABEL_COMMIT, LABEL_DIGEST, LABEL_RUN, LABEL_SPEC, ContainerSpec,
                            Release, Target, app_name, batches, container_spec, env_file_content,
                            split_ref, targets)
from deployers.transport import (CommandFailed, Connection, HostKeyPolicy, SSHOptions,
                                 TransportError, connect, http_get, load_private_key)

PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
# How docker says that a registry wants a login it did not get (or refused).
_REGISTRY_AUTH = re.compile(r"no basic auth credentials|unauthori[sz]ed|authentication required|"
                            r"denied", re.I)


class ConfigError(ValueError):
    """The deploy settings cannot work (missing key, bad known_hosts, unknown secret)."""


class ServerFailed(Exception):
    def __init__(self, server: str, reason: str, rolled_back: bool, note: str = "",
                 digest: str = ""):
        self.server = server
        self.reason = reason
        self.rolled_back = rolled_back
        self.note = note
        self.digest = digest
        super().__init__(f"{server}: {reason}")


@dataclass
class _Switch:
    target: Target
    release: Release
    spec: ContainerSpec
    status: str = "deployed"  # deployed | unchanged
    old_name: str | None = None
    old_id: str = ""
    new_id: str = ""
    old_digest: str = ""
    old_was_running: bool = False
    old_stopped: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0


UNTOUCHED = "nothing was changed on this server"
_SCRATCH_TAIL = "--[0-9a-f]{32}"  # after the app name, in `_scratch_path` names
STALE_LOGIN_AGE = 3600.0  # seconds; far longer than any pull


def _sweep(sftp, directory: str, pattern: str, min_age: float = 0.0) -> None:
    """Remove the entries of `directory` whose whole name matches `pattern` and that are at
    least `min_age` seconds old."""
    try:
        entries = sftp.listdir_attr(directory)
    except FileNotFoundError:
        return
    for e in entries:
        if re.fullmatch(pattern, e.filename) and time.time() - (e.st_mtime or 0) >= min_age:
            path = f"{directory}/{e.filename}"
            if stat.S_ISDIR(e.st_mode or 0):
                _remove_tree(sftp, path)
            else:
                sftp.remove(path)


def _remove_tree(sftp, path: str) -> None:
    """A login dir: docker writes only files into it."""
    try:
        names = sftp.listdir(path)
    except FileNotFoundError:
        return
    for n in names:
        sftp.remove(f"{path}/{n}")
    sftp.rmdir(path)


def _safe(text: str, limit: int = 24) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]", "-", text) or "x")[:limit]


class SSHDockerDeployer(Deployer):
    def __init__(
        self,
        stage: DeployStage,
        *,
        pipeline: str,
        image_name: str,
        run_id: str,
        release: Release | None = None,
        secret: Callable[[str], str] | None = None,
        log: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ):
        self.stage = stage
        self.pipeline = pipeline
        self.image_name = image_name
        self.run_id = run_id
        self.release = release
        self.app = app_name(stage, pipeline)
        self.targets = targets(stage)
        self._secret = secret
        self._log = log or (lambda line: None)
        self._log_lock = threading.Lock()
        self.cancel = cancel or threading.Event()
        self._opts: SSHOptions | None = None
        self._conns: dict[str, Connection] = {}
        self._conns_lock = threading.Lock()
        self._leases: dict[str, locks.Lease] = {}
        self._homes: dict[str, str] = {}
        self._shield = threading.local()

    # ---------------------------------------------------------------- helpers

    def log(self, text: str) -> None:
        with self._log_lock:
            self._log(text)

    def _secret_value(self, name: str) -> str:
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
                passphrase = (self._secret_value(s.key_passphrase_secret)
                              if s.key_passphrase_secret else None)
                key = load_private_key(
                    path=s.key_file,
                    text=self._secret_value(s.key_secret) if s.key_secret else None,
                    passphrase=passphrase)
                policy = HostKeyPolicy(s.known_hosts, s.host_key, s.insecure_ignore_host_key)
                jump = None
                if s.jump:
                    j = parse_server(s.jump)
                    jump = Target(label=f"jump {j['host']}", host=j["host"],
                                  port=j.get("port", 22), user=j.get("user", s.user))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if s.insecure_ignore_host_key:
                self.log("WARNING: ssh.insecure_ignore_host_key is on: host keys are NOT "
                         "checked, anyone in the network path can impersonate these servers")
            self._opts = SSHOptions(key=key, host_keys=policy,
                                    connect_timeout=s.connect_timeout,
                                    command_timeout=s.command_timeout, retries=s.retries,
                                    jump=jump)
        return self._opts

    def _conn(self, t: Target, fresh: bool = False) -> Connection:
        with self._conns_lock:
            c = self._conns.get(t.label)
        if c is not None and c.alive and not fresh:
            return c
        if c is not None:
            c.close()
        c = connect(t, self.options(), cancel=self._cancel_event(), log=self.log)
        with self._conns_lock:
            self._conns[t.label] = c
        lease = self._leases.get(t.label)
        if lease is not None:
            lease.conn = c  # heartbeat and release go through the new connection
        # Starting the SFTP subsystem costs a server-side login too: do it while the first
        # commands run (errors surface when SFTP is first really used).
        threading.Thread(target=c.warm_sftp, daemon=True).start()
        return c

    def _cancel_event(self) -> threading.Event | None:
        # Undoing a change (restore, cleanup) must not be cut short by the cancel it answers.
        return None if getattr(self._shield, "on", False) else self.cancel

    def _run(self, conn: Connection, argv: list[str], *, check: bool = True,
             stdin: bytes | None = None, timeout: float | None = None):
        return conn.run(argv, stdin=stdin, check=check, timeout=timeout,
                        cancel=self._cancel_event())

    def _inspect(self, conn: Connection, name: str) -> ContainerState | None:
        r = self._run(conn, cmd.inspect_container(name), check=False)
        if not r.ok:
            if "No such" in r.stderr or "no such" in r.stderr or r.stdout.strip() in ("", "[]"):
                return None
            raise CommandFailed(conn.label, r)
        return parse_inspect(r.stdout)

    def _dir(self, conn: Connection) -> str:
        """The runner's directory for this server's docker engine: ~/.runner/engines/<engine id>.
        Keyed by the engine, not the host name, so locks and history follow what they protect
        (two names for one server share them; engines sharing one filesystem do not). The id is a
        hash of the engine's ID and its data root."""
        if conn.label not in self._homes:
            home = conn.sftp_do(lambda sftp: sftp.normalize("."))
            # The predefined `host` network has a random id made when the engine's data root
            # was created: cheap to ask (docker info takes 150+ ms) and unique per engine
            # (the engine ID is not, where engines share /etc/docker/key.json).
            r = self._run(conn, cmd.engine_id(), check=False)
            if not r.ok or not r.stdout.strip():
                r = self._run(conn, cmd.engine_info())
            engine = hashlib.sha256(r.stdout.strip().encode()).hexdigest()[:16]
            self._homes[conn.label] = f"{home}/{locks.BASE_DIR}/engines/{engine}"
        return self._homes[conn.label]

    def _parallel(self, fn: Callable, items: list) -> list:
        """fn(item) for each item, in parallel; returns results or the exceptions raised."""
        if not items:
            return []

        def wrap(item):
            try:
                return fn(item)
            except BaseException as exc:  # collected, re-raised by the caller if it must
                return exc
        with ThreadPoolExecutor(max_workers=min(self.stage.parallel, len(items))) as pool:
            return list(pool.map(wrap, items))

    def close(self) -> None:
        for lease in list(self._leases.values()):
            lease.release()
        self._leases.clear()
        with self._conns_lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()

    # ---------------------------------------------------------------- plan

    def plan(self) -> DeployPlan:
        release = self.release or Release(ref=f"{self.image_name}@{PLACEHOLDER_DIGEST}",
                                          pipeline=self.pipeline, run_id=self.run_id)
        spec = container_spec(self.stage, release)
        prev = f"{spec.name}_prev_{_safe(self.run_id)}"
        env_file = (f"~/{locks.BASE_DIR}/engines/<engine id>/env/{spec.name}--<random>.env"
                    if spec.has_env else None)
        steps = []
        if self.stage.registry.username:
            steps.append(cmd.login(self.image_name.split("/")[0], self.stage.registry.username))
        steps += [cmd.pull(spec.image), cmd.rename(spec.name, prev)]
        if spec.ports:
            steps.append(cmd.stop(prev, spec.stop_timeout))
        steps += [cmd.run(spec, env_file=env_file), cmd.remove(prev)]

        def show(argv):
            return tuple(a.replace(PLACEHOLDER_DIGEST, "<digest pushed by this run>")
                         if self.release is None else a for a in argv)
        servers = tuple(ServerPlan(t.label, f"{t.user}@{t.host}:{t.port}",
                                   tuple(show(a) for a in steps)) for t in self.targets)
        notes = ["rename/stop/remove of the previous container happen only if one runs",
                 f"health: {spec.health.kind}, up to {spec.health.timeout:g}s per server",
                 f"keeps the last {self.stage.keep_versions} versions on each server"]
        return DeployPlan(
            app=self.app, image=show([spec.image])[0], strategy=self.stage.strategy.type,
            on_failure=self.stage.strategy.on_failure,
            batches=tuple(tuple(t.label for t in b) for b in
                          batches(self.targets, self.stage.strategy.type,
                                  self.stage.strategy.batch_size)),
            servers=servers, notes=tuple(notes))

    # ---------------------------------------------------------------- apply

    def apply(self, plan: DeployPlan | None = None) -> DeployReport:
        if self.release is None:
            raise ConfigError("no release to deploy: the push stage did not produce a digest")
        split_ref(self.release.ref)
        return self._rollout({t.label: self.release for t in self.targets}, "deploy")

    def _rollout(self, releases: dict[str, Release], what: str) -> DeployReport:
        self.options()  # configuration errors before touching anything
        results: dict[str, ServerResult] = {}
        done: list[_Switch] = []
        plan_batches = batches(tuple(t for t in self.targets if t.label in releases),
                               self.stage.strategy.type, self.stage.strategy.batch_size)
        start = time.monotonic()
        try:
            for n, batch in enumerate(plan_batches, 1):
                if len(plan_batches) > 1:
                    self.log(f"batch {n}/{len(plan_batches)}: {', '.join(t.label for t in batch)}")
                failed: dict[str, ServerFailed] = {}
                cancelled: BaseException | None = None
                prepared = self._parallel(lambda t: self._prepare(t, releases[t.label]),
                                          list(batch))
                for t, r in zip(batch, prepared):
                    if isinstance(r, (Cancelled, KeyboardInterrupt)):
                        cancelled = r
                    elif isinstance(r, BaseException):
                        failed[t.label] = self._as_failure(t, r, touched=False)
                switched: list[_Switch] = []
                if not failed and cancelled is None:
                    outcomes = self._parallel(lambda t: self._switch(t, releases[t.label]),
                                              list(batch))
                    for t, r in zip(batch, outcomes):
                        if isinstance(r, _Switch):
                            switched.append(r)
                        elif isinstance(r, (Cancelled, KeyboardInterrupt)):
                            cancelled = r
                        elif isinstance(r, BaseException):
                            failed[t.label] = self._as_failure(t, r, touched=True)
                if not failed and cancelled is None:
                    done += switched
                    for s in switched:
                        self.log(f"{s.target.label}: {s.status} "
                                 f"{s.release.digest[:19]} (healthy)")
                    continue
                # The batch failed: undo it, and the earlier batches unless keep_done.
                undo = list(switched)
                keep = self.stage.strategy.on_failure == "keep_done" and cancelled is None
                undo += [] if keep else done
                restored = self._parallel(self._restore, undo)
                for s, note in zip(undo, restored):
                    note = note if isinstance(note, str) else f"ROLLBACK FAILED: {note}"
                    if s.status == "unchanged":
                        results[s.target.label] = self._done_result(s)
                        continue
                    reason = ("rolled back: cancelled" if cancelled is not None
                              else "rolled back: another server of the rollout failed")
                    results[s.target.label] = ServerResult(
                        s.target.label, "rolled_back" if "FAILED" not in note else "failed",
                        digest=s.old_digest, previous_digest=s.old_digest,
                        rolled_back="FAILED" not in note, reason=f"{reason}; {note}",
                        duration=time.monotonic() - s.started)
                if keep:
                    self._commit_all(done)
                    for s in done:
                        results[s.target.label] = self._done_result(s)
                for label, f in failed.items():
                    results[label] = ServerResult(
                        label, "failed", digest=f.digest, rolled_back=f.rolled_back,
                        reason=f.reason + (f"; {f.note}" if f.note else ""),
                        duration=time.monotonic() - start)
                for t in self.targets:
                    if t.label in releases and t.label not in results:
                        results[t.label] = ServerResult(t.label, "skipped",
                                                        reason="not changed: the rollout stopped")
                if cancelled is not None:
                    raise cancelled
                report = self._report(results, ok=False)
                names = ", ".join(failed)
                changed = any(s.status != "unchanged" for s in undo) or any(
                    not f.note.startswith(UNTOUCHED) for f in failed.values())
                raise DeployFailed(report, f"{what} of {self.app} failed on {names}; "
                                           + ("servers already done were kept" if keep
                                              else "every changed server was rolled back"
                                              if changed else "nothing was changed on any server"))
            self._commit_all(done)
            for s in done:
                results[s.target.label] = self._done_result(s)
            return self._report(results, ok=True)
        finally:
            for label, lease in list(self._leases.items()):
                lease.release()
                self.log(f"{label}: deploy lock released (run {self.run_id})")
            self._leases.clear()

    def _report(self, results: dict[str, ServerResult], ok: bool) -> DeployReport:
        order = [t.label for t in self.targets if t.label in results]
        return DeployReport(self.app, tuple(results[k] for k in order), ok)

    def _done_result(self, s: _Switch) -> ServerResult:
        return ServerResult(s.target.label, s.status, digest=s.release.digest,
                            previous_digest=s.old_digest,
                            duration=(s.finished or time.monotonic()) - s.started)

    def _as_failure(self, t: Target, exc: BaseException, touched: bool) -> ServerFailed:
        if isinstance(exc, ServerFailed):
            return exc
        if isinstance(exc, TransportError):
            reason = exc.reason
        elif isinstance(exc, ConfigError):
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        note = UNTOUCHED if not touched else ""
        return ServerFailed(t.label, reason, rolled_back=False, note=note)

    # ---------------------------------------------------------------- per server

    def _prepare(self, t: Target, release: Release) -> None:
        """Connect, log in, pull (harmless: nothing running changes), then take the lock and
        recover from an interrupted deploy."""
        conn = self._conn(t)
        self._pull(conn, release)
        root = self._dir(conn)
        holder = locks.holder_info(self.run_id, self.pipeline, release.commit,
                                   self.stage.lock.ttl)
        lease = locks.acquire(conn, f"{root}/locks", self.app, holder, ttl=self.stage.lock.ttl,
                              wait=self.stage.lock.wait, cancel=self.cancel, log=self.log)
        self._leases[t.label] = lease
        self.log(f"{t.label}: deploy lock taken (run {self.run_id})")
        self._recover(conn)

    def _pull(self, conn: Connection, release: Release) -> None:
        present = self._run(conn, cmd.image_present(release.ref), check=False)
        if present.ok:
            return
        registry = release.name.split("/")[0]
        user = self.stage.registry.username
        auth_dir = None
        try:
            if user:
                auth_dir = self._login(conn, registry, user)
            t0 = time.monotonic()
            r = self._run(conn, cmd.pull(release.ref, config=auth_dir), check=False)
        finally:
            if auth_dir:
                self._forget_login(conn, auth_dir)
        if not r.ok:
            tail = " ".join(r.output.splitlines()[-3:])
            reason = f"pulling {release.ref} failed: {tail}"
            if _REGISTRY_AUTH.search(tail):
                reason += (f"; registry {registry} refused the server's login as {user!r}"
                           if user else
                           f"; registry {registry} wants a login: set "
                           "stages.deploy.registry.username and password")
            raise ServerFailed(conn.label, reason, rolled_back=False,
                               note=UNTOUCHED)
        self.log(f"{conn.label}: pulled {release.digest[:19]} in {time.monotonic() - t0:.1f}s")

    def _login(self, conn: Connection, registry: str, user: str) -> str:
        """`docker login` into a docker config dir of this deploy's own (0700), so that the
        registry password is not left behind in the server's ~/.docker/config.json."""
        password = self._secret_value(self.stage.registry.password_secret or "")
        auth_dir = self._scratch_path(conn, "auth")
        conn.sftp_do(lambda sftp: sftp.mkdir(auth_dir, 0o700))
        r = self._run(conn, cmd.login(registry, user, config=auth_dir),
                      stdin=password.encode(), check=False)
        if not r.ok:
            self._forget_login(conn, auth_dir)
            tail = " ".join(r.output.splitlines()[-3:])
            raise ServerFailed(conn.label, f"docker login to {registry} as {user!r} failed: "
                               f"{tail}; check stages.deploy.registry", rolled_back=False,
                               note=UNTOUCHED)
        return auth_dir

    def _forget_login(self, conn: Connection, auth_dir: str) -> None:
        try:
            conn.sftp_do(lambda sftp: _remove_tree(sftp, auth_dir))
        except (OSError, TransportError) as exc:
            self.log(f"{conn.label}: WARNING: could not remove the login in {auth_dir} "
                     f"({exc}); the next deploy of {self.app} removes it")

    def _scratch_path(self, conn: Connection, kind: str, suffix: str = "") -> str:
        """A fresh name `<app>--<random><suffix>` in the runner's 0700 dir `<root>/<kind>` on the
        server, for a secret that lives only as long as one command: if a run dies before removing
        it, `_recover` of the next deploy of this app finds it by that form."""
        directory = f"{self._dir(conn)}/{kind}"
        conn.ensure_private_dir(directory)
        return f"{directory}/{self.app}--{uuid.uuid4().hex}{suffix}"

    def _recover(self, conn: Connection) -> None:
        """A deploy interrupted mid-way (connection lost) may have left the previous container
        renamed aside: put it back before anything else."""
        root = self._dir(conn)
        own = re.escape(self.app) + _SCRATCH_TAIL
        # Env files left by a run that died between writing and removing them; logins left by
        # one that died before its pull ended: only old ones, as pulls run before the lock and
        # another run may be pulling right now.
        conn.sftp_do(lambda sftp: _sweep(sftp, f"{root}/env", own + r"\.env"))
        conn.sftp_do(lambda sftp: _sweep(sftp, f"{root}/auth", own, STALE_LOGIN_AGE))
        r = self._run(conn, cmd.list_app_containers(self.app))
        names = set(r.stdout.split())
        leftovers = sorted(n for n in names if n.startswith(f"{self.app}_prev_"))
        if not leftovers:
            return
        if self.app in names:
            for n in leftovers:  # the new one made it; the old one was never removed
                self._run(conn, cmd.remove(n), check=False)
            return
        newest = leftovers[-1]
        self.log(f"{conn.label}: an interrupted deploy left {newest} aside; restoring it")
        self._run(conn, cmd.rename(newest, self.app))
        self._run(conn, cmd.start(self.app), check=False)

    def _switch(self, t: Target, release: Release) -> _Switch:
        conn = self._conn(t)
        spec = container_spec(self.stage, release)
        cur = self._inspect(conn, spec.name)
        sw = _Switch(t, release, spec)
        if cur is not None:
            sw.old_digest = cur.labels.get(LABEL_DIGEST, "")
            if (sw.old_digest == release.digest and cur.running
                    and cur.labels.get(LABEL_SPEC) == spec.label_map[LABEL_SPEC]
                    and cur.health != "unhealthy" and cur.restart_count == 0):
                sw.status = "unchanged"
                sw.finished = time.monotonic()
                return sw
            sw.old_name = f"{spec.name}_prev_{_safe(self.run_id)}"
            sw.old_id = cur.id
            sw.old_was_running = cur.running
            self._run(conn, cmd.rename(spec.name, sw.old_name))
        try:
            if sw.old_name and sw.old_was_running and spec.ports:
                self._run(conn, cmd.stop(sw.old_name, spec.stop_timeout),
                          timeout=spec.stop_timeout + 30)
                sw.old_stopped = True
            sw.new_id = self._start(conn, spec)
            verdict = self._wait(conn, spec)
            if not verdict.healthy:
                raise ServerFailed(t.label, self._unhealthy_reason(conn, spec, verdict),
                                   rolled_back=False)
            if sw.old_name and sw.old_was_running and not sw.old_stopped:
                self._run(conn, cmd.stop(sw.old_name, spec.stop_timeout),
                          timeout=spec.stop_timeout + 30)
                sw.old_stopped = True
            sw.finished = time.monotonic()
            return sw
        except BaseException as exc:
            note = self._restore(sw)
            if isinstance(exc, (Cancelled, KeyboardInterrupt)):
                raise
            failure = self._as_failure(t, exc, touched=True)
            failure.note = note
            failure.rolled_back = not note.startswith("ROLLBACK FAILED")
            failure.digest = sw.old_digest if failure.rolled_back else ""
            raise failure from None

    def _start(self, conn: Connection, spec: ContainerSpec) -> str:
        env_path = None
        if spec.has_env:
            values = dict(spec.env)
            for var, secret_name in spec.secret_env:
                values[var] = self._secret_value(secret_name)
            env_path = self._scratch_path(conn, "env", ".env")
            conn.write_private_file(env_path, env_file_content(values))
        try:
            r = self._run(conn, cmd.run(spec, env_file=env_path), check=False,
                          timeout=self.stage.ssh.command_timeout)
        finally:
            if env_path:
                conn.remove_file(env_path)
        if not r.ok:
            raise ServerFailed(conn.label, f"docker run failed: {r.output[-500:]}",
                               rolled_back=False)
        self.log(f"{conn.label}: started {spec.name} ({spec.image.split('@')[1][:19]}); "
                 f"waiting for health ({spec.health.kind}, up to {spec.health.timeout:g}s)")
        return r.stdout.strip()

    def _probe(self, conn: Connection, spec: ContainerSpec) -> Callable[[ContainerState],
                                                                         ProbeResult] | None:
        h = spec.health
        timeout = h.probe_timeout
        if h.kind == "cmd":
            argv = cmd.probe(spec.name, ["CMD-SHELL", h.cmd or ""])
        elif h.kind == "http":
            forwarding = [True]

            def http(state: ContainerState) -> ProbeResult:
                host = state.ip or "127.0.0.1"
                if forwarding[0]:
                    try:
                        raw = http_get(conn, host, h.http_port or 80, h.http_path, timeout)
                    except paramiko.ChannelException as exc:
                        if exc.code == 1:  # administratively prohibited: no TCP forwarding
                            forwarding[0] = False
                        return ProbeResult(False, f"connection to {host}:{h.http_port} "
                                                  f"from the server failed: {exc.text}")
                    except (OSError, EOFError, paramiko.SSHException) as exc:
                        return ProbeResult(False, f"HTTP probe failed: {exc}")
                    status = parse_http_status(raw)
                    head = raw.split(b"\r\n", 1)[0].decode("utf-8", "replace")
                    body = raw.split(b"\r\n\r\n", 1)[-1][:200].decode("utf-8", "replace")
                    return ProbeResult(status in h.http_status,
                                       f"GET {h.http_path} -> {head or 'no response'} {body}")
                r = self._run(conn, cmd.http_probe(spec.name, h.http_port or 80, h.http_path,
                                                   timeout), check=False, timeout=timeout + 5)
                return ProbeResult(r.ok, r.output[-500:])
            return http
        else:
            argv = None

        def run_test(state: ContainerState) -> ProbeResult:
            test = argv
            if test is None:
                if not state.healthcheck_test:
                    return ProbeResult(False, "")
                test = cmd.probe(spec.name, list(state.healthcheck_test))
            r = self._run(conn, test, check=False, timeout=timeout + 5)
            return ProbeResult(r.ok, r.output[-500:] or f"exit status {r.status}")

        if h.kind == "image":
            # Without a HEALTHCHECK in the image there is nothing to probe: the poller falls
            # back to "stays up for min_uptime".
            def image_probe(state: ContainerState) -> ProbeResult:
                return run_test(state) if state.healthcheck_test else ProbeResult(False, "")
            first = self._inspect(conn, spec.name)
            return image_probe if first is not None and first.healthcheck_test else None
        return run_test

    def _wait(self, conn: Connection, spec: ContainerSpec) -> Verdict:
        return wait_healthy(inspect=lambda: self._inspect(conn, spec.name),
                            probe=self._probe(conn, spec), health=spec.health,
                            cancel=self.cancel)

    def _unhealthy_reason(self, conn: Connection, spec: ContainerSpec, v: Verdict) -> str:
        reason = f"health check failed: {v.reason}"
        if v.last_probe:
            reason += f"; last probe: {v.last_probe[-300:]!r}"
        try:
            r = self._run(conn, cmd.logs(spec.name, 10), check=False, timeout=15)
            tail = r.output.strip()
            reason += f"; logs tail: {tail[-600:]!r}" if tail else "; logs: (empty)"
        except TransportError:
            pass
        return reason

    def _restore(self, sw: _Switch) -> str:
        """Remove the new container and put the previous one back exactly as it was.
        Idempotent (each step checks what is there first), so a second attempt over a new
        connection after the first one dropped is safe. Returns a note; never raises."""
        t, name = sw.target, sw.spec.name
        if sw.status == "unchanged":
            return "unchanged"
        self._shield.on = True
        try:
            for attempt in (1, 2):
                try:
                    return self._restore_once(sw, self._conn(t, fresh=attempt == 2))
                except (TransportError, OSError, EOFError, paramiko.SSHException) as exc:
                    if attempt == 2:
                        return (f"ROLLBACK FAILED: {exc}; the previous container is kept as "
                                f"{sw.old_name or name}, the next deploy restores it")
            return "ROLLBACK FAILED"
        finally:
            self._shield.on = False

    def _restore_once(self, sw: _Switch, conn: Connection) -> str:
        t, name = sw.target, sw.spec.name
        current = self._inspect(conn, name)
        if current is not None and (not sw.old_id or current.id != sw.old_id):
            self._run(conn, cmd.remove(name), check=False)  # the new one (or its remains)
            current = None
        if not sw.old_name:
            return "rolled back: new container removed (there was no previous one)"
        if current is None:
            self._run(conn, cmd.rename(sw.old_name, name))
        if sw.old_was_running:
            self._run(conn, cmd.start(name))
            st = self._inspect(conn, name)
            if st is None or not st.running:
                return (f"ROLLBACK FAILED: the previous container {name} did not "
                        f"start again ({st.status if st else 'gone'})")
        self.log(f"{t.label}: rolled back to the previous container "
                 f"({sw.old_digest[:19] or 'unlabelled'})")
        return (f"rolled back: previous version {sw.old_digest[:19] or name} "
                f"{'running' if sw.old_was_running else 'restored'} again")

    # ---------------------------------------------------------------- commit

    def _commit_all(self, switches: list[_Switch]) -> None:
        results = self._parallel(self._commit, switches)
        for s, r in zip(switches, results):
            if isinstance(r, BaseException):
                self.log(f"{s.target.label}: warning: cleanup after the deploy failed: {r}")

    def _commit(self, sw: _Switch) -> None:
        self._shield.on = True
        try:
            self._commit_once(sw, self._conn(sw.target))
        finally:
            self._shield.on = False

    def _commit_once(self, sw: _Switch, conn: Connection) -> None:
        if sw.old_name:
            self._run(conn, cmd.remove(sw.old_name), check=False)
        history = self._history(conn)
        entry = {"digest": sw.release.digest, "ref": sw.release.ref,
                 "commit": sw.release.commit, "run_id": sw.release.run_id,
                 "pipeline": sw.release.pipeline, "time": time.time()}
        if sw.status == "unchanged" and history and history[-1]["digest"] == sw.release.digest:
            return
        history = [h for h in history if h.get("digest") != sw.release.digest] + [entry]
        keep = self.stage.keep_versions
        dropped, history = history[:-keep], history[-keep:]
        self._write_history(conn, history)
        for h in dropped:
            r = self._run(conn, cmd.remove_image(h["ref"]), check=False)
            if r.ok:
                self.log(f"{conn.label}: pruned {h['digest'][:19]}")

    def _history_path(self, conn: Connection) -> str:
        return f"{self._dir(conn)}/apps/{self.app}/history.json"

    def _history(self, conn: Connection) -> list[dict]:
        path = self._history_path(conn)

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

    def _write_history(self, conn: Connection, history: list[dict]) -> None:
        conn.ensure_private_dir(f"{self._dir(conn)}/apps/{self.app}")
        path = self._history_path(conn)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        data = json.dumps(history, indent=1).encode()

        def op(sftp):
            with sftp.open(tmp, "w") as f:
                f.write(data)
            sftp.posix_rename(tmp, path)
        conn.sftp_do(op)

    # ---------------------------------------------------------------- rollback / verify

    def rollback(self, to: str | None = None) -> DeployReport:
        """Back to the previous version recorded on each server, or to digest `to`."""
        self.options()
        releases: dict[str, Release] = {}
        problems: dict[str, ServerResult] = {}

        def pick(t: Target) -> Release:
            conn = self._conn(t)
            history = self._history(conn)
            cur = self._inspect(conn, self.app)
            current = cur.labels.get(LABEL_DIGEST, "") if cur else ""
            if to:
                digest = to if to.startswith("sha256:") else f"sha256:{to}"
                entry = next((h for h in reversed(history) if h["digest"] == digest), None)
                ref = entry["ref"] if entry else f"{self.image_name}@{digest}"
            else:
                older = [h for h in history if h["digest"] != current]
                if not older:
                    raise ServerFailed(t.label, "no previous version is recorded on this server",
                                       rolled_back=False)
                entry = older[-1]
                ref = entry["ref"]
            return Release(ref=ref, pipeline=self.pipeline,
                           run_id=f"rollback-{self.run_id}",
                           commit=(entry or {}).get("commit", ""))

        picked = self._parallel(pick, list(self.targets))
        for t, r in zip(self.targets, picked):
            if isinstance(r, Release):
                releases[t.label] = r
                self.log(f"{t.label}: rolling back to {r.digest[:19]}")
            elif isinstance(r, (Cancelled, KeyboardInterrupt)):
                raise r
            else:
                f = self._as_failure(t, r, touched=False)
                problems[t.label] = ServerResult(t.label, "failed", reason=f.reason)
        if problems:
            raise DeployFailed(self._report(problems, ok=False),
                               f"rollback of {self.app} not started: "
                               f"{', '.join(problems)} cannot be rolled back")
        return self._rollout(releases, "rollback")

    def verify(self) -> list[ServerStatus]:
        def one(t: Target) -> ServerStatus:
            try:
                conn = self._conn(t)
                st = self._inspect(conn, self.app)
            except (TransportError, ConfigError) as exc:
                return ServerStatus(t.label, self.app, error=str(exc))
            if st is None:
                return ServerStatus(t.label, self.app, status="absent")
            return ServerStatus(t.label, self.app, running=st.running, status=st.status,
                                health=st.health, digest=st.labels.get(LABEL_DIGEST, ""),
                                commit=st.labels.get(LABEL_COMMIT, ""),
                                run_id=st.labels.get(LABEL_RUN, ""), started_at=st.started_at)
        out = self._parallel(one, list(self.targets))
        return [r if isinstance(r, ServerStatus) else
                ServerStatus(t.label, self.app, error=f"{type(r).__name__}: {r}")
                for t, r in zip(self.targets, out)]


    # ---------------------------------------------------------------- locks, on purpose

    def lock_status(self) -> list[tuple[str, locks.LockInfo | None, str]]:
        """(server, holder or None, error) for this app's deploy lock on every server."""
        def one(t: Target):
            conn = self._conn(t)
            return locks.inspect(conn, f"{self._dir(conn)}/locks", self.app)
        out = self._parallel(one, list(self.targets))
        return [(t.label, None, f"{r}") if isinstance(r, BaseException) else (t.label, r, "")
                for t, r in zip(self.targets, out)]

    def break_lock(self, server: str | None = None) -> list[tuple[str, bool, str]]:
        """Break this app's lock (on one server or all): (server, broken, error)."""
        chosen = [t for t in self.targets if server in (None, t.label, t.host)]

        def one(t: Target):
            conn = self._conn(t)
            return locks.break_lock(conn, f"{self._dir(conn)}/locks", self.app)
        out = self._parallel(one, chosen)
        return [(t.label, False, f"{r}") if isinstance(r, BaseException) else (t.label, r, "")
                for t, r in zip(chosen, out)]


def deployer_for(stage: DeployStage, **kwargs) -> SSHDockerDeployer:
    return SSHDockerDeployer(stage, **kwargs)


__all__ = ["ConfigError", "SSHDockerDeployer", "ServerFailed", "deployer_for"]
