"""The lab's failures: a machine it cannot run on (exit 2), or a part that would not start (exit 1)."""
from __future__ import annotations

from runner.errors import EXIT_FAILED, EXIT_INVALID, RunnerError


class LabError(RunnerError):
    """A part of the lab failed to start or stop; the message says which and what it logged."""

    exit_code = EXIT_FAILED


class Unsupported(RunnerError):
    """Not root, not Linux, or not a Debian-like machine: nothing was touched."""

    exit_code = EXIT_INVALID
