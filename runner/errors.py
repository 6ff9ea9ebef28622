"""The exceptions that decide a run's exit code.

Two kinds of failure are kept apart: the user's input or pipeline failed (a clear message, no
traceback) and the runner itself failed (a bug: the CLI prints the traceback).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.outputs import StageOutputs

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Problem:
    """One validation problem, located in a file."""

    file: str
    line: int  # 1-based
    column: int  # 1-based
    path: str  # field path such as "stages.build.args"
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        field = f" {self.path}:" if self.path else ""
        return f"{where}: {self.severity}:{field} {self.message}"


class RunnerError(Exception):
    """Base of the errors this project raises on purpose."""

    exit_code = EXIT_FAILED


class InvalidInput(RunnerError):
    """Bad user input detected before any side effect (exit 2)."""

    exit_code = EXIT_INVALID

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


class StageFailed(RunnerError):
    """A stage of the user's pipeline failed (exit 1). The message says why. `outputs`: what
    the stage still has to record although it failed (a failed scan gate's counts and report
    paths, a failed deploy's per-server report), of the stage's own outputs type."""

    exit_code = EXIT_FAILED

    def __init__(self, stage: str, message: str, outputs: StageOutputs | None = None):
        self.stage = stage
        self.reason = message
        self.outputs = outputs
        super().__init__(f"stage {stage!r} failed: {message}")


WITHHELD_WHY = "--withhold-secrets: a pull request from a fork gets no secrets"


class SecretWithheld(StageFailed):
    """A stage asked for the value of a secret that this run does not get (`runner exec
    --withhold-secrets`). A StageFailed: the stage that needs it fails, with this message."""

    def __init__(self, name: str, field: str | None = None):
        self.secret = name
        message = f"secret {name!r} is withheld from this run ({WITHHELD_WHY})"
        super().__init__("", f"{field}: {message}" if field else message)

    def __str__(self) -> str:
        return self.reason


class Cancelled(RunnerError):
    """The run was interrupted (Ctrl-C, SIGTERM, or cancelled by the daemon): exit 130."""

    exit_code = EXIT_INTERRUPTED
