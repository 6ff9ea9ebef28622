"""Settings of the test stage: steps that run commands in containers, beside service containers.

    stages:
      test:
        services:
          db: {image: "${REGISTRY}/lab/postgres:15", env: {POSTGRES_PASSWORD: test},
               ready: {port: 5432}}
        steps:
          - name: unit
            image: {target: test}      # default: the image this run built
            commands: ["pytest -q --junitxml=/tmp/reports/unit.xml"]
            env: {DATABASE_URL: "postgresql://postgres:test@db:5432/postgres"}
            reports: ["/tmp/reports/*.xml"]

Each command is the user's own shell line, run as `sh -c LINE` inside the step's container (the
one place a shell runs); steps run in order and the stage stops at the first failing command.
"""
from __future__ import annotations

import posixpath
import re
from pydantic import ConfigDict, Field, field_validator, model_validator

from runner.model.base import Model, check_env

# A service is reached by its name on the run's network: a DNS label (RFC 1123).
SERVICE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_STEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_USER = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$"
_TARGET = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _absolute_paths(paths: tuple[str, ...], what: str) -> tuple[str, ...]:
    for path in paths:
        if not path.startswith("/") or posixpath.normpath(path) == "/":
            raise ValueError(f"{what} {path!r} must be an absolute directory in the container")
    return paths


class TargetImage(Model):
    """A stage of the build's Dockerfile, built with the build's context, arguments and cache."""

    target: str = Field(pattern=_TARGET, examples=["test"])
    """The Dockerfile stage (`FROM ... AS test`) to build and run the step in."""


