"""Pure tests of the deploy plan, the generic rollout (driven through a fake ServerSteps, no
SSH), release records and the rollback target choice. The SSH steps themselves run against
real servers in test_deploy_lab.py and test_deploy_faults_lab.py."""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from deployers import commands as cmd
from deployers.base import (DeployFailed, LockLostStep, Restored, ServerSteps, StepFailed,
                            Switch)
from deployers.history import NoSuchRelease, choose, env_changes, env_fingerprint
from deployers.plan import plan_deploy, plan_rollback
from deployers.rollout import rollout
from deployers.spec import (LABEL_SPEC, Release, identity_of, record_identity, release_for,
                            secret_fingerprint, spec_from_record, spec_record)
from runner.errors import Cancelled
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef

D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")
IMG = ImageRef.parse(f"reg/demo@{D1}")


def stage(**kw) -> DeploySettings:
    base = {"enabled": True, "servers": [f"10.0.0.{i}" for i in range(1, 6)]}
    base.update(kw)
    return DeploySettings.model_validate(base)


# ------------------------------------------------------------------------------ plan

def test_plan_is_data_and_holds_the_commands_that_run():
    s = stage(servers="root@10.0.0.1:22,deploy@10.0.0.2:2222,10.0.0.3",
              strategy={"type": "rolling", "batch_size": 2},
              container={"ports": ["8080:80"], "secret_env": {"TOKEN": "tok"}},
              registry={"username": "bob", "password": "regpw"})
    plan = plan_deploy(s, pipeline="demo", image_name="reg/demo", run_id="r1")
    assert plan.placeholder
    data = plan.to_dict()
    json.dumps(data)  # plain data
    assert data["batches"] == [["10.0.0.1", "10.0.0.2:2222"], ["10.0.0.3"]]
    assert data["image"] == "reg/demo@sha256:" + "0" * 64
    first = data["servers"][0]
    assert first["address"] == "root@10.0.0.1:22"
    assert first["release"]["secrets"] == "fingerprint computed on the server"
    by_phase = [(c["phase"], c["argv"][:3]) for c in first["commands"]]
    assert by_phase[0] == ("prepare", ["docker", "--config", "<login dir>"])
    run = next(c for c in first["commands"] if c["argv"][:2] == ["docker", "run"])
    assert "--env-file" in run["argv"] and "<env file>" in run["argv"]
    assert "runner.secrets=<secret fingerprint>" in run["argv"] and "tok" not in run["argv"]
    # With ports, the previous container stops before the new one starts (same phase).
    phases = [c["phase"] for c in first["commands"]]
    stop = next(i for i, c in enumerate(first["commands"]) if c["argv"][2] == "stop")
    assert phases[stop] == "switch" and stop < first["commands"].index(run)

    # What the steps run is the planned argv with its slots filled in, word for word.
    sp = plan.servers[0]
    bound = sp.argv("run", {cmd.ENV_FILE: "/r/env/x.env", cmd.SECRETS: "f00"})
    assert bound == [w if w not in ("<env file>", "runner.secrets=<secret fingerprint>")
                     else {"<env file>": "/r/env/x.env",
                           "runner.secrets=<secret fingerprint>": "runner.secrets=f00"}[w]
                     for w in run["argv"]]
    with pytest.raises(KeyError, match="env file"):
        sp.argv("run", {cmd.SECRETS: "f00"})
    assert sp.argv("rename_previous") == ["docker", "container", "rename", "demo",
                                          "demo_prev_r1"]


def test_plan_without_ports_stops_previous_only_after_the_gate():
    plan = plan_deploy(stage(healthcheck={"cmd": "true"}), pipeline="w", image_name="reg/w",
                       run_id="r2", image=IMG)
    sp = plan.servers[0]
    assert not plan.placeholder and sp.command("stop_previous").phase == "verify"
    assert sp.argv("probe", {cmd.NEW: "abc123"}) == ["docker", "exec", "abc123", "/bin/sh",
                                                      "-c", "true"]


# --------------------------------------------------------------------------- records

