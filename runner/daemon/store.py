"""The daemon's durable state: runs (the queue and the history), stages, log lines, deliveries,
leases and poll state.

`Store` is the contract; `SqliteStore` is the implementation used by default (one file in the data
directory, WAL). Every method is one transaction, so that a PostgreSQL implementation can keep the
same semantics with row locks (claim would be SELECT ... FOR UPDATE SKIP LOCKED; dedup is a unique
index; leases are rows with an expiry). Nothing outside this module writes SQL.

Run statuses: queued -> running -> success | failed | invalid | cancelled | interrupted.
A queued run can go straight to cancelled (superseded, or cancelled by hand).
"""
from __future__ import annotations

import abc
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

FINAL = ("success", "failed", "invalid", "cancelled", "interrupted")
ACTIVE = ("queued", "running")


class StoreError(Exception):
    """The store cannot do this now (disk full, database locked or gone). Nothing was changed."""


@dataclass(frozen=True)
class NewRun:
    """A run to queue. `group` is the concurrency group key (None: no group)."""

    pipeline: str
    trigger: str  # push | tag | poll | cron | manual
    provider: str | None = None
    ref: str | None = None
    branch: str | None = None
    tag: str | None = None
    commit: str | None = None
    commit: str | None = None
    event: dict = field(default_factory=dict)
    vars: dict = field(default_factory=dict)
    group: str | None = None
    cancel_in_progress: bool = True
    delivery: str | None = None
    # Skip it if this pipeline already has a run of this commit on this ref (webhook and poll:
    # a push seen both ways runs once). Manual and cron runs always run.
    once: bool = False


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


class Store(abc.ABC):
    """The queue and history. Every method is atomic and safe to call from any thread."""

    @abc.abstractmethod
    def accept_delivery(self, provider: str, delivery_id: str | None, event: str, runs: Sequence[NewRun],
                        reasons: Sequence[str], remote: str = "") -> Accepted:
        """Record a delivery whose signature was verified, and queue `runs` in the same transaction.
        Its outcome is "queued" (202) if a run was queued, else "ignored" (200) with `reasons`.
        If the same (provider, delivery_id) was accepted before, queue nothing and return
        duplicate=True with the runs the first delivery queued."""

    @abc.abstractmethod
    def record_delivery(self, provider: str, delivery_id: str | None, event: str, outcome: str,
                        reason: str, status_code: int, remote: str = "") -> int:
        """Record a delivery that queues nothing (rejected, ping, ...). Does not claim the id."""

    @abc.abstractmethod
    def enqueue(self, runs: Sequence[NewRun]) -> tuple[list[int], list[int]]:
        """Queue runs (poll, cron, manual). Returns (new run ids, running runs to cancel)."""

    @abc.abstractmethod
    def claim(self, owner: str, limits: dict[str, int], lease_seconds: float) -> Claimed | None:
        """Take the oldest runnable queued run: its pipeline under its limit, its group idle.
        Marks it running with a lease held by `owner`."""

    @abc.abstractmethod
    def heartbeat(self, owner: str, run_ids: Sequence[int], lease_seconds: float) -> dict[int, str]:
        """Extend the leases. Returns {run id: why} for the runs among them that must stop: their
        cancellation was requested, or the lease is no longer `owner`'s (it expired and the run
        was recovered elsewhere)."""

    @abc.abstractmethod
    def set_lease_pid(self, run_id: int, owner: str, pid: int, pid_start: str | None) -> None:
        """Remember which process runs it, so that a restarted daemon can stop an orphan."""

    @abc.abstractmethod
    def leases_of(self, owner: str) -> list[dict]:
        """[{run_id, pid, pid_start}] of the runs `owner` holds."""

    @abc.abstractmethod
    def finish(self, run_id: int, owner: str, status: str, exit_code: int | None, reason: str = "") -> bool:
        """Mark a run final and drop its lease. False if the lease was no longer ours."""

    @abc.abstractmethod
    def request_cancel(self, run_id: int, reason: str) -> str | None:
        """Cancel: a queued run is cancelled at once; a running one is flagged for its worker.
        Returns the run's status before the call, or None if there is no such run."""

    @abc.abstractmethod
    def recover(self, owner: str | None, requeue: set[str], now: float | None = None) -> list[tuple[int, str]]:
        """Runs left running by a dead worker: those whose lease is held by `owner` (a daemon that
        is starting again) and those whose lease expired. Each becomes interrupted, or queued
        again when its pipeline is in `requeue`. Returns (run id, new status)."""

    @abc.abstractmethod
    def stage_event(self, run_id: int, stage: str, status: str, *, duration: float | None = None,
                    error: str | None = None, outputs: dict | None = None) -> None: ...

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
    def poll_state(self, pipeline: str) -> dict[str, str]:
        """{ref: commit} as the last successful poll saw them ({} if none)."""

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

    def close(self) -> None:  # pragma: no cover - default
        pass


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    trigger TEXT NOT NULL,
    provider TEXT,
    ref TEXT, branch TEXT, tag TEXT, commit_sha TEXT,
    delivery TEXT,
    grp TEXT,
    cancel_in_progress INTEGER NOT NULL DEFAULT 1,
    event TEXT NOT NULL DEFAULT '{}',
    vars TEXT NOT NULL DEFAULT '{}',
    attempt INTEGER NOT NULL DEFAULT 1,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, id);
