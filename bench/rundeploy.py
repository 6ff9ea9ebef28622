"""The runner's deploy stage, alone, in its own process: what `runner exec` runs after a push.

    python -m bench.rundeploy PIPELINE.yaml REF [--profile OUT.prof] [--destination NAME]

`runner exec --only deploy` cannot run without the push stage (deploy reads the digest this run
pushed), so the bench drives the very same stage code the engine calls
(pipelines.deploy.DeployStage.run) with the pushed digest as the push stage's output, after
loading and validating the pipeline file the way the engine does (runner.loader, secrets,
masker, RunLog events). Timed from outside as a whole process, like the shell loop it is
compared with. Prints one JSON line: the process's own milestones (epoch seconds) and the
stage's events, so the harness can split the time into startup, SSH setup and the deploy.
"""
from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline")
    ap.add_argument("ref")
    ap.add_argument("--profile", help="write a cProfile of the deploy to this file")
    ap.add_argument("--destination", help="the pipeline's destination to deploy to (-d)")
    args = ap.parse_args(argv)

    from pipelines.deploy import DeployStage
    from runner.errors import StageFailed
    from runner.loader import load_pipeline
    from runner.model.image import ImageRef
    from runner.outputs import Outputs, PushOutputs
    from runner.runlog import RunLog
    from runner.secrets import Masker, SecretStore
    from runner.stage import StageContext

    from bench import trace
    t_imported = time.time()

    pipeline = load_pipeline(args.pipeline, environ=dict(os.environ),
                             destination=args.destination)
    masker = Masker()
    store = SecretStore.from_pipeline(pipeline, dict(os.environ), masker)
    events: list[dict] = []
    run_id = "bench-" + time.strftime("%H%M%S") + f"-{os.getpid()}"
    log = RunLog(run_id, masker, [events.append], None)
    ctx = StageContext(run_id=run_id, pipeline=pipeline, workdir=Path("/tmp"),
                       cache_dir=Path("/tmp"), log=log.for_stage("deploy"), secrets=store,
                       cancel=threading.Event(),
                       outputs=Outputs(push=PushOutputs(
                           ref=ImageRef.parse(args.ref), tags=(), verified=False,
                           verification="pushed before the benchmark", credentials="none")))
    t_loaded = time.time()
    status, error, outputs = "success", None, {}
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    log.emit("stage.start", stage="deploy")
    trace.install()
    t0 = time.monotonic()
    try:
        outputs = DeployStage().run(ctx).to_dict()
    except StageFailed as exc:
        status, error = "failed", exc.reason
    duration = time.monotonic() - t0
    log.emit("stage.end", stage="deploy", status=status, duration=round(duration, 3),
             error=error)
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
    print(json.dumps({"status": status, "error": error, "outputs": outputs,
                      "process_start": T_START, "imported": t_imported, "loaded": t_loaded,
                      "stage_duration": duration, "end": time.time(),
                      "trace": trace.records(),
                      "events": [{k: e.get(k) for k in ("event", "stage", "line", "time")}
                                 for e in events]}, default=str))
    sys.stdout.flush()
    return 0 if status == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
