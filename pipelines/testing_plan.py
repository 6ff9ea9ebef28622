"""The test stage as plain values, and their pure conversion into docker API arguments.

As in Woodpecker (one `Step` value every backend runs; the docker backend only converts it): a
step or a service is a `ContainerSpec`, printable as it is (--dry-run shows them, secrets by
name only), and `create_kwargs` turns one into the keyword arguments of the docker SDK's
`containers.create`, the only place a secret's value is added (through the API's body, never a
command line). pipelines/testing.py makes the API calls.

Every container, network and volume the stage creates carries LABEL_TEST and its run's id, the
runner's pid, start time and host (`owner_labels`): what the next test stage reaps when that
runner process is gone (`is_orphan`).
"""
from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.model.testing import StepSettings, TargetImage, TestSettings

LABEL_TEST = "runner.test"
LABEL_RUN = "runner.run"
LABEL_PID = "runner.proc.pid"
LABEL_START = "runner.proc.start_time"
LABEL_HOST = "runner.proc.host"
LABEL_CACHE = "runner.test.cache"
WORKSPACE = "/workspace"
# The container of a step of several commands only waits (sh reading a stdin nobody writes to)
# while they are run in it one by one (`docker exec`): each one's exit code is known, the files
# they leave stay. A step of one command runs it as the container's own process instead, as
# `docker run` does (ContainerSpec.runs_its_command): an exec costs 0.05-0.1 s more.
IDLE_ENTRYPOINT = ("sh",)


@dataclass(frozen=True)
class Owner:
    """The runner process that owns a run's containers."""

    run_id: str
    pid: int
    start_time: int | None
    host: str


def owner_labels(owner: Owner) -> dict[str, str]:
    return {LABEL_TEST: "1", LABEL_RUN: owner.run_id, LABEL_PID: str(owner.pid),
            LABEL_START: "" if owner.start_time is None else str(owner.start_time),
            LABEL_HOST: owner.host}


def is_orphan(labels: Mapping[str, str], host: str,
              start_time_of: Callable[[int], int | None]) -> bool:
    """Whether a labelled object's runner process (on this host) is gone: no such pid, or one
    started at another time (a reused pid). `start_time_of(pid)` -> ticks or None. Objects
    made on another host are never judged from here."""
    if labels.get(LABEL_HOST) != host:
        return False
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return True
    now = start_time_of(pid)
    return now is None or str(now) != labels.get(LABEL_START)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.") or "x"


def network_name(run_id: str) -> str:
    return f"runner-test-{_slug(run_id)}"


def steps_network(settings: TestSettings, owner: Owner) -> str | None:
    """The network the steps join: the run's own when there are services to reach; else none
    of the stage's own (the engine's default, as `docker run` does): creating and removing a
    network costs about 0.3 s, a quarter of a short step's whole stage (bench/test_stage.py)."""
    return network_name(owner.run_id) if settings.services else None


def container_name(run_id: str, role: str, name: str) -> str:
    return f"runner-test-{_slug(run_id)}-{role}-{_slug(name)}"


def cache_volume(pipeline: str, path: str) -> str:
    """The named volume that keeps `path` between runs of `pipeline`: stable, one per both."""
    digest = hashlib.sha256(f"{pipeline}\0{posixpath.normpath(path)}".encode()).hexdigest()[:12]
    return f"runner-cache-{_slug(pipeline)}-{digest}"


def is_cache_volume(pipeline: str, volume: str) -> bool:
    """Whether `volume` is one of `pipeline`'s cache volumes (not another pipeline's whose name
    only starts the same: the digest is matched whole)."""
    return re.fullmatch(rf"runner-cache-{re.escape(_slug(pipeline))}-[0-9a-f]{{12}}", volume) \
        is not None


@dataclass(frozen=True)
class ContainerSpec:
    """One container of the test stage: a service, or a step whose commands are exec'd in it."""

    role: str  # "service" or "step"
    name: str  # the step's or service's name in the pipeline
    container: str  # the docker container's name
    image: str  # an image reference; "<built>" / "<target X>" until the run knows the id
    network: str | None  # None: the engine's default network
    aliases: tuple[str, ...] = ()  # names other containers reach it by
    entrypoint: tuple[str, ...] | None = None
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, str] = field(default_factory=dict)  # VAR -> secret name
    workdir: str | None = None
    user: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    volumes: Mapping[str, str] = field(default_factory=dict)  # volume name -> path
    workspace: bool = False  # the checkout is copied to WORKSPACE before it starts
    commands: tuple[str, ...] = ()  # each run as `sh -c LINE`
    timeout: float = 0
    reports: tuple[str, ...] = ()

    @property
    def runs_its_command(self) -> bool:
        """A step whose one command is the container's own process (no `docker exec`)."""
        return self.role == "step" and self.entrypoint != IDLE_ENTRYPOINT

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "name": self.name, "container": self.container,
                               "image": self.image, "network": self.network,
                               "aliases": list(self.aliases), "env": dict(self.env),
                               "secret_env": dict(self.secret_env), "labels": dict(self.labels),
                               "volumes": dict(self.volumes)}
        for key in ("entrypoint", "command"):
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key))
        if self.workdir:
            out["workdir"] = self.workdir
        if self.user:
            out["user"] = self.user
        if self.role == "step":
            out.update(workspace=self.workspace, commands=list(self.commands),
                       timeout=self.timeout, reports=list(self.reports))
        return out


