#!/usr/bin/env python3
"""BENCH FIXTURE (not a runner): stands in for `runner exec` in bench/dashboard.py's live-log
measurement. Takes the same argv as tests/data/daemon/fake_exec.py (PIPELINE --json --run-id ID
--data-dir DIR [--event FILE] [--var K=V]...) and prints the same JSON events: run.start,
stage.start of "build", then LINES stage.log events, each {"event": "stage.log", "stage": "build",
"line": "tick N", "time": <when it was written>} flushed at once and spaced INTERVAL seconds apart
(± JITTER, uniform), then stage.end and run.end.

PIPELINE is a JSON file: {"lines": 60, "interval": 0.05, "jitter": 0.01, "delay": 1.0}, where
`delay` is how long the stage waits before its first line (time for a browser to open the page).
--var TICKER_LINES=n / TICKER_INTERVAL=s override it. SIGINT or SIGTERM cancels (exit 130).
"""
import argparse
import json
import random
import signal
import sys
import time


class Cancel(Exception):
    pass


def on_signal(signum, frame):
    raise Cancel()


def emit(**ev):
    ev.setdefault("time", time.time())
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--run-id")
    ap.add_argument("--data-dir")
    ap.add_argument("--event")
    ap.add_argument("--ref")
    ap.add_argument("--var", action="append", default=[])
    ap.add_argument("--skip", action="append", default=[])
    ap.add_argument("--withhold-secrets", action="store_true")
    a = ap.parse_args()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with open(a.pipeline) as f:
        spec = json.load(f)
    variables = dict(v.split("=", 1) for v in a.var)
    lines = int(variables.get("TICKER_LINES", spec.get("lines", 60)))
    interval = float(variables.get("TICKER_INTERVAL", spec.get("interval", 0.05)))
    jitter = float(spec.get("jitter", 0.01))
    delay = float(spec.get("delay", 1.0))
    start = time.time()
    emit(event="run.start", run_id=a.run_id, pipeline=spec.get("name", "ticker"))
    emit(event="stage.start", stage="build")
    try:
        time.sleep(delay)
        for n in range(1, lines + 1):
            emit(event="stage.log", stage="build", line=f"tick {n}", time=time.time())
            if n < lines:
                time.sleep(max(0.0, interval + random.uniform(-jitter, jitter)))
    except Cancel:
        emit(event="stage.end", stage="build", status="cancelled", duration=time.time() - start)
        emit(event="run.end", status="cancelled", exit_code=130, duration=time.time() - start)
        return 130
    emit(event="stage.end", stage="build", status="success", duration=time.time() - start, outputs={})
    emit(event="run.end", status="success", exit_code=0, duration=time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
