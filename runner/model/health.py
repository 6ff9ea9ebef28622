"""When a new container counts as healthy: `stages.deploy.healthcheck`, and a role's own
(`roles.NAME.healthcheck`)."""
from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from runner.model.base import Model


class HttpCheck(Model):
    """An HTTP GET of the new container, from the server itself, over the SSH connection."""

    port: int = Field(ge=1, le=65535, examples=[8080])
    """The port the app listens on, in its container."""
    path: str = Field(default="/", pattern=r"^/[A-Za-z0-9._~/%?=&+-]*$", examples=["/healthz"])
    """The path to GET."""
    status: tuple[int, ...] = Field(default=(200,), examples=[[200, 204]])
    """The statuses that count as healthy."""


class Healthcheck(Model):
    """When a new container counts as healthy, which is when a server's deploy is done: at most
    one of `cmd` and `http`. Neither: the image's own HEALTHCHECK decides; an image without one
    must stay up, not restarting, for `min_uptime` seconds, which checks nothing else (the deploy
    warns, and reports it "started, not health-checked"); behind the proxy it must answer
    GET / instead (see `proxy.health`)."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["cmd", "http"]}})

    cmd: str | None = Field(default=None, examples=["curl -fsS http://localhost:8080/healthz"])
    """A command run inside the container with `/bin/sh -c`, as a Dockerfile HEALTHCHECK:
    exit status 0 is healthy."""
    http: HttpCheck | None = None
    """An HTTP probe of the container."""
    timeout: float = Field(default=60, gt=0)
    """Seconds the new container has to become healthy before the server's deploy fails."""
    interval: float = Field(default=1, gt=0)
    """Seconds between docker's runs of `cmd` (`--health-interval`)."""
    probe_interval: float = Field(default=0.25, gt=0)
    """Seconds between the runner's own probes (`http`, and reading the container's health)."""
    probe_timeout: float = Field(default=5, gt=0)
    """Seconds one probe may take."""
    retries: int = Field(default=3, ge=1)
    """Consecutive failures of `cmd` before docker calls the container unhealthy."""
    start_period: float = Field(default=0, ge=0)
    """Seconds after the start during which docker does not count failures of `cmd`."""
    min_uptime: float = Field(default=2, ge=0)
    """Seconds an image without a HEALTHCHECK must stay up to count as healthy."""
    image_check: bool = True
    """Whether the image's own HEALTHCHECK counts when neither `cmd` nor `http` is set. false:
    it is switched off (`docker run --no-healthcheck`) and the container counts as up once it
    has run `min_uptime` seconds without exiting or restarting: what a role other than the
    primary one (a worker, whose image's HEALTHCHECK probes the web server) gets by default."""

    @model_validator(mode="after")
    def _one(self) -> Healthcheck:
        if self.cmd and self.http:
            raise ValueError("give either cmd or http, not both")
        return self
