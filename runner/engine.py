"""Runs a pipeline: the same engine for `runner exec`, `--event` replays and the daemon (whose
runs arrive as a typed request, runner.run_request).

prepare() does everything that can fail on bad input (load, validate, overrides, secrets)
before anything touches the world; execute() then runs the selected stages in order.

The run's record (logs/events.jsonl, logs/<stage>.log, run.json) never depends on who watches:
a live sink that fails (a closed pipe: `runner exec --json | head -1`, a daemon that died) is
dropped by runner.runlog and the run goes on. An interrupt (SIGINT, SIGTERM: see
`stop_on_signals`) cancels the running stage; one that comes while the record is being written
waits until it is written.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import secrets as _random
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Cancelled,
                           InvalidInput, SecretWithheld, StageFailed)
from runner.model import STAGE_ORDER, Pipeline
from runner.outputs import Outputs
from runner.private_dir import private_dir
from runner.run_request import RunRequest
from runner.runlog import RunLog, Sink
from runner.signals import StopSignals

if TYPE_CHECKING:
    from runner.secrets import SecretStore

# Stage implementations live in pipelines/ and deployers/; the engine only knows their names.
STAGE_CLASSES = {
    "checkout": "pipelines.checkout:CheckoutStage",
    "build": "pipelines.build:BuildStage",
    "test": "pipelines.testing:TestStage",
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


# A run id names the run's directory, <data dir>/runs/<run id>: one path component, no more.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_run_id(value: str) -> str:
    """Return `value` if it may name a run's directory; raise InvalidInput saying why not."""
    if not isinstance(value, str) or not RUN_ID_RE.fullmatch(value) or ".." in value:
        raise InvalidInput(f"run id {value!r} refused: it names the run's directory, so it must be "
                           "1 to 64 letters, digits, '.', '_' or '-', start with a letter or digit "
                           "and contain no '..'")
    return value


@dataclass(frozen=True)
class RunOptions:
    variables: Mapping[str, str] = field(default_factory=dict)
    destination: str | None = None  # `-d NAME`: a destination of the pipeline's
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    repo: str | None = None
    ref: str | None = None
    # What to build and why (the daemon's --request, or --event parsed into one); None: a run
    # by hand, of the pipeline's own ref.
    request: RunRequest | None = None
    run_id: str | None = None
    data_dir: Path | None = None
    withhold_secrets: bool = False  # the run gets no secret value (a pull request from a fork)


@dataclass
class Prepared:
    pipeline: Pipeline
    stages: tuple[str, ...]
    request: RunRequest
    masker: Any
    secrets: Any
    run_id: str
    data_dir: Path
    warnings: list[str] = field(default_factory=list)  # found while preparing (short secrets)
    # Stages the pipeline has that this run leaves out (--skip, --only): stage -> why.
    skipped: dict[str, str] = field(default_factory=dict)
    withhold_secrets: bool = False


@dataclass
class StageResult:
    name: str
    status: str  # success | failed | skipped | cancelled
    duration: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)  # as recorded: the outputs' to_dict()
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
    """The stages to run, in order: those named by --only (else those the pipeline enables),
    less those named by --skip, which always wins (a stage skipped for a pull request must not
    come back through --only)."""
    only = _split_names(only, "--only")
    skip = _split_names(skip, "--skip")
    chosen = []
    for name in STAGE_ORDER:
        enabled = getattr(pipeline.stages, name).enabled
        if name in skip:
            continue
        if only:
            if name in only:
                chosen.append(name)
        elif enabled:
            chosen.append(name)
    for name in chosen:
        need = NEEDS.get(name)
        if need and need not in chosen:
            raise InvalidInput(f"stage {name!r} needs the output of {need!r}, which is not selected "
                               f"(selected: {', '.join(chosen)})")
    return tuple(chosen)


