"""Housekeeping of the build engine a pipeline uses (local, or `stages.build.engine`): after
each run (runner.engine) and by hand (`runner gc`), and the disk reserve checked before a run.

- the pipeline's images (`image.name`) beyond `build.keep_images` are untagged, the newest by
  creation kept, never one a container uses nor the one the run just built;
- BuildKit's cache is pruned down to `build.cache_limit` (`docker builder prune --keep-storage`,
  the CLI that builds, on that engine), only when the engine reports more;
- the pipeline's test cache volumes are kept under `build.test_cache_limit`, oldest removed.

The decisions are runner/disk.py's (pure); this module asks the engine (the docker SDK, as scan
and push do; /system/df is `docker system df` in bytes) and carries them out. Every failure is
a line of `Report.warnings`, never an exception: housekeeping never fails a run. What each
engine reported (free disk, cache size) is kept in <data dir>/cache/engines/, which the
daemon's /metrics reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.build_engine import BuildEngine, EngineProblem, ssh_argv
from pipelines.buildkit import NoBuilder, detect_builder
from pipelines.testing_plan import is_cache_volume
from runner.disk import Image, Usage, Volume, below_reserve, image_time, images_to_remove, \
    usage_of, volumes_to_remove
from runner.model import Pipeline
from runner.proc import run_command
from runner.sizes import format_size, parse_size

ENGINES_DIR = "engines"  # under the cache dir: one JSON per engine, for the daemon's metrics
_TIMEOUT = 300  # a prune of a large cache takes minutes, not more
# The engine's disk usage (/system/df) costs 0.5-3 s on an engine with a few thousand cache
# records, most of a short run's own time: after a run it is read at most this often per
# engine, so the build cache may pass its limit by what the builds of that time add.
DF_INTERVAL = 300.0


@dataclass
class Report:
    engine: str
    done: list[str] = field(default_factory=list)  # what was removed (or would be: dry run)
    warnings: list[str] = field(default_factory=list)
    usage: Usage | None = None
    disk_free: int | None = None


def engine_key(engine: BuildEngine) -> str:
    """How metrics label an engine: `local`, or its address."""
    return "local" if engine.local else engine.label


def _state_dir(cache_dir: Path) -> Path:
    return cache_dir / ENGINES_DIR / "state"


def _disk_free(engine: BuildEngine, root: str, state_dir: Path) -> int | None:
    """Free bytes of the disk holding the engine's data (`root`), when it can be known: this
    host's for a local engine on a unix socket, `df` over ssh for an ssh:// one; a tcp://
    engine does not say (None)."""
    if engine.local:
        host = os.environ.get("DOCKER_HOST", "")
        if host and not host.startswith("unix://"):
            return None
        try:
            st = os.statvfs(root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize
    if engine.settings is None or engine.settings.address.scheme != "ssh":
        return None
    ssh, _, config = engine.ssh_files(state_dir)
    argv = ssh_argv(ssh, str(config), engine.settings.address, ["df", "-Pk", root])
    result = run_command(argv, timeout=engine.settings.connect_timeout + 15)
    lines = [line for line in result.output.splitlines() if line.strip()]
    if result.returncode != 0 or len(lines) < 2:
        return None
    fields = lines[-1].split()
    return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None


def _free_of(path: Path) -> int:
    """Free bytes of the disk `path` is (or will be) on."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    raise OSError(f"no existing directory above {path}")


def check_reserve(pipeline: Pipeline, data_dir: Path, uses_engine: bool) -> str | None:
    """Why the run must not start (a disk below `build.disk_reserve`: the build engine's, with
    what uses it, then the data directory's), or None. An engine that cannot be asked is the
    build stage's failure to report, with its fix: not checked here."""
    reserve = parse_size(pipeline.stages.build.disk_reserve)
    if reserve == 0:
        return None
    short = _engine_short(pipeline, data_dir / "cache", reserve) if uses_engine else None
    if short is not None:
        return short
    free = _free_of(data_dir)
    if free < reserve:
        return below_reserve(f"the runner's data directory ({data_dir})", free, reserve, None)
    return None