CREATE INDEX IF NOT EXISTS runs_pipeline ON runs(pipeline, id);
CREATE INDEX IF NOT EXISTS runs_commit ON runs(pipeline, commit_sha, ref);
CREATE INDEX IF NOT EXISTS runs_group ON runs(grp, status);
CREATE TABLE IF NOT EXISTS leases (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    pid INTEGER,  -- the runner exec child, on the owner's host
    pid_start TEXT  -- its start time (/proc/PID/stat), so that a reused pid is not mistaken for it
);
CREATE TABLE IF NOT EXISTS stages (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at REAL, finished_at REAL, duration REAL,
    error TEXT, outputs TEXT,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS log_lines (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    stage TEXT NOT NULL,
    time REAL NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    provider TEXT NOT NULL,
    delivery_id TEXT,
    event TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    status_code INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    run_ids TEXT NOT NULL DEFAULT '[]',
    remote TEXT NOT NULL DEFAULT '',
    dedup_key TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS deliveries_time ON deliveries(received_at);
CREATE TABLE IF NOT EXISTS poll_state (
    pipeline TEXT PRIMARY KEY,
    refs TEXT NOT NULL DEFAULT '{}',
    checked_at REAL NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
"""

_RUN_COLS = ("id, pipeline, status, reason, trigger, provider, ref, branch, tag, commit_sha, delivery, "
             "grp, attempt, cancel_requested, exit_code, created_at, started_at, finished_at")


def _run_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["commit"] = d.pop("commit_sha")
    d["group"] = d.pop("grp")
    d["cancel_requested"] = bool(d["cancel_requested"])
    return d


class SqliteStore(Store):
    """One sqlite file, WAL, one connection guarded by a lock (sqlite serialises writers anyway).

    synchronous=NORMAL: a commit survives the daemon being killed (SIGKILL); only an OS crash or
    power loss can lose the last few commits."""

    def __init__(self, path: str | Path, checkpoint_interval: float = 1.0):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # executescript commits implicitly; it runs outside any transaction of ours.
        with self._lock:
            self._db.executescript(SCHEMA)
            cols = {r["name"] for r in self._db.execute("PRAGMA table_info(leases)")}
            for col, kind in (("pid", "INTEGER"), ("pid_start", "TEXT")):
                if col not in cols:  # a database made before leases had them
                    self._db.execute(f"ALTER TABLE leases ADD COLUMN {col} {kind}")
        # Checkpoints (the only fsyncs with synchronous=NORMAL) run on their own connection and
        # thread, not inside a webhook's commit: that keeps the acceptance latency flat.
        self._checkpoint_stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if self.path != ":memory:" and checkpoint_interval:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_interval,),
                                                  name="sqlite-checkpoint", daemon=True)
            self._checkpointer.start()

    def _checkpoint_loop(self, every: float) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            while not self._checkpoint_stop.wait(every):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass  # busy or disk full: the next round tries again
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(str(exc)) from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # already rolled back by sqlite itself (e.g. SQLITE_FULL)
                if isinstance(exc, sqlite3.OperationalError):
                    raise StoreError(str(exc)) from exc
                raise

    def _read(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        self._checkpoint_stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()

    # -- queueing -----------------------------------------------------------------------------

    def _insert_runs(self, db: sqlite3.Connection, runs: Sequence[NewRun], now: float,
                     skipped: list[str] | None = None) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        cancel_running: list[int] = []
        for r in runs:
            if r.once and r.commit:
                seen = db.execute("SELECT id FROM runs WHERE pipeline=? AND commit_sha=? AND ref IS ? "
                                  "ORDER BY id LIMIT 1", (r.pipeline, r.commit, r.ref)).fetchone()
                if seen:
                    if skipped is not None:
                        skipped.append(f"{r.pipeline}: commit {r.commit[:12]} of {r.ref} already ran as "
                                       f"run {seen['id']}")
                    continue
            cur = db.execute(
                "INSERT INTO runs (pipeline, status, trigger, provider, ref, branch, tag, commit_sha, delivery,"
                " grp, cancel_in_progress, event, vars, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.pipeline, "queued", r.trigger, r.provider, r.ref, r.branch, r.tag, r.commit, r.delivery,
                 r.group, int(r.cancel_in_progress), json.dumps(r.event), json.dumps(r.vars), now))
            new_id = int(cur.lastrowid)
            ids.append(new_id)
            if r.group is None:
                continue
            why = f"superseded by run {new_id}"
            db.execute("UPDATE runs SET status='cancelled', reason=?, finished_at=? "
                       "WHERE grp=? AND status='queued' AND id<?", (why, now, r.group, new_id))
            if r.cancel_in_progress:
                rows = db.execute("SELECT id FROM runs WHERE grp=? AND status='running' AND id<? "
                                  "AND cancel_requested=0", (r.group, new_id)).fetchall()
                for row in rows:
                    db.execute("UPDATE runs SET cancel_requested=1, reason=? WHERE id=?", (why, row["id"]))
                    cancel_running.append(int(row["id"]))
        return ids, cancel_running

    def accept_delivery(self, provider, delivery_id, event, runs, reasons, remote=""):
        now = time.time()
        key = f"{provider}:{delivery_id}" if delivery_id else None
        with self._tx() as db:
            if key is not None:
                first = db.execute("SELECT id, run_ids FROM deliveries WHERE dedup_key=?", (key,)).fetchone()
                if first is not None:
                    original = tuple(json.loads(first["run_ids"]))
                    cur = db.execute(
                        "INSERT INTO deliveries (provider, delivery_id, event, received_at, status_code, outcome,"
                        " reason, run_ids, remote) VALUES (?,?,?,?,?,?,?,?,?)",
                        (provider, delivery_id, event, now, 200, "duplicate",
                         f"delivery already received as #{first['id']}", json.dumps(list(original)), remote))
                    return Accepted(int(cur.lastrowid), True, original)
            why = list(reasons)
            ids, cancel_running = self._insert_runs(db, runs, now, why)
            outcome, status_code = ("queued", 202) if ids else ("ignored", 200)
            if ids:
                why.append("queued as run " + ", ".join(map(str, ids)))
            reason = "; ".join(why)
            cur = db.execute(
                "INSERT INTO deliveries (provider, delivery_id, event, received_at, status_code, outcome, reason,"
                " run_ids, remote, dedup_key) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (provider, delivery_id, event, now, status_code, outcome, reason, json.dumps(ids), remote, key))
            return Accepted(int(cur.lastrowid), False, tuple(ids), tuple(cancel_running), outcome, reason,
                            status_code)

    def record_delivery(self, provider, delivery_id, event, outcome, reason, status_code, remote=""):
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO deliveries (provider, delivery_id, event, received_at, status_code, outcome, reason,"
                " remote) VALUES (?,?,?,?,?,?,?,?)",
                (provider, delivery_id, event, time.time(), status_code, outcome, reason, remote))
            return int(cur.lastrowid)

    def enqueue(self, runs):
        now = time.time()
        with self._tx() as db:
            return self._insert_runs(db, runs, now)

    def claim(self, owner, limits, lease_seconds):
        now = time.time()
        with self._tx() as db:
            running = db.execute("SELECT pipeline, grp FROM runs WHERE status='running'").fetchall()
            per_pipeline: dict[str, int] = {}
            busy_groups = set()
            for row in running:
                per_pipeline[row["pipeline"]] = per_pipeline.get(row["pipeline"], 0) + 1
                if row["grp"] is not None:
                    busy_groups.add(row["grp"])
            # Skip, in SQL, the pipelines at their limit and the busy groups: a long queue of one
            # pipeline must not hide another pipeline's runnable run.
            full = [n for n, c in per_pipeline.items() if c >= limits.get(n, 0) and n in limits]
            sql = ("SELECT id, pipeline, grp, event, vars, attempt, ref, branch, tag, commit_sha FROM runs "
                   "WHERE status='queued'")
            args: list = []
            if full:
                sql += f" AND pipeline NOT IN ({','.join('?' * len(full))})"
                args += full
            if busy_groups:
                sql += f" AND (grp IS NULL OR grp NOT IN ({','.join('?' * len(busy_groups))}))"
                args += sorted(busy_groups)
            for row in db.execute(sql + " ORDER BY id LIMIT 200", args).fetchall():
                name = row["pipeline"]
                if name not in limits:
                    db.execute("UPDATE runs SET status='failed', reason=?, finished_at=? WHERE id=?",
                               (f"pipeline {name!r} is not configured in this daemon", now, row["id"]))
                    continue
                if per_pipeline.get(name, 0) >= limits[name]:
                    continue
                if row["grp"] is not None and row["grp"] in busy_groups:
                    continue
                db.execute("UPDATE runs SET status='running', started_at=? WHERE id=? AND status='queued'",
                           (now, row["id"]))
                db.execute("INSERT OR REPLACE INTO leases (run_id, owner, expires_at, heartbeat_at) VALUES (?,?,?,?)",
                           (row["id"], owner, now + lease_seconds, now))
                return Claimed(int(row["id"]), name, json.loads(row["event"]), json.loads(row["vars"]),
                               int(row["attempt"]), row["ref"], row["branch"], row["tag"], row["commit_sha"])
        return None

    def heartbeat(self, owner, run_ids, lease_seconds):
        if not run_ids:
            return set()
        now = time.time()
        marks = ",".join("?" * len(run_ids))
        with self._tx() as db:
            db.execute(f"UPDATE leases SET expires_at=?, heartbeat_at=? WHERE owner=? AND run_id IN ({marks})",
                       (now + lease_seconds, now, owner, *run_ids))
            held = {int(r["run_id"]) for r in db.execute(
                f"SELECT run_id FROM leases WHERE owner=? AND run_id IN ({marks})", (owner, *run_ids))}
            rows = db.execute(f"SELECT id, reason FROM runs WHERE cancel_requested=1 AND id IN ({marks})",
                              tuple(run_ids)).fetchall()
        out = {int(r["id"]): r["reason"] or "cancelled" for r in rows}
        for run_id in set(run_ids) - held:
            out[run_id] = "the lease was lost (no heartbeat in time); the run was recovered elsewhere"
        return out

    def set_lease_pid(self, run_id, owner, pid, pid_start):
        with self._tx() as db:
            db.execute("UPDATE leases SET pid=?, pid_start=? WHERE run_id=? AND owner=?",
                       (pid, pid_start, run_id, owner))

    def leases_of(self, owner):
        return [dict(r) for r in self._read("SELECT run_id, pid, pid_start FROM leases WHERE owner=?", (owner,))]

    def finish(self, run_id, owner, status, exit_code, reason=""):
        assert status in FINAL, status
        now = time.time()
        with self._tx() as db:
            held = db.execute("SELECT 1 FROM leases WHERE run_id=? AND owner=?", (run_id, owner)).fetchone()
            if held is None:
                return False
            db.execute("DELETE FROM leases WHERE run_id=?", (run_id,))
            # A superseded run keeps its "superseded by" reason when nothing more precise is given.
            db.execute("UPDATE runs SET status=?, exit_code=?, finished_at=?, "
                       "reason=CASE WHEN ?='' THEN reason ELSE ? END WHERE id=? AND status='running'",
                       (status, exit_code, now, reason, reason, run_id))
            # Stages the run never ended (killed mid-stage) are closed with the run's status.
            db.execute("UPDATE stages SET status=?, finished_at=? WHERE run_id=? AND status='running'",
                       ("cancelled" if status == "cancelled" else "failed" if status != "success" else "success",
                        now, run_id))
            return True

    def request_cancel(self, run_id, reason):
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                db.execute("UPDATE runs SET status='cancelled', reason=?, finished_at=? WHERE id=?",
                           (reason, now, run_id))
            elif row["status"] == "running":
                db.execute("UPDATE runs SET cancel_requested=1, reason=? WHERE id=?", (reason, run_id))
            return str(row["status"])

    def recover(self, owner, requeue, now=None):
        now = time.time() if now is None else now
        out: list[tuple[int, str]] = []
        with self._tx() as db:
            rows = db.execute(
                "SELECT r.id, r.pipeline, r.attempt, r.cancel_requested, l.owner, l.expires_at FROM runs r "
                "LEFT JOIN leases l ON l.run_id = r.id WHERE r.status='running'").fetchall()
            for row in rows:
                mine = owner is not None and row["owner"] == owner
                expired = row["expires_at"] is None or row["expires_at"] < now
                if not (mine or expired):
                    continue
                who = row["owner"] or "unknown"
                why = ("the daemon that ran it stopped without finishing it (restarted: " + who + ")"
                       if mine else f"lease held by {who} expired (no heartbeat)")
                db.execute("DELETE FROM leases WHERE run_id=?", (row["id"],))
                db.execute("UPDATE stages SET status='interrupted', finished_at=? WHERE run_id=? AND status='running'",
                           (now, row["id"]))
                if row["pipeline"] in requeue and not row["cancel_requested"] and row["attempt"] < 3:
                    db.execute("UPDATE runs SET status='queued', started_at=NULL, attempt=attempt+1, reason=? "
                               "WHERE id=?", ("re-queued: " + why, row["id"]))
                    out.append((int(row["id"]), "queued"))
                else:
                    db.execute("UPDATE runs SET status='interrupted', reason=?, finished_at=? WHERE id=?",
                               ("interrupted: " + why, now, row["id"]))
                    out.append((int(row["id"]), "interrupted"))
        return out

    # -- what a run reports ------------------------------------------------------------------

    def stage_event(self, run_id, stage, status, *, duration=None, error=None, outputs=None):
        now = time.time()
        with self._tx() as db:
            if status == "running":
                db.execute("INSERT OR REPLACE INTO stages (run_id, name, status, started_at) VALUES (?,?,?,?)",
                           (run_id, stage, status, now))
            else:
                db.execute("INSERT INTO stages (run_id, name, status, started_at) VALUES (?,?,?,?) "
                           "ON CONFLICT(run_id, name) DO NOTHING", (run_id, stage, status, now))
                db.execute("UPDATE stages SET status=?, finished_at=?, duration=?, error=?, outputs=? "
                           "WHERE run_id=? AND name=?",
                           (status, now, duration, error, json.dumps(outputs) if outputs is not None else None,
                            run_id, stage))

    def append_logs(self, run_id, lines):
        if not lines:
            return
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO log_lines (run_id, seq, stage, time, line) VALUES (?,?,?,?,?)",
                           [(run_id, seq, stage, t, text) for seq, stage, t, text in lines])

    # -- reading ---------------------------------------------------------------------------

    def get_run(self, run_id):
        rows = self._read(f"SELECT {_RUN_COLS} FROM runs WHERE id=?", (run_id,))
        return _run_dict(rows[0]) if rows else None

    def run_event(self, run_id: int) -> dict:
        rows = self._read("SELECT event FROM runs WHERE id=?", (run_id,))
        return json.loads(rows[0]["event"]) if rows else {}

    def list_runs(self, *, pipeline=None, status=None, branch=None, trigger=None, limit=50, before_id=None):
        where, args = [], []
        for col, val in (("pipeline", pipeline), ("status", status), ("branch", branch), ("trigger", trigger)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        if before_id is not None:
            where.append("id<?")
            args.append(before_id)
        sql = f"SELECT {_RUN_COLS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(1, min(int(limit), 1000)))
        return [_run_dict(r) for r in self._read(sql, args)]

    def count_runs(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._read("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")}

    def stages(self, run_id):
        out = []
        for r in self._read("SELECT name, status, started_at, finished_at, duration, error, outputs FROM stages "
                            "WHERE run_id=? ORDER BY started_at, rowid", (run_id,)):
            d = dict(r)
            d["outputs"] = json.loads(d["outputs"]) if d["outputs"] else None
            out.append(d)
        return out

    def logs(self, run_id, stage=None, after=0, limit=1000):
        sql = "SELECT seq, stage, time, line FROM log_lines WHERE run_id=? AND seq>?"
        args: list = [run_id, after]
        if stage is not None:
            sql += " AND stage=?"
            args.append(stage)
        sql += " ORDER BY seq LIMIT ?"
        args.append(max(1, min(int(limit), 10000)))
        return [dict(r) for r in self._read(sql, args)]

    def max_log_seq(self, run_id: int) -> int:
        rows = self._read("SELECT COALESCE(MAX(seq), 0) AS m FROM log_lines WHERE run_id=?", (run_id,))
        return int(rows[0]["m"])

    def deliveries(self, limit=50, provider=None):
        sql = ("SELECT id, provider, delivery_id, event, received_at, status_code, outcome, reason, run_ids, remote "
               "FROM deliveries")
        args: list = []
        if provider:
            sql += " WHERE provider=?"
            args.append(provider)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(1, min(int(limit), 5000)))
        out = []
        for r in self._read(sql, args):
            d = dict(r)
            d["run_ids"] = json.loads(d["run_ids"])
            out.append(d)
        return out

    def running_leases(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT run_id, owner, expires_at, heartbeat_at FROM leases")]

    def poll_state(self, pipeline):
        rows = self._read("SELECT refs FROM poll_state WHERE pipeline=?", (pipeline,))
        return (json.loads(rows[0]["refs"]) or {}) if rows else {}

    def has_poll_state(self, pipeline: str) -> bool:
        """True once a poll of this pipeline has succeeded (even if it found no refs)."""
        return bool(self._read("SELECT 1 FROM poll_state WHERE pipeline=? AND refs != 'null'", (pipeline,)))

    def set_poll_state(self, pipeline, refs, error=""):
        with self._tx() as db:
            if error:
                db.execute("INSERT INTO poll_state (pipeline, refs, checked_at, error) VALUES (?,?,?,?) "
                           "ON CONFLICT(pipeline) DO UPDATE SET checked_at=excluded.checked_at, error=excluded.error",
                           (pipeline, "null", time.time(), error))
            else:
                db.execute("INSERT INTO poll_state (pipeline, refs, checked_at, error) VALUES (?,?,?,'') "
                           "ON CONFLICT(pipeline) DO UPDATE SET refs=excluded.refs, checked_at=excluded.checked_at,"
                           " error=''", (pipeline, json.dumps(refs), time.time()))

    def prune(self, older_than, keep_last):
        removed: list[int] = []
        marks = ",".join("?" * len(FINAL))
        with self._tx() as db:
            for (name,) in db.execute("SELECT DISTINCT pipeline FROM runs").fetchall():
                keep = [r[0] for r in db.execute("SELECT id FROM runs WHERE pipeline=? ORDER BY id DESC LIMIT ?",
                                                 (name, keep_last)).fetchall()]
                if keep_last and len(keep) < keep_last:
                    continue  # fewer runs than keep_last: all are kept
                floor = min(keep) if keep_last else 1 << 62
                victims = [r[0] for r in db.execute(
                    f"SELECT id FROM runs WHERE pipeline=? AND status IN ({marks}) AND created_at<? AND id<? "
                    "LIMIT 5000", (name, *FINAL, older_than, floor)).fetchall()]
                for i in range(0, len(victims), 500):
                    chunk = victims[i:i + 500]
                    m = ",".join("?" * len(chunk))
                    db.execute(f"DELETE FROM log_lines WHERE run_id IN ({m})", chunk)
                    db.execute(f"DELETE FROM stages WHERE run_id IN ({m})", chunk)
                    db.execute(f"DELETE FROM runs WHERE id IN ({m})", chunk)
                removed += victims
            db.execute("DELETE FROM deliveries WHERE received_at<?", (older_than,))
        return removed


def open_store(url_or_path: str | Path) -> Store:
    """sqlite:///path or a plain path. A postgresql:// URL is where a shared-queue implementation
    would plug in; it is not written yet, and says so."""
    s = str(url_or_path)
    if s.startswith(("postgres://", "postgresql://")):
        raise NotImplementedError("a PostgreSQL store is not implemented yet; use a sqlite path")
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///"):]
    return SqliteStore(s)
