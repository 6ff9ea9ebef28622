"""`runner daemon` and its stop signals, a real process: a signal landing inside the signal
handler (at every line of it: tests/data/nested_signals.py) does not hang it, and a second
SIGTERM cancels the running run instead of waiting out the grace period. Its runs are
tests/data/daemon/fake_exec.py. `runner exec`'s handler: tests/unit/test_signals.py."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import config, fake_pipeline, push_payload, send_github, wait_for  # noqa: E402

from runner.daemon.spawn import start_daemon, stop_daemon  # noqa: E402
from runner.daemon.store_sqlite import SqliteStore  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

REPO = "https://git.example.com/me/app.git"
# Each signal handler line sends the signal again, this many times in all.
NESTED = (sys.executable, str(ROOT / "tests" / "data" / "nested_signals.py"), "5000")


def _exits(proc: subprocess.Popen, within: float) -> int:
    """The exit code, or a failure naming the hang (and the process killed)."""
    try:
        return proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {within:g} s after the signal: hung") from None


def _logged(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / f"{name}.log").read_text().splitlines() if x.startswith("{")]


def test_a_signal_inside_the_daemons_signal_handler_does_not_hang_it(tmp_path):
    cfg = config(tmp_path, [{"name": "app", "file": str(fake_pipeline(tmp_path)), "repo": REPO}])
    proc, _ = start_daemon(tmp_path, cfg, "nested", runner=NESTED)
    try:
        proc.send_signal(signal.SIGTERM)
        assert _exits(proc, 15) == 0
    finally:
        stop_daemon(proc, 1)
    msgs = [x["msg"] for x in _logged(tmp_path, "nested")]
    assert "signal received" in msgs and "daemon stopped" in msgs


def test_a_second_sigterm_cancels_the_running_run_at_once(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=30)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}], grace_period=60)
    proc, url = start_daemon(tmp_path, cfg, "twice")
    try:
        run_id = send_github(url, push_payload(REPO), "twice-1").json()["runs"][0]
        ran = tmp_path / "data" / "work" / "fake-runs.jsonl"
        wait_for(lambda: ran.exists(), 10, "the run to start")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.03)
        proc.send_signal(signal.SIGTERM)
        # Not the 60 s grace period, nor the run's 60 s: the cancel and its record.
        assert _exits(proc, 15) == 0
    finally:
        stop_daemon(proc, 1)
    run = SqliteStore(tmp_path / "data" / "runner.db").get_run(run_id)
    assert run["status"] == "cancelled" and run["reason"] == "the daemon is shutting down"
    logs = _logged(tmp_path, "twice")
    assert [x["signal"] for x in logs if x["msg"] == "signal received"] == ["SIGTERM"]
    assert any(x["msg"] == "second signal received: cancelling the running runs now" for x in logs)
