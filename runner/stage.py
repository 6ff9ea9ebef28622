"""The one interface every stage implements, and what the engine hands to it.

The contract lives here, in the runtime, so that the engine never imports the stages it runs
(pipelines/, deployers/): they import it.

Contract for `Stage.run`:
- It receives a `StageContext` and returns its own typed outputs (runner.outputs: a
  `CheckoutOutputs` from checkout, a `BuildOutputs` from build, ...), frozen. The engine keeps
  them in `ctx.outputs` for the later stages (`ctx.outputs.checkout`, `ctx.outputs.push.ref`)
  and records their `to_dict()` in the stage.end event and in run.json.
- A failure of the user's pipeline (bad ref, failing RUN, registry refusal) raises
  `runner.errors.StageFailed(stage, reason)` with a reason a user can act on. A failure that
  still has outputs worth keeping (a failed scan gate's report, a failed deploy's per-server
  report) passes them as `StageFailed(..., outputs=...)`, typed as a success's would be.
  Anything else that escapes is treated as a bug in the runner.
- It honours cancellation: long waits poll `ctx.cancel` (a threading.Event) or use
  `runner.proc.run_command`, which stops its child process when the run is cancelled and raises
  `runner.errors.Cancelled`. Cleanup goes in `finally`.
- Everything it prints goes through `ctx.log` (masked, written to the stage's log file and emitted
  as events); it never prints directly and never logs a secret's value.
- `plan()` is pure: it describes what `run()` would do as plain data, for `--dry-run`.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from runner.model import Pipeline
from runner.outputs import Outputs, StageOutputs
from runner.run_request import RunRequest


class StageLog(Protocol):
    def line(self, text: str) -> None:
        """One line of tool output (build step, git progress); masked before it goes anywhere."""

    def info(self, text: str) -> None:
        """A message from the runner itself about this stage."""

    def warn(self, text: str) -> None:
        """A warning that also appears in the run's summary."""


class Secrets(Protocol):
    def value(self, name: str) -> str:
        """The value of the pipeline secret `name` (already registered with the masker)."""


@dataclass
class StageContext:
    run_id: str
    pipeline: Pipeline
    workdir: Path  # the run's own directory; stages may create files under it
    cache_dir: Path  # long-lived cache shared between runs (git mirrors, ...)
    log: StageLog
    secrets: Secrets
    cancel: threading.Event
    # What the earlier stages of this run gave; a stage that did not run (or failed) is None.
    outputs: Outputs = field(default_factory=Outputs)
    # What the run was asked to build and why (runner.run_request, every value checked): its ref
    # and commit, the repository's default branch a webhook said, ... `runner exec` by hand: an
    # empty manual request.
    request: RunRequest = field(default_factory=RunRequest)


class Stage(ABC):
    name: ClassVar[str]

    @abstractmethod
    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        """What this stage would do, as plain data (no I/O)."""

    @abstractmethod
    def run(self, ctx: StageContext) -> StageOutputs:
        """Do it, and return this stage's outputs type. See the module docstring."""
