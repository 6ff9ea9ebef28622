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

import pipelines.scan as scan_module  # noqa: E402
from pipelines.scan import ScanGateFailed, ScanStage, _trivy_env, find_tool  # noqa: E402
from runner.model import Pipeline  # noqa: E402
from runner.outputs import BuildOutputs, CheckoutOutputs, Outputs  # noqa: E402
from runner.stage import StageContext  # noqa: E402

# The direct baseline replays exactly the argv the stage ran: this wrapper records it on the way
# through to the real runner (nothing is replaced; the stage runs Trivy itself).
_seen: list[tuple[str, ...]] = []
_real_run_command = scan_module.run_command


_inside: list[float] = []  # how long each of those Trivy runs took, as the stage saw it


def _recording_run_command(argv, **kwargs):
    _seen.append(tuple(str(a) for a in argv))
    result = _real_run_command(argv, **kwargs)
    _inside.append(result.duration)
    return result


scan_module.run_command = _recording_run_command


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
        # The scan reads the work tree (this checkout) and the image id; the rest is not used.
        outputs = Outputs(
            checkout=CheckoutOutputs(commit="", branch=None, tag=None, path=ROOT, url=str(ROOT),
                                     mirror=ROOT, cloned=False, committed_at=""),
            build=BuildOutputs(image_id=ident, tags=(ref,), builder="", engine="local",
                               cached_steps=0, total_steps=0))

        def run_stage(n: int) -> float:
            workdir = t / f"run{n}"
            workdir.mkdir()
            ctx = StageContext(run_id=f"b{n}", pipeline=pipeline, workdir=workdir,
                               cache_dir=cache, log=QuietLog(), secrets=NoSecrets(),
                               cancel=threading.Event(),
                               outputs=outputs)
            start = time.perf_counter()
            try:
                stage.run(ctx)
            except ScanGateFailed:
                pass  # fail_on NONE: never; kept so a changed setting cannot break the bench
            return time.perf_counter() - start

        def run_direct(n: int) -> float:
            argv = list(_seen[-1])
            out = argv.index("--output") + 1
            argv[out] = str(t / f"direct{n}.json")
            tarball = None
            start = time.perf_counter()
            if "--input" in argv:  # the stage exported the image: do the same work
                tarball = argv[argv.index("--input") + 1]
                subprocess.run(["/usr/bin/docker", "save", "-o", tarball, ident], check=True)
            subprocess.run(argv, check=True, env=_trivy_env(), cwd=t,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            if tarball:
                Path(tarball).unlink()
            return elapsed

        warm = run_stage(0)
        print(f"image {ref} ({ident[:19]}), {args.rounds} rounds; the stage ran:")
        print("  " + " ".join(a if a else "''" for a in _seen[-1]))
        print(f"warm-up: stage {warm:.2f}s, direct {run_direct(0):.2f}s "
              "(fills the shared layer cache)")
        stage_t, direct_t, ratios, own_t = [], [], [], []
        for n in range(1, args.rounds + 1):
            # Alternate which goes first, so drift on a shared machine hits both alike.
            if n % 2:
                s, d = run_stage(n), run_direct(n)
            else:
                d, s = run_direct(n), run_stage(n)
            own_t.append(s - _inside[-1])
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
        own = statistics.median(own_t)
        print(f"the stage's own time around Trivy (export, checks, parse, gate, reports): "
              f"median {1000 * own:.0f} ms (min {1000 * min(own_t):.0f}, "
              f"max {1000 * max(own_t):.0f}) = {100 * own / md:.1f}% of the direct run")
        return 0


if __name__ == "__main__":
    sys.exit(main())
