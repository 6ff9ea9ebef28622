"""The image a pipeline produces, and how its tags are computed from git."""
from __future__ import annotations

from pydantic import Field

from runner.model.base import Model


class Image(Model):
    # Full repository name including the registry, e.g. "10.87.53.1:5000/example/app".
    name: str
    # Tag templates; placeholders filled from git after checkout (see runner.tags):
    # {sha} {short_sha} {branch} {tag} {run_id}. A template whose placeholder has no value
    # (e.g. {tag} on a branch build) yields no tag, as docker/metadata-action does.
    tags: tuple[str, ...] = Field(default=("{short_sha}", "{branch}", "{tag}"))
