"""runner.proc.stop, the one way a child process is stopped, on real processes: each signal of
the escalation in turn, a whole process group, and a (pid, start time) record that no longer
names the same process left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.proc import (LINE_MAX, OUTPUT_TAIL, Recorded, reap_child, run_command, start_detached,
                         start_time, stop)

# A child that notes each signal it gets in a file and ignores SIGINT and SIGTERM: only SIGKILL
# ends it. It writes "ready" once its handlers are in place.
IGNORES_TERM = """\
import signal, sys, time
path = sys.argv[1]
def note(sig, _frame):
    with open(path, "a") as fh:
        fh.write(signal.Signals(sig).name + "\\n")
signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
with open(path, "a") as fh:
    fh.write("ready\\n")
while True:
    time.sleep(1)
"""


def _wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _stubborn(notes: Path, **popen) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", IGNORES_TERM, str(notes)], **popen)
    _wait_for(lambda: notes.exists() and "ready" in notes.read_text())
    return proc


def _gone(pid: int) -> bool:
    return start_time(pid) is None  # no such pid, or a zombie


@pytest.fixture
def cleanup():
    """Kills whatever a failed test left (by process group: each child leads its own)."""
    pids: list[int] = []
    yield pids.append
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        reap_child(pid)


def test_a_popen_that_ignores_sigterm_gets_each_signal_then_sigkill(tmp_path, cleanup):
    notes = tmp_path / "signals"
    proc = _stubborn(notes, start_new_session=True)
    cleanup(proc.pid)
    began = time.monotonic()
    assert stop(proc, ((signal.SIGINT, 0.3), (signal.SIGTERM, 0.3), (signal.SIGKILL, 5.0)),
                group=True) is True
    assert proc.returncode == -signal.SIGKILL
    assert notes.read_text().split() == ["ready", "SIGINT", "SIGTERM"]
    assert time.monotonic() - began >= 0.6  # each grace period was given
    assert stop(proc, ((signal.SIGKILL, 1.0),)) is False  # already gone: nothing sent


def test_a_popen_that_exits_on_the_first_signal_gets_no_other(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    began = time.monotonic()
    assert stop(proc, ((signal.SIGTERM, 5.0), (signal.SIGKILL, None))) is True
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - began < 4


def test_a_process_group_is_stopped_with_its_leader(tmp_path, cleanup):
    """The leader's child (a `sleep` it started) is in its group: stopped with it, though the
    leader never signals it."""
    pidfile = tmp_path / "grandchild"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen(['sleep', '60'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n")
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    cleanup(leader.pid)
    _wait_for(lambda: pidfile.exists() and pidfile.read_text())
    grandchild = int(pidfile.read_text())
    assert os.getpgid(grandchild) == leader.pid
    assert stop(leader, ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)), group=True) is True
    assert leader.returncode == -signal.SIGTERM
    _wait_for(lambda: _gone(grandchild))  # reparented once the leader died, then ended


def test_a_record_is_stopped_by_pid_and_escalates_to_sigkill(tmp_path, cleanup):
    notes = tmp_path / "signals"
    proc = _stubborn(notes, start_new_session=True)
    cleanup(proc.pid)
    rec = Recorded(proc.pid, start_time(proc.pid))
    assert stop(rec, ((signal.SIGTERM, 0.3), (signal.SIGKILL, 5.0))) is True
    assert proc.wait(timeout=5) == -signal.SIGKILL  # a Popen that still waits gets its status
    assert notes.read_text().split() == ["ready", "SIGTERM"]
    assert stop(rec, ((signal.SIGKILL, 1.0),)) is False


def test_a_record_whose_start_time_differs_is_not_signalled(tmp_path, cleanup):
    """The pid now belongs to another process (here: the same pid with another start time, as
    a reused pid would have): nothing is sent, to it or to its group."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    cleanup(proc.pid)
    other = Recorded(proc.pid, start_time(proc.pid) + 1)
    assert stop(other, ((signal.SIGKILL, 1.0),)) is False
    assert stop(other, ((signal.SIGKILL, 1.0),), group=True) is False
    time.sleep(0.2)
    assert proc.poll() is None
    assert stop(Recorded(proc.pid, start_time(proc.pid)), ((signal.SIGTERM, 5.0),)) is True
    assert proc.wait(timeout=5) == -signal.SIGTERM


