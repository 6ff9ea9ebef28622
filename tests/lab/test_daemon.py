"""The daemon's queue over real HTTP, real git repositories and real sqlite: superseding runs,
crash recovery after SIGKILL, polling, the API's token, graceful SIGTERM, the CLI.

Runs are executed by tests/data/daemon/fake_exec.py (a test fixture speaking `runner exec
--json`'s events), so these tests are about queue semantics, not builds; tests/lab/test_daemon_exec.py
drives the real `runner exec`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import (AUTH, TOKEN, api_get, bare_repo, commit, config, daemon_in_process,  # noqa: E402
                     fake_pipeline, push_payload, send_github, wait_for)

from runner.daemon.spawn import daemon_subprocess  # noqa: E402
from runner.daemon.store_sqlite import SqliteStore  # noqa: E402

REPO = "https://git.example.com/me/app.git"
FINAL = ("success", "failed", "invalid", "cancelled", "interrupted")


def _final(get, run_id, timeout=20):
    return wait_for(lambda: (r := get(run_id)) and r["status"] in FINAL and r, timeout, f"run {run_id} to end")


def _api_run(url, run_id):
    r = api_get(url, f"/api/runs/{run_id}")
    return r.json() if r.status_code == 200 else None


# The store's own contract is tests/lab/test_store.py (both backends).


# -- the daemon over HTTP -----------------------------------------------------------------------

def test_newer_push_cancels_the_running_one(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=1.0)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}])
    with daemon_in_process(cfg) as d:
        r1 = send_github(d.url, push_payload(REPO, after="1" * 40), "p-1").json()["runs"][0]
        wait_for(lambda: d.store.get_run(r1)["status"] == "running" and d.store.stages(r1), 10, "run 1 to start")
        r2 = send_github(d.url, push_payload(REPO, after="2" * 40, before="1" * 40), "p-2").json()["runs"][0]
        first = _final(d.store.get_run, r1)
        second = _final(d.store.get_run, r2)
        assert first["status"] == "cancelled" and first["reason"] == f"superseded by run {r2}"
        assert first["exit_code"] == 130
        assert second["status"] == "success", second
        stages = {s["name"]: s["status"] for s in d.store.stages(r1)}
        assert "cancelled" in stages.values()
        # The second run waited for the first to end (one run per branch group at a time);
        # how quickly it then started is measured by bench/webhooks.py, not asserted here.
        assert d.store.stages(r2)[0]["started_at"] >= first["finished_at"]


def test_queue_waits_without_cancelling_when_configured(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=0.3)
    cfg = config(tmp_path, [{"name": "deploy", "file": str(pf), "repo": REPO, "cancel_in_progress": False}])
    with daemon_in_process(cfg) as d:
        ids = [send_github(d.url, push_payload(REPO, after=str(i) * 40), f"q-{i}").json()["runs"][0]
               for i in range(1, 4)]
        runs = [_final(d.store.get_run, i) for i in ids]
        # The running one finished, the middle one was superseded while waiting, the newest ran.
        assert [r["status"] for r in runs] == ["success", "cancelled", "success"], runs
        assert runs[1]["reason"] == f"superseded by run {ids[2]}"


def test_invalid_pipeline_file_fails_the_run_and_the_daemon_keeps_serving(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    good = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "bad", "file": str(bad), "repo": REPO},
                            {"name": "good", "file": str(good), "repo": REPO, "concurrency_group": None}])
    with daemon_in_process(cfg) as d:
        runs = send_github(d.url, push_payload(REPO), "inv-1").json()["runs"]
        got = {d.store.get_run(i)["pipeline"]: _final(d.store.get_run, i) for i in runs}
        assert got["bad"]["status"] == "invalid" and "bad.json" in got["bad"]["reason"]
        assert got["good"]["status"] == "success"
        assert httpx.get(d.url + "/healthz").status_code == 200


def test_api_requires_the_token(tmp_path):
    bare, work = bare_repo(tmp_path)
    head = commit(work, "second")
    pf = fake_pipeline(tmp_path, sleep=2)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": str(bare)}], concurrency=0)
    with daemon_in_process(cfg) as d:
        url = d.url
        assert httpx.post(f"{url}/api/pipelines/app/trigger", json={}).status_code == 401
        assert httpx.post(f"{url}/api/pipelines/app/trigger", json={},
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert d.store.list_runs() == []
        r = httpx.post(f"{url}/api/pipelines/app/trigger", json={"branch": "main", "vars": {"X": "1"}},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        run = r.json()["run"]
        assert run["trigger"] == "manual" and run["commit"] == head and run["status"] == "queued"
        bad = httpx.post(f"{url}/api/pipelines/app/trigger", json={"branch": "--upload-pack=x"},
                         headers={"Authorization": f"Bearer {TOKEN}"})
        assert bad.status_code == 400
        assert httpx.post(f"{url}/api/runs/{run['id']}/cancel").status_code == 401
        assert d.store.get_run(run["id"])["status"] == "queued"
        c = httpx.post(f"{url}/api/runs/{run['id']}/cancel", headers={"Authorization": f"Bearer {TOKEN}"})
        assert c.status_code == 200 and c.json()["cancelled"] is True
        assert d.store.get_run(run["id"])["status"] == "cancelled"
        listed = api_get(url, "/api/runs", pipeline="app", status="cancelled").json()["runs"]
        assert [x["id"] for x in listed] == [run["id"]]
        assert api_get(url, "/api/runs/999").status_code == 404


def test_no_token_configured_means_no_state_changes(tmp_path):
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}], api_token=None)
    with daemon_in_process(cfg) as d:
        r = httpx.post(f"{d.url}/api/pipelines/app/trigger", json={}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 403


def test_polling_notices_a_new_commit_and_skips_commits_already_run(tmp_path):
    bare, work = bare_repo(tmp_path)
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": str(bare),
                             "triggers": {"poll": {"interval": 0.3, "initial": "skip"}}}])
    with daemon_in_process(cfg) as d:
        wait_for(lambda: d.store.poll_state("app"), 10, "the first poll")
        assert d.store.list_runs() == []  # initial: skip -> the existing head is only remembered
        c2 = commit(work, "second")
        run = wait_for(lambda: d.store.list_runs(trigger="poll"), 10, "a poll run")[0]
        assert run["commit"] == c2 and run["branch"] == "main"
        assert _final(d.store.get_run, run["id"])["status"] == "success"
        # A commit that a webhook already ran is not run again by the poll.
        c3 = commit(work, "third", branch="feature")
        r = send_github(d.url, push_payload(str(bare), ref="refs/heads/feature", after=c3), "poll-hook-1")
        # Whichever saw the push first (the poll every 0.3 s, or the webhook) ran it; the other
        # one queued nothing and says why.
        assert r.status_code == 202 or "already ran as run" in r.json()["reason"], r.json()
        wait_for(lambda: "refs/heads/feature" in d.store.poll_state("app"), 10, "the poll to see the branch")
        time.sleep(0.7)
        assert [x["commit"] for x in d.store.list_runs(limit=10)].count(c3) == 1
        # A poll invents no forge event: runner exec is given the run's request, its columns.
        assert d.store.run_event(run["id"]) == {}
        ran = [json.loads(x) for x in (d.work_dir / "fake-runs.jsonl").read_text().splitlines()]
        # previous_status: the entry's previous outcome, for the notifications' `recovered`.
        assert next(x["request"] for x in ran if x["run_id"] == str(run["id"])) == {
            "kind": "poll", "ref": "refs/heads/main", "branch": "main", "commit": c2,
            "previous_status": "none"}


def test_polling_an_unreachable_repository_is_recorded(tmp_path):
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": str(tmp_path / "missing.git"),
                             "triggers": {"poll": {"interval": 0.3}}}])
    with daemon_in_process(cfg) as d:
        def err():
            rows = d.store._read("SELECT error FROM poll_state WHERE pipeline='app'")
            return rows and rows[0]["error"]
        assert "ls-remote failed" in wait_for(err, 10, "a poll error")
        assert httpx.get(d.url + "/healthz").status_code == 200


def test_sigkill_during_a_run_then_restart(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=1.5)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO, "concurrency_group": None}],
                 concurrency=1, lease_seconds=30)
    with daemon_subprocess(tmp_path, cfg, "first") as (proc, url):
        r1 = send_github(url, push_payload(REPO, after="1" * 40), "k-1").json()["runs"][0]
        r2 = send_github(url, push_payload(REPO, after="2" * 40), "k-2").json()["runs"][0]
        wait_for(lambda: _api_run(url, r1)["status"] == "running" and _api_run(url, r1)["stages"], 10)
        assert _api_run(url, r2)["status"] == "queued"  # concurrency 1
        ran = tmp_path / "data" / "work" / "fake-runs.jsonl"
        child = wait_for(lambda: ran.exists() and json.loads(ran.read_text().splitlines()[0])["pid"], 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # The child was told (PR_SET_PDEATHSIG) and stops instead of running on, orphaned.
        wait_for(lambda: not _alive(child), 10, "the orphaned child to stop")
    # Restarted well within the 30 s lease: the daemon knows the lease was its own.
    with daemon_subprocess(tmp_path, cfg, "second") as (proc, url):
        first = _final(lambda i: _api_run(url, i), r1, 10)
        assert first["status"] == "interrupted", first
        assert "interrupted" in first["reason"] and "stopped without finishing" in first["reason"]
        assert _final(lambda i: _api_run(url, i), r2, 20)["status"] == "success"
        lines = [json.loads(x)["run_id"] for x in ran.read_text().splitlines()]
        assert lines.count(str(r1)) == 1 and lines.count(str(r2)) == 1  # nothing ran twice


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (dead) parent's reaper counts as stopped
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_requeue_on_interrupt_runs_it_again_after_restart(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=1.0)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO, "requeue_on_interrupt": True}],
                 lease_seconds=30)
    with daemon_subprocess(tmp_path, cfg, "first") as (proc, url):
        r1 = send_github(url, push_payload(REPO), "rq-1").json()["runs"][0]
        wait_for(lambda: _api_run(url, r1)["stages"], 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with daemon_subprocess(tmp_path, cfg, "second") as (proc, url):
        run = _final(lambda i: _api_run(url, i), r1, 20)
        assert run["status"] == "success" and run["attempt"] == 2


def test_restart_stops_an_orphan_before_running_the_run_again(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=1.5)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO, "requeue_on_interrupt": True,
                             "vars": {"FAKE_IGNORE_INT": "1"}}], lease_seconds=30, grace_period=1)
    ran = tmp_path / "data" / "work" / "fake-runs.jsonl"
    with daemon_subprocess(tmp_path, cfg, "first") as (proc, url):
        r1 = send_github(url, push_payload(REPO), "orphan-1").json()["runs"][0]
        wait_for(lambda: _api_run(url, r1)["stages"], 10)
        child = json.loads(ran.read_text().splitlines()[0])["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    time.sleep(0.3)
    assert _alive(child)  # it ignored the SIGINT its parent's death sent
    with daemon_subprocess(tmp_path, cfg, "second") as (proc, url):
        assert not _alive(child)  # stopped before the daemon served anything
        run = _final(lambda i: _api_run(url, i), r1, 20)
        assert run["status"] == "success" and run["attempt"] == 2


def test_sigterm_is_graceful(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=5)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}], grace_period=0.5)
    with daemon_subprocess(tmp_path, cfg, "term") as (proc, url):
        r1 = send_github(url, push_payload(REPO), "t-1").json()["runs"][0]
        wait_for(lambda: _api_run(url, r1)["stages"], 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    logs = [json.loads(x) for x in (tmp_path / "term.log").read_text().splitlines() if x.startswith("{")]
    assert any(x["msg"] == "daemon stopped" for x in logs)
    s = SqliteStore(tmp_path / "data" / "runner.db")
    run = s.get_run(r1)
    assert run["status"] == "cancelled" and run["reason"] == "the daemon is shutting down"


def test_sigterm_lets_a_short_run_finish_within_the_grace_period(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=0.7)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}], grace_period=10)
    with daemon_subprocess(tmp_path, cfg, "grace") as (proc, url):
        r1 = send_github(url, push_payload(REPO), "g-1").json()["runs"][0]
        wait_for(lambda: _api_run(url, r1)["stages"], 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    s = SqliteStore(tmp_path / "data" / "runner.db")
    assert s.get_run(r1)["status"] == "success"


READ_PATHS = ("/api/runs", "/api/runs/1", "/api/runs/1/logs", "/api/runs/1/stages/build/log",
              "/api/deliveries", "/api/pipelines", "/metrics")


@contextlib.contextmanager
def _daemon_log():
    """The records of the daemon's logger, whatever setup_logging() did to propagation before."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("runner.daemon")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_reading_requires_the_token_by_default(tmp_path):
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}])
    with _daemon_log() as records, daemon_in_process(cfg) as d:
        send_github(d.url, push_payload(REPO), "read-1")
        for i, path in enumerate(READ_PATHS):
            assert httpx.get(d.url + path).status_code == 401, path
            # From an address of its own: 5 wrong tokens from one address and it is refused (429).
            with httpx.Client(transport=httpx.HTTPTransport(local_address=f"127.0.1.{i + 1}")) as guesser:
                assert guesser.get(d.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert httpx.get(d.url + path, headers=AUTH).status_code in (200, 404), path
        assert httpx.get(f"{d.url}/healthz").status_code == 200  # health stays open
    assert not [r for r in records if "READ API OPEN" in r.getMessage()]


def test_no_token_configured_closes_the_read_api(tmp_path):
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}], api_token=None)
    with daemon_in_process(cfg) as d:
        r = httpx.get(f"{d.url}/api/runs")
        assert r.status_code == 403 and "read_requires_token: false" in r.json()["error"]
        assert httpx.get(f"{d.url}/healthz").status_code == 200


