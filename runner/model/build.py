"""Settings of the build stage (BuildKit)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from runner.model.base import Model, OneString, PathOn
from runner.model.engine import BuildEngineSettings


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
