"""When one daemon may expire another's lease, and what becomes of the run: pure, so that the
rules are tested on their own (tests/unit/test_leases.py). The store applies them inside its
transaction (store_sql.expire); the worker supplies whether a process is alive.

A lease's owner is silent when the database has heard nothing from it for its lease time: no
heartbeat of that lease, no sign-in (daemons.seen_at), measured by the database's clock and
never from before the database itself (re)started, since nobody could speak while it was down.
A silent owner may still be running the run (a lost network, a database outage it has not
recovered from yet): its run is marked interrupted, and the owner, if it comes back, takes the
run back or records how it really ended. Only a run whose process is known to have ended, its
daemon with it, is queued again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A run is queued again at most this often (attempt 1 is the first execution).
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Holder:
    """Who held a lease, as the store knows it: the owner (`name@host:data_dir`, see
    service.Daemon.owner), the run's process and the owner daemon's own process, each a pid
    with its start time (runner.proc.start_time, clock ticks since boot; None: not recorded)."""

    owner: str
    pid: int | None = None
    pid_start: str | None = None
    daemon_pid: int | None = None
    daemon_pid_start: str | None = None


def silent_for(now: float, heartbeat_at: float | None, seen_at: float | None, db_started: float) -> float:
    """Seconds the database has heard nothing from a lease's owner: since the latest of its
    last heartbeat of the lease, its last sign-in and the database's own start."""
    return now - max(t for t in (heartbeat_at, seen_at, db_started) if t is not None)


def owner_host(owner: str) -> str | None:
    """The host part of `name@host:data_dir` (names have no "@", hosts no ":"), or None."""
    name, at, rest = owner.partition("@")
    host, colon, _ = rest.partition(":")
    return host if at and colon and host else None


def known_gone(holder: Holder, host: str, alive: Callable[[int, str], bool]) -> bool:
    """True only when the run cannot be running nor be recorded by anyone: its lease was
    taken on this host (`host`), and neither the owner daemon's process nor the run's process
    is alive (`alive(pid, start)`: that pid is still that process). A process of another host
    cannot be looked at, and one not recorded cannot be ruled out: neither is known gone. The
    daemon matters as much as the run's process: a daemon that lost its database may hold a
    finished run's result and record it when it reconnects."""
    if owner_host(holder.owner) != host:
        return False
    if not (holder.pid and holder.pid_start and holder.daemon_pid and holder.daemon_pid_start):
        return False
    return not alive(holder.daemon_pid, holder.daemon_pid_start) and not alive(holder.pid, holder.pid_start)


def fate(silent: float, lease_seconds: float, gone: bool, requeue: bool, cancel_requested: bool,
         attempt: int) -> str | None:
    """What a running run of another daemon becomes: None (its owner is not silent long
    enough: leave it), "queued" (its process is known gone, and its pipeline runs interrupted
    runs again) or "interrupted"."""
    if silent <= lease_seconds:
        return None
    if gone and requeue and not cancel_requested and attempt < MAX_ATTEMPTS:
        return "queued"
    return "interrupted"
