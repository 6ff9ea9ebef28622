"""The lab's PostgreSQL (issue 11), the real cluster the session `lab` fixture brought up (its
layout: tests/unit/test_lab_postgres.py): RUNNER_DATABASE_URL of `runner lab env` logs
in and the server is PostgreSQL 15 on 127.0.0.1:55432; the process in state.json is the
postmaster; only the role's own password gets in; `pg_url` gives each test an empty database of
its own; a postmaster killed with SIGKILL is started again by `runner lab up`, with its data.

No test runs `lab down` (the session shares one lab); whatever a test creates it removes."""

from __future__ import annotations




import json

import os

import pwd

import signal


import time

from pathlib import Path

import psycopg

import pytest

from runner_lab import host, layout

from tests.lab.db_fixtures import fresh_database

from tests.helpers import lab_cli, lab_env_printed



_runner = lab_cli



def _state(lab: dict) -> Path:
    return Path(lab["servers"][0]["key_file"]).parent.parent



def _record(lab: dict) -> dict:
    return json.loads((_state(lab) / "state.json").read_text())["procs"]["postgres"]



_env = lab_env_printed



def test_env_url_logs_in_to_postgresql_15_on_the_lab_port(lab):
    url = _env()["RUNNER_DATABASE_URL"]
    pw_file = Path(lab["database"]["password_file"])
    assert pw_file.stat().st_mode & 0o777 == 0o600
    assert url == lab["database_url"] == \
        f"postgresql://runner:{pw_file.read_text().strip()}@127.0.0.1:55432/runner"
    status = _runner("status", "--json")
    assert json.loads(status.stdout)["database_url"] == url
    with psycopg.connect(url, connect_timeout=5) as conn:
        version, = conn.execute("SELECT version()").fetchone()
        assert version.startswith("PostgreSQL 15."), version
        row = conn.execute("SELECT current_user, current_database(), host(inet_server_addr()), "
                           "inet_server_port(), current_setting('max_connections')").fetchone()
        assert row == ("runner", "runner", "127.0.0.1", 55432, "200")
        role = conn.execute("SELECT rolcreatedb, rolsuper FROM pg_roles "
                            "WHERE rolname = current_user").fetchone()
        assert role == (True, False)



def test_the_recorded_process_is_the_postmaster(lab):
    rec = _record(lab)
    assert host.alive(rec)
    assert host.cmdline(rec) == rec["argv"] == layout.postgres_argv(_state(lab))
    assert os.stat(f"/proc/{rec['pid']}").st_uid == pwd.getpwnam("postgres").pw_uid
    lock = (layout.postgres_data(_state(lab)) / "postmaster.pid").read_text().splitlines()
    assert int(lock[0]) == rec["pid"]
    with psycopg.connect(lab["database_url"]) as conn:
        backend, = conn.execute("SELECT pg_backend_pid()").fetchone()
        status = Path(f"/proc/{backend}/status").read_text()
    ppid = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:"))
    assert int(ppid) == rec["pid"]



def test_only_the_roles_own_password_gets_in(lab):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(lab["database_url"].replace("runner:", "runner:x", 1), connect_timeout=5)
    # the superuser has no password: not over TCP
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=55432, user="postgres", password="postgres",
                        dbname="postgres", connect_timeout=5)
    # the socket is the superuser's only (peer login), not the role's
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(host=str(layout.POSTGRES_SOCKET_DIR), port=55432, user="runner",
                        dbname="runner", connect_timeout=5)



@pytest.mark.parametrize("turn", [1, 2])
def test_pg_url_is_an_empty_database_of_this_test(pg_url, lab_database_url, turn):
    name = pg_url.rsplit("/", 1)[1]
    assert name.startswith("runner_test_") and pg_url != lab_database_url
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables "
                              "WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)  # the other turn's table is not here
        conn.execute("CREATE TABLE seen (turn int)")
        conn.execute("INSERT INTO seen VALUES (%s)", (turn,))



def test_fresh_database_is_dropped_with_a_connection_left_open(lab_database_url):
    with fresh_database(lab_database_url) as url:
        name = url.rsplit("/", 1)[1]
        left_open = psycopg.connect(url)
        left_open.execute("SELECT 1")
    try:
        with psycopg.connect(lab_database_url) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (name,)).fetchone()
        assert found is None
        with pytest.raises(psycopg.OperationalError):
            left_open.execute("SELECT 1")
    finally:
        left_open.close()



def test_a_killed_postmaster_is_started_again_by_up_with_its_data(lab, pg_url):
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('before the kill')")
    password = Path(lab["database"]["password_file"]).read_text()
    before = _record(lab)
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while host.alive(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not host.alive(before)
    started = time.monotonic()
    proc = _runner("up", "--servers", str(len(lab["servers"])))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    print(f"up after the postmaster was killed took {elapsed:.1f}s")
    assert elapsed < 30
    after = _record(lab)
    assert after["pid"] != before["pid"] and host.alive(after)
    assert Path(lab["database"]["password_file"]).read_text() == password
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("before the kill",)]
    assert json.loads(_runner("status", "--json").stdout)["up"] is True



def test_stopped_as_down_stops_it_with_a_client_connected_then_up_starts_it(lab):
    """`down`'s stop (SIGINT: fast shutdown) ends the postmaster at once although a client is
    connected (SIGTERM would wait for it); `up` starts it again."""
    from runner_lab.postgres import stop as _stop_postgres

    rec = _record(lab)
    client = psycopg.connect(lab["database_url"])
    try:
        started = time.monotonic()
        _stop_postgres(rec)
        elapsed = time.monotonic() - started
        assert not host.alive(rec)
        assert elapsed < 10, f"the postmaster took {elapsed:.1f}s to stop"
        log = Path(rec["log"]).read_text(errors="replace")
        assert "received fast shutdown request" in log.rsplit("--- ", 1)[-1]
    finally:
        client.close()
        proc = _runner("up", "--servers", str(len(lab["servers"])))
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(lab["database_url"], connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