def test_release_record_round_trips_and_identity():
    s = stage(container={"command": ["--name", "One"], "env": {"A": "1"},
                         "secret_env": {"T": "tok"}, "ports": ["8080:80"]},
              healthcheck={"http": {"port": 80, "path": "/up", "status": [200, 204]}})
    r = release_for(s, IMG, pipeline="demo", run_id="r1", commit="c" * 40).with_secrets("fp1")
    rec = json.loads(json.dumps(r.record(123.0)))
    back = Release.from_record(rec)
    assert back == r
    assert record_identity(rec) == r.identity == (D1, dict(r.spec.labels)[LABEL_SPEC], "fp1")
    assert spec_from_record(spec_record(r.spec)) == r.spec
    labels = dict(r.spec.labels, **{"runner.secrets": "fp1"})
    assert identity_of(labels) == r.identity
    # A changed command is another release; so is a changed secret value.
    s2 = stage(container={"command": ["--name", "Two"], "env": {"A": "1"},
                          "secret_env": {"T": "tok"}, "ports": ["8080:80"]},
               healthcheck={"http": {"port": 80, "path": "/up", "status": [200, 204]}})
    r2 = release_for(s2, IMG, pipeline="demo", run_id="r2", commit="c" * 40)
    assert r2.with_secrets("fp1").identity != r.identity
    assert r.with_secrets("fp2").identity != r.identity
    with pytest.raises(ValueError, match="no container spec"):
        Release.from_record({"digest": D1, "ref": str(IMG)})


def test_secret_fingerprint_is_keyed():
    s = stage(container={"secret_env": {"T": "tok"}})
    spec = release_for(s, IMG, pipeline="demo", run_id="r1").spec
    a = secret_fingerprint(b"k" * 32, spec, {"T": "hunter2"})
    assert a == secret_fingerprint(b"k" * 32, spec, {"T": "hunter2"})
    assert a != secret_fingerprint(b"k" * 32, spec, {"T": "hunter3"})
    assert a != secret_fingerprint(b"j" * 32, spec, {"T": "hunter2"})  # another server's key
    assert "hunter2" not in a
    import hashlib
    assert a not in hashlib.sha256(b"hunter2").hexdigest()  # not a plain hash of the value
    no_secrets = release_for(stage(), IMG, pipeline="demo", run_id="r1").spec
    assert secret_fingerprint(b"k" * 32, no_secrets, {}) == ""


# ------------------------------------------------------------------ rollback target

def _entry(digest, commit, run, spec="s1", secrets=""):
    return {"digest": digest, "ref": f"reg/demo@{digest}", "commit": commit, "run_id": run,
            "secrets": secrets, "spec": {"labels": [[LABEL_SPEC, spec]]}}


HISTORY = [_entry(D1, "1111aaaa" + "0" * 32, "r1"), _entry(D2, "2222bbbb" + "0" * 32, "r2"),
           _entry(D3, "3333cccc" + "0" * 32, "r3")]


def test_choose_default_positions_digests_commits():
    newest = record_identity(HISTORY[-1])
    assert choose(HISTORY, newest)["run_id"] == "r2"  # running the newest: one back
    # Running something unverified: back to the newest verified one.
    assert choose(HISTORY, (D3, "other", ""))["run_id"] == "r3"
    assert choose(HISTORY, None)["run_id"] == "r3"
    assert choose(HISTORY, newest, "0")["run_id"] == "r3"
    assert choose(HISTORY, newest, "2")["run_id"] == "r1"
    assert choose(HISTORY, newest, D2)["run_id"] == "r2"
    assert choose(HISTORY, newest, D1[:13])["run_id"] == "r1"
    assert choose(HISTORY, newest, "2222bbbb" + "0" * 32)["run_id"] == "r2"
    assert choose(HISTORY, newest, "1111aa")["run_id"] == "r1"
    assert choose(HISTORY, newest, "1111AA")["run_id"] == "r1"


@pytest.mark.parametrize("to,match", [
    ("3", "beyond the 3"), ("9999abcd", "no recorded release has commit"),
    ("sha256:dddd", "no recorded release has digest"), ("garbage!", "not a position"),
    ("main", "not a position")])
def test_choose_refuses_what_it_cannot_find(to, match):
    with pytest.raises(NoSuchRelease, match=match):
        choose(HISTORY, None, to)


def test_choose_ambiguous_and_empty():
    h = HISTORY + [_entry(D1.replace("a", "e", 10), "1111ffff" + "0" * 32, "r4")]
    with pytest.raises(NoSuchRelease, match="ambiguous"):
        choose(h, None, "1111")
    with pytest.raises(NoSuchRelease, match="no verified release"):
        choose([], None)
    with pytest.raises(NoSuchRelease, match="no previous version"):
        choose(HISTORY[:1], record_identity(HISTORY[0]))


