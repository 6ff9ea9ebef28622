"""The daemon's configuration file: where it listens, where it keeps data, which pipelines it serves.

Parsed once into frozen pydantic objects; every problem is reported at once with its field path.
Secrets (webhook secrets, the API token) are named by where they come from, never written inline
unless the user insists (`value:`), and are held as `SecretValue` so that they print as `***`.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner.errors import InvalidInput, Problem
from runner.gitsafety import is_local_path
from runner.model import SecretSource
from runner.model.destinations import DESTINATION_NAME
from runner.run_request import RepositoryPipeline

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SecretValue(str):
    """A str that renders as *** in repr/format, so that it never lands in a log by accident."""

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return "'***'"


class SecretRef(_Model):
    """Where a secret comes from: exactly one of env, file, value."""

    env: str | None = None
    file: str | None = None
    value: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, data):
        if isinstance(data, str):
            return {"value": data}
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("env", "file", "value") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file, value")
        return self

    def resolve(self) -> SecretValue:
        if self.value is not None:
            return SecretValue(self.value)
        if self.env is not None:
            if self.env not in os.environ:
                raise InvalidInput(f"environment variable {self.env} is not set (named as a secret)")
            return SecretValue(os.environ[self.env])
        try:
            return SecretValue(Path(self.file).read_text().strip())
        except OSError as exc:
            raise InvalidInput(f"cannot read secret file {self.file}: {exc.strerror}") from exc


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # A kept-alive connection with no new request is closed after this many seconds.
    idle_timeout: float = Field(default=5.0, gt=0, le=3600)
    # A request must arrive whole (request line, headers and body) within this many seconds of
    # the connection opening or the previous response ending, or the connection is closed:
    # silent and trickling clients cannot hold connections open.
    read_timeout: float = Field(default=10.0, gt=0, le=3600)


class PushTrigger(_Model):
    # Glob patterns (fnmatch). A push to a branch starts a run if the branch matches one of
    # `branches`; a tag push if the tag matches one of `tags`. No tag patterns: tags start nothing.
    branches: tuple[str, ...] = ("*",)
    tags: tuple[str, ...] = ()


class PollTrigger(_Model):
    interval: float = Field(default=60.0, ge=0.2)
    # The very first poll of a pipeline (no poll state in the store yet): only remember the heads
    # ("skip"), or also run those whose commit never ran ("run"; every matching branch at once).
    # After that, poll state persists, so commits pushed while the daemon was down still run.
    initial: Literal["run", "skip"] = "skip"


def cron_schedule(expr: str, tz=None):
    """An APScheduler trigger from a crontab line: five fields (minute hour day month weekday),
    or six with seconds first (as robfig/cron, which Woodpecker's cron uses, accepts)."""
    from apscheduler.triggers.cron import CronTrigger as _Cron
    fields = expr.split()
    if len(fields) == 6:
        second, minute, hour, day, month, weekday = fields
        return _Cron(second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=weekday,
                     timezone=tz)
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields; got {len(fields)}, expected 5 (or 6 with seconds first)")
    return _Cron.from_crontab(expr, timezone=tz)


class CronTrigger(_Model):
    schedule: str  # crontab, five fields (or six, seconds first), UTC
    branch: str | None = None  # None: the first literal branch of the push filter, else "main"

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, data):
        if isinstance(data, str):
            return {"schedule": data}
        return data

    @field_validator("schedule")
    @classmethod
    def _crontab(cls, v: str) -> str:
        try:
            cron_schedule(v)
        except ValueError as exc:
            raise ValueError(f"not a crontab expression: {exc}") from None
        return v


class PullRequestTrigger(_Model):
    """Pull / merge requests (GitHub, Gitea/Forgejo, GitLab) start runs of their head commit.

    Such a run builds code nobody with write access has reviewed yet, so by default it is a
    test run: it never pushes or deploys, and a fork's never sees secrets (the rule of GitHub
    Actions and Woodpecker). The daemon passes that to `runner exec` as --withhold-secrets and
    --skip push --skip deploy.

    Its concurrency group fills "{branch}" with "pr:<number>": a new push to the pull request
    supersedes the runs of its older commits, while the base branch's own runs (group
    "app/main") are left alone. No branch or tag name can contain ":" (git check-ref-format),
    so a pull request's group never meets a branch's.
    """

    # Glob patterns (fnmatch) on the TARGET branch, the one the pull request would merge into.
    branches: tuple[str, ...] = ("*",)
    # Same-repository pull requests (their author can push to the repository anyway) may run
    # the push / deploy stages.
    push: bool = False
    deploy: bool = False
    # "trusted": a fork's pull request is treated like a same-repository one (secrets, and
    # push / deploy as above). "restricted": secrets withheld, push and deploy skipped.
    forks: Literal["restricted", "trusted"] = "restricted"


