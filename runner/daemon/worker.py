"""The worker pool: takes queued runs from the store and runs each as a `runner exec` subprocess.

One dispatcher thread claims runs while a slot is free (global limit here, per-pipeline limit and
concurrency groups in the store's claim). Each run has a thread that starts the child in its own
process group, reads its JSON events line by line into the store, and maps its exit code to the
run's status. A rollback run (trigger "rollback") runs `runner rollback --json` instead, recorded
as the run's deploy stage with the report as its outputs. One heartbeat thread extends this
daemon's leases and picks up cancellations asked for elsewhere; it also expires the leases of
daemons that went silent (Store.expire, the rules in leases.py), once this daemon has itself been
heard for a lease time. A store that cannot be reached stops no run: its end is recorded when
the store is back.

Cancelling a run sends SIGINT to the child's process group (the engine stops the running stage
cleanly and exits 130), then SIGTERM and SIGKILL if it does not stop in time.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from runner.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, InvalidInput, Problem
from runner.daemon import leases
from runner.daemon.config import repository_pipeline
from runner.daemon.notice import notice
from runner.daemon.run_requests import run_request
from runner.daemon.scheduler import default_branch
from runner.daemon.store import Claimed, public_text
from runner.daemon.status import reported_event
from runner.proc import Recorded, start_time, stop

log = logging.getLogger("runner.daemon.worker")

_STATUS_BY_EXIT = {EXIT_OK: "success", EXIT_FAILED: "failed", EXIT_INVALID: "invalid",
                   EXIT_INTERRUPTED: "cancelled"}
CANCEL_ESCALATION = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
# `runner` in this python: what a rollback run starts (`runner rollback`), whatever exec_command says.
RUNNER = [sys.executable, "-m", "runner"]


try:  # loaded here, not in the forked child: dlopen after fork in a threaded process can hang
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc
    _PRCTL = None


def _die_with_parent() -> None:
    # If the daemon is killed (even SIGKILL), the kernel sends the child SIGINT: it cancels its
    # stage cleanly instead of building on, orphaned, while the restarted daemon marks it
    # interrupted. Linux only; elsewhere the lease expiry still marks the run.
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG


def exec_argv(command: list[str], pipeline_file: str, run_id: int, data_dir: Path, request_file: Path,
              variables: dict[str, str], withhold_secrets: bool = False,
              skip_stages: tuple[str, ...] = (), destination: str | None = None) -> list[str]:
    """The argv of one run. Pure; tested by equality. What to build travels as the run's request
    (runner.run_request, written to `request_file`); what the run may not do (a pull request's
    limits) as flags, so `runner exec` enforces it; where it deploys as `-d`."""
    argv = [*command, pipeline_file, "--json", "--run-id", str(run_id), "--data-dir", str(data_dir),
            "--request", str(request_file)]
    if destination:
        argv += ["-d", destination]
    if withhold_secrets:
        argv.append("--withhold-secrets")
    for stage in skip_stages:
        argv += ["--skip", stage]
    for k, v in sorted(variables.items()):
        argv += ["--var", f"{k}={v}"]
    return argv


def rollback_argv(command_base: list[str], pipeline_file: str, run_id: int, to: str | None,
                  variables: dict[str, str], request_file: Path | None = None,
                  destination: str | None = None) -> list[str]:
    """The argv of a rollback run. Pure; tested by equality. `command_base` is `runner` itself
    (RUNNER): a configured exec_command stands in for `runner exec` only. The servers record
    the run's id with the release (and the deploy lock names it), as for a deploy run. A
    repository's pipeline (`pipeline:`) gets the run's request, which says where to read it.
    With a destination, that destination's servers and history are rolled back."""
    argv = [*command_base, "rollback", pipeline_file, "--json", "--run-id", str(run_id)]
    if request_file is not None:
        argv += ["--request", str(request_file)]
    if destination:
        argv += ["-d", destination]
    if to:
        argv += ["--to", to]
    for k, v in sorted(variables.items()):
        argv += ["--var", f"{k}={v}"]
    return argv


