"""What should run on a server, as plain immutable data. Pure: no I/O, no SSH, no docker.

`ContainerSpec` is everything `docker run` needs except the values of secrets: secret
environment variables are carried by name only and resolved at apply time, straight into an env
file on the server. `Release` is one complete release (image by digest, the whole spec, where
it came from, the keyed fingerprint of its secret values), as a server's history records it.
`Target` is one server with its SSH settings resolved: the pipeline's own settings first, then
the user's ~/.ssh/config, then defaults (see resolve_target; the config itself is read by
deployers.ssh_config, and handed in, so that this module stays pure).

The spec is deliberately independent of how traffic reaches the container: a later proxy-based
zero-downtime cutover only needs a spec without host `ports` plus a proxy step, not a new spec.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass, field, replace

from runner.model.deploy import DeploySettings, Healthcheck, Server, parse_server
from runner.model.image import ImageRef

from deployers.proxy import NETWORK
from deployers.ssh_config import HostEntry, Hop, UserConfig

LABEL_PREFIX = "runner."
LABEL_APP = "runner.app"
LABEL_PIPELINE = "runner.pipeline"
LABEL_RUN = "runner.run_id"
LABEL_COMMIT = "runner.commit"
LABEL_DIGEST = "runner.digest"
LABEL_IMAGE = "runner.image"
LABEL_SPEC = "runner.spec"  # fingerprint of the settings, to tell "unchanged" from "changed"
LABEL_SECRETS = "runner.secrets"  # keyed fingerprint of the secret values (see secret_fingerprint)


@dataclass(frozen=True)
class Target:
    """One host to reach over SSH (a server, or a jump host on the way to one), settings
    resolved. Everything here comes from the pipeline or from ~/.ssh/config; what a field
    leaves empty is not used (no agent, no key files, no known_hosts files)."""

    label: str  # for messages
    host: str  # the address connected to (HostName for a ~/.ssh/config alias)
    port: int
    user: str
    host_key: str | None = None  # pinned key for this server, if any
    name: str = ""  # as the pipeline (or a ProxyJump) wrote it: an alias, or the address
    known_hosts: tuple[str, ...] = ()  # the user's known_hosts files (unless ssh.known_hosts)
    host_key_alias: str | None = None  # the name its key is listed under (HostKeyAlias)
    identity_files: tuple[str, ...] = ()  # IdentityFile, or the default ~/.ssh/id_* files
    identity_default: bool = True  # identity_files are the defaults, not IdentityFile
    identities_only: bool = False  # IdentitiesOnly: agent keys only if an IdentityFile's
    agent: str | None = None  # the ssh-agent socket to take keys from; None: no agent
    jump: Target | None = None  # the host this one is reached through (its own jump first)
    jump_written: str | None = None  # ssh.jump as the pipeline gave it, when that is the jump
    problem: str | None = None  # why it cannot be connected to (a ~/.ssh/config problem)

    @property
    def route(self) -> tuple[Target, ...]:
        """The hosts connected to in order: the outermost jump host first, this one last."""
        hops: list[Target] = []
        t: Target | None = self
        while t is not None:
            hops.insert(0, t)
            t = t.jump
        return tuple(hops)


@dataclass(frozen=True)
class HealthSpec:
    """How readiness is decided. kind: "cmd" | "http" | "image" (the image's own HEALTHCHECK, or
    just staying up for min_uptime when it has none) | "uptime" (staying up for min_uptime, the
    image's HEALTHCHECK switched off: a worker role's default)."""

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
    entrypoint: str | None = None
    network: str | None = None
    stop_timeout: int = 10
    health: HealthSpec = field(default_factory=lambda: HealthSpec(kind="image"))

    @property
    def has_env(self) -> bool:
        return bool(self.env or self.secret_env)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def targets(stage: DeploySettings, config: UserConfig | None = None) -> tuple[Target, ...]:
    return tuple(target(s, stage, config) for s in stage.servers)


def target(server: Server, stage: DeploySettings, config: UserConfig | None = None) -> Target:
    """One server of the stage as a Target: see resolve_target for which setting wins."""
    s = stage.ssh
    jump = None
    if s.jump:
        j = parse_server(s.jump)
        jump = (Hop(host=j["host"], user=j.get("user"), port=j.get("port")),)
    return resolve_target(
        server.host, label=server.label, user=server.user or s.user,
        port=server.port or s.port, host_key=server.host_key or s.host_key, jump=jump,
        jump_written=s.jump, jump_user=s.user, config=config)


_MAX_HOPS = 8


def resolve_target(name: str, *, label: str | None = None, user: str | None = None,
                   port: int | None = None, host_key: str | None = None,
                   jump: tuple[Hop, ...] | None = None, jump_written: str | None = None,
                   jump_user: str | None = None, fallback_user: str | None = None,
                   config: UserConfig | None = None, _seen: tuple[str, ...] = ()) -> Target:
    """Where `name` (as the pipeline writes a server) is, and how to get in. Each setting
    is taken from the first of these that gives it:

    - address: ~/.ssh/config's HostName for `name` (Host patterns match `name` as written),
      else `name` itself;
    - user: `user` (the server's own `user@`, else ssh.user), then ~/.ssh/config's User,
      then `fallback_user`, then root;
    - port: `port` (the server's own `:port`, else ssh.port), then Port, then 22;
    - jump hosts: `jump` (ssh.jump), then ProxyJump (a list: each hop reached through the
      ones before it; the first hop with its own ProxyJump, as OpenSSH does), else direct.
      A jump host is itself looked up in ~/.ssh/config; its user and port are the ones
      written in the jump (`user@host:port`), then its User/Port, then `jump_user`
      (ssh.user) or root, and 22;
    - keys (tried in this order at connect time, see deployers.ssh_login): ssh.key_file or
      ssh.key, then the ssh-agent's keys (IdentityAgent, else $SSH_AUTH_SOCK), then
      IdentityFile, or ~/.ssh/id_ed25519, id_ecdsa, id_rsa when no IdentityFile is set;
    - host keys: `host_key` (the server's, else ssh.host_key), then ssh.known_hosts (held by
      deployers.host_keys.HostKeyPolicy), then UserKnownHostsFile (default ~/.ssh/known_hosts)
      and GlobalKnownHostsFile (default /etc/ssh/ssh_known_hosts).

    `config` None: nothing of the user's own setup is used (no agent, no key or known_hosts
    files), only what the pipeline says."""
    entry = config.lookup(name) if config is not None else HostEntry(
        name=name, hostname=name, identity_files=())
    problem = entry.problem
    written = jump_written
    if jump is None:
        written = None
        if entry.proxy_jump is not None:
            jump = entry.proxy_jump
        elif entry.proxy_command is not None and problem is None:
            problem = (f"{config.path if config else '~/.ssh/config'}: ProxyCommand is set "
                       f"for {name}; the runner runs no command from ~/.ssh/config. Use "
                       f"ProxyJump (or the pipeline's ssh.jump) instead")
    via = None
    seen = (*_seen, name)
    if jump:
        *before, last = jump
        if last.host in seen or len(seen) > _MAX_HOPS:
            problem = problem or (f"the jump hosts loop or go on too long: "
                                  f"{' -> '.join((*seen, last.host))}")
        else:
            via = resolve_target(last.host, label=f"jump {last.host}", user=last.user,
                                 port=last.port, jump=tuple(before) or None,
                                 fallback_user=jump_user, jump_user=jump_user,
                                 config=config, _seen=seen)
    return Target(
        label=label or name, host=entry.hostname, port=port or entry.port or 22,
        user=user or entry.user or fallback_user or "root",
        host_key=host_key, name=name, known_hosts=entry.known_hosts,
        host_key_alias=entry.host_key_alias, identity_files=entry.identity_files,
        identity_default=entry.identity_default, identities_only=entry.identities_only,
        agent=entry.agent, jump=via, jump_written=written, problem=problem)


def health_spec(h: Healthcheck) -> HealthSpec:
    common = dict(timeout=h.timeout, interval=h.interval, probe_interval=h.probe_interval,
                  probe_timeout=h.probe_timeout, retries=h.retries, start_period=h.start_period,
                  min_uptime=h.min_uptime)
    if h.cmd:
        return HealthSpec(kind="cmd", cmd=h.cmd, **common)
    if h.http:
        return HealthSpec(kind="http", http_port=h.http.port, http_path=h.http.path,
                          http_status=tuple(h.http.status), **common)
    return HealthSpec(kind="image" if h.image_check else "uptime", **common)


def app_name(stage: DeploySettings, pipeline_name: str) -> str:
    return stage.container.name or pipeline_name


def release_key(app: str, destination: str = "") -> str:
    """What an app's history, pulled images, secrets key and deploy lock are kept under on a
    server: the app's name, or `<app>+<destination>` for a destination (`-d`), so that each
    destination has its own and a deploy without destinations keeps what it had. `+` is in no
    app name (a-z 0-9 _ . -), so no app's key is another's."""
    return f"{app}+{destination}" if destination else app


def container_spec(stage: DeploySettings, image: ImageRef, *, pipeline: str, run_id: str,
                   commit: str = "") -> ContainerSpec:
    """The container to run `image` as, from the pipeline's deploy settings."""
    c = stage.container
    name = app_name(stage, pipeline)
    labels = dict(c.labels)
    # Ours last: a user label cannot disguise which version a container runs.
    labels.update({
        LABEL_APP: name,
        LABEL_PIPELINE: pipeline,
        LABEL_RUN: run_id,
        LABEL_COMMIT: commit,
        LABEL_DIGEST: image.digest,
        LABEL_IMAGE: image.name,
    })
    spec = ContainerSpec(
        name=name,
        image=str(image),
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
        entrypoint=c.entrypoint,
        # With the proxy cutover, the app is reached over the runner's network on the server.
        network=NETWORK if stage.proxy is not None else c.network,
        stop_timeout=c.stop_timeout,
        health=health_spec(stage.healthcheck),
    )
    return replace(spec, labels=tuple(sorted({**labels, LABEL_SPEC: fingerprint(spec)}.items())))


def fingerprint(spec: ContainerSpec) -> str:
    """A short hash of what defines the container apart from run metadata and secret values
    (only their names are in it; their values count through `Release.secrets`)."""
    data = asdict(spec)
    data["labels"] = [kv for kv in spec.labels if not kv[0].startswith(LABEL_PREFIX)]
    data.pop("image")  # the digest is part of a release's identity on its own
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


# ------------------------------------------------------------------------- releases

def spec_record(spec: ContainerSpec) -> dict:
    """The spec as plain JSON data, for a server's release history. Holds no secret value."""
    return asdict(spec)


def spec_from_record(data: dict) -> ContainerSpec:
    """The inverse of spec_record. Raises ValueError for a record this runner cannot restore."""
    try:
        health = HealthSpec(**{**data["health"],
                               "http_status": tuple(data["health"].get("http_status") or (200,))})
        pairs = {k: tuple(tuple(kv) for kv in data.get(k) or ())
                 for k in ("env", "secret_env", "labels")}
        return ContainerSpec(**{
            **data, **pairs, "health": health,
            "ports": tuple(data.get("ports") or ()), "volumes": tuple(data.get("volumes") or ()),
            "command": tuple(data["command"]) if data.get("command") is not None else None})
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a container spec this runner can restore: {exc}") from None


def secret_fingerprint(key: bytes, spec: ContainerSpec, values: dict[str, str]) -> str:
    """A keyed fingerprint of the secret values a container gets (HMAC-SHA256 with a per-app
    key that never leaves the server): it changes when a value changes, and reveals nothing
    about a value, not even a guessable one, to whoever reads labels or history without the
    key. "" when the container has no secret env."""
    if not spec.secret_env:
        return ""
    data = json.dumps(sorted((var, values[var]) for var, _ in spec.secret_env)).encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:24]


