#!/usr/bin/env python3
"""TEST FIXTURE (not a runner): stands in for `runner exec` in daemon queue tests that need no
real build. Takes the same argv (PIPELINE --json --run-id ID --data-dir DIR --request FILE
[--var K=V]...) and prints the same JSON events (docs/stage-outputs.md).

PIPELINE is a JSON file: {"stages": [...], "sleep": seconds per stage, "fail": stage or null,
"exit": code to exit with instead, "outputs": {stage: the stage.end outputs}, "ticks": {"lines": n, "interval": s, "jitter": s, "delay": s}
(each stage waits `delay`, then prints n lines "tick N" `interval` ± `jitter` apart, each with
the time it was written: bench/dashboard.py's live log)}. --var FAKE_SLEEP=s / FAKE_FAIL=stage override it;
--var FAKE_ECHO=text prints text in a log line and on stderr (masking tests); --skip STAGE and --withhold-secrets are recorded; FAKE_LINES=n
prints n lines of 1 KB per stage (disk-full tests); FAKE_IGNORE_INT=1 ignores SIGINT (orphan
tests). SIGINT or
SIGTERM cancels like the engine does (stage.end cancelled, run.end cancelled, exit 130). Each run
appends one line {"run_id", "request"} to DIR/fake-runs.jsonl so tests can see what ran.
"""
import argparse
import json
import os
import random
import signal
import sys
import time


class Cancel(Exception):
    pass


def on_signal(signum, frame):
    raise Cancel()


def emit(**ev):
    ev["time"] = time.time()
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--run-id")
    ap.add_argument("--data-dir")
    ap.add_argument("--request")
    ap.add_argument("--var", action="append", default=[])
    ap.add_argument("--skip", action="append", default=[])
    ap.add_argument("--withhold-secrets", action="store_true")
    a = ap.parse_args()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if any(v == "FAKE_IGNORE_INT=1" for v in a.var):  # a child that will not stop when asked
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        spec = json.load(open(a.pipeline))
    except (OSError, ValueError) as exc:
        emit(event="run.end", status="invalid", exit_code=2, duration=0, error=f"{a.pipeline}: {exc}")
        return 2
    variables = dict(v.split("=", 1) for v in a.var)
    sleep = float(variables.get("FAKE_SLEEP", spec.get("sleep", 0.1)))
    fail = variables.get("FAKE_FAIL", spec.get("fail"))
    request = json.load(open(a.request)) if a.request else None
    os.makedirs(a.data_dir, exist_ok=True)
    with open(os.path.join(a.data_dir, "fake-runs.jsonl"), "a") as f:
        f.write(json.dumps({"run_id": a.run_id, "pid": os.getpid(), "request": request, "skip": a.skip,
                            "withhold_secrets": a.withhold_secrets}) + "\n")
    start = time.time()
    emit(event="run.start", run_id=a.run_id, pipeline=spec.get("name", "fake"))
    stage = None
    try:
        for stage in spec.get("stages", ["checkout", "build"]):
            t0 = time.time()
            emit(event="stage.start", stage=stage)
            emit(event="stage.log", stage=stage, line=f"{stage}: working for {sleep}s")
            print(f"stderr line from {stage}", file=sys.stderr, flush=True)
            for n in range(int(variables.get("FAKE_LINES", 0))):  # for disk-full tests: a lot of log
                emit(event="stage.log", stage=stage, line=f"{n:06d} " + "x" * 1000)
            ticks = spec.get("ticks")
            if ticks:
                time.sleep(float(ticks.get("delay", 0)))
                for n in range(1, int(ticks["lines"]) + 1):
                    emit(event="stage.log", stage=stage, line=f"tick {n}")
                    jitter = float(ticks.get("jitter", 0))
                    time.sleep(max(0.0, float(ticks["interval"]) + random.uniform(-jitter, jitter)))
            if "FAKE_ECHO" in variables:  # for masking tests: print a value the daemon must mask
                emit(event="stage.log", stage=stage, line=f"echo: {variables['FAKE_ECHO']}")
                print(f"stderr echo: {variables['FAKE_ECHO']}", file=sys.stderr, flush=True)
            deadline = time.time() + sleep
            while time.time() < deadline:
                time.sleep(0.02)
            if stage == fail:
                emit(event="stage.end", stage=stage, status="failed", duration=time.time() - t0,
                     error=f"{stage} failed on purpose")
                emit(event="run.end", status="failed", exit_code=1, duration=time.time() - start,
                     error=f"stage {stage!r} failed: on purpose")
                return 1
            emit(event="stage.end", stage=stage, status="success", duration=time.time() - t0,
                 outputs=spec.get("outputs", {}).get(stage, {}))
    except Cancel:
        emit(event="stage.end", stage=stage, status="cancelled", duration=0)
        emit(event="run.end", status="cancelled", exit_code=130, duration=time.time() - start)
        return 130
    if "exit" in spec:
        return int(spec["exit"])
    emit(event="run.end", status="success", exit_code=0, duration=time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
