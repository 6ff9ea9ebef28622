"""The test stage against the same containers run by hand, on the lab's build engine.

    python -m bench.test_stage [--rounds 5] [--warmup 1] [--parts plain,service,cache]
                               [--out FILE]

The image is the example app's `test` target (examples/app: the app, pytest and its tests),
built once up front on the build engine, as the pipeline's test stage runs it.

- **plain**: one step, `pytest tests/test_app.py` with a JUnit report, in that image. By hand:
  `docker run --rm IMAGE sh -c 'pytest ...'`.
- **bare**: the same step without `reports:`, so the stage does only what the by-hand line
  does (plain ÷ bare is what copying the report out costs).
- **service**: one PostgreSQL service (the lab's $REGISTRY/lab/postgres:15, `ready: {port:
  5432}`) and one step running the whole suite against it. By hand: `docker network create`,
  `docker run -d` the database on it, `until docker exec DB pg_isready; sleep 0.1`, `docker run
  --rm --network` the step, `docker rm -f` the database and `docker network rm`.
- **cache**: a step that creates a virtualenv (pip from ensurepip) in a `cache:` directory
  unless one is there: each round is a new pipeline (a new, empty volume), run twice; the
  second run (warm) ÷ the first (cold). The volumes are removed afterwards.

What is compared: the runner side is `python -m bench.runtest` (the stage exactly as `runner
exec` runs it, after the loader, in its own process, as bench/rundeploy.py does for the deploy
stage); the figure against the goals is the stage's own time, measured in that process around
`TestStage.run`, ÷ the wall time of the by-hand shell process (which pays the docker CLI's
start-ups, as a user does). The interpreter's start and the pipeline's loading are left out of
the ratio: `runner exec` pays them once per run, not per stage (`python -m bench overhead`
measures them); the whole process ÷ by hand is printed too. Each round runs the runner then by
hand (A B A B ...), `--warmup` uncounted rounds first; medians and the pairs' min-max. The stage's
`phases` (TestOutputs) say where its time goes: service start, readiness, image, step,
reports, cleanup.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

from bench import common
from bench.common import DOCKER, ROOT, Timer, log

PARTS = ("plain", "bare", "service", "cache")
GOALS = {"plain": 1.15, "service": 1.10}
PYTEST = "/venv/bin/python -m pytest -q -p no:cacheprovider --junitxml=/tmp/r/unit.xml"
DB_URL = "postgresql://postgres:test@db:5432/postgres"
CACHE_STEP = ["test -x /cache/venv/bin/pip || python3 -m venv /cache/venv",
              "/cache/venv/bin/pip --version"]


def build_test_image(lab: dict) -> str:
    """The example app's `test` target on the build engine; its id."""
    p = subprocess.run([DOCKER, "build", "-q", "--target", "test", "--build-arg",
                        "PYTHON_IMAGE=local/python:3.11", "-t", "bench/test-stage:test",
                        str(ROOT / "examples" / "app")], env=common.docker_env(lab),
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"docker build --target test failed:\n{p.stderr[-2000:]}")
    return p.stdout.strip().splitlines()[-1]


def pipeline_file(workdir: Path, name: str, test: dict) -> Path:
    path = workdir / f"{name}.json"  # JSON is YAML
    path.write_text(json.dumps({"name": name, "repository": {"url": str(ROOT)},
                                "image": {"name": "bench/test-stage"},
                                "stages": {"test": test}}))
    return path


def run_stage(lab: dict, pipeline: Path, image: str) -> dict:
    t = Timer([sys.executable, "-m", "bench.runtest", str(pipeline), image],
              env=common.docker_env(lab), cwd=str(ROOT)).run().check("bench.runtest")
    assert t.result is not None
    out = json.loads(t.result.stdout.strip().splitlines()[-1])
    out["wall"] = t.wall
    return out


def by_hand(lab: dict, script: str) -> float:
    return Timer(["sh", "-c", script], env=common.docker_env(lab)).run().check("by hand").wall


def plain_variants(image: str, workdir: Path, reports: bool = True) -> tuple[Path, str]:
    command = f"{PYTEST} tests/test_app.py"
    step = {"name": "unit", "commands": [command], **({"reports": ["/tmp/r/*.xml"]} if reports
                                                        else {})}
    pipeline = pipeline_file(workdir, "bench-plain" if reports else "bench-bare",
                             {"steps": [step]})
    script = shlex.join([DOCKER, "run", "--rm", image, "sh", "-c", command])
    return pipeline, script


def service_variants(lab: dict, image: str, workdir: Path) -> tuple[Path, str]:
    pg = f"{lab['registry']}/lab/postgres:15"
    command = f"{PYTEST} tests"
    pipeline = pipeline_file(workdir, "bench-service", {
        "services": {"db": {"image": pg, "env": {"POSTGRES_PASSWORD": "test"},
                            "ready": {"port": 5432}}},
        "steps": [{"name": "unit", "commands": [command], "env": {"DATABASE_URL": DB_URL},
                   "reports": ["/tmp/r/*.xml"]}]})
    d = shlex.quote(DOCKER)
    script = f"""
net=bench-test-$$; db=$net-db
{d} network create "$net" >/dev/null
{d} run -d --name "$db" --network "$net" --network-alias db -e POSTGRES_PASSWORD=test \
    {shlex.quote(pg)} >/dev/null
until {d} exec "$db" pg_isready -q -h 127.0.0.1 -p 5432; do sleep 0.1; done
{d} run --rm --network "$net" -e DATABASE_URL={shlex.quote(DB_URL)} {shlex.quote(image)} \
    sh -c {shlex.quote(command)}
rc=$?
{d} rm -f -v "$db" >/dev/null; {d} network rm "$net" >/dev/null
exit $rc
"""
    return pipeline, script


