#!/usr/bin/env python3
"""The scan stage of the example pipeline on a code-only change, this tree against another revision.

    python -m bench.scan_stage [--rounds 3] [--before REV] [--json FILE]

As root with the lab up. A bare repository holding examples/app and pipeline.example.yaml (as
bench.push_live makes it; the image renamed REGISTRY/bench/scan-stage), then per round and per
runner (this tree, and with --before the runner of REV from a temporary `git worktree`, the order
swapped every round): commit a code-only change (app.py's MESSAGE) and `runner exec --only
checkout,build,scan` it, each runner with a data directory of its own (its own Trivy cache),
warmed by one uncounted run. The figure is the scan stage's duration in run.json; the build's is
printed beside it (the same work for both).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import lab_status
from bench.deploy import before_tree
from bench.push_live import LAB_VARS, bench_pipeline, commit_change, lab_env, make_repository

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[scan-stage {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_run(tree: Path, pipeline: Path, data: Path, run_id: str, env: dict[str, str]) -> dict:
    """`runner exec --only checkout,build,scan` with the runner of `tree`: each stage's seconds."""
    argv = [sys.executable, "-m", "runner", "exec", str(pipeline), "--only", "checkout,build,scan",
            "--data-dir", str(data), "--run-id", run_id, "-q"]
    p = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{run_id} ({tree}): exit {p.returncode}\n{p.stderr[-3000:]}")
    record = json.loads((data / "runs" / run_id / "run.json").read_text())
    return {s["name"]: s["duration"] for s in record["stages"] if s["status"] == "success"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="counted runs per runner (1-10)")
    ap.add_argument("--before", metavar="REV", help="also time the runner of REV, interleaved")
    ap.add_argument("--json", dest="json_out", help="also write every number here")
    a = ap.parse_args()
    if not 1 <= a.rounds <= 10:
        raise SystemExit("--rounds 1-10")
    if not lab_status().get("up"):
        raise SystemExit("the lab is not up (runner lab up)")
    lab = lab_env()
    env = {**os.environ, **{k: lab[k] for k in LAB_VARS},
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-scan-stage-"))
    try:
        bare, work = make_repository(tmp)
        pipeline = bench_pipeline(work, tmp / "pipeline.yaml")
        text = pipeline.read_text().replace("/bench/push-live", "/bench/scan-stage")
        pipeline.write_text(text)
        env["REPO_URL"] = str(bare)
        runners = {"after": ROOT}
        with (before_tree(a.before, "before") if a.before else contextlib.nullcontext()) as before:
            if before is not None:
                runners = {"before": before[0], **runners}
            times: dict[str, list[dict]] = {name: [] for name in runners}
            for i in range(1 + a.rounds):
                # A B, B A, ...: neither runner always comes second (a warmer page cache).
                for name, tree in list(runners.items())[::1 if i % 2 else -1]:
                    commit_change(work, f"{name} {i}")
                    stages = one_run(tree, pipeline, tmp / f"data-{name}", f"{name}{i}", env)
                    log(f"{'warm-up' if i == 0 else f'round {i}'} {name}: scan "
                        f"{stages.get('scan', 0):.2f} s (build {stages.get('build', 0):.2f} s)")
                    if i:
                        times[name].append(stages)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {name: {"scan_s": [round(r["scan"], 3) for r in runs],
                     "median_scan_s": round(statistics.median(r["scan"] for r in runs), 3),
                     "median_build_s": round(statistics.median(r["build"] for r in runs), 3)}
              for name, runs in times.items()}
    for name, r in report.items():
        print(f"{name:6}: scan median {r['median_scan_s']:.2f} s (rounds "
              f"{', '.join(f'{t:.2f}' for t in r['scan_s'])}); build median {r['median_build_s']:.2f} s")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
