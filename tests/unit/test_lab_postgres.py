"""The lab's PostgreSQL, pure parts: its layout and settings, the SCRAM verifier, the stop
order. The real cluster: tests/lab/test_lab_postgres.py."""

from __future__ import annotations

import base64

import hashlib

import hmac
import re





import sys

import time

import re
from pathlib import Path



from runner_lab import host, layout





ROOT = Path(__file__).resolve().parents[2]



STATE = Path("/var/lib/runner-lab")



def test_postgres_layout_names_and_settings():
    state = Path("/tmp/lab")
    assert (layout.POSTGRES_HOST, layout.POSTGRES_PORT) == ("127.0.0.1", 55432)
    assert layout.postgres_data(state) == Path("/tmp/lab/postgres/data")
    assert layout.postgres_password_file(state) == Path("/tmp/lab/postgres.password")
    assert "postgresql" in layout.SYSTEM_PACKAGES
    install = (ROOT / "scripts" / "install-system").read_text()
    packages = re.search(r"^packages=\(([^)]*)\)", install, re.M | re.S).group(1).split()
    assert "postgresql" in packages
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
    from runner_lab.cli import _print_human

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
    from runner_lab.lab import _stop_part

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