class ReadyCheck(Model):
    """How to tell that a service is ready: exactly one of `port` or `command`."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["port"]},
                                                           {"required": ["command"]}]})

    port: int | None = Field(default=None, ge=1, le=65535, examples=[5432])
    """A TCP port of the service that accepts connections once it is ready (tried from the
    run's network)."""
    command: tuple[str, ...] | None = Field(default=None, min_length=1,
                                            examples=[["pg_isready", "-h", "127.0.0.1"]])
    """A command run inside the service's container (no shell: the arguments as given) that
    exits 0 once it is ready."""

    @model_validator(mode="after")
    def _one(self) -> ReadyCheck:
        if (self.port is None) == (self.command is None):
            raise ValueError("give exactly one of port or command")
        return self


class ServiceSettings(Model):
    """A container started before the first step, on a network private to the run, reached by
    its name; removed when the stage ends."""

    image: str = Field(min_length=1, examples=["registry.example.com/lab/postgres:15"])
    """The image to run."""
    env: dict[str, str] = Field(default_factory=dict, examples=[{"POSTGRES_PASSWORD": "test"}])
    """Environment variables of the service."""
    secret_env: dict[str, str] = Field(default_factory=dict,
                                       examples=[{"API_TOKEN": "api_token"}])
    """Environment variables whose values are secrets: `NAME: secret name`. They reach the
    container through the docker API, never a command line or a log."""
    command: tuple[str, ...] | None = Field(default=None, examples=[["redis-server", "--save", ""]])
    """The arguments after the image (replacing its CMD). Unset: the image's CMD."""
    ready: ReadyCheck | None = None
    """How to know the service is ready. Unset: as soon as it runs."""
    timeout: float = Field(default=60, gt=0, examples=[120])
    """Seconds the service has to become ready; then the stage fails naming it and showing the
    end of its log."""

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env(v)


class StepSettings(Model):
    """One step: commands run in order in one container, each as `sh -c LINE`."""

    name: str = Field(pattern=_STEP_NAME, examples=["unit"])
    """The step's name, unique in the stage: 1 to 63 of letters, digits, `_` `.` `-`."""
    image: str | TargetImage | None = Field(default=None,
                                            examples=["python:3.11-slim", {"target": "test"}])
    """Unset: the image this run built (what passes is, by digest, what ships). `{target: X}`:
    stage X of the build's Dockerfile, built with the same context, arguments and cache. Any
    other image: the checked-out repository is copied to `/workspace`, the working directory."""
    commands: tuple[str, ...] = Field(
        json_schema_extra={"minItems": 1},
        examples=[["pip install -r requirements.txt", "pytest -q"]])
    """Shell lines, each run as `sh -c LINE` in the container, in order; the first that exits
    non-zero fails the step and the stage."""
    env: dict[str, str] = Field(default_factory=dict,
                                examples=[{"DATABASE_URL": "postgresql://postgres:test@db/postgres"}])
    """Environment variables of the commands."""
    secret_env: dict[str, str] = Field(default_factory=dict, examples=[{"API_TOKEN": "api_token"}])
    """Environment variables whose values are secrets: `NAME: secret name`, masked in the log.
    They reach the container through the docker API, never a command line."""
    workdir: str | None = Field(default=None, examples=["/app"])
    """The working directory of the commands (absolute). Unset: the image's (`/workspace` for
    an image other than the build's)."""
    timeout: float = Field(default=600, gt=0, examples=[120])
    """Seconds the whole step may take; then its container is killed and the stage fails."""
    user: str | None = Field(default=None, pattern=_USER, examples=["10001:10001"])
    """The user (`NAME`, `UID` or `UID:GID`) the commands run as. Unset: the image's."""
    reports: tuple[str, ...] = Field(default=(), examples=[["reports/*.xml"]])
    """JUnit XML files the commands write (globs; relative to the working directory), copied
    out of the container after the commands, failing or not, and summarised."""
    cache: tuple[str, ...] = Field(default=(), examples=[["/root/.cache/pip"]])
    """Directories kept between runs of this pipeline (named volumes on the build engine), on
    top of the stage's `cache`."""

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env(v)

    @field_validator("commands")
    @classmethod
    def _commands(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("a step needs at least one command")
        if any(not line.strip() for line in v):
            raise ValueError("a command cannot be empty")
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"workdir {v!r} must be an absolute path in the container")
        return v

    @field_validator("cache")
    @classmethod
    def _cache(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _absolute_paths(v, "cache")


class TestSettings(Model):
    """Running the project's tests between build and scan, so nothing untested is scanned,
    pushed or deployed. Needs `steps`."""

    __test__ = False  # not a pytest test class

    enabled: bool = True
    """false: the stage does not run."""
    services: dict[str, ServiceSettings] = Field(
        default_factory=dict, examples=[{"db": {"image": "registry.example.com/lab/postgres:15",
                                                "env": {"POSTGRES_PASSWORD": "test"},
                                                "ready": {"port": 5432}}}])
    """Containers started before the first step, each reached by its name (a DNS label: a-z,
    0-9 and `-`) on a network private to the run."""
    steps: tuple[StepSettings, ...] = Field(json_schema_extra={"minItems": 1}, examples=[[{
        "name": "unit", "commands": ["pytest -q"]}]])
    """The steps, run in order; the stage stops at the first that fails."""
    cache: tuple[str, ...] = Field(default=(), examples=[["/root/.cache/pip"]])
    """Directories every step keeps between runs of this pipeline (named volumes on the build
    engine, one per pipeline and path)."""

    @field_validator("services")
    @classmethod
    def _service_names(cls, v: dict[str, ServiceSettings]) -> dict[str, ServiceSettings]:
        for name in v:
            if not SERVICE_NAME_RE.match(name):
                raise ValueError(f"service name {name!r} is not a DNS label (1 to 63 of a-z, "
                                 "0-9 and '-', not starting or ending with '-'): steps reach a "
                                 "service by its name")
        return v

    @field_validator("steps")
    @classmethod
    def _unique_steps(cls, v: tuple[StepSettings, ...]) -> tuple[StepSettings, ...]:
        if not v:
            raise ValueError("the test stage needs at least one step")
        seen: dict[str, int] = {}
        for i, step in enumerate(v, 1):
            if step.name in seen:
                raise ValueError(f"steps {seen[step.name]} and {i} are both named "
                                 f"{step.name!r}: step names must be unique")
            seen[step.name] = i
        return v

    @field_validator("cache")
    @classmethod
    def _cache(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _absolute_paths(v, "cache")

    @classmethod
    def absent(cls) -> TestSettings:
        """The stage of a pipeline without a `stages.test` section: off, with no steps."""
        return cls.model_construct(enabled=False, services={}, steps=(), cache=())
