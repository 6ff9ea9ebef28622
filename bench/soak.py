#!/usr/bin/env python3
"""A daemon left running: N real runs back to back through one daemon on SQLite and through two
sharing one PostgreSQL database (issue 24's soak). Not part of `python -m bench`: 500 runs take
tens of minutes (each is a real `runner exec`: checkout and a tiny build on the lab's engine,
then its housekeeping).

Each setup starts `runner daemon` processes (the real `runner exec`, one worker each) with a
pipeline entry over a local bare repository whose Dockerfile is `FROM local/busybox:1` and a
COPY of a file each run's commit changes, built on the lab's engine (DOCKER_HOST) as an image
of its own (`build.keep_images` 3). This process commits, pushes and sends a signed GitHub push
delivery for each run, keeping one run per worker in flight. After each run ends it samples:
every daemon's RSS (/proc), the pipeline's images on the build engine, the data dirs' size;
every tenth run also the engine's build cache (`docker system df`, seconds). Halfway through, it
sends webhook deliveries at --rate for --webhook-seconds to a second entry (another repository;
each delivery queues a run that supersedes the last one waiting, so the workers stay on the
soak) and reports their acceptance latency while the runs execute (bench/webhooks.py's sender).

Reported per setup: runs per minute; disk growth per run after housekeeping (data dirs, build
cache, the pipeline's images: count and bytes) from the first tenth (at least the run after
keep_images runs) to the end; daemon RSS at
each tenth and max ÷ min after the first tenth (goal: within 20 %); webhook p50/p99; every
run's record complete (success, checkout and build recorded, the build's log stored).

    python -m bench.soak [--runs 500] [--setups sqlite,postgres] [--quick] [--json out.json]

--quick: 10 runs, SQLite only, a 2 s webhook window (the smoke). Needs the lab (`runner lab
up`) and `eval "$(runner lab env)"` (DOCKER_HOST, RUNNER_DATABASE_URL).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.webhooks import API_TOKEN, SECRET, daemons, delivery, git, pct, send_all

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
FINAL = ("success", "failed", "invalid", "cancelled", "interrupted")
KEEP_IMAGES = 3


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def make_repo(tmp: Path, registry: str) -> tuple[Path, Path, Path, str]:
    """(bare repo, work clone, pipeline file, image name)."""
    bare, work = tmp / "repo.git", tmp / "work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("clone", "-q", str(bare), str(work))
    git("checkout", "-q", "-b", "main", cwd=work)
    (work / "Dockerfile").write_text("FROM local/busybox:1\nCOPY version.txt /version.txt\n")
    image = f"{registry}/soak/app-{secrets.token_hex(4)}"
    pipeline = tmp / "pipeline.yaml"
    pipeline.write_text(
        f"name: soak\nrepository: {{url: {bare}, ref: main}}\n"
        f"image: {{name: {image}, tags: ['{{short_sha}}']}}\n"
        f"stages:\n  build: {{pull: false, keep_images: {KEEP_IMAGES}}}\n"
        "  scan: {enabled: false}\n  push: {enabled: false}\n")
    hooks = tmp / "hooks.yaml"  # the webhook entry's runs fail at once (no such repository)
    hooks.write_text("name: hooks\nrepository: {url: /nonexistent/hooks.git}\n"
                     "image: {name: localhost/soak/hooks}\n"
                     "stages:\n  build: {enabled: false}\n  push: {enabled: false}\n")
    return bare, work, pipeline, image


def push_commit(work: Path, n: int) -> str:
    (work / "version.txt").write_text(f"{n} {secrets.token_hex(8)}\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", f"v{n}", cwd=work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def complete(url: str, run: dict) -> list[str]:
    """What is missing from a finished run's record."""
    out = []
    if run["status"] != "success":
        out.append(f"status {run['status']}: {run.get('reason')}")
    stages = {s["name"]: s for s in run.get("stages") or ()}
    for name in ("checkout", "build"):
        s = stages.get(name) or {}
        if s.get("status") != "success" or s.get("finished_at") is None:
            out.append(f"stage {name}: {s.get('status')}")
    lines = httpx.get(f"{url}/api/runs/{run['id']}/logs", params={"limit": 10000}, headers=AUTH,
                      timeout=10).json().get("lines", [])
    if not any(x.get("stage") == "build" for x in lines):
        out.append("no build log stored")
    return out


