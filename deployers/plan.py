"""The deploy planner: deploy settings + releases -> `DeployPlan`. Pure: no I/O.

The plan holds, for every server, the complete release and every docker command the SSH steps
will run, as argv lists whose server-side unknowns are `Slot`s (deployers.commands). The steps
take their commands from the plan (`ServerPlan.argv(key, values)`), so `--dry-run` prints what
really runs.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef

from deployers import commands as cmd
from deployers import proxy
from deployers import release_command
from deployers.accessory_plan import AccessorySpec, check_argv
from deployers.base import DeployPlan, PlannedCommand, ServerPlan
from deployers.commands import Slot
from deployers.hooks import PlannedHook
from deployers.spec import Release, Target, app_name, batches, release_for, targets

# A dry run before the push knows no digest yet.
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
UNVERIFIED = Slot("unverified container")
# server label -> the accessories that must run there before any server switches.
Needs = Mapping[str, tuple[AccessorySpec, ...]]
VERIFIED = Slot("verified container")
ASIDE = Slot("container left aside")
RUNNING = Slot("running container")
STRAY = Slot("kept container holding the proxy's ports")


@dataclass(frozen=True)
class Action:
    """A planned command that a decision (deployers.recovery, deployers.restore_plan) chose to
    run: `key` in the server's plan, its slots filled in; `check`: whether a failure stops the
    step; `timeout` in seconds (None: the connection's command timeout)."""

    key: str
    slots: tuple[tuple[Slot, str], ...] = field(default=())
    check: bool = True
    timeout: float | None = None

    def argv(self, plan: ServerPlan) -> list[str]:
        return plan.argv(self.key, dict(self.slots))


def safe_name(text: str, limit: int = 24) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]", "-", text) or "x")[:limit]


def previous_name(app: str, run_id: str) -> str:
    """Where a run keeps the container it replaces until it commits (or restores it)."""
    return f"{app}_prev_{safe_name(run_id)}"


def kept_name(app: str, run_id: str) -> str:
    """Where the proxy cutover keeps a replaced container (stopped) for an instant rollback."""
    return f"{app}_kept_{safe_name(run_id)}"


def release_name(app: str, run_id: str) -> str:
    """The one-off container of a run's release command."""
    return f"{app}_release_{safe_name(run_id)}"


def server_commands(stage: DeploySettings, release: Release, run_id: str) -> tuple[PlannedCommand,
                                                                                ...]:
    if stage.proxy is not None:
        return _proxy_commands(stage, release, run_id)
    return _stop_start_commands(stage, release, run_id)


def _prepare_commands(stage: DeploySettings, release: Release) -> list[PlannedCommand]:
    spec, image = release.spec, release.image
    missing = "the image is not on the server yet"
    user = stage.registry.username
    out = []
    if user:
        out.append(PlannedCommand("login", "prepare",
                                  tuple(cmd.login(image.registry, user, config=cmd.LOGIN_DIR)),
                                  missing))
    out += [
        PlannedCommand("pull", "prepare",
                       tuple(cmd.pull(str(image), config=cmd.LOGIN_DIR if user else None)),
                       missing),
        PlannedCommand("recover_remove", "prepare", tuple(cmd.remove(UNVERIFIED)),
                       "an earlier run left an unverified release running"),
        PlannedCommand("recover_rename", "prepare", tuple(cmd.rename(VERIFIED, spec.name)),
                       "an earlier run left the last verified release aside"),
        PlannedCommand("recover_start", "prepare", tuple(cmd.start(spec.name)),
                       "an earlier run left the last verified release aside"),
        PlannedCommand("recover_remove_aside", "prepare", tuple(cmd.remove(ASIDE)),
                       "an earlier run left an older release aside that is not the last "
                       "verified one (it died before removing it)"),
    ]
    return out


