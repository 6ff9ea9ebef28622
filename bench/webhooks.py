#!/usr/bin/env python3
"""Webhook acceptance under load (issue 5's benchmark). Loopback only; bounded in count and time.

Starts `runner daemon` as a subprocess on 127.0.0.1 (its own data dir in a temp directory), then
this process sends N signed GitHub push deliveries at a steady rate (default 2,000 at 200/s),
each on its own schedule slot (open loop: a slow answer does not slow the sender down, so queueing
shows in the latency instead of hiding in a lower rate). It reports acceptance latency p50/p90/p99/
max, achieved throughput, and checks in the daemon's sqlite file that every accepted delivery
produced exactly one queued run, then replays some deliveries and checks that they queued nothing.

Phase 2 (unless --no-start-latency): a daemon with free workers gets a few deliveries spaced out
(--start-gap, default 2 s: an idle daemon whose warm spare is ready; 0: back to back, the spare
may still be importing) and reports the time from a delivery's arrival to its run's first stage
starting (goal < 1 s).
That phase uses the real `runner exec` on a checkout-only pipeline over a local bare repository
(--fixture-exec uses tests/data/daemon/fake_exec.py instead, to measure the daemon alone).

    python bench/webhooks.py [--count 2000] [--rate 200] [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from runner.daemon.spawn import DaemonStartError, daemon_subprocess

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"
API_TOKEN = "bench-api-token"  # reading a run's status through the API needs it
REPO = "https://bench.invalid/me/app.git"
HARD_LIMIT = 180.0  # seconds: the whole benchmark stops by itself after this
STOP_TIMEOUT = 30.0  # seconds for a daemon to stop after SIGTERM before it is killed


def delivery(i: int, repo: str = REPO, branch: str = "main", after: str | None = None) -> tuple[bytes, dict]:
    after = after or hashlib.sha1(f"commit-{i}".encode()).hexdigest()
    body = json.dumps({
        "ref": f"refs/heads/{branch}", "before": "0" * 40, "after": after, "created": False, "deleted": False,
        "repository": {"name": "app", "full_name": "me/app", "clone_url": repo, "html_url": repo},
        "pusher": {"name": "bench"}, "head_commit": {"id": after, "message": f"change {i}"},
    }).encode()
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push",
               "X-GitHub-Delivery": f"bench-{i:06d}",
               "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}
    return body, headers


def send_all(url: str, items: list[tuple[bytes, dict]], rate: float, deadline: float,
             senders: int = 8) -> list[dict]:
    """Open-loop sender: request i is due at t0 + i/rate, sent by one of `senders` threads, each
    with its own keep-alive connection (http.client: one send() per request, no Nagle stall).
    A request sent late records its lag; latency is measured from the moment it is sent."""
    host, port = url.removeprefix("http://").split(":")
    results: list[dict | None] = [None] * len(items)
    t0 = time.perf_counter() + 0.2

    def sender(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for i in range(k, len(items), senders):
            if time.monotonic() > deadline:
                return
            slot = t0 + i / rate
            delay = slot - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            body, headers = items[i]
            start = time.perf_counter()
            try:
                conn.request("POST", "/hooks/github", body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                end = time.perf_counter()
                timing = resp.getheader("Server-Timing") or ""
                results[i] = {"status": resp.status, "latency": end - start, "lag": start - slot, "end": end,
                              "server_ms": float(timing.split("dur=")[1]) if "dur=" in timing else None,
                              "body": json.loads(data)}
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                results[i] = {"status": 0, "latency": time.perf_counter() - start, "lag": start - slot,
                              "end": time.perf_counter(), "server_ms": None, "error": repr(exc), "body": {}}
        conn.close()

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    done = [r for r in results if r is not None]
    if done:
        first = min(r["end"] - r["latency"] for r in done)
        span = max(r["end"] for r in done) - first
        for r in done:
            r["_span"] = span
    return done


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def load_phase(tmp: Path, count: int, rate: float, duplicates: int, deadline: float) -> dict:
    data = tmp / "load-data"
    cfg = {"name": "bench", "data_dir": str(data), "concurrency": 0,  # accept and queue only
           "webhooks": {"github": {"secret": {"value": SECRET}}},
           "pipelines": [{"name": "app", "file": str(tmp / "unused.yaml"), "repo": REPO,
                          "concurrency_group": None}]}
    with daemon_subprocess(tmp, cfg, "load", stop_timeout=STOP_TIMEOUT) as (_, url):
        items = [delivery(i) for i in range(count)]
        results = send_all(url, items, rate, deadline)
        replay = send_all(url, items[:duplicates], rate, deadline) if duplicates else []
    lat = [r["latency"] * 1000 for r in results if r["status"] == 202]
    lag = [r["lag"] * 1000 for r in results]
    server = [r["server_ms"] for r in results if r["server_ms"] is not None]
    span = results[0]["_span"] if results else float("nan")
    accepted = [r for r in results if r["status"] == 202]
    # Exactly one run per accepted delivery, read from the daemon's own database.
    db = sqlite3.connect(f"file:{data / 'runner.db'}?mode=ro", uri=True)
    per_delivery = dict(db.execute("SELECT delivery, COUNT(*) FROM runs GROUP BY delivery").fetchall())
    total_runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    recorded = db.execute("SELECT outcome, COUNT(*) FROM deliveries GROUP BY outcome").fetchall()
    db.close()
    sent_ids = [h["X-GitHub-Delivery"] for _, h in items[:len(results)]]
    accepted_ids = {items[i][1]["X-GitHub-Delivery"] for i, r in enumerate(results) if r["status"] == 202}
    wrong = [d for d in sent_ids if d in accepted_ids and per_delivery.get(d) != 1]
    response_runs = [rid for r in accepted for rid in r["body"].get("runs", [])]
    return {
        "sent": len(results), "planned": count, "rate_target": rate,
        "accepted_202": len(accepted), "errors": len(results) - len(accepted),
        "status_codes": sorted({r["status"] for r in results}),
        "latency_ms": {"p50": round(pct(lat, 50), 2), "p90": round(pct(lat, 90), 2),
                       "p99": round(pct(lat, 99), 2), "max": round(max(lat), 2) if lat else None,
                       "mean": round(statistics.fmean(lat), 2) if lat else None},
        "daemon_handler_ms": {"p50": round(pct(server, 50), 2), "p99": round(pct(server, 99), 2),
                              "max": round(max(server), 2) if server else None},
        "sender_lag_ms_p99": round(pct(lag, 99), 2),
        "throughput_per_s": round(len(results) / span, 1) if span and span > 0 else None,
        "runs_in_db": total_runs,
        "deliveries_with_not_exactly_one_run": len(wrong),
        "distinct_run_ids_in_responses": len(set(response_runs)),
        "replayed": len(replay),
        "replays_answered_duplicate": sum(1 for r in replay if r["status"] == 200 and
                                          r["body"].get("outcome") == "duplicate"),
        "deliveries_recorded": dict(recorded),
        "exactly_one_run_per_delivery": (not wrong and total_runs == len(accepted)
                                         and len(set(response_runs)) == len(accepted)),
    }


def git(*args, cwd=None) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
               GIT_COMMITTER_EMAIL="b@b")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def start_phase(tmp: Path, samples: int, fixture: bool, deadline: float, gap: float) -> dict:
    """Time from a delivery's arrival (the daemon's received_at) to its run's first stage start."""
    bare, work = tmp / "repo.git", tmp / "work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("clone", "-q", str(bare), str(work))
    git("checkout", "-q", "-b", "main", cwd=work)
    if fixture:
        pipeline = tmp / "fake.json"
        pipeline.write_text(json.dumps({"name": "fake", "stages": ["checkout"], "sleep": 0.01}))
        command = [sys.executable, str(ROOT / "tests" / "data" / "daemon" / "fake_exec.py")]
    else:
        pipeline = tmp / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump({
            "version": 1, "name": "bench", "repository": {"url": str(bare)},
            "image": {"name": "localhost/bench/app"},
            "stages": {"build": {"enabled": False}, "push": {"enabled": False}}}))
        command = None
    cfg = {"name": "bench-start", "data_dir": str(tmp / "start-data"), "concurrency": 2,
           "api_token": {"value": API_TOKEN}, "webhooks": {"github": {"secret": {"value": SECRET}}},
           "pipelines": [{"name": "app", "file": str(pipeline), "repo": str(bare)}]}
    if command:
        cfg["exec_command"] = command
    ids = []
    with daemon_subprocess(tmp, cfg, "start", stop_timeout=STOP_TIMEOUT) as (_, url):
        time.sleep(gap)
        for i in range(samples):
            if time.monotonic() > deadline:
                break
            if i:
                time.sleep(gap)  # pushes this far apart: the daemon is idle again, its spare warm
            (work / "f.txt").write_text(f"{i}\n")
            git("add", "f.txt", cwd=work)
            git("commit", "-q", "-m", f"c{i}", cwd=work)
            git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
            sha = git("rev-parse", "HEAD", cwd=work)
            body, headers = delivery(10_000 + i, repo=str(bare), after=sha)
            r = httpx.post(url + "/hooks/github", content=body, headers=headers, timeout=10)
            ids.append(r.json()["runs"][0])
            # Wait for it to end, so that the next one finds a free worker.
            while time.monotonic() < deadline:
                run = httpx.get(f"{url}/api/runs/{ids[-1]}", timeout=5,
                                headers={"Authorization": f"Bearer {API_TOKEN}"}).json()
                if run["status"] not in ("queued", "running"):
                    break
                time.sleep(0.05)
    db = sqlite3.connect(f"file:{tmp / 'start-data' / 'runner.db'}?mode=ro", uri=True)
    waits, statuses = [], []
    for rid in ids:
        created = db.execute("SELECT created_at, status FROM runs WHERE id=?", (rid,)).fetchone()
        first = db.execute("SELECT MIN(started_at) FROM stages WHERE run_id=?", (rid,)).fetchone()[0]
        statuses.append(created[1])
        if first is not None:
            waits.append((first - created[0]) * 1000)
    db.close()
    return {"exec": "fixture" if fixture else "runner exec (checkout only)", "samples": len(ids), "gap_s": gap,
            "statuses": {s: statuses.count(s) for s in set(statuses)},
            "arrival_to_first_stage_ms": {"p50": round(pct(waits, 50), 1), "max": round(max(waits), 1) if waits else None}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duplicates", type=int, default=200, help="deliveries replayed after the load")
    ap.add_argument("--start-samples", type=int, default=10)
    ap.add_argument("--start-gap", type=float, default=2.0,
                    help="seconds between the start-latency deliveries (0: back to back)")
    ap.add_argument("--no-start-latency", action="store_true")
    ap.add_argument("--fixture-exec", action="store_true")
    ap.add_argument("--json", dest="json_out", help="also write the report here")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    a = ap.parse_args()
    if a.count > 20000 or a.rate > 2000:
        raise SystemExit("bounded: at most 20,000 deliveries at 2,000/s")
    deadline = time.monotonic() + HARD_LIMIT
    load_before = os.getloadavg()[0]  # other work on this machine shows up in the latencies
    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-webhooks-"))
    try:
        report = {"load": load_phase(tmp, a.count, a.rate, min(a.duplicates, a.count), deadline)}
        if not a.no_start_latency:
            report["start"] = start_phase(tmp, a.start_samples, a.fixture_exec, deadline, a.start_gap)
    except DaemonStartError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    load = report["load"]
    goals = {"p99_under_50ms": load["latency_ms"]["p99"] < 50,
             "nothing_lost": load["accepted_202"] == load["planned"] and load["exactly_one_run_per_delivery"],
             "replays_queued_nothing": load["replays_answered_duplicate"] == load["replayed"]}
    if "start" in report and report["start"]["arrival_to_first_stage_ms"]["max"] is not None:
        goals["first_stage_under_1s"] = report["start"]["arrival_to_first_stage_ms"]["max"] < 1000
    report["goals_met"] = goals
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                         "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
    text = json.dumps(report, indent=2)
    print(text)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
