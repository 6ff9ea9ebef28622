"""The docker commands a deploy runs on a server, as argv lists. Pure: nothing here runs them.

Every builder returns `list[str]`; values from the pipeline are separate words, never spliced
into a shell line. The transport quotes each word (shlex.join, in one place) because SSH exec
carries a single string. Secrets never appear here: env values travel in a file (`--env-file`),
registry passwords on stdin (`--password-stdin`).
"""
from __future__ import annotations

from collections.abc import Sequence

from deployers.spec import ContainerSpec, HealthSpec

DOCKER = "docker"


def _seconds(value: float) -> str:
    """Docker duration syntax: 1 -> '1s', 0.5 -> '500ms'."""
    ms = round(value * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _config(config: str | None) -> list[str]:
    return ["--config", config] if config else []


def login(registry: str, username: str, config: str | None = None) -> list[str]:
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


def pull(ref: str, config: str | None = None) -> list[str]:
    return [DOCKER, *_config(config), "pull", "--quiet", ref]


def image_present(ref: str) -> list[str]:
    """Exits 0 when the image is already on the server."""
    return [DOCKER, "image", "inspect", "--format", "{{.Id}}", ref]


def inspect_container(name: str) -> list[str]:
    return [DOCKER, "container", "inspect", name]


def list_app_containers(app: str) -> list[str]:
    return [DOCKER, "container", "ls", "--all", "--no-trunc", "--filter",
            f"label=runner.app={app}", "--format", "{{.Names}}"]


def health_args(h: HealthSpec) -> list[str]:
    """Docker's own healthcheck flags. For `cmd` docker runs it too, so `docker ps` shows the
    health; for `http` the runner probes from the server and docker keeps the image's check."""
    if h.kind != "cmd" or not h.cmd:
        return []
    return ["--health-cmd", h.cmd,
            "--health-interval", _seconds(h.interval),
            "--health-timeout", _seconds(h.probe_timeout),
            "--health-retries", str(h.retries),
            "--health-start-period", _seconds(h.start_period)]


def run(spec: ContainerSpec, name: str | None = None, env_file: str | None = None) -> list[str]:
    """`docker run --detach` for spec. `name` overrides spec.name (used while the previous
    container still holds it); env_file is the path of a file already on the server."""
    argv = [DOCKER, "run", "--detach", "--name", name or spec.name,
            "--restart", spec.restart]
    if spec.init:
        argv.append("--init")
    for key, value in spec.labels:
        argv += ["--label", f"{key}={value}"]
    for p in spec.ports:
        argv += ["--publish", p]
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
    argv += ["--stop-timeout", str(spec.stop_timeout)]
    argv += health_args(spec.health)
    argv.append(spec.image)
    if spec.command is not None:
        argv += list(spec.command)
    return argv


def rename(old: str, new: str) -> list[str]:
    return [DOCKER, "container", "rename", old, new]


def stop(name: str, timeout: int = 10) -> list[str]:
    return [DOCKER, "container", "stop", "--time", str(timeout), name]


def start(name: str) -> list[str]:
    return [DOCKER, "container", "start", name]


def remove(name: str) -> list[str]:
    return [DOCKER, "container", "rm", "--force", name]


def logs(name: str, tail: int = 30) -> list[str]:
    return [DOCKER, "container", "logs", "--tail", str(tail), name]


def exec_(name: str, argv: Sequence[str]) -> list[str]:
    return [DOCKER, "exec", name, *argv]


def probe(name: str, test: Sequence[str]) -> list[str]:
    """Run a healthcheck test inside the container, the way docker would:
    ["CMD-SHELL", s] -> /bin/sh -c s; ["CMD", a, b] -> a b."""
    if not test or test[0] == "NONE":
        raise ValueError("no healthcheck test to run")
    if test[0] == "CMD-SHELL":
        return exec_(name, ["/bin/sh", "-c", test[1]])
    if test[0] == "CMD":
        return exec_(name, list(test[1:]))
    raise ValueError(f"unknown healthcheck test form {test[0]!r}")


def http_probe(name: str, port: int, path: str, timeout: float) -> list[str]:
    """Fallback HTTP probe from inside the container (busybox/alpine wget) when the server
    forbids SSH TCP forwarding."""
    return exec_(name, ["wget", "-q", "-O", "-", "-T", str(max(1, round(timeout))),
                        f"http://127.0.0.1:{port}{path}"])


def remove_image(ref: str) -> list[str]:
    return [DOCKER, "image", "rm", ref]


def image_digests(name: str) -> list[str]:
    """Digests of `name` present on the server, one per line."""
    return [DOCKER, "image", "ls", "--digests", "--no-trunc", "--format",
            "{{.Digest}}", name]
