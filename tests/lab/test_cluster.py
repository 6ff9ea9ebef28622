"""Several `runner daemon` processes on loopback sharing one PostgreSQL database (the lab's, a
fresh database per test): one run per delivery even when a delivery reaches two daemons, each run
executed once, a SIGKILLed daemon's runs recovered by another, cron once per tick, and the
leadership taken over when the leader is killed."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import FAKE_EXEC, TOKEN, config, fake_pipeline, push_payload, send_github, wait_for  # noqa: E402

from runner.daemon.spawn import start_daemon, stop_daemon  # noqa: E402
from runner.daemon.store import FINAL, open_store  # noqa: E402

REPO = "https://git.example.com/me/app.git"

# A run that only says it ran: appends its run id to ran.txt in the daemon's data directory
# (its working directory). The script is this test's own constant; the run's argv follows it.
SH_EXEC = ["/bin/sh", "-c", 'while [ $# -gt 0 ] && [ "$1" != --run-id ]; do shift; done; echo "$2" >> ran.txt',
           "sh"]


@pytest.fixture
def cluster(tmp_path, pg_url):
    """start(name, pipelines, **config) -> (process, url, data dir); every daemon stopped at the end."""
    started: list = []

    def start(name: str, pipelines: list[dict], **over):
        cfg = config(tmp_path / name, pipelines, name=name, database=pg_url, **over)
        (tmp_path / name).mkdir(exist_ok=True)
        proc, url = start_daemon(tmp_path / name, cfg, name)
        started.append(proc)
        return proc, url, Path(cfg["data_dir"])

    yield start
    # All at once: each daemon's graceful stop takes a second or two of its own.
    stoppers = [threading.Thread(target=stop_daemon, args=(proc,), kwargs={"timeout": 10})
                for proc in started]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()


@pytest.fixture
def store(pg_url):
    s = open_store(pg_url)
    yield s
    s.close()


def _ran(data_dir: Path) -> list[int]:
    f = data_dir / "ran.txt"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def test_500_deliveries_over_three_daemons_become_one_run_each_executed_once(cluster, store):
    pipelines = [{"name": "app", "file": "/dev/null", "repo": REPO, "concurrency": 6, "concurrency_group": None}]
    daemons = [cluster(n, pipelines, concurrency=3, exec_command=SH_EXEC) for n in ("a", "b", "c")]
    clients = [httpx.Client(base_url=url, timeout=20) for _, url, _ in daemons]
    answers: dict[str, list[httpx.Response]] = {}
    lock = threading.Lock()

    def deliver(t: int, i: int) -> None:
        r = send_github(str(clients[t].base_url), push_payload(REPO, after=f"{i + 1:040x}"), f"d-{i}",
                        client=clients[t])
        with lock:
            answers.setdefault(f"d-{i}", []).append(r)

    def send(k: int) -> None:
        for i in range(k, 500, 10):
            targets = [i % 3] + ([(i + 1) % 3] if i % 5 == 0 else [])  # every fifth goes to two daemons
            twins = [threading.Thread(target=deliver, args=(t, i)) for t in targets]
            for t in twins:
                t.start()
            for t in twins:
                t.join()

    senders = [threading.Thread(target=send, args=(k,)) for k in range(10)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    assert len(answers) == 500
    for delivery, rs in answers.items():
        assert all(r.status_code in (200, 202) for r in rs), (delivery, [r.text for r in rs])
        queued = [r for r in rs if r.json()["outcome"] == "queued"]
        assert len(queued) == 1, (delivery, [r.json() for r in rs])
        assert all(r.json()["runs"] == queued[0].json()["runs"] for r in rs)  # the duplicate names the same run

    def all_final():
        runs = store.list_runs(limit=1000)
        return len(runs) == 500 and all(r["status"] in FINAL for r in runs) and runs

    runs = wait_for(all_final, 180, "500 runs to end", every=0.5)
    assert {r["status"] for r in runs} == {"success"}
    assert sorted(r["delivery"] for r in runs) == sorted(answers)  # one run per delivery
    ran = [i for _, _, data in daemons for i in _ran(data)]
    assert sorted(ran) == sorted(r["id"] for r in runs)  # each run executed exactly once
    by_daemon = {r["daemon"].split("@")[0] for r in runs}
    assert by_daemon == {"a", "b", "c"}, by_daemon
    # `runner runs --daemons` on any of them lists the three; exactly one leads.
    from click.testing import CliRunner

    from runner.cli.daemon import runs as runs_cli
    out = CliRunner().invoke(runs_cli, ["--server", daemons[1][1], "--daemons", "--token", TOKEN])
    assert out.exit_code == 0, out.output
    assert {line.split("@")[0] for line in out.output.splitlines()[1:]} == {"a", "b", "c"}, out.output
    assert "(this one)" in next(line for line in out.output.splitlines() if line.startswith("b@"))
    leaders = [httpx.get(url + "/healthz").json()["leader"] for _, url, _ in daemons]
    assert leaders.count(True) == 1, leaders
    for c in clients:
        c.close()


def test_a_sigkilled_daemon_s_runs_are_recovered_by_another(cluster, store, tmp_path):
    # Long enough that a's runs are still running once b is up, even on a loaded machine (with
    # 6 s, a once finished its run before the kill while b was still starting).
    slow = fake_pipeline(tmp_path, sleep=15.0, stages=("build",))
    pipelines = [{"name": "safe", "file": str(slow), "repo": REPO, "requeue_on_interrupt": True,
                  "concurrency_group": None},
                 {"name": "once", "file": str(slow), "repo": REPO + "-once", "concurrency_group": None}]
    over = {"lease_seconds": 2, "exec_command": FAKE_EXEC}
    a, url_a, _ = cluster("a", pipelines, **over)
    safe = send_github(url_a, push_payload(REPO, after="1" * 40), "k-1").json()["runs"][0]
    once = send_github(url_a, push_payload(REPO + "-once", after="2" * 40), "k-2").json()["runs"][0]
    wait_for(lambda: all((store.get_run(i) or {}).get("status") == "running" for i in (safe, once)), 20,
             "both runs running on a")
    b, url_b, _ = cluster("b", pipelines, **over)
    assert all(store.get_run(i)["status"] == "running" for i in (safe, once)), \
        "a's runs ended before the kill: the test's premise does not hold"
    os.kill(a.pid, signal.SIGKILL)
    killed = time.monotonic()
    # a's runs read their pipeline when they started; the re-run on b has only to run to its
    # end, which need not take another 15 s (b claims it after the lease, 2 s, at the earliest).
    fake_pipeline(tmp_path, sleep=0.5, stages=("build",))
    a.wait()
    # Within the lease (2 s) and one recovery round, b takes them over: the requeueable run is
    # queued again and runs to the end on b; the other is marked interrupted with the reason.
    interrupted = wait_for(lambda: (r := store.get_run(once))["status"] == "interrupted" and r, 15,
                           "the run to be recovered")
    assert "lease held by a@" in interrupted["reason"] and "expired" in interrupted["reason"]
    recovered_after = time.monotonic() - killed
    done = wait_for(lambda: (r := store.get_run(safe))["status"] in FINAL and r, 30, "the re-queued run to end")
    assert done["status"] == "success" and done["attempt"] == 2 and done["daemon"].startswith("b@"), done
    assert recovered_after < 2 * 2 + 2, recovered_after  # the lease, one heartbeat round, and slack
    # b counts what it recovered, and the leadership it took over from a.
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url_b + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("runner_lease_recoveries_total", (("status", "interrupted"),))] == 1
    assert samples[("runner_lease_recoveries_total", (("status", "queued"),))] == 1
    assert samples[("runner_runs_total", (("pipeline", "safe"), ("status", "success")))] == 1


def test_cron_fires_once_per_tick_across_three_daemons(cluster, store, tmp_path):
    pf = fake_pipeline(tmp_path, sleep=0.0)
    pipelines = [{"name": "nightly", "file": str(pf), "repo": REPO, "concurrency_group": None, "concurrency": 10,
                  "triggers": {"push": None, "cron": ["* * * * * *"]}}]  # every second
    for n in ("a", "b", "c"):
        cluster(n, pipelines, exec_command=FAKE_EXEC, concurrency=4)
    time.sleep(6)
    ticks = [d for d in store.deliveries(limit=1000) if d["provider"] == "cron"]
    queued = [d for d in ticks if d["outcome"] == "queued"]
    assert len(queued) >= 3, ticks
    keys = [d["delivery_id"] for d in queued]
    assert len(keys) == len(set(keys))  # never two runs for one tick
    runs = store.list_runs(trigger="cron", limit=1000)
    assert len(runs) == len(queued)
    assert len({d["remote"] for d in queued}) == 1  # one daemon, the leader, fired them


def test_the_leader_killed_another_takes_over_the_schedules(cluster, store, tmp_path):
    pf = fake_pipeline(tmp_path, sleep=0.0)
    pipelines = [{"name": "nightly", "file": str(pf), "repo": REPO, "concurrency_group": None, "concurrency": 10,
                  "triggers": {"push": None, "cron": ["* * * * * *"]}}]
    procs = {n: cluster(n, pipelines, exec_command=FAKE_EXEC, lease_seconds=1.5)[0] for n in ("a", "b", "c")}
    leader = wait_for(store.leader, 10, "a leader")
    name = leader.split("@")[0]
    os.kill(procs[name].pid, signal.SIGKILL)
    procs[name].wait()
    killed = time.time()
    new = wait_for(lambda: (who := store.leader()) and who != leader and who, 10, "another leader")
    assert new.split("@")[0] in set(procs) - {name}
    # The new leader fires the schedule from then on.
    wait_for(lambda: [d for d in store.deliveries(limit=1000) if d["provider"] == "cron" and d["outcome"] == "queued"
                      and d["remote"].split("@")[0] == new.split("@")[0] and d["received_at"] > killed], 10,
             "a tick fired by the new leader")


def test_a_database_the_daemon_cannot_reach_is_a_clear_error(tmp_path, lab_database_url):
    import subprocess

    import yaml
    from urllib.parse import urlsplit
    wrong = urlsplit(lab_database_url)._replace(netloc="runner:not-the-password-x9@127.0.0.1:55432").geturl()
    cfg = config(tmp_path, [], database=wrong)
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "runner", "daemon", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "database: cannot connect to postgresql://runner@127.0.0.1:55432/runner" in proc.stderr, proc.stderr
    assert "password authentication failed" in proc.stderr
    assert "not-the-password-x9" not in proc.stderr + proc.stdout


def test_a_leader_that_hangs_loses_the_leadership_and_knows_it_when_it_wakes(cluster, store, tmp_path):
    pf = fake_pipeline(tmp_path, sleep=0.0)
    pipelines = [{"name": "nightly", "file": str(pf), "repo": REPO, "concurrency_group": None, "concurrency": 10,
                  "triggers": {"push": None, "cron": ["* * * * * *"]}}]
    daemons = {n: cluster(n, pipelines, exec_command=FAKE_EXEC, lease_seconds=1.5) for n in ("a", "b")}
    leader = wait_for(store.leader, 10, "a leader")
    name = leader.split("@")[0]
    proc, url, _ = daemons[name]
    os.kill(proc.pid, signal.SIGSTOP)  # its connections stay open: only the server's timeout helps
    try:
        new = wait_for(lambda: (who := store.leader()) and who != leader and who, 15, "another leader")
        stopped = time.time()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # Woken, it finds its session gone and stops scheduling: the other one alone fires the ticks.
    wait_for(lambda: httpx.get(url + "/healthz", timeout=5).json()["leader"] is False, 15,
             "the woken daemon to know it no longer leads")
    time.sleep(2.5)
    later = [d for d in store.deliveries(limit=1000) if d["provider"] == "cron" and d["outcome"] == "queued"
             and d["received_at"] > stopped + 1.5]
    assert later and {d["remote"].split("@")[0] for d in later} == {new.split("@")[0]}, later
