"""The daemon's durable state: runs (the queue and the history), stages, log lines, deliveries,
leases and poll state. This module is the contract; the SQL lives beside it:

  store_sql.py     the queries both backends share (one dialect switch: placeholders, locks)
  store_sqlite.py  one file in the data directory (WAL): the default, one host
  store_pg.py      PostgreSQL (psycopg 3): several daemons on several hosts share one queue;
                   claims take FOR UPDATE SKIP LOCKED under a cluster-wide claim lock, LISTEN/NOTIFY
                   wakes idle workers everywhere, an advisory lock chooses the leader
  migrations.py    the versioned schema of both

Every method is one transaction. Nothing outside these modules writes SQL.

Run statuses: queued -> running -> success | failed | invalid | cancelled | interrupted.
A queued run can go straight to cancelled (superseded, or cancelled by hand).
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner.daemon.leases import Holder

FINAL = ("success", "failed", "invalid", "cancelled", "interrupted")
ACTIVE = ("queued", "running")


class StoreError(Exception):
    """The store cannot do this now (disk full, database locked or gone). Nothing was changed.
    The message is for the log (it may name the database's host and user); `public` says the
    same for whoever sent a request (an HTTP answer), naming neither."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = message if public is None else public


def public_text(exc: BaseException) -> str:
    """What may be stored where API readers see it (a run's reason): a StoreError's `public`
    text, which names no database host or user; any other error as it reads."""
    return exc.public if isinstance(exc, StoreError) else str(exc)


@dataclass(frozen=True)
class NewRun:
    """A run to queue. `group` is the concurrency group key (None: no group)."""

    pipeline: str
    trigger: str  # push | tag | pull_request | poll | cron | manual | retry | rollback
    provider: str | None = None
    ref: str | None = None
    branch: str | None = None
    tag: str | None = None
    commit: str | None = None
    event: dict = field(default_factory=dict)
    vars: dict = field(default_factory=dict)
    group: str | None = None
    cancel_in_progress: bool = True
    delivery: str | None = None
    # Skip it if this pipeline already has a run of this commit on this ref that is queued,
    # running or succeeded (webhook and poll: a push seen both ways runs once). A commit whose
    # runs all failed runs again when a new delivery names it. Manual and cron runs always run.
    once: bool = False
    # What the run may not do (a pull request; a fork's above all): `runner exec` gets
    # --withhold-secrets and --skip for these.
    withhold_secrets: bool = False
    skip_stages: tuple[str, ...] = ()
    retry_of: int | None = None  # the run this one runs again (runner retry)
    destination: str | None = None  # the entry's destination (`runner exec -d`), None: none
    # Said in the delivery's reason only when the run is queued (what a pull request run may
    # do): a run skipped as already run must not be described as if it had been made.
    note: str = ""


@dataclass(frozen=True)
class Accepted:
    """What recording a delivery did."""

    delivery_row: int
    duplicate: bool
    run_ids: tuple[int, ...]
    # Runs still running that a new run supersedes: the caller asks their workers to stop.
    cancel_running: tuple[int, ...] = ()
    outcome: str = ""
    reason: str = ""
    status_code: int = 200


@dataclass(frozen=True)
class DeliveryAbout:
    """What a delivery was about, for the deliveries page: the repository (its web address),
    the ref ("refs/heads/main"; a pull request's "#3 feature/x → main") and the forge's action
    ("opened", "synchronize"; a push's "created" or "deleted"). Empty when unknown: a delivery
    refused before its payload was trusted says nothing from it."""

    repository: str = ""
    ref: str = ""
    action: str = ""


@dataclass(frozen=True)
class Claimed:
    id: int
    pipeline: str
    event: dict
    vars: dict
    attempt: int
    ref: str | None = None
    branch: str | None = None
    tag: str | None = None
    commit: str | None = None
    withhold_secrets: bool = False
    skip_stages: tuple[str, ...] = ()
    waited: float = 0.0  # seconds it was queued (for the queue-wait metric)
    # "rollback" runs `runner rollback` instead of `runner exec` (the worker decides by it).
    trigger: str = ""
    destination: str | None = None  # where it deploys (NewRun.destination)


class Store(abc.ABC):
    """The queue and history. Every method is atomic and safe to call from any thread."""

    @abc.abstractmethod
    def accept_delivery(self, provider: str, delivery_id: str | None, event: str, runs: Sequence[NewRun],
                        reasons: Sequence[str], remote: str = "",
                        about: DeliveryAbout = DeliveryAbout()) -> Accepted:
        """Record a delivery whose signature was verified, and queue `runs` in the same transaction.
        Its outcome is "queued" (202) if a run was queued, else "ignored" (200) with `reasons`.
        If the same (provider, delivery_id) was accepted before, queue nothing and return
        duplicate=True with the runs the first delivery queued."""

    @abc.abstractmethod
    def record_delivery(self, provider: str, delivery_id: str | None, event: str, outcome: str,
                        reason: str, status_code: int, remote: str = "",
                        about: DeliveryAbout = DeliveryAbout()) -> int:
        """Record a delivery that queues nothing (rejected, ping, ...). Does not claim the id."""

    @abc.abstractmethod
    def enqueue(self, runs: Sequence[NewRun]) -> tuple[list[int], list[int]]:
        """Queue runs (poll, cron, manual). Returns (new run ids, running runs to cancel)."""

    @abc.abstractmethod
    def claim(self, owner: str, limits: dict[str, int], lease_seconds: float) -> Claimed | None:
        """Take the oldest runnable queued run: its pipeline under its limit, its group idle, both
        counted over every daemon sharing the store. Marks it running with a lease held by `owner`
        and records `owner` as the run's daemon."""

    @abc.abstractmethod
    def heartbeat(self, owner: str, run_ids: Sequence[int], lease_seconds: float) -> dict[int, str]:
        """Extend the leases (none given: {}). A run another daemon marked interrupted while
        `owner` was silent (expire), whose lease is still `owner`'s, is running again. Returns
        {run id: why} for the runs among them that must stop: their cancellation was requested,
        or the lease is no longer `owner`'s (the run was queued again, maybe taken by another)."""

    @abc.abstractmethod
    def set_lease_pid(self, run_id: int, owner: str, pid: int, pid_start: str | None) -> None:
        """Remember which process runs it, so that a restarted daemon can stop an orphan."""

    @abc.abstractmethod
    def leases_of(self, owner: str) -> list[dict]:
        """[{run_id, pid, pid_start}] of the runs `owner` holds."""

    @abc.abstractmethod
    def finish(self, run_id: int, owner: str, status: str, exit_code: int | None, reason: str = "") -> bool:
        """Mark a run final and drop its lease, also over "interrupted" when another daemon
        marked it so while `owner` was silent (the lease is still `owner`'s). False if the lease
        was no longer ours."""

    @abc.abstractmethod
    def request_cancel(self, run_id: int, reason: str) -> str | None:
        """Cancel: a queued run is cancelled at once; a running one is flagged for its worker.
        Returns the run's status before the call, or None if there is no such run."""

    @abc.abstractmethod
    def recover(self, owner: str, requeue: set[str]) -> list[tuple[int, str]]:
        """Runs `owner` held when it stopped (it is starting again, and has stopped their
        processes, so they are known gone): each running one becomes interrupted, or queued
        again when its pipeline is in `requeue`. Its leases of runs another daemon marked
        interrupted meanwhile are dropped. Returns (run id, new status)."""

    @abc.abstractmethod
    def expire(self, owner: str, requeue: set[str], lease_seconds: float,
               gone: Callable[[Holder], bool]) -> list[tuple[int, str]]:
        """Other daemons' running runs whose owner has been silent for its lease time, by the
        database's clock (leases.silent_for, leases.fate): queued again when `gone(holder)`
        says the run's process and daemon are known gone and the pipeline is in `requeue`,
        else interrupted with the lease left to its owner (heartbeat, finish). Only a daemon
        that has itself been heard for a lease time may call it. `lease_seconds`: for a running
        run without a lease. Returns (run id, new status)."""

    @abc.abstractmethod
    def stage_event(self, run_id: int, stage: str, status: str, *, duration: float | None = None,
                    error: str | None = None, outputs: dict | None = None) -> None: ...

    @abc.abstractmethod
    def record_commit(self, run_id: int, commit: str) -> None:
        """The commit the run's checkout checked out, when it is not the one queued: a run queued
        on a ref alone (no commit known), or on a tag object the checkout peeled to its commit.
        The run's links, its commit status and a retry then name what was built."""

    @abc.abstractmethod
    def append_logs(self, run_id: int, lines: Sequence[tuple[int, str, float, str]]) -> None:
        """lines: (seq, stage, time, text)."""

    @abc.abstractmethod
    def get_run(self, run_id: int) -> dict | None: ...

    @abc.abstractmethod
    def list_runs(self, *, pipeline: str | None = None, status: str | None = None,
                  branch: str | None = None, trigger: str | None = None, limit: int = 50,
                  before_id: int | None = None) -> list[dict]: ...

    @abc.abstractmethod
    def stages(self, run_id: int) -> list[dict]: ...

    @abc.abstractmethod
    def logs(self, run_id: int, stage: str | None = None, after: int = 0, limit: int = 1000) -> list[dict]: ...

    @abc.abstractmethod
    def deliveries(self, limit: int = 50, provider: str | None = None) -> list[dict]: ...

    @abc.abstractmethod
    def deploys(self, pipeline: str | None = None, limit: int = 20) -> list[dict]:
        """The newest runs with a "deploy" stage (deploys and rollbacks), newest first:
        [{run_id, pipeline, trigger, status (the run's), stage_status, commit, branch, tag,
        started_at, finished_at, duration, error (the stage's), outputs (parsed, or None)}]."""

    @abc.abstractmethod
    def poll_state(self, pipeline: str) -> dict[str, str]:
        """{ref: commit} as the last successful poll saw them ({} if none)."""

    @abc.abstractmethod
    def poll_error(self, pipeline: str) -> str:
        """The error of the last poll of this pipeline ("" if it succeeded, or none ran)."""

    @abc.abstractmethod
    def has_poll_state(self, pipeline: str) -> bool:
        """True once a poll of this pipeline has succeeded (even if it found no refs)."""

    @abc.abstractmethod
    def max_log_seq(self, run_id: int) -> int:
        """The highest log line number stored for a run (0 if none)."""

    @abc.abstractmethod
    def run_event(self, run_id: int) -> dict:
        """The event a run was queued with (what `runner exec --event` gets)."""

    @abc.abstractmethod
    def set_poll_state(self, pipeline: str, refs: dict[str, str], error: str = "") -> None: ...

    @abc.abstractmethod
    def prune(self, older_than: float, keep_last: int) -> list[int]:
        """Delete final runs (with stages and logs) and deliveries older than the cutoff, keeping
        the newest `keep_last` runs of each pipeline. Returns the ids of the runs removed."""

    @abc.abstractmethod
    def retry(self, run_id: int) -> int | None:
        """Queue a final run again: same pipeline, ref, commit, event and vars, trigger "retry",
        linked to it (retry_of). None if there is no such run; StoreError if it is not final."""

    @abc.abstractmethod
    def daemon_seen(self, owner: str, pipelines: Sequence[str], concurrency: int) -> None:
        """Record that this daemon is alive now and serves these pipelines (its heartbeat)."""

    @abc.abstractmethod
    def daemon_gone(self, owner: str) -> None:
        """This daemon stops (a graceful shutdown): it serves nothing from now on."""

    @abc.abstractmethod
    def daemons(self) -> list[dict]:
        """[{owner, pipelines, concurrency, started_at, seen_at}], the most recently seen first."""

    @abc.abstractmethod
    def fail_unserved(self, alive_within: float) -> list[int]:
        """Fail the queued runs of pipelines that no daemon seen within `alive_within` seconds
        serves (a pipeline removed from every config): they would wait forever. Returns their ids."""

    @abc.abstractmethod
    def queue_stats(self) -> dict:
        """{"by_status": {status: count}, "oldest_queued_age": seconds or None} over all daemons."""

    @abc.abstractmethod
    def try_lead(self, owner: str, silent_after: float = 30.0) -> bool:
        """Become or stay the leader (the one daemon that runs poll and cron). True while this
        store's connection holds the leadership; it is lost when the process dies, or when it
        has not tried again for `silent_after` seconds (a leader that hangs)."""

    @abc.abstractmethod
    def release_lead(self) -> None: ...

    def listen(self, wake) -> None:
        """Call `wake()` (from another thread) whenever any daemon queued a run or freed a slot.
        A backend without notifications does nothing: the dispatcher also looks every 0.5 s."""

    def close(self) -> None:  # pragma: no cover - default
        pass


def open_store(url_or_path: str | Path) -> Store:
    """postgresql://… (or postgres://…): PostgreSQL; sqlite:///path or a plain path: SQLite."""
    s = str(url_or_path)
    if s.startswith(("postgres://", "postgresql://")):
        from runner.daemon.store_pg import PostgresStore
        return PostgresStore(s)
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///"):]
    from runner.daemon.store_sqlite import SqliteStore
    return SqliteStore(s)
