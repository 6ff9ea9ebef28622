"""The run store in PostgreSQL (psycopg 3): several daemons, on several hosts, share one queue.

- Claims are serialised cluster-wide by an advisory transaction lock (per-pipeline limits and
  concurrency groups are counted over every daemon) and take the row with FOR UPDATE SKIP LOCKED.
- A delivery is deduplicated by the unique index on its key; the same delivery reaching two daemons
  at once waits on that index and becomes one run.
- Lease times are the database server's clock, so that daemons whose clocks differ agree on when
  a lease expired.
- Whenever a run is queued or a slot is freed, NOTIFY runner_queue; every daemon LISTENs on its own
  connection and wakes its dispatcher at once.
- The leader (the daemon that runs poll and cron) holds a session advisory lock on its own
  connection: when that daemon dies, PostgreSQL drops the connection and the lock with it, and
  another daemon's next try takes it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from runner.daemon import migrations
from runner.daemon.store import StoreError
from runner.daemon.store_sql import SqlStore, Tx

log = logging.getLogger("runner.daemon.store")

CHANNEL = "runner_queue"
# The session advisory lock of the leader: one bigint, "runner" in ASCII, so that it does not
# collide with other applications' locks in a shared database by accident.
LEADER_KEY = 0x72756E6E6572


def redact(url: str) -> str:
    """The URL with its password replaced, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    host, port, db, user = info.get("host", ""), info.get("port", ""), info.get("dbname", ""), info.get("user", "")
    return f"postgresql://{user + '@' if user else ''}{host}{':' + port if port else ''}/{db}"


