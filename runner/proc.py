"""Starting and stopping child processes: running a local command as an argv list (streaming its
output, honouring cancellation), starting a long-lived one detached, and stopping either kind.

There is no shell anywhere here: argv is passed to the OS as a list.

Every stop goes through stop(): each signal of an escalation in turn, a grace period after each,
to a Popen of this process or to a Recorded process (pid + start time) that another process, or
an earlier run of this one, started.
"""
from __future__ import annotations

import codecs
import os
import pwd
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

from runner.errors import Cancelled


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    # The end of stdout and stderr merged, as the user would have seen it: whole lines, about
    # OUTPUT_TAIL characters (a command can print without end; on_line got every line).
    output: str
    duration: float


# ---- who a process is ----------------------------------------------------------------------

class Recorded(NamedTuple):
    """One process by pid and start time (start_time()): a pid reused by a later, unrelated
    process has another start time, so the pair names the process that was recorded and no
    other."""

    pid: int
    start: int

    def running(self) -> bool:
        """Whether this very process still runs (not exited, not a zombie, not a reused pid)."""
        return start_time(self.pid) == self.start


def start_time(pid: int, *, zombie: bool = False) -> int | None:
    """pid's start time in clock ticks since boot (/proc/PID/stat field 22), or None if there is
    no such pid, or (unless `zombie`) it has exited and waits to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold anything
    if len(fields) < 20 or (not zombie and fields[0] in ("Z", "X")):
        return None
    return int(fields[19])


def reap_child(pid: int) -> None:
    """Collect pid's exit status if it is an exited child of this process (one started with
    start_detached, whose Popen was let go), so that it does not stay a zombie. Never for a pid
    a Popen still waits for: its wait would find no status."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ---- stopping ------------------------------------------------------------------------------

# (signal, seconds to wait for the process to exit after it; None: as long as it takes)
Escalation = Sequence[tuple[int, float | None]]

# SIGINT first (lets docker/BuildKit cancel cleanly), then SIGTERM, then SIGKILL.
STOP_ESCALATION: Escalation = ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0))
_POLL = 0.05  # how often a Recorded process is looked at while it is given time to exit


def stop(proc: subprocess.Popen | Recorded, escalation: Escalation, *, group: bool = False,
         reap: bool = False) -> bool:
    """Send each signal of `escalation` in turn, waiting its grace period for the process to
    exit before the next; done as soon as it has exited. With `group`, every signal goes to the
    process group the process leads (it was started with start_new_session=True); whether it
    exited is still the leader's.

    A Popen is waited for (and reaped) by Popen.wait. A Recorded process is signalled only while
    its pid still is that process (same start time; a zombie still is), and it has exited once
    the pid no longer runs as it. `reap` also collects its exit status (reap_child): only for
    a child whose Popen was let go.

    Returns False if the process had exited before anything was sent, else True (also when a
    signal found it gone, or it was still there after the last grace period)."""
    if isinstance(proc, subprocess.Popen):
        return _stop_popen(proc, escalation, group)
    return _stop_recorded(Recorded(*proc), escalation, group, reap)


def _send(pid: int, sig: int, group: bool) -> None:
    if group:
        os.killpg(pid, sig)
    else:
        os.kill(pid, sig)


def _stop_popen(proc: subprocess.Popen, escalation: Escalation, group: bool) -> bool:
    if proc.poll() is not None:
        return False
    for sig, grace in escalation:
        if proc.poll() is not None:
            return True
        try:
            _send(proc.pid, sig, group)
        except (ProcessLookupError, PermissionError):
            return True
        try:
            proc.wait(timeout=grace)
            return True
        except subprocess.TimeoutExpired:
            continue
    return True


def _stop_recorded(rec: Recorded, escalation: Escalation, group: bool, reap: bool) -> bool:
    if start_time(rec.pid, zombie=True) != rec.start:
        return False
    for sig, grace in escalation:
        try:
            _send(rec.pid, sig, group)
        except (ProcessLookupError, PermissionError):
            return True
        deadline = None if grace is None else time.monotonic() + grace
        while deadline is None or time.monotonic() < deadline:
            if not rec.running():
                # Reaped after it is seen gone, not before the look: a process that exits
                # between a reap and the look would stay a zombie of this process.
                if reap:
                    reap_child(rec.pid)
                return True
            time.sleep(_POLL)
    return True


# ---- starting ------------------------------------------------------------------------------

def start_detached(argv: Sequence[str], out: IO[bytes], *, user: str | None = None) -> Recorded:
    """Start argv in a session of its own (it outlives this process and leads its own process
    group), stdin from /dev/null, stdout and stderr to `out`. Returns its record; the Popen is
    let go, so stop it with stop(rec, ..., reap=True) when this process may be its parent.

    With `user`, the process runs as that user (its uid, gid and groups, set between fork and
    exec, cwd /), so the record is the program's own pid: `runuser` would stay in between as the
    parent that a stop by pid reaches instead."""
    as_user = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid,
                   "extra_groups": os.getgrouplist(user, entry.pw_gid),
                   "cwd": "/",  # not our own cwd, which that user may not be able to read
                   "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                           "HOME": entry.pw_dir, "USER": user, "LOGNAME": user}}
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            start_new_session=True, close_fds=True, **as_user)
    # Popen.__del__ would otherwise warn; the process is meant to outlive us.
    proc.returncode = 0
    st = start_time(proc.pid)
    return Recorded(proc.pid, st if st is not None else -1)


# ---- running a command to its end ----------------------------------------------------------

OUTPUT_TAIL = 256 * 1024  # characters of a command's output its Result keeps
LINE_MAX = 64 * 1024  # bytes: a longer line is passed to on_line in pieces of this size


class _Tail:
    """The last lines of an output, about `limit` characters of them (the last line always):
    a command's memory stays the same whatever it prints."""

    def __init__(self, limit: int):
        self._lines: deque[str] = deque()
        self._size = 0
        self._limit = limit

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self._limit and len(self._lines) > 1:
            self._size -= len(self._lines.popleft()) + 1

    def text(self, *more: str) -> str:
        return "\n".join([*self._lines, *more])


def _lines(stream: IO[bytes]) -> Iterator[str]:
    """The stream's lines, without their line ends; a line longer than LINE_MAX bytes in
    pieces (a character cut in two by a piece's end is decoded whole in the next)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for raw in iter(lambda: stream.readline(LINE_MAX), b""):
        yield decoder.decode(raw).rstrip("\r\n")
    rest = decoder.decode(b"", final=True)
    if rest:
        yield rest


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
    """Run argv, feeding each output line to on_line; the Result keeps only the output's end
    (see Result.output). Raises Cancelled if `cancel` is set or the process gets
    KeyboardInterrupt; the child is stopped before that exception leaves."""
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
    tail = _Tail(OUTPUT_TAIL)

    def pump() -> None:
        assert proc.stdout is not None
        for text in _lines(proc.stdout):
            tail.add(text)
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
                stop(proc, STOP_ESCALATION, group=True)
                reader.join(timeout=2)
                return Result(argv, -1, tail.text(f"timed out after {timeout:.0f}s"),
                              time.monotonic() - start)
            if exited.wait(timeout=0.1):
                break
    except (KeyboardInterrupt, Cancelled) as exc:
        stop(proc, STOP_ESCALATION, group=True)
        reader.join(timeout=2)
        if isinstance(exc, KeyboardInterrupt):
            raise Cancelled(f"interrupted while running {argv[0]}") from exc
        raise
    reader.join(timeout=5)
    return Result(argv, proc.returncode, tail.text(), time.monotonic() - start)
