"""The deploy's plain data (plan, per-server results, report) and the two interfaces it runs on.

A deploy is planned (deployers.plan: pure, settings + image -> `DeployPlan`), then one generic
rollout (deployers.rollout) carries the plan out by driving a `ServerSteps` implementation
server by server: batches, canary, rolling, on_failure, cancellation and the report live there
once, not in each deploy target. deployers.stop_start.StopStartSteps and
deployers.ssh_proxy.ProxySteps are two sibling implementations over shared building blocks
(deployers.server_session); another target is one more.

The `Deployer` facade (plan / apply / verify / rollback / close) is what the stage and the CLI
use; `apply(plan)` runs exactly the plan it is given, and `plan().to_dict()` is what
`--dry-run` prints.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

from deployers.commands import Argv, Slot, bind, show
from deployers.hooks import PlannedHook
from deployers.spec import Release, Target
# The deploy's report is the deploy stage's outputs: one type, defined with the other stages'.
from runner.outputs import DeployOutputs


# ----------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class PlannedCommand:
    """One command of a server's plan: `key` is how the steps find it, `phase` when it runs,
    `when` the condition under which it runs ("" = always)."""

    key: str
    phase: str  # prepare | switch | verify | restore | commit
    argv: Argv
    when: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase, "argv": show(self.argv)}
        if self.when:
            out["when"] = self.when
        return out


@dataclass(frozen=True)
class ServerPlan:
    """Everything one server gets: the complete release and the commands that make it run."""

    target: Target
    release: Release
    commands: tuple[PlannedCommand, ...]

    @property
    def server(self) -> str:
        return self.target.label

    def command(self, key: str) -> PlannedCommand:
        for c in self.commands:
            if c.key == key:
                return c
        raise KeyError(f"the plan for {self.server} has no {key!r} command")

    def has(self, key: str) -> bool:
        return any(c.key == key for c in self.commands)

    def argv(self, key: str, values: dict[Slot, str] | None = None) -> list[str]:
        """The planned argv `key`, its slots filled in: what the steps run."""
        return bind(self.command(key).argv, values or {})

    def to_dict(self) -> dict[str, Any]:
        t, r = self.target, self.release
        return {"name": t.label, "address": f"{t.user}@{t.host}:{t.port}",
                "release": {"image": str(r.image), "commit": r.commit, "run_id": r.run_id,
                            "container": r.spec.name,
                            "secrets": "fingerprint computed on the server"
                            if r.spec.secret_env else "none"},
                "commands": [c.to_dict() for c in self.commands]}


@dataclass(frozen=True)
class DeployPlan:
    app: str
    what: str  # deploy | rollback
    strategy: str
    on_failure: str
    batches: tuple[tuple[str, ...], ...]  # server labels, in rollout order
    servers: tuple[ServerPlan, ...]
    parallel: int = 16
    notes: tuple[str, ...] = ()
    placeholder: bool = False  # the image's digest is not known yet (a dry run before a push)
    release_on: str = ""  # the server that runs the release command ("" = none: no command)
    hooks: tuple[PlannedHook, ...] = ()  # run on the runner's host by the deploy stage

    def server(self, label: str) -> ServerPlan:
        return next(s for s in self.servers if s.server == label)

    def to_dict(self) -> dict[str, Any]:
        images = sorted({str(s.release.image) for s in self.servers})
        return {
            "app": self.app, "what": self.what,
            "image": images[0] if len(images) == 1 else images,
            "strategy": self.strategy, "on_failure": self.on_failure,
            "batches": [list(b) for b in self.batches],
            **({"release_command_on": self.release_on} if self.release_on else {}),
            **({"hooks": {h.phase: h.to_dict() for h in self.hooks}} if self.hooks else {}),
            "servers": [s.to_dict() for s in self.servers],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------- results
# ServerResult and DeployOutputs (the report of a deploy or a rollback) are in runner.outputs.


class DeployFailed(Exception):
    """The deploy failed on at least one server; `report` says where, why and what was undone."""

    invalid_input = False  # the request itself named nothing that exists (exit 2, not 1)

    def __init__(self, report: DeployOutputs):
        self.report = report
        super().__init__(f"{report.headline}\n{report.summary()}")


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
    verified: bool = False  # what runs is the newest release in the server's history
    previous_verified: str = ""  # the newest verified digest, when what runs is not it
    error: str = ""  # could not ask the server
    route: str = ""  # the proxy cutover: the digest the app's route on the server serves
    maintenance: bool = False  # the proxy cutover: the route answers the 503 page instead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- per-server steps

class StepFailed(Exception):
    """A step failed on one server. `touched`: whether anything running there was changed
    before the failure (the rollout then asks the steps to restore it)."""

    def __init__(self, server: str, reason: str, *, touched: bool = True):
        self.server = server
        self.reason = reason
        self.touched = touched
        super().__init__(f"{server}: {reason}")


class LockLostStep(StepFailed):
    """Another run took this server's deploy lock: this run must not change it any more."""

    def __init__(self, server: str, reason: str):
        super().__init__(server, reason, touched=True)


