"""The image a pipeline produces, and how its tags are computed from git."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

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

# The grammar of github.com/distribution/reference (reference.go, regexp.go) and docker's
# normalisation of names (normalize.go: splitDockerDomain, ParseNormalizedNamed).
DOCKER_HUB = "docker.io"  # Docker Hub as docker names it: its logins' key, `docker login`'s host
_HUB_API = "registry-1.docker.io"  # where Docker Hub's registry API answers
_LEGACY_HUB = "index.docker.io"
_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})$")
_IDENTIFIER_RE = re.compile(r"^[0-9a-f]{64}$")  # an image id, which docker refuses as a name
MAX_NAME = 255  # registry/repository, as docker counts it (after normalisation)


@dataclass(frozen=True)
class ImageName:
    """An image reference as docker reads it, parsed once: `registry` is the host[:port] docker
    logs in to ("docker.io" for Docker Hub), `repository` the path inside it ("library/app" for
    the Hub's single-component names), `tag` and `digest` what the reference pins, if anything.
    `team/app` is Docker Hub's team/app: the first component is a registry only when it holds
    '.' or ':' or is 'localhost' (so `Team/app` is refused as not lowercase, as the engine
    does; docker's newer CLI would take `Team` for a host and the engine then refuse it)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageName:
        """`[registry/]repository[:tag][@digest]` -> ImageName. Raises ValueError saying what
        is wrong, with the rules `docker tag`/`docker pull` apply."""
        if not text:
            raise ValueError("the image name is empty")
        if any(c.isspace() for c in text):
            raise ValueError(f"image name {text!r} contains spaces")
        if _IDENTIFIER_RE.match(text):
            raise ValueError(f"image name {text!r} is a 64-hex image id, not a repository name")
        rest, at, digest = text.partition("@")
        if at and not _DIGEST_RE.match(digest):
            raise ValueError(f"image name {text!r}: invalid digest {digest!r} (expected "
                             f"sha256:<64 lowercase hex>)")
        slash, colon = rest.rfind("/"), rest.rfind(":")
        tag = None
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1:]
            if not _TAG_RE.match(tag):
                raise ValueError(f"image name {text!r}: invalid tag {tag!r} (letters, digits, "
                                 f"'_', '.' and '-', not starting with '.' or '-', at most 128)")
        first, sep, path = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry = first
            if not _DOMAIN_RE.match(registry):
                raise ValueError(f"invalid registry {registry!r} in image name {text!r} "
                                 f"(expected host[:port])")
        else:
            registry, path = DOCKER_HUB, rest
        if registry == _LEGACY_HUB:
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and path and "/" not in path:
            path = f"library/{path}"
        if not path:
            raise ValueError(f"image name {text!r} has no repository path after the registry")
        for component in path.split("/"):
            if component != component.lower() and _PATH_COMPONENT_RE.match(component.lower()):
                raise ValueError(f"image name {text!r}: repository path must be lowercase "
                                 f"({component!r} -> {component.lower()!r})")
            if not _PATH_COMPONENT_RE.match(component):
                raise ValueError(f"image name {text!r}: invalid path component {component!r} "
                                 f"(lowercase letters and digits, separated by '.', '_', '__' "
                                 f"or '-')")
        if len(registry) + 1 + len(path) > MAX_NAME:
            raise ValueError(f"image name {text!r} is longer than {MAX_NAME} characters")
        return cls(registry, path, tag, digest or None)

    @property
    def name(self) -> str:
        """registry/repository, fully qualified ("docker.io/library/app"): what docker pushes
        to and pulls from, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Where the registry's HTTP API (/v2/) answers: Docker Hub's is not docker.io."""
        return _HUB_API if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        return (self.name + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))


@dataclass(frozen=True)
class ImageRef:
    """An image by digest, `name@sha256:<64 hex>`: what the push stage got back from the
    registry and the only form a deploy runs. Validated once, here; carried whole afterwards."""

    name: str  # registry/repository as the pipeline writes it, without tag
    digest: str  # "sha256:<64 hex>"
    parsed: ImageName = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _DIGEST_REF_RE.match(f"{self.name}@{self.digest}"):
            raise ValueError(f"not an image reference by digest (name@sha256:<64 hex>): "
                             f"{self.name}@{self.digest}")
        parsed = ImageName.parse(self.name)
        if parsed.tag:
            raise ValueError(f"not an image reference by digest: {self.name}@{self.digest} "
                             f"also names tag {parsed.tag!r}")
        object.__setattr__(self, "parsed", parsed)

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
        """The registry host[:port] the name points at (what `docker login` takes): "docker.io"
        for a Docker Hub name such as `team/app`."""
        return self.parsed.registry

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}"
