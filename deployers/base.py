"""The one interface every deploy target implements, and the plain data it exchanges.

Contract for a `Deployer`:
- `plan()` is pure: no I/O. It returns a `DeployPlan` that says which servers are touched in
  which batches and which commands would run there; `plan().to_dict()` is what `--dry-run` prints.
- `apply(plan)` carries a plan out. It returns a `DeployReport` when every server is done (the
  new version healthy). When a server fails, it stops the rollout, puts back the previous
  version on every server the failed batch changed (and on the earlier batches unless the
  strategy says keep_done), and raises `DeployFailed`, whose report names each server, why it
  failed (last probe output, logs tail) and whether it was rolled back. It never leaves a server
  without the version that ran before, unless the server itself became unreachable mid-way: the
  report says so, and the next apply restores it before doing anything else.
  Calling apply again with the same plan is safe: servers already running the release are left
  as they are ("unchanged").
- `verify()` only reads: what runs on each server now (digest, commit, health, since when).
  Servers that cannot be reached are reported with an error, not raised.
- `rollback(to)` returns every server to the previous version it ran (or to digest `to`),
  with the same health gate and guarantees as apply; raises `DeployFailed` likewise.
- All methods honour cancellation (raise `runner.errors.Cancelled` after restoring what they
  changed) and are safe to call after an earlier call failed half-way. `close()` releases
  connections; it is idempotent.
- Nothing a deployer logs or raises contains a secret's value.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerResult:
    server: str
    status: str  # deployed | unchanged | failed | rolled_back | skipped | unreachable
    digest: str = ""  # what runs there now ("" if unknown)
    previous_digest: str = ""
    rolled_back: bool = False
    reason: str = ""
    duration: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.server, "status": self.status, "digest": self.digest,
                "previous_digest": self.previous_digest, "rolled_back": self.rolled_back,
                "reason": self.reason, "duration": round(self.duration, 3)}


@dataclass(frozen=True)
class DeployReport:
    app: str
    servers: tuple[ServerResult, ...]
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"app": self.app, "ok": self.ok, "servers": [s.to_dict() for s in self.servers]}

    def summary(self) -> str:
        lines = []
        for s in self.servers:
            line = f"{s.server}: {s.status}"
            if s.digest:
                line += f" ({s.digest[:19]})"
            if s.reason:
                line += f": {s.reason}"
            lines.append(line)
        return "\n".join(lines)


class DeployFailed(Exception):
    """The deploy failed on at least one server; `report` says where, why and what was undone."""

    def __init__(self, report: DeployReport, headline: str):
        self.report = report
        super().__init__(f"{headline}\n{report.summary()}")


@dataclass(frozen=True)
class ServerStatus:
    server: str
    app: str
    running: bool = False
    status: str = ""  # docker's: running, exited, ... or "absent"
    health: str | None = None
    digest: str = ""
    commit: str = ""
    run_id: str = ""
    started_at: str = ""
    error: str = ""  # could not ask the server

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ServerPlan:
    server: str
    address: str  # user@host:port
    commands: tuple[tuple[str, ...], ...]  # the main docker commands, in order


@dataclass(frozen=True)
class DeployPlan:
    app: str
    image: str  # name@digest (or a placeholder before the push)
    strategy: str
    on_failure: str
    batches: tuple[tuple[str, ...], ...]  # server labels
    servers: tuple[ServerPlan, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app, "image": self.image, "strategy": self.strategy,
            "on_failure": self.on_failure, "batches": [list(b) for b in self.batches],
            "servers": [{"name": s.server, "address": s.address,
                         "commands": [list(c) for c in s.commands]} for s in self.servers],
            "notes": list(self.notes),
        }


class Deployer(ABC):
    """See the module docstring for the contract."""

    @abstractmethod
    def plan(self) -> DeployPlan:
        """What apply would do, as data. Pure."""

    @abstractmethod
    def apply(self, plan: DeployPlan) -> DeployReport:
        """Roll the release out. Raises DeployFailed after rolling back."""

    @abstractmethod
    def verify(self) -> list[ServerStatus]:
        """What runs on each server now. Read-only."""

    @abstractmethod
    def rollback(self, to: str | None = None) -> DeployReport:
        """Back to the previous version (or digest `to`) everywhere. Raises DeployFailed."""

    def close(self) -> None:
        """Release connections. Idempotent."""
