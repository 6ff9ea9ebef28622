"""Accessories: long-lived containers beside the app (a database, a cache) that app deploys
never touch. `runner accessory boot|reboot|logs|exec|remove|status` manages them.

Top-level (`accessories:`, as in Kamal's deploy.yml), not a stage: `runner exec` never starts
or replaces them; a deploy only checks, before any switch, that each one on its servers runs.

Example:

    accessories:
      db:
        image: postgres:16
        servers: [db-1]                  # names of stages.deploy.servers; unset: all of them
        env: {POSTGRES_USER: shop}
        secret_env: {POSTGRES_PASSWORD: db_password}
        volumes: ["data:/var/lib/postgresql/data"]
        healthcheck: {cmd: "pg_isready -U shop"}

The app reaches it as `<app>-db` (here `shop-db`) on the runner's docker network.
"""
from __future__ import annotations

import re

from pydantic import Field, field_validator

from runner.model.base import ContainerCommand, EnvVars, Model, ServerNames, check_ports

# The docker network on each server that the app (every cutover, when accessories are
# declared) and its accessories join: deployers.proxy.NETWORK is this name.
NETWORK = "runner"
# An accessory's name: a DNS label, as it becomes part of a host name on the network.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


class AccessoryHealthcheck(Model):
    """When a booted accessory counts as ready: `cmd` exits 0 inside it (docker runs it too,
    so `docker ps` and `runner accessory status` show its health)."""

    cmd: str = Field(examples=["pg_isready -U postgres"])
    """A command run inside the container with `/bin/sh -c`: exit status 0 is healthy."""
    interval: float = Field(default=1, gt=0)
    """Seconds between docker's runs of `cmd`, and between the runner's own while booting."""
    retries: int = Field(default=3, ge=1)
    """Consecutive failures of `cmd` before docker calls the container unhealthy."""
    start_period: float = Field(default=60, ge=0)
    """Seconds after the start during which docker does not count failures of `cmd` (a
    database's first start initialises it); the first success counts at once."""
    timeout: float = Field(default=60, gt=0)
    """Seconds `boot` and `reboot` wait for it to become healthy before they fail."""


class Accessory(Model):
    """A long-lived container beside the app (`docker run` options). Named `<app>-<NAME>`
    on each of its servers, where the app reaches it by that name on the runner's network."""

    image: str = Field(min_length=1, examples=["postgres:16"])
    """The image, by tag or digest; pulled by the server's docker when it is not there yet."""
    servers: ServerNames = Field(default=(), examples=[["10.0.0.11"]])
    """Where it runs: servers of `stages.deploy.servers`, each by its `name` (or its host when
    it has none). Unset: every server of `stages.deploy.servers`."""
    env: EnvVars = Field(default_factory=dict, examples=[{"POSTGRES_USER": "shop"}])
    """Environment variables."""
    secret_env: EnvVars = Field(default_factory=dict,
                                examples=[{"POSTGRES_PASSWORD": "db_password"}])
    """Environment variables whose values are secrets: `NAME: secret name`. The values reach
    the container through a private file on the server, never a command line or a log."""
    volumes: tuple[str, ...] = Field(default=(), examples=[["data:/var/lib/postgresql/data"]])
    """Named volumes, `NAME:/path[:ro]`: the data lives in the docker volume
    `<app>-<accessory>-<NAME>` on the server, which `reboot` and `remove` keep (`remove
    --volumes` deletes it)."""
    ports: tuple[str, ...] = Field(default=(), examples=[["127.0.0.1:5432:5432"]])
    """Host ports to publish, as `docker run -p` takes them. Unset: none; the app reaches it
    over the runner's network, nothing else does."""
    command: ContainerCommand = Field(default=None,
                                      examples=[["redis-server", "--appendonly", "yes"]])
    """The arguments after the image, which replace the image's CMD. Unset: the image's CMD."""
    healthcheck: AccessoryHealthcheck | None = None
    """When it counts as ready. Unset: the image's own HEALTHCHECK, else staying up 2 seconds."""

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for vol in v:
            parts = vol.split(":")
            if len(parts) not in (2, 3) or not parts[1].startswith("/") or \
                    (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"not a volume: {vol!r} (use NAME:/path or NAME:/path:ro)")
            if not _VOLUME_NAME_RE.match(parts[0]):
                raise ValueError(f"{vol!r}: the source must be a volume name (letters, digits, "
                                 f"'_', '.', '-'); an accessory keeps its data in named volumes, "
                                 f"not host directories")
            names.append(parts[0])
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"volume {', '.join(dup)} is mounted twice")
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_ports(v)
