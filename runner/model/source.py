"""Where the code comes from: the repository section of a pipeline."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from runner.model.base import Model, PathOn


class Repository(Model):
    """The git repository to build. `runner exec --repo/--ref` and a webhook's push override
    `url` and `ref` for one run."""

    url: Annotated[str, PathOn("pipeline")] = Field(
        examples=["https://git.example.com/team/app.git"])
    """A URL (`https://`, `ssh://`, `git@host:path`, `file://`) or a local path."""
    ref: str | None = Field(default=None, examples=["main"])
    """A branch, tag or commit sha. Unset: the remote's default branch (its HEAD)."""
    depth: int | None = Field(default=None, ge=1, examples=[1])
    """Fetch only this many commits (a shallow fetch). Unset: the whole history."""
    submodules: bool = False
    """Also check out the repository's submodules."""
    token_secret: str | None = Field(default=None, alias="token", examples=["git_token"])
    """The name of a `secrets:` entry holding an HTTPS access token."""
    token_user: str = "x-access-token"
    """The user name sent with `token` (GitHub takes `x-access-token`, GitLab `oauth2`)."""
    ssh_key_secret: str | None = Field(default=None, alias="ssh_key", examples=["deploy_key"])
    """The name of a `secrets:` entry holding a private key, for an `ssh://` or `git@` URL."""