class TagTrigger(_Model):
    """A tag push promotes instead of building (Kamal's and GitLab's release by tag): the run
    deploys to the entry's `destination` the release last verified on `promote_from`, by digest,
    as `runner promote` does; nothing is checked out, built, tested, scanned or pushed. The tag
    names the commit being promoted: the run is refused when the release verified on
    `promote_from` is another commit."""

    promote_from: str = Field(pattern=DESTINATION_NAME.pattern)  # a destination of the pipeline
    # Glob patterns (fnmatch) of the tags that promote.
    tags: tuple[str, ...] = ("*",)


class Triggers(_Model):
    push: PushTrigger | None = Field(default_factory=PushTrigger)
    # None (the default): tags build as triggers.push.tags says; set, matching tags promote.
    tag: TagTrigger | None = None
    # None (the default): pull requests start nothing.
    pull_request: PullRequestTrigger | None = None
    poll: PollTrigger | None = None
    cron: tuple[CronTrigger, ...] = ()


_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class CommitStatus(_Model):
    """Report each run's state to the forge as a commit status."""

    provider: Literal["github", "gitea", "gitlab"] = "github"
    api_url: str = "https://api.github.com"  # Gitea/Forgejo: https://HOST/api/v1; GitLab: https://HOST/api/v4
    repo: str = Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")  # owner/name; GitLab: group/subgroup/name
    token: SecretRef
    # "{pipeline}" and "{event}" (push, pull_request, tag, ...) are replaced; without "{event}", a
    # pull request's run reports as "CONTEXT (pull_request)".
    context: str = "runner/{pipeline}"
    target_url: str | None = None  # "{run_id}" and "{pipeline}" are replaced

    @model_validator(mode="after")
    def _owner_name(self):
        if self.provider != "gitlab" and self.repo.count("/") != 1:
            raise ValueError(f"repo: {self.provider} names a repository owner/name, not {self.repo!r}")
        return self


