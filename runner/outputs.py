"""What each stage gives the later stages and the run's record: one frozen type per stage.

A stage's `run()` returns its type (CheckoutOutputs, BuildOutputs, TestOutputs, ScanOutputs,
PushOutputs, DeployOutputs). The engine keeps it in `StageContext.outputs` (an `Outputs`) for the later stages
and records its `to_dict()`: the JSON of the stage.end event's `outputs` and of run.json's
`stages[].outputs`. Values are checked once, where the stage builds its outputs: the pushed image
is an `ImageRef`, which the deploy runs as it is, never parsing it again.

Every field says what it holds with `doc("...")` (dataclass field metadata); a JSON key that is
computed from the fields is a property named in the class's `computed`, its docstring the
description. docs/stage-outputs.md is generated from both (`described`, rendered by
runner/model/reference.py), so the reference says what the stages emit.

runner/ is the floor the plugins stand on: nothing here imports pipelines/ or deployers/. The
deploy's report is DeployOutputs, defined here, and deployers/ builds it (for a rollback too).
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from runner.model.image import ImageRef
from runner.tags import SHORT_SHA_LENGTH


def doc(text: str, *, key: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its description (`key`: the JSON key it is emitted as, when that
    is not the field's name). Takes `default` / `default_factory` as `field()` does."""
    metadata = {"doc": " ".join(text.split())}
    if key is not None:
        metadata["key"] = key
    return field(metadata=metadata, **kw)


# ------------------------------------------------------------------------------- checkout

@dataclass(frozen=True)
class CheckoutOutputs:
    """The commit the checkout stage checked out, and where."""

    stage: ClassVar[str] = "checkout"
    computed: ClassVar[tuple[str, ...]] = ("short_sha",)

    commit: str = doc("The full sha of the commit checked out.")
    branch: str | None = doc("The branch built (short name: `main`), or null when the run "
                             "builds a tag or a bare commit.")
    tag: str | None = doc("The tag built (short name: `v1.2.0`), or null.")
    path: Path = doc("The work tree, `<run dir>/src`, checked out detached at `commit`.")
    url: str = doc("The repository's URL, its credentials removed.")
    mirror: Path = doc("The cached bare mirror of the repository that the work tree was cloned "
                       "from, under `<data dir>/cache/git/`.")
    cloned: bool = doc("True when this run created the mirror (the repository's first run with "
                       "this data directory), false when it only fetched into it.")
    committed_at: str = doc("The commit's committer time, UTC ISO 8601 "
                            "(`2024-05-01T12:00:00Z`): the build dates the image by it, so that "
                            "a rebuild of the commit gives the same image.")
    default_branch: str | None = doc("The repository's default branch (short name), as the "
                                     "webhook said it or as the remote's HEAD names it; null "
                                     "when neither told (it is asked of the remote only when "
                                     "a tag template needs it: `{latest}`).", default=None)

    @property
    def short_sha(self) -> str:
        """The first 7 characters of `commit` (what the `{short_sha}` tag template gives)."""
        return self.commit[:SHORT_SHA_LENGTH]

    def to_dict(self) -> dict[str, Any]:
        return {"commit": self.commit, "short_sha": self.short_sha, "branch": self.branch,
                "tag": self.tag, "path": str(self.path), "url": self.url,
                "mirror": str(self.mirror), "cloned": self.cloned,
                "committed_at": self.committed_at, "default_branch": self.default_branch}


# ---------------------------------------------------------------------------------- build

@dataclass(frozen=True)
class BuildOutputs:
    """The image the build stage built, in the build engine."""

    stage: ClassVar[str] = "build"
    computed: ClassVar[tuple[str, ...]] = ()

    image_id: str = doc("The engine's id of the image (`sha256:...`), as the build itself "
                        "reported it: what scan and push use.")
    tags: tuple[str, ...] = doc("Every tag given to the image, as full `name:tag` references, "
                                "in the order of `image.tags`.")
    builder: str = doc("The docker CLI that built: `buildx` or `docker-buildkit`.")
    engine: str = doc("The build engine: `local` (the runner's own, `DOCKER_HOST`), else the "
                      "address of `stages.build.engine`.")
    cached_steps: int = doc("How many of the Dockerfile's steps came from the build cache.")
    total_steps: int = doc("How many steps the build had.")

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "tags": list(self.tags), "builder": self.builder,
                "engine": self.engine, "cached_steps": self.cached_steps,
                "total_steps": self.total_steps}


# ----------------------------------------------------------------------------------- test