def skip_reasons(pipeline: Pipeline, only: tuple[str, ...], skip: tuple[str, ...],
                 chosen: tuple[str, ...]) -> dict[str, str]:
    """Why each stage the pipeline enables (or --only names) is not in `chosen`: stage -> reason.
    These are reported as `skipped`, so that a run without push says so instead of saying
    nothing. Pure."""
    only = _split_names(only, "--only")
    skip = _split_names(skip, "--skip")
    reasons: dict[str, str] = {}
    for name in STAGE_ORDER:
        if name in chosen or not (getattr(pipeline.stages, name).enabled or name in only):
            continue
        if name in skip:
            reasons[name] = f"not run: --skip {name}"
        elif only:
            reasons[name] = f"not run: not in --only {','.join(only)}"
    return reasons


def stage_secrets(pipeline: Pipeline, stage: str) -> list[tuple[str, str]]:
    """The secrets a stage's settings refer to: [(field path, secret name)]. Pure.
    The repository's credentials belong to the checkout stage."""
    from runner.loader import format_path, secret_references

    out = []
    for path, name in secret_references(pipeline):
        owner = "checkout" if path[:1] == ("repository",) else \
            path[1] if len(path) > 1 and path[0] == "stages" else None
        if owner == stage:
            out.append((format_path(path), name))
    return out


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


def prepare(path: str | os.PathLike, options: RunOptions,
            environ: Mapping[str, str] | None = None) -> Prepared:
    """Load and check everything; raises InvalidInput before any side effect."""
    from runner.gitsafety import check_ref, check_repo_url
    from runner.loader import is_local_path, load_pipeline
    from runner.pipeline_file import read_secrets
    from runner.secrets import Masker

    environ = dict(os.environ if environ is None else environ)
    early_warnings: list[str] = []
    request = options.request or RunRequest()
    if request.pipeline_from is None:
        pipeline = load_pipeline(path, variables=dict(options.variables), environ=environ,
                                 destination=options.destination)
    else:
        # `path` is inside the repository, read at the run's commit (or the head of its ref now,
        # which is then the commit built): the file and the code are of one commit.
        from runner.repository_pipeline import load_at_commit

        pipeline, commit = load_at_commit(request.pipeline_from, os.fspath(path), request.commit,
                                          request.ref or request.branch or request.tag,
                                          dict(options.variables), environ=environ,
                                          warn=early_warnings.append,
                                          destination=options.destination)
        request = request.model_copy(update={"commit": commit})
    repo_update: dict[str, Any] = {}
    if options.repo:
        url = options.repo
        if is_local_path(url):
            url = str(Path(url).resolve())
        repo_update["url"] = check_repo_url(url)
    if options.ref:
        request = request.model_copy(update={"commit": None})  # an explicit --ref beats the request's commit
    # A request without a commit (a manual run whose head could not be read) builds its branch's
    # or tag's head now, whatever ref the pipeline names: as --ref would.
    ref = options.ref or (None if request.commit else request.branch or request.tag)
    if ref:
        repo_update["ref"] = check_ref(ref)
    else:
        check_repo_url(repo_update.get("url", pipeline.repository.url))
        if pipeline.repository.ref:
            check_ref(pipeline.repository.ref)
    if repo_update:
        pipeline = pipeline.model_copy(
            update={"repository": pipeline.repository.model_copy(update=repo_update)})
    stages = select_stages(pipeline, options.only, options.skip)
    run_id = check_run_id(options.run_id) if options.run_id is not None else new_run_id()
    masker = Masker(on_warning=early_warnings.append)
    # A repository's pipeline: the entry's credentials reach the repository even in a run that
    # gets no secrets (a fork's pull request is checked out with them); only git gets them.
    git_only = request.pipeline_from.credentials if request.pipeline_from else ()
    store = read_secrets(pipeline, environ, masker, withhold=options.withhold_secrets, keep=git_only)
    return Prepared(pipeline=pipeline, stages=stages, request=request, masker=masker,
                    secrets=store, warnings=early_warnings, run_id=run_id,
                    data_dir=Path(options.data_dir or default_data_dir()),
                    skipped=skip_reasons(pipeline, options.only, options.skip, stages),
                    withhold_secrets=options.withhold_secrets)


