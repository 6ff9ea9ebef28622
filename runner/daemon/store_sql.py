"""The queries of the run store, shared by SQLite and PostgreSQL.

A backend gives `_tx()` (one transaction, yielding a `Tx`), `_read()` and five dialect points:
`_now` (the time rows are stamped with: the database server's, for PostgreSQL, so that daemons
on several hosts agree), `_clock` (the server's clock read afresh, and when the server started:
what leases are measured by, see leases.py), `_lock` (serialise writers that touch one key: an advisory transaction
lock on PostgreSQL; a no-op on SQLite, whose BEGIN IMMEDIATE already lets one writer in at a
time), `_skip_locked` (FOR UPDATE SKIP LOCKED) and `_notify` (wake every daemon's dispatcher).
SQL is written once, with `?` placeholders and constructs both backends know (ON CONFLICT,
RETURNING, IS NOT DISTINCT FROM).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager

from runner.daemon import leases, migrations
from runner.daemon.store import FINAL, Accepted, Claimed, DeliveryAbout, NewRun, Store, StoreError
from runner.proc import start_time

_RUN_COLS = ("id, pipeline, status, reason, trigger, provider, ref, branch, tag, commit_sha, delivery, "
             "grp, attempt, cancel_requested, exit_code, created_at, started_at, finished_at, daemon, "
             "retry_of, withhold_secrets, skip_stages, destination")

# A run's commit already ran (and is not run again for a new delivery) while one of its runs is
# in one of these; a poll, which sees each commit once, counts every run.
_RAN = ("queued", "running", "success")

# Lock keys. Claims and recoveries share one: the per-pipeline limits and the concurrency groups
# are counted over every daemon, so two claims must not count at once.
QUEUE_LOCK = "queue"


def _about(about: DeliveryAbout) -> tuple[str, str, str]:
    """A delivery's repository, ref and action columns (bounded: they come from a payload)."""
    return about.repository[:500], about.ref[:500], about.action[:100]


def run_dict(row) -> dict:
    d = dict(row)
    d["commit"] = d.pop("commit_sha")
    d["group"] = d.pop("grp")
    d["cancel_requested"] = bool(d["cancel_requested"])
    d["withhold_secrets"] = bool(d.get("withhold_secrets"))
    d["skip_stages"] = json.loads(d.get("skip_stages") or "[]")
    return d


