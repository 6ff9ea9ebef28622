"""A whole app: every role (runner.model.roles) deployed as one release, in one rollout.

Each role is deployed by an `SSHDockerDeployer` of its own, over that role's deploy settings
(its container name, servers, command, env, health check; the proxy cutover for the role
behind the proxy, stop-start for the others), so that a role is deployed exactly like an app
without roles: its own history, lock and kept containers on each server. `AppDeployer` puts
every role's containers into one plan (a `Unit` per role per server, batched by server) and
one rollout, whose steps (`AppSteps`) send each unit to its role's steps. So one release
means: every role switched, verified, then committed; a failure of any (a worker that
crash-loops) puts every role back; a rollback returns them together.

A deploy without `roles:` has one role, the container, and runs as it always did.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef
from runner.model.roles import RoleSettings, role_settings
from runner.outputs import DeployOutputs, ServerResult

from deployers import lock as locks
from deployers.base import (DeployFailed, Deployer, DeployPlan, Restored, ServerPlan,
                            ServerStatus, ServerSteps, Switch)
from deployers.plan import PLACEHOLDER_DIGEST, Needs, Unit, plan_units, units_of
from deployers.rollout import UNTOUCHED, headline, rollout
from deployers.spec import Release, Target, app_name, release_for, targets
from deployers.ssh_docker import ConfigError, SSHDockerDeployer


class AppSteps(ServerSteps):
    """The steps of a rollout over several roles: each unit's calls go to the steps of its
    role's deploy target (deployers.ssh_docker, deployers.ssh_proxy). The rollout calls the
    methods of different units at once; a unit is one role on one server."""

    def __init__(self, by_unit: dict[str, ServerSteps]):
        self.by_unit = by_unit
        self.all = list({id(s): s for s in by_unit.values()}.values())

    def reach(self, plan: ServerPlan) -> str:
        return self.by_unit[plan.server].reach(plan)

    def take_lock(self, plan: ServerPlan) -> None:
        self.by_unit[plan.server].take_lock(plan)

    def prepare(self, plan: ServerPlan) -> Switch:
        return self.by_unit[plan.server].prepare(plan)

    def release(self, sw: Switch) -> None:
        self.by_unit[sw.server].release(sw)

    def switch(self, sw: Switch) -> None:
        self.by_unit[sw.server].switch(sw)

    def verify(self, sw: Switch) -> None:
        self.by_unit[sw.server].verify(sw)

    def restore(self, sw: Switch) -> Restored:
        return self.by_unit[sw.server].restore(sw)

    def commit(self, sw: Switch) -> None:
        self.by_unit[sw.server].commit(sw)

    def timings(self, server: str) -> dict[str, float]:
        steps = self.by_unit.get(server)
        return steps.timings(server) if steps is not None else {}

    def finish(self) -> None:
        for s in reversed(self.all):
            s.finish()


def split_releases(chosen: dict[str, Release], server_of: dict[str, str]) -> list[str]:
    """Where the roles of one server would go back to different releases (a rollback must
    return them together): one line per such server, naming each unit's digest. Pure."""
    by_server: dict[str, dict[str, str]] = {}
    for unit, release in chosen.items():
        by_server.setdefault(server_of.get(unit, unit), {})[unit] = release.digest
    return [f"{server}: " + ", ".join(f"{u} -> {d[:19]}" for u, d in sorted(units.items()))
            for server, units in sorted(by_server.items()) if len(set(units.values())) > 1]


