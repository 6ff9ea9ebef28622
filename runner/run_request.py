"""What one run is asked to build, as the daemon hands it to `runner exec --request FILE`.

The daemon parses a forge's payload once, when it arrives (runner.trigger), and stores the run;
when a worker starts the run it builds a RunRequest from the stored run (its columns and, for a
webhook, its parsed delivery) and writes it as JSON. The child reads that JSON back into the same
type: it never parses a forge payload, and runs no webhook started (poll, cron, manual, retry,
rollback) need no invented forge event. `runner exec --event FILE` (a raw delivery replayed by
hand) goes through the same parser into the same type.

Every value is checked where it is read (refs and commits as runner.gitsafety checks them), so a
request that reaches the stages is well formed whoever wrote the file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner.errors import InvalidInput
from runner.gitsafety import check_ref, check_repo_url, is_sha
from runner.model import SecretSource
from runner.trigger import Trigger

# Why a run was started: a webhook's push, tag push or pull request, the daemon's own schedules,
# someone's `runner trigger` / `retry` / rollback, or `runner exec` by hand.
Kind = Literal["push", "tag", "pull_request", "poll", "cron", "manual", "retry", "rollback"]
# What `runner rollback --to` takes (deployers.history.choose): a position (0 the newest
# verified release, up to 999), a digest, or a git commit (abbreviated to 7 or more).
ROLLBACK_TO = re.compile(r"^(?:\d{1,3}|sha256:[0-9a-f]{64}|[0-9a-f]{7,64})$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PullRequest(_Model):
    """A pull / merge request's facts, as its forge gave them."""

    number: int = Field(ge=1)  # GitLab: the iid (!N)
    action: str | None = None  # opened, synchronize, reopened, update, ...
    head_branch: str | None = None  # the branch it brings, in the head repository
    base_branch: str | None = None  # the branch it targets, in this repository
    head_repo_url: str | None = None  # the head repository's clone URL (a fork's, for a fork)
    fork: bool = False  # the head repository is another one (or the payload cannot tell)
    title: str | None = None
    url: str | None = None  # its web page: http(s) only, so a page may link it

    @field_validator("url")
    @classmethod
    def _web(cls, v: str | None) -> str | None:
        if v is not None and not v.lower().startswith(("https://", "http://")):
            raise ValueError(f"{v[:80]!r} is not an http(s) address")
        return v


class RepositoryPipeline(_Model):
    """The pipeline is the repository's own (a daemon entry's `pipeline: PATH`): `runner exec`
    reads FILE from `repository` at the run's commit, and holds it to the operator's limits,
    which the repository cannot widen (runner.repository_pipeline)."""

    repository: str  # what is built and where the file is read, whatever the file says
    # The hosts its deploy may reach (servers and ssh.jump); none: a deploy is refused.
    servers: tuple[str, ...] = ()
    # The secrets it may name, and where their values come from: the file's own `secrets:`
    # may only name these, and their sources are these.
    secrets: dict[str, SecretSource] = Field(default_factory=dict)
    # How git reaches `repository`, as a pipeline's repository: says it (names of `secrets`).
    # These are the operator's: only git gets them, and the file may not name them.
    token: str | None = None
    token_user: str = "x-access-token"
    ssh_key: str | None = None

    @field_validator("repository")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            return check_repo_url(v)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _credentials_are_secrets(self):
        for key in ("token", "ssh_key"):
            name = getattr(self, key)
            if name is not None and name not in self.secrets:
                raise ValueError(f"{key} {name!r} is not one of secrets")
        return self

    @property
    def credentials(self) -> tuple[str, ...]:
        """The names of the secrets only git gets."""
        return tuple(n for n in (self.token, self.ssh_key) if n)


