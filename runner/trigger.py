"""A stored webhook delivery -> `Trigger`: what was pushed, where, by whom. Pure.

Handled: push events of GitHub, GitLab (object_kind push / tag_push) and Gitea / Forgejo / Gogs,
GitHub's and Gitea's `delete` events, and a "generic" shape for scripts:
    {"ref": "refs/heads/main", "commit": "<sha>", "repo_url": ..., "clone_url": ...}
The provider comes from the caller, else from the event headers (X-Gitea-Event, X-Forgejo-Event
and X-Gogs-Event first, since Gitea also sends X-GitHub-Event; then X-Gitlab-Event,
X-GitHub-Event), else from the payload's shape.

A deleted branch or tag (after = 40 zeros, `deleted: true`, or a `delete` event) gives
deleted=True and commit=None: there is nothing to build.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from runner.errors import InvalidInput

PROVIDERS = ("github", "gitlab", "gitea", "generic")
_ALIASES = {"forgejo": "gitea", "gogs": "gitea", "runner": "generic"}
_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_EVENT_HEADERS = (  # header -> provider, in the order they are trusted
    ("x-gitea-event", "gitea"), ("x-forgejo-event", "gitea"), ("x-gogs-event", "gitea"),
    ("x-gitlab-event", "gitlab"), ("x-github-event", "github"), ("x-runner-event", "generic"),
)
_DELIVERY_HEADERS = ("x-github-delivery", "x-gitea-delivery", "x-forgejo-delivery",
                     "x-gogs-delivery", "x-gitlab-event-uuid", "x-gitlab-webhook-uuid",
                     "x-runner-delivery", "idempotency-key")
_PUSH_EVENTS = {"push", "push hook", "tag push hook", "tag_push"}
_DELETE_EVENTS = {"delete"}


class UnsupportedEvent(InvalidInput):
    """A well-formed delivery this runner does not act on (ping, pull_request, a push to
    refs/notes/...). A daemon answers it with 2xx and starts nothing."""


@dataclass(frozen=True)
class Trigger:
    kind: str  # "push" (a branch) or "tag"
    provider: str  # "github" | "gitlab" | "gitea" | "generic"
    repo_url: str | None  # the repository's web page
    clone_url: str | None  # https clone URL (as the provider gives it)
    ref: str  # full ref: refs/heads/main, refs/tags/v1.0
    branch: str | None  # short name, for a branch push
    tag: str | None  # short name, for a tag push
    commit: str | None  # the pushed commit (full sha); None when the ref was deleted
    before: str | None  # the previous commit; None when the ref is new
    deleted: bool
    pusher: str | None  # user name of who pushed
    delivery: str | None  # the provider's delivery id, from the headers
    default_branch: str | None = None  # the repository's default branch, when the payload says

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fail(message: str) -> InvalidInput:
    return InvalidInput(f"webhook payload: {message}")


def _lower(headers: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (headers or {}).items()}


def normalize_provider(name: str) -> str:
    """'GitHub' -> 'github', 'forgejo' -> 'gitea'. InvalidInput for an unknown provider."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PROVIDERS:
        raise _fail(f"unknown provider {name!r} (known: github, gitlab, gitea, forgejo, "
                    f"generic)")
    return key


def provider_from_headers(headers: Mapping[str, Any] | None) -> str | None:
    h = _lower(headers)
    return next((p for name, p in _EVENT_HEADERS if h.get(name)), None)


def _event_name(headers: Mapping[str, str], provider: str) -> str | None:
    names = [n for n, p in _EVENT_HEADERS if p == provider]
    return next((headers[n].strip().lower() for n in names if headers.get(n)), None)


def _looks_gitea(payload: Mapping[str, Any]) -> bool:
    if "compare_url" in payload or "total_commits" in payload:
        return True
    for key in ("pusher", "sender"):
        user = payload.get(key)
        if isinstance(user, dict) and "username" in user:
            return True
    repo = payload.get("repository")
    return isinstance(repo, dict) and isinstance(repo.get("owner"), dict) \
        and "username" in repo["owner"]


