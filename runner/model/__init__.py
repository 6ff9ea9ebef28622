"""The pipeline model: one YAML file parsed once into immutable, validated objects.

Load it with `runner.loader.load_pipeline`; never build these from untrusted dicts directly,
the loader is what attaches file, line and column to every problem.

Stages: a section that is present runs unless it says `enabled: false`. An absent section keeps
the stage's own default: checkout, build and push run, test, scan and deploy do not (a test
needs steps, a scan needs Trivy, a deploy needs servers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from runner.model.accessories import NETWORK, Accessory
from runner.model.base import Model, PathOn, check_env
from runner.model.build import BuildSecret, BuildSettings
from runner.model.deploy import DeploySettings
from runner.model.destinations import Destination
from runner.model.image import Image
from runner.model.notify import Notifier
from runner.model.push import PushSettings, RegistryAuth
from runner.model.scan import ScanSettings
from runner.model.source import Repository
from runner.model.testing import TestSettings

if TYPE_CHECKING:
    from runner.loader.locations import SourceMap

STAGE_ORDER = ("checkout", "build", "test", "scan", "push", "deploy")


class SecretSource(Model):
    """Where a secret's value comes from: exactly one of `env`, `file` or `command`. The value
    is read once per run, before anything runs, and masked as `***` in every log and output."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["env"]},
                                                           {"required": ["file"]},
                                                           {"required": ["command"]}]})

    env: str | None = Field(default=None, examples=["GIT_TOKEN"])
    """The environment variable of the runner's process that holds the value. It cannot also
    be used as `${...}` anywhere in the pipeline (that would copy the value into it)."""
    file: Annotated[str | None, PathOn("pipeline")] = Field(
        default=None, examples=["/etc/runner/api_token"])
    """A file on the runner's machine that holds the value (trailing newlines removed)."""
    command: tuple[str, ...] | None = Field(default=None, min_length=1, examples=[
        ["op", "read", "op://deploy/registry/password"]])
    """A command the runner runs on its own host (an argv list, no shell; with the runner's
    environment) whose standard output is the value (one trailing newline removed): a secret
    manager's CLI (docs/secrets.md). Run once per run, before anything else; a non-zero exit,
    a timeout or a missing program stops the run naming the secret, never showing the
    command's output. A pipeline read from the repository (a daemon `pipeline:` entry) may not
    set one."""
    timeout: float = Field(default=30, gt=0, le=3600)
    """With `command`: seconds it may run before its process group is killed (and the secret
    counts as unreadable)."""

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError("give a list of arguments such as [op, read, \"op://vault/item/field\"], "
                             "not one string: no shell runs it")
        return v


class CheckoutSettings(Model):
    """Fetching the repository (`repository:` says which one and what to fetch)."""

    enabled: bool = True
    """false: the stage does not run. Every stage after it needs its work tree."""


class Stages(Model):
    """The stages, run in this order: checkout, build, test, scan, push, deploy. A section
    that is present runs unless it says `enabled: false`."""

    checkout: CheckoutSettings = Field(default_factory=CheckoutSettings)
    """Absent: runs."""
    build: BuildSettings = Field(default_factory=BuildSettings)
    """Absent: runs, with the defaults (`Dockerfile` at the repository's root)."""
    test: TestSettings = Field(default_factory=TestSettings.absent)
    """Absent: does not run. Present, it needs `steps`."""
    scan: ScanSettings = Field(default_factory=lambda: ScanSettings(enabled=False))
    """Absent: does not run. `scan: {}` runs it with the defaults."""
    push: PushSettings = Field(default_factory=PushSettings)
    """Absent: runs (without registry credentials)."""
    deploy: DeploySettings = Field(default_factory=lambda: DeploySettings(enabled=False))
    """Absent: does not run. Present, it needs `servers`."""


