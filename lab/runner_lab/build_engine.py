"""The build engine: the host's own dockerd on unix:///run/runner-lab/docker.sock (BuildKit on,
its containers on bridge rlabb0), recorded as `build-dockerd`, and the images `up` makes on it:
local/busybox:1, local/python:3.11 and the proxy and PostgreSQL images it pushes to the
registry."""
from __future__ import annotations

import json
from pathlib import Path

from runner_lab import host, images, layout, postgres_image
from runner_lab.state import State

KEY = "build-dockerd"
EXEC_ROOT = layout.RUN_DIR / "exec"


def problems(state: State) -> list[str]:
    found = []
    rec = state.recorded(KEY)
    if not host.alive(rec) or not host.docker_ready(layout.BUILD_SOCK):
        found.append(f"build engine {layout.BUILD_DOCKER_HOST} does not answer")
    elif host.outdated(rec, layout.build_dockerd_argv(state.dir)):
        found.append(f"build engine {layout.BUILD_DOCKER_HOST} runs with other flags than "
                     "`runner lab up` starts it with now: `up` restarts it")
    else:
        for image in (layout.BUSYBOX_IMAGE, layout.PYTHON_IMAGE):
            if not host.image_exists(layout.BUILD_SOCK, image):
                found.append(f"image {image} is missing from the build engine")
    if host.registry_ready() and not images.proxy_in_registry():
        found.append(f"proxy image {layout.PROXY_IMAGE} is missing from the registry or was "
                     "made another way than `runner lab up` makes it: `up` builds it")
    if host.registry_ready() and not postgres_image.in_registry():
        found.append(f"PostgreSQL image {postgres_image.IMAGE} is missing from the registry or "
                     "was made by another recipe than this version's: `up` builds it")
    return found


def markers() -> list[tuple[str, str, str]]:
    """(key, marker, program): the build engine's dockerd runs with its own pid file path."""
    return [(KEY, str(layout.RUN_DIR / "docker.pid"), "dockerd")]


def start(state: State) -> dict | None:
    """Start the build engine's dockerd if it is not running (one that runs with other flags
    than this version's is restarted); None when it already was. finish() waits for it."""
    rec = state.adopt(KEY, str(layout.RUN_DIR / "docker.pid"), "dockerd")
    if rec and host.outdated(rec, layout.build_dockerd_argv(state.dir)):
        state.log(f"build engine (pid {rec['pid']}) runs with other flags than this version "
                  "starts it with; restarting it (a build running on it now fails)")
        host.stop(rec)
        rec = None
    if rec:
        return None
    host.stop_all(host.pids_using([f"{EXEC_ROOT}/"]))
    host.remove_stale_pidfiles(layout.RUN_DIR / "docker.pid", EXEC_ROOT)
    (state.dir / "docker").mkdir(parents=True, exist_ok=True)
    host.write_if_changed(state.dir / "daemon.json",
                          json.dumps({"features": {"buildkit": True}}) + "\n")
    state.log(f"starting build engine on {layout.BUILD_DOCKER_HOST}")
    log_path = state.dir / "logs" / "build-dockerd.log"
    rec = host.spawn(layout.build_dockerd_argv(state.dir), log_path)
    state.record(KEY, rec)
    return rec


def finish(state: State, rec: dict | None) -> None:
    """Wait until the engine answers (`rec`: the one start() started, None: the recorded one),
    then make the images that are missing on it."""
    rec = rec or state.recorded(KEY)
    host.wait_for(lambda: host.docker_ready(layout.BUILD_SOCK), "build engine dockerd", 60,
                  rec, Path(rec["log"]) if rec and rec.get("log") else None)
    images.ensure_busybox(state.log)
    images.ensure_python(state.dir, state.log)
    images.ensure_caddy(state.dir, state.log)  # FROM the python image
    postgres_image.ensure_postgres_image(state.dir, state.log)  # FROM the python image
