"""Notifications: which events a run's outcome is, the message written for them, the previous
run read from a data directory, and delivery to a real HTTP receiver on loopback (Apprise's
json://), masked, with a failing notifier a warning only."""
from __future__ import annotations

import json
import os
import time

import pytest

from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model.notify import Notifier
from runner.notifications import (REASON_LIMIT, RunOutcome, deliver, events_of, message,
                                  previous_local_status)
from runner.secrets import Masker, SecretStore
from tests.receiver import Receiver, closed_port

FAILED = RunOutcome(pipeline="shop", status="failed", failed_stage="test",
                    reason="step 'unit' failed: 'pytest' exited with code 1", commit="a" * 40,
                    ref="main", who="alice", run_url="https://ci.example.com/runs/42")


@pytest.mark.parametrize("outcome, events", [
    (FAILED, ("failure",)),
    (RunOutcome("shop", "success", previous="failed", deployed=True), ("recovered", "deployed")),
    (RunOutcome("shop", "success", previous="success", deployed=True), ("deployed",)),
    (RunOutcome("shop", "success", previous=None), ()),
    (RunOutcome("shop", "cancelled", previous="failed"), ()),
    (RunOutcome("shop", "failed", what="rollback"), ("rollback",)),
    (RunOutcome("shop", "success", what="rollback"), ("rollback",)),
    (RunOutcome("shop", "cancelled", what="rollback"), ()),
])
def test_events_of_an_outcome(outcome, events):
    assert events_of(outcome) == events


def test_a_failure_says_pipeline_commit_who_stage_why_and_link():
    m = message(FAILED, ["failure"])
    assert m.title == "shop: failed at test" and m.kind == "failure"
    assert m.body.splitlines() == [
        "Pipeline: shop", f"Commit: {'a' * 12} (main)", "By: alice", "Failed stage: test",
        "Why: step 'unit' failed: 'pytest' exited with code 1",
        "Run: https://ci.example.com/runs/42"]


def test_a_recovery_with_a_deploy_to_a_destination_without_a_link():
    outcome = RunOutcome("shop", "success", destination="staging", commit="b" * 40,
                         who="bob", previous="failed", deployed=True)
    m = message(outcome, ["recovered", "deployed"])
    assert m.title == "shop (staging): recovered and deployed" and m.kind == "success"
    assert m.body.splitlines() == ["Pipeline: shop", "Destination: staging",
                                   f"Commit: {'b' * 12}", "By: bob",
                                   "The previous run of this pipeline had failed."]


def test_a_rollback_and_a_long_reason():
    failed = message(RunOutcome("shop", "failed", what="rollback", reason="x" * 5000),
                     ["rollback"])
    assert failed.title == "shop: rollback failed" and failed.kind == "failure"
    assert f"Why: {'x' * REASON_LIMIT} [...]" in failed.body
    done = message(RunOutcome("shop", "success", what="rollback"), ["rollback"])
    assert done.title == "shop: rollback done" and done.kind == "warning"


def _run(runs, run_id: str, status: str, pipeline: str = "shop", destination: str = "",
         age: float = 0) -> None:
    (runs / run_id).mkdir(parents=True)
    record = runs / run_id / "run.json"
    record.write_text(json.dumps({"pipeline": pipeline, "status": status,
                                  **({"destination": destination} if destination else {})}))
    when = time.time() - age
    os.utime(record, (when, when))


def test_the_previous_run_is_the_newest_that_ended_of_its_pipeline_and_destination(tmp_path):
    runs = tmp_path / "runs"
    assert previous_local_status(runs, "shop", "", "now") is None  # no runs directory
    _run(runs, "old", "failed", age=300)
    _run(runs, "mid", "success", age=200)
    _run(runs, "cancelled", "cancelled", age=100)
    _run(runs, "other", "failed", pipeline="other", age=50)
    _run(runs, "staging", "failed", destination="staging", age=40)
    _run(runs, "now", "success", age=0)
    (runs / "broken").mkdir()
    (runs / "broken" / "run.json").write_text("{not json")
    assert previous_local_status(runs, "shop", "", "now") == "success"
    assert previous_local_status(runs, "shop", "staging", "now") == "failed"
    assert previous_local_status(runs, "nope", "", "now") is None


