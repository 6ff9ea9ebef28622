"""What runs where: each configured pipeline's app on its servers, asked of the servers
themselves over SSH (the same reads as `runner status`, `runner releases` and
`runner deploy-lock show`), kept for a few seconds so that reloading the page does not open
a new connection to every server each time.

The pipeline file is opened with its secrets exactly as `runner exec` opens it (the SSH key
comes from the same `secrets:`), and every text shown passes the file's masker and the
daemon's.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from runner.errors import InvalidInput
from runner.pipeline_file import open_pipeline

FRESH_FOR = 10.0  # seconds a reading is shown before the servers are asked again


@dataclass(frozen=True)
class Release:
    position: int  # what `runner rollback --to` takes: 0 newest
    digest: str
    commit: str
    run_id: str
    time: float | None


@dataclass(frozen=True)
class ServerState:
    server: str
    state: str = ""  # docker's container state, "absent", or "error"
    health: str = ""
    digest: str = ""
    commit: str = ""
    run_id: str = ""
    since: str = ""
    verified: bool = False
    previous_verified: str = ""
    lock: str = "free"  # "free", who holds it, or why it could not be read
    error: str = ""
    releases: tuple[Release, ...] = ()


@dataclass(frozen=True)
class AppState:
    pipeline: str  # the daemon's name for it (its `pipelines:` entry)
    app: str = ""
    servers: tuple[ServerState, ...] = ()
    error: str = ""  # the file or its settings could not be read: nothing was asked
    read_at: float = field(default_factory=time.time)


def _read(core, entry) -> AppState:
    mask = core.masker.mask
    if entry.file is None:
        return AppState(entry.name, error=f"its pipeline is in the repository ({entry.pipeline}), read at "
                                          "each run's commit: no servers to read here")
    try:
        opened = open_pipeline(core.config.path(entry.file), dict(entry.vars),
                               destination=entry.destination)
    except InvalidInput as exc:
        return AppState(entry.name, error=mask(str(exc)))
    except OSError as exc:
        return AppState(entry.name, error=mask(f"{entry.file}: {exc.strerror or exc}"))

    def masked(text: str) -> str:
        return mask(opened.masker.mask(text))

    deploy = opened.pipeline.stages.deploy
    if not deploy.enabled or not deploy.servers:
        return AppState(entry.name, error="this pipeline deploys nowhere (no stages.deploy.servers)")
    from deployers.app_deployer import AppDeployer  # SSH only for this page
    from deployers.ssh_docker import ConfigError

    # Every role's containers: a role other than the primary one is a row `<server>/<role>`.
    d = AppDeployer(deploy, pipeline=opened.pipeline.name, image_name=opened.pipeline.image.name,
                    run_id="dashboard", secret=opened.secrets.value,
                    destination=opened.pipeline.destination)
    try:
        try:
            d.options()
        except ConfigError as exc:
            return AppState(entry.name, app=d.app, error=masked(str(exc)))
        statuses = d.verify()
        releases = {s: (hs, e) for s, hs, e in d.releases()}
        locks = {s: (info, e) for s, info, e in d.lock_status()}
    finally:
        d.close()
    servers = []
    for st in statuses:
        history, history_error = releases.get(st.server, ([], ""))
        info, lock_error = locks.get(st.server, (None, ""))
        lock = (f"cannot read it: {lock_error}" if lock_error else
                "free" if info is None else info.describe())
        servers.append(ServerState(
            server=st.server, state="error" if st.error else st.status, health=st.health or "",
            digest=st.digest, commit=st.commit, run_id=st.run_id, since=st.started_at,
            verified=st.verified, previous_verified=st.previous_verified, lock=masked(lock),
            error=masked(st.error or (f"releases: {history_error}" if history_error else "")),
            releases=tuple(Release(pos, h.get("digest", ""), str(h.get("commit") or ""), str(h.get("run_id") or ""),
                                   float(h["time"]) if h.get("time") else None)
                           for pos, h in enumerate(reversed(history)))))
    return AppState(entry.name, app=d.app, servers=tuple(servers))


class DeployState:
    """Readings per pipeline, each at most FRESH_FOR seconds old when shown."""

    def __init__(self, core, fresh_for: float = FRESH_FOR):
        self.core = core
        self.fresh_for = fresh_for
        self._lock = threading.Lock()
        self._readings: dict[str, AppState] = {}
        self._reading: dict[str, threading.Lock] = {}

    def get(self, name: str, refresh: bool = False) -> AppState | None:
        entry = self.core.config.pipeline(name)
        if entry is None:
            return None
        with self._lock:
            one_at_a_time = self._reading.setdefault(name, threading.Lock())
        with one_at_a_time:  # two page loads at once ask the servers once
            with self._lock:
                have = self._readings.get(name)
            if have is not None and not refresh and time.time() - have.read_at < self.fresh_for:
                return have
            try:
                state = _read(self.core, entry)
            except Exception as exc:  # noqa: BLE001 - a page must say what failed, not 500
                state = AppState(name, error=self.core.masker.mask(f"{type(exc).__name__}: {exc}"))
            with self._lock:
                self._readings[name] = state
            return state

    def forget(self, name: str) -> None:
        """After a deploy or rollback of it: the next page load asks the servers again."""
        with self._lock:
            self._readings.pop(name, None)
