"""The daemon: one data directory, one store, one scheduler, one worker pool, one HTTP server.

`Daemon.start()` returns once the server listens (tests start it in-process on port 0);
`Daemon.stop()` shuts down gracefully: no new runs are taken, running ones get the grace period,
then are cancelled cleanly, then the server stops. `serve()` is what `runner daemon` calls: start,
wait for SIGTERM/SIGINT, stop (a second signal cancels the running runs without waiting).
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import shutil
import logging
import os
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import replace

import uvicorn

from runner.daemon.api import build_app, timed_h11_protocol
from runner.daemon.config import DaemonConfig
from runner.daemon.dashboard.live import LiveHub
from runner.daemon.metrics import Metrics
from runner.daemon.scheduler import Schedules, default_branch
from runner.daemon.status import StatusReporter
from runner.daemon.store import Store, StoreError, open_store
from runner.daemon.webhooks import group_key, new_run
from runner.daemon.worker import WorkerPool, stop_orphan
from runner.errors import InvalidInput
from runner.run_request import ROLLBACK_TO
from runner.secrets import Masker
from runner.signals import StopSignals

log = logging.getLogger("runner.daemon")

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg and whatever `extra=` carried."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
               f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(stream=None, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("runner")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def check_rollback_target(to: str | None) -> str | None:
    """`to` as `runner rollback --to` gets it (hex lowercased), or None for the default.
    Raises InvalidInput."""
    if to is None:
        return None
    value = to.strip().lower() if isinstance(to, str) else ""
    if not ROLLBACK_TO.match(value):
        raise InvalidInput(f"rollback target {to!r} is not a position (0, 1, ... 999), a digest "
                           "(sha256: and 64 hex digits) or a git commit (7 to 64 hex digits)")
    return value


class Daemon:
    def __init__(self, config: DaemonConfig, store: Store | None = None):
        self.config = config
        self.data_dir = config.path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir = self.data_dir / "work"
        self.work_dir.mkdir(exist_ok=True)
        self._lockfile = open(self.data_dir / "daemon.lock", "a+")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise InvalidInput(f"another daemon is already using {self.data_dir} (daemon.lock is held)") from None
        # The lease owner: stable across restarts of this daemon, so that a restart knows that
        # runs leased to it before are orphans (the flock above guarantees no twin is alive).
        self.owner = f"{config.name}@{socket.gethostname()}:{self.data_dir}"
        try:
            db = config.database.resolve() if config.database else None
        except InvalidInput as exc:
            raise InvalidInput(f"database: {exc}") from None
        if db and "://" not in db:
            db = str(config.path(db))
        try:
            self.store: Store = store or open_store(db or self.data_dir / "runner.db")
        except StoreError as exc:
            raise InvalidInput(f"database: {exc}") from None
        try:
            self.api_token = config.api_token.resolve() if config.api_token else None
        except InvalidInput as exc:
            raise InvalidInput(f"api_token: {exc}") from None
        self._secrets = self._resolve_secrets()
        # Every line the daemon stores passes this masker too: the engine masks the pipeline's
        # secrets; the daemon's own (webhook secrets, API token, status tokens) are added here.
        self.masker = Masker()
        for values in self._secrets.values():
            for secret, _ in values:
                self.masker.add(secret, "webhook secret")
        if self.api_token:
            self.masker.add(self.api_token, "api_token")
        if db and "://" in db and urllib.parse.urlsplit(db).password:
            self.masker.add(urllib.parse.unquote(urllib.parse.urlsplit(db).password), "database password")
        for p in config.pipelines:
            if p.commit_status is not None:
                try:
                    self.masker.add(p.commit_status.token.resolve(), f"{p.name} commit_status.token")
                except InvalidInput as exc:
                    log.warning("commit status token unavailable", extra={"pipeline": p.name, "error": str(exc)})
        self.status = StatusReporter(self)
        self.metrics = Metrics(self)
        self._reserve = self.data_dir / "disk-reserve"
        self._reserve_lock = threading.Lock()
        self._make_reserve()
        self.live = LiveHub()  # wakes the dashboard's event streams when a run changes
        self.pool = WorkerPool(self)
        self.schedules = Schedules(self)
        self.app = build_app(self)
        self.server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self.port: int | None = None
        self._stopped = False

    def _resolve_secrets(self) -> dict[str, list[tuple[str, list[str] | None]]]:
        """provider -> [(secret, pipelines it may start, or None for all)]."""
        out: dict[str, list[tuple[str, list[str] | None]]] = {}

        def resolve(ref, where: str) -> str:
            try:
                return ref.resolve()
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: {exc}") from None

        for provider, hook in self.config.webhooks.items():
            out.setdefault(provider, []).append((resolve(hook.secret, f"webhooks.{provider}.secret"), None))
        for i, p in enumerate(self.config.pipelines):
            if p.webhook_secret is not None:
                secret = resolve(p.webhook_secret, f"pipelines.{i}.webhook_secret")
                for provider in ("github", "gitea", "gitlab", "generic"):
                    out.setdefault(provider, []).append((secret, [p.name]))
        return out

    def _make_reserve(self) -> None:
        size = self.config.disk_reserve_bytes
        if not size:
            return
        try:
            if self._reserve.exists() and self._reserve.stat().st_size >= size:
                return
            with open(self._reserve, "wb") as f:
                f.write(b"\0" * size)  # written, not sparse: the blocks are really taken
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self._reserve.unlink(missing_ok=True)
            log.warning("cannot set disk space aside", extra={"bytes": size, "error": str(exc)})

    def disk_full(self, where: str) -> None:
        """Called when a write failed for lack of space: give the reserve back, once."""
        with self._reserve_lock:
            if self._reserve.exists():
                self._reserve.unlink()
                log.error("disk full: released the reserved space so that run outcomes can still be "
                          "recorded; free some space and restart the daemon",
                          extra={"where": where, "data_dir": str(self.data_dir)})
            else:
                log.error("disk full", extra={"where": where, "data_dir": str(self.data_dir)})

    # -- what the app, the scheduler and the pool call -----------------------------------------

    def secrets_for(self, provider: str):
        return self._secrets.get(provider, [])

    def requeue_set(self) -> set[str]:
        return {p.name for p in self.config.pipelines if p.requeue_on_interrupt}

    def after_accept(self, cancel_running) -> None:
        for run_id in cancel_running:
            run = self.store.get_run(run_id) or {}
            self.pool.cancel_local(run_id, run.get("reason") or "superseded")
        self.pool.wake()
        self.live.changed(None)  # a run was queued (or superseded): the runs pages look again

    def cancel(self, run_id: int, reason: str) -> str | None:
        before = self.store.request_cancel(run_id, reason)
        if before == "running":
            self.pool.cancel_local(run_id, reason)
        self.live.changed(run_id, listed=True)
        return before

    def trigger_manual(self, name: str, branch: str | None, tag: str | None, commit: str | None,
                       variables: dict[str, str]) -> int:
        p = self.config.pipeline(name)
        assert p is not None
        if tag:
            ref = f"refs/tags/{tag}"
        else:
            branch = branch or default_branch(p)
            ref = f"refs/heads/{branch}"
        if not commit:
            # Resolved now, so that the run (and a retry of it) builds this commit, not whatever
            # the ref names when a worker gets to it.
            commit = self.schedules.head(p, ref)
        ids, cancel = self.store.enqueue([new_run(p, "manual", None, ref, branch if not tag else None, tag,
                                                  commit, {}, extra_vars=variables)])
        self.after_accept(cancel)
        return ids[0]

    def trigger_rollback(self, name: str, to: str | None) -> int:
        """Queue a rollback run of pipeline `name`: `runner rollback` returns every server to the
        release `to` names (check_rollback_target), or by default to the newest verified one
        other than what runs now. It joins the group of the pipeline's deploys (its default
        branch's) without cancelling the one running: a rollback waits for a deploy to end, and
        like any newer run it supersedes the runs of that group still queued. Raises
        InvalidInput for an unknown pipeline or a `to` that names no release."""
        p = self.config.pipeline(name)
        if p is None:
            raise InvalidInput(f"no pipeline {name!r}")
        to = check_rollback_target(to)
        branch = default_branch(p)
        run = replace(new_run(p, "rollback", None, None, None, None, None, {"rollback": {"to": to}}),
                      group=group_key(p, branch, None, f"refs/heads/{branch}"), cancel_in_progress=False)
        ids, cancel = self.store.enqueue([run])
        self.after_accept(cancel)
        return ids[0]

    def prune(self) -> list[int]:
        """Retention (the leader's job): old runs leave the database, and their work directories
        this host's disk (other daemons remove theirs in clean_work_dirs)."""
        r = self.config.retention
        try:
            ids = self.store.prune(time.time() - r.days * 86400, r.keep_last)
        except Exception:  # noqa: BLE001
            log.exception("retention pruning failed")
            return []
        for run_id in ids:
            shutil.rmtree(self.work_dir / "runs" / str(run_id), ignore_errors=True)
        if ids:
            log.info("pruned old runs", extra={"removed": len(ids)})
        return ids

    def fail_unserved(self) -> list[int]:
        """The leader's job: queued runs of a pipeline that no live daemon serves fail with the
        reason, instead of waiting forever."""
        try:
            ids = self.store.fail_unserved(alive_within=3 * self.config.lease_seconds)
        except Exception:  # noqa: BLE001
            log.exception("cannot check for runs no daemon serves")
            return []
        for run_id in ids:
            run = self.store.get_run(run_id) or {}
            log.warning("run failed: no daemon serves its pipeline", extra={"run": run_id, "reason": run.get("reason")})
            self.status.report_stored(run_id, run, "failed")
        return ids

    def clean_work_dirs(self) -> list[int]:
        """Remove this host's work directories of runs no longer in the store (pruned by the
        leader, which may be another daemon)."""
        removed = []
        runs_dir = self.work_dir / "runs"
        try:
            names = [p.name for p in runs_dir.iterdir() if p.name.isdigit()]
        except OSError:
            return []
        for name in names:
            try:
                gone = self.store.get_run(int(name)) is None
            except Exception:  # noqa: BLE001 - the store is unreachable: keep everything
                return removed
            if gone:
                shutil.rmtree(runs_dir / name, ignore_errors=True)
                removed.append(int(name))
        return removed

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # Runs this daemon held before it died: their `runner exec` children were told to stop
        # (PR_SET_PDEATHSIG); make sure they did before anything runs again.
        for lease in self.store.leases_of(self.owner):
            if stop_orphan(lease.get("pid"), lease.get("pid_start"), wait=min(10.0, self.config.grace_period)):
                log.warning("stopped the orphaned process of a run", extra=lease)
        for run_id, status in self.store.recover(self.owner, self.requeue_set()):
            log.warning("run left running by a previous daemon", extra={"run": run_id, "now": status})
            run = self.store.get_run(run_id) or {}
            if status == "interrupted":
                self.status.report_stored(run_id, run, status)
        cfg = self.config
        self.store.daemon_seen(self.owner, [p.name for p in cfg.pipelines], cfg.concurrency)
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto
        # says TCP, and without it Nagle + delayed ACK add 40 ms to every response.
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.listen.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((cfg.listen.host, cfg.listen.port))
        except OSError as exc:
            sock.close()
            raise InvalidInput(f"cannot listen on {cfg.listen.host}:{cfg.listen.port}: {exc.strerror}") from None
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        # uvicorn times out only kept-alive connections, after a response: the protocol adds a read
        # timeout for connections that never send a whole request. No websockets are served.
        ucfg = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                              http=timed_h11_protocol(cfg.listen.read_timeout), ws="none", loop="asyncio",
                              timeout_keep_alive=cfg.listen.idle_timeout, timeout_graceful_shutdown=5,
                              backlog=1024)
        self.server = uvicorn.Server(ucfg)
        self._server_thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])),
                                               name="http", daemon=True)
        self._server_thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            if not self._server_thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            time.sleep(0.01)
        if not cfg.read_requires_token:
            log.warning("READ API OPEN: read_requires_token is off, so runs, full logs and deliveries are open to "
                        "anyone who reaches the listener", extra={"host": cfg.listen.host, "port": self.port})
        self.pool.start()
        # Another daemon's queued run or freed slot wakes this one's dispatcher at once.
        self.store.listen(self.pool.wake)
        self.schedules.start()
        self.pool.wake()
        log.info("daemon listening", extra={"host": cfg.listen.host, "port": self.port, "owner": self.owner,
                                            "data_dir": str(self.data_dir), "concurrency": cfg.concurrency,
                                            "pipelines": [p.name for p in cfg.pipelines]})

    @property
    def url(self) -> str:
        host = self.config.listen.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def stop(self, grace: float | None = None, cut_short: Callable[[float], bool] | None = None) -> None:
        """No new runs; the running ones get `grace` seconds to finish, or until `cut_short`
        (which waits up to the seconds it is given) says True; then they are cancelled."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period if grace is None else grace
        log.info("daemon stopping", extra={"grace_period": grace, "active_runs": len(self.pool.active)})
        self.schedules.stop()
        self.pool.drain(grace, cut_short)
        self.live.close()  # the dashboard's event streams end, so that the HTTP server can stop
        if self.server is not None:
            self.server.should_exit = True
        if self._server_thread is not None:
            self._server_thread.join(timeout=10)
        self.status.close()
        try:
            self.store.daemon_gone(self.owner)
        except Exception:  # noqa: BLE001 - the store is gone too: its row ages out
            log.warning("cannot sign off from the store", exc_info=True)
        self.store.close()
        fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._lockfile.close()
        log.info("daemon stopped")

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully: the running runs get the grace
        period; a second signal cancels them at once. The handler only counts (runner.signals:
        a lock taken in it can deadlock the process); this thread logs and stops."""
        signals = StopSignals()
        signals.install()

        def second_signal(timeout: float) -> bool:
            if signals.wait(1, timeout) < 2:
                return False
            log.warning("second signal received: cancelling the running runs now",
                        extra={"signal": signals.names()[1], "active_runs": len(self.pool.active)})
            return True

        try:
            self.start()
            signals.wait(0, None)
            log.info("signal received", extra={"signal": signals.names()[0]})
        finally:
            self.stop(cut_short=second_signal)