def test_a_group_record_is_stopped_whole(tmp_path, cleanup):
    """As a daemon stops a run orphaned by its predecessor: by (pid, start time), the group.
    Nothing in it heeds SIGINT (the shell traps it, its background jobs ignore it), so only the
    SIGKILL to the group ends them."""
    proc = subprocess.Popen(["sh", "-c", "trap '' INT; sleep 60 & sleep 60 & wait"],
                            start_new_session=True)
    cleanup(proc.pid)
    _wait_for(lambda: len(_group(proc.pid)) >= 3)
    members = _group(proc.pid)
    assert stop(Recorded(proc.pid, start_time(proc.pid)),
                ((signal.SIGINT, 0.5), (signal.SIGKILL, 5.0)), group=True) is True
    assert proc.wait(timeout=5) == -signal.SIGKILL
    _wait_for(lambda: all(_gone(pid) for pid in members))


def test_a_detached_process_is_recorded_and_reaped_when_stopped(tmp_path):
    """start_detached lets its Popen go: stop(..., reap=True) collects the exit status, so no
    zombie of it stays behind in this process."""
    with open(tmp_path / "out", "ab") as out:
        rec = start_detached(["sleep", "30"], out)
    assert rec.start == start_time(rec.pid)
    assert os.getpgid(rec.pid) == rec.pid  # a session, so a group, of its own
    assert stop(rec, ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)), reap=True) is True
    assert start_time(rec.pid, zombie=True) is None  # reaped, not a zombie
    with pytest.raises(ChildProcessError):
        os.waitpid(rec.pid, os.WNOHANG)


def test_start_time_of_a_zombie_only_when_asked_for(tmp_path):
    proc = subprocess.Popen(["true"])
    _wait_for(lambda: start_time(proc.pid) is None)  # exited, not reaped yet: a zombie
    assert start_time(proc.pid, zombie=True) is not None
    proc.wait()
    assert start_time(proc.pid, zombie=True) is None


def _group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and not _gone(int(entry.name)):
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return found


# ---- run_command's memory -------------------------------------------------------------------

def test_run_command_passes_every_line_on_and_keeps_only_the_end():
    """A command's output streams through on_line (to the run's log on disk); its Result keeps
    the end, so memory does not grow with what the command prints."""
    count = 0
    last = ""

    def on_line(text: str) -> None:
        nonlocal count, last
        count += 1
        last = text

    n = 100_000  # about 1.2 MB of output
    result = run_command([sys.executable, "-c", f"for i in range({n}): print('line', i)"],
                         on_line=on_line, timeout=60)
    assert result.returncode == 0
    assert (count, last) == (n, f"line {n - 1}")
    assert OUTPUT_TAIL // 2 < len(result.output) <= OUTPUT_TAIL
    assert result.output.endswith(f"line {n - 2}\nline {n - 1}")
    assert result.output.split("\n")[0].startswith("line ")  # whole lines


def test_run_command_passes_a_line_without_end_in_pieces():
    text = "é" * LINE_MAX + "x" * 10  # a two-byte character across every piece's end
    pieces: list[str] = []
    result = run_command([sys.executable, "-c",
                          f"import sys; sys.stdout.write('é' * {LINE_MAX} + 'x' * 10)"],
                         on_line=pieces.append, timeout=60)
    assert result.returncode == 0
    assert "".join(pieces) == text
    assert len(pieces) == 3 and all(len(p.encode()) <= LINE_MAX for p in pieces)
