"""The image a pipeline produces, and how its tags are computed from git."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field

from runner.model.base import Model


class Image(Model):
    # Full repository name including the registry, e.g. "10.87.53.1:5000/example/app".
    name: str
    # Tag templates; placeholders filled from git after checkout (see runner.tags):
    # {sha} {short_sha} {branch} {tag} {run_id}. A template whose placeholder has no value
    # (e.g. {tag} on a branch build) yields no tag, as docker/metadata-action does.
    tags: tuple[str, ...] = Field(default=("{short_sha}", "{branch}", "{tag}"))


_DIGEST_REF_RE = re.compile(r"^(?P<name>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class ImageRef:
    """An image by digest, `name@sha256:<64 hex>`: what the push stage got back from the
    registry and the only form a deploy runs. Validated once, here; carried whole afterwards."""

    name: str  # registry/repository, without tag
    digest: str  # "sha256:<64 hex>"

    def __post_init__(self) -> None:
        if not _DIGEST_REF_RE.match(f"{self.name}@{self.digest}"):
            raise ValueError(f"not an image reference by digest (name@sha256:<64 hex>): "
                             f"{self.name}@{self.digest}")

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        """'reg/app@sha256:...' -> ImageRef. Raises ValueError on anything else (a tag, a short
        digest): a deploy only ever runs an image by digest."""
        m = _DIGEST_REF_RE.match(text)
        if not m:
            raise ValueError(f"not an image reference by digest (name@sha256:<64 hex>): {text!r}")
        return cls(m.group("name"), m.group("digest"))

    @property
    def registry(self) -> str:
        """The registry host[:port] the name points at (what `docker login` takes)."""
        return self.name.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}"
