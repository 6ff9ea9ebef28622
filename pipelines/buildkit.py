"""Finding a BuildKit-capable docker CLI, and turning a build description into its argv.

The docker SDK cannot drive BuildKit (docker/docker-py#2230), so builds go through a CLI:
- `docker buildx build --load` when the buildx plugin works (kind "buildx");
- else a docker CLI whose built-in BuildKit works with DOCKER_BUILDKIT=1 (kind
  "docker-buildkit", e.g. Debian's docker.io 20.10 CLI). A newer CLI without the buildx plugin
  refuses with "buildx component is missing"; such a CLI is skipped.

Detection runs a few `--help`/`version` probes that need no daemon, once per process, and its
answer can be kept on disk until a CLI or the buildx plugin changes (`detect_builder`).
`build_argv` and `build_warnings` are pure and tested by exact equality.

A build engine on another machine (`stages.build.engine`, pipelines/build_engine.py) is checked
by `check_engine` on every build, with the very CLI that will build: `docker -H ENGINE version`
says whether it is reachable (ssh refused, host key unknown, TLS refused), what it runs, and
whether BuildKit can work there (Docker Engine 18.09 or later, Linux). That answer is not kept
on disk: nothing on this machine changes when the builder is upgraded, reinstalled or down.
With buildx, `docker -H ENGINE buildx build` builds with buildx's default builder of that
endpoint (the engine's own BuildKit), so the image and the cache stay in that engine.

About the build cache: the lab's build engine is one long-lived dockerd, so its BuildKit cache
(layers and `RUN --mount=type=cache` directories) persists between runs. A fresh machine has no
local cache; there `cache_from` with a registry image built with `cache_to: [type=inline]`
(BUILDKIT_INLINE_CACHE=1 with the classic CLI) is the fallback.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BUILDX = "buildx"
DOCKER_BUILDKIT = "docker-buildkit"

_MISSING_BUILDX = "buildx component is missing"
_PROBE_TIMEOUT = 15.0


class NoBuilder(Exception):
    """No BuildKit-capable docker CLI was found. The message lists what was tried and the fix."""


class NoEngine(NoBuilder):
    """The build engine cannot build with BuildKit: unreachable, too old, or not Linux. The
    message names the engine and the CLI that asked it."""


@dataclass(frozen=True)
class Builder:
    kind: str  # BUILDX | DOCKER_BUILDKIT
    docker_cli: str  # absolute path of the docker CLI
    version: str  # buildx version, or the docker CLI's version for the built-in BuildKit

    def env(self) -> dict[str, str]:
        """Variables the child needs on top of the caller's environment."""
        return {"DOCKER_BUILDKIT": "1"}

    def describe(self) -> str:
        if self.kind == BUILDX:
            return f"buildx {self.version} ({self.docker_cli} buildx build --load)"
        return (f"docker-buildkit: docker CLI {self.version} with built-in BuildKit "
                f"({self.docker_cli} build, DOCKER_BUILDKIT=1)")


@dataclass(frozen=True)
class BuildSecretRef:
    id: str  # the id in `RUN --mount=type=secret,id=...`
    env: str  # the child environment variable that holds the value (see secret_env_var)


