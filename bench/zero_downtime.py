"""Zero-downtime: the same deploy under a steady request loop, stop-start against the proxy.

Same image versions (alternating, each run a real version change), same servers. During each
timed deploy (`python -m bench.rundeploy`, the deploy stage in its own process) a request loop
(bench.load: 40 req/s per server, a new connection per request, 2 s timeout) runs from 0.5 s
before the deploy until 0.5 s after it. Measured per variant:

- failed requests (no answer or not 200) and the longest gap between two successful answers of
  one server (the loop's own interval is 25 ms);
- deploy wall time (whole process);
- latency added by the proxy: the same app answering through the proxy (Host-routed) and on a
  published port of its own, 400 requests each, loop idle otherwise: p50 and p99.

- stop-start: `container.ports: [18090:8080]`, the loop on SERVER:18090.
- proxy: `proxy: {hosts: [bench.test], app_port: 8080, http_port: 8000}` (the lab's shared
  proxy port, as the example pipeline), the loop on SERVER:8000 with Host bench.test.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import APP_PORT, ROOT, Timer, log, ratio, summary
from bench.load import Load
from runner.model.image import ImageRef

STOP_START_PORT = 18090
PROXY_PORT = 8000
HOST = "bench.test"
CONTAINERS = {"stop-start": "bench-zd-ss", "proxy": "bench-zd-px"}


def pipeline(workdir: Path, lab: dict, servers: list[dict], image_name: str,
             variant: str) -> Path:
    s0 = servers[0]
    deploy: dict = {
        "enabled": True,
        "servers": [f"{s['user']}@{s['host']}:{s['port']}" for s in servers],
        "ssh": {"key_file": s0["key_file"], "known_hosts": s0["known_hosts"]},
        "container": {"name": CONTAINERS[variant]},
        "healthcheck": {"timeout": 60},  # the image's own HEALTHCHECK decides
        "strategy": {"type": "all"},
        "lock": {"wait": 30},
    }
    if variant == "proxy":
        deploy["proxy"] = {"hosts": [HOST], "app_port": APP_PORT, "http_port": PROXY_PORT,
                           "image": lab["proxy_image"], "watch": 1, "drain_timeout": 5}
    else:
        deploy["container"]["ports"] = [f"{STOP_START_PORT}:{APP_PORT}"]
    doc = {"version": 1, "name": CONTAINERS[variant], "repository": {"url": str(ROOT)},
           "image": {"name": image_name}, "stages": {"scan": {"enabled": False},
                                                    "deploy": deploy}}
    path = workdir / f"zd-{variant}.yaml"
    path.write_text(json.dumps(doc, indent=1))
    return path


def targets(servers: list[dict], variant: str) -> list[tuple[str, int, str | None]]:
    if variant == "proxy":
        return [(s["host"], PROXY_PORT, HOST) for s in servers]
    return [(s["host"], STOP_START_PORT, None) for s in servers]


def deploy(path: Path, ref: str) -> tuple[float, dict[str, float]]:
    """Wall time of one deploy, and the slowest server's seconds per phase."""
    t = Timer([sys.executable, "-m", "bench.rundeploy", str(path), ref], cwd=str(ROOT),
              timeout=300).run().check("runner deploy")
    info = json.loads(t.result.stdout.strip().splitlines()[-1])
    if info.get("status") != "success":
        raise RuntimeError(f"deploy failed: {info.get('error')}")
    rows = (info.get("outputs") or {}).get("servers") or []
    phases = {k: max((r.get("phases") or {}).get(k, 0.0) for r in rows)
              for k in {k for r in rows for k in (r.get("phases") or {})}}
    return t.wall, phases