# --------------------------------------------------------------------------- rollout

class FakeSteps(ServerSteps):
    """Scripted per-server steps: which servers fail where, and whether restore works."""

    def __init__(self, fail: dict[str, str] | None = None, restore_fails: set[str] = frozenset(),
                 unchanged: set[str] = frozenset(), cancel_at: str | None = None,
                 cancel: threading.Event | None = None):
        self.fail = fail or {}
        self.restore_fails = restore_fails
        self.unchanged = unchanged
        self.cancel_at, self.cancel = cancel_at, cancel
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.finished = 0

    def _ev(self, kind, server):
        with self.lock:
            self.events.append((kind, server))
        if self.fail.get(server) == kind:
            if kind == "lock":
                raise LockLostStep(server, "another run (r9) took the deploy lock")
            raise StepFailed(server, f"{kind} failed", touched=kind != "prepare")
        if self.cancel_at == f"{kind}:{server}":
            self.cancel.set()
            raise Cancelled("cancelled")

    def prepare(self, plan):
        self._ev("prepare", plan.server)
        return Switch(plan.server, plan.release, previous_digest=D2)

    def switch(self, sw):
        self._ev("switch", sw.server)
        sw.unchanged = sw.server in self.unchanged

    def verify(self, sw):
        self._ev("verify", sw.server)
        if self.fail.get(sw.server) == "lock":
            self._ev("lock", sw.server)

    def restore(self, sw):
        with self.lock:
            self.events.append(("restore", sw.server))
        if sw.server in self.restore_fails:
            return Restored(False, kept="demo_prev_r1", note="the SSH connection dropped")
        return Restored(True, running=sw.previous_digest, note="previous running again")

    def commit(self, sw):
        self._ev("commit", sw.server)

    def timings(self, server):
        return {"pull": 0.5}

    def finish(self):
        self.finished += 1

    def of(self, kind):
        return [s for k, s in self.events if k == kind]


def _run(strategy, steps, n=5, **kw):
    s = stage(servers=[f"10.0.0.{i}" for i in range(1, n + 1)], strategy=strategy)
    plan = plan_deploy(s, pipeline="demo", image_name="reg/demo", run_id="r1", image=IMG)
    return rollout(plan, steps, **kw)


def _statuses(report):
    return {s.server: s.status for s in report.servers}


def test_rolling_failure_rolls_back_all_and_never_touches_later_batches():
    steps = FakeSteps(fail={"10.0.0.3": "verify"})
    with pytest.raises(DeployFailed) as err:
        _run({"type": "rolling", "batch_size": 2}, steps)
    assert set(steps.of("switch")) == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"}
    assert set(steps.of("restore")) == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"}
    assert steps.of("commit") == [] and steps.finished == 1
    report = err.value.report
    assert _statuses(report) == {"10.0.0.1": "rolled_back", "10.0.0.2": "rolled_back",
                                 "10.0.0.3": "failed", "10.0.0.4": "rolled_back",
                                 "10.0.0.5": "skipped"}
    failed = report.servers[2]
    assert failed.rolled_back and failed.verified and failed.digest == D2
    assert "verify failed" in failed.reason and failed.phases == {"pull": 0.5}
    assert "failed on 10.0.0.3" in str(err.value)
    assert "put back on the previous verified release: 10.0.0.1, 10.0.0.2, 10.0.0.3" \
        in report.headline


def test_keep_done_commits_earlier_batches_only():
    steps = FakeSteps(fail={"10.0.0.3": "switch"})
    with pytest.raises(DeployFailed) as err:
        _run({"type": "rolling", "batch_size": 2, "on_failure": "keep_done"}, steps)
    assert set(steps.of("restore")) == {"10.0.0.3", "10.0.0.4"}
    assert set(steps.of("commit")) == {"10.0.0.1", "10.0.0.2"}
    st = _statuses(err.value.report)
    assert st["10.0.0.1"] == "deployed" and st["10.0.0.5"] == "skipped"
    assert "kept the new release on 10.0.0.1, 10.0.0.2" in err.value.report.headline


