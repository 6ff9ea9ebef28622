"""What every SSH deploy target's steps share for one rollout: the connection to each server,
the runner that checks the deploy lock before every command, the lock leases, the seconds per
phase, the shield that lets restore and commit finish after a cancel, scratch paths for
one-command secrets, and the restore wrapper that retries on a fresh connection.

The cutovers (deployers.stop_start.StopStartSteps, deployers.ssh_proxy.ProxySteps) are
siblings over one `ServerSession` each; `OnServer` is what they know about one server between
prepare and commit (`Switch.detail`).
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import paramiko

from deployers import lock as locks
from deployers.accessory_check import check_before_switch
from deployers.base import (LockLostStep, Restored, ServerPlan, ServerSteps, StepFailed,
                            Switch)
from deployers.config_error import ConfigError
from deployers.plan import Action
from deployers.release_command import ReleaseRun, run_release_command
from deployers.spec import Target
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

if TYPE_CHECKING:
    from deployers.ssh_docker import SSHDockerDeployer

NET_ERRORS = (TransportError, OSError, EOFError, paramiko.SSHException)
SCRATCH_TAIL = "--[0-9a-f]{32}"  # after the app name, in `scratch_path` names


@dataclass
class OnServer:
    """What the steps know about one server between prepare and commit (Switch.detail)."""

    plan: ServerPlan
    history: list[dict]
    secret_values: dict[str, str] = field(default_factory=dict, repr=False)
    prev_name: str = ""  # set once the previous container was renamed aside
    prev_id: str = ""
    prev_labels: dict[str, str] = field(default_factory=dict)
    prev_was_running: bool = False
    prev_stopped: bool = False
    new_id: str = ""
    reused: str = ""  # the proxy cutover: the kept container's name, when it is started again
    routed: bool = False  # the proxy cutover: the route points at the new container


Run = Callable  # run(argv, *, check=False, stdin=None, timeout=None) -> CommandResult


class ServerSession:
    """The plumbing of one rollout's steps over SSH (see the module docstring). `d` is the
    deployer: settings, connections, the server's directories and what they hold."""

    def __init__(self, d: SSHDockerDeployer):
        self.d = d
        self.leases: dict[str, locks.Lease] = {}
        self.reclaimed: set[str] = set()  # servers whose lost lease was ours still: restorable
        self._timings: dict[str, dict[str, float]] = {}
        self._shield = threading.local()
        self._lock_roots: dict[str, str] = {}
        self._lock_deadline: float | None = None  # lock.wait from the first take_lock on

    # ---------------------------------------------------------------- phases, errors

    def timings(self, server: str) -> dict[str, float]:
        return dict(self._timings.get(server, {}))

    @contextmanager
    def phase(self, server: str, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            got = self._timings.setdefault(server, {})
            got[name] = got.get(name, 0.0) + time.monotonic() - t0

    @contextmanager
    def as_step(self, server: str, touched: bool) -> Iterator[None]:
        """What the transport, the lock and the settings raise, as the rollout's StepFailed."""
        try:
            yield
        except locks.LockLost as exc:
            raise LockLostStep(server, exc.reason) from None
        except (ConfigError, ValueError) as exc:
            raise StepFailed(server, str(exc), touched=touched) from None
        except TransportError as exc:
            raise StepFailed(server, exc.reason, touched=touched) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise StepFailed(server, f"{type(exc).__name__}: {exc}", touched=touched) from None

    def cancel_event(self) -> threading.Event | None:
        # Undoing or recording a change (restore, commit) must not be cut short by the cancel
        # that caused it.
        return None if getattr(self._shield, "on", False) else self.d.cancel

    @contextmanager
    def shielded(self) -> Iterator[None]:
        self._shield.on = True
        try:
            yield
        finally:
            self._shield.on = False

    # ---------------------------------------------------------------- connection, runner

    def conn(self, t: Target, fresh: bool = False) -> Connection:
        def moved(c: Connection) -> None:
            lease = self.leases.get(t.label)
            if lease is not None:
                lease.conn = c  # heartbeat and release go through the new connection
        return self.d.connection(t, fresh=fresh, on_new=moved)

    def check_lease(self, label: str) -> None:
        """Raises LockLost when another run took this server's lock (a lease this run holds,
        not one it reclaimed for a restore)."""
        lease = self.leases.get(label)
        if lease is not None and label not in self.reclaimed:
            lease.check()

    def runner(self, conn: Connection) -> Run:
        """conn.run, after checking the lock is still ours (when we hold one there)."""
        def run(argv, *, check: bool = False, stdin: bytes | None = None,
                timeout: float | None = None):
            self.check_lease(conn.label)
            return conn.run(argv, stdin=stdin, check=check, timeout=timeout,
                            cancel=self.cancel_event())
        return run

    def on(self, sw: Switch) -> tuple[Connection, Run, OnServer]:
        st: OnServer = sw.detail
        conn = self.conn(st.plan.target)
        return conn, self.runner(conn), st

    def scratch_path(self, conn: Connection, kind: str, suffix: str = "") -> str:
        """A fresh name `<app>--<random><suffix>` in the runner's 0700 dir `<root>/<kind>` on the
        server, for a secret that lives only as long as one command: if a run dies before
        removing it, the next deploy of this app finds it by that form (SCRATCH_TAIL)."""
        directory = f"{self.d.runner_dir(conn)}/{kind}"
        conn.ensure_private_dir(directory)
        return f"{directory}/{self.d.app}--{uuid.uuid4().hex}{suffix}"

    # ---------------------------------------------------------------- locks

    def reach(self, plan: ServerPlan) -> str:
        """Connect, and check that the accessories the server needs run there (before any
        server is touched: deployers.accessory_check); the lock's directory on the server,
        which is per docker engine: the order key (two names for one server sort alike)."""
        t = plan.target
        with self.as_step(t.label, touched=False):
            with self.phase(t.label, "connect"):
                conn = self.conn(t)
                self._lock_roots[t.label] = self.d.lock_dir(conn)
                check_before_switch(conn, plan, app=self.d.app, cancel=self.d.cancel)
        return self._lock_roots[t.label]

    def take_lock(self, plan: ServerPlan) -> None:
        t, d = plan.target, self.d
        if self._lock_deadline is None:
            self._lock_deadline = time.monotonic() + d.stage.lock.wait
        with self.as_step(t.label, touched=False), self.phase(t.label, "lock"):
            holder = locks.holder_info(d.run_id, d.pipeline, plan.release.commit,
                                       d.stage.lock.ttl)
            self.leases[t.label] = locks.acquire(
                self.conn(t), self._lock_roots[t.label], d.key, holder, ttl=d.stage.lock.ttl,
                wait=max(0.0, self._lock_deadline - time.monotonic()), cancel=d.cancel,
                log=d.log)
        d.log(f"{t.label}: deploy lock taken (run {d.run_id})")

    def finish(self) -> None:
        # In the reverse of the lock order: a run waiting for the first lock finds the others
        # free by the time it gets it.
        for label, lease in reversed(list(self.leases.items())):
            try:
                lease.release()
                self.d.log(f"{label}: deploy lock released (run {self.d.run_id})")
            except Exception as exc:  # the lease expires by itself after its ttl
                self.d.log(f"{label}: could not release the deploy lock ({exc}); it expires "
                           f"after {self.d.stage.lock.ttl:g}s")
        self.leases.clear()

    # ---------------------------------------------------------------- release command

    def release(self, sw: Switch) -> None:
        """The plan's release command on this server (deployers.release_command)."""
        conn, run, st = self.on(sw)

        def remove(argv: list[str]) -> None:  # also after a cancel or a dropped connection
            with self.shielded():
                for fresh in (False, True):
                    try:
                        self.conn(st.plan.target, fresh=fresh).run(argv, check=False)
                        return
                    except NET_ERRORS:
                        pass
            self.d.log(f"{sw.server}: WARNING: could not remove {argv[-1]}; the next deploy "
                       f"of {self.d.app} removes it")
        with self.as_step(sw.server, touched=False), self.phase(sw.server, "release"):
            run_release_command(ReleaseRun(
                conn=conn, run=run, remove=remove, plan=st.plan, env_values=st.secret_values,
                env_path=lambda: self.scratch_path(conn, "env", ".env"),
                timeout=self.d.stage.release_timeout, log=self.d.log))

    # ---------------------------------------------------------------- restore

    def restore(self, sw: Switch, once: Callable[[Switch, Connection, Run], Restored]
                ) -> Restored:
        """`once(sw, conn, run)` (what a cutover's restore does), shielded from the cancel,
        retried once on a fresh connection, under a lease this run still holds or reclaims.
        Never raises: says what it achieved."""
        st: OnServer = sw.detail
        if sw.unchanged:
            return Restored(True, running=sw.release.digest, note="unchanged")
        kept = st.prev_name or (st.plan.release.spec.name if st.prev_id else "")
        lease = self.leases.get(sw.server)
        with self.shielded():
            for attempt in (1, 2):
                try:
                    conn = self.conn(st.plan.target, fresh=attempt == 2)
                    if lease is not None and lease.is_lost:
                        # A renewal that failed (a dropped connection) is no reason to leave
                        # the server unverified, as long as no other run took the lock.
                        if not lease.reclaim():
                            return Restored(False, kept=kept,
                                            note="not restored: the deploy lock is no longer "
                                                 "this run's; whoever holds it now decides "
                                                 "what runs there")
                        self.reclaimed.add(sw.server)
                    return once(sw, conn, self.runner(conn))
                except locks.LockLost as exc:
                    return Restored(False, kept=kept, note=f"not restored: {exc.reason}")
                except (*NET_ERRORS, StepFailed) as exc:
                    if attempt == 2 or isinstance(exc, StepFailed):
                        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                        return Restored(
                            False, kept=kept,
                            note=f"{reason}; the previous verified release is kept as "
                                 f"{kept or 'nothing'}; the next deploy or `runner rollback` "
                                 f"returns the server to it first")
                except Exception as exc:  # restore never raises: say what stopped it
                    return Restored(False, kept=kept,
                                    note=f"{type(exc).__name__}: {exc} (a bug in runner)")
        return Restored(False, kept=kept, note="not restored")


class SessionSteps(ServerSteps):
    """What every cutover over a ServerSession does alike: reaching the servers, their locks,
    the release command, the timings and the end. The stop-start and the proxy cutovers are
    siblings below it; each says how a server is prepared, switched, verified, restored and
    committed."""

    def __init__(self, d: SSHDockerDeployer):
        self.d = d
        self.s = ServerSession(d)

    def reach(self, plan: ServerPlan) -> str:
        return self.s.reach(plan)

    def take_lock(self, plan: ServerPlan) -> None:
        self.s.take_lock(plan)

    def release(self, sw: Switch) -> None:
        self.s.release(sw)

    def timings(self, server: str) -> dict[str, float]:
        return self.s.timings(server)

    def finish(self) -> None:
        self.s.finish()


def run_actions(run: Run, plan: ServerPlan, actions: tuple[Action, ...] | list[Action]) -> None:
    """Carry out the planned commands a decision chose (deployers.recovery,
    deployers.restore_plan), in order."""
    for a in actions:
        run(a.argv(plan), check=a.check, timeout=a.timeout)