def proxy_container_commands(p) -> tuple[PlannedCommand, ...]:
    """The commands that keep the proxy container running (settings `p`, a
    runner.model.deploy.Proxy), in the order they may run: what a deploy's prepare and
    `runner proxy boot` run (deployers.ssh_proxy.ProxyOps.ensure), after `network`."""
    ports = ", ".join(proxy.published(p))
    holding = f"a kept copy that the engine started again holds {ports} and the proxy is to start"
    return (
        PlannedCommand("proxy_replace", "prepare", tuple(cmd.remove(proxy.PROXY_CONTAINER)),
                       "the proxy was made by an older runner (a short gap, this once)"),
        # `--restart always` brought it back with the engine; it must not come back again.
        PlannedCommand("stray_kept_unrestart", "prepare", tuple(cmd.set_restart(STRAY, "no")),
                       holding),
        PlannedCommand("stray_kept_stop", "prepare", tuple(cmd.stop(STRAY, 10)), holding),
        PlannedCommand("proxy_boot", "prepare", tuple(cmd.proxy_run(p)),
                       "no proxy runs on the server yet (its config: every app's route)"),
        PlannedCommand("proxy_boot_undo", "prepare", tuple(cmd.remove(proxy.PROXY_CONTAINER)),
                       "starting the proxy failed (what it left is removed)"),
        PlannedCommand("proxy_start", "prepare", tuple(cmd.start(proxy.PROXY_CONTAINER)),
                       "the proxy exists, stopped"),
    )


def _probe_commands(release: Release) -> list[PlannedCommand]:
    h = release.spec.health
    if h.kind == "cmd":
        return [PlannedCommand("probe", "verify",
                               tuple(cmd.probe(cmd.NEW, ["CMD-SHELL", h.cmd or ""])),
                               f"every {h.probe_interval:g}s until healthy")]
    if h.kind == "http":
        return [PlannedCommand(
            "probe_fallback", "verify",
            tuple(cmd.http_probe(cmd.NEW, h.http_port or 80, h.http_path, h.probe_timeout)),
            "the server forbids SSH TCP forwarding (else GET over the SSH connection)")]
    return []


def _proxy_commands(stage: DeploySettings, release: Release, run_id: str
                    ) -> tuple[PlannedCommand, ...]:
    """The proxy cutover: the new container starts beside the old one, on the runner's
    network, publishing no port; traffic moves by a route switch once it is healthy."""
    spec, p = release.spec, stage.proxy
    prev = previous_name(spec.name, run_id)
    runs = "a container of the app exists"
    out = _prepare_commands(stage, release)
    out += [
        PlannedCommand("leave_stop_start", "prepare", tuple(cmd.stop(RUNNING, p.drain_timeout)),
                       "no proxy runs yet and the app's container, deployed stop-start, "
                       "publishes the proxy's port (a one-time gap while moving to the proxy)"),
        PlannedCommand("network", "prepare", tuple(cmd.network_create()),
                       f"the server has no `{proxy.NETWORK}` network yet"),
        *proxy_container_commands(p),
        PlannedCommand("rename_previous", "switch", tuple(cmd.rename(spec.name, prev)), runs),
        PlannedCommand("reuse", "switch", tuple(cmd.rename(cmd.KEPT, spec.name)),
                       "a kept stopped container is this very release (a rollback)"),
        PlannedCommand("restart_reused", "switch", tuple(cmd.set_restart(spec.name,
                                                                         spec.restart)),
                       "a kept stopped container is this very release (a rollback)"),
        PlannedCommand("start_reused", "switch", tuple(cmd.start(spec.name)),
                       "a kept stopped container is this very release (a rollback)"),
        PlannedCommand(
            "run", "switch",
            tuple(cmd.run(spec, env_file=cmd.ENV_FILE if spec.has_env else None,
                          secrets=cmd.SECRETS if spec.secret_env else None,
                          alias=proxy.alias(spec.name, run_id))),
            "no kept container is this release"),
    ]
    if p.health is None:
        out += _probe_commands(release)
    out += [
        PlannedCommand("logs", "verify", tuple(cmd.logs(cmd.NEW, 10)), "the health gate fails"),
        PlannedCommand("route", "verify", tuple(cmd.proxy_reload(cmd.CONFIG)),
                       "the health gate passed: the route moves to the new container"),
        PlannedCommand("stop_previous", "verify", tuple(cmd.stop(prev, p.drain_timeout)),
                       f"{runs}, after {p.watch:g}s of watching the new one"),
        PlannedCommand("start_drained", "restore", tuple(cmd.start(cmd.PREVIOUS)),
                       "restoring, the route had moved and the previous container was drained"),
        PlannedCommand("route_back", "restore", tuple(cmd.proxy_reload(cmd.CONFIG)),
                       "restoring, the route had moved"),
        PlannedCommand("unrestart_reused", "restore", tuple(cmd.set_restart(cmd.NEW, "no")),
                       "restoring a kept container this run started again"),
        PlannedCommand("stop_reused", "restore", tuple(cmd.stop(cmd.NEW, p.drain_timeout)),
                       "restoring a kept container this run started again"),
        PlannedCommand("rename_reused_back", "restore", tuple(cmd.rename(cmd.NEW, cmd.KEPT)),
                       "restoring a kept container this run started again (its name is free)"),
        PlannedCommand("remove_new", "restore", tuple(cmd.remove(cmd.NEW)), "restoring"),
        PlannedCommand("rename_back", "restore", tuple(cmd.rename(prev, spec.name)),
                       f"restoring, {runs}"),
        PlannedCommand("start_previous", "restore", tuple(cmd.start(spec.name)),
                       "restoring, the previous container was stopped"),
        PlannedCommand("keep_previous", "commit", tuple(cmd.rename(prev, cmd.KEPT)), runs),
        # `--restart always` brings even a stopped container back when the engine restarts.
        PlannedCommand("unrestart_kept", "commit", tuple(cmd.set_restart(cmd.KEPT, "no")),
                       runs),
        PlannedCommand("prune_kept", "commit", tuple(cmd.remove(cmd.KEPT)),
                       f"a kept container falls out of the last {stage.keep_versions} releases"),
        PlannedCommand("prune", "commit", tuple(cmd.remove_image(cmd.PRUNED)), _prune_when(stage)),
    ]
    return tuple(out)


