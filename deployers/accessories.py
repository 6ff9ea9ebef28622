"""Accessories on their servers: boot, reboot, remove, status, logs and exec over SSH, and the
deploy's check that they run. Runs the commands of deployers.accessory_plan, nothing else
(the deploy's check is deployers.accessory_check).

- boot: a container of the accessory with this very spec (its fingerprint label) that runs is
  left alone and said so; one that is stopped is started again; one with another spec is not
  touched (`reboot` replaces it). Absent: the runner's network and the named volumes are made
  if missing, the container starts with its env through a 0600 file removed right after
  `docker run`, and boot waits for its health (healthcheck.cmd, else the image's HEALTHCHECK,
  else staying up 2 s).
- reboot: stop (a clean shutdown), remove the container, then boot: the volumes stay.
- remove: stop and remove the container; with volumes=True its named volumes too.

There is no lock: docker refuses a second container of one name, so two boots at once fail
rather than run twice. Secret values go only into the env file; nothing logged holds one.
"""
from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from runner.errors import Cancelled
from runner.model import Pipeline

from deployers import commands as cmd
from deployers.accessory_plan import (CONTAINER, ENV_FILE, LABEL_ACCESSORY, LABEL_SPEC,
                                      AccessoryPlan, AccessorySpec, accessory_specs,
                                      plan_accessory)
from deployers.accessory_check import states
from deployers.health import ContainerState, ProbeResult, wait_healthy
from deployers.lock import BASE_DIR
from deployers.remote_files import sweep
from deployers.spec import Target, env_file_content
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_connect import connect
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

_ENV_DIR = "accessories/env"  # under ~/.runner on the server, 0700


class AccessoryError(Exception):
    """An accessory could not be brought where it was asked to be, on one server."""

    def __init__(self, server: str, reason: str):
        self.server, self.reason = server, reason
        super().__init__(f"{server}: {reason}")


# ------------------------------------------------------------------------- the commands

@dataclass(frozen=True)
class Row:
    """What `status` says of one accessory on one server."""

    accessory: str
    server: str
    container: str
    state: str  # running, exited, ..., "absent"
    health: str | None = None
    image: str = ""
    same_spec: bool = False  # runs with the pipeline's current settings
    volumes: tuple[str, ...] = ()
    error: str = ""