@dataclass(frozen=True)
class TestFailure:
    """A test that failed (or errored), as a JUnit report said it."""

    __test__ = False  # not a pytest test class
    computed: ClassVar[tuple[str, ...]] = ()

    step: str = doc("The step whose report holds it.")
    test: str = doc("The test's name, its class (or file) first: `tests.test_db.test_insert`.")
    message: str = doc("The first line of the failure's message (or of its text).")
    error: bool = doc("True for an error (the test could not run), false for a failed "
                      "assertion.", default=False)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "test": self.test, "message": self.message,
                "error": self.error}


@dataclass(frozen=True)
class TestStepResult:
    """How one step of the test stage went."""

    __test__ = False
    computed: ClassVar[tuple[str, ...]] = ()

    name: str = doc("The step's name.")
    image: str = doc("The image it ran in (an id for the build's image or a `target`).")
    status: str = doc("`passed`, `failed`, `timed out` or `not run` (an earlier step failed).")
    exit_code: int | None = doc("The exit code of the last command run; null when none ran "
                                "or it was killed at the timeout.")
    failed_command: str | None = doc("The command that failed, as written; else null.")
    duration: float = doc("Seconds the step took, container start and removal included.")
    counts: Mapping[str, int] = doc("Tests in its reports: `passed`, `failed`, `errors`, "
                                    "`skipped`, `total` (all 0 without reports).")
    reports: tuple[str, ...] = doc("The report files copied out of the container, under "
                                   "`<run dir>/test/<step>/`.")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.image, "status": self.status,
                "exit_code": self.exit_code, "failed_command": self.failed_command,
                "duration": self.duration, "counts": dict(self.counts),
                "reports": list(self.reports)}


@dataclass(frozen=True)
class TestOutputs:
    """What the test stage ran and what its reports said. A failed stage records them too."""

    __test__ = False
    stage: ClassVar[str] = "test"
    computed: ClassVar[tuple[str, ...]] = ("summary",)

    passed: bool = doc("Whether every step passed.")
    steps: tuple[TestStepResult, ...] = doc("Every step, in order.")
    services: tuple[str, ...] = doc("The services that ran beside the steps.")
    counts: Mapping[str, int] = doc("Tests in all reports: `passed`, `failed`, `errors`, "
                                    "`skipped`, `total`.")
    failures: tuple[TestFailure, ...] = doc("The failed tests (the first 20), in report "
                                            "order.")
    phases: Mapping[str, float] = doc(
        "Where the stage's time went, in seconds, along its critical path (work done beside "
        "it is not counted twice): `connect` (reaching the build engine), `reap` (waiting for "
        "the removal of what a killed runner left, which goes on beside the run), "
        "`network`, `service_start` (pull, create, start), `service_ready` (waiting for the "
        "`ready` checks), `images` (waiting for a `target`, built beside the services, or "
        "pulling a step's image), `steps` (the step containers and their commands), `reports` "
        "(copying and parsing them), `cleanup` (removing containers and the network).",
        default_factory=dict)

    @property
    def summary(self) -> str:
        """One line: `41 passed, 2 failed, 1 skipped` (errors too, when any)."""
        c = self.counts
        parts = [f"{c.get('passed', 0)} passed"]
        for key, word in (("failed", "failed"), ("errors", "errors"), ("skipped", "skipped")):
            if c.get(key):
                parts.append(f"{c[key]} {word}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "summary": self.summary,
                "steps": [s.to_dict() for s in self.steps], "services": list(self.services),
                "counts": dict(self.counts), "failures": [f.to_dict() for f in self.failures],
                "phases": dict(self.phases)}


# ----------------------------------------------------------------------------------- scan

@dataclass(frozen=True)
class ScanFinding:
    """A finding that fails the gate, as the scan's outputs list it."""

    computed: ClassVar[tuple[str, ...]] = ()

    id: str = doc("The finding's id: `CVE-2024-1234`, `private-key`, `DS-0002`, `DL3020`.")
    scanner: str = doc("`vuln`, `secret`, `misconfig` or `hadolint`.")
    severity: str = doc("`CRITICAL`, `HIGH`, `MEDIUM`, `LOW` or `UNKNOWN`.")
    target: str = doc("What was scanned: `image` or `context`.")
    where: str = doc("The package and its installed version for a vulnerability, else the file "
                       "(and line).")
    title: str = doc("The scanner's one-line title.")
    fixed_version: str | None = doc("Only for `vuln`: the version that fixes it, or null or "
                                    "`\"\"` when none does (the key is absent for the others).",
                                    default=None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "scanner": self.scanner,
                               "severity": self.severity, "target": self.target,
                               "where": self.where, "title": self.title}
        if self.scanner == "vuln":
            out["fixed_version"] = self.fixed_version
        return out