class Tx:
    """One open transaction: `?` placeholders, rows readable by column name."""

    def __init__(self, conn, placeholder: str = "?"):
        self.conn = conn
        self._ph = placeholder

    def _sql(self, sql: str) -> str:
        return sql if self._ph == "?" else sql.replace("?", self._ph)

    def q(self, sql: str, args: Sequence = ()):
        return self.conn.execute(self._sql(sql), tuple(args))

    def one(self, sql: str, args: Sequence = ()):
        return self.q(sql, args).fetchone()

    def all(self, sql: str, args: Sequence = ()) -> list:
        return self.q(sql, args).fetchall()

    def many(self, sql: str, rows: Sequence[Sequence]) -> None:
        if self._ph == "?":
            self.conn.executemany(sql, rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqlStore(Store):
    """Everything but the connection. Subclasses: SqliteStore, PostgresStore."""

    dialect = "sqlite"

    # -- what a backend provides ---------------------------------------------------------------

    def _tx(self) -> AbstractContextManager[Tx]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, sql: str, args: Sequence = ()) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _now(self, db: Tx) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _clock(self, db: Tx) -> tuple[float, float]:  # pragma: no cover - abstract
        """(now, when the database started) by the database's own clock, read now: what lease
        times are measured by."""
        raise NotImplementedError

    def _lock(self, db: Tx, *keys: str) -> None:
        """Hold these keys until the transaction ends (always taken in sorted order)."""

    def _skip_locked(self) -> str:
        return ""

    def _notify(self, db: Tx) -> None:
        """Tell every daemon's dispatcher, at commit, that the queue changed."""

    # -- schema --------------------------------------------------------------------------------

    def _migrate(self, steps: Sequence[migrations.Migration], real: str) -> None:
        with self._tx() as db:
            # Locked before the table is made: two daemons starting at once would otherwise race
            # even on CREATE TABLE IF NOT EXISTS (PostgreSQL's catalog has its own unique keys).
            self._lock(db, "migrations")
            db.q(migrations.TABLE.format(real=real))
            row = db.one("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            have = int(row["v"])
            if have > migrations.LATEST:
                raise StoreError(f"the database's schema is version {have}, newer than this runner knows "
                                 f"({migrations.LATEST}): upgrade runner on this machine")
            for step in steps:
                if step.version <= have:
                    continue
                for statement in step.statements:
                    db.q(statement)
                db.q("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)",
                     (step.version, step.name, self._now(db)))

    def schema_version(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")[0]["v"])

    # -- queueing -----------------------------------------------------------------------------

    def _insert_runs(self, db: Tx, runs: Sequence[NewRun], now: float,
                     skipped: list[str] | None = None) -> tuple[list[int], list[int]]:
        # Two runs queued in one group must each see the other to supersede it. Two writers of the
        # same commit (a webhook and a poll, one delivery sent to two daemons) collide in the
        # unique index on once_key instead: distinct pushes are queued in parallel.
        self._lock(db, *{f"group:{r.group}" for r in runs if r.group})
        ids: list[int] = []
        cancel_running: list[int] = []
        for r in runs:
            once_key = f"{r.pipeline}\n{r.ref or ''}\n{r.commit}" if r.once and r.commit else None
            if once_key and r.trigger == "poll":
                # A poll sees each commit once, when the ref moves: it never runs one any run had.
                seen = db.one("SELECT id, status FROM runs WHERE pipeline=? AND commit_sha=? AND ref IS NOT "
                              "DISTINCT FROM ? ORDER BY id LIMIT 1", (r.pipeline, r.commit, r.ref))
                if seen:
                    self._skipped(skipped, r, seen)
                    continue
            row = db.one(
                "INSERT INTO runs (pipeline, status, trigger, provider, ref, branch, tag, commit_sha, delivery,"
                " grp, cancel_in_progress, event, vars, created_at, withhold_secrets, skip_stages, retry_of, once_key,"
                " destination) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (once_key) WHERE "
                f"status IN ({', '.join(repr(x) for x in _RAN)}) DO NOTHING RETURNING id",
                (r.pipeline, "queued", r.trigger, r.provider, r.ref, r.branch, r.tag, r.commit, r.delivery,
                 r.group, int(r.cancel_in_progress), json.dumps(r.event), json.dumps(r.vars), now,
                 int(r.withhold_secrets), json.dumps(list(r.skip_stages)), r.retry_of, once_key,
                 r.destination))
            if row is None:
                seen = db.one(f"SELECT id, status FROM runs WHERE once_key=? AND status IN ({_marks(len(_RAN))})",
                              (once_key, *_RAN))
                self._skipped(skipped, r, seen)
                continue
            new_id = int(row["id"])
            ids.append(new_id)
            if r.note and skipped is not None:
                skipped.append(r.note)
            if r.group is None:
                continue
            why = f"superseded by run {new_id}"
            db.q("UPDATE runs SET status='cancelled', reason=?, finished_at=? "
                 "WHERE grp=? AND status='queued' AND id<?", (why, now, r.group, new_id))
            if r.cancel_in_progress:
                for old in db.all("SELECT id FROM runs WHERE grp=? AND status='running' AND id<? "
                                  "AND cancel_requested=0", (r.group, new_id)):
                    db.q("UPDATE runs SET cancel_requested=1, reason=? WHERE id=?", (why, old["id"]))
                    cancel_running.append(int(old["id"]))
        if ids:
            self._notify(db)
        return ids, cancel_running

    @staticmethod
    def _skipped(skipped: list[str] | None, r: NewRun, seen) -> None:
        if skipped is not None:
            what = f"run {seen['id']} ({seen['status']})" if seen else "another run"
            skipped.append(f"{r.pipeline}: commit {r.commit[:12]} of {r.ref} already ran as {what}")

    def _again(self, db: Tx, run_id: int) -> NewRun | None:
        """A final run as a new one: what `retry` and a redelivery queue."""
        row = db.one("SELECT pipeline, status, trigger, provider, ref, branch, tag, commit_sha, grp, "
                     "cancel_in_progress, event, vars, withhold_secrets, skip_stages, destination FROM runs WHERE id=?",
                     (run_id,))
        if row is None:
            return None
        if row["status"] not in FINAL:
            raise StoreError(f"run {run_id} is {row['status']}: only a run that ended can be run again")
        # A rollback run again is a rollback (the worker runs `runner rollback` for that trigger,
        # and `runner exec` could not read its event); retry_of still links it.
        trigger = "rollback" if row["trigger"] == "rollback" else "retry"
        return NewRun(pipeline=row["pipeline"], trigger=trigger, provider=row["provider"], ref=row["ref"],
                      branch=row["branch"], tag=row["tag"], commit=row["commit_sha"],
                      event=json.loads(row["event"]), vars=json.loads(row["vars"]), group=row["grp"],
                      cancel_in_progress=bool(row["cancel_in_progress"]),
                      withhold_secrets=bool(row["withhold_secrets"]),
                      skip_stages=tuple(json.loads(row["skip_stages"] or "[]")), retry_of=run_id,
                      destination=row["destination"])

    def retry(self, run_id):
        with self._tx() as db:
            again = self._again(db, run_id)
            if again is None:
                return None
            ids, _ = self._insert_runs(db, [again], self._now(db))
            return ids[0]

    def accept_delivery(self, provider, delivery_id, event, runs, reasons, remote="", about=DeliveryAbout()):
        key = f"{provider}:{delivery_id}" if delivery_id else None
        with self._tx() as db:
            now = self._now(db)
            # The delivery's row is written first: when the same delivery reaches two daemons at
            # once, the unique dedup key makes the second insert wait for the first transaction
            # and then find the row, so one of them queues the runs and the other says duplicate.
            row = db.one(
                "INSERT INTO deliveries (provider, delivery_id, event, received_at, status_code, outcome, reason,"
                " remote, dedup_key, repository, ref, action) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
                (provider, delivery_id, event, now, 0, "pending", "", remote, key, *_about(about)))
            if row is None:
                return self._duplicate(db, provider, delivery_id, event, key, remote, now, about)
            row_id = int(row["id"])
            why = list(reasons)
            ids, cancel_running = self._insert_runs(db, runs, now, why)
            outcome, status_code = ("queued", 202) if ids else ("ignored", 200)
            if ids:
                why.append("queued as run " + ", ".join(map(str, ids)))
            reason = "; ".join(why)
            db.q("UPDATE deliveries SET status_code=?, outcome=?, reason=?, run_ids=? WHERE id=?",
                 (status_code, outcome, reason, json.dumps(ids), row_id))
            return Accepted(row_id, False, tuple(ids), tuple(cancel_running), outcome, reason, status_code)

    def _duplicate(self, db: Tx, provider, delivery_id, event, key, remote, now, about) -> Accepted:
        first = db.one("SELECT id, run_ids FROM deliveries WHERE dedup_key=?", (key,))
        original = tuple(json.loads(first["run_ids"]))
        ended = db.all(f"SELECT id, status FROM runs WHERE id IN ({_marks(len(original))})", original) \
            if original else []
        # GitHub's and Gitea's "Redeliver" sends the same delivery id again: once every run the
        # first delivery queued ended without success, that is a request to run them again.
        if ended and len(ended) == len(original) and all(r["status"] in FINAL and r["status"] != "success"
                                                         for r in ended):
            again = [a for a in (self._again(db, int(r["id"])) for r in ended) if a is not None]
            ids, cancel_running = self._insert_runs(db, again, now)
            reason = (f"redelivery of #{first['id']}, whose runs ended without success "
                      "(" + ", ".join(f"{r['id']} {r['status']}" for r in ended) + "): queued again as run "
                      + ", ".join(map(str, ids)))
            row = db.one("INSERT INTO deliveries (provider, delivery_id, event, received_at, status_code, outcome,"
                         " reason, run_ids, remote, repository, ref, action) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                         " RETURNING id",
                         (provider, delivery_id, event, now, 202, "queued", reason, json.dumps(ids), remote,
                          *_about(about)))
            return Accepted(int(row["id"]), False, tuple(ids), tuple(cancel_running), "queued", reason, 202)
        row = db.one("INSERT INTO deliveries (provider, delivery_id, event, received_at, status_code, outcome,"
                     " reason, run_ids, remote, repository, ref, action) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                     " RETURNING id",
                     (provider, delivery_id, event, now, 200, "duplicate", f"duplicate of delivery #{first['id']}",
                      json.dumps(list(original)), remote, *_about(about)))
        return Accepted(int(row["id"]), True, original, (), "duplicate", f"duplicate of delivery #{first['id']}")

    def record_delivery(self, provider, delivery_id, event, outcome, reason, status_code, remote="",
                        about=DeliveryAbout()):
        with self._tx() as db:
            row = db.one(
                "INSERT INTO deliveries (provider, delivery_id, event, received_at, status_code, outcome, reason,"
                " remote, repository, ref, action) VALUES (?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (provider, delivery_id, event, self._now(db), status_code, outcome, reason, remote, *_about(about)))
            return int(row["id"])

    def enqueue(self, runs):
        with self._tx() as db:
            return self._insert_runs(db, runs, self._now(db))

    def claim(self, owner, limits, lease_seconds):
        if not limits:
            return None
        with self._tx() as db:
            self._lock(db, QUEUE_LOCK)
            now = self._now(db)
            per_pipeline: dict[str, int] = {}
            busy_groups = set()
            for row in db.all("SELECT pipeline, grp FROM runs WHERE status='running'"):
                per_pipeline[row["pipeline"]] = per_pipeline.get(row["pipeline"], 0) + 1
                if row["grp"] is not None:
                    busy_groups.add(row["grp"])
            # Only pipelines this daemon serves and that are under their limit, and idle groups,
            # filtered in SQL: a long queue of one pipeline must not hide another's runnable run.
            # A pipeline this daemon does not serve stays queued for one that does.
            ready = sorted(n for n, limit in limits.items() if per_pipeline.get(n, 0) < limit)
            if not ready:
                return None
            sql = ("SELECT id, pipeline, trigger, grp, event, vars, attempt, ref, branch, tag, commit_sha, "
                   "withhold_secrets, skip_stages, created_at, destination FROM runs WHERE status='queued' AND pipeline IN "
                   f"({_marks(len(ready))})")
            args: list = list(ready)
            if busy_groups:
                sql += f" AND (grp IS NULL OR grp NOT IN ({_marks(len(busy_groups))}))"
                args += sorted(busy_groups)
            for row in db.all(sql + " ORDER BY id LIMIT 200" + self._skip_locked(), args):
                name = row["pipeline"]
                if per_pipeline.get(name, 0) >= limits[name]:
                    continue
                if row["grp"] is not None and row["grp"] in busy_groups:
                    continue
                db.q("UPDATE runs SET status='running', started_at=?, daemon=? WHERE id=? AND status='queued'",
                     (now, owner, row["id"]))
                db.q("INSERT INTO leases (run_id, owner, expires_at, heartbeat_at) VALUES (?,?,?,?) "
                     "ON CONFLICT (run_id) DO UPDATE SET owner=excluded.owner, expires_at=excluded.expires_at, "
                     "heartbeat_at=excluded.heartbeat_at, pid=NULL, pid_start=NULL",
                     (row["id"], owner, now + lease_seconds, now))
                return Claimed(int(row["id"]), name, json.loads(row["event"]), json.loads(row["vars"]),
                               int(row["attempt"]), row["ref"], row["branch"], row["tag"], row["commit_sha"],
                               bool(row["withhold_secrets"]), tuple(json.loads(row["skip_stages"] or "[]")),
                               max(0.0, now - float(row["created_at"])), trigger=row["trigger"],
                               destination=row["destination"])
        return None

    def heartbeat(self, owner, run_ids, lease_seconds):
        if not run_ids:
            return {}
        marks = _marks(len(run_ids))
        with self._tx() as db:
            now, _ = self._clock(db)
            db.q(f"UPDATE leases SET expires_at=?, heartbeat_at=? WHERE owner=? AND run_id IN ({marks})",
                 (now + lease_seconds, now, owner, *run_ids))
            held = {int(r["run_id"]) for r in db.all(
                f"SELECT run_id FROM leases WHERE owner=? AND run_id IN ({marks})", (owner, *run_ids))}
            # Runs another daemon marked interrupted while this one was silent, and that nobody
            # took since (the lease is still ours): this daemon is back and still runs them.
            back = [int(r["id"]) for r in db.all(
                f"SELECT id FROM runs WHERE status='interrupted' AND id IN ({marks})", tuple(run_ids))
                if int(r["id"]) in held]
            if back:
                m = _marks(len(back))
                db.q(f"UPDATE runs SET status='running', finished_at=NULL, reason='' WHERE id IN ({m})", back)
                db.q(f"UPDATE stages SET status='running', finished_at=NULL WHERE status='interrupted' "
                     f"AND run_id IN ({m})", back)
            rows = db.all(f"SELECT id, reason FROM runs WHERE cancel_requested=1 AND id IN ({marks})", tuple(run_ids))
        out = {int(r["id"]): r["reason"] or "cancelled" for r in rows}
        for run_id in set(run_ids) - held:
            out[run_id] = "the lease was lost (no heartbeat in time); the run was recovered elsewhere"
        return out

    def set_lease_pid(self, run_id, owner, pid, pid_start):
        with self._tx() as db:
            db.q("UPDATE leases SET pid=?, pid_start=? WHERE run_id=? AND owner=?", (pid, pid_start, run_id, owner))

    def leases_of(self, owner):
        return [dict(r) for r in self._read("SELECT run_id, pid, pid_start FROM leases WHERE owner=?", (owner,))]

    def finish(self, run_id, owner, status, exit_code, reason=""):
        assert status in FINAL, status
        with self._tx() as db:
            now = self._now(db)
            if db.one("SELECT 1 AS held FROM leases WHERE run_id=? AND owner=?", (run_id, owner)) is None:
                return False
            db.q("DELETE FROM leases WHERE run_id=?", (run_id,))
            # The lease is still ours: the run is running, or another daemon marked it
            # interrupted while this one could not reach the store (expire); either way this is
            # how it ended. A superseded run keeps its "superseded by" reason when nothing more
            # precise is given; an interrupted one drops the expiry's.
            db.q("UPDATE runs SET status=?, exit_code=?, finished_at=?, "
                 "reason=CASE WHEN ?='' AND status='running' THEN reason ELSE ? END "
                 "WHERE id=? AND status IN ('running', 'interrupted')",
                 (status, exit_code, now, reason, reason, run_id))
            # Stages the run never ended (killed mid-stage) are closed with the run's status.
            db.q("UPDATE stages SET status=?, finished_at=? WHERE run_id=? AND status IN ('running', 'interrupted')",
                 ("cancelled" if status == "cancelled" else "failed" if status != "success" else "success",
                  now, run_id))
            self._notify(db)  # a slot and maybe a group are free: another daemon may claim
            return True

    def request_cancel(self, run_id, reason):
        with self._tx() as db:
            now = self._now(db)
            row = db.one("SELECT status FROM runs WHERE id=?", (run_id,))
            if row is None:
                return None
            if row["status"] == "queued":
                db.q("UPDATE runs SET status='cancelled', reason=?, finished_at=? WHERE id=?", (reason, now, run_id))
            elif row["status"] == "running":
                db.q("UPDATE runs SET cancel_requested=1, reason=? WHERE id=?", (reason, run_id))
            return str(row["status"])

    def recover(self, owner, requeue):
        out: list[tuple[int, str]] = []
        with self._tx() as db:
            self._lock(db, QUEUE_LOCK)  # two daemons recovering one run would count its attempt twice
            now = self._now(db)
            rows = db.all("SELECT r.id, r.pipeline, r.status, r.attempt, r.cancel_requested FROM leases l "
                          "JOIN runs r ON r.id = l.run_id WHERE l.owner=?", (owner,))
            why = f"the daemon that ran it stopped without finishing it (restarted: {owner})"
            for row in rows:
                db.q("DELETE FROM leases WHERE run_id=?", (row["id"],))
                if row["status"] != "running":
                    continue  # marked interrupted by another daemon's expiry: it stays so
                # Its process was stopped before this (service.Daemon.start): it is known gone.
                st = leases.fate(float("inf"), 0.0, True, row["pipeline"] in requeue,
                                 bool(row["cancel_requested"]), int(row["attempt"]))
                self._end_lease(db, int(row["id"]), st or "interrupted", why, now)
                out.append((int(row["id"]), st or "interrupted"))
            if out:
                self._notify(db)
        return out

    def expire(self, owner, requeue, lease_seconds, gone):
        out: list[tuple[int, str]] = []
        with self._tx() as db:
            self._lock(db, QUEUE_LOCK)
            now, started = self._clock(db)
            rows = db.all(
                "SELECT r.id, r.pipeline, r.attempt, r.cancel_requested, r.daemon, l.owner, l.expires_at, "
                "l.heartbeat_at, l.pid, l.pid_start, d.seen_at, d.pid AS daemon_pid, "
                "d.pid_start AS daemon_pid_start FROM runs r LEFT JOIN leases l ON l.run_id = r.id "
                "LEFT JOIN daemons d ON d.owner = l.owner WHERE r.status='running'")
            for row in rows:
                if row["owner"] == owner:
                    continue  # this daemon's own runs: its heartbeat holds them
                silent = leases.silent_for(now, row["heartbeat_at"], row["seen_at"], started)
                length = (row["expires_at"] - row["heartbeat_at"]) if row["owner"] is not None else lease_seconds
                holder = leases.Holder(row["owner"] or row["daemon"] or "unknown", row["pid"], row["pid_start"],
                                       row["daemon_pid"], row["daemon_pid_start"])
                is_gone = row["owner"] is not None and gone(holder)
                st = leases.fate(silent, length, is_gone, row["pipeline"] in requeue,
                                 bool(row["cancel_requested"]), int(row["attempt"]))
                if st is None:
                    continue
                if row["owner"] is not None and db.one(
                        "UPDATE leases SET expires_at=expires_at WHERE run_id=? AND heartbeat_at=? RETURNING run_id",
                        (row["id"], row["heartbeat_at"])) is None:
                    continue  # its owner spoke meanwhile
                why = f"lease held by {holder.owner} expired (no heartbeat for {silent:.0f} s)"
                if is_gone:
                    why += "; its daemon and the run's process are gone"
                    db.q("DELETE FROM leases WHERE run_id=?", (row["id"],))
                # else the lease stays the owner's: if it comes back it takes the run back
                # (heartbeat) or records how it ended (finish).
                self._end_lease(db, int(row["id"]), st, why, now)
                out.append((int(row["id"]), st))
            if out:
                self._notify(db)
        return out

    @staticmethod
    def _end_lease(db: Tx, run_id: int, status: str, why: str, now: float) -> None:
        """A running run whose lease ended without its result: queued again or interrupted."""
        db.q("UPDATE stages SET status='interrupted', finished_at=? WHERE run_id=? AND status='running'",
             (now, run_id))
        if status == "queued":
            db.q("UPDATE runs SET status='queued', started_at=NULL, daemon=NULL, attempt=attempt+1, "
                 "reason=? WHERE id=?", ("re-queued: " + why, run_id))
        else:
            db.q("UPDATE runs SET status='interrupted', reason=?, finished_at=? WHERE id=?",
                 ("interrupted: " + why, now, run_id))

    # -- what a run reports ------------------------------------------------------------------

    def stage_event(self, run_id, stage, status, *, duration=None, error=None, outputs=None):
        with self._tx() as db:
            now = self._now(db)
            if status == "running":
                db.q("INSERT INTO stages (run_id, name, status, started_at) VALUES (?,?,?,?) "
                     "ON CONFLICT (run_id, name) DO UPDATE SET status=excluded.status, started_at=excluded.started_at,"
                     " finished_at=NULL, duration=NULL, error=NULL, outputs=NULL", (run_id, stage, status, now))
            else:
                db.q("INSERT INTO stages (run_id, name, status, started_at) VALUES (?,?,?,?) "
                     "ON CONFLICT (run_id, name) DO NOTHING", (run_id, stage, status, now))
                db.q("UPDATE stages SET status=?, finished_at=?, duration=?, error=?, outputs=? "
                     "WHERE run_id=? AND name=?",
                     (status, now, duration, error, json.dumps(outputs) if outputs is not None else None,
                      run_id, stage))

    def record_commit(self, run_id, commit):
        with self._tx() as db:
            db.q("UPDATE runs SET commit_sha=? WHERE id=? AND commit_sha IS DISTINCT FROM ?",
                 (commit, run_id, commit))

    def append_logs(self, run_id, lines):
        if not lines:
            return
        with self._tx() as db:
            db.many("INSERT INTO log_lines (run_id, seq, stage, time, line) VALUES (?,?,?,?,?) "
                    "ON CONFLICT (run_id, seq) DO UPDATE SET stage=excluded.stage, time=excluded.time, "
                    "line=excluded.line",
                    [(run_id, seq, stage, t, text) for seq, stage, t, text in lines])

    # -- reading ---------------------------------------------------------------------------

    def get_run(self, run_id):
        rows = self._read(f"SELECT {_RUN_COLS} FROM runs WHERE id=?", (run_id,))
        return run_dict(rows[0]) if rows else None

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
        return [run_dict(r) for r in self._read(sql, args)]

    def daemon_seen(self, owner, pipelines, concurrency):
        # This process signs in: another daemon on this host knows it gone when its pid is
        # (leases.known_gone).
        pid = os.getpid()
        started = start_time(pid)
        with self._tx() as db:
            now, _ = self._clock(db)
            db.q("INSERT INTO daemons (owner, pipelines, concurrency, started_at, seen_at, pid, pid_start) "
                 "VALUES (?,?,?,?,?,?,?) ON CONFLICT (owner) DO UPDATE SET pipelines=excluded.pipelines, "
                 "concurrency=excluded.concurrency, seen_at=excluded.seen_at, pid=excluded.pid, "
                 "pid_start=excluded.pid_start",
                 (owner, json.dumps(sorted(pipelines)), concurrency, now, now, pid,
                  None if started is None else str(started)))

    def daemon_gone(self, owner):
        with self._tx() as db:
            db.q("DELETE FROM daemons WHERE owner=?", (owner,))

    def daemons(self):
        out = []
        for r in self._read("SELECT owner, pipelines, concurrency, started_at, seen_at FROM daemons "
                            "ORDER BY seen_at DESC"):
            d = dict(r)
            d["pipelines"] = json.loads(d["pipelines"])
            out.append(d)
        return out

    def fail_unserved(self, alive_within):
        with self._tx() as db:
            self._lock(db, QUEUE_LOCK)
            now = self._now(db)
            alive = db.all("SELECT owner, pipelines FROM daemons WHERE seen_at >= ?", (now - alive_within,))
            if not alive:
                return []  # nobody is looking: the next daemon to start decides
            served = {name for d in alive for name in json.loads(d["pipelines"])}
            names = sorted(served)
            sql = "SELECT id, pipeline FROM runs WHERE status='queued'"
            if names:
                sql += f" AND pipeline NOT IN ({_marks(len(names))})"
            rows = db.all(sql, names)
            who = ", ".join(sorted(d["owner"].split("@")[0] for d in alive))
            for row in rows:
                db.q("UPDATE runs SET status='failed', reason=?, finished_at=? WHERE id=? AND status='queued'",
                     (f"pipeline {row['pipeline']!r} is configured in none of the daemons running ({who})",
                      now, row["id"]))
            return [int(r["id"]) for r in rows]

    def queue_stats(self):
        with self._tx() as db:
            now = self._now(db)
            by_status = {r["status"]: int(r["n"]) for r in db.all("SELECT status, COUNT(*) AS n FROM runs "
                                                                   "GROUP BY status")}
            oldest = db.one("SELECT MIN(created_at) AS t FROM runs WHERE status='queued'")["t"]
        return {"by_status": by_status, "oldest_queued_age": None if oldest is None else max(0.0, now - oldest)}

    def stages(self, run_id):
        out = []
        for r in self._read("SELECT name, status, started_at, finished_at, duration, error, outputs FROM stages "
                            "WHERE run_id=? ORDER BY started_at, name", (run_id,)):
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
        sql = ("SELECT id, provider, delivery_id, event, received_at, status_code, outcome, reason, run_ids, remote, "
               "repository, ref, action FROM deliveries")
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

    def deploys(self, pipeline=None, limit=20):
        # Walks stages(name, run_id) newest first (migration 5); each row's run by its key.
        sql = ("SELECT s.run_id, r.pipeline, r.trigger, r.status, s.status AS stage_status, r.commit_sha, "
               "r.branch, r.tag, s.started_at, s.finished_at, s.duration, s.error, s.outputs "
               "FROM stages s JOIN runs r ON r.id = s.run_id WHERE s.name = 'deploy'")
        args: list = []
        if pipeline is not None:
            sql += " AND r.pipeline = ?"
            args.append(pipeline)
        sql += " ORDER BY s.run_id DESC LIMIT ?"
        args.append(max(1, min(int(limit), 1000)))
        out = []
        for r in self._read(sql, args):
            d = dict(r)
            d["commit"] = d.pop("commit_sha")
            d["outputs"] = json.loads(d["outputs"]) if d["outputs"] else None
            out.append(d)
        return out

    def poll_error(self, pipeline):
        rows = self._read("SELECT error FROM poll_state WHERE pipeline=?", (pipeline,))
        return str(rows[0]["error"] or "") if rows else ""

    def poll_state(self, pipeline):
        rows = self._read("SELECT refs FROM poll_state WHERE pipeline=?", (pipeline,))
        return (json.loads(rows[0]["refs"]) or {}) if rows else {}

    def has_poll_state(self, pipeline: str) -> bool:
        return bool(self._read("SELECT 1 AS ok FROM poll_state WHERE pipeline=? AND refs != 'null'", (pipeline,)))

    def set_poll_state(self, pipeline, refs, error=""):
        with self._tx() as db:
            now = self._now(db)
            if error:
                db.q("INSERT INTO poll_state (pipeline, refs, checked_at, error) VALUES (?,?,?,?) "
                     "ON CONFLICT (pipeline) DO UPDATE SET checked_at=excluded.checked_at, error=excluded.error",
                     (pipeline, "null", now, error))
            else:
                db.q("INSERT INTO poll_state (pipeline, refs, checked_at, error) VALUES (?,?,?,'') "
                     "ON CONFLICT (pipeline) DO UPDATE SET refs=excluded.refs, checked_at=excluded.checked_at,"
                     " error=''", (pipeline, json.dumps(refs), now))

    def prune(self, older_than, keep_last):
        removed: list[int] = []
        with self._tx() as db:
            for p in db.all("SELECT DISTINCT pipeline FROM runs"):
                name = p["pipeline"]
                keep = [int(r["id"]) for r in db.all("SELECT id FROM runs WHERE pipeline=? ORDER BY id DESC LIMIT ?",
                                                     (name, keep_last))]
                if keep_last and len(keep) < keep_last:
                    continue  # fewer runs than keep_last: all are kept
                floor = min(keep) if keep_last else 1 << 62
                victims = [int(r["id"]) for r in db.all(
                    f"SELECT id FROM runs WHERE pipeline=? AND status IN ({_marks(len(FINAL))}) AND created_at<? "
                    "AND id<? LIMIT 5000", (name, *FINAL, older_than, floor))]
                for i in range(0, len(victims), 500):
                    chunk = victims[i:i + 500]
                    m = _marks(len(chunk))
                    db.q(f"DELETE FROM log_lines WHERE run_id IN ({m})", chunk)
                    db.q(f"DELETE FROM stages WHERE run_id IN ({m})", chunk)
                    db.q(f"DELETE FROM leases WHERE run_id IN ({m})", chunk)
                    db.q(f"DELETE FROM runs WHERE id IN ({m})", chunk)
                removed += victims
            db.q("DELETE FROM deliveries WHERE received_at<?", (older_than,))
        return removed