def provider_from_payload(payload: Mapping[str, Any]) -> str | None:
    """Guess the provider from the payload's keys; None when it looks like no push at all."""
    if payload.get("object_kind") in ("push", "tag_push"):
        return "gitlab"
    if isinstance(payload.get("repository"), dict) and "ref" in payload \
            and ("after" in payload or "ref_type" in payload):
        return "gitea" if _looks_gitea(payload) else "github"
    if "ref" in payload and ("commit" in payload or "after" in payload):
        return "generic"
    return None


def _str(data: Mapping[str, Any], key: str, where: str = "", required: bool = False) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise _fail(f"'{where}{key}' is missing")
        return None
    if not isinstance(value, str):
        raise _fail(f"'{where}{key}' should be a string, got {type(value).__name__}")
    return value


def _sha(data: Mapping[str, Any], key: str, where: str = "") -> str | None:
    """A commit sha, or None for the all-zero "no commit" sha / absent."""
    value = _str(data, key, where)
    if value is None or set(value) == {"0"}:
        return None
    if not _SHA_RE.match(value):
        raise _fail(f"'{where}{key}' is not a commit sha: {value[:80]!r}")
    return value


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"'{key}' should be an object, got {type(value).__name__}")
    return value


def _split_ref(ref: str) -> tuple[str, str | None, str | None]:
    if ref.startswith("refs/heads/") and len(ref) > len("refs/heads/"):
        return "push", ref[len("refs/heads/"):], None
    if ref.startswith("refs/tags/") and len(ref) > len("refs/tags/"):
        return "tag", None, ref[len("refs/tags/"):]
    if ref.startswith("refs/"):
        raise UnsupportedEvent(f"webhook payload: {ref!r} is neither a branch nor a tag; "
                               f"nothing to build")
    raise _fail(f"'ref' should be a full ref such as refs/heads/main, got {ref[:80]!r}")


def _delete_event(payload: Mapping[str, Any], provider: str, delivery: str | None) -> Trigger:
    """GitHub's and Gitea's `delete` event: {"ref": "name", "ref_type": "branch"|"tag"}."""
    name = _str(payload, "ref", required=True)
    assert name is not None
    ref_type = _str(payload, "ref_type", required=True)
    if ref_type not in ("branch", "tag"):
        raise UnsupportedEvent(f"webhook payload: deleted {ref_type!r} is neither a branch nor "
                               f"a tag")
    ref = name if name.startswith("refs/") else \
        f"refs/{'heads' if ref_type == 'branch' else 'tags'}/{name}"
    kind, branch, tag = _split_ref(ref)
    repo = _mapping(payload, "repository")
    sender = _mapping(payload, "sender")
    return Trigger(kind=kind, provider=provider, repo_url=_str(repo, "html_url", "repository."),
                   clone_url=_str(repo, "clone_url", "repository."), ref=ref, branch=branch,
                   tag=tag, commit=None, before=None, deleted=True,
                   pusher=_str(sender, "login", "sender.") or _str(sender, "username", "sender."),
                   delivery=delivery, default_branch=_str(repo, "default_branch", "repository."))


def _github_like(payload: Mapping[str, Any], provider: str, delivery: str | None) -> Trigger:
    ref = _str(payload, "ref", required=True)
    assert ref is not None
    kind, branch, tag = _split_ref(ref)
    commit = _sha(payload, "after")
    deleted = payload.get("deleted") is True or commit is None
    if "after" not in payload and not deleted:
        raise _fail("'after' is missing")
    repo = _mapping(payload, "repository")
    pusher = _mapping(payload, "pusher")
    sender = _mapping(payload, "sender")
    who = (_str(pusher, "login", "pusher.") or _str(pusher, "username", "pusher.")
           or _str(pusher, "name", "pusher.") or _str(sender, "login", "sender."))
    default = _str(repo, "default_branch", "repository.") or \
        _str(repo, "master_branch", "repository.")
    return Trigger(kind=kind, provider=provider, repo_url=_str(repo, "html_url", "repository."),
                   clone_url=_str(repo, "clone_url", "repository."), ref=ref, branch=branch,
                   tag=tag, commit=None if deleted else commit, before=_sha(payload, "before"),
                   deleted=deleted, pusher=who, delivery=delivery, default_branch=default)