@dataclass(frozen=True)
class ScanOutputs:
    """What the scan stage checked and found. A failed gate records them too."""

    stage: ClassVar[str] = "scan"
    computed: ClassVar[tuple[str, ...]] = ()

    passed: bool = doc("Whether the gate passed: no finding that counts is at or above "
                       "`fail_on`.")
    fail_on: str = doc("The gate's threshold, `stages.scan.fail_on` (`NONE` never fails).")
    counts: Mapping[str, int] = doc("The findings that count (not ignored), per severity.")
    by_scanner: Mapping[str, Mapping[str, int]] = doc(
        "The same per scanner: scanner -> severity -> count. A scanner that ran and found "
        "nothing is there with no counts; one that was skipped is not.")
    checked: tuple[str, ...] = doc("The scanners that ran: `vuln`, `secret`, `misconfig`, "
                                   "`hadolint`.")
    ignored: int = doc("How many findings the ignore rules (or `ignore_unfixed`) set aside.")
    report: str | None = doc("The main report file: Trivy's for the image, else the first "
                             "report written; null when no scanner ran.")
    reports: Mapping[str, str] = doc("Every report file by name (`trivy-image`, "
                                     "`trivy-context`, `hadolint`, `gate`), under "
                                     "`<run dir>/scan/`.")
    sarif: str | None = doc("The SARIF report, when `stages.scan.sarif` asks for one; else "
                            "null.")
    db: str = doc("The state of Trivy's vulnerability database (`present, updated ...`, "
                  "`missing`), or `not used`.")
    skipped_scanners: Mapping[str, str] = doc("The scanners that did not run, each with why "
                                              "(the scanner was not found, no database).")
    top: tuple[ScanFinding, ...] = doc("The first five findings that fail the gate, worst "
                                       "first.")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "fail_on": self.fail_on, "counts": dict(self.counts),
                "by_scanner": {k: dict(v) for k, v in self.by_scanner.items()},
                "checked": list(self.checked), "ignored": self.ignored, "report": self.report,
                "reports": dict(self.reports), "sarif": self.sarif, "db": self.db,
                "skipped_scanners": dict(self.skipped_scanners),
                "top": [f.to_dict() for f in self.top]}


# ----------------------------------------------------------------------------------- push

@dataclass(frozen=True)
class PushOutputs:
    """What the push stage pushed, as the registry acknowledged it."""

    stage: ClassVar[str] = "push"
    computed: ClassVar[tuple[str, ...]] = ("digest",)

    ref: ImageRef = doc("The image by the digest the registry acknowledged: what the deploy "
                        "runs.")
    tags: tuple[str, ...] = doc("The `name:tag` references pushed, in order.")
    verified: bool = doc("Whether the registry itself was asked for the manifest and served "
                         "the pushed one; false when it refused the read for lack of "
                         "credentials (the push happened all the same).")
    verification: str = doc("What was checked, or why nothing was.")
    credentials: str = doc("Where the login came from (`stages.push.auth`, docker's config, "
                           "a credential helper; `none (...)`); never a secret.")

    def __post_init__(self) -> None:
        # The one place a pushed reference becomes trusted: later stages read it as it is.
        if not isinstance(self.ref, ImageRef):
            raise TypeError(f"PushOutputs.ref must be an ImageRef, not {type(self.ref).__name__} "
                            f"({self.ref!r})")

    @property
    def digest(self) -> str:
        """The image's digest, `sha256:<64 hex>` (that of `ref`)."""
        return self.ref.digest

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "ref": str(self.ref), "tags": list(self.tags),
                "verified": self.verified, "verification": self.verification,
                "credentials": self.credentials}


# --------------------------------------------------------------------------------- deploy

@dataclass(frozen=True)
class ServerResult:
    """What a deploy (or rollback) did on one server."""

    computed: ClassVar[tuple[str, ...]] = ()

    server: str = doc("The server: its `name` in `stages.deploy.servers`, else its host (and "
                      "port, when not 22).", key="name")
    status: str = doc("`deployed`, `unchanged` (that release already ran there, verified), "
                      "`failed`, `rolled_back`, `skipped` (not reached) or `lock_lost` "
                      "(another run took the server's deploy lock).")
    digest: str = doc("The digest that runs there now, as far as this run knows (`\"\"` if "
                      "unknown).", default="")
    previous_digest: str = doc("The digest that ran there before this run.", default="")
    release: str = doc("The digest this run deployed, or tried to, on the server (a failed "
                       "server's line shows this one, not the one running after its rollback).",
                       default="")
    rolled_back: bool = doc("Whether the server was put back on `previous_digest` (false when "
                            "nothing ran there before: then the new container was removed).",
                            default=False)
    verified: bool = doc("Whether what runs there now is a verified release.", default=True)
    kept: str = doc("Where the previous verified release is kept, when it is not the one "
                    "running.", default="")
    reason: str = doc("Why the server failed, was skipped or rolled back.", default="")
    duration: float = doc("Seconds spent on the server.", default=0.0)
    phases: Mapping[str, float] = doc("Seconds per phase: `connect`, `pull`, `switch`, `start`, "
                                      "`health`, `commit`.", default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.server, "status": self.status, "digest": self.digest,
                "previous_digest": self.previous_digest, "release": self.release,
                "rolled_back": self.rolled_back,
                "verified": self.verified, "kept": self.kept, "reason": self.reason,
                "duration": round(self.duration, 3),
                "phases": {k: round(v, 3) for k, v in self.phases.items()}}


