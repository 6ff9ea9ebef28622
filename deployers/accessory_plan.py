"""Accessories as data: what runs (`AccessorySpec`, from `accessories:` of the pipeline) and the
docker commands that boot, replace, check and remove it on one server (`AccessoryPlan`). Pure:
no I/O; deployers.accessories runs exactly these commands.

On each of its servers an accessory NAME of app APP is the container `APP-NAME`, on the runner's
network (deployers.proxy.NETWORK), where the app reaches it by that name. It carries the labels
`runner.accessory=NAME`, `runner.accessory.of=APP` and `runner.accessory.spec=<fingerprint>`,
never `runner.app`: what an app deploy, its pruning and `runner app remove` look for (containers
labelled runner.app=APP, images the runner pulled for the app) never includes it. Its named
volumes are the docker volumes `APP-NAME-VOLUME`, labelled the same way, so that two apps'
`data` volumes never meet.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from runner.model import Pipeline
from runner.model.accessories import NETWORK, Accessory

from deployers import commands as cmd
from deployers.base import PlannedCommand
from deployers.commands import Slot, Word, bind
from deployers.spec import HealthSpec, Target, app_name

LABEL_ACCESSORY = "runner.accessory"  # its name in the pipeline
LABEL_OF = "runner.accessory.of"  # the app it belongs to
LABEL_SPEC = "runner.accessory.spec"  # fingerprint of the settings: same spec, no restart
RESTART = "always"
STOP_TIMEOUT = 30  # seconds a database gets to shut down cleanly on reboot and remove
MIN_UPTIME = 2.0  # seconds an accessory with no healthcheck at all must stay up

ENV_FILE = cmd.ENV_FILE
CONTAINER = Slot("container id")


@dataclass(frozen=True)
class AccessorySpec:
    """One accessory as `docker run` takes it, secret values by name only."""

    name: str  # as the pipeline names it: db
    app: str
    image: str
    servers: tuple[str, ...]  # labels of stages.deploy.servers
    env: tuple[tuple[str, str], ...] = ()
    secret_env: tuple[tuple[str, str], ...] = ()  # (VAR, secret name)
    volumes: tuple[tuple[str, str], ...] = ()  # (volume name as written, "/path[:ro]")
    ports: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    health: HealthSpec = HealthSpec(kind="image", min_uptime=MIN_UPTIME)

    @property
    def container(self) -> str:
        """Its container's name, which is also its host name on the runner's network."""
        return f"{self.app}-{self.name}"

    @property
    def volume_names(self) -> tuple[str, ...]:
        """The docker volumes that hold its data on the server."""
        return tuple(f"{self.container}-{v}" for v, _ in self.volumes)

    @property
    def fingerprint(self) -> str:
        """A short hash of everything that defines the container but secret values (their
        names count) and where it runs: boot compares it to tell "already running" from
        "changed"."""
        data = asdict(self)
        data.pop("servers")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()
                              ).hexdigest()[:16]

    @property
    def labels(self) -> tuple[tuple[str, str], ...]:
        return ((LABEL_ACCESSORY, self.name), (LABEL_OF, self.app),
                (LABEL_SPEC, self.fingerprint))


def _health(acc: Accessory) -> HealthSpec:
    h = acc.healthcheck
    if h is None:
        return HealthSpec(kind="image", min_uptime=MIN_UPTIME)
    return HealthSpec(kind="cmd", cmd=h.cmd, timeout=h.timeout, interval=h.interval,
                      probe_interval=h.interval, retries=h.retries, start_period=h.start_period)


def accessory_specs(pipeline: Pipeline) -> dict[str, AccessorySpec]:
    """Every accessory of the pipeline, by name, in the file's order."""
    deploy = pipeline.stages.deploy
    by_name = {s.label: s.label for s in deploy.servers}
    by_name.update({s.host: s.label for s in deploy.servers if s.host not in by_name})
    app = app_name(deploy, pipeline.name)
    out = {}
    for name, acc in pipeline.accessories.items():
        servers = tuple(dict.fromkeys(by_name[s] for s in acc.servers)) if acc.servers \
            else tuple(by_name[s.label] for s in deploy.servers)
        out[name] = AccessorySpec(
            name=name, app=app, image=acc.image, servers=servers,
            env=tuple(sorted(acc.env.items())), secret_env=tuple(sorted(acc.secret_env.items())),
            volumes=tuple((v.split(":", 1)[0], v.split(":", 1)[1]) for v in acc.volumes),
            ports=tuple(acc.ports), command=acc.command, health=_health(acc))
    return out


