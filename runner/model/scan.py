"""Settings of the scan stage (Trivy, and optionally hadolint): what to scan, and the gate.

The gate fails the stage when a finding at or above `fail_on` remains after the ignore list and
`ignore_unfixed` are applied. Ignore entries use the fields of Trivy's own `.trivyignore.yaml`
(`id`, `statement`, `expired_at`, `paths`, `purls`); `reason` is accepted for `statement`.
"""
from __future__ import annotations

import datetime as _dt
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from runner.model.base import AnyCase, Model, PathOn

Severity = Literal["UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL"]
Scanner = Literal["vuln", "secret", "misconfig"]
# "image": the image the build stage produced. "context": the build context directory on disk
# (the Dockerfile and every file in it, including those .dockerignore keeps out of the image).
Target = Literal["image", "context"]


class ScanIgnore(Model):
    """One accepted finding, with the reason it is accepted. It stops applying on
    `expired_at` (a date, UTC), as in Trivy."""

    id: str = Field(min_length=1, examples=["CVE-2024-3094"])
    """The finding: a CVE or GHSA id, a misconfiguration id (`DS002`, `DS-0002` and
    `AVD-DS-0002` are one), a secret rule (`private-key`) or a hadolint rule (`DL3008`)."""
    statement: str = Field(min_length=1, validation_alias=AliasChoices("statement", "reason"),
                           examples=["not reachable: the service never parses XML"])
    """Why the finding is accepted (shown in the report). `reason` is the same key."""
    expired_at: _dt.date | None = Field(default=None, examples=["2026-06-30"])
    """The day (YYYY-MM-DD, UTC) from which the entry no longer applies. Unset: never
    expires."""
    paths: tuple[str, ...] = Field(default=(), examples=[["app/vendor/**"]])
    """Globs on the file or package path the entry is limited to. Empty: everywhere."""
    purls: tuple[str, ...] = Field(default=(), examples=[["pkg:pypi/lxml"]])
    """Package URLs the entry is limited to (a prefix matches). Empty: every package."""


class ScanDb(Model):
    """Where Trivy's vulnerability database lives. Nothing is downloaded unless
    `skip_update: false` is given (build machines are often offline)."""

    cache_dir: Annotated[str | None, PathOn("cache")] = Field(default=None,
                                                             examples=["/var/cache/trivy"])
    """Trivy's cache directory (`--cache-dir`, with `db/trivy.db` and the layer cache).
    Unset: `trivy` under the runner's cache directory."""
    db_repository: str | None = Field(default=None,
                                      examples=["registry.example.com/mirror/trivy-db"])
    """An OCI mirror of trivy-db to download from (`--db-repository`)."""
    skip_update: bool = True
    """Use the database as it is on disk (`--skip-db-update`); false: download it first."""


class ScanSettings(Model):
    """Scanning with Trivy (and optionally hadolint), and the gate: the stage fails when a
    finding at or above `fail_on` remains after `ignore`, the ignore file and `ignore_unfixed`
    are applied. Runs before the push, so a failing image is never published."""

    enabled: bool = True
    """false: the stage does not run."""
    scanners: tuple[Scanner, ...] = ("vuln", "secret", "misconfig")
    """Trivy's scanners: known vulnerabilities (needs the database, see `db`), secrets left
    in files, misconfigurations (Dockerfile)."""
    targets: tuple[Target, ...] = ("image",)
    """What Trivy scans: `image`, the built image; `context`, the build context directory on
    disk (every file in it, also those `.dockerignore` keeps out of the image)."""
    fail_on: Annotated[Severity | Literal["NONE"], AnyCase()] = Field(default="HIGH",
                                                                       examples=["CRITICAL"])
    """The lowest severity that fails the stage, in any case. `NONE`: report only, never
    fail."""
    ignore_unfixed: bool = False
    """Vulnerabilities without a fixed version do not count."""
    ignore: tuple[ScanIgnore, ...] = ()
    """Accepted findings, each with its reason."""
    ignore_file: Annotated[str | None, PathOn("repository")] = Field(
        default=None, examples=[".trivyignore.yaml"])
    """A `.trivyignore.yaml` (or plain `.trivyignore`) in the repository. Unset: the
    repository's own `.trivyignore.yaml` or `.trivyignore`, when there is one."""
    required: bool = True
    """false: a scanner that is not installed skips the stage with a warning instead of
    failing it."""
    allow_missing_db: bool = False
    """true: without a vulnerability database, only `vuln` is skipped (with a warning)
    instead of the stage failing."""
    db: ScanDb = Field(default_factory=ScanDb)
    """Trivy's vulnerability database."""
    sarif: bool = False
    """Also write the findings as SARIF (`scan/report.sarif` in the run's directory)."""
    hadolint: bool = False
    """Also lint the Dockerfile with hadolint (same `fail_on` and `ignore`)."""
    image_source: Literal["auto", "engine", "archive"] = "auto"
    """How Trivy reads the image: `engine` asks the build engine (`DOCKER_HOST`) directly
    (nothing is exported when Trivy's layer cache has every layer; else the engine exports the
    image and only the new layers are analysed); `archive` exports it with `docker save`
    first (works with any engine); `auto`: engine, unless `DOCKER_HOST` is `ssh://`."""
    trivy: Annotated[str | None, PathOn("pipeline")] = Field(
        default=None, examples=["/opt/trivy/bin/trivy"])
    """The trivy executable. Unset: the one installed beside the runner's Python, else the
    first on `PATH`."""
    hadolint_path: Annotated[str | None, PathOn("pipeline")] = Field(
        default=None, examples=["/usr/local/bin/hadolint"])
    """The hadolint executable. Unset: beside the runner's Python, else on `PATH`."""
    timeout: float = Field(default=600, gt=0)
    """Seconds each scanner run may take."""

    @field_validator("fail_on", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("scanners", "targets")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("each entry may appear only once")
        return value

    @model_validator(mode="after")
    def _something_to_check(self) -> ScanSettings:
        if self.enabled and not self.scanners and not self.hadolint:
            raise ValueError("scan is enabled but no scanner is selected (scanners: [] and "
                             "hadolint: false): nothing would be checked")
        if self.scanners and not self.targets:
            raise ValueError("targets is empty: give 'image' and/or 'context'")
        return self