def test_an_open_read_api_is_a_loud_warning(tmp_path):
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}], read_requires_token=False)
    with _daemon_log() as records, daemon_in_process(cfg) as d:
        for path in READ_PATHS:
            assert httpx.get(d.url + path).status_code in (200, 404), path
        # Writing still needs the token.
        assert httpx.post(f"{d.url}/api/pipelines/app/trigger", json={}).status_code == 401
    warned = [r for r in records if "READ API OPEN" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    assert "anyone who reaches the listener" in warned[0].getMessage()


def test_cli_runs_logs_cancel(tmp_path):
    from runner.cli.daemon import cancel, logs, runs

    pf = fake_pipeline(tmp_path, sleep=0.1)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}])
    with daemon_in_process(cfg) as d:
        rid = send_github(d.url, push_payload(REPO), "cli-1").json()["runs"][0]
        cli = CliRunner()
        res = cli.invoke(logs, [str(rid), "--server", d.url, "--follow"], env={"RUNNER_TOKEN": ""})
        assert res.exit_code != 0 and "401" in res.output  # reading needs the token
        res = cli.invoke(logs, [str(rid), "--server", d.url, "--follow", "--token", TOKEN])
        assert res.exit_code == 0, res.output
        assert "[checkout] checkout: working" in res.output and f"run {rid}: success" in res.output
        res = cli.invoke(runs, ["--server", d.url], env={"RUNNER_TOKEN": TOKEN})
        assert res.exit_code == 0 and "success" in res.output and "app" in res.output
        assert "DAEMON" in res.output and " test " in res.output  # the name of the daemon that ran it
        res = cli.invoke(runs, ["--server", d.url, "--json", "--status", "success", "--token", TOKEN])
        assert json.loads(res.output)["runs"][0]["id"] == rid
        res = cli.invoke(runs, ["--server", d.url, "--deliveries", "--token", TOKEN])
        assert res.exit_code == 0 and "queued" in res.output and "queued as run" in res.output, res.output
        res = cli.invoke(cancel, [str(rid), "--server", d.url], env={"RUNNER_TOKEN": ""})
        assert res.exit_code != 0 and "token" in res.output
        res = cli.invoke(cancel, [str(rid), "--server", d.url, "--token", TOKEN])
        assert res.exit_code == 0 and "already ended" in res.output


