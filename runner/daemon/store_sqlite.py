"""The run store in one SQLite file (WAL): the default, for daemons on one host.

Several daemons on one host may share the file (each with its own data directory); a lock file
beside the database chooses the one that runs poll and cron.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from runner.daemon import migrations
from runner.daemon.store import StoreError
from runner.daemon.store_sql import SqlStore, Tx


class SqliteStore(SqlStore):
    """One connection guarded by a lock (SQLite serialises writers anyway).

    synchronous=NORMAL: a commit survives the daemon being killed (SIGKILL); only an OS crash or
    power loss can lose the last few commits."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, checkpoint_interval: float = 1.0):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock_ = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._wal()
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._leader_fd: int | None = None
        self._migrate(migrations.SQLITE, real="REAL")
        # Checkpoints (the only fsyncs with synchronous=NORMAL) run on their own connection and
        # thread, not inside a webhook's commit: that keeps the acceptance latency flat.
        self._checkpoint_stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if self.path != ":memory:" and checkpoint_interval:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_interval,),
                                                  name="sqlite-checkpoint", daemon=True)
            self._checkpointer.start()

    def _wal(self, patience: float = 30.0) -> None:
        """Switch to WAL. Switching takes the file's exclusive lock without waiting on the busy
        timeout, so daemons opening a new file at once get "database is locked": try again."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreError(f"{self.path}: {exc}") from exc
                time.sleep(0.02)

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
    def _tx(self) -> Iterator[Tx]:
        with self._lock_:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(str(exc)) from exc
            try:
                yield Tx(self._db)
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
        with self._lock_:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _now(self, db: Tx) -> float:
        return time.time()  # one host: its clock is every daemon's clock

    def _clock(self, db: Tx) -> tuple[float, float]:
        return time.time(), 0.0  # a file does not restart: silence counts from the last word

    # -- leadership: an flock on a file beside the database (one host) --------------------------

    def try_lead(self, owner: str, silent_after: float = 30.0) -> bool:
        # An flock cannot expire: a hung leader on one host keeps it (documented in docs/daemon.md).
        if self.path == ":memory:":
            return True
        if self._leader_fd is not None:
            return True
        fd = os.open(self.path + ".leader", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, owner.encode() + b"\n")
        self._leader_fd = fd
        return True

    def release_lead(self) -> None:
        if self._leader_fd is not None:
            os.close(self._leader_fd)  # closing drops the flock
            self._leader_fd = None

    def close(self) -> None:
        self.release_lead()
        self._checkpoint_stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
        with self._lock_:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
