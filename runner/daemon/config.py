"""The daemon's configuration file: where it listens, where it keeps data, which pipelines it serves.

Parsed once into frozen pydantic objects by the pipeline's loader machinery (runner.loader: the
YAML's source map, the model's errors in its words): every problem is reported at once, each at its
file:line:column, with the fields expected and a "did you mean" for an unknown key.
Secrets (webhook secrets, the API token) are named by where they come from, never written inline
unless the user insists (`value:`), and are held as `SecretValue` so that they print as `***`.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runner.errors import InvalidInput, Problem
from runner.gitsafety import is_local_path
from runner.loader.locations import SourceMap
from runner.loader.mapping import suggest, validate
from runner.loader.yaml_reader import read_yaml
from runner.model import SecretSource
from runner.model.destinations import DESTINATION_NAME
from runner.run_request import RepositoryPipeline
from runner.secrets import read_secret_file

class _Model(BaseModel):
    # The docstring under a field is its description in docs/daemon-config.md.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              use_attribute_docstrings=True)


class SecretValue(str):
    """A str that renders as *** in repr/format, so that it never lands in a log by accident."""

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return "'***'"


class SecretRef(_Model):
    """Where a secret comes from: exactly one of env, file, value. A plain string is a `value:`."""

    env: str | None = None
    """An environment variable of the daemon's process."""
    file: str | None = None
    """A file on the daemon's machine, its surrounding whitespace left out (give an absolute
    path: a relative one is read from the daemon's working directory)."""
    value: str | None = None
    """The value itself, written in the config."""

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
    """The address the listener binds (0.0.0.0: every interface)."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Its TCP port."""
    idle_timeout: float = Field(default=5.0, gt=0, le=3600)
    """A kept-alive connection with no new request is closed after this many seconds."""
    read_timeout: float = Field(default=10.0, gt=0, le=3600)
    """A request must arrive whole (request line, headers and body) within this many seconds of
    the connection opening or the previous response ending, or the connection is closed: silent
    and trickling clients cannot hold connections open."""


class PushTrigger(_Model):
    branches: tuple[str, ...] = ("*",)
    """Glob patterns (fnmatch). A push to a branch starts a run if the branch matches one of
    `branches`; a tag push if the tag matches one of `tags`. No tag patterns: tags start
    nothing."""
    tags: tuple[str, ...] = ()


class PollTrigger(_Model):
    interval: float = Field(default=60.0, ge=0.2)
    initial: Literal["run", "skip"] = "skip"
    """The very first poll of a pipeline (no poll state in the store yet): only remember the
    heads ("skip"), or also run those whose commit never ran ("run"; every matching branch at
    once). After that, poll state persists, so commits pushed while the daemon was down still
    run."""


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
    schedule: str
    """Crontab, five fields (or six, seconds first), UTC."""
    branch: str | None = None
    """None: the first literal branch of the push filter, else "main"."""

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

    branches: tuple[str, ...] = ("*",)
    """Glob patterns (fnmatch) on the TARGET branch, the one the pull request would merge into."""
    push: bool = False
    """Same-repository pull requests (their author can push to the repository anyway) may run
    the push / deploy stages."""
    deploy: bool = False
    forks: Literal["restricted", "trusted"] = "restricted"
    """"trusted": a fork's pull request is treated like a same-repository one (secrets, and push
    / deploy as above). "restricted": secrets withheld, push and deploy skipped."""


class TagTrigger(_Model):
    """A tag push promotes instead of building (Kamal's and GitLab's release by tag): the run
    deploys to the entry's `destination` the release last verified on `promote_from`, by digest,
    as `runner promote` does; nothing is checked out, built, tested, scanned or pushed. The tag
    names the commit being promoted: the run is refused when the release verified on
    `promote_from` is another commit."""

    promote_from: str = Field(pattern=DESTINATION_NAME.pattern)
    """A destination of the pipeline."""
    tags: tuple[str, ...] = ("*",)
    """Glob patterns (fnmatch) of the tags that promote."""


class Triggers(_Model):
    push: PushTrigger | None = Field(default_factory=PushTrigger)
    tag: TagTrigger | None = None
    """None (the default): tags build as triggers.push.tags says; set, matching tags promote."""
    pull_request: PullRequestTrigger | None = None
    """None (the default): pull requests start nothing."""
    poll: PollTrigger | None = None
    cron: tuple[CronTrigger, ...] = ()