def _engine_short(pipeline: Pipeline, cache_dir: Path, reserve: int) -> str | None:
    engine = BuildEngine.of(pipeline)
    state_dir = _state_dir(cache_dir)
    try:
        client = engine.client(state_dir, timeout=30)
    except Exception:  # noqa: BLE001 - unreachable: the build stage says why
        return None
    try:
        root = str(client.info().get("DockerRootDir") or "")
        free = _disk_free(engine, root, state_dir) if root else None
        if free is None or free >= reserve:
            return None
        try:
            usage = usage_of(client.df())
        except Exception:  # noqa: BLE001 - the free space alone still says enough
            usage = None
        return below_reserve(f"the build engine {engine_key(engine)}'s disk ({root})", free,
                             reserve, usage)
    except Exception:  # noqa: BLE001 - asking failed: the build stage says why
        return None
    finally:
        client.close()


def housekeep(pipeline: Pipeline, cache_dir: Path, *, just_built: str | None = None,
              dry_run: bool = False, thorough: bool = True) -> Report:
    """Bring the pipeline's build engine within its limits (see the module's docstring).
    `thorough` False (after a run): the steps that need the engine's disk usage (build cache,
    test caches, the figures for metrics) are left out when they ran on this engine less than
    DF_INTERVAL ago."""
    engine = BuildEngine.of(pipeline)
    report = Report(engine_key(engine))
    state_dir = _state_dir(cache_dir)
    try:
        client = engine.client(state_dir, timeout=60)
    except Exception as exc:  # noqa: BLE001 - a DockerException naming the engine
        report.warnings.append(f"housekeeping: cannot reach the build engine: {exc}")
        return report
    try:
        _steps(pipeline, engine, client, cache_dir, state_dir, just_built, dry_run, thorough,
               report)
    finally:
        client.close()
    _record(cache_dir, report)
    return report


