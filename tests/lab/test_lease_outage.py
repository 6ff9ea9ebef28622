"""A PostgreSQL outage under two `runner daemon` processes: the database, a PRIVATE cluster of
this test (initdb as the postgres user on a free loopback port; the lab's shared one is never
touched), is stopped by its pid (SIGINT, PostgreSQL's fast shutdown) while both daemons run a
run, and started again after the runs have ended. Each run is recorded once with how it really
ended (never interrupted, never executed twice, although its pipeline re-queues interrupted
runs), and a webhook that arrives meanwhile gets its 503 within 3 s, naming neither the
database's host nor its user (the daemon's log does)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import FAKE_EXEC, config, fake_pipeline, push_payload, send_github, wait_for  # noqa: E402

from runner.daemon.spawn import free_port, start_daemon, stop_daemon  # noqa: E402
from runner.daemon.store import FINAL  # noqa: E402
from runner_lab import layout  # noqa: E402

REPO = "https://git.example.com/me/app.git"
USER = "outage_owner"  # the private cluster's superuser: a name the answers must not contain


class PrivatePostgres:
    """A throwaway cluster (trust login on 127.0.0.1 only), started and stopped by its pid."""

    def __init__(self):
        # Not under tmp_path: the postgres user must reach the data directory, and pytest's
        # directories are root's alone.
        self.dir = Path(tempfile.mkdtemp(prefix="runner-outage-pg-"))
        owner = pwd.getpwnam(layout.POSTGRES_OS_USER)
        os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen | None = None
        subprocess.run(layout.runuser_argv([str(layout.POSTGRES_BIN / "initdb"), "-D", str(self.data), "-U", USER,
                                            "--auth=trust", "--no-locale", "--encoding=UTF8", "--no-sync",
                                            "--no-instructions"]),
                       check=True, capture_output=True, timeout=120, cwd=self.dir)

    def start(self) -> None:
        with open(self.dir / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(layout.POSTGRES_BIN / "postgres"), "-D", str(self.data), "-c", f"port={self.port}",
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                 "-c", "fsync=off"],
                stdout=log, stderr=subprocess.STDOUT, user=layout.POSTGRES_OS_USER, cwd=self.dir)
        import psycopg

        def answers():
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
                return True
            except psycopg.Error:
                assert self.proc.poll() is None, (self.dir / "postgres.log").read_text()[-2000:]
                return False

        wait_for(answers, 30, "the private PostgreSQL to answer", every=0.1)

    def stop(self) -> None:
        """Fast shutdown by the postmaster's pid: every session is ended at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)

    def remove(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres():
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()


def _executions(*data_dirs: Path) -> Counter:
    """Run id -> how many times the fake `runner exec` started it (it appends a line each time)."""
    seen: Counter = Counter()
    for d in data_dirs:
        f = d / "work" / "fake-runs.jsonl"
        if f.exists():
            seen.update(int(json.loads(line)["run_id"]) for line in f.read_text().splitlines())
    return seen


def test_runs_that_end_during_a_database_outage_are_recorded_once_as_they_ended(postgres, tmp_path):
    from runner.daemon.store import open_store

    slow = fake_pipeline(tmp_path, sleep=3.0, stages=("build",))
    pipelines = [{"name": "safe", "file": str(slow), "repo": REPO, "requeue_on_interrupt": True,
                  "concurrency": 2, "concurrency_group": None}]
    daemons = {}
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            cfg = config(tmp_path / name, pipelines, name=name, database=postgres.url, concurrency=1,
                         lease_seconds=2, exec_command=FAKE_EXEC)
            daemons[name] = (*start_daemon(tmp_path / name, cfg, name), Path(cfg["data_dir"]))
        url_a = daemons["a"][1]
        runs = [send_github(url_a, push_payload(REPO, after=c * 40), f"d-{c}").json()["runs"][0] for c in "12"]
        store = open_store(postgres.url)
        try:
            def both_running():
                got = [store.get_run(i) for i in runs]
                return all(r["status"] == "running" for r in got) and got

            running = wait_for(both_running, 20, "a run running on each daemon")
        finally:
            store.close()
        assert {r["daemon"].split("@")[0] for r in running} == {"a", "b"}, running

        postgres.stop()
        # The runs end (3 s each) while the database is down; heartbeats fail meanwhile.
        time.sleep(4)
        began = time.monotonic()
        answer = send_github(url_a, push_payload(REPO, after="3" * 40), "d-3")
        took = time.monotonic() - began
        time.sleep(4)  # four lease times of silence in all
        postgres.start()

        store = open_store(postgres.url)
        try:
            ended = wait_for(lambda: all((r := store.get_run(i))["status"] in FINAL for i in runs) and
                             [store.get_run(i) for i in runs], 30, "both runs to be recorded")
            time.sleep(3)  # a re-queued run would be claimed and started again by now
            ended = [store.get_run(i) for i in runs]
        finally:
            store.close()
        for run in ended:
            assert (run["status"], run["exit_code"], run["attempt"]) == ("success", 0, 1), run
            assert "interrupted" not in run["reason"] and "re-queued" not in run["reason"], run
        assert _executions(*(d for _, _, d in daemons.values())) == Counter(runs)

        assert answer.status_code == 503, answer.text
        assert took < 3.0, took
        for secret in ("127.0.0.1", str(postgres.port), USER, "postgresql://"):
            assert secret not in answer.text, answer.text
            # A run's reason (read through the API) may say its log is incomplete, never where
            # the database is.
            for run in ended:
                assert secret not in (run["reason"] or ""), run
        # The daemon's log says which database it could not reach.
        log_a = (tmp_path / "a" / "a.log").read_text()
        assert any("cannot record a delivery" in line and f"127.0.0.1:{postgres.port}" in line
                   for line in log_a.splitlines())
    finally:
        for proc, _, _ in daemons.values():
            stop_daemon(proc, timeout=10)
