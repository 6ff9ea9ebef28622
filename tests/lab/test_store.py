"""The run store's contract, run against both backends: SQLite (a file in tmp_path) and the lab's
PostgreSQL 15 (a fresh database per test). Concurrency is real: several stores (connections) on one
database, threads claiming and accepting at once."""
from __future__ import annotations

import threading
import time

import pytest

from runner.daemon import migrations
from runner.daemon.store import DeliveryAbout, NewRun, StoreError, open_store


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "runner.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(url):
    s = open_store(url)
    yield s
    s.close()


@pytest.fixture
def second(url, store):
    """Another daemon's connection to the same database."""
    s = open_store(url)
    yield s
    s.close()


def test_claim_limits_groups_and_supersede(store):
    s = store
    a1, a2 = s.enqueue([NewRun("a", "push", group="a/main"), NewRun("a", "push", group="a/dev")])[0]
    (b1,), _ = s.enqueue([NewRun("b", "push", group=None)])
    limits = {"a": 1, "b": 5}
    c1 = s.claim("me", limits, 10)
    assert c1.id == a1
    assert s.get_run(a1)["daemon"] == "me"
    # a is at its limit of 1: the next claim skips a2 and takes b1.
    assert s.claim("me", limits, 10).id == b1
    assert s.claim("me", limits, 10) is None
    # A newer run in a1's group cancels the queued older ones and flags the running one.
    (a3,), cancel = s.enqueue([NewRun("a", "push", group="a/main")])
    assert cancel == [a1]
    assert s.heartbeat("me", [a1, b1], 10) == {a1: f"superseded by run {a3}"}
    assert s.claim("me", {"a": 5, "b": 5}, 10).id == a2  # a3's group is still busy with a1
    assert s.finish(a1, "me", "cancelled", 130)
    assert s.get_run(a1)["reason"] == f"superseded by run {a3}"
    assert s.claim("me", {"a": 5, "b": 5}, 10).id == a3
    assert not s.finish(a3, "someone-else", "success", 0)  # not their lease
    # A pipeline this daemon does not serve stays queued for a daemon that does.
    (z,), _ = s.enqueue([NewRun("other", "push")])
    assert s.claim("me", {"a": 5, "b": 5}, 10) is None
    assert s.get_run(z)["status"] == "queued"
    assert s.claim("them", {"other": 1}, 10).id == z


def test_heartbeat_with_nothing_running_is_empty_and_recovery_still_runs(store):
    # The idle worker's heartbeat got set() and crashed on .items(): expired leases were never
    # recovered while a daemon was idle.
    assert store.heartbeat("idle", [], 10) == {}
    (rid,), _ = store.enqueue([NewRun("a", "push")])
    store.claim("dead", {"a": 1}, 0.05)
    time.sleep(0.2)
    assert store.expire("idle", set(), 10, lambda holder: False) == [(rid, "interrupted")]


def test_expiry_queues_again_only_runs_known_gone_and_an_owner_that_comes_back_keeps_its_runs(store):
    s = store
    ids, _ = s.enqueue([NewRun("a", "push"), NewRun("a", "push"), NewRun("safe", "push"), NewRun("a", "push")])
    back, late, safe, done = ids
    for _ in ids:
        s.claim("old-daemon", {"a": 5, "safe": 5}, 0.05)
    s.set_lease_pid(safe, "old-daemon", 4242, "1")
    s.finish(done, "old-daemon", "success", 0)
    time.sleep(0.2)
    assert s.heartbeat("old-daemon", [back], 0.05) == {}
    time.sleep(0.2)
    # Only the run whose process (and daemon) is known gone runs again, though all may.
    got = dict(s.expire("me", {"a", "safe"}, 10, lambda holder: holder.pid == 4242))
    assert got == {back: "interrupted", late: "interrupted", safe: "queued"}
    assert s.expire("me", {"a", "safe"}, 10, lambda holder: True) == []  # once
    assert "lease held by old-daemon expired" in s.get_run(back)["reason"]
    assert s.get_run(back)["status"] == s.get_run(late)["status"] == "interrupted"
    assert s.get_run(safe)["attempt"] == 2 and s.get_run(safe)["daemon"] is None
    # The old owner was only cut off: its heartbeat takes `back` again (nobody took it); the
    # re-queued run is no longer its own, and it is told to stop it.
    lost = s.heartbeat("old-daemon", [back, safe], 10)
    assert list(lost) == [safe] and "lease was lost" in lost[safe]
    assert s.get_run(back)["status"] == "running" and s.get_run(back)["reason"] == ""
    assert s.finish(back, "old-daemon", "failed", 1, "boom")
    # It records how `late` ended without a heartbeat first: its result, not the expiry's.
    assert s.finish(late, "old-daemon", "success", 0)
    assert {k: s.get_run(late)[k] for k in ("status", "exit_code", "reason")} == \
        {"status": "success", "exit_code": 0, "reason": ""}
    assert not s.finish(safe, "old-daemon", "success", 0)
    assert s.get_run(safe)["status"] == "queued"
    assert sorted(s.prune(time.time() + 1, keep_last=0)) == [back, late, done]