class PostgresStore(SqlStore):
    dialect = "postgres"

    def __init__(self, url: str, min_connections: int = 2, max_connections: int = 8, connect_timeout: float = 10.0):
        self.url = url
        self.where = redact(url)
        self._closed = threading.Event()
        kwargs = {"row_factory": dict_row, "autocommit": True, "connect_timeout": max(1, int(connect_timeout))}
        try:  # one plain connection first: a wrong URL or password fails at once, with the server's reason
            psycopg.connect(url, **kwargs).close()
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {self.where}: {str(exc).strip()}") from None
        # Set when a call found no working connection (or the pool gave up reconnecting one),
        # cleared by the next call that worked: while it is set, calls wait UNREACHABLE_WAIT
        # for a connection instead of connect_timeout.
        self._unreachable = threading.Event()
        # The pool reconnects with a backoff that doubles up to reconnect_timeout: kept short, a
        # database that is back is reached within seconds (each call that waits starts a new
        # attempt once the last one gave up), not after a minute of backoff.
        self._pool = ConnectionPool(url, min_size=min_connections, max_size=max_connections, kwargs=kwargs,
                                    open=False, timeout=connect_timeout, name="runner-store",
                                    reconnect_timeout=self.RECONNECT_WITHIN,
                                    reconnect_failed=lambda pool: self._unreachable.set())
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreError(f"cannot connect to {self.where} within {connect_timeout:.0f} s") from None
        self._kwargs = kwargs
        self._clock_offset = 0.0
        self._clock_checked = -1e9
        self._leader_conn: psycopg.Connection | None = None
        self._leading = False
        self._leader_mutex = threading.Lock()
        self._listener: threading.Thread | None = None
        self._migrate(migrations.POSTGRES, real="DOUBLE PRECISION")

    # -- connections and transactions ------------------------------------------------------------

    # Seconds a call waits for a connection while the database is known unreachable: a webhook's
    # sender gets its 503 well before it gives up (GitHub waits 10 s), and a heartbeat fails
    # fast and tries again next round.
    UNREACHABLE_WAIT = 2.0
    RECONNECT_WITHIN = 3.0  # the pool's reconnect_timeout (see __init__)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A connection of the pool; StoreError when there is none or it breaks. The message
        names the database (for the log); `public` does not (for HTTP answers)."""
        wait = self.UNREACHABLE_WAIT if self._unreachable.is_set() else None
        conn = None
        try:
            with self._pool.connection(timeout=wait) as conn:
                yield conn
        except PoolTimeout as exc:
            self._unreachable.set()
            raise StoreError(f"{self.where}: {str(exc).strip()}", public="no connection to the database") from exc
        except psycopg.OperationalError as exc:
            if conn is None or conn.broken:
                self._unreachable.set()
            raise StoreError(f"{self.where}: {str(exc).strip()}", public="the database connection failed") from exc
        self._unreachable.clear()

    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        # Pipeline mode: statements whose result is not read (BEGIN, locks, updates, NOTIFY) go
        # out without waiting for the server, so a transaction costs a round trip per result read
        # plus the COMMIT, not one per statement. On a busy host every round trip waits for the
        # server's process to get a CPU; a webhook's acceptance is mostly those waits.
        with self._connection() as conn:
            with conn.pipeline(), conn.transaction():
                yield Tx(conn, "%s")

    def _read(self, sql: str, args: Sequence = ()) -> list[dict]:
        with self._connection() as conn:
            return conn.execute(sql.replace("?", "%s"), tuple(args)).fetchall()

    CLOCK_CHECK_EVERY = 60.0  # seconds between two readings of the server's clock

    def _now(self, db: Tx) -> float:
        """The database server's clock, as this host's clock plus the offset last measured (read
        again every minute): leases compare times written by daemons on several hosts."""
        if time.monotonic() - self._clock_checked > self.CLOCK_CHECK_EVERY:
            before = time.time()
            server = float(db.one("SELECT extract(epoch FROM clock_timestamp())::float8 AS now")["now"])
            self._clock_offset = server - (before + time.time()) / 2
            self._clock_checked = time.monotonic()
        return time.time() + self._clock_offset

    def _clock(self, db: Tx) -> tuple[float, float]:
        row = db.one("SELECT extract(epoch FROM clock_timestamp())::float8 AS now, "
                     "extract(epoch FROM pg_postmaster_start_time())::float8 AS started")
        return float(row["now"]), float(row["started"])

    def _lock(self, db: Tx, *keys: str) -> None:
        # One statement for all keys, taken in one order everywhere (sorted): two writers never
        # wait on each other in a cycle.
        if keys:
            db.q("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM "
                 "(SELECT unnest(?::text[]) AS k ORDER BY 1) AS keys", (["runner:" + k for k in sorted(keys)],))

    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def _notify(self, db: Tx) -> None:
        db.q(f"NOTIFY {CHANNEL}")

    # -- LISTEN/NOTIFY ---------------------------------------------------------------------------

    def listen(self, wake) -> None:
        if self._listener is not None:
            return
        self._listener = threading.Thread(target=self._listen_loop, args=(wake,), name="pg-listen", daemon=True)
        self._listener.start()

    def _listen_loop(self, wake) -> None:
        backoff = 0.5
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, **self._kwargs) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.5
                    wake()  # anything queued while we were not listening
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            wake()
            except psycopg.Error as exc:
                if self._closed.is_set():
                    return
                log.warning("queue notifications lost; reconnecting", extra={"database": self.where,
                                                                             "error": str(exc).strip()})
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    # -- leadership --------------------------------------------------------------------------------

    def try_lead(self, owner: str, silent_after: float = 30.0) -> bool:
        # One session of its own, kept between tries: a daemon that does not lead asks again
        # every few seconds, and a new login each time would cost the server a SCRAM exchange.
        # The server ends that session when it stays silent for `silent_after` seconds
        # (idle_session_timeout): a leader that hangs (SIGSTOP, a stuck host whose connection
        # stays open) loses the lock with it, and when it wakes its next try finds it gone.
        with self._leader_mutex:
            try:
                if self._leader_conn is None or self._leader_conn.closed:
                    self._leading = False
                    self._leader_conn = conn = psycopg.connect(self.url, **self._kwargs)
                    conn.execute("SELECT set_config('application_name', %s, false)", (f"runner {owner}"[:63],))
                    try:
                        conn.execute("SELECT set_config('idle_session_timeout', %s, false)",
                                     (str(max(1000, int(silent_after * 1000))),))
                    except psycopg.errors.UndefinedObject:  # before PostgreSQL 14
                        log.warning("this PostgreSQL has no idle_session_timeout: a leader that hangs "
                                    "keeps the leadership until its connection drops",
                                    extra={"database": self.where})
                if self._leading:
                    self._leader_conn.execute("SELECT 1")  # still connected: the lock is still ours
                    return True
                row = self._leader_conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (LEADER_KEY,)).fetchone()
                self._leading = bool(row["ok"])
                return self._leading
            except psycopg.Error as exc:
                # The connection, and the lock with it, is gone: another daemon may lead now.
                log.warning("leadership: the database session was lost", extra={"database": self.where,
                                                                                "error": str(exc).strip()})
                self._drop_leader_conn()
                return False

    def _drop_leader_conn(self) -> None:
        self._leading = False
        conn, self._leader_conn = self._leader_conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def release_lead(self) -> None:
        with self._leader_mutex:
            self._drop_leader_conn()

    def leader(self) -> str | None:
        """The application name of the connection holding the leader lock (who leads), if any."""
        rows = self._read("SELECT a.application_name AS who FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                          "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND "
                          "(l.classid::bigint << 32 | l.objid::bigint) = ?", (LEADER_KEY,))
        return rows[0]["who"].removeprefix("runner ") if rows else None

    def close(self) -> None:
        self._closed.set()
        self.release_lead()
        if self._listener is not None:
            self._listener.join(timeout=3)
        self._pool.close()