def test_cron_job_and_its_run(tmp_path):
    bare, work = bare_repo(tmp_path)
    head = commit(work, "second")
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": str(bare),
                             "triggers": {"cron": ["0 0 1 1 *"]}}], misfire_grace_time=120)
    with daemon_in_process(cfg) as d:
        job = d.schedules.scheduler.get_job("cron:app:0")
        assert job.misfire_grace_time == 120 and job.coalesce is True and job.max_instances == 1
        (rid,) = d.schedules.cron("app", 0)  # what the scheduler calls when the time comes
        run = _final(d.store.get_run, rid)
        assert run["trigger"] == "cron" and run["commit"] == head and run["status"] == "success"
        (again,) = d.schedules.cron("app", 0)  # a schedule runs even if the commit already ran
        assert _final(d.store.get_run, again)["status"] == "success"
        # A tick is a delivery that says which repository and branch it built, as a push's does.
        (ticked,) = d.schedules.cron("app", 0, tick="2027-01-01T00:00:00Z")
        (row,) = d.store.deliveries(provider="cron")
        assert (row["run_ids"], row["repository"], row["ref"], row["action"]) == \
            ([ticked], str(bare), "refs/heads/main", "")


def test_retention_prunes_runs_and_their_work_dirs(tmp_path):
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}],
                 retention={"days": 0.00001, "keep_last": 1})  # about a second
    with daemon_in_process(cfg) as d:
        ids = [send_github(d.url, push_payload(REPO, after=c * 40), f"ret-{c}").json()["runs"][0] for c in "ab"]
        for i in ids:
            _final(d.store.get_run, i)
        workdir = d.work_dir / "runs" / str(ids[0])
        workdir.mkdir(parents=True)
        time.sleep(1.2)
        assert d.prune() == [ids[0]]  # the newest one is kept (keep_last: 1)
        assert d.store.get_run(ids[0]) is None and not workdir.exists()
        assert d.store.get_run(ids[1])["status"] == "success"