def _stop_start_commands(stage: DeploySettings, release: Release, run_id: str
                         ) -> tuple[PlannedCommand, ...]:
    spec = release.spec
    prev = previous_name(spec.name, run_id)
    runs = "a container of the app exists"
    out = _prepare_commands(stage, release)
    if spec.network == proxy.NETWORK:  # the app meets its accessories there
        out.append(PlannedCommand("network", "prepare", tuple(cmd.network_create()),
                                  f"the server has no `{proxy.NETWORK}` network yet"))
    out.append(PlannedCommand("rename_previous", "switch", tuple(cmd.rename(spec.name, prev)),
                              runs))
    stop = tuple(cmd.stop(prev, spec.stop_timeout))
    if spec.ports:  # two containers cannot publish one host port
        out.append(PlannedCommand("stop_previous", "switch", stop,
                                  f"{runs} (it publishes host ports)"))
    out.append(PlannedCommand(
        "run", "switch",
        tuple(cmd.run(spec, env_file=cmd.ENV_FILE if spec.has_env else None,
                      secrets=cmd.SECRETS if spec.secret_env else None))))
    out += _probe_commands(release)
    if not spec.ports:
        out.append(PlannedCommand("stop_previous", "verify", stop,
                                  f"{runs}, once the new one is healthy"))
    out += [
        PlannedCommand("logs", "verify", tuple(cmd.logs(cmd.NEW, 10)), "the health gate fails"),
        PlannedCommand("remove_new", "restore", tuple(cmd.remove(cmd.NEW)), "restoring"),
        PlannedCommand("rename_back", "restore", tuple(cmd.rename(prev, spec.name)),
                       f"restoring, {runs}"),
        PlannedCommand("start_previous", "restore", tuple(cmd.start(spec.name)),
                       "restoring, the previous container was running"),
        PlannedCommand("remove_previous", "commit", tuple(cmd.remove(prev)), runs),
        PlannedCommand("prune", "commit", tuple(cmd.remove_image(cmd.PRUNED)), _prune_when(stage)),
    ]
    return tuple(out)


def _prune_when(stage: DeploySettings) -> str:
    return (f"an image falls out of the last {stage.keep_versions} verified releases, or the "
            f"runner pulled it for a release not among them (failed, rolled back, interrupted)")


def _accessory_check(needs: Needs | None, server: str) -> tuple[PlannedCommand, ...]:
    specs = (needs or {}).get(server, ())
    if not specs:
        return ()
    return (PlannedCommand("accessories", "reach", tuple(check_argv(specs)),
                           f"before any server switches: {', '.join(s.name for s in specs)} "
                           f"must run there, else nothing is switched anywhere"),)


def _hooks(stage: DeploySettings) -> tuple[PlannedHook, ...]:
    h = stage.hooks
    return tuple(PlannedHook(phase, argv, h.timeout)
                 for phase, argv in (("pre_deploy", h.pre_deploy), ("post_deploy", h.post_deploy))
                 if argv)