def _steps(pipeline: Pipeline, engine: BuildEngine, client: Any, cache_dir: Path,
           state_dir: Path, just_built: str | None, dry_run: bool, thorough: bool,
           report: Report) -> None:
    settings = pipeline.stages.build
    verb = "would remove" if dry_run else "removed"

    def attempt(what: str, action: Callable[[], None]) -> bool:
        try:
            action()
            return True
        except Exception as exc:  # noqa: BLE001 - a warning, never the run's failure
            report.warnings.append(f"housekeeping: cannot {what}: {exc}")
            return False

    containers: list[Any] = []
    if not attempt("list the engine's containers",
                   lambda: containers.extend(client.api.containers(all=True))):
        return  # without them, an image or volume in use could be taken
    used_images = {c.get("ImageID") for c in containers}
    used_volumes = {m.get("Name") for c in containers for m in c.get("Mounts") or ()}

    # 1. The pipeline's images beyond keep_images.
    name = pipeline.image.name
    raw: list[dict] = []
    if attempt(f"list the images of {name}", lambda: raw.extend(client.api.images(name=name))):
        images = []
        for i in raw:
            refs = tuple(t for t in i.get("RepoTags") or () if t.rsplit(":", 1)[0] == name)
            inspected: dict = {}
            if refs and attempt(f"inspect image {refs[0]}",
                                lambda: inspected.update(client.api.inspect_image(i["Id"]))):
                images.append(Image(i["Id"], refs, image_time(inspected)))
        for image in images_to_remove(images, settings.keep_images,
                                      used_images, just_built):
            if dry_run or all(attempt(f"remove image {ref}",
                                      lambda r=ref: client.api.remove_image(r))
                              for ref in image.refs):
                report.done.append(f"{verb} image {', '.join(image.refs)} ({image.id[:19]})")

    if not thorough and _recent(cache_dir, report.engine):
        return
    df: dict = {}
    if not attempt("read the engine's disk usage (docker system df)",
                   lambda: df.update(client.df())):
        return
    usage = usage_of(df)

    # 2. BuildKit's cache down to cache_limit: the CLI that builds, on that engine.
    limit = parse_size(settings.cache_limit)
    if usage.build_cache > limit:
        what = (f"build cache of {format_size(usage.build_cache)} down to cache_limit "
                f"{settings.cache_limit}")
        if dry_run:
            report.done.append(f"would prune the {what}")
        elif attempt("prune the build cache", lambda: _prune_cache(engine, cache_dir,
                                                                  state_dir, limit)):
            report.done.append(f"pruned the {what}")

    # 3. The pipeline's test cache volumes under test_cache_limit.
    volumes = [Volume(v["Name"], int((v.get("UsageData") or {}).get("Size", -1)),
                      str(v.get("CreatedAt", ""))) for v in df.get("Volumes") or ()
               if is_cache_volume(pipeline.name, v.get("Name", ""))]
    for v in volumes_to_remove(volumes, parse_size(settings.test_cache_limit), used_volumes):
        if dry_run or attempt(f"remove test cache volume {v.name}",
                              lambda n=v.name: client.api.remove_volume(n)):
            report.done.append(f"{verb} test cache volume {v.name} ({format_size(v.size)})")

    if report.done and not dry_run:
        attempt("read the engine's disk usage again", lambda: df.update(client.df()))
    report.usage = usage_of(df)
    info: dict = {}
    attempt("ask the engine where it keeps its data", lambda: info.update(client.info()))
    root = str(info.get("DockerRootDir") or "")
    if root:
        attempt("measure the engine's free disk",
                lambda: setattr(report, "disk_free", _disk_free(engine, root, state_dir)))


def _prune_cache(engine: BuildEngine, cache_dir: Path, state_dir: Path, limit: int) -> None:
    try:
        builder = detect_builder(cache_file=cache_dir / "builder.json")
        env = engine.cli_env(state_dir)
    except (NoBuilder, EngineProblem) as exc:
        raise RuntimeError(str(exc)) from None
    env.update(builder.env())
    argv = [builder.docker_cli, *engine.cli_args(), "builder", "prune", "--force",
            "--keep-storage", str(limit)]
    result = run_command(argv, env=env, timeout=_TIMEOUT)
    if result.returncode != 0:
        tail = [line for line in result.output.splitlines() if line.strip()][-2:]
        raise RuntimeError(f"docker builder prune exited with code {result.returncode}: "
                           + " | ".join(tail))


def _record_path(cache_dir: Path, engine: str) -> Path:
    return cache_dir / ENGINES_DIR / (hashlib.sha256(engine.encode()).hexdigest()[:16] + ".json")


def _recent(cache_dir: Path, engine: str) -> bool:
    try:
        return time.time() - _record_path(cache_dir, engine).stat().st_mtime < DF_INTERVAL
    except OSError:
        return False


def _record(cache_dir: Path, report: Report) -> None:
    """What the engine reported, for the daemon's metrics (written whole, then renamed)."""
    if report.usage is None:
        return
    out = cache_dir / ENGINES_DIR
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = _record_path(cache_dir, report.engine)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({
            "engine": report.engine, "time": time.time(), "disk_free_bytes": report.disk_free,
            "build_cache_bytes": report.usage.build_cache, "images_bytes": report.usage.images,
            "volumes_bytes": report.usage.volumes}))
        os.replace(tmp, path)
    except OSError as exc:
        report.warnings.append(f"housekeeping: cannot record the engine's figures: {exc}")


def recorded(cache_dir: Path) -> list[dict]:
    """Every engine's last figures (see _record); unreadable files are left out."""
    out = []
    for path in sorted((cache_dir / ENGINES_DIR).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out
