"""What should run on a server, as plain immutable data. Pure: no I/O, no SSH, no docker.

`ContainerSpec` is everything `docker run` needs except the values of secrets: secret
environment variables are carried by name only and resolved at apply time, straight into an env
file on the server. `Target` is one server with its SSH settings resolved.

The spec is deliberately independent of how traffic reaches the container: a later proxy-based
zero-downtime cutover only needs a spec without host `ports` plus a proxy step, not a new spec.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace

from runner.model.deploy import DeployStage, Healthcheck, Server

LABEL_PREFIX = "runner."
LABEL_APP = "runner.app"
LABEL_PIPELINE = "runner.pipeline"
LABEL_RUN = "runner.run_id"
LABEL_COMMIT = "runner.commit"
LABEL_DIGEST = "runner.digest"
LABEL_IMAGE = "runner.image"
LABEL_SPEC = "runner.spec"  # fingerprint of the settings, to tell "unchanged" from "changed"

DIGEST_REF_RE = re.compile(r"^(?P<name>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class Target:
    """One server, SSH settings resolved."""

    label: str  # for messages
    host: str
    port: int
    user: str
    host_key: str | None = None  # pinned key for this server, if any


@dataclass(frozen=True)
class Release:
    """The version being deployed: an image by digest plus where it came from."""

    ref: str  # "name@sha256:..."
    pipeline: str
    run_id: str
    commit: str = ""

    @property
    def name(self) -> str:
        return split_ref(self.ref)[0]

    @property
    def digest(self) -> str:
        return split_ref(self.ref)[1]


@dataclass(frozen=True)
class HealthSpec:
    """How readiness is decided. kind: "cmd" | "http" | "image" (the image's own HEALTHCHECK, or
    just staying up for min_uptime when it has none)."""

    kind: str
    cmd: str | None = None
    http_port: int | None = None
    http_path: str = "/"
    http_status: tuple[int, ...] = (200,)
    timeout: float = 60
    interval: float = 1
    probe_interval: float = 0.25
    probe_timeout: float = 5
    retries: int = 3
    start_period: float = 0
    min_uptime: float = 2


@dataclass(frozen=True)
class ContainerSpec:
    name: str  # the stable name of the running container
    image: str  # "name@sha256:..."
    ports: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # plain values (still sent via the env file)
    secret_env: tuple[tuple[str, str], ...] = ()  # (VAR, secret name): values resolved late
    volumes: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    restart: str = "always"
    init: bool = True
    memory: str | None = None
    cpus: float | None = None
    command: tuple[str, ...] | None = None
    network: str | None = None
    stop_timeout: int = 10
    health: HealthSpec = field(default_factory=lambda: HealthSpec(kind="image"))

    @property
    def has_env(self) -> bool:
        return bool(self.env or self.secret_env)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def split_ref(ref: str) -> tuple[str, str]:
    """'reg/app@sha256:...' -> ('reg/app', 'sha256:...'). Raises ValueError on anything else:
    a deploy only ever runs an image by digest."""
    m = DIGEST_REF_RE.match(ref)
    if not m:
        raise ValueError(f"not an image reference by digest (name@sha256:<64 hex>): {ref!r}")
    return m.group("name"), m.group("digest")


def targets(stage: DeployStage) -> tuple[Target, ...]:
    return tuple(target(s, stage) for s in stage.servers)


def target(server: Server, stage: DeployStage) -> Target:
    return Target(
        label=server.label,
        host=server.host,
        port=server.port or stage.ssh.port,
        user=server.user or stage.ssh.user,
        host_key=server.host_key or stage.ssh.host_key,
    )


def health_spec(h: Healthcheck) -> HealthSpec:
    common = dict(timeout=h.timeout, interval=h.interval, probe_interval=h.probe_interval,
                  probe_timeout=h.probe_timeout, retries=h.retries, start_period=h.start_period,
                  min_uptime=h.min_uptime)
    if h.cmd:
        return HealthSpec(kind="cmd", cmd=h.cmd, **common)
    if h.http:
        return HealthSpec(kind="http", http_port=h.http.port, http_path=h.http.path,
                          http_status=tuple(h.http.status), **common)
    return HealthSpec(kind="image", **common)


def app_name(stage: DeployStage, pipeline_name: str) -> str:
    return stage.container.name or pipeline_name


def container_spec(stage: DeployStage, release: Release) -> ContainerSpec:
    """The container to run for `release`, from the pipeline's deploy settings."""
    split_ref(release.ref)  # validates
    c = stage.container
    name = app_name(stage, release.pipeline)
    labels = dict(c.labels)
    # Ours last: a user label cannot disguise which version a container runs.
    labels.update({
        LABEL_APP: name,
        LABEL_PIPELINE: release.pipeline,
        LABEL_RUN: release.run_id,
        LABEL_COMMIT: release.commit,
        LABEL_DIGEST: release.digest,
        LABEL_IMAGE: release.name,
    })
    spec = ContainerSpec(
        name=name,
        image=release.ref,
        ports=tuple(c.ports),
        env=tuple(sorted(c.env.items())),
        secret_env=tuple(sorted(c.secret_env.items())),
        volumes=tuple(c.volumes),
        labels=tuple(sorted(labels.items())),
        restart=c.restart,
        init=c.init,
        memory=c.memory,
        cpus=c.cpus,
        command=tuple(c.command) if c.command is not None else None,
        network=c.network,
        stop_timeout=c.stop_timeout,
        health=health_spec(stage.healthcheck),
    )
    return replace(spec, labels=tuple(sorted({**labels, LABEL_SPEC: fingerprint(spec)}.items())))


def fingerprint(spec: ContainerSpec) -> str:
    """A short hash of what defines the container apart from run metadata. Secret values are
    not in it (only their names): a changed secret alone does not make a server "changed"."""
    data = asdict(spec)
    data["labels"] = [kv for kv in spec.labels if not kv[0].startswith(LABEL_PREFIX)]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def env_file_content(env: dict[str, str]) -> bytes:
    """The `--env-file` body: one VAR=value per line, values verbatim (docker does no quoting)."""
    lines = []
    for k, v in env.items():
        if any(ch in v for ch in "\r\n\0"):
            raise ValueError(f"environment variable {k}: a value cannot hold a newline")
        lines.append(f"{k}={v}\n")
    return "".join(lines).encode()


def batches(items: tuple, strategy: str, batch_size: int = 1) -> list[tuple]:
    """Split servers into the batches a rollout goes through, in order.
    all: one batch; canary: the first server alone, then all the others; rolling: batch_size."""
    items = tuple(items)
    if not items:
        return []
    if strategy == "all":
        return [items]
    if strategy == "canary":
        return [items[:1]] + ([items[1:]] if len(items) > 1 else [])
    if strategy == "rolling":
        return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    raise ValueError(f"unknown strategy {strategy!r}")