def needed_on(specs: dict[str, AccessorySpec]) -> dict[str, tuple[AccessorySpec, ...]]:
    """server label -> the accessories that must run there (for the deploy's check)."""
    out: dict[str, list[AccessorySpec]] = {}
    for spec in specs.values():
        for server in spec.servers:
            out.setdefault(server, []).append(spec)
    return {k: tuple(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- commands

def run_argv(spec: AccessorySpec, env_file: Word | None) -> list[Word]:
    """`docker run --detach` for the accessory, on the runner's network under its name."""
    argv: list[Word] = [cmd.DOCKER, "run", "--detach", "--name", spec.container,
                        "--hostname", spec.container, "--network", NETWORK,
                        "--restart", RESTART, "--stop-timeout", str(STOP_TIMEOUT)]
    for key, value in spec.labels:
        argv += ["--label", f"{key}={value}"]
    for (_, target), volume in zip(spec.volumes, spec.volume_names):
        argv += ["--volume", f"{volume}:{target}"]
    for p in spec.ports:
        argv += ["--publish", p]
    if env_file is not None:
        argv += ["--env-file", env_file]
    argv += cmd.health_args(spec.health)
    argv.append(spec.image)
    if spec.command is not None:
        argv += list(spec.command)
    return argv


def volume_create(spec: AccessorySpec, volume: str) -> list[str]:
    """A volume made before the container, so that it carries the accessory's labels."""
    return [cmd.DOCKER, "volume", "create", *[w for k, v in spec.labels[:2]
                                              for w in ("--label", f"{k}={v}")], volume]


def check_argv(specs: Sequence[AccessorySpec]) -> list[str]:
    """The deploy's check: the state of each accessory's container (exit status 1 when one is
    missing; the others are still printed)."""
    return [str(w) for w in cmd.inspect_container(*[s.container for s in specs])]


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class AccessoryPlan:
    """One accessory on one server: the spec and every command that may run there, each with
    when it runs. The runner takes its commands from here (`argv(key, values)`)."""

    spec: AccessorySpec
    target: Target
    commands: tuple[PlannedCommand, ...]

    @property
    def server(self) -> str:
        return self.target.label

    def argv(self, key: str, values: dict[Slot, str] | None = None) -> list[str]:
        for c in self.commands:
            if c.key == key:
                return bind(c.argv, values or {})
        raise KeyError(f"the accessory plan for {self.server} has no {key!r} command")

    def to_dict(self) -> dict:
        return {"accessory": self.spec.name, "container": self.spec.container,
                "server": self.server, "image": self.spec.image,
                "volumes": list(self.spec.volume_names),
                "commands": {c.key: c.to_dict() for c in self.commands}}


def accessory_commands(spec: AccessorySpec) -> tuple[PlannedCommand, ...]:
    name = spec.container
    out = [
        PlannedCommand("inspect", "boot", tuple(cmd.inspect_container(name))),
        PlannedCommand("network", "boot", tuple(cmd.network_create()),
                       f"the server has no `{NETWORK}` network yet"),
    ]
    out += [PlannedCommand(f"volume:{v}", "boot", tuple(volume_create(spec, v)),
                           "always (an existing volume is left as it is)")
            for v in spec.volume_names]
    out += [
        PlannedCommand("start", "boot", tuple(cmd.start(name)),
                       "its container exists, stopped, with this very spec"),
        PlannedCommand("run", "boot",
                       tuple(run_argv(spec, ENV_FILE if spec.env or spec.secret_env else None)),
                       "no container of it exists (reboot: after `remove`)"),
    ]
    if spec.health.kind == "cmd":
        out.append(PlannedCommand("probe", "boot",
                                  tuple(cmd.probe(CONTAINER, ["CMD-SHELL", spec.health.cmd or ""])),
                                  f"every {spec.health.probe_interval:g}s until healthy"))
    out += [
        PlannedCommand("logs", "boot", tuple(cmd.logs(CONTAINER, 10)),
                       "it does not become healthy"),
        PlannedCommand("stop", "remove", tuple(cmd.stop(name, STOP_TIMEOUT)),
                       "reboot and remove: it runs (a clean shutdown first)"),
        PlannedCommand("remove", "remove", tuple(cmd.remove(name)),
                       "reboot and remove: its container exists; named volumes stay"),
    ]
    out += [PlannedCommand(f"volume_rm:{v}", "remove", (cmd.DOCKER, "volume", "rm", v),
                           "remove --volumes: its data is deleted")
            for v in spec.volume_names]
    return tuple(out)


def plan_accessory(spec: AccessorySpec, target: Target) -> AccessoryPlan:
    return AccessoryPlan(spec, target, accessory_commands(spec))