class Accessories:
    """The accessories of one pipeline on their servers, over SSH with the deploy's settings
    (stages.deploy.ssh)."""

    def __init__(self, pipeline: Pipeline, *, secret: Callable[[str], str] | None = None,
                 log: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None):
        self.specs = accessory_specs(pipeline)
        # The deployer resolves the servers and the SSH options exactly as a deploy does.
        self._ssh = SSHDockerDeployer(pipeline.stages.deploy, pipeline=pipeline.name,
                                      image_name=pipeline.image.name, run_id="accessory",
                                      secret=secret, log=log)
        self.targets = {t.label: t for t in self._ssh.targets}
        self.log = log or (lambda line: None)
        self.cancel = cancel or threading.Event()
        self._conns: dict[str, Connection] = {}
        self._lock = threading.Lock()

    def options(self):
        """The SSH options; raises deployers.ssh_docker.ConfigError for settings that cannot
        work (a missing key file, an unknown secret)."""
        return self._ssh.options()

    @property
    def command_timeout(self) -> float:
        return self._ssh.stage.ssh.command_timeout

    def plans(self, names: list[str]) -> list[AccessoryPlan]:
        """One plan per accessory named and server it runs on, in the pipeline's order."""
        return [plan_accessory(self.specs[n], self.targets[s])
                for n in names for s in self.specs[n].servers]

    def conn(self, target: Target) -> Connection:
        with self._lock:
            c = self._conns.get(target.label)
        if c is not None and c.alive:
            return c
        c = connect(target, self.options(), cancel=self.cancel, log=self.log)
        with self._lock:
            self._conns[target.label] = c
        return c

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()

    def _run(self, p: AccessoryPlan, argv: list[str], *, check: bool = False,
             stdin: bytes | None = None):
        return self.conn(p.target).run(argv, check=check, stdin=stdin, cancel=self.cancel)

    def state(self, p: AccessoryPlan) -> ContainerState | None:
        r = self._run(p, p.argv("inspect"))
        return states(r.stdout).get(p.spec.container) if r.ok else None

    # ---------------------------------------------------------------- boot

    def boot(self, p: AccessoryPlan) -> str:
        """What boot did on the server (a sentence). Raises AccessoryError, TransportError."""
        spec, st = p.spec, self.state(p)
        if st is not None:
            if LABEL_ACCESSORY not in st.labels:
                raise AccessoryError(p.server, f"a container named {spec.container} is there "
                                               f"that the runner did not boot as an accessory; "
                                               f"remove or rename it first")
            if st.labels.get(LABEL_SPEC) != spec.fingerprint:
                raise AccessoryError(p.server, f"{spec.container} runs with other settings "
                                               f"than the pipeline's; `runner accessory reboot` "
                                               f"replaces it (its volumes stay)")
            if st.running and st.status != "restarting":
                return f"already running with these settings ({st.status}); not restarted"
            was = st.status
            self._run(p, p.argv("start"), check=True)
            self._wait(p, st.id)
            return f"started again (it was {was})"
        self._create(p)
        return f"booted ({spec.image})"

    def _create(self, p: AccessoryPlan) -> None:
        spec = p.spec
        conn = self.conn(p.target)
        if not self._run(p, cmd.network_inspect()).ok:
            r = self._run(p, p.argv("network"))
            if not r.ok and "already exists" not in r.output:
                raise AccessoryError(p.server, f"cannot create the runner's network: "
                                               f"{r.output}")
        for volume in spec.volume_names:
            self._run(p, p.argv(f"volume:{volume}"), check=True)
        env_path = None
        values = {}
        if spec.env or spec.secret_env:
            env = dict(spec.env)
            for var, secret in spec.secret_env:
                env[var] = self._ssh.secret_value(secret)
            directory = conn.sftp_do(lambda sftp: sftp.normalize(".")) + f"/{BASE_DIR}/{_ENV_DIR}"
            conn.ensure_private_dir(directory)
            # A boot that died between writing and removing its file left it: gone now.
            own = re.escape(spec.container) + r"--[0-9a-f]{32}\.env"
            conn.sftp_do(lambda sftp: sweep(sftp, directory, own))
            env_path = f"{directory}/{spec.container}--{uuid.uuid4().hex}.env"
            conn.write_private_file(env_path, env_file_content(env))
            values[ENV_FILE] = env_path
        try:
            r = self._run(p, p.argv("run", values))
        finally:
            if env_path:
                conn.remove_file(env_path)
        if not r.ok:
            raise AccessoryError(p.server, f"docker run failed: {r.output[-500:]}")
        self._wait(p, r.stdout.strip().splitlines()[-1])

    def _wait(self, p: AccessoryPlan, cid: str) -> None:
        h = p.spec.health

        def inspect() -> ContainerState | None:
            r = self._run(p, [str(w) for w in cmd.inspect_container(cid)])
            return next(iter(states(r.stdout).values()), None) if r.ok else None

        probe = None
        if h.kind == "cmd":
            argv = p.argv("probe", {CONTAINER: cid})

            def probe(state: ContainerState) -> ProbeResult:
                r = self._run(p, argv)
                return ProbeResult(r.ok, r.output[-300:] or f"exit status {r.status}")
        verdict = wait_healthy(inspect=inspect, probe=probe, health=h, cancel=self.cancel)
        if not verdict.healthy:
            logs = self._run(p, p.argv("logs", {CONTAINER: cid})).output.strip()
            raise AccessoryError(p.server, f"{p.spec.container} did not become healthy: "
                                           f"{verdict.reason}"
                                 + (f"; last probe: {verdict.last_probe[-200:]!r}"
                                    if verdict.last_probe else "")
                                 + (f"; logs tail: {logs[-500:]!r}" if logs else ""))

    # ---------------------------------------------------------------- reboot / remove

    def reboot(self, p: AccessoryPlan) -> str:
        """Replace the container, keeping the volumes. Raises AccessoryError, TransportError."""
        st = self.state(p)
        if st is not None and LABEL_ACCESSORY not in st.labels:
            raise AccessoryError(p.server, f"a container named {p.spec.container} is there "
                                           f"that the runner did not boot as an accessory; "
                                           f"remove or rename it first")
        if st is not None:
            self._drop(p, st)
        self._create(p)
        kept = ", ".join(p.spec.volume_names)
        return ("replaced" if st is not None else "booted (there was none)") + \
            (f"; volumes kept: {kept}" if kept else "")

    def _drop(self, p: AccessoryPlan, st: ContainerState) -> None:
        if st.running:
            self._run(p, p.argv("stop"), check=True)
        self._run(p, p.argv("remove"), check=True)

    def remove(self, p: AccessoryPlan, volumes: bool) -> list[str]:
        """Remove the container (and with `volumes` its named volumes): what was done, each
        said once. Raises AccessoryError, TransportError."""
        st = self.state(p)
        done = []
        if st is not None and LABEL_ACCESSORY not in st.labels:
            raise AccessoryError(p.server, f"the container named {p.spec.container} is not one "
                                           f"the runner booted as an accessory; left alone")
        if st is not None:
            self._drop(p, st)
            done.append(f"removed container {p.spec.container} ({st.status})")
        else:
            done.append(f"no container {p.spec.container} was there")
        for volume in p.spec.volume_names:
            if not volumes:
                done.append(f"kept volume {volume}")
                continue
            r = self._run(p, p.argv(f"volume_rm:{volume}"))
            if r.ok:
                done.append(f"removed volume {volume}")
            elif "no such volume" in r.output.lower():
                done.append(f"no volume {volume} was there")
            else:
                raise AccessoryError(p.server, f"removing volume {volume} failed: {r.output}")
        return done

    # ---------------------------------------------------------------- reading

    def status(self, p: AccessoryPlan) -> Row:
        spec = p.spec
        try:
            st = self.state(p)
        except (TransportError, Cancelled) as exc:
            return Row(spec.name, p.server, spec.container, "unknown",
                       error=getattr(exc, "reason", str(exc)))
        if st is None:
            return Row(spec.name, p.server, spec.container, "absent")
        return Row(spec.name, p.server, spec.container, st.status, st.health, st.image,
                   st.labels.get(LABEL_SPEC) == spec.fingerprint,
                   tuple(m.removeprefix("volume ") for m in st.lasting))


__all__ = ["AccessoryError", "Accessories", "AccessorySpec", "Row"]
