"""Running a local command as an argv list, streaming its output, honouring cancellation.

There is no shell anywhere here: argv is passed to the OS as a list.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from runner.errors import Cancelled


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    output: str  # stdout and stderr merged, as the user would have seen it
    duration: float


# SIGINT first (lets docker/BuildKit cancel cleanly), then SIGTERM, then SIGKILL.
STOP_ESCALATION = ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0))


def stop_process_group(proc: subprocess.Popen, escalation=STOP_ESCALATION) -> None:
    """Stop a child started with start_new_session=True, with its whole process group: each
    signal in turn, waiting its time for the child to exit before the next."""
    for sig, wait in escalation:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
    stdin: bytes | None = None,
) -> Result:
    """Run argv, feeding each output line to on_line. Raises Cancelled if `cancel` is set or the
    process gets KeyboardInterrupt; the child is stopped before that exception leaves."""
    argv = tuple(str(a) for a in argv)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if on_line is not None:
                on_line(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    exited = threading.Event()
    # Waiting in a thread lets the loop below wake the moment the child exits; Popen.wait with
    # a timeout polls with sleeps of up to 50 ms instead.
    threading.Thread(target=lambda: (proc.wait(), exited.set()), daemon=True).start()
    try:
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled while running {argv[0]}")
            if timeout is not None and time.monotonic() - start > timeout:
                stop_process_group(proc)
                reader.join(timeout=2)
                return Result(argv, -1, "\n".join(lines + [f"timed out after {timeout:.0f}s"]),
                              time.monotonic() - start)
            if exited.wait(timeout=0.1):
                break
    except (KeyboardInterrupt, Cancelled) as exc:
        stop_process_group(proc)
        reader.join(timeout=2)
        if isinstance(exc, KeyboardInterrupt):
            raise Cancelled(f"interrupted while running {argv[0]}") from exc
        raise
    reader.join(timeout=5)
    return Result(argv, proc.returncode, "\n".join(lines), time.monotonic() - start)