class AppDeployer(Deployer):
    """See the module docstring. `roles`: the app's roles, the primary one first;
    `by_role[name]`: the deployer of one role; `primary`: the primary role's (its containers
    carry the app's name and its proxy route)."""

    def __init__(self, stage: DeploySettings, *, pipeline: str, image_name: str, run_id: str,
                 image: ImageRef | None = None, commit: str = "",
                 secret: Callable[[str], str] | None = None,
                 log: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, needs: Needs | None = None,
                 destination: str = ""):
        self.stage = stage
        self.pipeline = pipeline
        self.image_name = image_name
        self.run_id = run_id
        self.image = image
        self.commit = commit
        self.app = app_name(stage, pipeline)
        self.cancel = cancel or threading.Event()
        self.needs = needs
        self.roles: tuple[RoleSettings, ...] = role_settings(stage, self.app)
        said = threading.Lock()  # one log, written by every role's threads

        def log_line(line: str) -> None:
            with said:
                (log or (lambda _line: None))(line)
        self.by_role: dict[str, SSHDockerDeployer] = {
            r.name: SSHDockerDeployer(r.stage, pipeline=pipeline, image_name=image_name,
                                      run_id=run_id, image=image, commit=commit, secret=secret,
                                      log=log_line, cancel=self.cancel, needs=needs,
                                      destination=destination)
            for r in self.roles}
        self.primary = self.by_role[self.roles[0].name]
        # Every server of the app (a role may run on some of them only).
        self.targets: tuple[Target, ...] = targets(stage, self.primary.ssh_config)
        self.log = self.primary.log

    def secret_value(self, name: str) -> str:
        """A secret of the pipeline by name (raises ConfigError when it has no value)."""
        return self.primary.secret_value(name)

    # ------------------------------------------------------------------- units

    def server_of(self) -> dict[str, str]:
        """Unit label (`web-1`, `web-1/worker`) -> the server's own label."""
        return {t.label: t.label.removesuffix(r.unit_suffix)
                for r in self.roles for t in self.by_role[r.name].targets}

    def _plan(self, what: str, releases: dict[str, Release], placeholder: bool = False
              ) -> DeployPlan:
        server_of = self.server_of()
        units: list[Unit] = []
        for r in self.roles:
            d = self.by_role[r.name]
            units += units_of(r.stage, releases, d.targets, server_of)
        return plan_units(self.stage, self.app, what, self.run_id, tuple(units),
                          placeholder=placeholder, needs=self.needs)

    # -------------------------------------------------------------- Deployer

    def plan(self) -> DeployPlan:
        image = self.image or ImageRef(self.image_name, PLACEHOLDER_DIGEST)
        releases: dict[str, Release] = {}
        for r in self.roles:
            release = release_for(r.stage, image, pipeline=self.pipeline, run_id=self.run_id,
                                  commit=self.commit)
            releases.update({t.label: release for t in self.by_role[r.name].targets})
        return self._plan("deploy", releases, placeholder=self.image is None)

    def options(self) -> None:
        """Configuration errors (keys, known_hosts, secrets) before anything is touched."""
        for d in self.by_role.values():
            d.options()

    def apply(self, plan: DeployPlan | None = None) -> DeployOutputs:
        plan = plan or self.plan()
        if plan.placeholder:
            raise ConfigError("no release to deploy: the push stage did not produce a digest")
        self.options()
        by_unit: dict[str, ServerSteps] = {}
        for r in self.roles:
            steps = self.by_role[r.name].steps()
            by_unit.update({t.label: steps for t in self.by_role[r.name].targets})
        return rollout(plan, AppSteps(by_unit), log=self.log, cancel=self.cancel)

    def rollback_releases(self, to: str | None = None) -> dict[str, Release]:
        """The release each unit would go back to, read from the servers, changing nothing.
        Raises DeployFailed naming every unit without one, or where one server's roles would
        go back to different releases."""
        chosen: dict[str, Release] = {}
        refused: list[DeployFailed] = []
        for r in self.roles:
            try:
                chosen.update(self.by_role[r.name].rollback_releases(to))
            except DeployFailed as exc:
                refused.append(exc)
        if refused:
            rows = tuple(s for exc in refused for s in exc.report.servers)
            failed = DeployFailed(DeployOutputs(self.app, "rollback", rows, False,
                                                headline("rollback", self.app, rows, False)))
            failed.invalid_input = all(exc.invalid_input for exc in refused)
            raise failed
        split = split_releases(chosen, self.server_of())
        if split:
            rows = tuple(ServerResult(line.split(":", 1)[0], "failed", reason=(
                f"its roles would go back to different releases ({line.split(': ', 1)[1]}): "
                f"a release is every role on one digest; name one with --to; {UNTOUCHED}"))
                for line in split)
            failed = DeployFailed(DeployOutputs(self.app, "rollback", rows, False,
                                                headline("rollback", self.app, rows, False)))
            failed.invalid_input = True
            raise failed
        return chosen

    def rollback(self, to: str | None = None) -> DeployOutputs:
        return self.apply(self._plan("rollback", self.rollback_releases(to)))

    def verify(self) -> list[ServerStatus]:
        return [row for r in self.roles for row in self.by_role[r.name].verify()]

    def releases(self) -> list[tuple[str, list[dict], str]]:
        """(unit, history oldest first, error) for every role on every server."""
        return [row for r in self.roles for row in self.by_role[r.name].releases()]

    def lock_status(self) -> list[tuple[str, locks.LockInfo | None, str]]:
        return [row for r in self.roles for row in self.by_role[r.name].lock_status()]

    def break_lock(self, server: str | None = None) -> list[tuple[str, bool, str]]:
        """Break the app's lock of every role (on one server, by its name or host, or all)."""
        labels = {t.label for t in self.targets}
        out = []
        for r in self.roles:
            name = server + r.unit_suffix if server in labels else server
            out += self.by_role[r.name].break_lock(name)
        return out

    def close(self) -> None:
        for d in self.by_role.values():
            d.close()


__all__ = ["AppDeployer", "AppSteps", "split_releases"]