def soak(setup: str, runs: int, webhook_seconds: float, rate: float, tmp: Path,
         retention: dict | None, check_each=None) -> dict:
    """One setup's soak. `check_each(n, sample)` (the test's) is called after each run."""
    import docker

    lab_registry = os.environ.get("RUNNER_SOAK_REGISTRY", "10.87.53.1:5000")
    bare, work, pipeline, image = make_repo(tmp, lab_registry)
    cfg = {"api_token": {"value": API_TOKEN}, "webhooks": {"github": {"secret": {"value": SECRET}}},
           "pipelines": [
               {"name": "soak", "file": str(pipeline), "repo": str(bare),
                "concurrency_group": None, "concurrency": 2},
               {"name": "hooks", "file": str(tmp / "hooks.yaml"),
                "repo": "https://bench.invalid/me/app.git", "cancel_in_progress": False}]}
    if retention:
        cfg["retention"] = retention
    client = docker.from_env()
    samples: list[dict] = []
    problems: dict[int, list[str]] = {}
    latency: dict = {}
    workers = 1 if setup == "sqlite" else 2
    try:
        with daemons(tmp, setup, "soak", cfg, [1] * workers) as (urls, _database):
            pids = _daemon_pids(tmp, setup, workers)
            cache0 = _build_cache(client)
            t0 = time.monotonic()
            inflight: dict[int, int] = {}  # run id -> its number
            started = finished = 0
            hook_thread = None
            while finished < runs:
                while started < runs and len(inflight) < workers:
                    sha = push_commit(work, started)
                    body, headers = delivery(started, repo=str(bare), after=sha)
                    headers["X-GitHub-Delivery"] = f"soak-{started}-{secrets.token_hex(3)}"
                    r = httpx.post(urls[started % len(urls)] + "/hooks/github", content=body,
                                   headers=headers, timeout=30)
                    run_ids = r.json().get("runs") or []
                    assert r.status_code == 202 and run_ids, r.text
                    inflight[run_ids[0]] = started
                    started += 1
                if hook_thread is None and webhook_seconds and finished >= runs // 2:
                    hook_thread = threading.Thread(
                        target=lambda: latency.update(_webhooks(urls, rate, webhook_seconds)),
                        daemon=True)
                    hook_thread.start()
                time.sleep(0.05)
                for rid in list(inflight):
                    run = httpx.get(f"{urls[0]}/api/runs/{rid}", headers=AUTH, timeout=10).json()
                    if run["status"] not in FINAL:
                        continue
                    n = inflight.pop(rid)
                    finished += 1
                    missing = complete(urls[0], run)
                    if missing:
                        problems[n] = missing
                    # One list call: another worker's housekeeping may remove an image at
                    # any moment, between a list and an inspect.
                    held = client.api.images(name=image)
                    sample = {"run": finished, "t": time.monotonic() - t0,
                              "rss": [rss_bytes(p) for p in pids], "images": len(held),
                              "images_bytes": sum(i.get("Size", 0) for i in held),
                              "data_bytes": tree_bytes(tmp / f"soak-{setup}")}
                    if finished % max(1, runs // 10) == 0 or finished == runs:
                        sample["build_cache"] = _build_cache(client)
                    samples.append(sample)
                    if check_each is not None:
                        check_each(finished, sample)
            elapsed = time.monotonic() - t0
            if hook_thread is not None:
                hook_thread.join(timeout=webhook_seconds + 60)
    finally:
        for i in client.images.list(name=image):
            for tag in i.tags:
                try:
                    client.images.remove(tag, force=True)
                except docker.errors.DockerException:
                    pass
        client.close()
    return summarise(setup, runs, workers, elapsed, samples, problems, latency, cache0)


def _daemon_pids(tmp: Path, setup: str, workers: int) -> list[int]:
    """The daemons' pids, from the processes whose command line names their config files."""
    want = {str(tmp / f"soak-{setup}" / f"daemon-{i}.yaml") for i in range(workers)}
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace") in want for a in argv) and b"daemon" in argv:
            pids.append(int(d.name))
    assert len(pids) == workers, (pids, want)
    return pids


def _build_cache(client) -> int:
    return sum(max(0, int(c.get("Size") or 0)) for c in client.df().get("BuildCache") or ())


def _webhooks(urls: list[str], rate: float, seconds: float) -> dict:
    count = int(rate * seconds)
    plan = [(i, *delivery(500_000 + i)) for i in range(count)]
    results = send_all(urls, plan, rate, time.monotonic() + seconds + 30)
    lat = [r["latency"] * 1000 for r in results if r["status"] in (200, 202)]
    return {"sent": len(results), "accepted": len(lat), "rate": rate,
            "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
            "max_ms": round(max(lat), 2) if lat else None}


def summarise(setup: str, runs: int, workers: int, elapsed: float, samples: list[dict],
              problems: dict[int, list[str]], latency: dict, cache0: int) -> dict:
    tenth = max(1, runs // 10)
    # Growth is counted once the pipeline holds its kept images (before, it grows by design).
    base = samples[min(len(samples), max(tenth, KEEP_IMAGES + 1)) - 1]
    last = samples[-1]
    span = max(1, last["run"] - base["run"])
    rss = [sum(s["rss"]) for s in samples]
    later = rss[tenth - 1:]
    cached = [s for s in samples if "build_cache" in s]

    def per_run(key: str) -> float:
        return round((last[key] - base[key]) / span)

    return {
        "setup": setup, "runs": runs, "minutes": round(elapsed / 60, 2),
        "runs_per_minute": round(runs / (elapsed / 60), 2),
        "incomplete_records": {str(k): v for k, v in sorted(problems.items())},
        "images_max": max(s["images"] for s in samples), "keep_images": KEEP_IMAGES,
        # A sample comes after one run ends; another worker's run may have built and not yet
        # cleaned up: one image more per other worker.
        "images_bound": KEEP_IMAGES + workers - 1,
        "growth_per_run_bytes": {
            "data_dirs": per_run("data_bytes"), "pipeline_images": per_run("images_bytes"),
            "build_cache": round((cached[-1]["build_cache"] - cached[0]["build_cache"])
                                 / max(1, cached[-1]["run"] - cached[0]["run"]))
            if len(cached) > 1 else None},
        "build_cache_bytes": {"start": cache0, "end": cached[-1]["build_cache"] if cached else None},
        "rss_mb": {f"after_run_{s['run']}": round(sum(s["rss"]) / 2**20, 1)
                   for s in samples if s["run"] % tenth == 0 or s["run"] in (1, runs)},
        "rss_max_over_min_after_first_tenth": round(max(later) / min(later), 3),
        "rss_last_over_first_tenth": round(rss[-1] / rss[tenth - 1], 3),
        "webhooks_while_running": latency,
        # Every sample: the data dirs hold SQLite's WAL too, which a burst of deliveries swells
        # until its next checkpoint, so look at the series, not only the two ends.
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--setups", default="sqlite,postgres")
    ap.add_argument("--rate", type=float, default=200.0, help="webhook deliveries per second")
    ap.add_argument("--webhook-seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="10 runs, SQLite, a 2 s webhook window")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.setups, args.webhook_seconds = 10, "sqlite", 2.0
    if not os.environ.get("DOCKER_HOST"):
        raise SystemExit('needs the lab: eval "$(runner lab env)"')
    out = {"machine": os.uname().nodename, "load_before": os.getloadavg(), "setups": []}
    with ExitStack() as stack:
        for setup in args.setups.split(","):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"soak-{setup}-")))
            # Retention as a long-running daemon would prune: run dirs beyond the last 20 go.
            result = soak(setup, args.runs, args.webhook_seconds, args.rate, tmp,
                          {"days": 0.0001, "keep_last": 20, "interval": 30})
            out["setups"].append(result)
            print(json.dumps(result, indent=2), flush=True)
    out["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if all(not s["incomplete_records"] and s["images_max"] <= s["images_bound"]
                    for s in out["setups"]) else 1


if __name__ == "__main__":
    sys.exit(main())
