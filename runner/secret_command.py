"""A secret whose value a command prints: a secret manager's CLI (`op read`, `vault kv get`,
`aws secretsmanager get-secret-value`, ...) run on the runner's host as an argv, no shell.

The command gets the runner's environment (a manager's CLI finds its session or token there)
and no standard input; its standard output, one trailing newline removed, is the value. Its
standard error is thrown away and its output is never quoted, whatever happens: either may hold
the secret, or part of it. At its timeout its whole process group is killed (a CLI that waits on
a prompt or a network must not hold the run).
"""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

from runner.proc import stop

# A secret command holds nothing worth a graceful stop: TERM, then KILL.
_ESCALATION = ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0))


class SecretCommandFailed(Exception):
    """Why a secret's command gave no value, in words that never include its output."""


def run_secret_command(argv: Sequence[str], timeout: float,
                       environ: Mapping[str, str] | None = None) -> str:
    """The value `argv` prints. Raises SecretCommandFailed naming argv[0] and what went wrong
    (not found, exit status, signal, timeout, no output, not UTF-8)."""
    program = argv[0]
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ if environ is None else environ))
    except FileNotFoundError:
        raise SecretCommandFailed(f"command {program!r} not found") from None
    except OSError as exc:
        raise SecretCommandFailed(f"command {program!r} could not start: "
                                  f"{exc.strerror or type(exc).__name__}") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, _ESCALATION, group=True)
        _drain(proc)
        raise SecretCommandFailed(f"command {program!r} did not finish within {timeout:g}s "
                                  "(killed)") from None
    except BaseException:  # an interrupt while it runs: it must not outlive the run
        stop(proc, _ESCALATION, group=True)
        _drain(proc)
        raise
    if proc.returncode < 0:
        raise SecretCommandFailed(f"command {program!r} was killed by signal {-proc.returncode}")
    if proc.returncode != 0:
        raise SecretCommandFailed(f"command {program!r} exited with status {proc.returncode}")
    try:
        value = out.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretCommandFailed(f"command {program!r} printed something that is not UTF-8 "
                                  "text") from None
    value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    if not value:
        raise SecretCommandFailed(f"command {program!r} printed nothing")
    return value


def _drain(proc: subprocess.Popen) -> None:
    """Close the killed command's pipe; a descendant that left its process group and keeps the
    pipe open is not waited for."""
    try:
        proc.communicate(timeout=1)
    except subprocess.TimeoutExpired:
        if proc.stdout is not None:
            proc.stdout.close()