_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class CommitStatus(_Model):
    """Report each run's state to the forge as a commit status."""

    provider: Literal["github", "gitea", "gitlab"] = "github"
    api_url: str = "https://api.github.com"
    """Gitea/Forgejo: https://HOST/api/v1; GitLab: https://HOST/api/v4."""
    repo: str = Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")
    """Owner/name; GitLab: the project's path, group/subgroup/name."""
    token: SecretRef
    context: str = "runner/{pipeline}"
    """"{pipeline}" and "{event}" (push, pull_request, tag, ...) are replaced; without "{event}", a
    pull request's run reports as "CONTEXT (pull_request)"."""
    target_url: str | None = None
    """"{run_id}" and "{pipeline}" are replaced."""

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
    """The entry's name: its runs, its API paths (`runner trigger NAME`), its concurrency group."""
    file: str | None = None
    """Exactly one of: `file`, the operator's pipeline YAML on this machine, handed to `runner
    exec`; `pipeline`, a path inside `repo`, read at the commit each run builds
    (runner.repository_pipeline), so that a push that changes it changes the runs that follow."""
    pipeline: str | None = None
    """A path inside `repo`: the pipeline committed there, read at each run's commit."""
    repo: str | None = None
    """The repository this pipeline builds: webhooks are matched against it and polling reads
    it. With `pipeline:` it is also what is built and where the file is read."""
    servers: tuple[str, ...] = ()
    """With `pipeline:`, what the repository cannot widen: the hosts its deploy may reach (each
    server's host, and ssh.jump; none: no deploy), and the secrets it may name, with where their
    values come from (its own `secrets:` may only name these)."""
    secrets: dict[str, RepositorySecret] = Field(default_factory=dict)
    """With `pipeline:`, the secrets the repository's pipeline may name, and where their values
    come from on this machine."""
    token: str | None = None
    """With `pipeline:`, how git reaches `repo` (reading the file at each commit, the checkout,
    the poll), in the words of a pipeline's `repository:`: `token` (https) and `ssh_key` name
    secrets of `secrets:`. Those two are the daemon's: only git gets them, every run (a fork's
    pull request too), and the repository's pipeline cannot name them."""
    token_user: str = "x-access-token"
    """The user name sent with `token` (GitLab takes `oauth2`)."""
    ssh_key: str | None = None
    """With `pipeline:`, a secret of `secrets:` holding the private key git reaches `repo` with
    (`ssh://` and `git@` URLs)."""
    triggers: Triggers = Field(default_factory=Triggers)
    """What starts runs. Not given: a push to any branch, and nothing else (no tags, pull
    requests, poll or cron); `runner daemon --check` says it for each entry."""
    concurrency: int = Field(default=1, ge=1)
    """Runs of this pipeline at once."""
    concurrency_group: str | None = "{pipeline}/{branch}"
    """Runs whose group key is equal run one at a time, in order; "{branch}" and "{pipeline}"
    are replaced. None: no group."""
    cancel_in_progress: bool = True
    """A newer run in the same group cancels the running one (True) or waits for it (False).
    Older runs still queued are superseded either way: the newest waiting one wins."""
    requeue_on_interrupt: bool = False
    """After a daemon crash, put a run that was running back in the queue instead of marking it
    interrupted. Only for pipelines that are safe to run twice."""
    webhook_secret: SecretRef | None = None
    """Overrides the provider's secret for this pipeline."""
    commit_status: CommitStatus | None = None
    """Report each run's state to the forge as a commit status."""
    vars: dict[str, str] = Field(default_factory=dict)
    """The pipeline's `${NAME}` values (`runner exec --var`); `--check` refuses a name the
    pipeline file never uses."""
    destination: str | None = Field(default=None, pattern=DESTINATION_NAME.pattern)
    """The pipeline's destination its runs deploy to (`runner exec -d`, rollback too): required
    when the file has `destinations:`, refused when it has none (`--check` says so)."""

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
    """Finished runs older than this many days are removed."""
    keep_last: int = Field(default=50, ge=0)
    """Per pipeline, always kept whatever their age."""
    interval: float = Field(default=3600.0, ge=1)
    """Seconds between two clean-ups."""


