#!/usr/bin/env python3
"""Webhook acceptance under load, on two setups in one run: one daemon on SQLite, and two daemons
sharing one PostgreSQL database (issue 11's benchmark). Loopback only; bounded in count and time.

Each setup starts `runner daemon` processes on 127.0.0.1 (their own data dirs in a temp
directory; for PostgreSQL a fresh database on the server $RUNNER_DATABASE_URL names, from
`runner lab env`, dropped afterwards). This process sends N signed GitHub push deliveries at a
steady rate (default 2,000 at 200/s), each on its own schedule slot (open loop: a slow answer does
not slow the sender down, so queueing shows in the latency instead of hiding in a lower rate),
spread over the setup's daemons; with two daemons every tenth delivery goes to both at once. It
reports acceptance latency p50/p90/p99/max and throughput, checks through the store that every
delivery produced exactly one run, then replays some deliveries and checks that they queued
nothing.

Phase 2 (unless --no-start-latency): the time from a delivery's arrival to its run's first stage
starting, with a free worker. On PostgreSQL the delivery goes to a daemon that runs nothing
(concurrency 0) and the run starts on the other one, woken by LISTEN/NOTIFY. It uses the real
`runner exec` on a checkout-only pipeline over a local bare repository (--fixture-exec uses
tests/data/daemon/fake_exec.py instead, to measure the daemons alone).

    python -m bench.webhooks [--count 2000] [--rate 200] [--setups sqlite,postgres] [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import shutil
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from runner.daemon.spawn import DaemonStartError, daemon_subprocess
from runner.daemon.store import open_store

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


def send_all(urls: list[str], items: list[tuple[int, bytes, dict]], rate: float, deadline: float,
             senders: int = 8) -> list[dict]:
    """Open-loop sender: item k = (slot, body, headers) is due at t0 + slot/rate and goes to
    urls[k % len(urls)] (two items may share a slot: one delivery sent to two daemons at once).
    Each of `senders` threads keeps one keep-alive connection per daemon (http.client: one send()
    per request, no Nagle stall). A request sent late records its lag; latency is measured from
    the moment it is sent."""
    hosts = [urlsplit(u) for u in urls]
    results: list[dict | None] = [None] * len(items)
    t0 = time.perf_counter() + 0.2

    def connect(i: int) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(hosts[i].hostname, hosts[i].port, timeout=10)

    def sender(k: int) -> None:
        conns = [connect(i) for i in range(len(hosts))]
        for n in range(k, len(items), senders):
            if time.monotonic() > deadline:
                break
            slot, body, headers = items[n]
            target = n % len(hosts)
            delay = t0 + slot / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter()
            try:
                conns[target].request("POST", "/hooks/github", body=body, headers=headers)
                resp = conns[target].getresponse()
                data = resp.read()
                end = time.perf_counter()
                timing = resp.getheader("Server-Timing") or ""
                results[n] = {"status": resp.status, "latency": end - start, "lag": start - (t0 + slot / rate),
                              "end": end, "target": target,
                              "server_ms": float(timing.split("dur=")[1]) if "dur=" in timing else None,
                              "body": json.loads(data)}
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conns[target].close()
                conns[target] = connect(target)
                results[n] = {"status": 0, "latency": time.perf_counter() - start, "lag": 0.0, "target": target,
                              "end": time.perf_counter(), "server_ms": None, "error": repr(exc), "body": {}}
        for c in conns:
            c.close()

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


@contextmanager
def postgres_database():
    """A fresh database on the server $RUNNER_DATABASE_URL names, dropped afterwards."""
    import psycopg
    from psycopg import sql

    base = os.environ.get("RUNNER_DATABASE_URL")
    if not base:
        raise SystemExit("the postgres setup needs RUNNER_DATABASE_URL (eval \"$(runner lab env)\")")
    name = f"runner_bench_{secrets.token_hex(4)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(base)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def daemons(tmp: Path, setup: str, phase: str, cfg: dict, concurrencies: list[int]):
    """The setup's daemons for one phase: yields ([url], store URL or path). sqlite: one daemon
    (its own runner.db); postgres: one daemon per entry of `concurrencies` on one fresh database."""
    with ExitStack() as stack:
        if setup == "sqlite":
            concurrencies = concurrencies[-1:]
            database = str(tmp / f"{phase}-sqlite" / "data-0" / "runner.db")
        else:
            database = stack.enter_context(postgres_database())
        urls = []
        for i, conc in enumerate(concurrencies):
            work = tmp / f"{phase}-{setup}"
            work.mkdir(exist_ok=True)
            one = {**cfg, "name": f"{phase}-{i}", "data_dir": str(work / f"data-{i}"), "concurrency": conc}
            if setup == "postgres":
                one["database"] = database
            _, url = stack.enter_context(daemon_subprocess(work, one, f"daemon-{i}", stop_timeout=STOP_TIMEOUT))
            urls.append(url)
        yield urls, database


def all_runs(store) -> list[dict]:
    runs, before = [], None
    while True:
        page = store.list_runs(limit=1000, before_id=before)
        runs += page
        if len(page) < 1000:
            return runs
        before = page[-1]["id"]


def load_phase(tmp: Path, setup: str, count: int, rate: float, duplicates: int, deadline: float) -> dict:
    cfg = {"webhooks": {"github": {"secret": {"value": SECRET}}}, "api_token": {"value": API_TOKEN},
           "pipelines": [{"name": "app", "file": str(tmp / "unused.yaml"), "repo": REPO, "concurrency_group": None}]}
    with daemons(tmp, setup, "load", cfg, [0, 0]) as (urls, database):  # accept and queue only
        plan: list[tuple[int, bytes, dict]] = []
        for i in range(count):
            body, headers = delivery(i)
            plan.append((i, body, headers))
            if len(urls) > 1 and i % 10 == 0:
                plan.append((i, body, headers))  # the same delivery, at once, to the next daemon
        results = send_all(urls, plan, rate, deadline)
        # The first deliveries again, spread over the daemons as before (GitHub's "Redeliver",
        # a retrying sender): each is a duplicate, whichever daemon gets it.
        replay_plan = [(k, *delivery(k)) for k in range(duplicates)]
        replay = send_all(urls, replay_plan, rate, deadline) if duplicates else []
        store = open_store(database)
        try:
            runs = all_runs(store)
            recorded: dict[str, int] = {}
            for d in store.deliveries(limit=5000):
                recorded[d["outcome"]] = recorded.get(d["outcome"], 0) + 1
        finally:
            store.close()
    lat = [r["latency"] * 1000 for r in results if r["status"] in (200, 202)]
    lag = [r["lag"] * 1000 for r in results]
    server = [r["server_ms"] for r in results if r["server_ms"] is not None]
    span = results[0]["_span"] if results else float("nan")
    per_delivery: dict[str, int] = {}
    for r in runs:
        per_delivery[r["delivery"]] = per_delivery.get(r["delivery"], 0) + 1
    answered = {}
    for (_, _, h), r in zip(plan, results):
        answered.setdefault(h["X-GitHub-Delivery"], []).append(r)
    queued_once = [d for d, rs in answered.items() if [r["body"].get("outcome") for r in rs].count("queued") == 1
                   and all(r["status"] in (200, 202) for r in rs)]
    lost = [d for d, rs in answered.items() if per_delivery.get(d, 0) == 0]
    duplicated = [d for d, n in per_delivery.items() if n > 1]
    return {
        "daemons": len(urls), "sent": len(results), "deliveries": count, "rate_target": rate,
        "sent_to_two_daemons": len(plan) - count,
        "answered_2xx": sum(1 for r in results if r["status"] in (200, 202)),
        "status_codes": sorted({r["status"] for r in results}),
        "latency_ms": {"p50": round(pct(lat, 50), 2), "p90": round(pct(lat, 90), 2),
                       "p99": round(pct(lat, 99), 2), "max": round(max(lat), 2) if lat else None,
                       "mean": round(statistics.fmean(lat), 2) if lat else None},
        "daemon_handler_ms": {"p50": round(pct(server, 50), 2), "p99": round(pct(server, 99), 2),
                              "max": round(max(server), 2) if server else None},
        "sender_lag_ms_p99": round(pct(lag, 99), 2),
        "throughput_per_s": round(len(results) / span, 1) if span and span > 0 else None,
        "runs_in_store": len(runs),
        "lost": len(lost), "duplicated": len(duplicated),
        "queued_exactly_once": len(queued_once),
        "replayed": len(replay),
        "replays_answered_duplicate": sum(1 for r in replay if r["status"] == 200 and
                                          r["body"].get("outcome") == "duplicate"),
        "deliveries_recorded": recorded,
        "exactly_one_run_per_delivery": not lost and not duplicated and len(runs) == count
        and len(queued_once) == count,
    }


def git(*args, cwd=None) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
               GIT_COMMITTER_EMAIL="b@b")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def start_phase(tmp: Path, setup: str, samples: int, fixture: bool, deadline: float, gap: float) -> dict:
    """Time from a delivery's arrival (the run's created_at) to its run's first stage start."""
    repo = tmp / f"start-{setup}-repo"
    bare, work = repo / "repo.git", repo / "work"
    repo.mkdir()
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("clone", "-q", str(bare), str(work))
    git("checkout", "-q", "-b", "main", cwd=work)
    if fixture:
        pipeline = repo / "fake.json"
        pipeline.write_text(json.dumps({"name": "fake", "stages": ["checkout"], "sleep": 0.01}))
        command = [sys.executable, str(ROOT / "tests" / "data" / "daemon" / "fake_exec.py")]
    else:
        pipeline = repo / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump({
            "version": 1, "name": "bench", "repository": {"url": str(bare)},
            "image": {"name": "localhost/bench/app"},
            "stages": {"build": {"enabled": False}, "push": {"enabled": False}}}))
        command = None
    cfg = {"api_token": {"value": API_TOKEN}, "webhooks": {"github": {"secret": {"value": SECRET}}},
           "pipelines": [{"name": "app", "file": str(pipeline), "repo": str(bare)}]}
    if command:
        cfg["exec_command"] = command
    ids = []
    # PostgreSQL: the first daemon only accepts; the run starts on the second, which learns of it
    # by NOTIFY (its dispatcher would otherwise look only every 0.5 s).
    with daemons(tmp, setup, "start", cfg, [0, 2]) as (urls, database):
        time.sleep(gap)
        for i in range(samples):
            if time.monotonic() > deadline:
                break
            if i:
                time.sleep(gap)  # pushes this far apart: the daemons are idle again, their spares warm
            (work / "f.txt").write_text(f"{i}\n")
            git("add", "f.txt", cwd=work)
            git("commit", "-q", "-m", f"c{i}", cwd=work)
            git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
            sha = git("rev-parse", "HEAD", cwd=work)
            body, headers = delivery(10_000 + i, repo=str(bare), after=sha)
            r = httpx.post(urls[0] + "/hooks/github", content=body, headers=headers, timeout=10)
            ids.append(r.json()["runs"][0])
            # Wait for it to end, so that the next one finds a free worker.
            while time.monotonic() < deadline:
                run = httpx.get(f"{urls[-1]}/api/runs/{ids[-1]}", timeout=5,
                                headers={"Authorization": f"Bearer {API_TOKEN}"}).json()
                if run["status"] not in ("queued", "running"):
                    break
                time.sleep(0.05)
        store = open_store(database)
        try:
            waits, statuses, ran_on = [], [], set()
            for rid in ids:
                run = store.get_run(rid)
                stages = store.stages(rid)
                statuses.append(run["status"])
                ran_on.add((run.get("daemon") or "").split("@")[0])
                if stages and stages[0]["started_at"] is not None:
                    waits.append((min(s["started_at"] for s in stages if s["started_at"]) - run["created_at"]) * 1000)
        finally:
            store.close()
    return {"exec": "fixture" if fixture else "runner exec (checkout only)", "samples": len(ids), "gap_s": gap,
            "received_by": "start-0", "ran_on": sorted(ran_on),
            "statuses": {s: statuses.count(s) for s in set(statuses)},
            "arrival_to_first_stage_ms": {"p50": round(pct(waits, 50), 1), "max": round(max(waits), 1) if waits else None}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--setups", default="sqlite,postgres", help="which setups, in this order")
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
    setups = [x for x in a.setups.split(",") if x]
    if not setups or set(setups) - {"sqlite", "postgres"}:
        raise SystemExit("--setups: a comma-separated list of sqlite and postgres")
    deadline = time.monotonic() + HARD_LIMIT * len(setups)
    load_before = os.getloadavg()[0]  # other work on this machine shows up in the latencies
    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-webhooks-"))
    report: dict = {}
    try:
        for setup in setups:
            part = {"load": load_phase(tmp, setup, a.count, a.rate, min(a.duplicates, a.count), deadline)}
            if not a.no_start_latency:
                part["start"] = start_phase(tmp, setup, a.start_samples, a.fixture_exec, deadline, a.start_gap)
            report[setup] = part
    except DaemonStartError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    goals = {}
    for setup, part in report.items():
        load = part["load"]
        goals[f"{setup}: p99 under 10 ms"] = load["latency_ms"]["p99"] < 10
        goals[f"{setup}: nothing lost or duplicated"] = load["exactly_one_run_per_delivery"]
        goals[f"{setup}: replays queued nothing"] = load["replays_answered_duplicate"] == load["replayed"]
        start = part.get("start")
        if start and start["arrival_to_first_stage_ms"]["p50"] == start["arrival_to_first_stage_ms"]["p50"]:
            goals[f"{setup}: first stage p50 under 50 ms"] = start["arrival_to_first_stage_ms"]["p50"] < 50
    if {"sqlite", "postgres"} <= set(report):
        pg, lite = report["postgres"]["load"]["latency_ms"], report["sqlite"]["load"]["latency_ms"]
        report["ratios"] = {"acceptance p99, postgres (2 daemons) / sqlite (1)": round(pg["p99"] / lite["p99"], 2),
                            "acceptance p50, postgres (2 daemons) / sqlite (1)": round(pg["p50"] / lite["p50"], 2)}
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
