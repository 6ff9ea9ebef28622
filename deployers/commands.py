"""The docker commands a deploy runs on a server, as argv lists. Pure: nothing here runs them.

Every builder returns `list[str]`; values from the pipeline are separate words, never spliced
into a shell line. The transport quotes each word (shlex.join, in one place) because SSH exec
carries a single string. Secrets never appear here: env values travel in a file (`--env-file`),
registry passwords on stdin (`--password-stdin`).

What only the server can tell (the name the previous container is kept under, the path of the
env file, the new container's id, the fingerprint of the secret values) is a `Slot` in the argv:
the plan prints it as `<name>`, and the deployer fills it in (`bind`) right before running the
very same argv. A slot is not a string, so no pipeline value can be mistaken for one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deployers.proxy import (CONFIG_DIR, LABEL_ALIAS, LABEL_PROXY, NETWORK, PROXY_CONTAINER,
                             PROXY_RECIPE, published)
from deployers.spec import LABEL_APP, LABEL_SECRETS, ContainerSpec, HealthSpec

DOCKER = "docker"


@dataclass(frozen=True)
class Slot:
    """A word of an argv that is known only on the server. `prefix` stays in front of the value
    (e.g. "runner.secrets=")."""

    key: str
    prefix: str = ""
    suffix: str = ""

    def __str__(self) -> str:
        return f"{self.prefix}<{self.key}>{self.suffix}"


Word = str | Slot
Argv = tuple[Word, ...]

PREVIOUS = Slot("previous container")
NEW = Slot("new container")
ENV_FILE = Slot("env file")
LOGIN_DIR = Slot("login dir")
SECRETS = Slot("secret fingerprint", prefix=f"{LABEL_SECRETS}=")
PRUNED = Slot("pruned image")
CONFIG = Slot("proxy config file")
PROXY_DIR = Slot("runner dir", suffix=f"/proxy:{CONFIG_DIR}:ro")
KEPT = Slot("kept container")


def bind(argv: Sequence[Word], values: Mapping[Slot, str]) -> list[str]:
    """argv with every slot filled in. Raises KeyError naming a slot left without a value."""
    out = []
    for w in argv:
        if isinstance(w, Slot):
            if w not in values:
                raise KeyError(f"no value for {w} in {' '.join(map(str, argv[:3]))}")
            out.append(w.prefix + values[w] + w.suffix)
        else:
            out.append(w)
    return out


def show(argv: Sequence[Word]) -> list[str]:
    """argv as the plan prints it: slots as <name>."""
    return [str(w) for w in argv]


def _seconds(value: float) -> str:
    """Docker duration syntax: 1 -> '1s', 0.5 -> '500ms'."""
    ms = round(value * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _config(config: Word | None) -> list[Word]:
    return ["--config", config] if config else []


def login(registry: str, username: str, config: Word | None = None) -> list[Word]:
    """The password goes on stdin. With `config`, the credentials land in that directory (one
    deploy's, removed after its pull) instead of the server's ~/.docker/config.json."""
    return [DOCKER, *_config(config), "login", "--username", username, "--password-stdin",
            registry]


def engine_id() -> list[str]:
    """Something unique and stable per docker engine: its `host` network's id."""
    return [DOCKER, "network", "inspect", "--format", "{{.Id}}", "host"]


def engine_info() -> list[str]:
    """The fallback identity where there is no `host` network."""
    return [DOCKER, "info", "--format", "{{.ID}} {{.DockerRootDir}}"]


def pull(ref: str, config: Word | None = None) -> list[Word]:
    return [DOCKER, *_config(config), "pull", "--quiet", ref]


def image_present(ref: str) -> list[str]:
    """Exits 0 when the image is already on the server."""
    return [DOCKER, "image", "inspect", "--format", "{{.Id}}", ref]


def inspect_container(*names: Word) -> list[Word]:
    return [DOCKER, "container", "inspect", *names]


def list_app_ids(app: str) -> list[str]:
    """The ids of every container of `app`, running or not."""
    return [DOCKER, "container", "ls", "--all", "--quiet", "--no-trunc", "--filter",
            f"label={LABEL_APP}={app}"]


def list_kept_running() -> list[str]:
    """The ids of the running kept copies of any app (`<app>_kept_<run>`, the proxy cutover's)."""
    return [DOCKER, "container", "ls", "--quiet", "--no-trunc", "--filter", f"label={LABEL_APP}",
            "--filter", "name=_kept_"]


def health_args(h: HealthSpec) -> list[str]:
    """Docker's own healthcheck flags. For `cmd` docker runs it too, so `docker ps` shows the
    health; for `http` the runner probes from the server and docker keeps the image's check;
    for `uptime` the image's check is off (a worker's image probes the web server)."""
    if h.kind == "uptime":
        return ["--no-healthcheck"]
    if h.kind != "cmd" or not h.cmd:
        return []
    return ["--health-cmd", h.cmd,
            "--health-interval", _seconds(h.interval),
            "--health-timeout", _seconds(h.probe_timeout),
            "--health-retries", str(h.retries),
            "--health-start-period", _seconds(h.start_period)]


def runtime_args(spec: ContainerSpec, env_file: Word | None) -> list[Word]:
    """What the app's container runs with, for `docker run` of it or of a one-off container of
    its image (the release command): volumes, env file (a path on the server), limits, network."""
    argv: list[Word] = []
    for v in spec.volumes:
        argv += ["--volume", v]
    if env_file:
        argv += ["--env-file", env_file]
    if spec.memory:
        argv += ["--memory", spec.memory]
    if spec.cpus:
        argv += ["--cpus", f"{spec.cpus:g}"]
    if spec.network:
        argv += ["--network", spec.network]
    return argv


def run(spec: ContainerSpec, name: str | None = None, env_file: Word | None = None,
        secrets: Word | None = None, alias: str | None = None) -> list[Word]:
    """`docker run --detach` for spec. `name` overrides spec.name; env_file is the path of a
    file already on the server; secrets the `runner.secrets=<fingerprint>` label word; alias
    the container's name on its network (recorded in a label too)."""
    argv: list[Word] = [DOCKER, "run", "--detach", "--name", name or spec.name,
                        "--restart", spec.restart]
    if spec.init:
        argv.append("--init")
    for key, value in spec.labels:
        argv += ["--label", f"{key}={value}"]
    if secrets is not None:
        argv += ["--label", secrets]
    if alias is not None:
        argv += ["--label", f"{LABEL_ALIAS}={alias}"]
    for p in spec.ports:
        argv += ["--publish", p]
    argv += runtime_args(spec, env_file)
    if alias is not None:
        argv += ["--network-alias", alias]
    if spec.entrypoint is not None:
        argv.append(f"--entrypoint={spec.entrypoint}")  # one word, also when it is ""
    argv += ["--stop-timeout", str(spec.stop_timeout)]
    argv += health_args(spec.health)
    argv.append(spec.image)
    if spec.command is not None:
        argv += list(spec.command)
    return argv


def rename(old: Word, new: Word) -> list[Word]:
    return [DOCKER, "container", "rename", old, new]


def set_restart(name: Word, policy: str) -> list[Word]:
    """A container's restart policy, changed in place (a kept copy must not come back by
    itself when the engine restarts)."""
    return [DOCKER, "container", "update", "--restart", policy, name]


def stop(name: Word, timeout: int = 10) -> list[Word]:
    return [DOCKER, "container", "stop", "--time", str(timeout), name]


def start(name: Word) -> list[Word]:
    return [DOCKER, "container", "start", name]


def remove(name: Word) -> list[Word]:
    return [DOCKER, "container", "rm", "--force", name]


def logs(name: Word, tail: int = 30) -> list[Word]:
    return [DOCKER, "container", "logs", "--tail", str(tail), name]


def exec_(name: Word, argv: Sequence[Word]) -> list[Word]:
    return [DOCKER, "exec", name, *argv]


def probe(name: Word, test: Sequence[str]) -> list[Word]:
    """Run a healthcheck test inside the container, the way docker would:
    ["CMD-SHELL", s] -> /bin/sh -c s; ["CMD", a, b] -> a b."""
    if not test or test[0] == "NONE":
        raise ValueError("no healthcheck test to run")
    if test[0] == "CMD-SHELL":
        return exec_(name, ["/bin/sh", "-c", test[1]])
    if test[0] == "CMD":
        return exec_(name, list(test[1:]))
    raise ValueError(f"unknown healthcheck test form {test[0]!r}")


def http_probe(name: Word, port: int, path: str, timeout: float) -> list[Word]:
    """Fallback HTTP probe from inside the container (busybox/alpine wget) when the server
    forbids SSH TCP forwarding."""
    return exec_(name, ["wget", "-q", "-O", "-", "-T", str(max(1, round(timeout))),
                        f"http://127.0.0.1:{port}{path}"])


def remove_image(ref: Word) -> list[Word]:
    return [DOCKER, "image", "rm", ref]


# ------------------------------------------------------------------------- the proxy

def network_inspect() -> list[str]:
    return [DOCKER, "network", "inspect", "--format", "{{.Id}}", NETWORK]


def network_create() -> list[str]:
    return [DOCKER, "network", "create", "--driver", "bridge", "--label", f"{LABEL_PROXY}=1",
            NETWORK]


def proxy_run(proxy, volume: Word = PROXY_DIR) -> list[Word]:
    """The proxy container (settings `proxy`, a runner.model.deploy.Proxy). `volume` mounts
    the runner's proxy directory on the server (its config.json) at CONFIG_DIR, read-only."""
    argv: list[Word] = [DOCKER, "run", "--detach", "--name", PROXY_CONTAINER, "--restart",
                        "always", "--network", NETWORK, "--label", f"{LABEL_PROXY}={PROXY_RECIPE}",
                        # Caddy opens a new SO_REUSEPORT listener at every config load and
                        # closes the old one: without this, connections still queued on the
                        # old one are reset. The kernel moves them to the new one instead.
                        "--sysctl", "net.ipv4.tcp_migrate_req=1"]
    for p in published(proxy):
        argv += ["--publish", p]
    argv += ["--volume", volume, "--volume", "runner-proxy-data:/data", "--volume", "runner-proxy-config:/config",
             proxy.image, "caddy", "run", "--config", f"{CONFIG_DIR}/config.json"]
    return argv


def proxy_reload(config: Word) -> list[Word]:
    """Load a config file of the proxy's dir through Caddy's admin API (`/load`, atomic)."""
    return [DOCKER, "exec", PROXY_CONTAINER, "caddy", "reload", "--config", config,
            "--address", "localhost:2019", "--force"]
