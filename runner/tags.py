"""Image names, tags computed from git (as docker/metadata-action does), and OCI labels. Pure.

Tag templates (the `image.tags` list) hold literal text and placeholders:
  {sha}        the full commit sha
  {short_sha}  its first 7 characters
  {branch}     the branch being built (None on a tag or detached build)
  {tag}        the git tag being built (None on a branch build)
  {run_id}     the run's id (None when not given)
  {latest}     "latest" when building the repository's default branch, else None
A template with a placeholder that has no value yields no tag. The rest are sanitised into valid
docker tags, deduplicated in order; if nothing remains, the short sha is the tag.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from runner.model.image import ImageName

SHORT_SHA_LENGTH = 7
PLACEHOLDERS = ("sha", "short_sha", "branch", "tag", "run_id", "latest")

_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class GitInfo:
    """What was checked out. `branch` and `tag` are short names ("main", "v1.2.0"); both None
    on a detached build (a bare commit sha)."""

    sha: str
    branch: str | None = None
    tag: str | None = None
    default_branch: str | None = None

    @property
    def short_sha(self) -> str:
        return self.sha[:SHORT_SHA_LENGTH]


def _short_ref(ref: str | None, prefix: str) -> str | None:
    if not ref:
        return None
    return ref[len(prefix):] if ref.startswith(prefix) else ref


def sanitize_tag(value: str) -> str:
    """A valid docker tag from any text: '/' and other invalid characters become '-', leading
    '.' and '-' are removed, at most 128 characters. May return "" (nothing usable)."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value.replace("/", "-"))
    return value.lstrip(".-")[:128]


def validate_template(template: str) -> str | None:
    """None when `template` is a usable tag template, else a message saying what is wrong."""
    if not template.strip():
        return "empty tag template"
    names = _PLACEHOLDER_RE.findall(template)
    for name in names:
        if name not in PLACEHOLDERS:
            close = difflib.get_close_matches(name, PLACEHOLDERS, n=1)
            hint = f" (did you mean '{{{close[0]}}}'?)" if close else ""
            return (f"unknown placeholder '{{{name}}}' in tag template {template!r}{hint}; "
                    f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    rest = _PLACEHOLDER_RE.sub("", template)
    if "{" in rest or "}" in rest:
        return f"unbalanced '{{' or '}}' in tag template {template!r}"
    if not names and not sanitize_tag(template):
        return f"tag template {template!r} gives no valid docker tag"
    return None


def _values(info: GitInfo, run_id: str | None) -> dict[str, str | None]:
    branch = _short_ref(info.branch, "refs/heads/")
    default = _short_ref(info.default_branch, "refs/heads/")
    return {
        "sha": info.sha or None,
        "short_sha": info.short_sha or None,
        "branch": branch,
        "tag": _short_ref(info.tag, "refs/tags/"),
        "run_id": str(run_id) if run_id not in (None, "") else None,
        "latest": "latest" if branch and default and branch == default else None,
    }


def render_template(template: str, info: GitInfo, run_id: str | None = None) -> str | None:
    """The sanitised tag for one template, or None when one of its placeholders has no value
    (or nothing valid remains). Raises ValueError for an invalid template."""
    problem = validate_template(template)
    if problem:
        raise ValueError(problem)
    values = _values(info, run_id)
    missing = False

    def fill(m: re.Match[str]) -> str:
        nonlocal missing
        value = values[m.group(1)]
        if not value:
            missing = True
            return ""
        return value

    text = _PLACEHOLDER_RE.sub(fill, template)
    if missing:
        return None
    return sanitize_tag(text) or None


def compute_tags(templates: Iterable[str], info: GitInfo, run_id: str | None = None) -> list[str]:
    """The docker tags (without the image name) for a build of `info`, in template order."""
    out: list[str] = []
    for template in templates:
        tag = render_template(template, info, run_id)
        if tag and tag not in out:
            out.append(tag)
    if not out:
        out.append(sanitize_tag(info.short_sha) or "latest")
    return out


def is_valid_tag(tag: str) -> bool:
    return bool(_TAG_RE.match(tag))


def validate_image_name(name: str) -> str | None:
    """None when `name` is a valid image repository name such as "10.0.0.1:5000/team/app"
    (registry host[:port] optional, lowercase path components, no tag or digest); otherwise a
    message saying what is wrong."""
    if "@" in name:
        return f"image name {name!r} must not include a digest; give the repository name only"
    try:
        parsed = ImageName.parse(name)
    except ValueError as exc:
        return str(exc)
    if parsed.tag:
        repo = name[:-len(parsed.tag) - 1]
        return (f"image name {name!r} must not include a tag (':{parsed.tag}'): use {repo!r} "
                f"and list tags under image.tags")
    return None


def strip_credentials(url: str) -> str:
    """`url` without user and password (https://user:token@host/x -> https://host/x).
    scp-like addresses (git@host:path) and local paths are returned unchanged."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def oci_labels(source_url: str, sha: str, created_iso: str) -> dict[str, str]:
    """The org.opencontainers.image.{source,revision,created} labels (no credentials)."""
    return {
        "org.opencontainers.image.source": strip_credentials(source_url),
        "org.opencontainers.image.revision": sha,
        "org.opencontainers.image.created": created_iso,
    }