def test_a_restarted_daemon_recovers_its_own_runs_and_drops_leases_expired_meanwhile(store):
    s = store
    ids, _ = s.enqueue([NewRun("safe", "push"), NewRun("a", "push"), NewRun("a", "push")])
    for _ in ids:
        s.claim("me", {"a": 5, "safe": 5}, 0.05)
    time.sleep(0.2)
    s.heartbeat("me", ids[:2], 10)
    assert s.expire("other", set(), 10, lambda holder: False) == [(ids[2], "interrupted")]
    assert sorted(s.recover("me", {"safe"})) == [(ids[0], "queued"), (ids[1], "interrupted")]
    assert "restarted: me" in s.get_run(ids[1])["reason"]
    assert s.leases_of("me") == []
    assert s.get_run(ids[2])["status"] == "interrupted"
    assert not s.finish(ids[2], "me", "success", 0)


def _push(sha: str, pipeline: str = "app", delivery: str | None = None) -> NewRun:
    return NewRun(pipeline, "push", provider="github", ref="refs/heads/main", branch="main", commit=sha,
                  group=f"{pipeline}/main", delivery=delivery, once=True, event={"sha": sha})


def test_a_delivery_is_one_run_even_when_two_daemons_get_it_at_once(store, second):
    barrier = threading.Barrier(8)
    results = []

    def send(s):
        barrier.wait()
        results.append(s.accept_delivery("github", "d-1", "push", [_push("a" * 40, delivery="d-1")], []))

    threads = [threading.Thread(target=send, args=(s,)) for s in (store, second) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queued = [r for r in results if not r.duplicate]
    assert len(queued) == 1 and len(queued[0].run_ids) == 1
    assert all(r.run_ids == queued[0].run_ids for r in results)
    assert len(store.list_runs()) == 1
    outcomes = sorted(d["outcome"] for d in store.deliveries())
    assert outcomes == ["duplicate"] * 7 + ["queued"]


def test_redelivery_and_a_new_delivery_run_a_failed_commit_again(store):
    s = store
    first = s.accept_delivery("github", "d-1", "push", [_push("b" * 40, delivery="d-1")], [])
    (rid,) = first.run_ids
    # While it is queued, a redelivery is a duplicate.
    assert s.accept_delivery("github", "d-1", "push", [_push("b" * 40, delivery="d-1")], []).duplicate
    s.claim("me", {"app": 1}, 10)
    s.finish(rid, "me", "failed", 1, "boom")
    # GitHub's Redeliver (same id) after a failure queues it again, linked to the failed run.
    again = s.accept_delivery("github", "d-1", "push", [_push("b" * 40, delivery="d-1")], [])
    assert not again.duplicate and len(again.run_ids) == 1
    retry = s.get_run(again.run_ids[0])
    assert retry["retry_of"] == rid and retry["trigger"] == "retry" and retry["commit"] == "b" * 40
    assert s.run_event(retry["id"]) == {"sha": "b" * 40}
    assert "redelivery" in again.reason
    # A new delivery of a commit whose runs all failed runs it again too...
    s.claim("me", {"app": 1}, 10)
    s.finish(retry["id"], "me", "failed", 1)
    newer = s.accept_delivery("github", "d-2", "push", [_push("b" * 40, delivery="d-2")], [])
    assert len(newer.run_ids) == 1
    s.claim("me", {"app": 1}, 10)
    s.finish(newer.run_ids[0], "me", "success", 0)
    # ...but once it succeeded, a new delivery of it is skipped, and says why.
    done = s.accept_delivery("github", "d-3", "push", [_push("b" * 40, delivery="d-3")], [])
    assert done.run_ids == () and done.outcome == "ignored" and "already ran" in done.reason
    # A poll, which sees each commit once, never runs a commit that any run had.
    (c,), _ = s.enqueue([_push("c" * 40)])
    s.claim("me", {"app": 1}, 10)
    s.finish(c, "me", "failed", 1)
    poll = NewRun("app", "poll", ref="refs/heads/main", branch="main", commit="c" * 40, once=True)
    assert s.enqueue([poll]) == ([], [])


def test_a_delivery_keeps_what_it_was_about(store):
    s = store
    about = DeliveryAbout("https://forge.example/acme/app", "#4 feature/y → main", "synchronize")
    s.accept_delivery("github", "d-1", "pull_request", [], ["ignored"], "10.0.0.1", about)
    s.accept_delivery("github", "d-1", "pull_request", [], [], "10.0.0.1", about)  # its duplicate
    s.record_delivery("github", "d-2", "push", "rejected", "signature does not match", 401, "10.0.0.2")
    rows = {(d["delivery_id"], d["outcome"]): d for d in s.deliveries()}
    for key in (("d-1", "ignored"), ("d-1", "duplicate")):
        assert (rows[key]["repository"], rows[key]["ref"], rows[key]["action"]) == \
            ("https://forge.example/acme/app", "#4 feature/y → main", "synchronize")
    assert (rows[("d-2", "rejected")]["repository"], rows[("d-2", "rejected")]["ref"]) == ("", "")


def test_retry(store):
    s = store
    (rid,), _ = s.enqueue([NewRun("app", "push", ref="refs/heads/main", branch="main", commit="d" * 40,
                                  group="app/main", vars={"K": "v"}, withhold_secrets=True,
                                  skip_stages=("push", "deploy"), event={"e": 1})])
    with pytest.raises(StoreError, match="only a run that ended"):
        s.retry(rid)
    s.claim("me", {"app": 1}, 10)
    s.finish(rid, "me", "failed", 1)
    new = s.retry(rid)
    run = s.get_run(new)
    assert (run["retry_of"], run["status"], run["commit"], run["group"]) == (rid, "queued", "d" * 40, "app/main")
    assert run["withhold_secrets"] is True and run["skip_stages"] == ["push", "deploy"]
    claimed = s.claim("me", {"app": 1}, 10)
    assert claimed.vars == {"K": "v"} and claimed.event == {"e": 1}
    assert claimed.withhold_secrets and claimed.skip_stages == ("push", "deploy")
    assert s.retry(10 ** 9) is None


def test_concurrency_limit_and_groups_hold_across_daemons(store, second):
    s = store
    s.enqueue([NewRun("app", "push", group=None) for _ in range(30)])
    s.enqueue([NewRun("grouped", "push", group="g", cancel_in_progress=False) for _ in range(1)])
    running: dict[str, set[int]] = {"app": set(), "grouped": set()}
    lock = threading.Lock()
    worst = {"app": 0, "grouped": 0}
    done = []

    def worker(st, owner):
        while True:
            c = st.claim(owner, {"app": 2, "grouped": 1}, 30)
            if c is None:
                if len(done) >= 31:
                    return
                time.sleep(0.005)
                continue
            with lock:
                running[c.pipeline].add(c.id)
                worst[c.pipeline] = max(worst[c.pipeline], len(running[c.pipeline]))
            time.sleep(0.01)
            with lock:
                running[c.pipeline].discard(c.id)
            assert st.finish(c.id, owner, "success", 0)
            done.append(c.id)

    threads = [threading.Thread(target=worker, args=(st, f"d{i}")) for i, st in enumerate((s, second, s, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(done) == sorted(set(done)) and len(done) == 31  # each run claimed exactly once
    assert worst["app"] <= 2 and worst["grouped"] == 1
    assert len({r["daemon"] for r in s.list_runs(limit=100)}) >= 2  # the work was shared


def test_queue_stats(store):
    s = store
    assert s.queue_stats() == {"by_status": {}, "oldest_queued_age": None}
    s.enqueue([NewRun("a", "push"), NewRun("a", "push")])
    s.claim("me", {"a": 1}, 10)
    time.sleep(0.05)
    stats = s.queue_stats()
    assert stats["by_status"] == {"queued": 1, "running": 1}
    assert stats["oldest_queued_age"] >= 0.04


def test_one_leader_and_failover(store, second):
    assert store.try_lead("a")
    assert store.try_lead("a")  # it stays the leader
    assert not second.try_lead("b")
    store.release_lead()
    assert _soon(lambda: second.try_lead("b"))
    assert not store.try_lead("a")
    second.close()  # the leader's connection goes away: the lock with it
    assert _soon(lambda: store.try_lead("a"))


def _soon(attempt, within: float = 5.0) -> bool:
    """A daemon tries for the lead again every few seconds: the server drops a closed session's
    lock when it notices the disconnect, a moment after the client closed it."""
    deadline = time.monotonic() + within
    while not attempt():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_listen_wakes_another_daemon_when_a_run_is_queued(store, second):
    if store.dialect == "sqlite":
        pytest.skip("SQLite has no notifications: each dispatcher also looks every 0.5 s")
    woke = threading.Event()
    second.listen(woke.set)
    time.sleep(0.5)  # the listener is connected
    woke.clear()
    store.enqueue([NewRun("a", "push")])
    assert woke.wait(5), "no NOTIFY reached the other daemon"
    woke.clear()
    (c,) = [store.claim("me", {"a": 1}, 10)]
    store.finish(c.id, "me", "success", 0)  # a freed slot wakes the others too
    assert woke.wait(5)


def test_schema_is_versioned_and_a_newer_database_is_refused(store, url):
    assert store.schema_version() == migrations.LATEST
    again = open_store(url)  # opening it again applies nothing
    assert again.schema_version() == migrations.LATEST
    with again._tx() as db:
        db.q("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)",
             (migrations.LATEST + 1, "from the future", 0.0))
    again.close()
    with pytest.raises(StoreError, match="newer than this runner knows"):
        open_store(url)


def test_an_old_sqlite_database_is_migrated(tmp_path):
    import sqlite3
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(";\n".join(migrations.SQLITE[0].statements))
    db.execute("INSERT INTO runs (pipeline, status, trigger, created_at) VALUES ('a', 'success', 'push', 1.0)")
    db.execute("INSERT INTO runs (pipeline, status, trigger, ref, commit_sha, created_at) "
               "VALUES ('app', 'success', 'push', 'refs/heads/main', ?, 2.0)", ("e" * 40,))
    db.commit()
    db.close()
    s = open_store(path)
    run = s.list_runs()[-1]
    assert run["pipeline"] == "a" and run["daemon"] is None and run["skip_stages"] == []
    assert s.schema_version() == migrations.LATEST
    # A commit that succeeded before the upgrade is still not run again by a new delivery.
    again = s.accept_delivery("github", "after-upgrade", "push", [_push("e" * 40)], [])
    assert again.run_ids == () and "already ran as run 2 (success)" in again.reason
    s.close()


def test_daemons_opening_a_new_database_at_once_migrate_it_once(url):
    stores, errors = [], []
    barrier = threading.Barrier(4)

    def open_it():
        barrier.wait()
        try:
            stores.append(open_store(url))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with stores[0]._tx() as db:
        assert [r["version"] for r in db.all("SELECT version FROM schema_migrations ORDER BY version")] == \
            list(range(1, migrations.LATEST + 1))
    for s in stores:
        s.close()


def test_a_pipeline_no_live_daemon_serves_fails_its_queued_runs(store, second):
    (gone, kept), _ = store.enqueue([NewRun("removed", "push"), NewRun("app", "push")])
    assert store.fail_unserved(alive_within=10) == []  # no daemon is alive: nobody decides
    store.daemon_seen("a@h:/d", ["app"], 2)
    second.daemon_seen("b@h:/d", ["app", "other"], 1)
    assert {d["owner"] for d in store.daemons()} == {"a@h:/d", "b@h:/d"}
    assert store.fail_unserved(alive_within=10) == [gone]
    run = store.get_run(gone)
    assert run["status"] == "failed" and "configured in none of the daemons running (a, b)" in run["reason"]
    assert store.get_run(kept)["status"] == "queued"
    store.daemon_gone("a@h:/d")
    assert [d["owner"] for d in store.daemons()] == ["b@h:/d"]


def test_deploys_are_the_runs_with_a_deploy_stage_newest_first(store):
    s = store
    ids, _ = s.enqueue([
        NewRun("app", "push", ref="refs/heads/main", branch="main", commit="1" * 40),
        NewRun("app", "rollback", event={"rollback": {"to": None}}),
        NewRun("other", "tag", ref="refs/tags/v1", tag="v1", commit="3" * 40),
        NewRun("app", "push", ref="refs/heads/main", branch="main", commit="4" * 40),
    ])
    deployed, rolled_back, running, built = ids
    claimed = [s.claim("me", {"app": 5, "other": 5}, 10) for _ in ids]
    assert [c.id for c in claimed] == ids
    assert [c.trigger for c in claimed] == ["push", "rollback", "tag", "push"]  # what the worker runs
    s.stage_event(deployed, "build", "success", duration=1.0)
    s.stage_event(deployed, "deploy", "running")
    s.stage_event(deployed, "deploy", "success", duration=2.5, outputs={"what": "deploy", "ok": True})
    s.finish(deployed, "me", "success", 0)
    s.stage_event(rolled_back, "deploy", "running")
    s.stage_event(rolled_back, "deploy", "failed", duration=1.0, error="rollback failed: srv1: refused",
                  outputs={"what": "rollback", "ok": False})
    s.finish(rolled_back, "me", "failed", 1, "rollback failed: srv1: refused")
    s.stage_event(running, "deploy", "running")
    s.stage_event(built, "build", "success")
    got = s.deploys()
    assert [d["run_id"] for d in got] == [running, rolled_back, deployed]
    assert set(got[0]) == {"run_id", "pipeline", "trigger", "status", "stage_status", "commit", "branch", "tag",
                           "started_at", "finished_at", "duration", "error", "outputs"}
    now = {k: got[0][k] for k in ("pipeline", "trigger", "status", "stage_status", "commit", "tag", "finished_at",
                                  "outputs")}
    assert now == {"pipeline": "other", "trigger": "tag", "status": "running", "stage_status": "running",
                   "commit": "3" * 40, "tag": "v1", "finished_at": None, "outputs": None}
    back = got[1]
    assert (back["status"], back["stage_status"], back["error"], back["outputs"]) == (
        "failed", "failed", "rollback failed: srv1: refused", {"what": "rollback", "ok": False})
    assert back["commit"] is None and back["finished_at"] >= back["started_at"]
    first = got[2]
    assert (first["trigger"], first["branch"], first["commit"], first["duration"], first["outputs"]) == (
        "push", "main", "1" * 40, 2.5, {"what": "deploy", "ok": True})
    assert [d["run_id"] for d in s.deploys("app")] == [rolled_back, deployed]
    assert [d["run_id"] for d in s.deploys(limit=1)] == [running]
    assert s.deploys("nothing") == []
    # A rollback run again is a rollback (the worker runs `runner rollback` by the trigger).
    again = s.get_run(s.retry(rolled_back))
    assert (again["trigger"], again["retry_of"]) == ("rollback", rolled_back)
    assert s.run_event(again["id"]) == {"rollback": {"to": None}}


def test_the_runs_page_filters_and_the_deploys_have_indexes(store):
    if store.dialect == "sqlite":
        rows = store._read("SELECT name, tbl_name AS t FROM sqlite_master WHERE type='index'")
    else:
        rows = store._read("SELECT indexname AS name, tablename AS t FROM pg_indexes WHERE schemaname='public'")
    have = {(r["t"], r["name"]) for r in rows}
    assert {("runs", "runs_branch"), ("runs", "runs_trigger"), ("stages", "stages_name")} <= have
    # The filters themselves, over both columns the indexes hold.
    ids, _ = store.enqueue([NewRun("a", "push", branch="main"), NewRun("a", "rollback"),
                            NewRun("a", "manual", branch="main")])
    assert [r["id"] for r in store.list_runs(branch="main")] == [ids[2], ids[0]]
    assert [r["id"] for r in store.list_runs(trigger="rollback")] == [ids[1]]
