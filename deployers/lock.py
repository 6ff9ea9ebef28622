"""A per-app deploy lock on each server: a lease with a holder, a time to live and a heartbeat.

On the server, through SFTP, under a directory `root` the caller chooses (the deployer uses
~/.runner/engines/<docker engine id>/locks, so that the lock follows the docker engine it protects,
even when several engines share one filesystem):
    <root>/<app>/                   created with mkdir, which is atomic: whoever creates it holds it
    <root>/<app>/holder.json        {token, run_id, commit, pipeline, who, ttl, acquired, and the
                                    holder's process: host, pid, pid_start, boot_id, pid_ns,
                                    machine_id (deployers.lock_holder)}; rewritten by the
                                    heartbeat every ttl/3, so its mtime is the last sign of life
A lease whose holder.json is older than its ttl (by the server's own clock, so clocks of
different runners do not matter) is stale: a run that crashed, hung or lost its connection. The
next run breaks it (and says so). A lease whose holder is a process of the waiting run's own
host that is gone (killed, crashed; deployers.lock_holder.gone) is taken over at once, without
waiting out the ttl. Breaking renames the directory away first (atomic), then checks it broke
the lease it judged (the same token, or still no holder.json), and puts it back otherwise.

A run waiting for a lock says who holds it (run, pipeline, commit, started by whom and when)
when it starts waiting, when the holder changes, and every WAIT_REPORT seconds; its wait is
bounded (`wait`), after which LockHeld names the holder.

A lease is lost (Lease.check() and Lease.verify() raise LockLost, Lease.lost is set) when:
    - the heartbeat finds another token in holder.json, or no holder.json: another run took it;
    - a heartbeat fails (any error, or no answer before the lease would go stale): a lease that
      cannot be renewed may be broken by another run at any moment, so it counts as lost;
    - more than ttl seconds passed since the last successful renewal, by this process's own
      monotonic clock: a process that was stopped (SIGSTOP, a stalled VM) past its ttl knows
      on resume, before any I/O, that another run may have broken its lease.
The renewal time kept is the moment the renewing SFTP operation started, which is before the
server stamps holder.json: the local count is never behind the server's idea of the lease's age.
Lost is final: the deploy stops on that server and commits nothing more there.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from runner.errors import Cancelled

from deployers.lock_holder import describe_holder, gone, holder_info
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

BASE_DIR = ".runner"
WAIT_REPORT = 15.0  # seconds between "still waiting" lines
__all__ = ["LockHeld", "LockLost", "LockInfo", "Lease", "acquire", "break_lock", "inspect",
           "describe_holder", "holder_info"]


if hasattr(time, "CLOCK_BOOTTIME"):
    def _steady() -> float:
        """Monotonic seconds that also count time the machine spent suspended (Linux
        BOOTTIME): a runner host waking from suspend past the ttl knows its leases may be gone."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)
else:
    _steady = time.monotonic


class LockHeld(TransportError):
    """Another run holds the lock and did not let go within the wait."""

    def __init__(self, server: str, info: LockInfo, waited: float):
        self.info = info
        super().__init__(server, (
            f"the deploy lock for {info.app!r} is held by {info.describe()}; waited "
            f"{waited:.0f}s. Wait for that run to finish, or break the lock on purpose "
            f"(runner deploy-lock break) if it is gone."))


