"""Who holds a deploy lock: the holder record a run writes into holder.json, how it reads to a
person, and whether the process it names is surely gone.

A holder names its process by host, pid and the pid's start time (runner.proc.start_time), with
the kernel's boot id and the pid namespace it counts pids in. A run on the same host (same boot
id and pid namespace: the pids mean the same processes) can tell for sure that the holder's
process is gone, and take the lock at once instead of waiting out its ttl; so can a run on the
same machine (same host name and machine id) after the machine restarted (another boot id). On
any other host nothing is known for sure: the ttl decides.
"""
from __future__ import annotations

import getpass
import os
import socket
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from runner.proc import Recorded, start_time


@dataclass(frozen=True)
class Here:
    """This host and the namespace its pids are counted in, as holder.json records them."""

    host: str
    boot_id: str  # /proc/sys/kernel/random/boot_id: new at every boot
    pid_ns: str  # "pid:[4026531836]": pids compare only within one namespace
    machine_id: str  # /etc/machine-id: the same across reboots


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def here() -> Here:
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return Here(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pid_ns,
                _read("/etc/machine-id"))


def holder_info(run_id: str, pipeline: str = "", commit: str = "", ttl: float = 60) -> dict:
    """A fresh holder record for this process (a new token every time)."""
    h = here()
    try:
        user = getpass.getuser()
    except Exception:  # no user name for this uid (a container): the uid says enough
        user = str(os.getuid())
    pid = os.getpid()
    return {"token": uuid.uuid4().hex, "run_id": run_id, "pipeline": pipeline,
            "commit": commit, "who": f"{user}@{h.host} pid {pid}", "ttl": ttl,
            "acquired": time.time(), "host": h.host, "pid": pid,
            "pid_start": start_time(pid), "boot_id": h.boot_id, "pid_ns": h.pid_ns,
            "machine_id": h.machine_id}


def gone(holder: dict, at: Here | None = None) -> str | None:
    """Why the holder's process is surely gone (a sentence), or None when it may be alive or
    cannot be judged from here (another host, or a record without these fields)."""
    at = at or here()
    pid, started = holder.get("pid"), holder.get("pid_start")
    boot, ns = holder.get("boot_id"), holder.get("pid_ns")
    if not (isinstance(pid, int) and isinstance(started, int) and boot and ns):
        return None
    if boot == at.boot_id and ns == at.pid_ns:
        if not Recorded(pid, started).running():  # no such pid, a zombie, or another's pid now
            return f"its process (pid {pid} on this host) is gone"
        return None
    if (holder.get("machine_id") and holder.get("machine_id") == at.machine_id
            and holder.get("host") == at.host and boot != at.boot_id):
        return f"its host {at.host} has restarted since it took the lock"
    return None


def started_at(holder: dict) -> str:
    """When the holder took the lock, in UTC, or "" when holder.json does not say."""
    t = holder.get("acquired")
    if not isinstance(t, (int, float)):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def describe_holder(h: dict) -> str:
    """'run R, pipeline P, commit C, started by user@host pid N at T', with what holder.json
    knows; never a placeholder for what it does not ('a run of pipeline P, started by ...'
    without a run id)."""
    if h.get("run_id"):
        parts = [f"run {h['run_id']}"] + ([f"pipeline {h['pipeline']}"] if h.get("pipeline")
                                          else [])
    elif h.get("pipeline"):
        parts = [f"a run of pipeline {h['pipeline']}"]
    else:
        parts = ["a run"]
    if h.get("commit"):
        parts.append(f"commit {str(h['commit'])[:12]}")
    who, when = h.get("who"), started_at(h)
    if who or when:
        parts.append("started" + (f" by {who}" if who else "") + (f" at {when}" if when else ""))
    if parts == ["a run"]:
        return ("a run that has not written its holder.json yet (it is taking the lock right "
                "now, or died while taking it)")
    return ", ".join(parts)