class RepositorySecret(_Model):
    """Where the value of a secret granted to a repository's pipeline comes from: exactly one of
    env (of the daemon's process) or file (on the daemon's machine)."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env, file")
        return self


class PipelineEntry(_Model):
    name: str = Field(pattern=_NAME)
    # Exactly one of: `file`, the operator's pipeline YAML on this machine, handed to `runner
    # exec`; `pipeline`, a path inside `repo`, read at the commit each run builds
    # (runner.repository_pipeline), so that a push that changes it changes the runs that follow.
    file: str | None = None
    pipeline: str | None = None
    # The repository this pipeline builds: webhooks are matched against it and polling reads it.
    # With `pipeline:` it is also what is built and where the file is read.
    repo: str | None = None
    # With `pipeline:`, what the repository cannot widen: the hosts its deploy may reach (each
    # server's host, and ssh.jump; none: no deploy), and the secrets it may name, with where
    # their values come from (its own `secrets:` may only name these).
    servers: tuple[str, ...] = ()
    secrets: dict[str, RepositorySecret] = Field(default_factory=dict)
    # With `pipeline:`, how git reaches `repo` (reading the file at each commit, the checkout,
    # the poll), in the words of a pipeline's `repository:`: `token` (https) and `ssh_key` name
    # secrets of `secrets:`. Those two are the daemon's: only git gets them, every run (a fork's
    # pull request too), and the repository's pipeline cannot name them.
    token: str | None = None
    token_user: str = "x-access-token"
    ssh_key: str | None = None
    triggers: Triggers = Field(default_factory=Triggers)
    concurrency: int = Field(default=1, ge=1)  # runs of this pipeline at once
    # Runs whose group key is equal run one at a time, in order; "{branch}" and "{pipeline}"
    # are replaced. None: no group.
    concurrency_group: str | None = "{pipeline}/{branch}"
    # A newer run in the same group cancels the running one (True) or waits for it (False). Older
    # runs still queued are superseded either way: the newest waiting one wins.
    cancel_in_progress: bool = True
    # After a daemon crash, put a run that was running back in the queue instead of marking it
    # interrupted. Only for pipelines that are safe to run twice.
    requeue_on_interrupt: bool = False
    webhook_secret: SecretRef | None = None  # overrides the provider's secret for this pipeline
    commit_status: CommitStatus | None = None
    vars: dict[str, str] = Field(default_factory=dict)
    # The pipeline's destination its runs deploy to (`runner exec -d`, rollback too): required
    # when the file has `destinations:`, refused when it has none (`--check` says so).
    destination: str | None = Field(default=None, pattern=DESTINATION_NAME.pattern)

    @field_validator("repo")
    @classmethod
    def _repo(cls, v):
        if v is not None and (v.startswith("-") or not v.strip()):
            raise ValueError("repository must not be empty or start with '-'")
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline_path(cls, v):
        from runner.repository_pipeline import check_path

        if v is not None:
            try:
                check_path(v)
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.file is None) == (self.pipeline is None):
            raise ValueError("give exactly one of file (a pipeline file here) and pipeline (a path "
                             "inside the repository)")
        if self.pipeline is not None and not self.repo:
            raise ValueError("pipeline: needs repo: (the repository the file is read from and built)")
        if self.file is not None and (self.servers or self.secrets):
            raise ValueError("servers and secrets limit a repository's pipeline (pipeline:); a file: "
                             "pipeline is the operator's own and says them itself")
        if self.file is not None and (self.token or self.ssh_key):
            raise ValueError("token and ssh_key reach a repository's pipeline (pipeline:); a file: "
                             "pipeline's own repository: says how its repository is reached")
        for key in ("token", "ssh_key"):
            name = getattr(self, key)
            if name is not None and name not in self.secrets:
                raise ValueError(f"{key}: {name!r} is not one of this entry's secrets "
                                 f"({', '.join(sorted(self.secrets)) or 'none'})")
        tag = self.triggers.tag
        if tag is not None:
            if self.destination is None:
                raise ValueError("triggers.tag promotes to the entry's destination: give "
                                 "destination: NAME")
            if tag.promote_from == self.destination:
                raise ValueError(f"triggers.tag.promote_from and destination both name "
                                 f"{self.destination!r}: a promotion moves a release between two "
                                 f"destinations")
            if self.pipeline is not None:
                raise ValueError("triggers.tag promotes with a pipeline file of this machine "
                                 "(file:), not one read from the repository (pipeline:)")
            if self.triggers.push is not None and self.triggers.push.tags:
                raise ValueError("a tag either builds (triggers.push.tags) or promotes "
                                 "(triggers.tag), not both")
        return self


class Webhook(_Model):
    secret: SecretRef


class Retention(_Model):
    days: float = Field(default=30.0, gt=0)
    keep_last: int = Field(default=50, ge=0)  # per pipeline, always kept whatever their age
    interval: float = Field(default=3600.0, ge=1)


class DaemonConfig(_Model):
    name: str = Field(default="runner", pattern=_NAME)  # this daemon's lease owner name
    listen: Listen = Field(default_factory=Listen)
    data_dir: str = "./runner-data"
    # The run store: default data_dir/runner.db. Several daemons (each with its own data_dir)
    # share a queue by naming one database: a postgresql://user:password@host/db URL (hosts
    # anywhere), or one sqlite file (one host). A secret reference like api_token, so that the
    # password can come from the environment or a file: {env: RUNNER_DATABASE_URL}.
    database: SecretRef | None = None
    concurrency: int = Field(default=2, ge=0)  # 0: accept and queue, run nothing
    api_token: SecretRef | None = None
    # Runs, full logs and deliveries (with senders' addresses) are not for anyone who reaches the
    # listener: reading needs the token too unless this is turned off.
    read_requires_token: bool = True
    # The dashboard's address as people reach it (https://ci.example.com, behind a proxy or
    # not): a run's notifications link its page there. None: they carry no link.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+[^\s?#]*$")
    webhooks: dict[Literal["github", "gitea", "gitlab", "generic"], Webhook] = Field(default_factory=dict)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    exec_command: tuple[str, ...] | None = None  # default: this python -m runner exec
    # With the default command: keep one `runner` process started and imported ahead of time,
    # so that a run's first stage starts without paying the import time (~0.5 s).
    warm_spare: bool = True
    # Space set aside in data_dir at start and given back when the disk fills up, so that the
    # daemon can still record how runs ended (their logs stop being stored).
    disk_reserve_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    lease_seconds: float = Field(default=15.0, gt=0.5)
    grace_period: float = Field(default=30.0, ge=0)
    misfire_grace_time: int = Field(default=300, ge=1)
    git_timeout: float = Field(default=30.0, gt=0)
    retention: Retention = Field(default_factory=Retention)
    pipelines: tuple[PipelineEntry, ...] = ()
    # Where relative paths in this file are resolved; set by load_config.
    base_dir: str = Field(default=".", exclude=True)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [p.name for p in self.pipelines]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pipeline names must be unique: {', '.join(dup)}")
        return self

    def command(self) -> list[str]:
        return list(self.exec_command) if self.exec_command else [sys.executable, "-m", "runner", "exec"]

    def path(self, p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (Path(self.base_dir) / q).resolve()

    def pipeline(self, name: str) -> PipelineEntry | None:
        return next((p for p in self.pipelines if p.name == name), None)


def repository_pipeline(entry: PipelineEntry, config: DaemonConfig) -> RepositoryPipeline | None:
    """What a run of a `pipeline:` entry tells `runner exec` (and what the poll and `--check`
    reach the repository with): the repository, its credentials and the operator's limits,
    relative paths resolved as the daemon's config resolves them. None for `file:`."""
    if entry.pipeline is None or entry.repo is None:
        return None
    repo = str(config.path(entry.repo)) if is_local_path(entry.repo) else entry.repo
    secrets = {name: SecretSource(env=s.env, file=str(config.path(s.file)) if s.file else None)
               for name, s in entry.secrets.items()}
    return RepositoryPipeline(repository=repo, servers=entry.servers, secrets=secrets,
                              token=entry.token, token_user=entry.token_user, ssh_key=entry.ssh_key)