def _stage(name: str):
    module, cls = STAGE_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def plan(prep: Prepared) -> dict[str, Any]:
    """The run as plain data, for --dry-run. Touches nothing."""
    p = prep.pipeline
    stages = [{"name": n, **_stage(n).plan(p)} for n in prep.stages]
    # The deploy's summary (servers, image, env and secret names, proxy hosts, health probe)
    # opens the output, before the commands a person does not read line by line.
    summary = next((s.pop("summary") for s in stages if "summary" in s), None)
    return {
        **({"summary": summary} if summary is not None else {}),
        "pipeline": p.name,
        "file": p.source_file,
        "run_id": prep.run_id,
        "trigger": prep.request.to_dict(),
        "image": {"name": p.image.name, "tags": list(p.image.tags)},
        "stages": stages,
        "skipped": [n for n in STAGE_ORDER if n not in prep.stages],
        "secrets": {name: "withheld" if prep.withhold_secrets else "***" for name in p.secrets},
    }


class _Hold:
    """Where an interrupt waits (see stop_on_signals): the engine's critical sections nest."""

    depth = 0
    pending = False


@contextlib.contextmanager
def _interrupts_held():
    """While the block runs (in the main thread), an interrupt from stop_on_signals waits; it
    is raised as KeyboardInterrupt when the outermost block ends. Python runs signal handlers
    in the main thread only, so another thread's run needs no holding."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Hold.depth += 1
    try:
        yield
    finally:
        _Hold.depth -= 1
        if _Hold.depth == 0 and _Hold.pending:
            _Hold.pending = False
            raise KeyboardInterrupt


def stop_on_signals(cancel: threading.Event) -> None:
    """For a process that runs one pipeline (`runner exec`); call from the main thread.

    SIGINT (Ctrl-C, or the daemon's PR_SET_PDEATHSIG when it dies) and SIGTERM cancel the run:
    the first raises KeyboardInterrupt in the main thread, so that the running stage stops at
    once even in a blocking call; further ones change nothing, stopping is under way and must
    not be cut short. While execute() writes the run's record, the KeyboardInterrupt waits until
    the record is written. The handler takes no lock (runner.signals): `cancel` (an Event, whose
    set() takes one) is set by the watcher thread the signal wakes, which the stages' threads
    see; the main thread sets it too when the KeyboardInterrupt reaches execute()."""
    def react(n: int) -> None:
        if n > 1:
            return
        if _Hold.depth:
            _Hold.pending = True
            return
        raise KeyboardInterrupt

    signals = StopSignals()
    signals.install(react)
    signals.watch(cancel.set)


def execute(prep: Prepared, sinks: list[Sink], cancel: threading.Event | None = None) -> RunResult:
    """Run the selected stages in order. Never raises for a pipeline failure or a cancel:
    the outcome is in the RunResult (and in the events).

    The record on disk is whole whatever happens while the run goes on: a failing sink is
    dropped (runner.runlog), an interrupt between stages or while an event is written cancels
    the run like one inside a stage, and run.json is written (atomically, before run.end is
    emitted) with every stage the run selected: run, failed, cancelled or skipped."""
    from runner.stage import StageContext

    cancel = cancel or threading.Event()
    started = time.monotonic()
    workdir = prep.data_dir / "runs" / prep.run_id
    cache_dir = prep.data_dir / "cache"
    log: RunLog | None = None

    outputs = Outputs()  # what the stages that succeeded gave, for the later ones
    stage_results: list[StageResult] = []
    reported: set[str] = set()  # stages whose stage.end is written
    status, exit_code, error = "success", EXIT_OK, None
    running: tuple[str, float] | None = None  # the stage started and not yet recorded

    def end(res: StageResult) -> None:
        nonlocal running
        with _interrupts_held():
            stage_results.append(res)
            running = None
            log.emit("stage.end", stage=res.name, status=res.status,
                     duration=round(res.duration, 3), outputs=res.outputs, error=res.error)
            reported.add(res.name)

    try:
        with _interrupts_held():  # an interrupt now comes once the record has begun
            # A run's files (its checkout, a key committed by mistake) are its user's alone.
            private_dir(workdir.parent)
            private_dir(workdir)
            private_dir(cache_dir)
            log = RunLog(prep.run_id, prep.masker, sinks, workdir / "logs")
            log.warnings.extend(prep.warnings)
            log.emit("run.start", pipeline=prep.pipeline.name, file=prep.pipeline.source_file,
                     stages=list(prep.stages), trigger=prep.request.to_dict(), workdir=str(workdir),
                     **({"secrets_withheld": True} if prep.withhold_secrets else {}))
        engine_stage = next((n for n in ("build", "test") if n in prep.stages), None)
        if prep.stages:
            from pipelines.housekeeping import check_reserve

            short = check_reserve(prep.pipeline, prep.data_dir, engine_stage is not None)
            if short is not None:  # before any stage: every one is recorded as not run
                status, exit_code, error = "failed", EXIT_FAILED, short
        for name in STAGE_ORDER if status == "success" else ():
            why = prep.skipped.get(name)
            if why is None and name not in prep.stages:
                continue
            if why is None and status != "success":
                stopped = next(r for r in reversed(stage_results) if r.status != "skipped")
                why = f"not run: stage {stopped.name!r} {stopped.status}"
            if why is not None:
                end(StageResult(name, "skipped", error=why))
                continue
            ctx = StageContext(run_id=prep.run_id, pipeline=prep.pipeline, workdir=workdir,
                               cache_dir=cache_dir, log=log.for_stage(name), secrets=prep.secrets,
                               cancel=cancel, outputs=outputs, request=prep.request)
            t0 = time.monotonic()
            with _interrupts_held():
                log.emit("stage.start", stage=name)
                running = (name, t0)
            try:
                if cancel.is_set():
                    raise Cancelled("cancelled before the stage started")
                if prep.withhold_secrets:
                    _refuse_withheld(prep.pipeline, name, prep.secrets)
                given = _stage(name).run(ctx)
                outputs.add(name, given)  # a stage returning another type is a bug: it fails
                res = StageResult(name, "success", time.monotonic() - t0, given.to_dict())
            except StageFailed as exc:
                # A failed gate still has outputs worth keeping (report paths, counts).
                res = StageResult(name, "failed", time.monotonic() - t0,
                                  exc.outputs.to_dict() if exc.outputs is not None else {},
                                  error=exc.reason)
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
            end(res)
        if engine_stage is not None and status != "cancelled":  # a disk found short too
            _housekeep(prep, log.for_stage(engine_stage), cache_dir, outputs)
    except KeyboardInterrupt:
        # Between stages, or while a stage's result was being handled: the run stops here.
        if log is None:  # before the record began (no stop_on_signals here): nothing to record
            raise
        cancel.set()
        if running is not None:
            stage_results.append(StageResult(running[0], "cancelled",
                                             time.monotonic() - running[1], error="interrupted"))
            status, exit_code = "cancelled", EXIT_INTERRUPTED
            error = f"stage {running[0]!r} was interrupted"
        elif status == "success":  # a failure already decided the outcome otherwise
            status, exit_code, error = "cancelled", EXIT_INTERRUPTED, "the run was interrupted"
    except BaseException as exc:  # a bug in the runner outside any stage: recorded, then raised
        status, exit_code, error = "failed", EXIT_FAILED, f"internal error in runner: {exc!r}"
        if running is not None:
            stage_results.append(StageResult(running[0], "failed",
                                             time.monotonic() - running[1], error=error))
        raise
    finally:
        result = None
        if log is not None:  # else the run's directory could not be made: the error says why
            try:
                with _interrupts_held():
                    result = _finish(prep, log, workdir, started, stage_results, reported,
                                     status, exit_code, error)
            except KeyboardInterrupt:
                if result is None:  # not held (no stop_on_signals here): the record is cut short
                    raise
                # It came while the record was written: the run is over, nothing is left to stop.
    return result


def _housekeep(prep: Prepared, log: Any, cache_dir: Path, outputs: Outputs) -> None:
    """After a run that used the build engine (pipelines/housekeeping.py): what it removed in
    the log of the stage that used it, its failures as warnings, never the run's outcome."""
    from pipelines.housekeeping import housekeep

    try:
        report = housekeep(prep.pipeline, cache_dir,
                           just_built=outputs.build.image_id if outputs.build else None,
                           thorough=False)
    except KeyboardInterrupt:  # the stages are over: an interrupt stops the clean-up alone
        log.warn("housekeeping: interrupted; `runner gc` does it by hand")
        return
    for line in report.done:
        log.info(f"housekeeping: {line}")
    for warning in report.warnings:
        log.warn(warning)


def withheld_needs(pipeline: Pipeline, stage: str, secrets: SecretStore) -> list[tuple[str, str]]:
    """The secrets a stage cannot do without that this run does not get: [(field path, name)].
    Pure. The test stage needs none: its steps and services run without their withheld
    `secret_env` (pipelines.testing says which, per step), as Woodpecker and GitLab run a fork's."""
    if stage == "test":
        return []
    return [(f, n) for f, n in dict.fromkeys(stage_secrets(pipeline, stage)) if secrets.is_withheld(n)]


def _refuse_withheld(pipeline: Pipeline, stage: str, secrets: SecretStore) -> None:
    """Fail a stage that needs a secret before it does anything, when the run gets none."""
    needed = withheld_needs(pipeline, stage, secrets)
    if needed:
        field_path, name = needed[0]
        exc = SecretWithheld(name, field_path)
        if len(needed) > 1:
            exc.reason += "; also needed: " + ", ".join(f"{n!r} ({f})" for f, n in needed[1:])
        raise exc


def _finish(prep: Prepared, log: RunLog, workdir: Path, started: float,
            stage_results: list[StageResult], reported: set[str], status: str, exit_code: int,
            error: str | None) -> RunResult:
    """Complete the record: a stage.end for every selected stage (one the run did not reach is
    `skipped`), run.json (written whole, then renamed into place), then run.end."""
    done = {s.name for s in stage_results}
    for name in STAGE_ORDER:
        if (name in prep.stages or name in prep.skipped) and name not in done:
            why = prep.skipped.get(name) or \
                f"not run: {'the run failed' if status == 'failed' else f'the run was {status}'}"
            stage_results.append(StageResult(name, "skipped", error=why))
    stage_results.sort(key=lambda s: STAGE_ORDER.index(s.name))
    for s in stage_results:
        if s.name not in reported:
            log.emit("stage.end", stage=s.name, status=s.status, duration=round(s.duration, 3),
                     outputs=s.outputs, error=s.error)
            reported.add(s.name)
    duration = time.monotonic() - started
    result = RunResult(prep.run_id, status, exit_code, stage_results, duration, workdir,
                       error, list(log.warnings))
    # Masked as a whole: stage outputs and errors may quote tool output.
    record = prep.masker.mask(json.dumps({
        "run_id": prep.run_id, "pipeline": prep.pipeline.name, "status": status,
        # Which of the pipeline's histories this run is in (`recovered` reads it back).
        **({"destination": prep.pipeline.destination} if prep.pipeline.destination else {}),
        "exit_code": exit_code, "error": error,
        "duration": duration, "trigger": prep.request.to_dict(),
        "secrets_withheld": prep.withhold_secrets,
        "stages": [{"name": s.name, "status": s.status, "duration": s.duration,
                    "outputs": s.outputs, "error": s.error} for s in stage_results],
        "warnings": result.warnings,
    }, indent=2, default=str))
    tmp = workdir / f".run.json.{os.getpid()}"
    tmp.write_text(record)
    os.replace(tmp, workdir / "run.json")
    try:
        log.emit("run.end", status=status, exit_code=exit_code, duration=round(duration, 3),
                 error=error, warnings=result.warnings,
                 stages=[{"name": s.name, "status": s.status, "duration": round(s.duration, 3)}
                         for s in stage_results])
    finally:
        log.close()
    return result
