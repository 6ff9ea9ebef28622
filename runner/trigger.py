"""A stored webhook delivery -> `Trigger`: what was pushed, where, by whom. Pure.

Handled: push events of GitHub, GitLab (object_kind push / tag_push) and Gitea / Forgejo / Gogs,
GitHub's and Gitea's `delete` events, pull / merge requests (GitHub and Gitea `pull_request`,
GitLab `Merge Request Hook`), and a "generic" shape for scripts:
    {"ref": "refs/heads/main", "commit": "<sha>", "repo_url": ..., "clone_url": ...}
The provider comes from the caller, else from the event headers (X-Gitea-Event, X-Forgejo-Event
and X-Gogs-Event first, since Gitea also sends X-GitHub-Event; then X-Gitlab-Event,
X-GitHub-Event), else from the payload's shape.

A tag push's commit is the commit the tag points at: GitHub's and Gitea's `after` is the tag
object for an annotated tag, so head_commit.id is taken (GitLab's checkout_sha likewise); the
checkout peels whatever it is given (TAG^{commit}) all the same.

A deleted branch or tag (after = 40 zeros, `deleted: true`, or a `delete` event) gives
deleted=True and commit=None: there is nothing to build.

What the run page shows of the change comes from here too, parsed once: the message and author of
the commit built (only the payload's entry whose id is that commit: GitHub's and Gitea's
head_commit or one of `commits`, GitLab's `commits` or a merge request's last_commit; none when
the payload lists no such entry, never another commit's) and a pull request's title and web
address (http(s) only). These are text anyone who can push writes: a value of the wrong type is
left out rather than refusing the delivery, and the pages escape them.

A pull request gives kind="pull_request", commit = its head commit, and ref = the ref the BASE
repository keeps for it (refs/pull/N/head on GitHub and Gitea, refs/merge-requests/N/head on
GitLab): a fork's branch is not in the base repository, that ref is. Only the actions that bring
code to build start anything (opened, synchronize(d), reopened; GitLab open, reopen, and update
with new commits); the others are UnsupportedEvent, with the reason.
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
_PULL_EVENTS = {"pull_request", "merge request hook"}
# GitHub says "synchronize", Gitea and Gogs "synchronized": both mean new commits on the head.
_PULL_ACTIONS = ("opened", "synchronize", "synchronized", "reopened")
_MERGE_ACTIONS = ("open", "reopen", "update")


class UnsupportedEvent(InvalidInput):
    """A well-formed delivery this runner does not act on (ping, a closed or labelled pull
    request, a push to refs/notes/...). A daemon answers it with 2xx and starts nothing."""


@dataclass(frozen=True)
class Trigger:
    kind: str  # "push" (a branch), "tag" or "pull_request"
    provider: str  # "github" | "gitlab" | "gitea" | "generic"
    repo_url: str | None  # the repository's web page (a pull request's: the base repository's)
    clone_url: str | None  # https clone URL (as the provider gives it)
    # full ref: refs/heads/main, refs/tags/v1.0; a pull request's head in the base repository:
    # refs/pull/3/head, refs/merge-requests/3/head
    ref: str
    branch: str | None  # short name, for a branch push (None for a pull request: see head_branch)
    tag: str | None  # short name, for a tag push
    commit: str | None  # the pushed commit (full sha); None when the ref was deleted
    before: str | None  # the previous commit; None when the ref is new
    deleted: bool
    pusher: str | None  # user name of who pushed
    delivery: str | None  # the provider's delivery id, from the headers
    default_branch: str | None = None  # the repository's default branch, when the payload says
    # A pull / merge request's facts (None / False for pushes):
    number: int | None = None  # its number (GitLab: the iid, the !N of the project)
    action: str | None = None  # as the provider says it: opened, synchronize, update, ...
    head_branch: str | None = None  # the branch it brings, in the head repository
    base_branch: str | None = None  # the branch it targets, in this (the base) repository
    head_repo_url: str | None = None  # the head repository's clone URL (a fork's, for a fork)
    # The head repository is not the base repository: its author may have no write access to
    # the base, so its code must not see the base's secrets. True also when the payload cannot
    # tell (GitHub's head.repo is null once the fork is deleted).
    fork: bool = False
    title: str | None = None  # the pull request's title
    url: str | None = None  # the pull request's web page (http or https)
    # The built commit's message and author (name, else user name), when the payload has them.
    commit_message: str | None = None
    commit_author: str | None = None

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
    """Guess the provider from the payload's keys; None when it looks like no push or pull
    request at all."""
    if payload.get("object_kind") in ("push", "tag_push", "merge_request"):
        return "gitlab"
    if isinstance(payload.get("pull_request"), dict) and "action" in payload:
        return "gitea" if _looks_gitea(payload) else "github"
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


def _mapping(data: Mapping[str, Any], key: str, where: str = "") -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"'{where}{key}' should be an object, got {type(value).__name__}")
    return value


def _number(data: Mapping[str, Any], key: str, where: str = "") -> int:
    value = data.get(key)
    if value is None:
        raise _fail(f"'{where}{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(f"'{where}{key}' should be a pull request number, got {str(value)[:80]!r}")
    return value


def _text(data: Mapping[str, Any], key: str) -> str | None:
    """An untrusted text the run page shows (a title, a message): None when absent, empty or not
    a string."""
    value = data.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _web_url(data: Mapping[str, Any], key: str) -> str | None:
    """A link the run page may show: http(s) only (never javascript: or a local path)."""
    value = _text(data, key)
    return value if value and value.lower().startswith(("https://", "http://")) else None


def _commit_facts(entries: list[Any], commit: str | None) -> dict[str, str | None]:
    """commit_message and commit_author of the entry (a payload's commit object) whose id is
    `commit`; empty when no entry is that commit."""
    entry = next((e for e in entries
                  if isinstance(e, dict) and commit and e.get("id") == commit), None)
    if entry is None:
        return {}
    author = entry.get("author") if isinstance(entry.get("author"), dict) else {}
    return {"commit_message": _text(entry, "message"),
            "commit_author": _text(author, "name") or _text(author, "username")}


def _payload_commits(payload: Mapping[str, Any]) -> list[Any]:
    """head_commit (GitHub, Gitea) and the pushed `commits` (all three forges)."""
    commits = payload.get("commits")
    return [payload.get("head_commit"), *(commits if isinstance(commits, list) else ())]


def _other_repository(head_id: Any, base_id: Any, head_name: str | None,
                      base_name: str | None) -> bool:
    """Whether a pull request's head repository is not its base repository: by id when both are
    known, else by full name; when neither tells, it counts as another one (the safe answer)."""
    if head_id is not None and base_id is not None:
        return head_id != base_id
    if head_name and base_name:
        return head_name.lower() != base_name.lower()
    return True


def _short_branch(ref: str | None) -> str | None:
    return ref[len("refs/heads/"):] if ref and ref.startswith("refs/heads/") else ref


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
    if tag is not None and not deleted:
        # An annotated tag's `after` is the tag object, not a commit (GitHub and Gitea alike);
        # head_commit is the commit it points at: that is what is built, linked and given a status.
        commit = _sha(_mapping(payload, "head_commit"), "id", "head_commit.") or commit
    repo = _mapping(payload, "repository")
    pusher = _mapping(payload, "pusher")
    sender = _mapping(payload, "sender")
    who = (_str(pusher, "login", "pusher.") or _str(pusher, "username", "pusher.")
           or _str(pusher, "name", "pusher.") or _str(sender, "login", "sender."))
    default = _str(repo, "default_branch", "repository.") or \
        _str(repo, "master_branch", "repository.")
    commit = None if deleted else commit
    return Trigger(kind=kind, provider=provider, repo_url=_str(repo, "html_url", "repository."),
                   clone_url=_str(repo, "clone_url", "repository."), ref=ref, branch=branch,
                   tag=tag, commit=commit, before=_sha(payload, "before"),
                   deleted=deleted, pusher=who, delivery=delivery, default_branch=default,
                   **_commit_facts(_payload_commits(payload), commit))


def _pull_request(payload: Mapping[str, Any], provider: str, delivery: str | None) -> Trigger:
    """GitHub's and Gitea's (Forgejo's, Gogs') `pull_request` event. `repository` is the base
    repository (the one the webhook belongs to); pull_request.head.repo is where the code is."""
    action = _str(payload, "action", required=True)
    pr = _mapping(payload, "pull_request")
    if not pr:
        raise _fail("'pull_request' is missing")
    number = _number(payload, "number") if payload.get("number") is not None else \
        _number(pr, "number", "pull_request.")
    if action not in _PULL_ACTIONS:
        raise UnsupportedEvent(f"webhook payload: pull request #{number} {action!r} starts "
                               f"nothing (only opened, synchronize and reopened do)")
    head = _mapping(pr, "head", "pull_request.")
    base = _mapping(pr, "base", "pull_request.")
    commit = _sha(head, "sha", "pull_request.head.")
    if commit is None:
        raise _fail("'pull_request.head.sha' is missing")
    # Gogs names the branches at the top of pull_request; GitHub and Gitea in head / base.
    base_branch = _short_branch(_str(base, "ref", "pull_request.base.")
                                or _str(pr, "base_branch", "pull_request."))
    if base_branch is None:
        raise _fail("'pull_request.base.ref' is missing")
    head_branch = _short_branch(_str(head, "ref", "pull_request.head.")
                                or _str(pr, "head_branch", "pull_request."))
    repo = _mapping(payload, "repository")
    base_repo = _mapping(base, "repo", "pull_request.base.") or repo
    head_repo = _mapping(head, "repo", "pull_request.head.")
    # Gitea gives head.repo_id / base.repo_id (-1 once the head repository is deleted).
    fork = _other_repository(
        head.get("repo_id", head_repo.get("id")), base.get("repo_id", base_repo.get("id")),
        _str(head_repo, "full_name", "pull_request.head.repo."),
        _str(base_repo, "full_name", "pull_request.base.repo."))
    sender = _mapping(payload, "sender")
    return Trigger(
        kind="pull_request", provider=provider,
        repo_url=_str(repo, "html_url", "repository.") or _str(base_repo, "html_url"),
        clone_url=_str(repo, "clone_url", "repository.") or _str(base_repo, "clone_url"),
        ref=f"refs/pull/{number}/head", branch=None, tag=None, commit=commit,
        before=_sha(payload, "before"), deleted=False,
        pusher=_str(sender, "login", "sender.") or _str(sender, "username", "sender."),
        delivery=delivery,
        default_branch=_str(repo, "default_branch", "repository.")
        or _str(base_repo, "default_branch"),
        number=number, action=action, head_branch=head_branch, base_branch=base_branch,
        head_repo_url=_str(head_repo, "clone_url", "pull_request.head.repo."), fork=fork,
        # GitHub's and Gitea's pull request events carry no commit message.
        title=_text(pr, "title"), url=_web_url(pr, "html_url"))


def _gitlab_merge_request(payload: Mapping[str, Any], delivery: str | None) -> Trigger:
    """GitLab's Merge Request Hook. `project` is the target project (the webhook's own);
    object_attributes.source is where the code is."""
    attrs = _mapping(payload, "object_attributes")
    if not attrs:
        raise _fail("'object_attributes' is missing")
    where = "object_attributes."
    number = _number(attrs, "iid", where)
    action = _str(attrs, "action", where, required=True)
    # oldrev is only there when the update pushed commits (not for a new title or label).
    before = _sha(attrs, "oldrev", where)
    if action not in _MERGE_ACTIONS:
        raise UnsupportedEvent(f"webhook payload: merge request !{number} {action!r} starts "
                               f"nothing (only open, reopen and update with new commits do)")
    if action == "update" and before is None:
        raise UnsupportedEvent(f"webhook payload: merge request !{number} 'update' brings no "
                               f"new commits (no oldrev): nothing to build")
    commit = _sha(_mapping(attrs, "last_commit", where), "id", f"{where}last_commit.")
    if commit is None:
        raise _fail(f"'{where}last_commit.id' is missing")
    base_branch = _str(attrs, "target_branch", where, required=True)
    source = _mapping(attrs, "source", where)
    target = _mapping(attrs, "target", where)
    project = _mapping(payload, "project")
    fork = _other_repository(
        attrs.get("source_project_id"), attrs.get("target_project_id"),
        _str(source, "path_with_namespace", f"{where}source."),
        _str(target, "path_with_namespace", f"{where}target."))
    user = _mapping(payload, "user")
    return Trigger(
        kind="pull_request", provider="gitlab",
        repo_url=_str(project, "web_url", "project.") or _str(target, "web_url"),
        clone_url=_str(project, "git_http_url", "project.") or _str(target, "git_http_url"),
        ref=f"refs/merge-requests/{number}/head", branch=None, tag=None, commit=commit,
        before=before, deleted=False,
        pusher=_str(user, "username", "user.") or _str(user, "name", "user."),
        delivery=delivery,
        default_branch=_str(project, "default_branch", "project.")
        or _str(target, "default_branch"),
        number=number, action=action, head_branch=_str(attrs, "source_branch", where),
        base_branch=base_branch,
        head_repo_url=_str(source, "git_http_url", f"{where}source."), fork=fork,
        title=_text(attrs, "title"), url=_web_url(attrs, "url"),
        **_commit_facts([attrs.get("last_commit")], commit))


def _gitlab(payload: Mapping[str, Any], event: str | None, delivery: str | None) -> Trigger:
    kind_field = payload.get("object_kind")
    if event == "merge request hook" or (event is None and kind_field == "merge_request"):
        if kind_field != "merge_request":
            raise UnsupportedEvent(f"webhook payload: GitLab event {event!r} carries "
                                   f"object_kind {kind_field!r}, not merge_request")
        return _gitlab_merge_request(payload, delivery)
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
    commit = None if deleted else commit
    return Trigger(kind=kind, provider="gitlab", repo_url=web, clone_url=clone, ref=ref,
                   branch=branch, tag=tag, commit=commit,
                   before=_sha(payload, "before"), deleted=deleted,
                   pusher=_str(payload, "user_username") or _str(payload, "user_name"),
                   delivery=delivery, default_branch=_str(project, "default_branch", "project."),
                   **_commit_facts(_payload_commits(payload), commit))


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

    Raises UnsupportedEvent (an InvalidInput) for a valid event that starts nothing (ping, a
    closed pull request, a non-branch ref) and InvalidInput for a payload that is not
    understood."""
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
        raise _fail(f"not a push or pull request event of GitHub, GitLab or Gitea/Forgejo "
                    f"(keys: {keys})")
    delivery = next((h[n] for n in _DELIVERY_HEADERS if h.get(n)), None)
    event = _event_name(h, provider)
    if event is not None and event not in _PUSH_EVENTS | _DELETE_EVENTS | _PULL_EVENTS:
        raise UnsupportedEvent(f"webhook payload: {provider} event {event!r} is not handled "
                               f"(only push, delete and pull request events are)")
    if provider == "gitlab":
        return _gitlab(payload, event, delivery)
    if provider == "generic":
        return _generic(payload, delivery)
    if event == "pull_request" or (event is None and isinstance(payload.get("pull_request"), dict)
                                   and "action" in payload):
        return _pull_request(payload, provider, delivery)
    if event in _DELETE_EVENTS or ("ref_type" in payload and "after" not in payload):
        return _delete_event(payload, provider, delivery)
    return _github_like(payload, provider, delivery)