def latency_added(lab: dict, servers: list[dict], n: int = 400, idle: float = 5.0) -> dict:
    """p50/p99 of the same app (the stop-start and proxy containers run the same image)
    through the proxy and on its own published port, one server, sequential requests; then
    the request loop alone for `idle` seconds."""
    out = {}
    for variant in ("stop-start", "proxy"):
        load = Load(targets(servers[:1], variant), rate=200, max_seconds=n / 200 + 5)
        with load:
            while len(load.hits) < n and load._threads[0].is_alive():
                time.sleep(0.05)
        xs = sorted(h.seconds for h in load.hits if h.ok)
        out[variant] = {"n": len(xs), "p50": xs[len(xs) // 2], "p99": xs[int(len(xs) * 0.99)],
                        "failed": len(load.failed())}
    # The loop's own jitter on this machine, with nothing being deployed: what a gap during a
    # deploy is to be compared with.
    with Load(targets(servers, "proxy"), rate=40, max_seconds=60) as alone:
        time.sleep(idle)
    out["idle_longest_gap"] = round(alone.longest_gap(), 4)
    out["added_p50_ms"] = round((out["proxy"]["p50"] - out["stop-start"]["p50"]) * 1000, 3)
    out["added_p99_ms"] = round((out["proxy"]["p99"] - out["stop-start"]["p99"]) * 1000, 3)
    return out


def bench_zero_downtime(lab: dict, refs: list[str], servers: list[dict], rounds: int,
                        workdir: Path, quick: bool = False) -> dict:
    """quick (the smoke test): the two untimed first deploys at once, and the latency from 40
    requests per variant and the idle loop for 1 s, instead of 400 and 5 s: every figure is
    there, the percentiles rougher."""
    image_name = ImageRef.parse(refs[0]).name
    files = {v: pipeline(workdir, lab, servers, image_name, v) for v in CONTAINERS}
    # Untimed: both variants running version 1 (quick: both at once, two apps of their own).
    with ThreadPoolExecutor(len(files) if quick else 1) as setup:
        list(setup.map(lambda path: deploy(path, refs[0]), files.values()))
    walls: dict[str, list[float]] = {v: [] for v in CONTAINERS}
    phases: dict[str, list[dict[str, float]]] = {v: [] for v in CONTAINERS}
    loads: dict[str, list[dict]] = {v: [] for v in CONTAINERS}
    for i in range(rounds):
        ref = refs[(i + 1) % 2]
        for v, path in files.items():  # A B A B: both under the same machine load
            with Load(targets(servers, v), rate=40, max_seconds=300) as load:
                time.sleep(0.5)
                wall, ph = deploy(path, ref)
                walls[v].append(wall)
                phases[v].append(ph)
                time.sleep(0.5)
            rep = load.report()
            loads[v].append(rep)
            log(f"zero-downtime {v} round {i + 1}: {walls[v][-1]:.2f}s, {rep['failed']} failed "
                f"of {rep['requests']}, longest gap {rep['longest_gap']:.3f}s")
    lat = latency_added(lab, servers, n=40, idle=1.0) if quick else latency_added(lab, servers)
    res: dict = {"servers": len(servers), "rounds": rounds, "interval": 0.025,
                 "latency": lat, "variants": {}}
    for v in CONTAINERS:
        res["variants"][v] = {
            "deploy": summary(walls[v]),
            "failed": sum(r["failed"] for r in loads[v]),
            "requests": sum(r["requests"] for r in loads[v]),
            "longest_gap": max(r["longest_gap"] for r in loads[v]),
            "longest_gap_median": statistics.median(r["longest_gap"] for r in loads[v]),
            "failures": [f for r in loads[v] for f in r["failures"]][:10],
            "phases": {k: round(statistics.median(p.get(k, 0.0) for p in phases[v]), 3)
                       for k in sorted({k for p in phases[v] for k in p})},
            "loads": loads[v],
        }
    res["deploy_ratio"] = ratio(res["variants"]["proxy"]["deploy"],
                                res["variants"]["stop-start"]["deploy"])
    return res


def rows(res: dict) -> list[str]:
    """The lines printed with the other bench tables."""
    v, lat = res["variants"], res["latency"]
    px, ss = v["proxy"], v["stop-start"]
    interval = res["interval"]

    def goal(ok: bool) -> str:
        return "met" if ok else "missed"
    out = [f"zero-downtime, {res['servers']} server(s), {res['rounds']} deploy(s) per variant "
           f"under 40 req/s per server:",
           f"  {'':<34} {'stop-start':>12} {'proxy':>12}",
           f"  {'failed requests':<34} {ss['failed']:>12} {px['failed']:>12}",
           f"  {'requests':<34} {ss['requests']:>12} {px['requests']:>12}",
           f"  {'longest gap (s), worst round':<34} {ss['longest_gap']:>12.3f} "
           f"{px['longest_gap']:>12.3f}",
           f"  {'deploy wall (s), median':<34} {ss['deploy']['median']:>12.2f} "
           f"{px['deploy']['median']:>12.2f}",
           f"  failed requests with the proxy: {px['failed']} (goal 0: {goal(px['failed'] == 0)})",
           f"  longest gap with the proxy: {px['longest_gap']:.3f}s, loop interval "
           f"{interval:.3f}s (goal <= {2 * interval:.3f}s: "
           f"{goal(px['longest_gap'] <= 2 * interval)})",
           f"  latency added by the proxy: p50 {lat['added_p50_ms']:.2f} ms (goal < 1 ms: "
           f"{goal(lat['added_p50_ms'] < 1)}), p99 {lat['added_p99_ms']:.2f} ms",
           f"  (the loop alone, nothing deployed: longest gap {lat['idle_longest_gap']:.3f}s)",
           f"  deploy wall time proxy / stop-start: {res['deploy_ratio']} (goal <= 1.2: "
           f"{goal((res['deploy_ratio'] or 99) <= 1.2)})",
           "  per phase, median of the slowest server (s): "
           + "; ".join(f"{name}: " + ", ".join(f"{k} {x:.2f}" for k, x in v[name]["phases"]
                                                 .items())
                       for name in ("stop-start", "proxy"))]
    return out