def _locate(root, loc: tuple) -> tuple[int, int]:
    """Line and column (1-based) of the deepest YAML node on the path `loc`."""
    node = root
    best = (node.start_mark.line + 1, node.start_mark.column + 1) if node is not None else (1, 1)
    for key in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                    nxt = v
                    best = (k.start_mark.line + 1, k.start_mark.column + 1)
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
            best = (nxt.start_mark.line + 1, nxt.start_mark.column + 1)
        if nxt is None:
            break
        node = nxt
    return best


def _problems(file: str, exc: ValidationError, root=None) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        line, col = _locate(root, loc) if root is not None else (1, 1)
        out.append(Problem(file, line, col, ".".join(str(x) for x in loc), err["msg"]))
    return out


def load_config(path: str | os.PathLike) -> DaemonConfig:
    """Read and validate a daemon config file. Raises InvalidInput with every problem at once."""
    p = Path(path)
    try:
        text = p.read_text()
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except OSError as exc:
        raise InvalidInput(f"cannot read daemon config {p}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise InvalidInput("daemon config is not valid YAML",
                           [Problem(str(p), line, col, "", str(getattr(exc, "problem", exc)))]) from exc
    if not isinstance(data, dict):
        raise InvalidInput("daemon config must be a mapping", [Problem(str(p), 1, 1, "", "not a mapping")])
    data = dict(data)
    data["base_dir"] = str(p.resolve().parent)
    return config_from_dict(data, source=str(p), root=root)


def config_from_dict(data: dict, source: str = "<config>", root=None) -> DaemonConfig:
    data = dict(data)
    data.setdefault("base_dir", os.getcwd())
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput("daemon config is invalid", _problems(source, exc, root)) from None