@dataclass(frozen=True)
class BuildSpec:
    """What to build, already resolved to absolute paths and full tag refs."""

    context: str
    dockerfile: str | None = None  # absolute, or None for <context>/Dockerfile
    tags: tuple[str, ...] = ()
    target: str | None = None
    args: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[BuildSecretRef, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    cache_from: tuple[str, ...] = ()
    cache_to: tuple[str, ...] = ()
    pull: bool = False
    platform: str | None = None
    push: bool = False  # buildx only: --push instead of --load
    iidfile: str | None = None  # where the CLI writes the id of the image it built


# ---------------------------------------------------------------------------------------------
# Pure parts


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The classic CLI reads `--secret id=X` from the environment variable X (it has no env= key), so
# an id must not replace a variable the CLI itself relies on.
_RESERVED_ENV = {"PATH", "HOME", "USER", "TMPDIR", "SHELL", "PWD", "LANG", "HTTP_PROXY",
                 "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}


def secret_env_var(builder: Builder, secret_id: str) -> str:
    """The name of the child environment variable that carries the value of build secret
    `secret_id`. buildx takes `env=NAME`; the classic CLI only looks up a variable named like
    the id itself."""
    if builder.kind == BUILDX:
        return "RUNNER_BUILD_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", secret_id).upper()
    return secret_id


def check_secret_id(builder: Builder, secret_id: str) -> str | None:
    """Why `secret_id` cannot be used with this builder, or None."""
    if not secret_id or "," in secret_id or "=" in secret_id:
        return f"build secret id {secret_id!r} must be non-empty without ',' or '='"
    if builder.kind == DOCKER_BUILDKIT:
        if not _ENV_NAME.match(secret_id):
            return (f"build secret id {secret_id!r}: with {builder.kind} the id is passed as an "
                    "environment variable name, so it must match [A-Za-z_][A-Za-z0-9_]*")
        if secret_id in _RESERVED_ENV or \
                secret_id.upper().startswith(("DOCKER_", "BUILDKIT", "RUNNER_ENGINE_")):
            return (f"build secret id {secret_id!r} clashes with an environment variable the "
                    "docker CLI uses; choose another id")
    return None


def _classic_cache_from(ref: str) -> str | None:
    """A `cache_from` entry as the classic CLI takes it (an image ref), or None if unsupported."""
    if "=" not in ref:
        return ref
    fields = dict(part.split("=", 1) for part in ref.split(",") if "=" in part)
    if fields.get("type") == "registry" and fields.get("ref"):
        return fields["ref"]
    return None


def _is_inline(entry: str) -> bool:
    return entry.replace(" ", "") in ("type=inline", "inline")


def build_warnings(builder: Builder, spec: BuildSpec) -> list[str]:
    """What `build_argv` leaves out for this builder, as messages for the stage log."""
    out: list[str] = []
    if builder.kind == BUILDX:
        return out
    for ref in spec.cache_from:
        if _classic_cache_from(ref) is None:
            out.append(f"cache_from {ref!r} ignored: {builder.kind} only reads registry images "
                       "(with inline cache) as cache; install docker-buildx for other cache types")
    for entry in spec.cache_to:
        if not _is_inline(entry):
            out.append(f"cache_to {entry!r} ignored: exporting cache needs buildx "
                       "(install docker-buildx); only type=inline works with the built-in BuildKit")
    if spec.push:
        out.append("push during build ignored: needs buildx; the push stage pushes instead")
    return out


def build_argv(builder: Builder, spec: BuildSpec, engine_args: Sequence[str] = ()) -> list[str]:
    """The docker CLI argv for `spec`. Secret values are never in it: each `--secret` names an
    environment variable (see `secret_env_var`) that the caller sets in the child's env only.
    `engine_args` are the CLI's global flags that choose the engine (BuildEngine.cli_args)."""
    if builder.kind == BUILDX:
        argv = [builder.docker_cli, *engine_args, "buildx", "build",
                "--push" if spec.push else "--load"]
    else:
        argv = [builder.docker_cli, *engine_args, "build"]
    argv.append("--progress=plain")
    if spec.dockerfile:
        argv += ["-f", spec.dockerfile]
    if spec.target:
        argv += ["--target", spec.target]
    if spec.platform:
        argv += ["--platform", spec.platform]
    if spec.pull:
        argv.append("--pull")
    args = dict(spec.args)
    if builder.kind != BUILDX and any(_is_inline(e) for e in spec.cache_to):
        args.setdefault("BUILDKIT_INLINE_CACHE", "1")
    for key, value in args.items():
        argv += ["--build-arg", f"{key}={value}"]
    for secret in spec.secrets:
        if builder.kind == BUILDX:
            argv += ["--secret", f"id={secret.id},env={secret.env}"]
        else:
            argv += ["--secret", f"id={secret.id}"]
    for key, value in spec.labels.items():
        argv += ["--label", f"{key}={value}"]
    for ref in spec.cache_from:
        if builder.kind == BUILDX:
            argv += ["--cache-from", ref]
        elif (image := _classic_cache_from(ref)) is not None:
            argv += ["--cache-from", image]
    if builder.kind == BUILDX:
        for entry in spec.cache_to:
            argv += ["--cache-to", entry]
    if spec.iidfile:
        argv += ["--iidfile", spec.iidfile]
    for tag in spec.tags:
        argv += ["-t", tag]
    argv.append(spec.context)
    return argv


# ---------------------------------------------------------------------------------------------
# Reading `--progress=plain` output (pure)

_VERTEX = re.compile(r"^#(\d+) (.*)$")
# "[2/3] RUN ...", "[builder 2/4] COPY ...", "[stage-1 1/2] FROM ..."
_STEP = re.compile(r"^\[(?:[^\]\s]+ )?(\d+)/(\d+)\] (.*)$")
_TIMESTAMPED = re.compile(r"^\d+\.\d+ ")
# Output lines a step keeps in memory: what a failure shows. The whole output is in the run's
# stage log on disk (runner.runlog); keeping it here too would grow with every line a build
# prints (a test step can print hundreds of thousands).
STEP_LOG_TAIL = 100


def _tail() -> deque[str]:
    return deque(maxlen=STEP_LOG_TAIL)


@dataclass
class Step:
    vertex: int
    name: str  # as BuildKit prints it, e.g. "[2/3] RUN make"
    cached: bool = False
    done: bool = False
    error: str | None = None
    log: deque[str] = field(default_factory=_tail)  # the step's last output lines
    lines: int = 0  # how many output lines the step printed in all


@dataclass
class Progress:
    """What a BuildKit plain progress stream said. Only Dockerfile steps ("[n/m] ...") are
    steps; "[internal] ..." and "exporting ..." vertices are not counted."""

    steps: dict[int, Step] = field(default_factory=dict)
    # Lines outside any vertex (the CLI's own summary, e.g. "error: failed to solve: ..." or
    # "executor failed running [...]: exit code: 3"), the last few only.
    messages: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @property
    def cached_steps(self) -> int:
        return sum(1 for s in self.steps.values() if s.cached)

    @property
    def failed_step(self) -> Step | None:
        failed = [s for s in self.steps.values() if s.error is not None]
        return failed[-1] if failed else None

    def feed(self, line: str) -> None:
        m = _VERTEX.match(line)
        if m is None:
            stripped = line.strip()
            if stripped and not stripped.startswith(("---", "> ")) and not stripped.isdigit():
                self.messages.append(stripped)
                del self.messages[:-20]
            return
        vertex, rest = int(m.group(1)), m.group(2)
        step = self.steps.get(vertex)
        if step is None:
            sm = _STEP.match(rest)
            if sm is not None:
                self.steps[vertex] = Step(vertex, rest)
            return
        if rest == "CACHED":
            step.cached = True
        elif rest.startswith("DONE"):
            step.done = True
        elif rest.startswith("ERROR"):
            step.error = rest[len("ERROR"):].lstrip(": ").strip() or rest
        elif rest == step.name or rest.startswith("sha256:"):
            pass  # the name is printed again when a vertex resumes output
        else:
            step.log.append(_TIMESTAMPED.sub("", rest, count=1))
            step.lines += 1


def parse_progress(lines: Sequence[str]) -> Progress:
    progress = Progress()
    for line in lines:
        progress.feed(line)
    return progress


# ---------------------------------------------------------------------------------------------
# Detection (runs the CLIs, no daemon needed)


def _probe(argv: Sequence[str], env: Mapping[str, str] | None = None, *,
           whole_env: Mapping[str, str] | None = None,
           timeout: float = _PROBE_TIMEOUT) -> tuple[int, str]:
    child_env = dict(os.environ if whole_env is None else whole_env)
    child_env.update(env or {})
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=child_env,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return proc.returncode, (proc.stdout or "") + (proc.stderr or "")


def candidate_clis(path: str | None = None) -> list[str]:
    """Every `docker` on PATH (in PATH order), then /usr/bin/docker; one entry per real file."""
    found: list[str] = []
    seen: set[str] = set()
    dirs = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    for d in [*dirs, "/usr/bin"]:
        if not d:
            continue
        cand = os.path.join(d, "docker")
        if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
            continue
        real = os.path.realpath(cand)
        if real in seen:
            continue
        seen.add(real)
        found.append(os.path.abspath(cand))
    return found


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def detect_builder_in(candidates: Sequence[str]) -> Builder:
    """Try `candidates` in order: buildx on any of them first, then a built-in BuildKit.
    Raises NoBuilder saying what each one answered and how to fix it."""
    tried: list[str] = []
    for cli in candidates:
        if not (os.path.isfile(cli) and os.access(cli, os.X_OK)):
            tried.append(f"{cli}: not an executable file")
            continue
        rc, out = _probe([cli, "buildx", "version"])
        if rc == 0:
            # "github.com/docker/buildx v0.11.2 9872040" or "github.com/docker/buildx 0.10.4 ..."
            parts = _first_line(out).split()
            version = parts[1] if len(parts) > 1 else _first_line(out)
            return Builder(BUILDX, cli, version)
        tried.append(f"{cli} buildx version: {_first_line(out) or f'exit {rc}'}")
    for cli in candidates:
        if not (os.path.isfile(cli) and os.access(cli, os.X_OK)):
            continue
        rc, out = _probe([cli, "build", "--help"], {"DOCKER_BUILDKIT": "1"})
        if _MISSING_BUILDX in out:
            tried.append(f"DOCKER_BUILDKIT=1 {cli} build: the buildx component is missing")
            continue
        if rc != 0 or "--secret" not in out:
            tried.append(f"DOCKER_BUILDKIT=1 {cli} build --help: no BuildKit options "
                         f"({_first_line(out) or f'exit {rc}'})")
            continue
        rc, out = _probe([cli, "--version"])
        m = re.search(r"version\s+([^\s,]+)", out)
        return Builder(DOCKER_BUILDKIT, cli, m.group(1) if m else _first_line(out))
    if not candidates:
        tried.append("no `docker` CLI on PATH and no /usr/bin/docker")
    raise NoBuilder(
        "no BuildKit-capable docker CLI found. Tried:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + "\nFix: install the buildx plugin (package docker-buildx on Debian 13 and later, or "
        "docker-buildx-plugin from Docker's apt repository), or a docker CLI with BuildKit built "
        "in (Debian 12: apt-get install docker.io, which provides /usr/bin/docker 20.10), and "
        "make sure it is on PATH or at /usr/bin/docker.")


def docker_config_dir(environ: Mapping[str, str] | None = None, home: str | None = None) -> str:
    """The docker CLI's config directory (its plugins, its logins): $DOCKER_CONFIG, else
    ~/.docker."""
    environ = os.environ if environ is None else environ
    return environ.get("DOCKER_CONFIG") or os.path.join(
        home if home is not None else os.path.expanduser("~"), ".docker")


def _plugin_dirs() -> list[str]:
    """Where a docker CLI looks for the buildx plugin (docker/cli's cli-plugins/manager)."""
    return [os.path.join(docker_config_dir(), "cli-plugins"), "/usr/local/lib/docker/cli-plugins",
            "/usr/local/libexec/docker/cli-plugins", "/usr/lib/docker/cli-plugins",
            "/usr/libexec/docker/cli-plugins"]


def _stat_key(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, os.path.realpath(path), st.st_size, st.st_mtime_ns]


def detection_fingerprint(candidates: Sequence[str]) -> list:
    """What the detection's answer depends on: the CLIs themselves, the buildx plugin in every
    place a CLI looks for it, and the CLI's config file (which can name plugin dirs). Any
    install, upgrade or removal of one of them changes this."""
    key: list = [1]  # bump when the detection logic changes
    key += [_stat_key(c) for c in candidates]
    for d in _plugin_dirs():
        key += [_stat_key(d), _stat_key(os.path.join(d, "docker-buildx"))]
    key.append(_stat_key(os.path.join(docker_config_dir(), "config.json")))
    return key


def _load_cached(cache_file: Path, fingerprint: list) -> Builder | None:
    try:
        data = json.loads(cache_file.read_text())
        if data.get("fingerprint") == fingerprint:
            b = data["builder"]
            return Builder(str(b["kind"]), str(b["docker_cli"]), str(b["version"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent or unreadable: detect again and rewrite it
    return None


def _store_cached(cache_file: Path, fingerprint: list, builder: Builder) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "builder": {
            "kind": builder.kind, "docker_cli": builder.docker_cli,
            "version": builder.version}}))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a cache that cannot be written only costs the next run the probes again


_lock = threading.Lock()
_cached: Builder | None = None


def detect_builder(*, refresh: bool = False, cache_file: Path | None = None) -> Builder:
    """The builder for this process (detected once, then cached). With `cache_file`, the answer
    is also kept on disk between processes, keyed by `detection_fingerprint`: the probes cost
    each `runner exec` ~0.1 s, a large part of a code-only rebuild."""
    global _cached
    with _lock:
        if _cached is not None and not refresh:
            return _cached
        candidates = candidate_clis()
        fingerprint = detection_fingerprint(candidates) if cache_file else []
        if cache_file is not None and not refresh:
            _cached = _load_cached(cache_file, fingerprint)
            if _cached is not None:
                return _cached
        _cached = detect_builder_in(candidates)
        if cache_file is not None:
            _store_cached(cache_file, fingerprint, _cached)
        return _cached


# ---------------------------------------------------------------------------------------------
# The build engine (`stages.build.engine`): reachable, and able to run BuildKit?

BUILDKIT_MIN_ENGINE = (18, 9)


@dataclass(frozen=True)
class EngineInfo:
    version: str  # Docker Engine's, e.g. "20.10.24+dfsg1"
    api_version: str
    os: str
    arch: str

    def describe(self) -> str:
        return f"Docker Engine {self.version}, API {self.api_version}, {self.os}/{self.arch}"


def parse_engine_version(output: str) -> EngineInfo | None:
    """The engine's side of `docker version --format '{{json .Server}}'`; None when the output
    holds no server (the CLI printed `null` and an error: it could not reach the engine)."""
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("Version"):
            return EngineInfo(str(data["Version"]), str(data.get("ApiVersion") or "?"),
                              str(data.get("Os") or "?"), str(data.get("Arch") or "?"))
    return None


def _version_tuple(version: str) -> tuple[int, int] | None:
    m = re.match(r"^v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def engine_problem(info: EngineInfo) -> str | None:
    """Why BuildKit cannot build on this engine, or None."""
    if info.os not in ("linux", "?"):
        return f"it runs {info.os}; BuildKit builds need a Linux engine"
    numbers = _version_tuple(info.version)
    if numbers is not None and numbers < BUILDKIT_MIN_ENGINE:
        return (f"it runs Docker Engine {info.version}; BuildKit needs 18.09 or later: upgrade "
                "docker on the builder")
    return None


def check_engine(builder: Builder, engine_args: Sequence[str], env: Mapping[str, str],
                 label: str, explain: Callable[[str], str], timeout: float) -> EngineInfo:
    """Ask the engine (`engine_args`, `env`: from BuildEngine.cli_args/cli_env) what it runs,
    with the CLI that will build there. Raises NoEngine naming the engine, the CLI and the
    fix; `explain` turns a failed connection's output into that sentence."""
    argv = [builder.docker_cli, *engine_args, "version", "--format", "{{json .Server}}"]
    rc, out = _probe(argv, builder.env(), whole_env=env, timeout=timeout)
    info = parse_engine_version(out)
    if info is None:
        if "is too old" in out and "API version" in out:
            reason = (f"the docker CLI {builder.docker_cli} ({builder.version}) is older than "
                      f"the engine accepts ({_first_line(out[out.find('client version'):])}); "
                      "install a newer docker CLI with the buildx plugin")
        elif rc == -1 and "timed out" in out.lower():
            reason = f"no answer within {timeout:.0f}s"
        else:
            reason = explain(out)
        raise NoEngine(f"build engine {label} cannot be used by {builder.docker_cli}: {reason}")
    problem = engine_problem(info)
    if problem is not None:
        raise NoEngine(f"build engine {label} cannot build with BuildKit: {problem}")
    return info


__all__ = [
    "BUILDX", "DOCKER_BUILDKIT", "BuildSecretRef", "BuildSpec", "Builder", "EngineInfo",
    "NoBuilder", "NoEngine", "build_argv", "build_warnings", "candidate_clis", "check_engine",
    "check_secret_id", "detect_builder", "detect_builder_in", "detection_fingerprint",
    "engine_problem", "parse_engine_version", "parse_progress", "Progress", "Step",
    "STEP_LOG_TAIL", "secret_env_var",
]
