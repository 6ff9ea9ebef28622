"""The runner's test stage, alone, in its own process: what `runner exec` runs after the build.

    python -m bench.runtest PIPELINE.yaml IMAGE_ID

As bench/rundeploy.py does for the deploy stage: the very code the engine calls
(pipelines.testing.TestStage.run) after loading and validating the pipeline file the way the
engine does (runner.loader, secrets, masker, RunLog), with IMAGE_ID as the build stage's output
(the image this run "just built"). The docker SDK is imported before the stage is timed: in
`runner exec` the build stage has imported it already (0.5 s). Prints one JSON line: the
process's milestones (epoch seconds), the stage's own duration and its outputs (their
`phases`: where the time went).
"""
from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline")
    ap.add_argument("image_id")
    args = ap.parse_args(argv)

    import pipelines.engine_sdk  # noqa: F401 - the docker SDK: the build stage imported it
    from pipelines.testing import TestStage
    from runner.errors import StageFailed
    from runner.loader import load_pipeline
    from runner.outputs import BuildOutputs, Outputs
    from runner.runlog import RunLog
    from runner.secrets import Masker, SecretStore
    from runner.stage import StageContext
    t_imported = time.time()

    pipeline = load_pipeline(args.pipeline, environ=dict(os.environ))
    masker = Masker()
    store = SecretStore.from_pipeline(pipeline, dict(os.environ), masker)
    events: list[dict] = []
    run_id = f"bench-{time.strftime('%H%M%S')}-{os.getpid()}"
    log = RunLog(run_id, masker, [events.append], None)
    workdir = Path(tempfile.mkdtemp(prefix="runner-bench-test-"))
    ctx = StageContext(run_id=run_id, pipeline=pipeline, workdir=workdir, cache_dir=workdir,
                       log=log.for_stage("test"), secrets=store, cancel=threading.Event(),
                       outputs=Outputs(build=BuildOutputs(
                           image_id=args.image_id, tags=(), builder="bench", engine="local",
                           cached_steps=0, total_steps=0)))
    t_loaded = time.time()
    status, error, outputs = "success", None, {}
    t0 = time.monotonic()
    try:
        outputs = TestStage().run(ctx).to_dict()
    except StageFailed as exc:
        status, error = "failed", exc.reason
        outputs = exc.outputs.to_dict() if exc.outputs is not None else {}
    finally:
        duration = time.monotonic() - t0
        shutil.rmtree(workdir, ignore_errors=True)  # the reports it copied out
    print(json.dumps({"status": status, "error": error, "outputs": outputs,
                      "process_start": T_START, "imported": t_imported, "loaded": t_loaded,
                      "stage_duration": duration, "end": time.time()}, default=str))
    sys.stdout.flush()
    return 0 if status == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