@dataclass
class Switch:
    """A server between switch and commit. The rollout reads the public fields; `detail`
    belongs to the steps implementation."""

    server: str
    release: Release  # what this run put there
    unchanged: bool = False  # the release already ran there, verified: nothing was switched
    previous_digest: str = ""  # what ran there when this run came
    recovered: str = ""  # what prepare did to return the server to its last verified release
    unchecked: str = ""  # why nothing checked the new container's health ("" when it was checked)
    detail: Any = None


@dataclass(frozen=True)
class Restored:
    """What restore achieved. ok: the previous verified release runs again (or there was none,
    and the new container is gone: none_before)."""

    ok: bool
    running: str = ""  # digest running now, "" if unknown or nothing
    kept: str = ""  # where the previous verified release is kept when it is not running
    note: str = ""
    none_before: bool = False  # nothing of the app ran there before: nothing was put back


class ServerSteps(ABC):
    """The per-server half of a rollout, driven by deployers.rollout for each server of a plan.

    Before any server's prepare, the rollout calls reach for every server (in parallel), then
    take_lock for every server, one at a time, in the order of what reach returned: every run
    takes the locks of shared servers in the same order, so two runs never hold some each and
    wait for each other. Then on one server: prepare -> switch -> verify -> commit, or, when
    switch or verify (or a later server) fails: restore. Every method is safe to call after an
    earlier call on that server failed half-way, and idempotent where it changes something.
    Threads: the rollout calls the methods of different servers at once, never two of one server
    at once.

    - reach(plan): connect; return the server's key in the lock order (the same for two names
      of one server). Raises StepFailed(touched=False).
    - take_lock(plan): take the server's deploy lock, waiting a bounded time for another run
      and saying who holds it; raises StepFailed(touched=False) naming the holder.
    - prepare(plan): make the image present (pull), and return the server to its last
      verified release if an earlier run left it mid-switch.
      Nothing that serves traffic changes, apart from that recovery. Returns the `Switch` to
      pass on. Raises StepFailed(touched=False).
    - release(sw): on the one server the plan names (release_on), once its prepare is done
      and before any server's switch: run the release command (phase "release" of its plan);
      raises StepFailed(touched=False) naming the command and its exit code.
    - switch(sw): start the new release (the previous one kept for restore); sets
      sw.unchanged when the same release already runs there verified. Raises StepFailed.
    - verify(sw): the health gate on the container this run started (by id, never by name);
      when it passes, the new release takes over (the previous stops). Sets sw.unchecked when
      there was nothing to check (the report then never calls it healthy). Raises StepFailed.
    - restore(sw): put the previous verified release back and remove what this run started.
      Never raises; says what it achieved. Must not touch a server whose lock was lost.
    - commit(sw): record the release as verified in the server's history, then drop the
      previous one. Checks the lock is still held first (raises LockLostStep before writing).
    - timings(server): seconds per phase so far, for the report.
    - finish(): release every lock this run holds. Idempotent; never raises.

    All methods raise runner.errors.Cancelled when the rollout's cancel event is set (restore
    and commit excepted: they finish what they started). Nothing they log or raise contains a
    secret's value.
    """

    def reach(self, plan: ServerPlan) -> str:
        return plan.server

    def take_lock(self, plan: ServerPlan) -> None:
        """A target without locks takes none."""

    @abstractmethod
    def prepare(self, plan: ServerPlan) -> Switch: ...

    def release(self, sw: Switch) -> None:
        """A target that cannot run a release command refuses a plan that has one."""
        raise StepFailed(sw.server, "this deploy target cannot run a release command",
                         touched=False)

    @abstractmethod
    def switch(self, sw: Switch) -> None: ...

    @abstractmethod
    def verify(self, sw: Switch) -> None: ...

    @abstractmethod
    def restore(self, sw: Switch) -> Restored: ...

    @abstractmethod
    def commit(self, sw: Switch) -> None: ...

    def timings(self, server: str) -> dict[str, float]:
        return {}

    def finish(self) -> None:
        """Release locks. Idempotent."""


class Deployer(ABC):
    """What the deploy stage and the CLI use. See the module docstring."""

    @abstractmethod
    def plan(self) -> DeployPlan:
        """What apply would do, as data. Pure."""

    @abstractmethod
    def apply(self, plan: DeployPlan) -> DeployOutputs:
        """Carry out exactly `plan`. Raises DeployFailed (with the report) when a server fails."""

    @abstractmethod
    def verify(self) -> list[ServerStatus]:
        """What runs on each server now. Read-only; unreachable servers get an error row."""

    @abstractmethod
    def rollback(self, to: str | None = None) -> DeployOutputs:
        """Back to the previous verified release (or `to`) everywhere. Raises DeployFailed."""

    def close(self) -> None:
        """Release connections. Idempotent."""