class LockLost(TransportError):
    """This run's lease on app's deploy lock on `server` is gone: another run took it
    (`holder`: that run's holder.json when it could be read), or it could not be renewed
    (`failure` says why), so another run may take it at any moment. Nothing more may be done
    on that server by this run."""

    def __init__(self, server: str, app: str, *, holder: dict | None = None,
                 failure: str | None = None, action: str = "renewed"):
        self.app = app
        self.holder = holder
        self.failure = failure
        if failure is not None:
            what = f"it could not be {action} ({failure}), so another run may take it"
        elif holder:
            what = f"another run took it: {describe_holder(holder)}"
        else:
            what = "another run broke it (who holds it now could not be read)"
        super().__init__(server, f"the deploy lock for {app!r} was lost: {what}. Nothing more "
                                 f"is done on {server} by this run.")


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
    def gone(self) -> str | None:
        """Why the holder's process is surely gone, judged from this host; None otherwise."""
        return gone(self.holder)

    @property
    def token(self) -> str:
        return str(self.holder.get("token", ""))

    def describe(self) -> str:
        dead = self.gone
        state = "STALE" if self.stale else f"abandoned: {dead}" if dead else "alive"
        return (f"{describe_holder(self.holder)} (last heartbeat {self.age:.0f}s ago, "
                f"ttl {self.ttl:g}s, {state})")


def _lock_path(root: str, app: str) -> str:
    return f"{root}/{app}"