def phase_medians(runs: list[dict]) -> dict[str, float]:
    keys = runs[0]["outputs"].get("phases", {}) if runs else {}
    return {k: round(statistics.median(r["outputs"]["phases"][k] for r in runs), 3)
            for k in keys}


def compare(lab: dict, what: str, pipeline: Path, image: str, script: str, rounds: int,
            warmup: int) -> dict:
    runner_runs, hand = [], []
    for i in range(warmup + rounds):
        r = run_stage(lab, pipeline, image)
        if r["status"] != "success":
            raise SystemExit(f"{what}: the test stage failed: {r['error']}")
        h = by_hand(lab, script)
        log(f"{what} {'warm-up' if i < warmup else i - warmup + 1}: stage "
            f"{r['stage_duration']:.2f}s (process {r['wall']:.2f}s), by hand {h:.2f}s")
        if i >= warmup:
            runner_runs.append(r)
            hand.append(h)
    stage = [r["stage_duration"] for r in runner_runs]
    process = [r["wall"] for r in runner_runs]
    s, p, h = common.summary(stage), common.summary(process), common.summary(hand)
    return {"stage": s, "process": p, "by_hand": h, "ratio": common.ratio(s, h),
            "pairs": common.pair_range(stage, hand), "process_ratio": common.ratio(p, h),
            "goal": GOALS.get(what), "phases": phase_medians(runner_runs),
            "startup": round(statistics.median(r["loaded"] - r["process_start"]
                                               for r in runner_runs), 3)}


def cache_runs(lab: dict, image: str, workdir: Path, rounds: int) -> dict:
    import docker

    from pipelines.testing_plan import cache_volume

    cold, warm = [], []
    client = docker.DockerClient(base_url=lab["docker_host"])
    try:
        for i in range(rounds):
            name = f"bench-cache-{uuid.uuid4().hex[:8]}"
            pipeline = pipeline_file(workdir, name, {"cache": ["/cache"], "steps": [
                {"name": "deps", "user": "0", "commands": CACHE_STEP}]})
            try:
                first, second = (run_stage(lab, pipeline, image) for _ in range(2))
            finally:
                client.volumes.get(cache_volume(name, "/cache")).remove()
            for r in (first, second):
                if r["status"] != "success":
                    raise SystemExit(f"cache: the test stage failed: {r['error']}")
            log(f"cache {i + 1}: cold {first['stage_duration']:.2f}s, warm "
                f"{second['stage_duration']:.2f}s")
            cold.append(first["stage_duration"])
            warm.append(second["stage_duration"])
    finally:
        client.close()
    c, w = common.summary(cold), common.summary(warm)
    return {"cold": c, "warm": w, "ratio": common.ratio(w, c),
            "pairs": common.pair_range(warm, cold)}


def report(results: dict) -> None:
    print("test stage ÷ by hand (the stage's own time; whole process in brackets), "
          "medians (pairs min-max)")
    for what in ("plain", "bare", "service"):
        r = results.get(what)
        if not r:
            continue
        goal = r["goal"]
        verdict = "no goal" if goal is None else f"goal <= {goal}: " + (
            "met" if r["ratio"] is not None and r["ratio"] <= goal else "missed")
        print(f"  {what:8} stage {r['stage']['median']:.2f}s [{r['process']['median']:.2f}s] "
              f"by hand {r['by_hand']['median']:.2f}s: ratio {r['ratio']} {r['pairs']} "
              f"[{r['process_ratio']}], {verdict}")
        print("           where the stage's time goes: " +
              ", ".join(f"{k} {v:.2f}s" for k, v in r["phases"].items() if v >= 0.005) +
              f"; process start + loader {r['startup']:.2f}s")
    c = results.get("cache")
    if c:
        print(f"  cache    warm {c['warm']['median']:.2f}s ÷ cold {c['cold']['median']:.2f}s: "
              f"ratio {c['ratio']} {c['pairs']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.test_stage",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    ap.add_argument("--out", help="also write the figures as JSON to this file")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part(s) {', '.join(unknown)}: any of {', '.join(PARTS)}")
    lab = common.ensure_lab(1)
    workdir = common.new_workdir()  # the pipeline files
    log("building the example app's test target")
    image = build_test_image(lab)
    results: dict = {"machine": common.machine(), "rounds": args.rounds, "image": image}
    try:
        if "plain" in parts:
            pipeline, script = plain_variants(image, workdir)
            results["plain"] = compare(lab, "plain", pipeline, image, script, args.rounds,
                                       args.warmup)
        if "bare" in parts:
            pipeline, script = plain_variants(image, workdir, reports=False)
            results["bare"] = compare(lab, "bare", pipeline, image, script, args.rounds,
                                      args.warmup)
        if "service" in parts:
            pipeline, script = service_variants(lab, image, workdir)
            results["service"] = compare(lab, "service", pipeline, image, script, args.rounds,
                                         args.warmup)
        if "cache" in parts:
            results["cache"] = cache_runs(lab, image, workdir, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    if args.out:
        print(f"results: {common.write_results(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