def promote_argv(command_base: list[str], pipeline_file: str, run_id: int, source: str, target: str,
                 commit: str, variables: dict[str, str]) -> list[str]:
    """The argv of a promotion run (an entry's triggers.tag): `runner promote` of the release
    verified on `source` to `target`, refused unless that release is `commit` (the tag's).
    Pure; tested by equality."""
    argv = [*command_base, "promote", pipeline_file, "--from", source, "--to", target, "--commit", commit,
            "--json", "--run-id", str(run_id)]
    for k, v in sorted(variables.items()):
        argv += ["--var", f"{k}={v}"]
    return argv


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def status_from_exit(returncode: int, cancel_requested: bool, reported: str | None) -> str:
    """The run's final status from the child's exit code (and what it said in run.end)."""
    if cancel_requested and (returncode == EXIT_INTERRUPTED or returncode < 0):
        return "cancelled"
    if returncode in _STATUS_BY_EXIT:
        return _STATUS_BY_EXIT[returncode]
    if reported in ("success", "failed", "invalid", "cancelled") and returncode == 0:
        return reported
    return "failed"


def problem_text(problem) -> str:
    """One problem of run.end's `problems` (runner.errors.Problem as JSON) as the terminal says
    it: `file:line:column: severity: path: message`."""
    try:
        return str(Problem(**problem))
    except TypeError:  # not the shape exec writes: as it came
        return str(problem)


def server_duration(server: dict) -> float | None:
    """A deploy stage's per-server duration from its outputs (runner.outputs.DeployOutputs.to_dict)."""
    d = server.get("duration")
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def spawn(argv: list[str], cwd: Path, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """A run's process: its own process group (cancelled as a group), told to stop if the daemon
    dies, stdout (JSON events) and stderr piped."""
    return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
                            preexec_fn=_die_with_parent, cwd=str(cwd))


def proc_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22), or None: the
    form the store keeps beside the run's pid (a zombie still has one)."""
    st = start_time(pid, zombie=True)
    return None if st is None else str(st)


def process_alive(pid: int, started: str) -> bool:
    """Whether `pid` is still the process that started at `started` (proc_start's form) and
    has not exited: a zombie's run is over."""
    return started.isdigit() and Recorded(pid, int(started)).running()


def stop_orphan(pid: int | None, started: str | None, wait: float = 10.0) -> bool:
    """After a crash: if `pid` is still the process that ran the run (same start time, so not a
    reused pid), stop its process group: SIGINT, then SIGKILL after `wait`. True if it was there."""
    if not pid or not started or not started.isdigit():
        return False
    return stop(Recorded(pid, int(started)), ((signal.SIGINT, wait), (signal.SIGKILL, 5.0)),
                group=True)


