"""Settings of the push stage (docker SDK)."""
from __future__ import annotations

from pydantic import Field, model_validator

from runner.model.base import Model, check_login


class RegistryAuth(Model):
    """The login for the registry in `image.name`: both fields or neither. Neither: the push
    uses the docker login of the runner's user (`$DOCKER_CONFIG/config.json`, else
    `~/.docker/config.json`, with its credential helpers), if there is one."""

    username: str | None = Field(default=None, examples=["ci"])
    """The registry user name."""
    password_secret: str | None = Field(default=None, alias="password",
                                        examples=["registry_password"])
    """The name of the `secrets:` entry holding the password or token."""

    @model_validator(mode="after")
    def _both(self) -> RegistryAuth:
        check_login(self.username, self.password_secret)
        return self


class PushSettings(Model):
    """Pushing every tag of the built image to its registry. The digest the registry
    acknowledges is what the deploy runs."""

    enabled: bool = True
    """false: the stage does not run (nor can the deploy, which needs the pushed digest)."""
    auth: RegistryAuth = Field(default_factory=RegistryAuth)
    """Registry credentials."""
    retries: int = Field(default=3, ge=0, le=10)
    """Extra attempts after a transient registry error (a timeout, a 5xx)."""
    timeout: float = Field(default=900, gt=0)
    """Seconds one push attempt of one tag may take. Then it is stopped (the engine stops
    pushing when its connection closes) and counts as a transient error, retried as `retries`
    says. It bounds a registry or token endpoint that accepts connections but never answers
    (the engine's own retries alone take minutes)."""
