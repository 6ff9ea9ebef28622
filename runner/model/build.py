"""Settings of the build stage (BuildKit)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from runner.model.base import Model, OneString, PathOn
from runner.model.engine import BuildEngineSettings
from runner.sizes import parse_size


class BuildSecret(Model):
    """A secret the Dockerfile reads with `RUN --mount=type=secret,id=...`: it is in no layer,
    no build argument and no log."""

    id: str = Field(examples=["npmrc"])
    """The id the Dockerfile's `--mount=type=secret,id=...` names."""
    secret: str = Field(examples=["npm_token"])
    """The name of the `secrets:` entry that holds the value."""


class BuildSettings(Model):
    """Building the image with BuildKit, from the checked-out work tree. The image is tagged
    as `image.tags` say and labelled with its source (OCI labels)."""

    enabled: bool = True
    """false: the stage does not run (nor can scan, push and deploy, which need its image)."""
    context: Annotated[str, PathOn("repository")] = Field(default=".", examples=["docker/app"])
    """The build context directory. It must stay inside the repository."""
    dockerfile: Annotated[str, PathOn("context")] = Field(default="Dockerfile",
                                                          examples=["Dockerfile.prod"])
    """The Dockerfile. It must stay inside the repository."""
    target: str | None = Field(default=None, examples=["runtime"])
    """The stage of a multi-stage Dockerfile to build (`--target`). Unset: the last one."""
    args: dict[str, str] = Field(default_factory=dict, examples=[{"PYTHON_VERSION": "3.12"}])
    """Build arguments (`--build-arg NAME=value`), for the Dockerfile's `ARG`s. They are kept
    in the image's history: never a secret here (see `secrets`)."""
    secrets: tuple[BuildSecret, ...] = Field(default=(),
                                             examples=[[{"id": "npmrc", "secret": "npm_token"}]])
    """Secrets the Dockerfile mounts while it builds."""
    labels: dict[str, str] = Field(default_factory=dict,
                                   examples=[{"org.opencontainers.image.vendor": "Example"}])
    """Image labels, besides the OCI labels the runner sets (source, revision, created); a
    label given here wins."""
    cache_from: tuple[str, ...] = Field(
        default=(), examples=[["type=registry,ref=registry.example.com/app:cache"]])
    """BuildKit cache sources (`--cache-from`), e.g. an image with inline cache."""
    cache_to: tuple[str, ...] = Field(default=(), examples=[["type=inline"]])
    """BuildKit cache exports (`--cache-to`). Without buildx only `type=inline` works."""
    pull: bool = False
    """Pull newer versions of the base images (`--pull`)."""
    platform: str | None = Field(default=None, examples=["linux/amd64"])
    """The platform to build for (`--platform`). Unset: the engine's own."""
    timeout: float = Field(default=1800, gt=0)
    """Seconds the build may take before it is stopped and the stage fails."""
    engine: Annotated[BuildEngineSettings | None,
                      OneString("the engine's address, the same as `{host: ...}`")] = Field(
        default=None, examples=["ssh://root@build.example.com"])
    """The docker engine that builds the image, on another machine (`ssh://user@host` or
    `tcp://host:2376` with `tls`); scan and push then use that engine too, and its BuildKit
    keeps the build cache. Unset: the runner's own engine (DOCKER_HOST, else the default
    socket)."""
    keep_images: int = Field(default=3, ge=1)
    """After each run, the build engine keeps this many of the pipeline's images (`image.name`,
    the newest by when the engine tagged them); older ones are removed, except one a container
    uses and the one the run just built (build.md, "Housekeeping")."""
    cache_limit: str = Field(default="10GB", examples=["10GB", "500MiB"])
    """After each run, BuildKit's cache on the build engine is pruned down to this size
    (`docker builder prune --keep-storage`), least recently used first. KB/MB/GB count in
    1000s, KiB/MiB/GiB in 1024s."""
    test_cache_limit: str = Field(default="5GB", examples=["5GB"])
    """After each run, the pipeline's test caches (the named volumes of `stages.test.cache`)
    on the build engine are kept under this size: the oldest are removed first (the next run
    then starts that cache empty)."""
    disk_reserve: str = Field(default="2GB", examples=["2GB", "0"])
    """A run fails before it starts when the build engine's disk or the runner's data
    directory's has less free space than this, saying what uses the engine's disk. `0`: no
    check."""

    @field_validator("cache_limit", "test_cache_limit", "disk_reserve", mode="before")
    @classmethod
    def _size(cls, value: str | int) -> str:
        parse_size(value)  # refused here, at the file's line, not when the run is over
        return str(value)
