"""The SSH + Docker deploy target: the docker CLI on each server, over one SSH connection each.

`SSHDockerDeployer` is the facade the stage and the CLI use: plan, apply, rollback, verify, and
what the app's own commands need (connections, the runner's directory per docker engine, the
history, locks, the images the runner pulled, inspecting containers).

`apply` runs the plan through one rollout (deployers.rollout) whose per-server steps
(deployers.base.ServerSteps) are one of two siblings over the same building blocks
(deployers.server_session and the modules it names): deployers.stop_start.StopStartSteps, or,
with `proxy:`, deployers.ssh_proxy.ProxySteps. Both run the commands of the server's plan
(deployers.plan), so `--dry-run` prints what really runs.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable

from runner.errors import Cancelled
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef
from runner.outputs import DeployOutputs, ServerResult

from deployers import commands as cmd
from deployers import history as hist
from deployers import lock as locks
from deployers import pruning
from deployers.base import (DeployFailed, Deployer, DeployPlan, ServerStatus, ServerSteps)
from deployers.config_error import ConfigError
from deployers.health import ContainerState, parse_inspect, parse_state
from deployers.host_keys import HostKeyPolicy
from deployers.plan import Needs, plan_deploy, plan_rollback
from deployers.rollout import UNTOUCHED, headline, parallel, rollout
from deployers.spec import (LABEL_COMMIT, LABEL_DIGEST, LABEL_RUN, Release, Target, app_name,
                            identity_of, record_identity, release_key, targets)
from deployers.ssh_config import UserConfig
from deployers.ssh_connect import connect
from deployers.ssh_connection import CommandFailed, Connection
from deployers.ssh_errors import TransportError
from deployers.ssh_keys import load_private_key
from deployers.ssh_options import SSHOptions
from deployers.ssh_proxy import ProxySteps
from deployers.stop_start import StopStartSteps


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

    def steps(self) -> ServerSteps:
        """The per-server steps of this deploy's cutover."""
        if self.stage.cutover == "proxy":
            return ProxySteps(self)
        return StopStartSteps(self)

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


def deployer_for(stage: DeploySettings, **kwargs) -> SSHDockerDeployer:
    return SSHDockerDeployer(stage, **kwargs)


__all__ = ["ConfigError", "SSHDockerDeployer", "deployer_for"]