def test_canary_and_all():
    steps = FakeSteps(fail={"10.0.0.1": "verify"})
    with pytest.raises(DeployFailed):
        _run({"type": "canary"}, steps)
    assert steps.of("prepare") == ["10.0.0.1"] and steps.of("switch") == ["10.0.0.1"]

    steps = FakeSteps(unchanged={"10.0.0.2"})
    report = _run({"type": "all"}, steps)
    assert report.ok and _statuses(report)["10.0.0.2"] == "unchanged"
    assert [s.status for s in report.servers].count("deployed") == 4
    assert "10.0.0.2" not in steps.of("verify")  # nothing switched: nothing to gate
    kinds = [k for k, _ in steps.events]
    assert kinds[:5] == ["prepare"] * 5  # every server pulled before any switch
    assert report.servers[0].previous_digest == D2 and report.servers[0].digest == D1


def test_a_failed_restore_is_reported_as_such():
    steps = FakeSteps(fail={"10.0.0.1": "verify"}, restore_fails={"10.0.0.1", "10.0.0.2"})
    with pytest.raises(DeployFailed) as err:
        _run({"type": "all"}, steps, n=3)
    report = err.value.report
    one, two, three = report.servers
    assert (one.status, one.rolled_back, one.verified, one.kept) == (
        "failed", False, False, "demo_prev_r1")
    assert one.digest == D1 and "ROLLBACK FAILED" in one.reason
    assert (two.status, two.verified) == ("failed", False)
    assert three.status == "rolled_back" and three.verified
    text = str(err.value)
    assert "every changed server was rolled back" not in text
    assert "10.0.0.1: NOT restored, still running " + D1[:19] in text
    assert "previous verified kept as demo_prev_r1" in text
    assert "put back on the previous verified release: 10.0.0.3" in text


def test_prepare_failure_says_nothing_changed():
    steps = FakeSteps(fail={"10.0.0.2": "prepare"})
    with pytest.raises(DeployFailed) as err:
        _run({"type": "all"}, steps, n=2)
    assert steps.of("switch") == [] and steps.of("restore") == []
    assert "nothing was changed on any server" in err.value.report.headline


def test_lost_lock_is_not_committed_and_restored_only_when_still_ours():
    # Another run took it: the steps cannot restore; the server is left to that run.
    steps = FakeSteps(fail={"10.0.0.2": "lock"}, restore_fails={"10.0.0.2"})
    with pytest.raises(DeployFailed) as err:
        _run({"type": "all"}, steps, n=2)
    st = _statuses(err.value.report)
    assert st == {"10.0.0.1": "rolled_back", "10.0.0.2": "lock_lost"}
    assert steps.of("commit") == []
    assert "10.0.0.2: this run lost its deploy lock there and left the server as it was" \
        in err.value.report.headline
    assert err.value.report.servers[1].kept == "demo_prev_r1"
    # Lost by a failed renewal but still ours: restored, and still a failure.
    steps = FakeSteps(fail={"10.0.0.2": "lock"})
    with pytest.raises(DeployFailed) as err:
        _run({"type": "all"}, steps, n=2)
    row = err.value.report.servers[1]
    assert (row.status, row.rolled_back, row.verified) == ("failed", True, True)
    assert steps.of("commit") == []


def test_cancel_restores_everything_and_raises_cancelled():
    cancel = threading.Event()
    steps = FakeSteps(cancel_at="verify:10.0.0.3", cancel=cancel)
    with pytest.raises(Cancelled):
        _run({"type": "rolling", "batch_size": 2, "on_failure": "keep_done"}, steps,
             cancel=cancel)
    # keep_done does not hold on cancel: the done batch is restored too.
    assert {"10.0.0.1", "10.0.0.2", "10.0.0.3"} <= set(steps.of("restore"))
    assert steps.of("commit") == [] and steps.finished == 1


class InterruptedSteps(FakeSteps):
    """10.0.0.1 passes its verify at once; 10.0.0.2's verify interrupts the main thread (as
    `runner exec`'s signal handler does) or only sets the cancel event (as a handler that only
    records the request does), then, like the SSH steps, stops once it sees the event."""

    def __init__(self, cancel: threading.Event, interrupt: bool):
        super().__init__()
        self.cancel, self.interrupt = cancel, interrupt

    def verify(self, sw):
        self._ev("verify", sw.server)
        if sw.server != "10.0.0.2":
            return
        if self.interrupt:
            os.kill(os.getpid(), signal.SIGINT)  # Python's handler: KeyboardInterrupt
        else:
            self.cancel.set()
        if not self.cancel.wait(5):
            raise AssertionError("the interrupt did not set the cancel event")
        raise Cancelled("cancelled while waiting for health")