HOOK_VALUE = "hook-token-abcdef"


def test_delivery_to_a_receiver_masked_and_a_closed_port_only_warns():
    receiver = Receiver()
    masker = Masker()
    secrets = SecretStore({"good": receiver.url(HOOK_VALUE),
                           "closed": f"json://127.0.0.1:{closed_port()}/{HOOK_VALUE}",
                           "api": "api-value-123456"}, masker)
    outcome = RunOutcome("shop", "failed", failed_stage="deploy",
                         reason="server 10.0.0.5 refused api-value-123456")
    said: list[str] = []
    try:
        deliver([Notifier(url="good", on=["failure"]), Notifier(url="closed", on=["failure"]),
                 Notifier(url="good", on=["deployed"])], outcome, secrets.value, masker,
                said.append)
    finally:
        receiver.close()
    ((path, body),) = receiver.got  # the third listens to `deployed` only
    assert path == f"/{HOOK_VALUE}"
    assert body["title"] == "shop: failed at deploy" and body["type"] == "failure"
    assert "Failed stage: deploy" in body["message"]
    assert "Why: server 10.0.0.5 refused ***" in body["message"]
    assert said[0] == "notify[0] (secret 'good'): sent 'shop: failed at deploy'"
    assert said[1].startswith("warning: notify[1] (secret 'closed'): not delivered: ")
    assert len(said) == 2
    assert HOOK_VALUE not in "\n".join(said) and "api-value" not in json.dumps(body)


def test_a_bad_event_word_is_refused_at_its_place():
    text = ("name: demo\nrepository: {url: x}\nimage: {name: a}\nsecrets: {hook: {env: H}}\n"
            "notify:\n  - url: hook\n    on: [failure, deploy]\n")
    with pytest.raises(InvalidInput) as info:
        load_pipeline_text(text, "/tmp/p.yml", environ={})
    (problem,) = info.value.problems
    assert (problem.line, problem.column, problem.path) == (7, 19, "notify[0].on[1]")
    assert "got the string 'deploy' (did you mean 'deployed'?)" in problem.message


def test_the_daemon_says_the_link_and_the_previous_run_from_its_store(tmp_path):
    """runner.daemon.notice on a real SQLite store: the newest earlier run of the pipeline that
    ended success or failed (a cancelled one and a rollback passed over, another pipeline's
    not counted), "none" for the first run; the link only with public_url."""
    from runner.daemon.config import config_from_dict
    from runner.daemon.notice import notice
    from runner.daemon.store import NewRun, open_store

    store = open_store(tmp_path / "runner.db")
    try:
        def run(pipeline: str, trigger: str = "push", status: str | None = None):
            (run_id,), _ = store.enqueue([NewRun(pipeline=pipeline, trigger=trigger)])
            claimed = store.claim("d1", {pipeline: 5}, 30)
            assert claimed is not None and claimed.id == run_id
            if status:
                assert store.finish(run_id, "d1", status, 0)
            return claimed

        first = run("shop")
        bare = config_from_dict({"data_dir": str(tmp_path)})
        assert notice(bare, store, first) == {"run_url": None, "previous_status": "none"}
        store.finish(first.id, "d1", "failed", 1)
        run("shop", status="success")
        run("shop", status="failed")
        run("shop", trigger="rollback", status="success")
        run("shop", status="cancelled")
        run("other", status="success")
        latest = run("shop")
        linked = config_from_dict({"data_dir": str(tmp_path),
                                   "public_url": "https://ci.example.com/"})
        assert notice(linked, store, latest) == {
            "run_url": f"https://ci.example.com/runs/{latest.id}", "previous_status": "failed"}
    finally:
        store.close()
