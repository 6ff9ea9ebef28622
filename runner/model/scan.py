"""Settings of the scan stage (Trivy, and optionally hadolint): what to scan, and the gate.

The gate fails the stage when a finding at or above `fail_on` remains after the ignore list and
`ignore_unfixed` are applied. Ignore entries use the fields of Trivy's own `.trivyignore.yaml`
(`id`, `statement`, `expired_at`, `paths`, `purls`); `reason` is accepted for `statement`.
"""
from __future__ import annotations

import datetime as _dt
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from runner.model.base import Model

Severity = Literal["UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL"]
Scanner = Literal["vuln", "secret", "misconfig"]
# "image": the image the build stage produced. "context": the build context directory on disk
# (the Dockerfile and every file in it, including those .dockerignore keeps out of the image).
Target = Literal["image", "context"]


class ScanIgnore(Model):
    """One accepted finding. It stops applying on `expired_at` (a date, UTC), as in Trivy."""

    id: str = Field(min_length=1)  # CVE-..., DS002 / DS-0002 / AVD-DS-0002, private-key, DL3008
    statement: str = Field(min_length=1, validation_alias=AliasChoices("statement", "reason"))
    expired_at: _dt.date | None = None
    paths: tuple[str, ...] = ()  # globs on the file or package path; empty = everywhere
    purls: tuple[str, ...] = ()  # package URLs (prefix match); empty = every package


class ScanDb(Model):
    """Where Trivy's vulnerability database lives. Nothing is downloaded unless
    `skip_update: false` is given (build machines are often air-gapped)."""

    # Trivy's --cache-dir (holds db/trivy.db and the layer cache); a relative path is taken
    # under the runner's cache directory. Default: <runner cache>/trivy.
    cache_dir: str | None = None
    db_repository: str | None = None  # Trivy's --db-repository (an OCI mirror of trivy-db)
    skip_update: bool = True  # Trivy's --skip-db-update


class ScanStage(Model):
    enabled: bool = False
    scanners: tuple[Scanner, ...] = ("vuln", "secret", "misconfig")
    targets: tuple[Target, ...] = ("image",)
    fail_on: Severity | Literal["NONE"] = "HIGH"  # NONE: report only, never fail
    ignore_unfixed: bool = False  # vulnerabilities without a fixed version don't count
    ignore: tuple[ScanIgnore, ...] = ()
    # A .trivyignore.yaml (or plain .trivyignore) relative to the repository. Unset: the
    # repository's own .trivyignore.yaml / .trivyignore is used when present.
    ignore_file: str | None = None
    required: bool = True  # false: a missing scanner skips the stage with a warning
    allow_missing_db: bool = False  # true: no vulnerability DB skips only `vuln`, with a warning
    db: ScanDb = Field(default_factory=ScanDb)
    sarif: bool = False  # also write scan/report.sarif in the run directory
    hadolint: bool = False  # lint the Dockerfile too (same threshold and ignore list)
    # How Trivy reads the image: "engine" asks the build engine (DOCKER_HOST) directly, and with
    # a warm layer cache exports nothing; "archive" exports it with `docker save` first (works
    # with any engine the docker SDK reaches). "auto": engine unless DOCKER_HOST is ssh://.
    image_source: Literal["auto", "engine", "archive"] = "auto"
    trivy: str | None = None  # path to the trivy binary; default: beside python, then PATH
    hadolint_path: str | None = None
    timeout: float = Field(default=600, gt=0)  # seconds, for each scanner run

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
    def _something_to_check(self) -> ScanStage:
        if self.enabled and not self.scanners and not self.hadolint:
            raise ValueError("scan is enabled but no scanner is selected (scanners: [] and "
                             "hadolint: false): nothing would be checked")
        if self.scanners and not self.targets:
            raise ValueError("targets is empty: give 'image' and/or 'context'")
        return self