@dataclass(frozen=True)
class Release:
    """One complete release of an app: the image by digest, the whole container spec it runs
    with, where it came from, and (once known on a server) the fingerprint of its secret values.
    Two releases are the same release when digest, spec and secrets are the same."""

    image: ImageRef
    spec: ContainerSpec
    pipeline: str
    run_id: str
    commit: str = ""
    secrets: str = ""  # secret_fingerprint on the server ("" without secret env)

    @property
    def digest(self) -> str:
        return self.image.digest

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.image.digest, self.spec.label_map.get(LABEL_SPEC, ""), self.secrets)

    def with_secrets(self, fp: str) -> Release:
        return replace(self, secrets=fp)

    def record(self, when: float) -> dict:
        return {"digest": self.image.digest, "ref": str(self.image), "commit": self.commit,
                "run_id": self.run_id, "pipeline": self.pipeline, "time": when,
                "secrets": self.secrets, "spec": spec_record(self.spec)}

    @classmethod
    def from_record(cls, data: dict) -> Release:
        """A history entry back into the release it recorded. Raises ValueError when the entry
        lacks the spec (recorded by an older runner) or is damaged."""
        if not isinstance(data.get("spec"), dict):
            raise ValueError("the entry has no container spec (recorded by an older runner)")
        spec = spec_from_record(data["spec"])
        image = ImageRef.parse(str(data.get("ref", "")))
        if image.digest != data.get("digest") or spec.image != str(image):
            raise ValueError("the entry's digest and spec disagree")
        return cls(image=image, spec=spec, pipeline=str(data.get("pipeline", "")),
                   run_id=str(data.get("run_id", "")), commit=str(data.get("commit", "")),
                   secrets=str(data.get("secrets", "")))


def release_for(stage: DeploySettings, image: ImageRef, *, pipeline: str, run_id: str,
                commit: str = "") -> Release:
    """The release a deploy of `image` makes, from the pipeline's current settings."""
    return Release(image=image, spec=container_spec(stage, image, pipeline=pipeline,
                                                    run_id=run_id, commit=commit),
                   pipeline=pipeline, run_id=run_id, commit=commit)


def identity_of(labels: dict[str, str]) -> tuple[str, str, str]:
    """A running container's release identity, from the labels the runner put on it."""
    return (labels.get(LABEL_DIGEST, ""), labels.get(LABEL_SPEC, ""),
            labels.get(LABEL_SECRETS, ""))


def record_identity(entry: dict) -> tuple[str, str, str]:
    """A history entry's release identity (the same tuple as Release.identity)."""
    spec = entry.get("spec") if isinstance(entry.get("spec"), dict) else {}
    labels = dict(tuple(kv) for kv in spec.get("labels") or ())
    return (str(entry.get("digest", "")), labels.get(LABEL_SPEC, ""),
            str(entry.get("secrets", "")))