class Pipeline(Model):
    """A pipeline file: what to build (`repository`, `image`) and the stages that build,
    check, publish and deploy it."""

    version: int = 1
    """The version of the pipeline format. This runner reads version 1."""
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", examples=["shop-api"])
    """The pipeline's name: 1 to 63 of a-z 0-9 `_` `.` `-`, starting with a letter or digit.
    It names the deployed container unless `stages.deploy.container.name` does."""
    repository: Repository
    """Where the code comes from."""
    image: Image
    """The image the build produces and the push publishes."""
    variables: dict[str, str] = Field(default_factory=dict,
                                      examples=[{"REGISTRY": "registry.example.com:5000"}])
    """Values for `${NAME}` in the rest of the file. `--var NAME=...` and the environment win
    over these; a value may itself use `${...}`."""
    env: dict[str, str] = Field(default_factory=dict, examples=[{"LOG_LEVEL": "info"}])
    """Environment variables of the deployed container (under
    `stages.deploy.container.env`, which wins for a name both give). Needs a `stages.deploy`
    section. The build does not see them: a Dockerfile gets values as `stages.build.args`."""
    secrets: dict[str, SecretSource] = Field(default_factory=dict,
                                             examples=[{"git_token": {"env": "GIT_TOKEN"}}])
    """Named secrets. Other fields refer to a secret by its name, never by its value."""
    stages: Stages = Field(default_factory=Stages)
    """What runs, and how."""
    accessories: dict[str, Accessory] = Field(default_factory=dict, examples=[{"db": {
        "image": "postgres:16", "secret_env": {"POSTGRES_PASSWORD": "db_password"},
        "volumes": ["data:/var/lib/postgresql/data"]}}])
    """Long-lived containers beside the app (a database, a cache), by name (a DNS label):
    `runner accessory boot` starts them, deploys never touch them, and a deploy fails before
    any switch when one is not running on its server. The app reaches one as `<app>-<NAME>`
    on the runner's docker network (the app joins it). See docs/accessories.md."""
    destinations: dict[str, Destination] = Field(default_factory=dict, examples=[{
        "staging": {"variables": {"DEPLOY_HOST": "10.0.0.5"}},
        "production": {"variables": {"DEPLOY_HOST": "10.0.1.5"}}}])
    """Named places to deploy to (a DNS label each), each with its own `variables`: with
    destinations, every command that loads the file needs `--destination NAME` (`-d`), and
    each destination has its own release history and deploy lock on its servers. `runner
    promote --from A --to B` deploys to B the release last verified on A. See docs/deploy.md."""
    notify: tuple[Notifier, ...] = Field(default=(), examples=[[
        {"url": "slack_url", "on": ["failure", "recovered"]}]])
    """Who is told how a run ended (pipeline, commit, who started it, the stage that failed
    and why, the run's page on the dashboard), each through an Apprise URL held by a secret.
    Every message is masked; a notifier that fails is a warning, never the run's failure. See
    docs/notifications.md."""
    # Set by the loader, not by the YAML: the file the pipeline came from.
    source_file: str = Field(default="", exclude=True)
    # Set by the loader, not by the YAML: the destination chosen (`-d`), "" for none.
    destination: str = Field(default="", exclude=True)
    # Set by the loader with source_file: where each value is in that file, so that a problem
    # found later (an unreadable secret) is located there too. model_copy() keeps it; None for
    # a pipeline built in code. Read through runner.loader.source_map / problem_at.
    _source_map: SourceMap | None = PrivateAttr(default=None)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    def deploy_settings(self) -> DeploySettings:
        """`stages.deploy` as the deploy runs it: the top-level `env:` under
        `container.env`, where the container's own `env` and `secret_env` win per name; with
        `accessories`, a stop-start app on the runner's network (`container.network`)."""
        stage = self.stages.deploy
        own = stage.container
        update: dict = {}
        if self.env:
            env = {k: v for k, v in self.env.items() if k not in own.secret_env}
            env.update(own.env)
            update["env"] = env
        if self.accessories and stage.proxy is None and own.network is None:
            # The accessories are reached by name on the runner's network (the proxy cutover
            # puts the app there anyway).
            update["network"] = NETWORK
        if not update:
            return stage
        return stage.model_copy(update={"container": own.model_copy(update=update)})


__all__ = [
    "STAGE_ORDER", "Accessory", "BuildSecret", "BuildSettings", "CheckoutSettings", "DeploySettings", "Destination", "Image",
    "Notifier", "Pipeline", "PushSettings", "RegistryAuth", "Repository", "ScanSettings", "SecretSource", "Stages",
    "TestSettings",
]
