"""Runs a pipeline: the same engine for `runner exec`, `--event` replays and the daemon.

prepare() does everything that can fail on bad input (load, validate, overrides, secrets)
before anything touches the world; execute() then runs the selected stages in order.
"""
from __future__ import annotations

import importlib
import json
import os
import secrets as _random
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runner.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Cancelled,
                           InvalidInput, StageFailed)
from runner.model import STAGE_ORDER, Pipeline
from runner.runlog import RunLog, Sink

# Stage implementations live in pipelines/ and deployers/; the engine only knows their names.
STAGE_CLASSES = {
    "checkout": "pipelines.checkout:CheckoutStage",
    "build": "pipelines.build:BuildStage",
    "scan": "pipelines.scan:ScanStage",
    "push": "pipelines.push:PushStage",
    "deploy": "pipelines.deploy:DeployStage",
}
# What each stage reads from an earlier one; selecting a stage without its input is an error.
NEEDS = {"build": "checkout", "scan": "build", "push": "build", "deploy": "push"}


def default_data_dir() -> Path:
    env = os.environ.get("RUNNER_DATA_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "runner"


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + _random.token_hex(3)


@dataclass(frozen=True)
class RunOptions:
    variables: Mapping[str, str] = field(default_factory=dict)
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    repo: str | None = None
    ref: str | None = None
    event: Mapping[str, Any] | None = None  # a stored webhook delivery (see load_event)
    run_id: str | None = None
    data_dir: Path | None = None


@dataclass
class Prepared:
    pipeline: Pipeline
    stages: tuple[str, ...]
    trigger: dict[str, Any]
    masker: Any
    secrets: Any
    run_id: str
    data_dir: Path
    warnings: list[str] = field(default_factory=list)  # found while preparing (short secrets)


@dataclass
class StageResult:
    name: str
    status: str  # success | failed | skipped | cancelled
    duration: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunResult:
    run_id: str
    status: str  # success | failed | cancelled
    exit_code: int
    stages: list[StageResult]
    duration: float
    workdir: Path | None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def _split_names(values: tuple[str, ...], flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for v in values for n in v.split(",") if n.strip())
    unknown = [n for n in names if n not in STAGE_ORDER]
    if unknown:
        raise InvalidInput(f"{flag}: unknown stage {', '.join(map(repr, unknown))} "
                           f"(stages are {', '.join(STAGE_ORDER)})")
    return names


def select_stages(pipeline: Pipeline, only: tuple[str, ...], skip: tuple[str, ...]) -> tuple[str, ...]:
    only = _split_names(only, "--only")
    skip = _split_names(skip, "--skip")
    chosen = []
    for name in STAGE_ORDER:
        enabled = getattr(pipeline.stages, name).enabled
        if only:
            if name in only:
                chosen.append(name)
        elif enabled and name not in skip:
            chosen.append(name)
    for name in chosen:
        need = NEEDS.get(name)
        if need and need not in chosen:
            raise InvalidInput(f"stage {name!r} needs the output of {need!r}, which is not selected "
                               f"(selected: {', '.join(chosen)})")
    return tuple(chosen)


def load_event(path: str | os.PathLike) -> dict[str, Any]:
    """Read a stored webhook delivery: either the raw push payload, or
    {"provider": ..., "headers": {...}, "payload": {...}} as the daemon stores it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"--event {path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--event {path}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"--event {path}: expected a JSON object")
    return data


def trigger_from_event(event: Mapping[str, Any]) -> dict[str, Any]:
    from runner.trigger import parse_event

    if "payload" in event and isinstance(event.get("payload"), dict):
        trig = parse_event(event["payload"], headers=event.get("headers") or {},
                           provider=event.get("provider"))
    else:
        trig = parse_event(dict(event))
    if trig.deleted:
        raise InvalidInput(f"the event deletes {trig.ref}: there is nothing to build")
    data = {k: getattr(trig, k) for k in trig.__dataclass_fields__}
    data["kind"] = "webhook"
    return data


def prepare(path: str | os.PathLike, options: RunOptions,
            environ: Mapping[str, str] | None = None) -> Prepared:
    """Load and check everything; raises InvalidInput before any side effect."""
    from runner.gitsafety import check_ref, check_repo_url
    from runner.loader import is_local_path, load_pipeline
    from runner.secrets import Masker, SecretStore

    environ = dict(os.environ if environ is None else environ)
    early_warnings: list[str] = []
    pipeline = load_pipeline(path, variables=dict(options.variables), environ=environ)
    trigger: dict[str, Any] = {"kind": "manual"}
    if options.event is not None:
        trigger = trigger_from_event(options.event)
    repo_update: dict[str, Any] = {}
    if options.repo:
        url = options.repo
        if is_local_path(url):
            url = str(Path(url).resolve())
        repo_update["url"] = check_repo_url(url)
    if options.ref:
        repo_update["ref"] = check_ref(options.ref)
        trigger.pop("commit", None)  # an explicit --ref beats the event's commit
    else:
        check_repo_url(repo_update.get("url", pipeline.repository.url))
        if pipeline.repository.ref:
            check_ref(pipeline.repository.ref)
    if trigger.get("commit"):
        check_ref(trigger["commit"])
    if repo_update:
        pipeline = pipeline.model_copy(
            update={"repository": pipeline.repository.model_copy(update=repo_update)})
    stages = select_stages(pipeline, options.only, options.skip)
    masker = Masker(on_warning=early_warnings.append)
    store = SecretStore.from_pipeline(pipeline, environ, masker)
    return Prepared(pipeline=pipeline, stages=stages, trigger=trigger, masker=masker,
                    secrets=store, warnings=early_warnings, run_id=options.run_id or new_run_id(),
                    data_dir=Path(options.data_dir or default_data_dir()))


def _stage(name: str):
    module, cls = STAGE_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def plan(prep: Prepared) -> dict[str, Any]:
    """The run as plain data, for --dry-run. Touches nothing."""
    p = prep.pipeline
    return {
        "pipeline": p.name,
        "file": p.source_file,
        "run_id": prep.run_id,
        "trigger": prep.trigger,
        "image": {"name": p.image.name, "tags": list(p.image.tags)},
        "stages": [{"name": n, **_stage(n).plan(p)} for n in prep.stages],
        "skipped": [n for n in STAGE_ORDER if n not in prep.stages],
        "secrets": {name: "***" for name in p.secrets},
    }


def execute(prep: Prepared, sinks: list[Sink], cancel: threading.Event | None = None) -> RunResult:
    """Run the selected stages in order. Never raises for a pipeline failure or a cancel:
    the outcome is in the RunResult (and in the events)."""
    cancel = cancel or threading.Event()
    started = time.monotonic()
    workdir = prep.data_dir / "runs" / prep.run_id
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = prep.data_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(prep.run_id, prep.masker, sinks, workdir / "logs")
    log.warnings.extend(prep.warnings)
    from pipelines.base import StageContext

    results: dict[str, dict[str, Any]] = {}
    stage_results: list[StageResult] = []
    status, exit_code, error = "success", EXIT_OK, None
    log.emit("run.start", pipeline=prep.pipeline.name, file=prep.pipeline.source_file,
             stages=list(prep.stages), trigger=prep.trigger, workdir=str(workdir))
    try:
        for name in STAGE_ORDER:
            if name not in prep.stages:
                continue
            if status != "success":
                why = f"not run: stage {stage_results[-1].name!r} {stage_results[-1].status}"
                stage_results.append(StageResult(name, "skipped", error=why))
                log.emit("stage.end", stage=name, status="skipped", duration=0.0, error=why)
                continue
            ctx = StageContext(run_id=prep.run_id, pipeline=prep.pipeline, workdir=workdir,
                               cache_dir=cache_dir, log=log.for_stage(name), secrets=prep.secrets,
                               cancel=cancel, results=results, trigger=prep.trigger)
            t0 = time.monotonic()
            log.emit("stage.start", stage=name)
            try:
                if cancel.is_set():
                    raise Cancelled("cancelled before the stage started")
                outputs = _stage(name).run(ctx) or {}
                results[name] = outputs
                res = StageResult(name, "success", time.monotonic() - t0, outputs)
            except StageFailed as exc:
                # A failed gate still has outputs worth keeping (report paths, counts).
                res = StageResult(name, "failed", time.monotonic() - t0,
                                  dict(getattr(exc, "outputs", None) or {}), error=exc.reason)
                status, exit_code, error = "failed", EXIT_FAILED, f"stage {name!r} failed: {exc.reason}"
            except (Cancelled, KeyboardInterrupt) as exc:
                cancel.set()
                why = str(exc) or "interrupted"
                res = StageResult(name, "cancelled", time.monotonic() - t0, error=why)
                status, exit_code, error = "cancelled", EXIT_INTERRUPTED, f"stage {name!r} was {why}"
            except InvalidInput as exc:
                res = StageResult(name, "failed", time.monotonic() - t0, error=str(exc))
                status, exit_code, error = "failed", EXIT_FAILED, f"stage {name!r} failed: {exc}"
            except Exception as exc:  # a bug in the runner, not the user's pipeline
                tb = traceback.format_exc()
                log.for_stage(name).info("internal error (a bug in runner):\n" + tb)
                res = StageResult(name, "failed", time.monotonic() - t0,
                                  error=f"internal error in runner: {exc!r} (traceback in "
                                        f"{workdir / 'logs' / (name + '.log')})")
                status, exit_code, error = "failed", EXIT_FAILED, f"stage {name!r}: {res.error}"
            stage_results.append(res)
            log.emit("stage.end", stage=name, status=res.status, duration=round(res.duration, 3),
                     outputs=res.outputs, error=res.error)
    finally:
        duration = time.monotonic() - started
        result = RunResult(prep.run_id, status, exit_code, stage_results, duration, workdir,
                           error, list(log.warnings))
        log.emit("run.end", status=status, exit_code=exit_code, duration=round(duration, 3),
                 error=error, warnings=result.warnings,
                 stages=[{"name": s.name, "status": s.status, "duration": round(s.duration, 3)}
                         for s in stage_results])
        # Masked as a whole: stage outputs and errors may quote tool output.
        (workdir / "run.json").write_text(prep.masker.mask(json.dumps({
            "run_id": prep.run_id, "pipeline": prep.pipeline.name, "status": status,
            "exit_code": exit_code, "error": error,
            "duration": duration, "trigger": prep.trigger,
            "stages": [{"name": s.name, "status": s.status, "duration": s.duration,
                        "outputs": s.outputs, "error": s.error} for s in stage_results],
        }, indent=2, default=str)))
        log.close()
    return result

