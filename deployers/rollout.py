"""The one rollout: carries a `DeployPlan` out through a `ServerSteps` implementation.

First every server's deploy lock: the steps reach every server (in parallel), then take their
locks one at a time in one fixed order (the order of what reach returns: by docker engine for
the SSH steps), so that two runs of one app never hold some of the servers each and wait for
each other until both fail; the steps bound the wait and name the holder.

Per batch (deployers.spec.batches: all, canary, rolling): prepare every server of the batch
(pull: a registry problem fails before anything is touched); in the first batch, the plan's
release command then runs once on its server (deployers.release_command: a failure stops the
deploy with nothing switched anywhere); then switch and verify each in
parallel; a server whose switch or verify fails is restored at once. When a
server of a batch fails, the rest of that batch is restored, and the earlier batches too unless
on_failure is keep_done; later batches are never touched. Once every batch is healthy, every
server commits (its history then lists the release as verified). Locks are released in all
cases.

The report is built from what each server's steps did and said, never from what should have
happened: a server whose restore failed is reported as still running the unverified release,
with where its previous verified release is kept.

Cancellation: the rollout runs in a thread of its own while the calling thread waits for it. An
interrupt there (`runner exec`'s signal handler raises KeyboardInterrupt in the main thread)
only sets the cancel event; the steps see it and stop, and the rollout, which checks the event
after every step, puts back what it switched in every batch so far, exactly as on a failure,
then raises Cancelled saying what it did. Once the commits started they finish: a cancel then
changes nothing.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from runner.errors import Cancelled
from runner.outputs import DeployOutputs, ServerResult

from deployers.base import (DeployFailed, DeployPlan, LockLostStep, Restored, ServerSteps,
                            StepFailed, Switch)

UNTOUCHED = "nothing was changed on this server"
NOT_CHECKED = "started, not health-checked"  # instead of "healthy" when nothing was checked
NOTHING_BEFORE = "nothing was running before"  # a restore that had nothing to put back


class _Failed(Exception):
    """A server's switch or verify failed; its restore already ran."""

    def __init__(self, sw: Switch, error: StepFailed, restored: Restored):
        self.sw, self.error, self.restored = sw, error, restored


class _Stopped(Exception):
    """A server's switch or verify was cancelled; its restore already ran."""

    def __init__(self, sw: Switch, restored: Restored):
        self.sw, self.restored = sw, restored


def as_step_failed(server: str, exc: BaseException, touched: bool) -> StepFailed:
    if isinstance(exc, StepFailed):
        return exc
    reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
    return StepFailed(server, str(reason), touched=touched)


def parallel(fn: Callable, items: list, limit: int) -> list:
    """fn(item) for each item, at most `limit` at once; results or the exceptions raised."""
    if not items:
        return []

    def wrap(item):
        try:
            return fn(item)
        except BaseException as exc:  # collected, dealt with by the caller
            return exc
    with ThreadPoolExecutor(max_workers=max(1, min(limit, len(items)))) as pool:
        return list(pool.map(wrap, items))


def headline(what: str, app: str, servers: tuple[ServerResult, ...], ok: bool,
             cancelled: bool = False) -> str:
    """One sentence built from the per-server results: only what happened."""
    if ok:
        return f"{what} of {app}: {len(servers)} server(s) done"
    failed = [s.server for s in servers if s.status in ("failed", "lock_lost")]
    if cancelled:
        parts = [f"{what} of {app} stopped"
                 + (f", failed on {', '.join(failed)}" if failed else "")]
    else:
        parts = [f"{what} of {app} failed on {', '.join(failed) or 'no server'}"]
    undone = [s.server for s in servers if s.status in ("rolled_back", "restored")
              or (s.status == "failed" and s.rolled_back)]
    put_back = [x for x in undone if not _emptied(servers, x)]
    emptied = [s.server for s in servers if _emptied(servers, s.server)]
    if put_back:
        parts.append(f"put back on the previous verified release: {', '.join(put_back)}")
    if emptied:
        parts.append(f"removed what this run started, {NOTHING_BEFORE}: {', '.join(emptied)}")
    for s in servers:
        if s.status == "lock_lost":
            parts.append(f"{s.server}: this run lost its deploy lock there and left the server "
                         f"as it was")
        elif not s.verified:
            running = s.digest[:19] or "an unverified release"
            kept = f", previous verified kept as {s.kept}" if s.kept else ""
            parts.append(f"{s.server}: NOT restored, still running {running} (unverified){kept}")
    kept_new = [s.server for s in servers if s.status == "deployed"]
    if kept_new:
        parts.append(f"kept the new release on {', '.join(kept_new)}")
    touched = [s for s in servers if s.status not in ("skipped",) and UNTOUCHED not in s.reason]
    if not touched:
        parts.append("nothing was changed on any server")
    return "; ".join(parts)