@dataclass(frozen=True)
class DeployOutputs:
    """What the deploy did, server by server (also when it failed). `runner rollback` reports
    the same way, with `what: rollback`."""

    stage: ClassVar[str] = "deploy"
    computed: ClassVar[tuple[str, ...]] = ()

    app: str = doc("The app's name on the servers (`stages.deploy.container.name`, else the "
                  "pipeline's name).")
    what: str = doc("`deploy`, `rollback` for `runner rollback`, or `promote` for `runner "
                    "promote` (and the daemon's promotion on a tag).")
    servers: tuple[ServerResult, ...] = doc("Every server of the plan, in rollout order.")
    ok: bool = doc("Whether every server ended on the new release.")
    headline: str = doc("One line saying how it went.", default="")

    def to_dict(self) -> dict[str, Any]:
        return {"app": self.app, "what": self.what, "ok": self.ok, "headline": self.headline,
                "servers": [s.to_dict() for s in self.servers]}

    def summary(self) -> str:
        lines = []
        for s in self.servers:
            line = f"{s.server}: {s.status}"
            # A failure names the release that failed; its reason says what runs there now.
            shown = s.release if s.status == "failed" and s.release else s.digest
            if shown:
                line += f" ({shown[:19]}{'' if s.verified else ', UNVERIFIED'})"
            if s.reason:
                line += f": {s.reason}"
            lines.append(line)
        return "\n".join(lines)


# ------------------------------------------------------------------------------- the run

StageOutputs = CheckoutOutputs | BuildOutputs | TestOutputs | ScanOutputs | PushOutputs | DeployOutputs

# Stage name -> its outputs type, in the order the stages run.
OUTPUT_TYPES: dict[str, type] = {t.stage: t for t in (
    CheckoutOutputs, BuildOutputs, TestOutputs, ScanOutputs, PushOutputs, DeployOutputs)}


@dataclass
class Outputs:
    """The outputs of this run's stages so far: None for a stage that has not succeeded (not
    selected, not reached, failed). The engine fills it, one stage at a time."""

    checkout: CheckoutOutputs | None = None
    build: BuildOutputs | None = None
    test: TestOutputs | None = None
    scan: ScanOutputs | None = None
    push: PushOutputs | None = None
    deploy: DeployOutputs | None = None

    def add(self, stage: str, value: object) -> None:
        """Record what `stage` returned; anything but its own outputs type is a bug."""
        expected = OUTPUT_TYPES.get(stage)
        if expected is None:
            raise KeyError(f"no stage {stage!r} (stages are {', '.join(OUTPUT_TYPES)})")
        if type(value) is not expected:
            raise TypeError(f"stage {stage!r} returned {type(value).__name__}, "
                            f"not {expected.__name__}")
        setattr(self, stage, value)


# ------------------------------------------------------------------------ the descriptions

class FieldDoc(NamedTuple):
    """One JSON key of an outputs type: the key, its Python type and its description."""

    key: str
    name: str  # the field's (or property's) name in the class
    type: Any
    doc: str


def described(cls: type) -> list[FieldDoc]:
    """Every JSON key of outputs type `cls`, fields first (in order), then the computed ones.
    Raises ValueError for one without a description."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        text = f.metadata.get("doc")
        if not text:
            raise ValueError(f"{cls.__name__}.{f.name} has no description: declare it with "
                             f"doc(...)")
        out.append(FieldDoc(f.metadata.get("key", f.name), f.name, hints[f.name], text))
    for name in cls.computed:
        prop = getattr(cls, name)
        if not isinstance(prop, property) or not prop.__doc__:
            raise ValueError(f"{cls.__name__}.{name} is in `computed` but is not a property "
                             f"with a docstring")
        kind = typing.get_type_hints(prop.fget)["return"]
        out.append(FieldDoc(name, name, kind, " ".join(inspect.cleandoc(prop.__doc__).split())))
    return out