def _head_problems(cfg: DaemonConfig, p: PipelineEntry, cannot: Callable[[str], None]) -> list[Problem]:
    """A repository's pipeline read and validated at the head of its default branch, as a run
    of that head would read it; `cannot` is told why when the repository cannot be read."""
    from runner.daemon.scheduler import default_branch
    from runner.repository_pipeline import load_at_commit

    source = repository_pipeline(p, cfg)
    assert source is not None and p.pipeline is not None
    branch = default_branch(p)
    try:
        load_at_commit(source, p.pipeline, None, f"refs/heads/{branch}", dict(p.vars),
                       timeout=cfg.git_timeout, destination=p.destination)
    except InvalidInput as exc:
        if exc.problems:
            return list(exc.problems)
        cannot(f"cannot check {p.pipeline} at the head of {branch}: {exc}")
    return []


def _destination_problem(p: PipelineEntry, file: str, known: tuple[str, ...]) -> str | None:
    """What is wrong with entry `p`'s `destination:` for a pipeline file declaring `known`
    destinations; None when the entry's choice is right (the file's destinations are wrong)."""
    names = ", ".join(known)
    if p.destination is None:
        return f"{file} has destinations ({names}): name the one this entry deploys to with " \
               f"destination: NAME" if known else None
    if not known:
        return f"destination {p.destination!r}: {file} has no destinations: section"
    if p.destination not in known:
        return f"unknown destination {p.destination!r}: {file}'s destinations are {names}"
    return None


def check_config(path: str | os.PathLike) -> tuple[DaemonConfig | None, list[Problem]]:
    """What `runner daemon` would refuse, found without starting it (`runner daemon --check`):
    the file's own problems; then each pipeline's file, loaded and validated as `runner exec`
    loads it (with the entry's vars), and every secret reference that cannot be read now. A
    repository's pipeline (`pipeline:`) is read and validated at the head of its default branch
    (problems at PATH@COMMIT:line:column); a repository that cannot be read is a warning saying
    why. Each problem with its file, line and column. Nothing is written."""
    from runner.loader import load_pipeline
    from runner.loader.destinations import DestinationChoice

    try:
        cfg = load_config(path)
    except InvalidInput as exc:
        return None, exc.problems or [Problem(str(path), 1, 1, "", str(exc))]
    root = yaml.compose(Path(path).read_text())
    problems: list[Problem] = []

    def at(loc: tuple, message: str, severity: str = "error") -> None:
        line, col = _locate(root, loc)
        problems.append(Problem(str(path), line, col, ".".join(str(x) for x in loc), message, severity))

    refs: list[tuple[tuple, SecretRef | None]] = [(("api_token",), cfg.api_token), (("database",), cfg.database)]
    refs += [(("webhooks", name, "secret"), hook.secret) for name, hook in cfg.webhooks.items()]
    for i, p in enumerate(cfg.pipelines):
        refs.append((("pipelines", i, "webhook_secret"), p.webhook_secret))
        if p.commit_status is not None:
            refs.append((("pipelines", i, "commit_status", "token"), p.commit_status.token))
        if p.file is None:
            problems.extend(_head_problems(cfg, p, lambda message: at(
                ("pipelines", i, "pipeline"), message, severity="warning")))
            continue
        file = cfg.path(p.file)
        if not file.is_file():
            at(("pipelines", i, "file"), f"no such pipeline file: {file}")
            continue
        try:
            pipeline = load_pipeline(file, variables=dict(p.vars), destination=p.destination)
        except DestinationChoice as exc:
            wrong = _destination_problem(p, str(file), exc.known)
            if wrong is None:  # the file's own destinations are wrong: said there
                problems.extend(exc.problems)
            else:
                at(("pipelines", i, "destination") if p.destination else ("pipelines", i, "name"), wrong)
            continue
        except InvalidInput as exc:
            problems.extend(exc.problems or [Problem(str(file), 1, 1, "", str(exc))])
            continue
        tag = p.triggers.tag
        if tag is not None and tag.promote_from not in pipeline.destinations:
            at(("pipelines", i, "triggers", "tag", "promote_from"),
               f"unknown destination {tag.promote_from!r}: {file}'s destinations are "
               f"{', '.join(pipeline.destinations)}")
    for loc, ref in refs:
        if ref is None:
            continue
        try:
            ref.resolve()
        except InvalidInput as exc:
            at(loc, str(exc))
    return cfg, problems