def _emptied(servers: tuple[ServerResult, ...], server: str) -> bool:
    """Whether the restore of `server` removed the new container with nothing to put back."""
    s = next(x for x in servers if x.server == server)
    return (s.status in ("rolled_back", "restored", "failed") and not s.rolled_back
            and s.verified and NOTHING_BEFORE in s.reason)


class Rollout:
    def __init__(self, plan: DeployPlan, steps: ServerSteps, *,
                 log: Callable[[str], None] = lambda line: None,
                 cancel: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.plan = plan
        self.steps = steps
        self.log = log
        self.cancel = cancel or threading.Event()
        self.clock = clock
        self.began: dict[str, float] = {}
        self.results: dict[str, ServerResult] = {}

    # ------------------------------------------------------------------ results

    def _result(self, sw: Switch | None, server: str, status: str, **kw) -> ServerResult:
        began = self.began.get(server, self.clock())
        return ServerResult(server, status, duration=self.clock() - began,
                            release=self.plan.server(server).release.digest,
                            phases=self.steps.timings(server), **kw)

    def _done(self, sw: Switch) -> ServerResult:
        # Unchanged only if nothing changed at all: not when prepare first had to return the
        # server from an unverified release to this one.
        unchanged = sw.unchanged and not sw.recovered
        note = "; ".join(n for n in (sw.recovered, sw.unchecked and
                                     f"{NOT_CHECKED}: {sw.unchecked}") if n)
        if self.plan.what == "rollback" and not unchanged:
            return self._result(sw, sw.server, "rolled_back", digest=sw.release.digest,
                                previous_digest=sw.previous_digest, rolled_back=True,
                                reason=note)
        return self._result(sw, sw.server, "unchanged" if unchanged else "deployed",
                            digest=sw.release.digest, previous_digest=sw.previous_digest,
                            reason=note)

    def _restored(self, sw: Switch, r: Restored, why: str) -> ServerResult:
        undo = "rolled_back" if self.plan.what == "deploy" else "restored"
        if sw.unchanged:
            return self._done(sw)
        if r.ok and r.none_before:
            return self._result(sw, sw.server, undo, previous_digest=sw.previous_digest,
                                reason=f"{why}; removed the new container, {NOTHING_BEFORE}")
        if r.ok:
            return self._result(sw, sw.server, undo, digest=r.running,
                                previous_digest=sw.previous_digest,
                                rolled_back=self.plan.what == "deploy",
                                reason=f"{why}; {r.note}")
        return self._result(sw, sw.server, "failed", digest=r.running or sw.release.digest,
                            previous_digest=sw.previous_digest, verified=False, kept=r.kept,
                            reason=f"{why}; ROLLBACK FAILED: {r.note}")

    def _own_failure(self, server: str, f: StepFailed, sw: Switch | None,
                     r: Restored | None) -> ServerResult:
        prev = sw.previous_digest if sw else ""
        if isinstance(f, LockLostStep) and not (r is not None and r.ok):
            return self._result(sw, server, "lock_lost", previous_digest=prev, verified=False,
                                kept=r.kept if r else "",
                                reason=f"{f.reason}; {r.note}" if r and r.note else f.reason)
        if r is None or not f.touched:
            return self._result(sw, server, "failed", previous_digest=prev,
                                reason=f"{f.reason}; {UNTOUCHED}")
        if r.ok and r.none_before:
            return self._result(sw, server, "failed", previous_digest=prev,
                                reason=f"{f.reason}; removed the failed container, "
                                       f"{NOTHING_BEFORE}")
        if r.ok:
            return self._result(sw, server, "failed", digest=r.running, previous_digest=prev,
                                rolled_back=True, reason=f"{f.reason}; {r.note}")
        return self._result(sw, server, "failed",
                            digest=r.running or (sw.release.digest if sw else ""),
                            previous_digest=prev, verified=False, kept=r.kept,
                            reason=f"{f.reason}; ROLLBACK FAILED: {r.note}")

    # ------------------------------------------------------------------ the run

    def _switch_and_verify(self, sw: Switch) -> Switch:
        try:
            self.steps.switch(sw)
            if not sw.unchanged:
                self.steps.verify(sw)
            return sw
        except BaseException as exc:
            restored = self.steps.restore(sw)
            if isinstance(exc, (Cancelled, KeyboardInterrupt)):
                raise _Stopped(sw, restored) from None
            raise _Failed(sw, as_step_failed(sw.server, exc, touched=True), restored) from None

    def _lock_all(self) -> None:
        """Every server's deploy lock, in the order of the keys reach() returns. Raises
        DeployFailed (nothing was changed) or Cancelled."""
        servers = list(self.plan.servers)
        for s in servers:
            self.began[s.server] = self.clock()
        keys: dict[str, str] = {}
        failures: dict[str, ServerResult] = {}
        cancelled: BaseException | None = None
        for s, r in zip(servers, parallel(self.steps.reach, servers, self.plan.parallel)):
            if isinstance(r, (Cancelled, KeyboardInterrupt)):
                cancelled = r
            elif isinstance(r, BaseException):
                failures[s.server] = self._own_failure(
                    s.server, as_step_failed(s.server, r, touched=False), None, None)
            else:
                keys[s.server] = r
        if not failures and cancelled is None:
            for s in sorted(servers, key=lambda s: (keys[s.server], s.server)):
                try:
                    self.steps.take_lock(s)
                except (Cancelled, KeyboardInterrupt) as exc:
                    cancelled = exc
                except Exception as exc:
                    failures[s.server] = self._own_failure(
                        s.server, as_step_failed(s.server, exc, touched=False), None, None)
                if cancelled is None and self.cancel.is_set():
                    cancelled = Cancelled("cancelled")
                if failures or cancelled is not None:
                    break
        if failures or cancelled is not None:
            self._undo([], [], failures, cancelled)
            if cancelled is not None:
                raise self._cancelled()
            raise DeployFailed(self._report(ok=False))

    def run(self) -> DeployOutputs:
        plan, limit = self.plan, self.plan.parallel
        done: list[Switch] = []
        try:
            self._lock_all()
            for n, labels in enumerate(plan.batches, 1):
                if len(plan.batches) > 1:
                    self.log(f"batch {n}/{len(plan.batches)}: {', '.join(labels)}")
                if n > 1:  # the first batch's servers count from the lock phase on
                    for label in labels:
                        self.began[label] = self.clock()
                failures: dict[str, ServerResult] = {}
                cancelled: BaseException | None = None
                prepared: list[Switch] = []
                for label, r in zip(labels, parallel(
                        self.steps.prepare, [plan.server(x) for x in labels], limit)):
                    if isinstance(r, Switch):
                        prepared.append(r)
                    elif isinstance(r, (Cancelled, KeyboardInterrupt)):
                        cancelled = r
                    else:
                        failures[label] = self._own_failure(
                            label, as_step_failed(label, r, touched=False), None, None)
                if cancelled is None and self.cancel.is_set():
                    cancelled = Cancelled("cancelled")
                if n == 1 and plan.release_on and not failures and cancelled is None:
                    cancelled = self._release(prepared, failures)
                switched: list[Switch] = []
                if not failures and cancelled is None:
                    for sw, r in zip(prepared, parallel(self._switch_and_verify, prepared,
                                                        limit)):
                        if isinstance(r, Switch):
                            switched.append(r)
                        elif isinstance(r, _Failed):
                            failures[sw.server] = self._own_failure(sw.server, r.error, sw,
                                                                    r.restored)
                        elif isinstance(r, _Stopped):
                            cancelled = Cancelled("cancelled")
                            self.results[sw.server] = self._restored(sw, r.restored, "cancelled")
                        else:  # a bug in the steps: restore did not even run
                            failures[sw.server] = self._own_failure(
                                sw.server, as_step_failed(sw.server, r, True), sw,
                                self.steps.restore(sw))
                    # A cancel that came while the batch's last server was being verified:
                    # the batch is undone like one that was stopped half-way.
                    if cancelled is None and self.cancel.is_set():
                        cancelled = Cancelled("cancelled")
                    if not failures and cancelled is None:
                        done += switched
                        for sw in switched:
                            said = ("unchanged" if sw.unchanged else
                                    NOT_CHECKED if sw.unchecked else "healthy")
                            self.log(f"{sw.server}: {said} {sw.release.digest[:19]}")
                        continue
                self._undo(switched, done, failures, cancelled)
                if cancelled is not None:
                    raise self._cancelled()
                raise DeployFailed(self._report(ok=False))
            failed_commits = self._commit(done)
            return self._report(ok=not failed_commits, raise_failed=bool(failed_commits))
        finally:
            self.steps.finish()

    def _release(self, prepared: list[Switch], failures: dict[str, ServerResult]
                 ) -> BaseException | None:
        """The plan's release command, once, on its server of the first batch (prepared,
        nothing switched anywhere yet). A failure goes into `failures`; returns the cancel."""
        sw = next(s for s in prepared if s.server == self.plan.release_on)
        try:
            self.steps.release(sw)
        except (Cancelled, KeyboardInterrupt) as exc:
            return exc
        except Exception as exc:
            failures[sw.server] = self._own_failure(
                sw.server, as_step_failed(sw.server, exc, touched=False), None, None)
        return Cancelled("cancelled") if self.cancel.is_set() else None

    def _cancelled(self) -> Cancelled:
        """The Cancelled to raise once the undo ran: what each server was left with."""
        servers = tuple(self.results[s.server] for s in self.plan.servers)
        return Cancelled("cancelled: " + headline(self.plan.what, self.plan.app, servers, False,
                                                  cancelled=True))

    def _undo(self, switched: list[Switch], done: list[Switch],
              failures: dict[str, ServerResult], cancelled: BaseException | None) -> None:
        keep = self.plan.on_failure == "keep_done" and cancelled is None
        undo = switched + ([] if keep else done)
        why = ("cancelled" if cancelled is not None
               else "another server of the rollout failed")
        for sw, r in zip(undo, parallel(self.steps.restore, undo, self.plan.parallel)):
            if not isinstance(r, Restored):  # restore must not raise; say so if it did
                r = Restored(False, note=f"{type(r).__name__}: {r}")
            self.results[sw.server] = self._restored(sw, r, why)
        if keep:
            self._commit(done)
        self.results.update(failures)
        for label in (s.server for s in self.plan.servers):
            if label not in self.results:
                self.results[label] = self._result(None, label, "skipped",
                                                   reason=f"not changed: the rollout stopped; "
                                                          f"{UNTOUCHED}")

    def _commit(self, switches: list[Switch]) -> bool:
        """Commit each server; True if any failed (its result says why)."""
        failed = False
        for sw, r in zip(switches, parallel(self.steps.commit, switches, self.plan.parallel)):
            if isinstance(r, BaseException):
                failed = True
                f = as_step_failed(sw.server, r, touched=True)
                if isinstance(f, LockLostStep):
                    self.results[sw.server] = self._result(
                        sw, sw.server, "lock_lost", digest=sw.release.digest,
                        previous_digest=sw.previous_digest, verified=False, reason=f.reason)
                else:
                    self.results[sw.server] = self._result(
                        sw, sw.server, "failed", digest=sw.release.digest,
                        previous_digest=sw.previous_digest, verified=False,
                        reason=f"healthy, but recording it as verified failed: {f.reason}; "
                               f"the next deploy treats it as unverified")
            else:
                self.results[sw.server] = self._done(sw)
        return failed

    def _report(self, ok: bool, raise_failed: bool = False) -> DeployOutputs:
        order = [s.server for s in self.plan.servers if s.server in self.results]
        servers = tuple(self.results[k] for k in order)
        report = DeployOutputs(self.plan.app, self.plan.what, servers, ok,
                               headline(self.plan.what, self.plan.app, servers, ok))
        if raise_failed:
            raise DeployFailed(report)
        return report


def rollout(plan: DeployPlan, steps: ServerSteps, **kw) -> DeployOutputs:
    """Carry `plan` out through `steps`. Returns the report when every server is done; raises
    DeployFailed (report attached) or Cancelled otherwise. See the module docstring: the
    rollout runs in a thread of its own, and an interrupt of the calling thread cancels it."""
    r = Rollout(plan, steps, **kw)
    box: dict = {}
    over = threading.Event()

    def run() -> None:
        try:
            box["report"] = r.run()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            over.set()
    threading.Thread(target=run, name=f"rollout-{plan.app}").start()
    while True:
        try:
            over.wait()
            break
        except KeyboardInterrupt:
            # Leaving now would skip the undo: the rollout stops at its next step instead.
            r.cancel.set()
    if "error" in box:
        raise box["error"]
    return box["report"]
