"""Settings of the deploy stage: where (servers, ssh), what (container), when is it done
(healthcheck), in which order (strategy), and the safety rails (lock, kept versions).

Example (every key is optional except `servers` when the stage is enabled):

    deploy:
      enabled: true
      servers: "${DEPLOY_HOSTS}"          # "root@10.0.0.1:22,root@10.0.0.2" or a list
      ssh:
        key_file: ~/.ssh/id_ed25519       # or `key: SECRET_NAME` (a `secrets:` entry)
        known_hosts: ~/.ssh/known_hosts   # or `host_key: "ssh-ed25519 AAAA..."` (pinned)
      container:
        ports: ["8080:8080"]
        env: {MODE: production}
        secret_env: {API_TOKEN: api_token}  # VAR: name of a `secrets:` entry
      healthcheck:
        http: {port: 8080, path: /}
        timeout: 60
      strategy: {type: canary}
      keep_versions: 3
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from runner.model.base import Model

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")
_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_RE = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$"
_PORT_RE = re.compile(r"^(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(?:(\d{1,5}):)?(\d{1,5})(/(?:tcp|udp))?$")


def parse_server(text: str) -> dict[str, Any]:
    """'user@host:port' (user and port optional) -> {user, host, port}. Raises ValueError."""
    text = text.strip()
    user = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
    port: int | None = None
    if text.startswith("["):  # [ipv6]:port
        end = text.find("]")
        host, rest = text[: end + 1], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad server address {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        if not p.isdigit():
            raise ValueError(f"bad port {p!r} in server {text!r}")
        port = int(p)
    else:
        host = text
    out: dict[str, Any] = {"host": host}
    if user:
        out["user"] = user
    if port is not None:
        out["port"] = port
    return out


class Server(Model):
    host: str
    port: int | None = Field(default=None, ge=1, le=65535)  # None: ssh.port
    user: str | None = None  # None: ssh.user
    name: str | None = None  # shown in messages; defaults to host
    host_key: str | None = None  # pinned "type base64" for this server (overrides ssh.host_key)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not _HOST_RE.match(v):
            raise ValueError(f"not a host name or address: {v!r}")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not _USER_RE.match(v):
            raise ValueError(f"not a user name: {v!r}")
        return v

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.host if self.port in (None, 22) else f"{self.host}:{self.port}"



class SSH(Model):
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    key_file: str | None = None  # path of a private key on the runner's machine
    key_secret: str | None = Field(default=None, alias="key")  # a `secrets:` name holding the key
    key_passphrase_secret: str | None = Field(default=None, alias="key_passphrase")
    known_hosts: str | None = None  # a known_hosts file (hashed entries allowed)
    host_key: str | None = None  # pinned "ssh-ed25519 AAAA..." for every server
    jump: str | None = None  # "user@host:port" of a bastion, same key and host key checks
    # Accept any host key. Off by default; the deploy log says loudly when it is on.
    insecure_ignore_host_key: bool = False
    connect_timeout: float = Field(default=10, gt=0, le=300)  # seconds, per attempt
    command_timeout: float = Field(default=600, gt=0)  # seconds, per remote command
    retries: int = Field(default=2, ge=0, le=10)  # extra connect attempts
    # seconds a single SFTP operation, or a wait for a server's SFTP session, may take; a
    # stalled server fails after this long, naming it
    io_timeout: float = Field(default=30, gt=0, le=600)

    @field_validator("jump")
    @classmethod
    def _jump(cls, v: str | None) -> str | None:
        if v is not None:
            Server.model_validate(parse_server(v))  # same rules as a server
        return v

    @model_validator(mode="after")
    def _one_key(self) -> SSH:
        if self.key_file and self.key_secret:
            raise ValueError("give either key_file or key (a secret name), not both")
        return self


class Container(Model):
    name: str | None = Field(default=None, pattern=_NAME_RE)  # default: the pipeline's name
    ports: tuple[str, ...] = ()  # docker -p syntax: "8080:80", "127.0.0.1:8080:80/tcp"
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, str] = Field(default_factory=dict)  # VAR: name of a `secrets:` entry
    volumes: tuple[str, ...] = ()  # docker -v syntax
    labels: dict[str, str] = Field(default_factory=dict)
    restart: str = Field(default="always",
                         pattern=r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
    init: bool = True
    memory: str | None = Field(default=None, pattern=r"^\d+[bkmgBKMG]?$")
    cpus: float | None = Field(default=None, gt=0)
    command: tuple[str, ...] | None = None  # argv; a string is split like a shell would
    # The image's ENTRYPOINT replaced by this executable (docker run --entrypoint); its
    # arguments are `command`. "" clears the image's entrypoint.
    entrypoint: str | None = None
    network: str | None = Field(default=None, pattern=_NAME_RE)
    stop_timeout: int = Field(default=10, ge=0, le=600)  # seconds for `docker stop`

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, v: Any) -> Any:
        if isinstance(v, str):
            import shlex
            return tuple(shlex.split(v))
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            m = _PORT_RE.match(p)
            if not m or any(int(x) > 65535 for x in (m.group(2), m.group(3)) if x):
                raise ValueError(f"not a port mapping: {p!r} (use HOST:CONTAINER)")
        return v

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not _ENV_RE.match(k):
                raise ValueError(f"not an environment variable name: {k!r}")
            if "\n" in val or "\r" in val or "\0" in val:
                raise ValueError(f"{k}: values cannot hold newlines")
        return v

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for vol in v:
            if vol.count(":") not in (1, 2) or not all(vol.split(":")):
                raise ValueError(f"not a volume: {vol!r} (use SOURCE:TARGET[:ro])")
        return v


class HttpCheck(Model):
    port: int = Field(ge=1, le=65535)  # the container's port
    path: str = Field(default="/", pattern=r"^/[A-Za-z0-9._~/%?=&+-]*$")
    status: tuple[int, ...] = (200,)  # any of these counts as healthy


class Healthcheck(Model):
    # At most one of cmd / http. Neither: the image's own HEALTHCHECK; if the image has none,
    # the container must stay up without restarting for `min_uptime` seconds.
    cmd: str | None = None  # run in the container with /bin/sh -c, as a Dockerfile HEALTHCHECK
    http: HttpCheck | None = None  # probed from the server, over the SSH connection
    timeout: float = Field(default=60, gt=0)  # total wait for the new container to be healthy
    interval: float = Field(default=1, gt=0)  # docker's own health interval (for `cmd`)
    probe_interval: float = Field(default=0.25, gt=0)  # how often the runner probes itself
    probe_timeout: float = Field(default=5, gt=0)  # one probe
    retries: int = Field(default=3, ge=1)  # docker's failures before `unhealthy`
    start_period: float = Field(default=0, ge=0)
    min_uptime: float = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _one(self) -> Healthcheck:
        if self.cmd and self.http:
            raise ValueError("give either cmd or http, not both")
        return self


class Strategy(Model):
    type: Literal["all", "canary", "rolling"] = "all"
    batch_size: int = Field(default=1, ge=1)  # rolling: servers per batch
    # What happens to servers already done when a later batch fails.
    on_failure: Literal["rollback_all", "keep_done"] = "rollback_all"


class Lock(Model):
    ttl: float = Field(default=60, gt=1)  # a lease not renewed for this long is stale
    wait: float = Field(default=120, ge=0)  # how long to wait for another run's lock


class DeployRegistry(Model):
    """Credentials the servers use to pull: `docker login` on each server into a config dir of
    that deploy alone (password on stdin), removed once the image is pulled."""

    username: str | None = None
    password_secret: str | None = Field(default=None, alias="password")  # a `secrets:` name


_HOSTNAME_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


class ProxyHealth(Model):
    """The health gate as the proxy will reach the app: GET `path` on the container's
    `app_port` over the runner's docker network, with the route's Host header."""

    path: str = Field(default="/up", pattern=r"^/[A-Za-z0-9._~/%?=&+-]*$")
    interval: float = Field(default=0.5, gt=0)  # between probes
    timeout: float = Field(default=30, gt=0)  # the whole gate


class Proxy(Model):
    """Zero-downtime cutover: one Caddy proxy per server, shared by every app deployed there;
    the app publishes no host port, the proxy switches its route to a new container only once
    that one is healthy."""

    hosts: tuple[str, ...] = ()  # route by Host header; none: every host
    path_prefix: str = Field(default="/", pattern=r"^/[A-Za-z0-9._~/%-]*$")
    app_port: int = Field(default=80, ge=1, le=65535)  # the port the app listens on
    tls: bool = False  # automatic HTTPS (Caddy's ACME) for `hosts`; needs real DNS and 80/443
    http_port: int = Field(default=80, ge=1, le=65535)  # what the proxy publishes on the server
    https_port: int = Field(default=443, ge=1, le=65535)
    image: str = "caddy:2"
    # None: the deploy's `healthcheck` (the image's HEALTHCHECK unless it says otherwise).
    health: ProxyHealth | None = None
    watch: float = Field(default=3, ge=0)  # seconds of probing after the switch
    drain_timeout: int = Field(default=10, ge=0, le=600)  # `docker stop` of the old container

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            if not _HOSTNAME_RE.match(h):
                raise ValueError(f"not a host name: {h!r}")
        return v

    @model_validator(mode="after")
    def _tls(self) -> Proxy:
        if self.tls and not self.hosts:
            raise ValueError("tls: true needs hosts (the names certificates are issued for)")
        return self


class DeployStage(Model):
    enabled: bool = False
    servers: tuple[Server, ...] = ()
    ssh: SSH = Field(default_factory=SSH)
    registry: DeployRegistry = Field(default_factory=DeployRegistry)
    container: Container = Field(default_factory=Container)
    healthcheck: Healthcheck = Field(default_factory=Healthcheck)
    strategy: Strategy = Field(default_factory=Strategy)
    keep_versions: int = Field(default=3, ge=1, le=100)
    lock: Lock = Field(default_factory=Lock)
    parallel: int = Field(default=16, ge=1, le=256)  # at most this many servers at once
    # With a proxy: zero-downtime cutover through it. Without: stop-start (the old container
    # stops before the new one takes its host ports).
    proxy: Proxy | None = None

    @property
    def cutover(self) -> str:
        return "proxy" if self.proxy is not None else "stop-start"

    @field_validator("servers", mode="before")
    @classmethod
    def _servers(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        if isinstance(v, (list, tuple)):
            return tuple(parse_server(s) if isinstance(s, str) else s for s in v)
        return v

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> DeployStage:
        if self.enabled and not self.servers:
            raise ValueError("servers: at least one server is needed when deploy is enabled")
        if self.proxy is not None and self.container.ports:
            raise ValueError("container.ports: with proxy, the app publishes no host port (the "
                             "proxy does, proxy.http_port); remove container.ports, or remove "
                             "proxy for a stop-start cutover")
        if self.proxy is not None and self.container.network:
            raise ValueError("container.network: with proxy, the app joins the runner's network "
                             "on each server; remove container.network")
        labels = [s.label for s in self.servers]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"servers: listed twice: {', '.join(sorted(dup))}")
        return self