@dataclass(frozen=True)
class Unit:
    """One role's container on one server: what a rollout switches, verifies and commits as
    one step. `target.label` names the unit (`web-1`, `web-1/worker`); `server` is the
    server's own name, by which the batches group units; `stage` the role's deploy settings
    (runner.model.roles.RoleSettings.stage)."""

    target: Target
    server: str
    stage: DeploySettings
    release: Release


def plan_units(stage: DeploySettings, app: str, what: str, run_id: str, units: tuple[Unit, ...],
               placeholder: bool = False, needs: Needs | None = None) -> DeployPlan:
    """`stage`: the app's deploy settings (strategy, hooks, release command, the servers'
    order); `units`: every role's container on every server it runs on."""
    present = {u.server for u in units}
    servers = tuple(s.label for s in stage.servers if s.label in present)
    servers += tuple(dict.fromkeys(u.server for u in units if u.server not in servers))
    order = [tuple(u for u in units if u.server in b)
             for b in batches(servers, stage.strategy.type, stage.strategy.batch_size)]
    # A deploy's release command runs once, on the first server of the first batch (in the
    # container of its first role there); a rollback runs none (the release it returns to ran
    # its own when it was deployed).
    release_on = order[0][0].target.label if what == "deploy" and stage.release_command \
        and order else ""

    def commands(u: Unit) -> tuple[PlannedCommand, ...]:
        r = u.release
        cmds = server_commands(u.stage, r, run_id)
        if u.target.label != release_on:
            return cmds
        # Printed where it runs: after the server's prepare, before its switch.
        at = max(i for i, c in enumerate(cmds) if c.phase == "prepare") + 1
        return cmds[:at] + release_command.planned(r, stage.release_command,
                                                   release_name(r.spec.name, run_id)) + cmds[at:]
    plans = tuple(ServerPlan(u.target, u.release, _accessory_check(needs, u.server) + commands(u))
                  for b in order for u in b)
    h = stage.healthcheck
    kinds = sorted({u.release.spec.health.kind for u in units})
    notes = (
        "commands with a `when` run only then; <slots> are filled in on the server",
        f"health: {', '.join(kinds) or '-'}, up to {h.timeout:g}s per server",
        f"keeps the last {stage.keep_versions} verified releases on each server; the images "
        f"of releases never verified go at the next commit",
    )
    return DeployPlan(
        app=app, what=what, strategy=stage.strategy.type, on_failure=stage.strategy.on_failure,
        batches=tuple(tuple(u.target.label for u in b) for b in order),
        servers=plans, parallel=stage.parallel, notes=notes, placeholder=placeholder,
        release_on=release_on, hooks=_hooks(stage) if what == "deploy" else ())


def units_of(stage: DeploySettings, releases: dict[str, Release],
             all_targets: tuple[Target, ...], server_of: Mapping[str, str] | None = None
             ) -> tuple[Unit, ...]:
    """The units of one role: each of `all_targets` that has a release. `server_of`: unit
    label -> the server's name (default: the label)."""
    return tuple(Unit(t, (server_of or {}).get(t.label, t.label), stage, releases[t.label])
                 for t in all_targets if t.label in releases)


def plan_deploy(stage: DeploySettings, *, pipeline: str, image_name: str, run_id: str,
                image: ImageRef | None = None, commit: str = "",
                servers: tuple[Target, ...] | None = None, needs: Needs | None = None
                ) -> DeployPlan:
    """The deploy of `image` (None: a dry run before the push; the digest is a placeholder).
    `servers`: the stage's targets as resolved with the user's ~/.ssh/config (default: the
    pipeline's settings alone); `needs`: the accessories that must run on each server."""
    placeholder = image is None
    image = image or ImageRef(image_name, PLACEHOLDER_DIGEST)
    release = release_for(stage, image, pipeline=pipeline, run_id=run_id, commit=commit)
    ts = servers if servers is not None else targets(stage)
    return plan_units(stage, app_name(stage, pipeline), "deploy", run_id,
                 units_of(stage, {t.label: release for t in ts}, ts), placeholder, needs)


def plan_rollback(stage: DeploySettings, *, pipeline: str, run_id: str,
                  releases: dict[str, Release],
                  servers: tuple[Target, ...] | None = None,
                  needs: Needs | None = None) -> DeployPlan:
    """Each server back to the release chosen for it (from its own history), exactly as that
    release ran: its recorded spec, not the pipeline file's current settings."""
    return plan_units(stage, app_name(stage, pipeline), "rollback", run_id,
                 units_of(stage, releases, servers if servers is not None else targets(stage)),
                 needs=needs)
