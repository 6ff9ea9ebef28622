"""The lab's PostgreSQL (issue 11): its fixed layout checked by equality (runs anywhere), then the
real cluster the session `lab` fixture brought up: RUNNER_DATABASE_URL of `runner lab env` logs
in and the server is PostgreSQL 15 on 127.0.0.1:55432; the process in state.json is the
postmaster; only the role's own password gets in; `pg_url` gives each test an empty database of
its own; a postmaster killed with SIGKILL is started again by `runner lab up`, with its data.

No test runs `lab down` (the session shares one lab); whatever a test creates it removes."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import signal
import sys
import time
from pathlib import Path

import psycopg
import pytest

from runner.lab import host, layout
from tests.db_fixtures import fresh_database
from tests.helpers import lab_cli, lab_env_printed

ROOT = Path(__file__).resolve().parent.parent
STATE = Path("/var/lib/runner-lab")


_runner = lab_cli


# ---- pure layout -------------------------------------------------------------------------------

def test_postgres_layout_names_and_settings():
    state = Path("/tmp/lab")
    assert (layout.POSTGRES_HOST, layout.POSTGRES_PORT) == ("127.0.0.1", 55432)
    assert layout.postgres_data(state) == Path("/tmp/lab/postgres/data")
    assert layout.postgres_password_file(state) == Path("/tmp/lab/postgres.password")
    assert "postgresql" in layout.SYSTEM_PACKAGES
    install = (ROOT / "scripts" / "install-system").read_text()
    assert " postgresql)" in install
    argv = layout.postgres_argv(state)
    assert argv[:3] == ["/usr/lib/postgresql/15/bin/postgres", "-D", "/tmp/lab/postgres/data"]
    settings = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-c")
    assert settings["port"] == "55432" and settings["listen_addresses"] == "127.0.0.1"
    assert settings["max_connections"] == "200" and settings["shared_buffers"] == "32MB"
    assert settings["unix_socket_directories"] == "/run/runner-lab/postgres"
    assert settings["hba_file"] == "/tmp/lab/postgres/pg_hba.conf"
    assert "fsync" not in settings  # on, the default
    assert layout.runuser_argv(layout.initdb_argv(Path("/d"))) == [
        "runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/initdb", "-D", "/d",
        "-U", "postgres", "--auth-local=peer", "--auth-host=scram-sha-256", "--encoding=UTF8",
        "--no-locale", "--no-instructions"]
    hba = [ln.split() for ln in layout.pg_hba_conf().splitlines() if not ln.startswith("#")]
    assert hba == [["local", "all", "postgres", "peer", "map=lab"],
                   ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"]]
    ident = [ln.split() for ln in layout.pg_ident_conf().splitlines() if not ln.startswith("#")]
    assert ident == [["lab", "root", "postgres"], ["lab", "postgres", "postgres"]]


def test_database_url_in_describe_and_env_but_not_in_the_human_line(capsys):
    from runner.cli.lab import _print_human

    state = Path("/tmp/lab dir")
    assert layout.describe(state, [])["database_url"] is None  # before `up` made a password
    info = layout.describe(state, [], "s3cr/t")
    assert info["database_url"] == "postgresql://runner:s3cr%2Ft@127.0.0.1:55432/runner"
    assert info["database"] == {"host": "127.0.0.1", "port": 55432, "user": "runner",
                                "name": "runner",
                                "password_file": "/tmp/lab dir/postgres.password"}
    assert layout.env_lines(info)[-1] == \
        "export RUNNER_DATABASE_URL=postgresql://runner:s3cr%2Ft@127.0.0.1:55432/runner"
    _print_human(info)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("database "))
    assert "postgresql://runner:****@127.0.0.1:55432/runner" in line
    assert "/tmp/lab dir/postgres.password" in line
    assert "s3cr" not in out


def test_scram_verifier_checks_the_rfc_7677_exchange():
    """The verifier of password "pencil" with the RFC's salt authenticates the RFC's client proof
    and yields its server signature: the server-side checks of SCRAM-SHA-256."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = layout.scram_verifier("pencil", salt)
    head, keys = verifier.split("$", 1)[1].split("$")
    assert head == "4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth_message = (f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,"
                    f"i=4096,c=biws,r={nonce}").encode()
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof, client_signature))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest()) == \
        b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert layout.scram_verifier("pencil", b"\0" * 16) != verifier  # the salt counts


def test_postgres_is_stopped_with_sigint_first(tmp_path):
    """down's stop of the postmaster: SIGINT (fast shutdown), not SIGTERM (which waits for every
    client to go)."""
    from runner.lab.lab import _stop_part

    got = tmp_path / "signal"
    code = ("import signal, sys, time\n"
            "def on(sig, _f):\n"
            f"    open({str(got)!r}, 'w').write(signal.Signals(sig).name); sys.exit(0)\n"
            "signal.signal(signal.SIGINT, on); signal.signal(signal.SIGTERM, on)\n"
            f"open({str(got)!r}, 'w').write('ready')\n"
            "time.sleep(60)\n")
    rec = host.spawn([sys.executable, "-c", code], tmp_path / "log")
    deadline = time.monotonic() + 10
    while not (got.exists() and got.read_text() == "ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    _stop_part("postgres", rec)
    assert got.read_text() == "SIGINT"
    assert not host.alive(rec)


# ---- the real cluster --------------------------------------------------------------------------

def _state(lab: dict) -> Path:
    return Path(lab["servers"][0]["key_file"]).parent.parent


def _record(lab: dict) -> dict:
    return json.loads((_state(lab) / "state.json").read_text())["procs"]["postgres"]


_env = lab_env_printed


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
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


@pytest.mark.lab
def test_stopped_as_down_stops_it_with_a_client_connected_then_up_starts_it(lab):
    """`down`'s stop (SIGINT: fast shutdown) ends the postmaster at once although a client is
    connected (SIGTERM would wait for it); `up` starts it again."""
    from runner.lab.lab import _stop_postgres

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