def test_two_daemons_share_one_queue_without_running_anything_twice(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=0.2)
    shared = str(tmp_path / "shared.db")
    pipelines = [{"name": "app", "file": str(pf), "repo": REPO, "concurrency": 4, "concurrency_group": None}]
    cfg_a = config(tmp_path / "a", pipelines, name="a", database=shared, concurrency=1)
    cfg_b = config(tmp_path / "b", pipelines, name="b", database=shared, concurrency=1)
    with daemon_in_process(cfg_a) as a, daemon_in_process(cfg_b) as b:
        ids = [send_github(a.url, push_payload(REPO, after=f"{i + 1:040d}"), f"two-{i}").json()["runs"][0]
               for i in range(6)]
        assert all(_final(a.store.get_run, i)["status"] == "success" for i in ids)
        ran = []
        for d in (a, b):
            f = d.work_dir / "fake-runs.jsonl"
            ran.append([int(json.loads(x)["run_id"]) for x in f.read_text().splitlines()] if f.exists() else [])
        assert sorted(ran[0] + ran[1]) == sorted(ids)  # each run ran exactly once
        assert ran[0] and ran[1], ran  # and both daemons took work


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB filesystem (tmpfs) to fill up; needs root (mount)."""
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_writing_logs(tmp_path, small_disk):
    pf = fake_pipeline(tmp_path, sleep=0.01)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO, "vars": {"FAKE_LINES": "3000"}}],
                 data_dir=str(small_disk / "data"), disk_reserve_bytes=512 * 1024)
    with daemon_in_process(cfg) as d:
        assert (small_disk / "data" / "disk-reserve").exists()
        rid = send_github(d.url, push_payload(REPO), "full-1").json()["runs"][0]
        run = _final(d.store.get_run, rid, timeout=60)
        # The run's own outcome is kept; the reason says the log is incomplete and why.
        assert run["status"] == "success", run
        assert "log incomplete" in run["reason"] and "full" in run["reason"], run["reason"]
        assert not (small_disk / "data" / "disk-reserve").exists()  # given back to record that
        assert httpx.get(d.url + "/healthz").status_code == 200
        # A delivery that cannot be recorded is answered 503 with the reason (or, if sqlite still
        # found room, accepted): never a crash, never a run without its row.
        r = send_github(d.url, push_payload(REPO, after="f" * 40), "full-2")
        assert r.status_code in (202, 503), r.text
        if r.status_code == 503:
            assert "cannot record" in r.json()["reason"]


def test_polling_an_empty_repository_then_the_first_push_runs(tmp_path):
    from harness import git
    bare = tmp_path / "empty.git"
    git("init", "--bare", "-b", "main", str(bare))
    work = tmp_path / "w"
    git("init", "-b", "main", str(work))
    git("remote", "add", "origin", str(bare), cwd=work)
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": str(bare),
                             "triggers": {"poll": {"interval": 0.3}}}])  # initial: skip (default)
    with daemon_in_process(cfg) as d:
        wait_for(lambda: d.store.has_poll_state("app"), 10, "a first successful poll")
        sha = commit(work, "first ever")
        run = wait_for(lambda: d.store.list_runs(trigger="poll"), 10, "the first push to be run")[0]
        assert run["commit"] == sha


# -- polls as deliveries ------------------------------------------------------------------------

def _poll_deliveries(d) -> list[dict]:
    return list(reversed(d.store.deliveries(provider="poll")))  # oldest first


def test_poll_outcomes_are_deliveries(tmp_path):
    from harness import git
    bare, work = bare_repo(tmp_path)
    first = git("rev-parse", "HEAD", cwd=work)
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": str(bare),
                             "triggers": {"push": {"branches": ["main"]}, "poll": {"interval": 0.3}}}])
    with daemon_in_process(cfg) as d:
        # The first poll (initial: skip) says why the head it found did not run.
        (skip,) = wait_for(lambda: _poll_deliveries(d), 10, "the first poll's delivery")
        assert (skip["outcome"], skip["event"], skip["run_ids"]) == ("ignored", "app", [])
        assert skip["reason"] == f"refs/heads/main: {first[:12]} was there at the first poll " \
                                 "(triggers.poll.initial: skip)"
        assert skip["delivery_id"].startswith("app:") and skip["remote"] == str(bare)
        # What it was about, as a push's delivery says it: the repository and the refs that moved.
        assert (skip["repository"], skip["ref"], skip["action"]) == (str(bare), "refs/heads/main", "created")
        c2 = commit(work, "second")
        queued = wait_for(lambda: _poll_deliveries(d)[1:], 10, "a poll that queues")[0]
        (run,) = d.store.list_runs(trigger="poll")
        assert (queued["outcome"], queued["run_ids"], run["commit"]) == ("queued", [run["id"]], c2)
        assert f"queued as run {run['id']}" in queued["reason"]
        assert (queued["repository"], queued["ref"], queued["action"]) == (str(bare), "refs/heads/main", "")
        commit(work, "elsewhere", branch="feature/x")
        ignored = wait_for(lambda: _poll_deliveries(d)[2:], 10, "a poll that ignores")[0]
        assert ignored["outcome"] == "ignored" and ignored["reason"] == \
            "refs/heads/feature/x: branch 'feature/x' matches none of triggers.push.branches ['main']"
        time.sleep(1.0)  # three polls that see nothing move record nothing
        assert len(_poll_deliveries(d)) == 3
        # An unreachable repository: one error delivery for as long as the error stays the same.
        bare.rename(tmp_path / "away.git")
        error = wait_for(lambda: _poll_deliveries(d)[3:], 10, "a failed poll")[0]
        assert (error["outcome"], error["status_code"]) == ("error", 0)
        assert (error["repository"], error["ref"]) == (str(bare), "")  # no ref was read
        assert "ls-remote failed" in error["reason"]
        time.sleep(1.0)
        assert len(_poll_deliveries(d)) == 4
        (tmp_path / "away.git").rename(bare)  # back, unchanged: nothing to say
        wait_for(lambda: not d.store.poll_error("app"), 10, "a poll that works again")
        time.sleep(0.7)
        assert len(_poll_deliveries(d)) == 4
        assert _final(d.store.get_run, run["id"])["status"] == "success"


# -- rollback runs ------------------------------------------------------------------------------

def test_a_rollback_waits_for_the_running_deploy_instead_of_cancelling_it(tmp_path):
    from runner.errors import InvalidInput

    pf = fake_pipeline(tmp_path, sleep=1.0)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO,
                             "triggers": {"push": {"branches": ["main"]}}}])
    with daemon_in_process(cfg) as d:
        with pytest.raises(InvalidInput, match="is not a position"):
            d.trigger_rollback("app", "main")
        with pytest.raises(InvalidInput, match="no pipeline"):
            d.trigger_rollback("nope", None)
        push = send_github(d.url, push_payload(REPO, after="1" * 40), "rb-1").json()["runs"][0]
        wait_for(lambda: d.store.get_run(push)["status"] == "running" and d.store.stages(push), 10, "the push run")
        rb = d.trigger_rollback("app", "1")
        queued = d.store.get_run(rb)
        assert (queued["trigger"], queued["group"], queued["status"]) == ("rollback", "app/main", "queued")
        assert d.store.run_event(rb) == {"rollback": {"to": "1"}}
        assert _final(d.store.get_run, push)["status"] == "success"  # not cancelled
        # The fake pipeline file is no pipeline `runner rollback` can read: the run is invalid,
        # with the command's reason, recorded as its deploy stage.
        run = _final(d.store.get_run, rb, timeout=60)
        assert run["status"] == "invalid" and run["exit_code"] == 2, run
        assert "pipeline is invalid" in run["reason"] and "missing required field 'image'" in run["reason"], run
        assert run["started_at"] >= d.store.get_run(push)["finished_at"]
        (stage,) = d.store.stages(rb)
        assert stage["name"] == "deploy" and stage["status"] == "failed" and stage["error"] == run["reason"]
        assert d.store.logs(rb, stage="deploy")
        assert [x["run_id"] for x in d.store.deploys("app")] == [rb]


def test_deploy_twice_then_a_rollback_run_on_the_lab(lab, app, tmp_path):
    """Two pushes deploy v1 then v2 to two lab servers through the daemon (the real `runner exec`);
    a rollback run (`runner rollback`) brings both back to v1's digest."""
    from tests.helpers import commit_files, make_repo
    from tests.lab.deploy_fixtures import _get, _port

    name, _ = app
    port = _port()
    servers = lab["servers"][:2]
    dockerfile = ('FROM local/busybox:1\nCOPY www /www\nEXPOSE 8080\n'
                  'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]\n')
    pipeline = {
        "version": 1, "name": name, "repository": {"url": "."},
        "image": {"name": f"{lab['registry']}/daemon-rollback/{name}"},
        "stages": {"deploy": {
            "servers": [f"{s['user']}@{s['host']}:{s['port']}" for s in servers],
            "ssh": {"key_file": servers[0]["key_file"], "known_hosts": servers[0]["known_hosts"],
                    "connect_timeout": 5},
            "container": {"name": name, "ports": [f"{port}:8080"], "stop_timeout": 2},
            "healthcheck": {"http": {"port": 8080, "path": "/health"}, "timeout": 20, "probe_interval": 0.2}}}}
    # The same pipeline committed in the repository, for the `pipeline:` entry's rollback below.
    repo = make_repo(tmp_path / "repo", {"Dockerfile": dockerfile, "www/index.html": "v1\n", "www/health": "ok\n",
                                         ".runner.yaml": json.dumps(pipeline)})
    from harness import git
    v1 = git("rev-parse", "HEAD", cwd=repo)
    p = tmp_path / "pipeline.yaml"
    p.write_text(json.dumps({**pipeline, "repository": {"url": str(repo)}}))  # JSON is YAML
    cfg = config(tmp_path, [{"name": "app", "file": str(p), "repo": str(repo),
                             "triggers": {"push": {"branches": ["main"]}}},
                            {"name": "in-repo", "pipeline": ".runner.yaml", "repo": str(repo),
                             "servers": [s["host"] for s in servers], "triggers": {"push": None}}])
    cfg.pop("exec_command")  # the real `runner exec`
    with daemon_in_process(cfg) as d:
        digests, commits = [], []
        for i, sha in enumerate((v1, None)):
            sha = sha or commit_files(repo, {"www/index.html": "v2\n"}, "v2")
            commits.append(sha)
            rid = send_github(d.url, push_payload(str(repo), after=sha), f"rb-lab-{i}").json()["runs"][0]
            run = _final(d.store.get_run, rid, timeout=180)
            assert run["status"] == "success", (run, d.store.logs(rid)[-30:])
            digests.append(d.store.deploys("app", limit=1)[0]["outputs"]["servers"][0]["digest"])
        assert [_get(s["host"], port) for s in servers] == ["v2", "v2"]
        rb = d.trigger_rollback("app", None)  # the newest verified release before v2
        run = _final(d.store.get_run, rb, timeout=120)
        assert run["status"] == "success" and run["trigger"] == "rollback", (run, d.store.logs(rb)[-30:])
        (stage,) = d.store.stages(rb)
        out = stage["outputs"]
        assert stage["name"] == "deploy" and stage["status"] == "success" and stage["duration"] > 0
        assert out["what"] == "rollback" and out["ok"] is True, out
        assert [s["digest"] for s in out["servers"]] == [digests[0]] * 2 != [digests[1]] * 2
        assert any("rolling back to" in x["line"] for x in d.store.logs(rb, stage="deploy"))
        assert [_get(s["host"], port) for s in servers] == ["v1", "v1"]
        listed = d.store.deploys("app")
        assert [(x["run_id"], x["trigger"]) for x in listed][0] == (rb, "rollback") and len(listed) == 3
        # Cancelled while it waits for the deploy lock (held here, as by another deploy): the
        # worker's SIGINT stops `runner rollback`, which exits 130; nothing was changed.
        from deployers import lock as locks
        from deployers.ssh_docker import SSHDockerDeployer
        from runner.pipeline_file import open_pipeline

        opened = open_pipeline(p, {})
        holder = SSHDockerDeployer(opened.pipeline.stages.deploy, pipeline=name,
                                   image_name=opened.pipeline.image.name, run_id="holder")
        conn = holder.connection(holder.targets[0])
        lease = locks.acquire(conn, f"{holder.runner_dir(conn)}/locks", holder.app, locks.holder_info("test-holder"),
                              ttl=60, wait=5)
        try:
            waiting = d.trigger_rollback("app", None)
            wait_for(lambda: any("waiting up to" in x["line"] for x in d.store.logs(waiting)), 60,
                     "the rollback to wait for the lock", every=0.1)
            d.cancel(waiting, "cancelled by the test")
            run = _final(d.store.get_run, waiting, timeout=30)
        finally:
            lease.release()
            holder.close()
        assert run["status"] == "cancelled" and run["exit_code"] == 130, (run, d.store.logs(waiting)[-10:])
        assert {s["name"]: s["status"] for s in d.store.stages(waiting)} == {"deploy": "cancelled"}
        assert [_get(s["host"], port) for s in servers] == ["v1", "v1"]
        # The `pipeline:` entry's rollback: the release (v2, the newest verified other than v1)
        # is chosen with .runner.yaml at main's head, and rolled back with it as committed at v2.
        rb = d.trigger_rollback("in-repo", None)
        run = _final(d.store.get_run, rb, timeout=120)
        logs = "\n".join(x["line"] for x in d.store.logs(rb, stage="deploy"))
        assert run["status"] == "success", (run, logs)
        assert f"with .runner.yaml as committed at {commits[1][:12]} (that release's commit)" in logs, logs
        assert [_get(s["host"], port) for s in servers] == ["v2", "v2"]