def step_image(step: StepSettings) -> str:
    """The step's image as the plan says it before the run knows the built image's id."""
    if step.image is None:
        return "<built>"
    if isinstance(step.image, str):
        return step.image
    return f"<target {step.image.target}>"


def service_spec(settings: TestSettings, name: str, owner: Owner) -> ContainerSpec:
    svc = settings.services[name]
    return ContainerSpec(
        role="service", name=name, container=container_name(owner.run_id, "service", name),
        image=svc.image, network=network_name(owner.run_id), aliases=(name,),
        command=svc.command, env=dict(svc.env), secret_env=dict(svc.secret_env),
        labels={**owner_labels(owner), "runner.test.service": name})


def step_spec(settings: TestSettings, index: int, owner: Owner, pipeline: str,
              image: str | None = None) -> ContainerSpec:
    """Step `index` (0-based). `image`: the id the run resolved for it (else as planned)."""
    step = settings.steps[index]
    other = isinstance(step.image, str)
    paths = dict.fromkeys([*settings.cache, *step.cache])
    return ContainerSpec(
        role="step", name=step.name,
        container=container_name(owner.run_id, "step", f"{index + 1}-{step.name}"),
        image=image or step_image(step), network=steps_network(settings, owner),
        entrypoint=tuple(exec_argv(step.commands[0])) if len(step.commands) == 1
        else IDLE_ENTRYPOINT, command=(),
        env=dict(step.env), secret_env=dict(step.secret_env),
        workdir=step.workdir or (WORKSPACE if other else None), user=step.user,
        labels={**owner_labels(owner), "runner.test.step": step.name},
        volumes={cache_volume(pipeline, p): p for p in paths},
        workspace=other, commands=step.commands, timeout=step.timeout, reports=step.reports)


def create_kwargs(spec: ContainerSpec, secret_values: Mapping[str, str]) -> dict[str, Any]:
    """`client.containers.create(**create_kwargs(spec, values))`. `secret_values`: VAR -> value
    for each of spec.secret_env; they go in the API request's body only."""
    env = {**spec.env, **{var: secret_values[var] for var in spec.secret_env}}
    kwargs: dict[str, Any] = {
        "image": spec.image, "name": spec.container, "labels": dict(spec.labels),
        "environment": env, "detach": True,
    }
    if spec.network is not None:
        kwargs["network"] = spec.network
        kwargs["networking_config"] = {spec.network: {"Aliases": list(spec.aliases)}}
    if spec.entrypoint is not None:
        kwargs["entrypoint"] = list(spec.entrypoint)
    if spec.command is not None:
        kwargs["command"] = list(spec.command)
    if spec.workdir:
        kwargs["working_dir"] = spec.workdir
    if spec.user:
        kwargs["user"] = spec.user
    if spec.volumes:
        kwargs["volumes"] = {vol: {"bind": path, "mode": "rw"} for vol, path in spec.volumes.items()}
    if spec.role == "step" and not spec.runs_its_command:
        kwargs["stdin_open"] = True  # the idle `sh` waits on it
    return kwargs


def exec_argv(command: str) -> list[str]:
    """How one of the user's command lines runs in the step's container."""
    return ["sh", "-c", command]


def operations(settings: TestSettings, owner: Owner, pipeline: str) -> list[dict[str, Any]]:
    """The docker operations the stage makes, in order, as data (for --dry-run)."""
    net = steps_network(settings, owner)
    ops: list[dict[str, Any]] = []
    if net is not None:
        ops.append({"op": "network create", "name": net, "labels": owner_labels(owner)})
    for name in settings.services:
        spec = service_spec(settings, name, owner)
        ops.append({"op": "container create+start", **spec.to_dict()})
        svc = settings.services[name]
        if svc.ready is not None:
            ops.append({"op": "wait ready", "service": name, "timeout": svc.timeout,
                        **({"port": svc.ready.port} if svc.ready.port else
                           {"command": list(svc.ready.command or ())})})
    for i, step in enumerate(settings.steps):
        spec = step_spec(settings, i, owner, pipeline)
        if isinstance(step.image, TargetImage):
            ops.append({"op": "build target", "target": step.image.target})
        if spec.runs_its_command:  # its entrypoint is the command
            ops.append({"op": "container create+start+wait", **spec.to_dict()})
        else:
            ops.append({"op": "container create+start", **spec.to_dict()})
            ops.extend({"op": "exec", "container": spec.container, "argv": exec_argv(c)}
                       for c in step.commands)
        if step.reports:
            ops.append({"op": "copy reports", "container": spec.container,
                        "globs": list(step.reports)})
        ops.append({"op": "container remove", "container": spec.container})
    ops.extend({"op": "container remove", "container": container_name(owner.run_id, "service", n)}
               for n in settings.services)
    if net is not None:
        ops.append({"op": "network remove", "name": net})
    return ops