class DaemonConfig(_Model):
    name: str = Field(default="runner", pattern=_NAME)
    """This daemon's lease owner name."""
    listen: Listen = Field(default_factory=Listen)
    """Where the webhooks, the API and the dashboard are served."""
    data_dir: str = "./runner-data"
    """Runs' directories and logs, the default store (relative: to this file's directory)."""
    database: SecretRef | None = None
    """The run store: default data_dir/runner.db. Several daemons (each with its own data_dir)
    share a queue by naming one database: a postgresql://user:password@host/db URL (hosts
    anywhere), or one sqlite file (one host). A secret reference like api_token, so that the
    password can come from the environment or a file: {env: RUNNER_DATABASE_URL}."""
    concurrency: int = Field(default=2, ge=0)
    """0: accept and queue, run nothing."""
    api_token: SecretRef | None = None
    """The token of the HTTP API (`Authorization: Bearer ...`) and of the dashboard's login, a
    secret reference (docs/daemon.md, the API token)."""
    read_requires_token: bool = True
    """Runs, full logs and deliveries (with senders' addresses) are not for anyone who reaches
    the listener: reading needs the token too unless this is turned off."""
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+[^\s?#]*$")
    """The dashboard's address as people reach it (https://ci.example.com, behind a proxy or
    not): a run's notifications link its page there. None: they carry no link."""
    webhooks: dict[Literal["github", "gitea", "gitlab", "generic"], Webhook] = Field(default_factory=dict)
    """Each forge's webhook secret (its path: /hooks/github, ...)."""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """A larger request body is refused."""
    exec_command: tuple[str, ...] | None = None
    """Default: this python -m runner exec."""
    warm_spare: bool = True
    """With the default command: keep one `runner` process started and imported ahead of time,
    so that a run's first stage starts without paying the import time (~0.5 s)."""
    disk_reserve_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    """Space set aside in data_dir at start and given back when the disk fills up, so that the
    daemon can still record how runs ended (their logs stop being stored)."""
    lease_seconds: float = Field(default=15.0, gt=0.5)
    """A running run's lease is renewed while it runs; a run whose lease is not renewed this
    long is interrupted."""
    grace_period: float = Field(default=30.0, ge=0)
    """On SIGTERM, running stages get this long before they are cancelled."""
    misfire_grace_time: int = Field(default=300, ge=1)
    """A cron tick missed by up to this many seconds (the daemon was down) still runs."""
    git_timeout: float = Field(default=30.0, gt=0)
    """Each git command the daemon runs itself (poll, reading a repository's pipeline)."""
    retention: Retention = Field(default_factory=Retention)
    """How long finished runs, their logs and deliveries are kept."""
    pipelines: tuple[PipelineEntry, ...] = ()
    """The pipelines this daemon serves."""
    base_dir: str = Field(default=".", exclude=True)
    """Where relative paths in this file are resolved; set by load_config."""

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


def _read(path: str | os.PathLike) -> tuple[DaemonConfig, SourceMap]:
    """The config at `path` and where each of its values is, read as a pipeline file is
    (`runner.loader`: YAML nodes, a source map, the model's errors said in its words)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read daemon config {p}: {exc.strerror}") from exc
    smap = SourceMap(str(p))
    data, scalars, problems = read_yaml(text, smap, empty_ok=True, shape=(
        "the daemon config must be a mapping (listen:, data_dir:, pipelines:, ...)"))
    if data is None:
        raise InvalidInput("daemon config is invalid", problems)
    data["base_dir"] = str(p.resolve().parent)
    return _validated(data, smap, scalars, problems), smap


def load_config(path: str | os.PathLike) -> DaemonConfig:
    """Read and validate a daemon config file. Raises InvalidInput with every problem at once,
    each at its file:line:column in the words of the pipeline's loader ("expected a list of
    strings, got the string 'main'", "unknown key 'trigger' (did you mean 'triggers'?)")."""
    return _read(path)[0]


def config_from_dict(data: dict, source: str = "<config>") -> DaemonConfig:
    data = dict(data)
    data.setdefault("base_dir", os.getcwd())
    return _validated(data, SourceMap(source), {}, [])


def _validated(data: dict, smap: SourceMap, scalars: dict, problems: list[Problem]) -> DaemonConfig:
    cfg, invalid = validate(data, smap, scalars, DaemonConfig)
    problems = sorted(problems + invalid, key=lambda p: (p.line, p.column))
    if problems or cfg is None:
        raise InvalidInput("daemon config is invalid", problems)
    return cfg


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


def describe_triggers(p: PipelineEntry) -> str:
    """What starts runs of entry `p`, in words (`runner daemon --check` shows it per entry).
    An entry without `triggers:` gets Triggers(): a push to any branch runs, nothing else."""
    t = p.triggers
    parts = []
    if t.push is not None:
        tags = f", tags {', '.join(t.push.tags)}" if t.push.tags else ", no tags"
        parts.append(f"push to branches {', '.join(t.push.branches)}{tags}")
    else:
        parts.append("no push")
    if t.tag is not None:
        parts.append(f"tags {', '.join(t.tag.tags)} promote from {t.tag.promote_from}")
    if t.pull_request is not None:
        parts.append(f"pull requests into {', '.join(t.pull_request.branches)}")
    if t.poll is not None:
        parts.append(f"poll every {t.poll.interval:g} s")
    parts += [f"cron {c.schedule!r}" for c in t.cron]
    given = "" if "triggers" in p.model_fields_set else " (no triggers: the default)"
    return "; ".join(parts) + given


def _used_names(text: str) -> set[str]:
    """The names a pipeline file's text refers to as ${NAME} (`$$` is a literal `$`)."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text.replace("$$", "")))


def _unreadable(source: SecretRef | RepositorySecret, config: DaemonConfig) -> str | None:
    """Why a secret of the config cannot be read now, or None when it can."""
    if isinstance(source, SecretRef):
        try:
            source.resolve()
        except InvalidInput as exc:
            return str(exc)
        return None
    if source.env is not None:
        return None if os.environ.get(source.env) else \
            f"environment variable {source.env} is not set or empty"
    path = config.path(source.file)
    try:
        return None if read_secret_file(str(path)) else f"secret file {path} is empty"
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read secret file {path}: {getattr(exc, 'strerror', None) or exc}"


def check_config(path: str | os.PathLike) -> tuple[DaemonConfig | None, list[Problem]]:
    """What `runner daemon` would refuse, found without starting it (`runner daemon --check`):
    the file's own problems; then each pipeline's file, loaded and validated as `runner exec`
    loads it (with the entry's vars), every secret it names read as its run would read it,
    and every `vars` name the file never refers to (no ${NAME}); then every secret reference
    of the config itself and of a `pipeline:` entry's `secrets:` that cannot be read now. A
    repository's pipeline (`pipeline:`) is read and validated at the head of its default
    branch (problems at PATH@COMMIT:line:column); a repository that cannot be read is a
    warning saying why. Each problem with its file, line and column. Nothing is written."""
    from runner.loader import load_pipeline
    from runner.loader.destinations import DestinationChoice
    from runner.pipeline_file import read_secrets
    from runner.secrets import Masker

    try:
        cfg, smap = _read(path)
    except InvalidInput as exc:
        return None, exc.problems or [Problem(str(path), 1, 1, "", str(exc))]
    problems: list[Problem] = []

    def at(loc: tuple, message: str, severity: str = "error") -> None:  # at the key's line
        problems.append(smap.problem(loc, message, severity=severity, key=True))

    refs: list[tuple[tuple, SecretRef | RepositorySecret | None]] = [
        (("api_token",), cfg.api_token), (("database",), cfg.database)]
    refs += [(("webhooks", name, "secret"), hook.secret) for name, hook in cfg.webhooks.items()]
    for i, p in enumerate(cfg.pipelines):
        refs.append((("pipelines", i, "webhook_secret"), p.webhook_secret))
        if p.commit_status is not None:
            refs.append((("pipelines", i, "commit_status", "token"), p.commit_status.token))
        refs += [(("pipelines", i, "secrets", name), s) for name, s in p.secrets.items()]
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
        used = _used_names(file.read_text(encoding="utf-8-sig"))
        for name in p.vars:
            if name not in used:
                at(("pipelines", i, "vars", name), f"vars: {name!r} is not used by {file} (no "
                   f"${{{name}}} in it){suggest(name, sorted(used))}")
        try:  # as its run reads them (runner exec), each one it cannot read at the file's line
            read_secrets(pipeline, dict(os.environ), Masker())
        except InvalidInput as exc:
            problems.extend(exc.problems or [Problem(str(file), 1, 1, "", str(exc))])
        tag = p.triggers.tag
        if tag is not None and tag.promote_from not in pipeline.destinations:
            at(("pipelines", i, "triggers", "tag", "promote_from"),
               f"unknown destination {tag.promote_from!r}: {file}'s destinations are "
               f"{', '.join(pipeline.destinations)}")
    for loc, ref in refs:
        if ref is not None:
            why = _unreadable(ref, cfg)
            if why is not None:
                at(loc, why)
    return cfg, list(dict.fromkeys(problems))  # two entries of one file: its problems once
