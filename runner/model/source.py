"""Where the code comes from: the repository section of a pipeline."""
from __future__ import annotations

from pydantic import Field

from runner.model.base import Model


class Repository(Model):
    # A URL (https://, ssh://, git@host:path, file://) or a local path; relative paths are
    # resolved against the pipeline file's directory by the loader.
    url: str
    # Branch, tag or commit sha; None means the remote's default branch (its HEAD).
    ref: str | None = None
    depth: int | None = Field(default=None, ge=1)  # shallow fetch when set
    submodules: bool = False
    # Names of entries in `secrets:` (never the values themselves).
    token_secret: str | None = Field(default=None, alias="token")
    token_user: str = "x-access-token"
    ssh_key_secret: str | None = Field(default=None, alias="ssh_key")