@pytest.mark.parametrize("interrupt", [True, False], ids=["KeyboardInterrupt", "cancel event"])
def test_a_cancel_during_a_batch_puts_back_its_servers_already_switched(interrupt):
    cancel = threading.Event()
    steps = InterruptedSteps(cancel, interrupt)
    with pytest.raises(Cancelled) as err:
        _run({"type": "all"}, steps, n=2, cancel=cancel)
    assert sorted(steps.of("restore")) == ["10.0.0.1", "10.0.0.2"]
    assert steps.of("commit") == [] and steps.finished == 1
    assert str(err.value) == ("cancelled: deploy of demo stopped; put back on the previous "
                              "verified release: 10.0.0.1, 10.0.0.2")


def test_a_cancel_after_the_last_batch_was_verified_commits_nothing():
    cancel = threading.Event()

    class LateCancel(FakeSteps):
        def verify(self, sw):
            super().verify(sw)
            if sw.server == "10.0.0.2":
                cancel.set()  # the last server passed its gate; the cancel came right after
    steps = LateCancel()
    with pytest.raises(Cancelled):
        _run({"type": "rolling", "batch_size": 1}, steps, n=2, cancel=cancel)
    assert steps.of("restore") == ["10.0.0.2", "10.0.0.1"] and steps.of("commit") == []


class LockingSteps(FakeSteps):
    """Keys as an SSH target's lock directories would be; records the order of take_lock."""

    def __init__(self, keys: dict[str, str], held: str | None = None, **kw):
        super().__init__(**kw)
        self.keys, self.held = keys, held

    def reach(self, plan):
        self._ev("reach", plan.server)
        return self.keys[plan.server]

    def take_lock(self, plan):
        self._ev("take_lock", plan.server)
        if plan.server == self.held:
            raise StepFailed(plan.server, "the deploy lock for 'demo' is held by run r9",
                             touched=False)


def test_every_lock_is_taken_first_in_the_order_of_the_keys():
    keys = {"10.0.0.1": "/e/c", "10.0.0.2": "/e/a", "10.0.0.3": "/e/b"}
    steps = LockingSteps(keys)
    assert _run({"type": "rolling", "batch_size": 1}, steps, n=3).ok
    kinds = [k for k, _ in steps.events]
    assert kinds[:6] == ["reach"] * 3 + ["take_lock"] * 3
    assert steps.of("take_lock") == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]
    # The lock of the one in the middle is held by another run: nothing is prepared.
    steps = LockingSteps(keys, held="10.0.0.3")
    with pytest.raises(DeployFailed) as err:
        _run({"type": "all"}, steps, n=3)
    assert steps.of("take_lock") == ["10.0.0.2", "10.0.0.3"] and steps.of("prepare") == []
    assert _statuses(err.value.report) == {"10.0.0.1": "skipped", "10.0.0.2": "skipped",
                                           "10.0.0.3": "failed"}
    assert err.value.report.headline == ("deploy of demo failed on 10.0.0.3; nothing was "
                                         "changed on any server")
    assert steps.finished == 1


def test_rollback_report_says_rolled_back_with_both_digests():
    s = stage(servers=["10.0.0.1"])
    r = release_for(s, ImageRef.parse(f"reg/demo@{D2}"), pipeline="demo", run_id="old")
    plan = plan_rollback(s, pipeline="demo", run_id="rb1", releases={"10.0.0.1": r})

    class Steps(FakeSteps):
        def prepare(self, plan):
            return Switch(plan.server, plan.release, previous_digest=D1)
    report = rollout(plan, Steps())
    [row] = report.servers
    assert (row.status, row.rolled_back, row.digest, row.previous_digest) == (
        "rolled_back", True, D2, D1)
    assert plan.servers[0].argv("rename_previous")[-1] == "demo_prev_rb1"


def test_a_recovered_server_is_not_reported_unchanged():
    """prepare returned the server from an unverified release to the one this run wants: the
    switch has nothing left to do, but the server did change."""
    class Steps(FakeSteps):
        def prepare(self, plan):
            return Switch(plan.server, plan.release, previous_digest=D3,
                          recovered="returned to the last verified release first")
    steps = Steps(unchanged={"10.0.0.1"})
    report = _run({"type": "all"}, steps, n=1)
    [row] = report.servers
    assert (row.status, row.previous_digest, row.digest) == ("deployed", D3, D1)
    assert "returned to the last verified release" in row.reason


