"""Settings of the build stage (BuildKit)."""
from __future__ import annotations

from pydantic import Field

from runner.model.base import Model


class BuildSecret(Model):
    id: str  # the id used in `RUN --mount=type=secret,id=...`
    secret: str  # name of an entry in the pipeline's `secrets:`


class BuildStage(Model):
    enabled: bool = True
    context: str = "."  # relative to the checked-out repository
    dockerfile: str = "Dockerfile"  # relative to the context
    target: str | None = None
    args: dict[str, str] = Field(default_factory=dict)
    secrets: tuple[BuildSecret, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)
    cache_from: tuple[str, ...] = ()
    cache_to: tuple[str, ...] = ()
    pull: bool = False
    platform: str | None = None
    timeout: float = Field(default=1800, gt=0)  # seconds
