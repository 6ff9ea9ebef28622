"""Settings of the push stage (docker SDK)."""
from __future__ import annotations

from pydantic import Field

from runner.model.base import Model


class RegistryAuth(Model):
    username: str | None = None
    password_secret: str | None = Field(default=None, alias="password")  # a `secrets:` name


class PushStage(Model):
    enabled: bool = True
    auth: RegistryAuth = Field(default_factory=RegistryAuth)
    retries: int = Field(default=3, ge=0, le=10)  # transient registry errors