def _read_holder(sftp, path: str) -> dict | None:
    """The lock directory's holder.json; None when there is none (or it is not one)."""
    try:
        with sftp.open(f"{path}/holder.json", "r") as f:
            holder = json.loads(f.read().decode() or "{}")
    except (FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class _Stalled(Exception):
    pass


class _StepFailed(Exception):
    """An SFTP operation of the heartbeat failed; the message says which and why."""


def _bounded(fn: Callable[[], object], timeout: float, name: str,
             stop: threading.Event | None = None):
    """fn() in a thread, waiting at most `timeout` seconds (less if `stop` is set): its result,
    or its exception, or _Stalled. A stalled fn is left to finish (or fail) on its own: SFTP
    has no timeout of its own, and a server that stopped answering must not hang the run."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True, name=name)
    t.start()
    end = time.monotonic() + timeout
    while t.is_alive():
        left = end - time.monotonic()
        if left <= 0 or (stop is not None and stop.is_set()):
            raise _Stalled()
        t.join(min(left, 0.1) if stop is not None else left)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _why(exc: BaseException) -> str:
    if isinstance(exc, TransportError):
        return exc.reason
    if isinstance(exc, _StepFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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
    """Remove app's lock (True if broken). With expected_token, only if it is still that lease
    ("": a lock directory still without holder.json)."""
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
            if token != expected_token:
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
    """A held lock. Renewed by a background heartbeat every ttl/3 until released.

    `lost` (an Event) is set, and check()/verify() raise LockLost, once the lease is lost (see
    the module's docstring); lost is final. `clock` is monotonic seconds (injectable for tests).
    `conn` may be replaced by the deployer after a reconnect: the next heartbeat, verify() and
    release() go through the new connection."""

    def __init__(self, conn: Connection, root: str, app: str, holder: dict, ttl: float, *,
                 clock: Callable[[], float] = _steady):
        self.conn = conn
        self.root = root
        self.app = app
        self.holder = holder
        self.ttl = ttl
        self.lost = threading.Event()  # set when the lease is found lost
        self._clock = clock
        self._renewed = clock()  # when the last successful renewal started
        self._lost_because: dict | None = None  # LockLost's keyword arguments; the first wins
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._released = False
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"lock-heartbeat-{conn.label}")

    @property
    def token(self) -> str:
        return self.holder["token"]

    @property
    def path(self) -> str:
        return _lock_path(self.root, self.app)

    # ------------------------------------------------------------------ lost or not

    def _mark_lost(self, **because) -> None:
        with self._state:
            if self._lost_because is None:
                self._lost_because = because
        self.lost.set()

    def _overdue(self) -> str | None:
        """Why the ttl rule says lost, or None: more than ttl since the last renewal."""
        elapsed = self._clock() - self._renewed
        if elapsed > self.ttl:
            return (f"no heartbeat succeeded for {elapsed:.1f}s, more than the lease's ttl of "
                    f"{self.ttl:g}s: this process was stopped or the server stalled")
        return None

    @property
    def is_lost(self) -> bool:
        """Lost, by what the heartbeat found or by the clock. No I/O."""
        if self._lost_because is None:
            overdue = self._overdue()
            if overdue is not None:
                self._mark_lost(failure=overdue)
        return self._lost_because is not None

    def check(self) -> None:
        """Raise LockLost if the lease is lost. Cheap: no I/O, only the flags and the clock."""
        if self.is_lost:
            raise LockLost(self.conn.label, self.app, **self._lost_because)

    def verify(self, timeout: float | None = None) -> None:
        """check(), then read holder.json once to confirm the lease is still ours; raise
        LockLost otherwise (also when it cannot be read within `timeout`, default ttl: what
        cannot be confirmed is not committed). Call right before committing a release."""
        self.check()
        limit = self.ttl if timeout is None else timeout
        path = self.path
        try:
            holder = _bounded(lambda: self.conn.sftp_do(lambda sftp: _read_holder(sftp, path)),
                              limit, f"lock-verify-{self.conn.label}")
        except _Stalled:
            self._mark_lost(failure=f"the server did not answer within {limit:g}s",
                            action="confirmed")
        except Exception as exc:
            self._mark_lost(failure=_why(exc), action="confirmed")
        else:
            if holder is None or holder.get("token") != self.token:
                self._mark_lost(holder=holder)
        self.check()  # also when reading took longer than what was left of the ttl

    # ------------------------------------------------------------------ renewal

    def _put(self, sftp) -> None:
        """Write holder.json atomically: a temporary file renamed over it."""
        tmp = f"{self.path}/holder.json.tmp-{self.token[:8]}"
        with sftp.open(tmp, "w") as f:
            f.write(json.dumps(self.holder).encode())
        sftp.posix_rename(tmp, f"{self.path}/holder.json")

    def _write(self) -> None:
        """The first holder.json, right after the mkdir that took the lock; a renewal."""
        def op(sftp):
            started = self._clock()
            self._put(sftp)
            return started
        self._renewed_at(self.conn.sftp_do(op))

    def _renewed_at(self, started: float) -> None:
        with self._state:
            if self._lost_because is None:
                self._renewed = max(self._renewed, started)

    def _renew(self):
        """One heartbeat, in one SFTP operation: still ours? then rewrite holder.json.
        ("ok", start time) | ("taken", the holder found or None) | ("skip", None)."""
        path = self.path

        def op(sftp):
            started = self._clock()
            try:
                holder = _read_holder(sftp, path)
            except OSError as exc:
                raise _StepFailed(f"reading {path}/holder.json: {_why(exc)}") from None
            if holder is None or holder.get("token") != self.token:
                return "taken", holder
            # Released, or lost while this waited for the SFTP session: write nothing.
            if self._stop.is_set() or self.is_lost:
                return "skip", None
            try:
                self._put(sftp)
            except OSError as exc:
                raise _StepFailed(f"writing {path}/holder.json: {_why(exc)}") from None
            return "ok", started
        return self.conn.sftp_do(op)

    def _heartbeat(self) -> bool:
        """One beat; False when there is nothing more to renew (lost or released)."""
        if self._stop.is_set() or self.is_lost:
            return False
        limit = max(0.1, self.ttl - (self._clock() - self._renewed))
        failure = None
        try:
            outcome, got = _bounded(self._renew, limit, f"lock-renew-{self.conn.label}",
                                    stop=self._stop)
        except _Stalled:
            failure = f"the server did not answer the heartbeat within {limit:.1f}s"
        except Exception as exc:
            failure = _why(exc)
        if self._stop.is_set():
            return False  # released meanwhile: whatever the beat met is no longer news
        if failure is not None:
            self._mark_lost(failure=failure)
            return False
        if outcome == "taken":
            self._mark_lost(holder=got)
            return False
        if outcome == "ok":
            self._renewed_at(got)
        return not self.is_lost

    def _still_mine(self) -> bool:
        holder = self.conn.sftp_do(lambda sftp: _read_holder(sftp, self.path))
        return holder is not None and holder.get("token") == self.token

    def reclaim(self) -> bool:
        """After a loss by a failed renewal (a dropped connection, a stall), not by another
        run: if holder.json still carries this lease's token, renew it once and return True, so
        that the run may undo what it changed (the lease stays lost: the run still fails).
        False when another run took it or it cannot be read. Through `conn` (after a
        reconnect, the new connection)."""
        because = self._lost_because
        if because is not None and because.get("failure") is None:
            return False
        def op(sftp):
            holder = _read_holder(sftp, self.path)
            if holder is None or holder.get("token") != self.token:
                return False
            self._put(sftp)
            return True
        try:
            return bool(_bounded(lambda: self.conn.sftp_do(op), self.ttl,
                                 f"lock-reclaim-{self.conn.label}"))
        except Exception:
            return False

    def _beat(self) -> None:
        interval = max(0.5, self.ttl / 3)
        while not self._stop.wait(interval):
            if not self._heartbeat():
                return

    def start(self) -> Lease:
        self._thread.start()
        return self

    def release(self, timeout: float = 10.0) -> None:
        """Stop the heartbeat and remove the lock if it is still ours. Never removes another
        run's lock (a lease another run took is not touched at all), and gives up after
        `timeout` seconds on a server that does not answer (the lease then goes stale by
        itself after ttl). Errors are not raised: releasing is best effort."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._released:
            return
        self._released = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=min(1.0, timeout))
        because = self._lost_because
        if because is not None and because.get("failure") is None:
            return  # another run took it

        def remove() -> None:
            if self._still_mine():
                break_lock(self.conn, self.root, self.app, expected_token=self.token)
        try:
            _bounded(remove, max(0.0, deadline - time.monotonic()),
                     f"lock-release-{self.conn.label}")
        except (_Stalled, Exception):
            pass  # the lease expires by itself after ttl

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(conn: Connection, root: str, app: str, holder: dict, *, ttl: float, wait: float,
            cancel: threading.Event | None = None, log: Callable[[str], None] | None = None,
            clock: Callable[[], float] = _steady,
            sleep: Callable[[float], None] = time.sleep) -> Lease:
    """Take app's lock on this server, waiting up to `wait` seconds for another holder, saying
    who that is (when the wait starts, when the holder changes, every WAIT_REPORT seconds).
    Breaks a stale lease, and takes over at once one whose holder is a process of this host
    that is gone (saying so). Raises LockHeld, Cancelled, TransportError. The lease counts time
    with `clock` too (see Lease)."""
    holder = dict(holder, ttl=ttl)
    path = _lock_path(root, app)
    conn.ensure_private_dir(root)
    start = clock()
    reported: tuple[str, float] | None = None  # (the holder's token, when) last said
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
            lease = Lease(conn, root, app, holder, ttl, clock=clock)
            lease._write()
            return lease.start()
        info = inspect(conn, root, app)
        if info is None:
            continue  # released between our mkdir and our look
        dead = None if info.stale else info.gone
        if info.stale or dead:
            if break_lock(conn, root, app, expected_token=info.token) and log:
                if dead:
                    log(f"{conn.label}: took over the deploy lock held by "
                        f"{describe_holder(info.holder)}: {dead}")
                else:
                    log(f"{conn.label}: broke a stale deploy lock held by {info.describe()}")
            continue
        waited = clock() - start
        if waited >= wait:
            raise LockHeld(conn.label, info, waited)
        # A directory without holder.json is a lock being taken this very moment: its
        # holder is known a few milliseconds later.
        if log and info.token and (reported is None or reported[0] != info.token
                                   or waited - reported[1] >= WAIT_REPORT):
            if reported is None:
                log(f"{conn.label}: waiting up to {wait:g}s for the deploy lock held by "
                    f"{info.describe()}")
            else:
                log(f"{conn.label}: still waiting ({waited:.0f}s of {wait:g}s) for the deploy "
                    f"lock held by {info.describe()}")
            reported = (info.token, waited)
        sleep(min(0.5 if info.token else 0.05, max(0.05, wait - waited)))