def _gitlab(payload: Mapping[str, Any], delivery: str | None) -> Trigger:
    kind_field = payload.get("object_kind")
    if kind_field not in ("push", "tag_push"):
        raise UnsupportedEvent(f"webhook payload: GitLab object_kind {kind_field!r} is not a "
                               f"push")
    ref = _str(payload, "ref", required=True)
    assert ref is not None
    kind, branch, tag = _split_ref(ref)
    after = _sha(payload, "after")
    commit = _sha(payload, "checkout_sha") or after
    deleted = after is None
    project = _mapping(payload, "project")
    repo = _mapping(payload, "repository")
    web = _str(project, "web_url", "project.") or _str(repo, "homepage", "repository.")
    clone = _str(project, "git_http_url", "project.") or \
        _str(repo, "git_http_url", "repository.")
    return Trigger(kind=kind, provider="gitlab", repo_url=web, clone_url=clone, ref=ref,
                   branch=branch, tag=tag, commit=None if deleted else commit,
                   before=_sha(payload, "before"), deleted=deleted,
                   pusher=_str(payload, "user_username") or _str(payload, "user_name"),
                   delivery=delivery, default_branch=_str(project, "default_branch", "project."))


def _generic(payload: Mapping[str, Any], delivery: str | None) -> Trigger:
    ref = _str(payload, "ref", required=True)
    assert ref is not None
    kind, branch, tag = _split_ref(ref)
    commit = _sha(payload, "commit") or _sha(payload, "after")
    deleted = payload.get("deleted") is True or (commit is None and (
        isinstance(payload.get("after"), str) or isinstance(payload.get("commit"), str)))
    if commit is None and not deleted:
        raise _fail("'commit' (or 'after') is missing")
    pusher = payload.get("pusher")
    return Trigger(kind=kind, provider="generic", repo_url=_str(payload, "repo_url"),
                   clone_url=_str(payload, "clone_url"), ref=ref, branch=branch, tag=tag,
                   commit=None if deleted else commit, before=_sha(payload, "before"),
                   deleted=deleted, pusher=pusher if isinstance(pusher, str) else None,
                   delivery=delivery, default_branch=_str(payload, "default_branch"))


def parse_event(
    payload: Mapping[str, Any] | str | bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    provider: str | None = None,
) -> Trigger:
    """Parse a webhook delivery (a JSON object, or its text) into a Trigger.

    Raises UnsupportedEvent (an InvalidInput) for a valid event that starts nothing (ping,
    pull_request, a non-branch ref) and InvalidInput for a payload that is not understood."""
    if isinstance(payload, (str, bytes)):
        try:
            payload = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _fail(f"not JSON: {exc}") from None
    if not isinstance(payload, Mapping):
        raise _fail(f"expected a JSON object, got {type(payload).__name__}")
    h = _lower(headers)
    if provider:
        provider = normalize_provider(provider)
    else:
        provider = provider_from_headers(h) or provider_from_payload(payload)
    if provider is None:
        keys = ", ".join(sorted(map(str, payload))[:12]) or "none"
        raise _fail(f"not a push event of GitHub, GitLab or Gitea/Forgejo (keys: {keys})")
    delivery = next((h[n] for n in _DELIVERY_HEADERS if h.get(n)), None)
    event = _event_name(h, provider)
    if event is not None and event not in _PUSH_EVENTS | _DELETE_EVENTS:
        raise UnsupportedEvent(f"webhook payload: {provider} event {event!r} is not handled "
                               f"(only push and delete events are)")
    if provider == "gitlab":
        return _gitlab(payload, delivery)
    if provider == "generic":
        return _generic(payload, delivery)
    if event in _DELETE_EVENTS or ("ref_type" in payload and "after" not in payload):
        return _delete_event(payload, provider, delivery)
    return _github_like(payload, provider, delivery)

