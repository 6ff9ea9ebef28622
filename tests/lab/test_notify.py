"""`notify:` as a user runs it: `runner exec` of a failing pipeline tells a real HTTP receiver on
loopback (Apprise json://) the stage and the reason, masked; a notifier on a closed port is a
warning and the exit code stays the pipeline's; the next run, which succeeds, is `recovered`
(read from the data directory's previous run); a failing rollback is told why; a daemon's runs
link their pages and take the previous outcome from its store. No engine, registry or server:
the checkout of a local repository is the whole run. (A bad `on:` word at its file:line:col:
tests/unit/test_notifications.py.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import yaml

from tests.helpers import make_repo, runner
from tests.receiver import Receiver, closed_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import TOKEN, bare_repo, config, daemon_in_process, wait_for  # noqa: E402

SECRET = "ref-secret-8d41c2"  # a secret's value, here also the ref a run asks for


def test_a_failure_then_its_recovery_are_notified_masked(tmp_path):
    repo = make_repo(tmp_path / "repo", {"README": "x\n"})
    receiver = Receiver()
    (tmp_path / "hook").write_text(receiver.url("ci") + "\n")
    (tmp_path / "closed").write_text(f"json://127.0.0.1:{closed_port()}/ci\n")
    (tmp_path / "value").write_text(SECRET + "\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "name": "notified", "repository": {"url": str(repo), "ref": "${REF}"},
        "image": {"name": "lab-test/notified"},
        "secrets": {"hook": {"file": "hook"}, "closed": {"file": "closed"},
                    "value": {"file": "value"}},
        "notify": [{"url": "hook", "on": ["failure", "recovered"]},
                   {"url": "closed", "on": ["failure"]}]}))
    data = tmp_path / "data"

    def run(ref: str, run_id: str):
        return runner("exec", str(pipeline), "--only", "checkout", "--var", f"REF={ref}",
                      "--data-dir", str(data), "--run-id", run_id)

    try:
        failed = run(SECRET, "first")  # no such ref: the checkout fails, quoting it
        assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
        ((path, body),) = receiver.got
        assert path == "/ci" and body["type"] == "failure"
        assert body["title"] == "notified: failed at checkout"
        text = body["message"]
        assert "Failed stage: checkout" in text
        assert "Why: ref '***' not found in" in text, text
        assert "By: " in text and "Run: " not in text  # no daemon: no dashboard link
        assert SECRET not in json.dumps(body)
        assert "notify[0] (secret 'hook'): sent 'notified: failed at checkout'" in failed.stderr
        assert "warning: notify[1] (secret 'closed'): not delivered: " in failed.stderr
        assert SECRET not in failed.stdout + failed.stderr

        fixed = run("main", "second")
        assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-2000:]
        assert len(receiver.got) == 2, receiver.got
        _, body = receiver.got[1]
        assert body["title"] == "notified: recovered" and body["type"] == "success"
        assert "The previous run of this pipeline had failed." in body["message"]
        assert "Commit: " in body["message"] and "(main)" in body["message"]
    finally:
        receiver.close()


def test_a_rollback_that_fails_is_notified_with_why(tmp_path):
    """`runner rollback` whose server cannot be reached (a closed port on loopback): exit 1, and
    the receiver hears `rollback failed` naming the server."""
    receiver = Receiver()
    (tmp_path / "hook").write_text(receiver.url("ops") + "\n")
    port = closed_port()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "name": "rolled", "repository": {"url": "."}, "image": {"name": "lab-test/rolled"},
        "secrets": {"hook": {"file": "hook"}},
        "notify": [{"url": "hook", "on": ["rollback"]}],
        "stages": {"deploy": {"servers": f"root@127.0.0.1:{port}",
                              "ssh": {"connect_timeout": 2, "retries": 0}}}}))
    try:
        proc = runner("rollback", str(pipeline))
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        ((path, body),) = receiver.got
    finally:
        receiver.close()
    assert path == "/ops" and body["title"] == "rolled: rollback failed"
    assert body["type"] == "failure"
    assert f"127.0.0.1:{port}" in body["message"], body["message"]
    assert "notify[0] (secret 'hook'): sent 'rolled: rollback failed'" in proc.stderr


def test_the_daemon_s_runs_notify_a_failure_and_its_recovery_with_their_links(tmp_path):
    """A daemon with public_url running the real `runner exec`: a manual run whose repository
    cannot be read fails and the receiver hears it with the run's page; the next run succeeds
    and is `recovered` (the previous run's outcome from the daemon's store), with its own page."""
    bare, _ = bare_repo(tmp_path)
    receiver = Receiver()
    (tmp_path / "hook").write_text(receiver.url("daemon") + "\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "watched", "variables": {"REPO": str(bare)}, "repository": {"url": "${REPO}"},
        "image": {"name": "localhost/test/watched"},
        "secrets": {"hook": {"file": str(tmp_path / "hook")}},
        "notify": [{"url": "hook"}],
        "stages": {"build": {"enabled": False}, "push": {"enabled": False}}}))
    cfg = config(tmp_path, [{"name": "watched", "file": str(pipeline), "repo": str(bare)}],
                 public_url="https://ci.example.com")
    cfg.pop("exec_command")  # the real runner exec

    def run(**body) -> int:
        r = httpx.post(f"{d.url}/api/pipelines/watched/trigger", json={"branch": "main", **body},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        run_id = r.json()["run"]["id"]
        wait_for(lambda: d.store.get_run(run_id)["status"] in ("success", "failed", "invalid"),
                 60, f"run {run_id} to end", every=0.1)
        return run_id

    try:
        with daemon_in_process(cfg) as d:
            failed = run(vars={"REPO": str(tmp_path / "gone")})
            assert d.store.get_run(failed)["status"] == "failed"
            second = run()
            assert d.store.get_run(second)["status"] == "success", d.store.logs(second)[-20:]
    finally:
        receiver.close()
    assert [b["title"] for _, b in receiver.got] == ["watched: failed at checkout",
                                                    "watched: recovered"], receiver.got
    first, then = (b["message"] for _, b in receiver.got)
    assert f"Run: https://ci.example.com/runs/{failed}" in first
    assert "By: the daemon (manual)" in first and "Failed stage: checkout" in first
    assert f"Run: https://ci.example.com/runs/{second}" in then
    assert "The previous run of this pipeline had failed." in then
