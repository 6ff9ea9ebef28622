"""Promote: `runner promote --from staging --to production` to the pipeline part's servers, the
deploy of a release verified elsewhere with no checkout, build, test, scan or push (issue 23).

One pipeline file with two destinations: production is the full pipeline's servers and
container (`bench-app`, the same port and health check as bench.pipeline's deploy), staging
one more server (so that staging's pull never fills production's image cache). Each round,
untimed: the next version (the two of bench.common.two_versions alternate) is deployed to
staging (`python -m bench.rundeploy -d staging`); timed: the whole `runner promote` process;
untimed: production runs that digest on every server, and the other version is removed from
them, so the next promotion pulls, as a pipeline's deploy pulls what it built. Compared with
the full pipeline to the same servers (bench.pipeline: checkout, build, push, deploy), as a
report, without a goal.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import APP_PORT, CONTAINER, HOST_PORT, ROOT, Timer, log, summary
from bench.deploy import check_and_prune
from runner.model.image import ImageRef


def _address(s: dict) -> str:
    return f"{s['user']}@{s['host']}:{s['port']}"


def pipeline(workdir: Path, production: list[dict], staging: dict, image_name: str) -> Path:
    s0 = production[0]
    doc = {
        "version": 1, "name": "bench-promote",
        "repository": {"url": str(ROOT)},
        "image": {"name": image_name},
        "variables": {"HOSTS": ""},
        "destinations": {
            "staging": {"variables": {"HOSTS": _address(staging)}},
            "production": {"variables": {"HOSTS": ",".join(_address(s) for s in production)}}},
        "stages": {
            "scan": {"enabled": False},
            "deploy": {
                "enabled": True,
                "servers": "${HOSTS}",
                "ssh": {"key_file": s0["key_file"], "known_hosts": s0["known_hosts"]},
                "container": {"name": CONTAINER, "ports": [f"{HOST_PORT}:{APP_PORT}"]},
                "healthcheck": {"timeout": 60},
                "strategy": {"type": "all"},
                "lock": {"wait": 30},
            },
        },
    }
    path = workdir / "promote.yaml"
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return path


def stage(path: Path, ref: str) -> None:
    """Untimed: `ref` deployed to staging, verified there (what promote then reads)."""
    Timer([sys.executable, "-m", "bench.rundeploy", str(path), ref, "--destination", "staging"],
          cwd=str(ROOT), timeout=300).run().check("staging deploy")


def promote(path: Path, ref: str) -> float:
    t = Timer([sys.executable, "-m", "runner", "promote", str(path), "--from", "staging",
               "--to", "production", "--json"], cwd=str(ROOT), timeout=300).run()
    t.check("runner promote")
    report = json.loads(t.result.stdout)
    digests = {s["digest"] for s in report["servers"]}
    if digests != {ImageRef.parse(ref).digest}:
        raise RuntimeError(f"runner promote deployed {digests}, not {ref}")
    return t.wall


def bench_promote(refs: list[str], production: list[dict], staging: dict, rounds: int,
                  warmup: int, workdir: Path) -> dict:
    path = pipeline(workdir, production, staging, ImageRef.parse(refs[0]).name)
    times: list[float] = []
    for r in range(warmup + rounds):
        ref, other = refs[r % 2], refs[(r + 1) % 2]
        stage(path, ref)
        wall = promote(path, ref)
        check_and_prune(production, ref, other)
        log(f"promote {'' if r >= warmup else '(warm-up) '}to {len(production)} server(s): "
            f"{wall:.2f}s")
        if r >= warmup:
            times.append(wall)
    return {"servers": len(production), "staging": staging["name"], "pipeline_file": str(path),
            "promote": summary(times)}
