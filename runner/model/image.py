"""The image a pipeline produces, and how its tags are computed from git."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field

from runner.model.base import Model


class Image(Model):
    """The image the pipeline builds, pushes and deploys."""

    name: str = Field(examples=["registry.example.com:5000/team/app"])
    """The repository name including the registry, without a tag: lowercase, and what the
    push stage pushes to."""
    tags: tuple[str, ...] = Field(default=("{short_sha}", "{branch}", "{tag}"),
                                  examples=[["{short_sha}", "{branch}", "{latest}", "stable"]])
    """Tag templates, filled from git after the checkout: `{sha}`, `{short_sha}`, `{branch}`,
    `{tag}`, `{run_id}` and `{latest}` (`latest` on the default branch). A template whose
    placeholder has no value in a run (`{tag}` on a branch build) gives no tag; the rest are
    made valid docker tags (`feature/x` becomes `feature-x`); when none is left, the short sha
    is the tag. Quote a template that starts with `{`: `"{short_sha}"`."""


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
