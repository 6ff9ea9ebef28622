"""A per-app deploy lock on each server: a lease with a holder, a time to live and a heartbeat.

On the server, through SFTP, under a directory `root` the caller chooses (the deployer uses
~/.runner/engines/<docker engine id>/locks, so that the lock follows the docker engine it protects,
even when several engines share one filesystem):
    <root>/<app>/                   created with mkdir, which is atomic: whoever creates it holds it
    <root>/<app>/holder.json        {token, run_id, commit, pipeline, who, ttl}; rewritten by the
                                    heartbeat every ttl/3, so its mtime is the last sign of life
A lease whose holder.json is older than its ttl (by the server's own clock, so clocks of
different runners do not matter) is stale: a run that crashed, hung or lost its connection. The
next run breaks it (and says so). Breaking renames the directory away first (atomic), then checks
it broke the lease it judged stale, and puts it back otherwise.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from runner.errors import Cancelled

from deployers.transport import Connection, TransportError

BASE_DIR = ".runner"


class LockHeld(TransportError):
    """Another run holds the lock and did not let go within the wait."""

    def __init__(self, server: str, info: LockInfo, waited: float):
        self.info = info
        super().__init__(server, (
            f"the deploy lock for {info.app!r} is held by {info.describe()}; waited "
            f"{waited:.0f}s. Wait for that run to finish, or break the lock on purpose "
            f"(runner deploy-lock break) if it is gone."))


@dataclass(frozen=True)
class LockInfo:
    app: str
    holder: dict
    age: float  # seconds since the last heartbeat, by the server's clock
    ttl: float

    @property
    def stale(self) -> bool:
        return self.age > self.ttl

    @property
    def token(self) -> str:
        return str(self.holder.get("token", ""))

    def describe(self) -> str:
        h = self.holder
        parts = [f"run {h.get('run_id', '?')}"]
        if h.get("pipeline"):
            parts.append(f"pipeline {h['pipeline']}")
        if h.get("commit"):
            parts.append(f"commit {str(h['commit'])[:12]}")
        if h.get("who"):
            parts.append(f"by {h['who']}")
        state = "STALE" if self.stale else "alive"
        return (f"{', '.join(parts)} (last heartbeat {self.age:.0f}s ago, ttl {self.ttl:g}s, "
                f"{state})")


def _lock_path(root: str, app: str) -> str:
    return f"{root}/{app}"


def _server_now(conn: Connection, scratch: str) -> float:
    """The server's clock: the mtime of a file written just now."""
    def op(sftp):
        with sftp.open(scratch, "w") as f:
            f.write(b".")
        mtime = sftp.stat(scratch).st_mtime
        sftp.remove(scratch)
        return float(mtime)
    return conn.sftp_do(op)


def inspect(conn: Connection, root: str, app: str) -> LockInfo | None:
    """The current holder of app's lock on this server, or None when it is free."""
    path = _lock_path(root, app)

    def read(sftp):
        try:
            dir_mtime = sftp.stat(path).st_mtime
        except FileNotFoundError:
            return None
        try:
            with sftp.open(f"{path}/holder.json", "r") as f:
                holder = json.loads(f.read().decode() or "{}")
            mtime = sftp.stat(f"{path}/holder.json").st_mtime
        except (FileNotFoundError, ValueError):
            holder, mtime = {}, dir_mtime  # being created right now, or a crash in between
        return holder, float(mtime)

    got = conn.sftp_do(read)
    if got is None:
        return None
    holder, mtime = got
    now = _server_now(conn, f"{root}/.clock-{uuid.uuid4().hex}")
    ttl = float(holder.get("ttl", 60))
    return LockInfo(app=app, holder=holder, age=max(0.0, now - mtime), ttl=ttl)


def list_locks(conn: Connection, root: str) -> list[LockInfo]:
    def names(sftp):
        try:
            return [n for n in sftp.listdir(root) if not n.startswith(".") and ".broken-" not in n]
        except FileNotFoundError:
            return []
    out = []
    for app in sorted(conn.sftp_do(names)):
        info = inspect(conn, root, app)
        if info is not None:
            out.append(info)
    return out


def _remove_tree(sftp, path: str) -> None:
    try:
        for name in sftp.listdir(path):
            try:
                sftp.remove(f"{path}/{name}")
            except FileNotFoundError:
                pass
        sftp.rmdir(path)
    except FileNotFoundError:
        pass