class RunRequest(_Model):
    kind: Kind = "manual"
    provider: Literal["github", "gitlab", "gitea", "generic"] | None = None
    # The ref the commit is on: full (refs/heads/main, refs/tags/v1, refs/pull/3/head), and the
    # short branch or tag name when it is one.
    ref: str | None = None
    branch: str | None = None
    tag: str | None = None
    commit: str | None = None  # the exact commit to build (full sha); None: the ref's head now
    before: str | None = None  # the ref's previous commit, when a push says it
    default_branch: str | None = None  # the repository's, when the forge said it
    repo_url: str | None = None  # the repository's web page
    clone_url: str | None = None
    sender: str | None = None  # who pushed, opened the pull request, or asked for the run
    # The message and author of `commit`, as the forge's event gave them (the daemon parses it
    # once); None when it did not (a poll, a cron or manual run, a GitHub pull request). Text
    # anyone who can push writes: shown escaped.
    commit_message: str | None = None
    commit_author: str | None = None
    pull_request: PullRequest | None = None
    rollback_to: str | None = None  # a rollback run's target (`runner rollback --to`); None: the default
    delivery: str | None = None  # the forge's delivery id
    pipeline_from: RepositoryPipeline | None = None  # None: FILE is a file on this machine
    # For the run's notifications (runner.notifications), said by the daemon: the run's page on
    # its dashboard (when its `public_url` is set), and how the pipeline's previous run ended
    # by its store ("none": no earlier run ended; None: not said, the run's data dir is read).
    run_url: str | None = None
    previous_status: Literal["success", "failed", "none"] | None = None

    @field_validator("ref", "branch", "tag")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_ref(v)
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("commit", "before")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not is_sha(v):
            raise ValueError(f"{v[:80]!r} is not a full hex commit sha")
        return v

    @field_validator("run_url")
    @classmethod
    def _run_url(cls, v: str | None) -> str | None:
        if v is not None and not v.lower().startswith(("https://", "http://")):
            raise ValueError(f"{v[:80]!r} is not an http(s) address")
        return v

    @field_validator("rollback_to")
    @classmethod
    def _rollback_to(cls, v: str | None) -> str | None:
        if v is not None and not ROLLBACK_TO.match(v):
            raise ValueError(f"{v[:80]!r} is not a position, a digest or a commit")
        return v

    @classmethod
    def from_trigger(cls, trig: Trigger, **override: Any) -> "RunRequest":
        """A parsed delivery as a request; `override` sets fields the stored run decides (the run's
        kind, its ref and commit as queued)."""
        pr = None
        if trig.kind == "pull_request" and trig.number is not None:
            pr = PullRequest(number=trig.number, action=trig.action, head_branch=trig.head_branch,
                             base_branch=trig.base_branch, head_repo_url=trig.head_repo_url,
                             fork=trig.fork, title=trig.title, url=trig.url)
        fields = dict(kind=trig.kind, provider=trig.provider, ref=trig.ref, branch=trig.branch,
                      tag=trig.tag, commit=trig.commit, before=trig.before,
                      default_branch=trig.default_branch, repo_url=trig.repo_url,
                      clone_url=trig.clone_url, sender=trig.pusher, pull_request=pr,
                      delivery=trig.delivery, commit_message=trig.commit_message,
                      commit_author=trig.commit_author)
        return checked(lambda: cls(**{**fields, **override}), "the run request")

    def to_dict(self) -> dict[str, Any]:
        """As plain data: the file `runner exec --request` reads, and the run's record
        (run.start's and run.json's `trigger`)."""
        return self.model_dump(mode="json", exclude_none=True)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))


def _problem(error: dict[str, Any]) -> str:
    """One validation error in a request's words: the field, and what is wrong with its value
    (a check's own sentence, not pydantic's "Value error, " before it)."""
    where = ".".join(map(str, error["loc"])) or "(top)"
    if error["type"] == "extra_forbidden":
        return f"{where}: not a field of a run request"
    if error["type"] == "value_error":
        return f"{where}: {error['ctx']['error']}"
    return f"{where}: {error['msg']}"


def checked(make, what: str) -> RunRequest:
    """`make()`, its validation errors as one InvalidInput naming every field."""
    try:
        return make()
    except ValidationError as exc:
        raise InvalidInput(f"{what} is invalid: {'; '.join(map(_problem, exc.errors()))}") from None


def read_request(path: str | os.PathLike) -> RunRequest:
    """`runner exec --request FILE`: the JSON a daemon wrote. InvalidInput names the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"--request {path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--request {path}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"--request {path}: expected a JSON object")
    return checked(lambda: RunRequest.model_validate(data), f"--request {path}")


def request_from_event(event: dict[str, Any]) -> RunRequest:
    """A webhook delivery replayed by hand (`runner exec --event FILE`): either the raw payload or
    {"provider", "headers", "payload"} as the daemon stores it, through the daemon's parser."""
    from runner.trigger import parse_event

    if isinstance(event.get("payload"), dict):
        trig = parse_event(event["payload"], headers=event.get("headers") or {},
                           provider=event.get("provider"))
    else:
        trig = parse_event(dict(event))
    if trig.deleted:
        raise InvalidInput(f"the event deletes {trig.ref}: there is nothing to build")
    return RunRequest.from_trigger(trig)