class RunHandle:
    """One run in progress: the child process and the thread that reads it."""

    def __init__(self, pool: "WorkerPool", claimed: Claimed):
        self.pool = pool
        self.run = claimed
        self.id = claimed.id
        self.proc: subprocess.Popen | None = None
        self.cancel_reason: str | None = None
        self._cancel_lock = threading.Lock()
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"run-{self.id}", daemon=True)
        self.seq = pool.core.store.max_log_seq(self.id)  # a re-queued run appends to its log
        self.log_error: str | None = None
        self._buf: list[tuple[int, str, float, str]] = []
        self._buf_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._reading_done = threading.Event()
        self._readers: list[threading.Thread] = []  # stderr, then the log flusher
        self.began = time.monotonic()

    # -- cancellation -------------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        with self._cancel_lock:
            if self.cancel_reason is not None:
                return
            self.cancel_reason = reason
        log.info("cancelling run", extra={"run": self.id, "reason": reason})
        threading.Thread(target=self._escalate, name=f"cancel-{self.id}", daemon=True).start()

    def _escalate(self) -> None:
        self._started.wait()
        proc = self.proc
        if proc is None:
            return
        stop(proc, CANCEL_ESCALATION, group=True)

    # -- running ------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._execute()
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill the pool
            log.exception("run crashed in the daemon", extra={"run": self.id})
            self._finish("failed", None, f"the daemon failed while running it (a bug): {exc!r}")
        finally:
            self._started.set()
            self.pool._done(self)

    def _execute(self) -> None:
        core = self.pool.core
        entry = core.config.pipeline(self.run.pipeline)
        if entry is None:
            self._finish("failed", None, f"pipeline {self.run.pipeline!r} is no longer configured")
            return
        pipeline_from = repository_pipeline(entry, core.config)
        try:
            request = run_request(self.run, pipeline_from)
        except InvalidInput as exc:
            self._finish("invalid", None, str(exc))
            return
        request = request.model_copy(update=notice(core.config, core.store, self.run))
        if request.kind == "rollback" and entry.file is not None:
            self._rollback(str(core.config.path(entry.file)), request.rollback_to)
            return
        if entry.triggers.tag is not None and self.run.tag and entry.file is not None:
            self._promote(str(core.config.path(entry.file)), entry.triggers.tag.promote_from)
            return
        if request.kind == "rollback":
            # A repository's pipeline: `runner rollback` chooses the release with the pipeline at
            # the head of the default branch, then reads it as committed at the release's commit.
            branch = default_branch(entry)
            request = request.model_copy(update={"ref": f"refs/heads/{branch}", "branch": branch,
                                                 "pipeline_from": pipeline_from})
        request_file = self._write_request(request)
        if request_file is None:
            return
        if request.kind == "rollback":
            assert entry.pipeline is not None
            try:
                self._rollback(entry.pipeline, request.rollback_to, request_file)
            finally:
                request_file.unlink(missing_ok=True)
            return
        # A repository's pipeline: the path inside it, which `runner exec` reads at the commit.
        pipeline_file = entry.pipeline if entry.file is None else str(core.config.path(entry.file))
        argv = exec_argv(core.config.command(), pipeline_file, self.id,
                         core.work_dir, request_file, self.run.vars,
                         withhold_secrets=self.run.withhold_secrets, skip_stages=self.run.skip_stages,
                         destination=self.run.destination)
        spare = self.pool.take_spare() if core.config.exec_command is None else None
        if not self._start(argv, spare, skip=len(core.config.command()) - 1):
            return
        stderr_tail: deque[str] = deque(maxlen=20)
        self._start_readers(stderr_tail, "runner")
        reported: dict = {}
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text:
                continue
            try:
                ev = json.loads(text)
                kind = ev.get("event") if isinstance(ev, dict) else None
            except json.JSONDecodeError:
                ev, kind = None, None
            if kind is None:
                self._log("-", text)
                continue
            self._on_event(kind, ev, reported)
        returncode = self._wait()
        status = status_from_exit(returncode, self.cancel_reason is not None, reported.get("status"))
        if status == "cancelled":
            reason = self.cancel_reason or "cancelled"
        elif status == "success":
            reason = ""
        else:
            reason = reported.get("error") or ""
            if not reason:
                tail = " | ".join(list(stderr_tail)[-3:])
                reason = f"runner exec exited with code {returncode}" + (f": {tail}" if tail else "")
        if self.log_error:
            reason = (reason + "; " if reason else "") + f"log incomplete: {self.log_error}"
        self._finish(status, returncode, reason)
        try:
            request_file.unlink()
        except OSError:
            pass

    def _write_request(self, request) -> Path | None:
        """The run's request as the file `runner exec` / `runner rollback` reads (--request);
        None when it cannot be written (the run has then failed, saying why)."""
        core = self.pool.core
        requests_dir = core.data_dir / "requests"
        requests_dir.mkdir(parents=True, exist_ok=True)
        request_file = requests_dir / f"run-{self.id}.json"
        try:
            request.write(request_file)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                core.disk_full(f"request file of run {self.id}")
            self._finish("failed", None, f"cannot write the run's request file {request_file}: {exc.strerror}")
            return None
        return request_file

    def _rollback(self, pipeline_file: str, to: str | None, request_file: Path | None = None) -> None:
        """A rollback run: `runner rollback --json`, recorded as its deploy stage. With
        `request_file`, PIPELINE_FILE is the repository's (`pipeline:`)."""
        self._deploy_command(rollback_argv(RUNNER, pipeline_file, self.id, to, self.run.vars, request_file,
                                           self.run.destination), "rollback")

    def _promote(self, pipeline_file: str, source: str) -> None:
        """A tag's run of an entry with triggers.tag: `runner promote --json` of the release
        verified on `source` to the run's destination, refused unless it is the tag's commit;
        recorded as its deploy stage (its outputs say `what: promote`). Nothing is built."""
        if not self.run.destination:
            self._finish("invalid", None, f"tag {self.run.tag}: a promotion needs the run's destination "
                                          f"(the entry's destination: was not set when it was queued)")
            return
        if not self.run.commit:
            self._finish("failed", None, f"tag {self.run.tag}: its commit is not known (the repository "
                                         f"could not be read when the run was queued): nothing promoted")
            return
        self._log("deploy", f"tag {self.run.tag} (commit {self.run.commit[:12]}): promoting the release "
                            f"verified on {source} to {self.run.destination}")
        self._deploy_command(promote_argv(RUNNER, pipeline_file, self.id, source, self.run.destination,
                                          self.run.commit, self.run.vars), "promote")

    def _deploy_command(self, argv: list[str], verb: str) -> None:
        """`runner rollback` or `runner promote` (`verb`), recorded as the run's deploy stage. Its
        stderr is the stage's log; its stdout ends with the report (DeployOutputs.to_dict),
        which becomes the stage's outputs. A promotion it refused (nothing verified on the
        source, another commit there) is a failed run, not an invalid one: the file is fine."""
        core = self.pool.core
        self._stage_event("deploy", "running")
        began = time.monotonic()
        if not self._start(argv, None):
            return
        stderr_tail: deque[str] = deque(maxlen=20)
        self._start_readers(stderr_tail, "deploy")
        report: dict | None = None
        report_line: str | None = None
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not text:
                continue
            obj = _json_object(text)
            if obj is None:
                self._log("deploy", text)
                continue
            if report_line is not None:  # only the last JSON object is the report
                self._log("deploy", report_line)
            report, report_line = obj, text
        returncode = self._wait()
        duration = time.monotonic() - began
        status = status_from_exit(returncode, self.cancel_reason is not None, None)
        refused = [x for x in stderr_tail if x.startswith(f"{verb} refused:")]
        if status == "invalid" and refused:
            status = "failed"
        outputs = core.masker.mask_all(report) if report is not None else None
        error = None
        if status == "cancelled":
            reason = self.cancel_reason or "cancelled"
        elif status == "success":
            reason = ""
        else:
            # The command's own last words ("rollback failed: ..."); an invalid pipeline file's
            # problems, every one (as exec's run.end gives them); else the tail of its stderr.
            said = [x for x in stderr_tail if x.startswith((f"{verb} failed:", f"{verb} refused:"))]
            if said:
                tail = said[-1]
            elif returncode == EXIT_INVALID:
                tail = "\n".join(stderr_tail)
            else:
                tail = " | ".join(list(stderr_tail)[-3:])
            reason = core.masker.mask(tail or f"runner {verb} exited with code {returncode}")
            error = reason
        stage_status = "success" if returncode == 0 else "cancelled" if status == "cancelled" else "failed"
        self._measure_stage("deploy", stage_status, duration, outputs)
        self._stage_event("deploy", stage_status, duration=duration, error=error, outputs=outputs)
        if self.log_error:
            reason = (reason + "; " if reason else "") + f"log incomplete: {self.log_error}"
        self._finish(status, returncode, reason)

    def _stage_event(self, stage: str, status: str, **kw) -> None:
        try:
            self.pool.core.store.stage_event(self.id, stage, status, **kw)
        except Exception as exc:  # noqa: BLE001 - as in _on_event: recorded, the run goes on
            self.log_error = self.log_error or f"the {stage} stage's {status} was not stored: {public_text(exc)}"
        self.pool.core.live.changed(self.id)

    def _start(self, argv: list[str], spare: subprocess.Popen | None, skip: int = 0) -> bool:
        """Start the run's process: in the warm `spare` if given (it gets argv[skip:]), else
        cold. False (and the run finished as failed) if it could not start."""
        core = self.pool.core
        try:
            if spare is not None:
                # A warm `runner` (runner.daemon.launcher) that already imported everything:
                # it runs the same arguments as the cold command line would.
                try:
                    assert spare.stdin is not None
                    spare.stdin.write((json.dumps(argv[skip:]) + "\n").encode())
                    spare.stdin.close()
                    self.proc = spare
                except OSError:  # it died meanwhile: start cold
                    self.pool._discard(spare)
                    spare = None
            if spare is None:
                self.proc = spawn(argv, core.data_dir, stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._started.set()
            self._finish("failed", None, f"cannot start {argv[0]}: {exc.strerror}")
            return False
        finally:
            self._started.set()
        log.info("run started", extra={"run": self.id, "pipeline": self.run.pipeline, "pid": self.proc.pid})
        core.status.report(self.run.pipeline, self.id, self.run.commit,
                           reported_event(self.run.trigger, self.run.event), "running")
        try:
            core.store.set_lease_pid(self.id, core.owner, self.proc.pid, proc_start(self.proc.pid))
        except Exception as exc:  # noqa: BLE001 - only orphan cleanup after a crash needs it
            log.warning("cannot record the run's pid", extra={"run": self.id, "error": str(exc)})
        return True

    def _start_readers(self, stderr_tail: deque, stderr_stage: str) -> None:
        """stderr's lines go to the log under `stderr_stage`; buffered lines are flushed."""
        self._readers = [
            threading.Thread(target=self._pump_stderr, args=(stderr_tail, stderr_stage), daemon=True),
            threading.Thread(target=self._flusher, name=f"log-{self.id}", daemon=True)]
        for t in self._readers:
            t.start()

    def _wait(self) -> int:
        """Once stdout is read to its end: the exit code, with every log line stored."""
        assert self.proc is not None
        returncode = self.proc.wait()
        err_thread, flusher = self._readers
        err_thread.join(timeout=5)
        self._reading_done.set()
        flusher.join(timeout=5)
        self._flush()
        return returncode

    def _pump_stderr(self, tail: deque, stage: str) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if text:
                tail.append(text)
                self._log(stage, text)

    def _on_event(self, kind: str, ev: dict, reported: dict) -> None:
        store = self.pool.core.store
        if kind != "stage.log":
            self._flush()
        try:
            if kind == "stage.start":
                store.stage_event(self.id, str(ev.get("stage")), "running")
            elif kind == "stage.log":
                self._log(str(ev.get("stage") or "-"), str(ev.get("line", "")), ev.get("time"))
            elif kind == "stage.end":
                err = ev.get("error")
                stage, status = str(ev.get("stage")), str(ev.get("status") or "failed")
                duration = ev.get("duration") if isinstance(ev.get("duration"), (int, float)) else None
                self._measure_stage(stage, status, duration, ev.get("outputs"))
                store.stage_event(self.id, stage, status, duration=duration,
                                  error=self.pool.core.masker.mask(str(err)) if err else None,
                                  outputs=ev.get("outputs"))
                if stage == "checkout" and status == "success":
                    self._checked_out(ev.get("outputs"))
            elif kind == "run.end":
                reported["status"] = ev.get("status")
                err = ev.get("error")
                problems = ev.get("problems")
                if problems:
                    err = (err or "invalid") + "\n" + "\n".join(problem_text(p) for p in problems)
                reported["error"] = self.pool.core.masker.mask(str(err)) if err else err
        except Exception as exc:  # noqa: BLE001 - disk full, locked db: recorded, the run goes on
            self.log_error = self.log_error or f"a {kind} event was not stored: {public_text(exc)}"
            if "full" in str(exc):
                self.pool.core.disk_full(f"run {self.id}")
        if kind in ("stage.start", "stage.end"):
            self.pool.core.live.changed(self.id)

    def _checked_out(self, outputs) -> None:
        """The run's commit is what its checkout checked out (a tag object peeled, a ref
        resolved): recorded, and the commit status from now on goes to it."""
        commit = outputs.get("commit") if isinstance(outputs, dict) else None
        if isinstance(commit, str) and commit and commit != self.run.commit:
            self.pool.core.store.record_commit(self.id, commit)
            self.run = dataclasses.replace(self.run, commit=commit)

    def _measure_stage(self, stage: str, status: str, duration: float | None, outputs) -> None:
        metrics = self.pool.core.metrics
        metrics.stage_finished(self.run.pipeline, stage, status, duration)
        if stage == "deploy" and isinstance(outputs, dict):
            for server in outputs.get("servers") or ():
                if isinstance(server, dict) and server.get("name"):
                    metrics.deploy_server(self.run.pipeline, str(server["name"]), str(server.get("status", "")),
                                          server_duration(server))

    # Seconds a log line may wait before it is readable through the API and the dashboard's live
    # log (whose stream wakes when a batch is stored): most of a line's way to the browser.
    FLUSH_EVERY = 0.1
    FLUSH_LINES = 200  # or this many lines, whichever comes first

    def _log(self, stage: str, line: str, when=None) -> None:
        """Buffer one line (masked); lines are written in batches, one transaction each."""
        t = when if isinstance(when, (int, float)) else time.time()
        with self._buf_lock:
            if self.log_error:
                return
            self.seq += 1
            self._buf.append((self.seq, stage, t, self.pool.core.masker.mask(line)))
            full = len(self._buf) >= self.FLUSH_LINES
        if full:
            self._flush()

    def _flush(self) -> None:
        with self._flush_lock:  # one writer at a time keeps batches in seq order
            with self._buf_lock:
                batch, self._buf = self._buf, []
            if not batch or self.log_error:
                return
            try:
                self.pool.core.store.append_logs(self.id, batch)
                self.pool.core.live.changed(self.id)
            except Exception as exc:  # noqa: BLE001 - e.g. "database or disk is full"
                self.log_error = f"log lines from #{batch[0][0]} on were not stored: {public_text(exc)}"
                log.error("cannot store log lines", extra={"run": self.id, "error": str(exc)})
                if "full" in str(exc):
                    self.pool.core.disk_full(f"log of run {self.id}")

    def _flusher(self) -> None:
        while not self._reading_done.wait(self.FLUSH_EVERY):
            self._flush()

    def _finish(self, status: str, code: int | None, reason: str) -> None:
        core = self.pool.core
        # Keeps trying (the disk may be full until someone frees space): giving up would leave
        # the run looking like it is still running.
        attempt = 0
        while True:
            attempt += 1
            try:
                ok = core.store.finish(self.id, core.owner, status, code, reason)
                core.live.changed(self.id, listed=True)
                if not ok:
                    log.warning("lease lost before the run ended", extra={"run": self.id})
                log.info("run finished", extra={"run": self.id, "status": status, "exit_code": code})
                if ok:
                    core.metrics.run_finished(self.run.pipeline, status, time.monotonic() - self.began)
                core.status.report(self.run.pipeline, self.id, self.run.commit,
                                   reported_event(self.run.trigger, self.run.event), status, reason)
                return
            except Exception as exc:  # noqa: BLE001
                if self.pool.stopping.is_set():
                    # The daemon is going away: the lease stays, and the next start marks the run
                    # interrupted with that reason.
                    log.error("cannot record the end of a run; left to recovery",
                              extra={"run": self.id, "status": status, "error": str(exc)})
                    return
                log.error("cannot record the end of a run, retrying", extra={"run": self.id, "error": str(exc)})
                if "full" in str(exc):
                    core.disk_full(f"end of run {self.id}")
                self.pool.stopping.wait(min(5.0, 0.5 * attempt))


class WorkerPool:
    def __init__(self, core):
        self.core = core
        self.active: dict[int, RunHandle] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.stopping = threading.Event()  # set once the grace period is over
        self.draining = False
        self._threads: list[threading.Thread] = []
        self._spare: tuple[subprocess.Popen | None, float] = (None, 0.0)
        self.spares_used = 0

    # -- the warm spare ------------------------------------------------------------------------
    SPARE_MAX_AGE = 600.0  # seconds; then it is replaced, so that updated code is picked up

    def _ensure_spare(self) -> None:
        """Called from the dispatcher thread only: PR_SET_PDEATHSIG is tied to the thread that
        forks, and this one lives as long as the pool."""
        cfg = self.core.config
        if cfg.exec_command is not None or not cfg.warm_spare or cfg.concurrency == 0 or self.draining:
            return
        with self._lock:
            spare, born = self._spare
        if spare is not None and spare.poll() is None and time.monotonic() - born < self.SPARE_MAX_AGE:
            return
        if spare is not None:
            self._discard(spare)
        try:
            proc = spawn([sys.executable, "-m", "runner.daemon.launcher"], self.core.data_dir, stdin=subprocess.PIPE)
        except OSError as exc:
            log.warning("cannot start a warm spare", extra={"error": str(exc)})
            return
        with self._lock:
            self._spare = (proc, time.monotonic())

    def take_spare(self) -> subprocess.Popen | None:
        with self._lock:
            spare, _ = self._spare
            self._spare = (None, 0.0)
        self._wake.set()  # the dispatcher makes the next one
        if spare is None or spare.poll() is not None:
            return None  # never started, or died (e.g. an import error): start cold
        self.spares_used += 1
        return spare

    @staticmethod
    def _discard(proc: subprocess.Popen) -> None:
        try:
            if proc.stdin:
                proc.stdin.close()  # EOF: the launcher exits by itself
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()

    def start(self) -> None:
        for target, name in ((self._dispatch, "dispatcher"), (self._heartbeat, "heartbeat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        self._wake.set()

    def cancel_local(self, run_id: int, reason: str) -> bool:
        with self._lock:
            h = self.active.get(run_id)
        if h is None:
            return False
        h.cancel(reason)
        return True

    def _limits(self) -> dict[str, int]:
        return {p.name: p.concurrency for p in self.core.config.pipelines}

    def _dispatch(self) -> None:
        cfg = self.core.config
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while not self.draining and not self._stop.is_set():
                with self._lock:
                    if len(self.active) >= cfg.concurrency:
                        break
                try:
                    claimed = self.core.store.claim(self.core.owner, self._limits(), cfg.lease_seconds)
                except Exception:  # noqa: BLE001
                    log.exception("claim failed")
                    break
                if claimed is None:
                    break
                self.core.metrics.run_claimed(claimed.pipeline, claimed.waited)
                h = RunHandle(self, claimed)
                with self._lock:
                    self.active[h.id] = h
                h.thread.start()
                self.core.live.changed(h.id, listed=True)
            try:
                self._ensure_spare()
            except Exception:  # noqa: BLE001 - a spare is an optimisation; runs start cold without
                log.exception("warm spare failed")
        with self._lock:
            spare, _ = self._spare
            self._spare = (None, 0.0)
        if spare is not None:
            self._discard(spare)

    def _heartbeat(self) -> None:
        cfg = self.core.config
        every = max(0.2, cfg.lease_seconds / 3)
        last_expire = 0.0
        heard_since: float | None = None  # since when every heartbeat of this daemon went through
        unreachable = False
        while not self._stop.wait(every):
            with self._lock:
                ids = list(self.active)
            try:
                self.core.store.daemon_seen(self.core.owner, [p.name for p in cfg.pipelines], cfg.concurrency)
                lost = self.core.store.heartbeat(self.core.owner, ids, cfg.lease_seconds)
            except Exception as exc:  # noqa: BLE001
                # The runs go on: a finished one's end is recorded once the store is back
                # (RunHandle._finish retries), and its lease is renewed here meanwhile.
                if not unreachable:
                    log.error("heartbeat failed: the store is unreachable; runs go on",
                              extra={"error": str(exc), "runs": ids})
                unreachable, heard_since = True, None
                continue
            if unreachable:
                log.warning("heartbeat: the store is reachable again", extra={"runs": ids})
                unreachable = False
            if heard_since is None:
                heard_since = time.monotonic()
            for run_id, why in lost.items():
                self.cancel_local(run_id, why)
            # Only a daemon heard all along for a lease time judges others' silence: one that has
            # just reconnected would find everyone silent, the daemons it shares an outage with too.
            now = time.monotonic()
            if now - heard_since >= cfg.lease_seconds and now - last_expire >= cfg.lease_seconds:
                last_expire = now
                try:
                    self._expire()
                except Exception:  # noqa: BLE001
                    log.exception("lease expiry failed")

    def _expire(self) -> None:
        """Other daemons' runs whose owner went silent (Store.expire)."""
        core = self.core
        host = leases.owner_host(core.owner) or ""
        expired = core.store.expire(core.owner, core.requeue_set(), core.config.lease_seconds,
                                    lambda holder: leases.known_gone(holder, host, process_alive))
        for run_id, st in expired:
            log.warning("run recovered from an expired lease", extra={"run": run_id, "status": st})
            core.metrics.lease_recovered(st)
            run = core.store.get_run(run_id) or {}
            if st == "interrupted":
                core.status.report_stored(run_id, run, st)
            self.wake()

    def _done(self, h: RunHandle) -> None:
        with self._lock:
            self.active.pop(h.id, None)
        self.wake()

    def drain(self, grace: float, cut_short: Callable[[float], bool] | None = None) -> None:
        """Stop taking runs; let running ones finish for `grace` seconds, or until `cut_short`
        (which waits up to the seconds it is given: a second SIGTERM) says True; then cancel them."""
        self.draining = True
        deadline = time.monotonic() + grace
        while (remaining := deadline - time.monotonic()) > 0:
            with self._lock:
                if not self.active:
                    break
            if cut_short is None:
                time.sleep(min(remaining, 0.1))
            elif cut_short(min(remaining, 0.1)):
                break
        with self._lock:
            left = list(self.active.values())
        self.stopping.set()
        for h in left:
            h.cancel("the daemon is shutting down")
        for h in left:
            h.thread.join(timeout=sum(w for _, w in CANCEL_ESCALATION) + 5)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)