def test_a_first_deploy_that_fails_says_nothing_ran_before_and_names_the_failing_digest():
    """Nothing of the app ran there: the restore removed the new container and put nothing
    back; the report says so (not "put back on the previous verified release"), and the failed
    server's line shows the digest that failed. The server undone beside it says the same."""
    class Steps(FakeSteps):
        def prepare(self, plan):
            self._ev("prepare", plan.server)
            return Switch(plan.server, plan.release)

        def restore(self, sw):
            return Restored(True, note="new container removed", none_before=True)
    with pytest.raises(DeployFailed) as err:
        _run({"type": "all"}, Steps(fail={"10.0.0.1": "verify"}), n=2)
    report = err.value.report
    one, two = report.servers
    assert (one.status, one.rolled_back, one.digest, one.release) == ("failed", False, "", D1)
    assert "removed the failed container, nothing was running before" in one.reason
    assert (two.status, two.rolled_back, two.release) == ("rolled_back", False, D1)
    assert "removed the new container, nothing was running before" in two.reason
    text = str(err.value)
    assert "put back on the previous verified release" not in text
    assert ("removed what this run started, nothing was running before: 10.0.0.1, 10.0.0.2"
            in report.headline)
    assert f"10.0.0.1: failed ({D1[:19]}): verify failed" in text


def test_a_failed_server_line_shows_the_failing_digest_not_the_one_put_back():
    with pytest.raises(DeployFailed) as err:
        _run({"type": "all"}, FakeSteps(fail={"10.0.0.1": "verify"}), n=1)
    [row] = err.value.report.servers
    assert (row.digest, row.release, row.rolled_back) == (D2, D1, True)
    line = err.value.report.summary()
    assert line.startswith(f"10.0.0.1: failed ({D1[:19]}): verify failed") and D2[:19] not in line
    assert "put back on the previous verified release: 10.0.0.1" in err.value.report.headline


def test_a_release_nothing_checked_is_never_called_healthy():
    class Steps(FakeSteps):
        def verify(self, sw):
            sw.unchecked = "the image has no HEALTHCHECK"
    log: list[str] = []
    report = _run({"type": "all"}, Steps(), n=1, log=log.append)
    [row] = report.servers
    assert row.status == "deployed"
    assert row.reason == "started, not health-checked: the image has no HEALTHCHECK"
    assert f"10.0.0.1: started, not health-checked {D1[:19]}" in log
    assert not any("healthy" in line for line in log)
    assert "started, not health-checked" in report.summary()


def test_releases_that_differ_only_in_env_show_different_env_fingerprints():
    def rec(env, secret_env, secrets=""):
        s = stage(container={"env": env, "secret_env": secret_env})
        return {**release_for(s, IMG, pipeline="demo", run_id="r").record(1.0),
                "secrets": secrets}
    a = rec({"LOG": "info"}, {"TOKEN": "tok"}, "fp1")
    b = rec({"LOG": "debug"}, {"TOKEN": "tok"}, "fp1")
    c = rec({"LOG": "debug", "NEW": "1"}, {"TOKEN": "tok2"}, "fp2")
    d = rec({"LOG": "debug", "NEW": "1"}, {"TOKEN": "tok2"}, "fp3")
    prints = [env_fingerprint(x) for x in (a, b, c, d)]
    assert len(set(prints[:3])) == 3 and prints[2] == prints[3]
    assert all(len(p) == 8 for p in prints)
    assert env_fingerprint(a) == env_fingerprint(json.loads(json.dumps(a)))  # stable
    assert env_changes(a, b) == ["LOG"]
    assert env_changes(b, c) == ["+NEW", "TOKEN"]  # TOKEN: another secret
    assert env_changes(c, d) == ["secret values"]  # same names, other values
    assert env_changes(d, a) == ["LOG", "-NEW", "TOKEN"]  # by name
    assert env_changes(a, a) == []
    # Values are hashed, never shown; a secret's value is not even an input.
    assert "info" not in " ".join(env_changes(a, b)) and env_fingerprint({}) == \
        env_fingerprint({"spec": {}})
