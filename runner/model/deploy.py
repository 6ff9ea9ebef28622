"""Settings of the deploy stage: where (servers, ssh), what (container), when is it done
(healthcheck), in which order (strategy), and the safety rails (lock, kept versions).

Example (every key is optional except `servers`; the section runs unless `enabled: false`):

    deploy:
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
      release_command: [python, manage.py, migrate]   # once per deploy, before any switch
      hooks: {pre_deploy: [./notify, start], post_deploy: [./notify, done]}  # on the runner host
      roles:                              # one release, several containers (runner.model.roles)
        web: {}
        worker: {command: [python, -m, shop.worker]}
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from runner.model.base import (HOST_RE, ContainerCommand, EnvVars, Model, OneString, PathOn,
                                check_login, check_ports)
from runner.model.health import Healthcheck, HttpCheck
from runner.model.roles import Role

_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_NAME_RE = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$"


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
    """One server to deploy to. In a list, a string `user@host:port` (user and port optional)
    is the same as the mapping."""

    host: str = Field(examples=["10.0.0.11"])
    """The server's host name or address (`[...]` for IPv6), or a `Host` alias of the
    runner user's ~/.ssh/config (its HostName, User, Port, IdentityFile and ProxyJump apply
    where the pipeline sets nothing)."""
    port: int | None = Field(default=None, ge=1, le=65535, examples=[2222])
    """Its SSH port. Unset: `ssh.port`, then ~/.ssh/config's Port, then 22."""
    user: str | None = Field(default=None, examples=["deploy"])
    """The SSH user. Unset: `ssh.user`, then ~/.ssh/config's User, then root."""
    name: str | None = Field(default=None, examples=["web-1"])
    """How messages and reports name the server. Unset: the host (with the port if not 22)."""
    host_key: str | None = Field(default=None, examples=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5..."])
    """The server's pinned host key (`type base64`), instead of `ssh.host_key`."""

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOST_RE.match(v):
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
    """How the runner reaches the servers. What is set here wins over the runner user's own
    ~/.ssh/config, which fills in the rest (HostName, User, Port, IdentityFile, ProxyJump,
    UserKnownHostsFile), with ssh-agent keys and ~/.ssh/known_hosts by default. Host keys
    are always checked: an unknown or changed host key is refused (`runner ssh-trust HOST`
    shows a server's key and the known_hosts line to add)."""

    user: str | None = Field(default=None, examples=["deploy"])
    """The SSH user of the servers that do not give their own. Unset: ~/.ssh/config's User
    for the server, then root."""
    port: int | None = Field(default=None, ge=1, le=65535, examples=[2222])
    """The SSH port of the servers that do not give their own. Unset: ~/.ssh/config's Port
    for the server, then 22."""
    key_file: Annotated[str | None, PathOn("pipeline")] = Field(
        default=None, examples=["~/.ssh/id_ed25519"])
    """A private key file on the runner's machine. Either this or `key`. Tried first; then
    the ssh-agent's keys, then ~/.ssh/config's IdentityFile (or ~/.ssh/id_ed25519, id_ecdsa,
    id_rsa)."""
    key_secret: str | None = Field(default=None, alias="key", examples=["deploy_key"])
    """The name of the `secrets:` entry holding the private key. Either this or `key_file`."""
    key_passphrase_secret: str | None = Field(default=None, alias="key_passphrase",
                                              examples=["deploy_key_passphrase"])
    """The name of the `secrets:` entry holding the key's passphrase, if it has one."""
    known_hosts: Annotated[str | None, PathOn("pipeline")] = Field(
        default=None, examples=["~/.ssh/known_hosts"])
    """A known_hosts file with the servers' host keys (hashed entries too), used instead
    of the user's own. Unset: ~/.ssh/config's UserKnownHostsFile, else ~/.ssh/known_hosts
    (and /etc/ssh/ssh_known_hosts)."""
    host_key: str | None = Field(default=None, examples=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5..."])
    """A pinned host key (`type base64`) that every server must have, unless it gives its
    own `host_key`."""
    jump: str | None = Field(default=None, examples=["deploy@bastion.example.com:22"])
    """A bastion (`user@host:port`, or a ~/.ssh/config alias) to reach the servers through,
    with the same key and host key checks. Unset: ~/.ssh/config's ProxyJump for each
    server, else direct."""
    insecure_ignore_host_key: bool = False
    """Accept any host key, which lets anyone on the way pose as a server. The deploy log says
    so loudly."""
    connect_timeout: float = Field(default=10, gt=0, le=300)
    """Seconds one connection attempt may take."""
    command_timeout: float = Field(default=600, gt=0)
    """Seconds one command on a server may take."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra connection attempts after a failed one."""
    io_timeout: float = Field(default=30, gt=0, le=600)
    """Seconds one file transfer to a server (or the wait for its SFTP session) may take; a
    stalled server fails after this long, naming it."""

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
    """The container the image runs as on each server (`docker run` options)."""

    name: str | None = Field(default=None, pattern=_NAME_RE, examples=["shop-api"])
    """The container's name, which is also the app's name on the server (its history, lock
    and kept versions). Unset: the pipeline's `name`."""
    ports: tuple[str, ...] = Field(default=(), examples=[["8080:80", "127.0.0.1:9090:9090/tcp"]])
    """Published ports, as `docker run -p` takes them: `HOST:CONTAINER`, with an optional
    address and `/tcp` or `/udp`. Not with `proxy`."""
    env: EnvVars = Field(default_factory=dict, examples=[{"MODE": "production"}])
    """Environment variables, over the top-level `env:`."""
    secret_env: EnvVars = Field(default_factory=dict, examples=[{"API_TOKEN": "api_token"}])
    """Environment variables whose values are secrets: `NAME: secret name`. The values reach
    the container through a private file on the server, never a command line or a log."""
    volumes: tuple[str, ...] = Field(default=(), examples=[["app-data:/var/lib/app",
                                                            "/srv/app/config:/config:ro"]])
    """Volumes, as `docker run -v` takes them: `SOURCE:TARGET[:ro]`, on the server (a source
    that is not an absolute path is a named volume)."""
    labels: dict[str, str] = Field(default_factory=dict, examples=[{"team": "shop"}])
    """Container labels. The runner's own (`runner.*`) win over these."""
    restart: str = Field(default="always",
                         pattern=r"^(no|always|unless-stopped|on-failure(:\d+)?)$",
                         examples=["unless-stopped"])
    """Docker's restart policy: `no`, `always`, `unless-stopped` or `on-failure[:N]`."""
    init: bool = True
    """Run an init process as PID 1 in the container (`--init`), which reaps zombies and
    passes signals on."""
    memory: str | None = Field(default=None, pattern=r"^\d+[bkmgBKMG]?$", examples=["512m"])
    """The memory limit (`--memory`): a number with an optional unit b, k, m or g."""
    cpus: float | None = Field(default=None, gt=0, examples=[1.5])
    """How many CPUs the container may use (`--cpus`)."""
    command: ContainerCommand = Field(default=None,
                                      examples=[["gunicorn", "--workers", "4", "app:app"]])
    """The arguments after the image (`docker run IMAGE ARG...`), which replace the image's
    CMD. Unset: the image's CMD."""
    entrypoint: str | None = Field(default=None, examples=["/usr/local/bin/serve"])
    """An executable that replaces the image's ENTRYPOINT (`--entrypoint`); its arguments are
    `command`. `""` clears the image's entrypoint."""
    network: str | None = Field(default=None, pattern=_NAME_RE, examples=["backend"])
    """A docker network on the server for the container to join. Not with `proxy` (the app
    then joins the runner's own network)."""
    stop_timeout: int = Field(default=10, ge=0, le=600)
    """Seconds `docker stop` gives the old container before killing it."""

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_ports(v)

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for vol in v:
            if vol.count(":") not in (1, 2) or not all(vol.split(":")):
                raise ValueError(f"not a volume: {vol!r} (use SOURCE:TARGET[:ro])")
        return v


class Strategy(Model):
    """In which order the servers get the new release. `strategy: canary` is short for
    `strategy: {type: canary}`."""

    type: Literal["all", "canary", "rolling"] = "all"
    """`all`: every server at once; `canary`: the first server alone, then all the others;
    `rolling`: `batch_size` servers at a time. A batch starts only once the one before it is
    healthy."""
    batch_size: int = Field(default=1, ge=1)
    """Servers per batch, for `rolling`."""
    on_failure: Literal["rollback_all", "keep_done"] = "rollback_all"
    """What happens to the batches already done when a later one fails: `rollback_all`
    returns them to their previous release too; `keep_done` leaves them on the new one."""


class Lock(Model):
    """The app's deploy lock on each server, so that two runs never deploy it at once. A run
    takes the locks of all its servers, one at a time in one fixed order, before it pulls or
    changes anything, and holds them until its last server is done."""

    ttl: float = Field(default=60, gt=1)
    """Seconds after which a lock its run stopped renewing counts as abandoned (on another
    host; a holder on this host whose process is gone is taken over at once)."""
    wait: float = Field(default=120, ge=0)
    """Seconds to wait, in all, for the locks other runs hold before the deploy fails."""


class DeployRegistry(Model):
    """Credentials the servers use to pull, both fields or neither: `docker login` on each
    server into a config dir of that deploy alone (password on stdin), removed once the image is
    pulled. Neither: the servers pull with their own docker login, if any."""

    username: str | None = Field(default=None, examples=["deploy"])
    """The registry user name."""
    password_secret: str | None = Field(default=None, alias="password",
                                        examples=["registry_password"])
    """The name of the `secrets:` entry holding the password or token."""

    @model_validator(mode="after")
    def _both(self) -> DeployRegistry:
        check_login(self.username, self.password_secret)
        return self


_HOSTNAME_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


class ProxyHealth(Model):
    """The health gate as the proxy will reach the app: GET `path` on the container's
    `app_port` over the runner's docker network, with the route's Host header."""

    path: str = Field(default="/up", pattern=r"^/[A-Za-z0-9._~/%?=&+-]*$", examples=["/health"])
    """The path to GET; a 2xx status is healthy (a redirect is not)."""
    interval: float = Field(default=0.5, gt=0)
    """Seconds between probes."""
    timeout: float = Field(default=30, gt=0)
    """Seconds the new container has to pass before the gate fails."""


class Proxy(Model):
    """Zero-downtime cutover: one Caddy proxy per server, shared by every app deployed there;
    the app publishes no host port, the proxy switches its route to a new container only once
    that one is healthy."""

    hosts: Annotated[tuple[str, ...], OneString("one host name")] = Field(
        default=(), examples=[["app.example.com", "www.example.com"]])
    """The host names routed to the app (by the Host header; `*.example.com` matches one
    level). Empty: every host (one such app per server)."""
    path_prefix: str = Field(default="/", pattern=r"^/[A-Za-z0-9._~/%-]*$", examples=["/api"])
    """Only requests under this path go to the app, so that several apps can share a host."""
    app_port: int = Field(default=80, ge=1, le=65535, examples=[8080])
    """The port the app listens on, in its container."""
    tls: bool = False
    """Automatic HTTPS (Caddy's ACME) for `hosts`: needs public DNS for them and the ports 80
    and 443."""
    http_port: int = Field(default=80, ge=1, le=65535, examples=[8000])
    """The HTTP port the proxy publishes on the server."""
    https_port: int = Field(default=443, ge=1, le=65535, examples=[8443])
    """The HTTPS port the proxy publishes on the server (with `tls`)."""
    image: str = Field(default="caddy:2", examples=["registry.example.com/mirror/caddy:2"])
    """The proxy's image: any Caddy 2 image."""
    health: ProxyHealth | None = None
    """The health gate as the proxy reaches the app. Unset: `healthcheck`; if that sets neither
    `cmd` nor `http` and the image has no HEALTHCHECK, GET / the way the proxy reaches the app,
    where any answer below 500 passes (one that answers nothing fails)."""
    watch: float = Field(default=3, ge=0)
    """Seconds the new container is still probed after the switch; a failure then switches
    straight back."""
    drain_timeout: int = Field(default=10, ge=0, le=600)
    """Seconds `docker stop` gives the old container to finish its requests."""

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


def _argv(v: Any) -> Any:
    """An argv is a list of words: a string would need a shell (or a guess) to split it."""
    if isinstance(v, str):
        raise ValueError("give a list of arguments such as [python, manage.py, migrate], not "
                         "one string: no shell runs it")
    return v


class Hooks(Model):
    """Commands the runner runs on its own host around a deploy (never for `runner rollback`),
    each an argv list (no shell), with the release described in their environment:
    `RUNNER_DIGEST`, `RUNNER_IMAGE` (name@digest), `RUNNER_SERVERS` (comma-separated hosts),
    `RUNNER_PIPELINE`, `RUNNER_COMMIT`, `RUNNER_RUN_ID` (and `PATH`, `HOME`, `LANG`; nothing
    else of the runner's environment). They run in the checked-out work tree (else the run's
    directory); their output goes to the run's log. A pipeline read from the repository (a
    daemon `pipeline:` entry) may not set them."""

    pre_deploy: tuple[str, ...] | None = Field(default=None, min_length=1,
                                               examples=[["./scripts/announce", "start"]])
    """Runs before any server is reached: a non-zero exit stops the deploy with nothing
    changed on any server."""
    post_deploy: tuple[str, ...] | None = Field(default=None, min_length=1,
                                                examples=[["./scripts/announce", "done"]])
    """Runs once every server runs the new release, verified: a non-zero exit fails the run as
    a failed hook, and the release stays deployed."""
    timeout: float = Field(default=300, gt=0, le=86400)
    """Seconds a hook may run before it is killed (and counts as failed)."""

    @field_validator("pre_deploy", "post_deploy", mode="before")
    @classmethod
    def _words(cls, v: Any) -> Any:
        return _argv(v)


class DeploySettings(Model):
    """Running the pushed image, by digest, on every server over SSH with the servers' docker,
    gated on health; a server that fails goes back to its previous release."""

    enabled: bool = True
    """false: the stage does not run (and `servers` may be empty)."""
    servers: Annotated[tuple[Server, ...], OneString(
        "one string of comma-separated `user@host:port` (such as `${DEPLOY_HOSTS}`)",
        items="`user@host:port` (user and port optional)")] = Field(
        default=(), examples=[["deploy@10.0.0.11", "10.0.0.12:2222"]])
    """The servers to deploy to: a list of `user@host:port` strings or mappings."""
    ssh: SSH = Field(default_factory=SSH)
    """How the runner reaches the servers."""
    registry: DeployRegistry = Field(default_factory=DeployRegistry)
    """The login the servers pull the image with."""
    container: Container = Field(default_factory=Container)
    """The container the image runs as."""
    healthcheck: Healthcheck = Field(default_factory=Healthcheck)
    """When a new container counts as healthy."""
    strategy: Annotated[Strategy, OneString("the type alone: `strategy: canary`")] = Field(
        default_factory=Strategy)
    """The order of the servers."""
    keep_versions: int = Field(default=3, ge=1, le=100)
    """Verified releases kept on each server (containers and images), for rollbacks."""
    lock: Lock = Field(default_factory=Lock)
    """The deploy lock."""
    parallel: int = Field(default=16, ge=1, le=256)
    """At most this many servers are worked on at once."""
    proxy: Proxy | None = None
    """Zero-downtime cutover through a Caddy proxy on each server. Unset: stop-start (the old
    container stops before the new one takes its host ports)."""
    release_command: tuple[str, ...] | None = Field(
        default=None, min_length=1, examples=[["python", "manage.py", "migrate"]])
    """A command (argv list, no shell) run once per deploy, in a one-off container of the new
    image on the first server of the first batch, after the pull and before any server
    switches: with the app's env and secret env, volumes and docker network (so it reaches the
    accessories by name), the image's ENTRYPOINT (not `container.entrypoint` or `command`). A
    non-zero exit stops the deploy with nothing switched on any server. `runner rollback` does
    not run it."""
    release_timeout: float = Field(default=600, gt=0, le=86400)
    """Seconds the release command may run before its container is removed and the deploy
    fails."""
    hooks: Hooks = Field(default_factory=Hooks)
    """Commands on the runner's host before and after the deploy."""
    roles: dict[str, Role] = Field(default_factory=dict, examples=[{
        "web": {}, "worker": {"command": ["python", "-m", "shop.worker"],
                             "servers": ["10.0.0.11"]}}])
    """The app's roles (a DNS label each), all running the same release: each may set its
    `command`, `servers`, `env`, `healthcheck` and whether it is behind the `proxy`. The primary
    role (behind the proxy, else `web`, else the first) keeps the app's container name; the
    others are `<app>-<role>`. One rollout switches them all and a rollback returns them
    together. Unset: one role, the container. See docs/roles.md."""

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

    @field_validator("release_command", mode="before")
    @classmethod
    def _release_command(cls, v: Any) -> Any:
        return _argv(v)

    @model_validator(mode="after")
    def _check(self) -> DeploySettings:
        if self.enabled and not self.servers:
            raise ValueError("servers: at least one server is needed (a deploy section runs "
                             "unless it says enabled: false)")
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
        if self.proxy is None and any(r.proxy for r in self.roles.values()):
            raise ValueError("roles: a role says proxy: true, but there is no proxy section")
        return self