def break_lock(conn: Connection, root: str, app: str,
               expected_token: str | None = None) -> bool:
    """Remove app's lock. With expected_token, only if it is still that lease (True if broken)."""
    path = _lock_path(root, app)
    aside = f"{path}.broken-{uuid.uuid4().hex[:8]}"

    def op(sftp):
        try:
            sftp.posix_rename(path, aside)
        except FileNotFoundError:
            return False
        except OSError:
            try:
                sftp.stat(path)
            except FileNotFoundError:
                return False
            raise
        if expected_token is not None:
            try:
                with sftp.open(f"{aside}/holder.json", "r") as f:
                    token = json.loads(f.read().decode() or "{}").get("token", "")
            except (FileNotFoundError, ValueError):
                token = ""
            if token and token != expected_token:
                # Someone took a fresh lease between our look and our break: give it back.
                try:
                    sftp.posix_rename(aside, path)
                    return False
                except OSError:
                    pass
        _remove_tree(sftp, aside)
        return True

    return bool(conn.sftp_do(op))


class Lease:
    """A held lock. Renewed by a background heartbeat until released."""

    def __init__(self, conn: Connection, root: str, app: str, holder: dict, ttl: float):
        self.conn = conn
        self.root = root
        self.app = app
        self.holder = holder
        self.ttl = ttl
        self.lost = threading.Event()  # set when the heartbeat finds the lease broken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"lock-heartbeat-{conn.label}")

    @property
    def token(self) -> str:
        return self.holder["token"]

    def _write(self) -> None:
        path = _lock_path(self.root, self.app)
        tmp = f"{path}/holder.json.tmp-{self.token[:8]}"
        data = json.dumps(self.holder).encode()

        def op(sftp):
            with sftp.open(tmp, "w") as f:
                f.write(data)
            sftp.posix_rename(tmp, f"{path}/holder.json")
        self.conn.sftp_do(op)

    def _still_mine(self) -> bool:
        def op(sftp):
            try:
                with sftp.open(f"{_lock_path(self.root, self.app)}/holder.json", "r") as f:
                    return json.loads(f.read().decode() or "{}").get("token") == self.token
            except (FileNotFoundError, ValueError):
                return False
        return bool(self.conn.sftp_do(op))

    def _beat(self) -> None:
        interval = max(0.5, self.ttl / 3)
        while not self._stop.wait(interval):
            try:
                if not self._still_mine():
                    self.lost.set()
                    return
                self._write()
            except Exception:
                # Connection trouble: the deploy notices and reconnects, and sets `conn` to the
                # new connection; keep beating through it.
                continue

    def start(self) -> Lease:
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            if self._still_mine():
                break_lock(self.conn, self.root, self.app, expected_token=self.token)
        except Exception:
            pass  # the lease expires by itself after ttl

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_info(run_id: str, pipeline: str = "", commit: str = "", ttl: float = 60) -> dict:
    try:
        who = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
    except Exception:
        who = f"pid {os.getpid()}"
    return {"token": uuid.uuid4().hex, "run_id": run_id, "pipeline": pipeline,
            "commit": commit, "who": who, "ttl": ttl, "acquired": time.time()}


def acquire(conn: Connection, root: str, app: str, holder: dict, *, ttl: float, wait: float,
            cancel: threading.Event | None = None, log: Callable[[str], None] | None = None,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> Lease:
    """Take app's lock on this server, waiting up to `wait` seconds for another holder.
    Breaks a stale lease (saying so). Raises LockHeld, Cancelled, TransportError."""
    holder = dict(holder, ttl=ttl)
    path = _lock_path(root, app)
    conn.ensure_private_dir(root)
    start = clock()
    announced = False
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled while waiting for the deploy lock on {conn.label}")

        def try_mkdir(sftp):
            try:
                sftp.mkdir(path, 0o700)
                return True
            except OSError:
                return False

        if conn.sftp_do(try_mkdir):
            lease = Lease(conn, root, app, holder, ttl)
            lease._write()
            return lease.start()
        info = inspect(conn, root, app)
        if info is None:
            continue  # released between our mkdir and our look
        if info.stale:
            if break_lock(conn, root, app, expected_token=info.token or None):
                if log:
                    log(f"{conn.label}: broke a stale deploy lock held by {info.describe()}")
            continue
        waited = clock() - start
        if waited >= wait:
            raise LockHeld(conn.label, info, waited)
        if log and not announced:
            log(f"{conn.label}: waiting up to {wait:g}s for the deploy lock held by "
                f"{info.describe()}")
            announced = True
        sleep(min(0.5, max(0.05, wait - waited)))
