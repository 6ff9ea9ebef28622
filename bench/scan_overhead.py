"""How much the scan stage adds to running Trivy directly with the same flags.

    eval "$(python -m runner lab env)"        # or DOCKER_HOST=... of an engine with the image
    python bench/scan_overhead.py [--rounds 7] [--image REF] [--image-source auto|archive]

Builds the example app image (examples/app, PYTHON_IMAGE=local/python:3.11 by default) unless
--image is given, then alternates, round by round: the scan stage's run() in this process (what
the engine calls: find Trivy, check the DB, run it, parse, gate, write reports) and the very
argv the stage runs, as a plain subprocess. Both share one Trivy cache, warmed first. Prints the
medians, the per-round ratio stage/direct, and whether the overhead stays under 10 %.

Offline here, so the scanners are secret and misconfig (no vulnerability DB can be had);
pass --scanners vuln,secret,misconfig where a DB is in the cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.base import StageContext  # noqa: E402
from pipelines.scan import (  # noqa: E402
    ScanGateFailed, ScanStage, _trivy_env, find_tool, image_source, trivy_argv,
)
from runner.model import Pipeline  # noqa: E402


class QuietLog:
    def line(self, text: str) -> None:
        pass

    def info(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        print("warning:", text, file=sys.stderr)


class NoSecrets:
    def value(self, name: str) -> str:
        raise KeyError(name)


def build_example(tag: str, python_image: str) -> None:
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    subprocess.run(["/usr/bin/docker", "build", "-q", "--build-arg",
                    f"PYTHON_IMAGE={python_image}", "-t", tag, str(ROOT / "examples" / "app")],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def image_id(ref: str) -> str:
    return subprocess.run(["/usr/bin/docker", "image", "inspect", "-f", "{{.Id}}", ref],
                          check=True, capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--image", help="an image already in the engine (default: build the example)")
    ap.add_argument("--python-image", default="local/python:3.11")
    ap.add_argument("--scanners", default="secret,misconfig")
    ap.add_argument("--image-source", default="auto", choices=["auto", "engine", "archive"])
    args = ap.parse_args()
    scanners = tuple(args.scanners.split(","))

    ref = args.image or "runner-bench/example-app:scan"
    if not args.image:
        build_example(ref, args.python_image)
    ident = image_id(ref)
    trivy = find_tool("trivy", None)
    if trivy is None:
        print("trivy not found: pip install -e '.[scan]'", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        t = Path(tmp)
        cache = t / "cache"
        pipeline = Pipeline.model_validate({
            "name": "bench", "repository": {"url": str(ROOT)}, "image": {"name": "bench/x"},
            "stages": {"scan": {"enabled": True, "scanners": list(scanners),
                                "image_source": args.image_source, "fail_on": "NONE"}}})
        stage = ScanStage()

        def run_stage(n: int) -> float:
            workdir = t / f"run{n}"
            workdir.mkdir()
            ctx = StageContext(run_id=f"b{n}", pipeline=pipeline, workdir=workdir,
                               cache_dir=cache, log=QuietLog(), secrets=NoSecrets(),
                               cancel=threading.Event(),
                               results={"checkout": {"path": str(ROOT)},
                                        "build": {"image_id": ident, "tags": [ref]}})
            start = time.perf_counter()
            try:
                stage.run(ctx)
            except ScanGateFailed:
                pass  # fail_on NONE: never; kept so a changed setting cannot break the bench
            return time.perf_counter() - start

        host = image_source(args.image_source, os.environ.get("DOCKER_HOST"))
        if host is None:
            print("--image-source archive: the direct baseline scans the engine's image the "
                  "same way (docker save + --input) so both do the same work", file=sys.stderr)

        def run_direct(n: int) -> float:
            out = t / f"direct{n}.json"
            start = time.perf_counter()
            subject = ident
            if host is None:
                subject = str(t / f"direct{n}.tar")
                subprocess.run(["/usr/bin/docker", "save", "-o", subject, ident], check=True)
            argv = trivy_argv(trivy, "image", subject, scanners=scanners,
                              cache_dir=str(cache / "trivy"), output=str(out),
                              docker_host=host)
            subprocess.run(argv, check=True, env=_trivy_env(), cwd=t,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            if host is None:
                Path(subject).unlink()
            return elapsed

        print(f"image {ref} ({ident[:19]}), scanners {','.join(scanners)}, "
              f"source {'archive' if host is None else 'engine'}, {args.rounds} rounds")
        print(f"warm-up: stage {run_stage(0):.2f}s, direct {run_direct(0):.2f}s "
              "(fills the shared layer cache)")
        stage_t, direct_t, ratios = [], [], []
        for n in range(1, args.rounds + 1):
            # Alternate which goes first, so drift on a shared machine hits both alike.
            if n % 2:
                s, d = run_stage(n), run_direct(n)
            else:
                d, s = run_direct(n), run_stage(n)
            stage_t.append(s)
            direct_t.append(d)
            ratios.append(s / d)
            print(f"round {n}: stage {s:.3f}s  direct {d:.3f}s  ratio {s / d:.3f}")
        ms, md = statistics.median(stage_t), statistics.median(direct_t)
        ratio = statistics.median(ratios)
        print(f"median: stage {ms:.3f}s (min {min(stage_t):.3f}, max {max(stage_t):.3f}), "
              f"direct {md:.3f}s (min {min(direct_t):.3f}, max {max(direct_t):.3f})")
        print(f"ratio stage/direct: median {ratio:.3f} (min {min(ratios):.3f}, "
              f"max {max(ratios):.3f}); overhead {100 * (ratio - 1):+.1f}% "
              f"({'under' if ratio < 1.10 else 'NOT under'} the 10% budget)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
