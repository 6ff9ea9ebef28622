#!/usr/bin/env python3
"""Push → live on the lab: a push webhook's arrival at the daemon → the new version on every server.

Issue 22's last figure (goal ≤ 8 s), for the example pipeline (checkout, build, test against
PostgreSQL, scan, push, deploy through the proxy, canary).

As root with the lab up. In a temp directory: a bare git repository holding this checkout's
examples/app and pipeline.example.yaml, and one `runner daemon` (SQLite, concurrency 1) whose only
entry is the example pipeline (`file:`) with the lab's values as `vars`, deploying to the first
--servers lab servers. The pipeline file is pipeline.example.yaml with three names changed so that
the test suite's own deploys are not touched: the image (REGISTRY/bench/push-live), the container
(bench-push-live) and the proxy route (Host push-live.bench on the servers' shared proxy, port
8000). One warm-up push (warm BuildKit cache, checkout mirror, the servers running the previous
release), then each round: commit a code-only change to the answer (examples/app/app.py's MESSAGE,
and the test that checks it), push it to the bare repository (untimed), send the signed delivery,
and ask every server's proxy (GET / with that Host, every --poll seconds) until each answers the
new message. The figure is delivery sent → the last server answering. Each stage's share comes from
the daemon's store (the run's created_at and started_at, each stage's started_at and finished_at);
the deploy's per-server phases and the test stage's phases from their stored outputs. Afterwards
`runner app remove` takes the app off the servers (unless --keep).

    python -m bench.push_live [--rounds 3] [--servers 2] [--json out.json] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench.common import lab_status
from bench.webhooks import API_TOKEN, SECRET, delivery, git
from runner.daemon.spawn import DaemonStartError, daemon_subprocess
from runner.daemon.store import open_store

ROOT = Path(__file__).resolve().parent.parent
GOAL = 8.0
NEXT_GOAL = 5.0
HOST = "push-live.bench"  # the route's Host on the servers' shared proxy
CONTAINER = "bench-push-live"
HTTP_PORT = 8000  # the proxy's published port on each lab server (pipeline.example.yaml's)
MESSAGE = "hello from runner"
STAGES = ("checkout", "build", "test", "scan", "push", "deploy")
LAB_VARS = ("REGISTRY", "DOCKER_HOST", "DEPLOY_HOSTS", "SSH_KEY_FILE", "KNOWN_HOSTS_FILE", "PROXY_IMAGE")
RUN_LIMIT = 300.0  # seconds one push may take, live and ended, before the bench gives up


def log(msg: str) -> None:
    print(f"[push-live {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lab_env() -> dict[str, str]:
    """`runner lab env`'s exports (REGISTRY, DOCKER_HOST, DEPLOY_HOSTS, …)."""
    out = subprocess.run([sys.executable, "-m", "runner", "lab", "env"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    env = {}
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    missing = [k for k in LAB_VARS if k not in env]
    if missing:
        raise SystemExit(f"`runner lab env` does not give {', '.join(missing)}: is the lab up?")
    return env


def make_repository(tmp: Path) -> tuple[Path, Path]:
    """A bare repository (what the daemon builds) and a work tree pushing to it, holding the
    files git tracks under examples/app and pipeline.example.yaml."""
    bare, work = tmp / "repo.git", tmp / "work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("clone", "-q", str(bare), str(work))
    git("checkout", "-q", "-b", "main", cwd=work)
    tracked = git("ls-files", "examples/app", "pipeline.example.yaml", cwd=ROOT).splitlines()
    for rel in tracked:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, work / rel)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "the example app", cwd=work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    return bare, work


def bench_pipeline(work: Path, dest: Path, strategy: str | None = None) -> Path:
    """pipeline.example.yaml with the bench's own image, container and route (everything else,
    stages and settings, as the example has them), and with `strategy` the deploy's strategy
    type instead of the example's (to show what the canary's wait costs the figure)."""
    doc = yaml.safe_load((work / "pipeline.example.yaml").read_text())
    doc["image"]["name"] = "${REGISTRY}/bench/push-live"
    deploy = doc["stages"]["deploy"]
    deploy["container"]["name"] = CONTAINER
    deploy["proxy"]["hosts"] = [HOST]
    if strategy is not None:
        deploy["strategy"] = {"type": strategy}
    if deploy["proxy"].get("http_port") != HTTP_PORT:
        raise SystemExit(f"pipeline.example.yaml's proxy.http_port is not {HTTP_PORT}: update the bench")
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def commit_change(work: Path, message: str) -> str:
    """A code-only change of what the app answers (and of the test that checks it)."""
    for rel, old in (("examples/app/app.py", 'MESSAGE = "'), ("examples/app/tests/test_app.py", '== "')):
        path = work / rel
        lines = path.read_text().splitlines(keepends=True)
        for i, line in enumerate(lines):
            if old in line:
                head = line.split(old, 1)[0]
                lines[i] = f'{head}{old}{message}"\n'
                break
        else:
            raise SystemExit(f"{rel}: no line with {old!r} to change")
        path.write_text("".join(lines))
    git("commit", "-q", "-am", f"say {message!r}", cwd=work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def answers(client: httpx.Client, host: str) -> str | None:
    try:
        r = client.get(f"http://{host}:{HTTP_PORT}/", headers={"Host": HOST})
        return r.json().get("message") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def one_push(url: str, store, bare: Path, work: Path, hosts: list[str], n: int, label: str,
             poll: float) -> dict:
    message = f"{MESSAGE} ({label})"
    sha = commit_change(work, message)
    body, headers = delivery(n, repo=str(bare), after=sha)
    live: dict[str, float] = {}
    with httpx.Client(timeout=2.0) as client:
        sent = time.time()
        r = httpx.post(url + "/hooks/github", content=body, headers=headers, timeout=10)
        if r.status_code not in (200, 202) or not r.json().get("runs"):
            raise SystemExit(f"the delivery was not queued: {r.status_code} {r.text[:500]}")
        run_id = r.json()["runs"][0]
        deadline = time.monotonic() + RUN_LIMIT
        while len(live) < len(hosts) and time.monotonic() < deadline:
            for host in hosts:
                if host not in live and answers(client, host) == message:
                    live[host] = time.time()
            if len(live) < len(hosts):
                run = store.get_run(run_id)
                if run["status"] not in ("queued", "running"):
                    break  # ended without every server answering: reported below
                time.sleep(poll)
    run = store.get_run(run_id)
    while run["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        run = store.get_run(run_id)
    if run["status"] != "success" or len(live) < len(hosts):
        raise SystemExit(f"run {run_id} ended {run['status']} ({run.get('reason')}); answering the new "
                         f"version: {sorted(live)} of {hosts}")
    return {"run": run_id, "sent": sent, "run_row": run, "stages": store.stages(run_id), "live": live}


def shares(p: dict) -> dict:
    """Where the seconds from the delivery to the last server answering went: webhook (sent →
    queued), queue wait (queued → a worker claims it), exec start (claimed → the first stage
    starts: `runner exec` starting and loading), each stage up to the moment the last server
    answered, and the rest (between stages). Also the seconds after that until the run ended."""
    run, sent, live_at = p["run_row"], p["sent"], max(p["live"].values())
    stages = {s["name"]: s for s in p["stages"] if s["started_at"] is not None}
    out = {"webhook": run["created_at"] - sent, "queue wait": run["started_at"] - run["created_at"]}
    first = min(s["started_at"] for s in stages.values())
    out["exec start"] = first - run["started_at"]
    for name in STAGES:
        s = stages.get(name)
        end = min(s["finished_at"] or live_at, live_at) if s else 0.0
        out[name] = max(0.0, end - s["started_at"]) if s else 0.0
    total = live_at - sent
    out["between stages"] = total - sum(out.values())
    deploy = stages["deploy"]
    return {"total": total, "shares": out, "after live": (run["finished_at"] or live_at) - live_at,
            "deploy start → each server live": {h: t - deploy["started_at"] for h, t in p["live"].items()}}


def phases(p: dict) -> dict:
    """The deploy's per-server phases and the test stage's phases, as the stages stored them."""
    out: dict[str, dict[str, float]] = {}
    for s in p["stages"]:
        o = s.get("outputs") or {}
        if s["name"] == "deploy":
            for server in o.get("servers") or ():
                out[f"deploy {server.get('name')}"] = {k: float(v) for k, v in (server.get("phases") or {}).items()}
        elif s["name"] == "test":
            out["test"] = {k: float(v) for k, v in (o.get("phases") or {}).items()}
    return out


def median_of(dicts: list[dict]) -> dict:
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: round(statistics.median(d.get(k, 0.0) for d in dicts), 3) for k in keys}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="As root with the lab up (runner lab up). Loopback and lab addresses only.")
    ap.add_argument("--rounds", type=int, default=3, help="counted pushes after the warm-up (1-20)")
    ap.add_argument("--warmup", type=int, default=1, help="pushes before counting (0-3)")
    ap.add_argument("--servers", type=int, default=2, help="the first N lab servers (2 by default)")
    ap.add_argument("--gap", type=float, default=2.0,
                    help="seconds between a run's end and the next push (the daemon's spare exec warm again)")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between two asks of a server")
    ap.add_argument("--strategy", choices=("all", "canary", "rolling"),
                    help="the deploy's strategy instead of the example's (canary)")
    ap.add_argument("--json", dest="json_out", help="also write every number here")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory and the app on the servers")
    a = ap.parse_args()
    if not 1 <= a.rounds <= 20 or not 0 <= a.warmup <= 3 or not a.poll >= 0.02:
        raise SystemExit("bounded: --rounds 1-20, --warmup 0-3, --poll at least 0.02")
    if os.geteuid() != 0:
        raise SystemExit("as root: the lab's build engine and servers are root's")
    if not lab_status().get("up"):
        raise SystemExit("the lab is not up (runner lab up)")
    env = lab_env()
    targets = env["DEPLOY_HOSTS"].split(",")[:a.servers]
    if len(targets) < a.servers:
        raise SystemExit(f"the lab has {len(targets)} servers, --servers asks for {a.servers}")
    hosts = [t.split("@")[-1].rsplit(":", 1)[0] for t in targets]
    os.environ.update({k: env[k] for k in LAB_VARS})  # the daemon's runs reach the lab's build engine
    # and find the scan's trivy and hadolint where this interpreter's venv has them
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-push-live-"))
    bare, work = make_repository(tmp)
    pipeline = bench_pipeline(work, tmp / "pipeline.yaml", a.strategy)
    variables = {**{k: env[k] for k in LAB_VARS if k != "DOCKER_HOST"},
                 "DEPLOY_HOSTS": ",".join(targets), "REPO_URL": str(bare)}
    cfg = {"webhooks": {"github": {"secret": {"value": SECRET}}}, "api_token": {"value": API_TOKEN},
           "data_dir": str(tmp / "data"), "concurrency": 1,
           "pipelines": [{"name": "push-live", "file": str(pipeline), "repo": str(bare), "vars": variables}]}
    load_before = os.getloadavg()
    pushes: list[dict] = []
    nonce = os.urandom(3).hex()
    try:
        with daemon_subprocess(tmp, cfg, "daemon") as (_, url):
            store = open_store(str(tmp / "data" / "runner.db"))
            try:
                for i in range(a.warmup + a.rounds):
                    counted = i >= a.warmup
                    label = f"{nonce} {'round' if counted else 'warm-up'} {i - a.warmup + 1 if counted else i + 1}"
                    if i:
                        time.sleep(a.gap)
                    p = one_push(url, store, bare, work, hosts, 50_000 + i, label, a.poll)
                    p.update(shares(p), phases=phases(p), counted=counted)
                    log(f"{label}: run {p['run']}, live on {len(hosts)} servers after {p['total']:.2f} s")
                    pushes.append(p)
            finally:
                store.close()
    except DaemonStartError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        if not a.keep:
            removed = subprocess.run([sys.executable, "-m", "runner", "app", "remove", str(pipeline), "--yes",
                                      *(f"--var={k}={v}" for k, v in variables.items())],
                                     capture_output=True, text=True, cwd=ROOT, timeout=300)
            if removed.returncode != 0:
                log(f"runner app remove failed: {removed.stdout[-1000:]}{removed.stderr[-1000:]}")
            shutil.rmtree(tmp, ignore_errors=True)
    counted = [p for p in pushes if p["counted"]]
    totals = [p["total"] for p in counted]
    med = statistics.median(totals)
    share = median_of([p["shares"] for p in counted])
    report = {
        "figure": "webhook sent → the new version answering on every server",
        "strategy": a.strategy or "canary (the example's)",
        "servers": hosts, "rounds": [round(t, 3) for t in totals], "median_s": round(med, 3),
        "goal_s": GOAL, "goal_met": med <= GOAL,
        "shares_median_s": share,
        "after_live_median_s": round(statistics.median(p["after live"] for p in counted), 3),
        "deploy_start_to_live_median_s": median_of([p["deploy start → each server live"] for p in counted]),
        "phases_median_s": {k: median_of([p["phases"].get(k, {}) for p in counted])
                            for k in dict.fromkeys(k for p in counted for k in p["phases"])},
        "warmup_s": [round(p["total"], 3) for p in pushes if not p["counted"]],
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    how = f"strategy {a.strategy} instead of the example's, " if a.strategy else ""
    print(f"push → live, example pipeline, {how}{len(hosts)} servers, warm caches: median {med:.2f} s "
          f"(rounds {', '.join(f'{t:.2f}' for t in totals)}); goal ≤ {GOAL:g} s: "
          f"{'met' if med <= GOAL else 'missed'}")
    print("\nshare of the median round (medians per share, s):")
    for name, v in share.items():
        print(f"  {name:15} {v:6.2f}  {100 * v / med:5.1f} %")
    print(f"  (after the last server answered, until the run ended: {report['after_live_median_s']:.2f} s)")
    print("\ndeploy start → each server answering: "
          + ", ".join(f"{h} {v:.2f} s" for h, v in report["deploy_start_to_live_median_s"].items()))
    for name, ph in report["phases_median_s"].items():
        print(f"{name} phases: " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    gap = med - NEXT_GOAL
    largest = sorted(share.items(), key=lambda kv: -kv[1])[:3]
    print(f"\nto {NEXT_GOAL:g} s: {max(0.0, gap):.2f} s to take off; the largest shares: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in largest))
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({**report, "pushes": pushes}, indent=1, default=str) + "\n")
    return 0 if med <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
