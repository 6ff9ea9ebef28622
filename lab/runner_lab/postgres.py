"""The lab's own PostgreSQL cluster: made once (initdb) in <state>/postgres/data, its postmaster
run as the postgres user on 127.0.0.1:55432 (recorded as `postgres`), role and database
`runner` with the password of <state>/postgres.password (the server gets only its SCRAM
verifier). Debian's packaged cluster is neither used nor touched.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal

from runner_lab import host, layout
from runner_lab.credentials import ensure_password, read_password
from runner_lab.errors import LabError
from runner_lab.state import State


def password(state: State) -> str | None:
    """The role's password, None before `up` made it."""
    return read_password(layout.postgres_password_file(state.dir))


def problems(state: State) -> list[str]:
    rec = state.recorded("postgres")
    if not host.alive(rec) or not host.postgres_login(password(state)):
        return [f"postgres {layout.POSTGRES_HOST}:{layout.POSTGRES_PORT} does not answer or "
                f"refuses the login {layout.POSTGRES_USER} with the password in "
                f"{layout.postgres_password_file(state.dir)}"]
    if host.outdated(rec, layout.postgres_argv(state.dir)):
        return [f"postgres {layout.POSTGRES_HOST}:{layout.POSTGRES_PORT} runs with other "
                "settings than `runner lab up` starts it with now: `up` restarts it"]
    return []


def markers(state: State) -> list[tuple[str, str, str]]:
    """(key, marker, program): the postmaster that lost its record runs with its data dir."""
    return [("postgres", str(layout.postgres_data(state.dir)), "postgres")]


def stop(rec: dict | None) -> None:
    """Fast shutdown (SIGINT): open sessions are ended, not waited for as SIGTERM (smart
    shutdown) would; SIGKILL after the timeout."""
    host.stop(rec, timeout=20, first=signal.SIGINT)


def stop_leftovers(state: State) -> None:
    """Backends a postmaster killed before (or just now, after its timeout) left behind."""
    host.stop_all(host.pids_in_dir(layout.postgres_data(state.dir)))


def ensure(state: State) -> None:
    """The lab's own cluster: made once (initdb), started as the postgres user, its role and
    database made or mended. A live postmaster that answers is left alone."""
    key = "postgres"
    data = layout.postgres_data(state.dir)
    pw = ensure_password(layout.postgres_password_file(state.dir),
                         f"the lab's PostgreSQL role {layout.POSTGRES_USER}", state.log)
    confs_changed = _write_confs(state)
    rec = state.adopt(key, str(data), "postgres")
    if rec and host.outdated(rec, layout.postgres_argv(state.dir)):
        state.log(f"postgres (pid {rec['pid']}) runs with other settings than this version "
                  "starts it with; restarting it (its clients lose their connections)")
        stop(rec)
        rec = None
    elif rec and confs_changed:
        # the postmaster reads pg_hba.conf and pg_ident.conf again on SIGHUP
        os.kill(rec["pid"], signal.SIGHUP)
    if rec and not host.answers(host.postgres_answers, 10):
        state.log(f"postgres (pid {rec['pid']}) alive but not answering; restarting it")
        stop(rec)
        rec = None
    if not rec:
        _start(state)
    _ensure_role(state, pw)


def _write_confs(state: State) -> bool:
    """The lab's own pg_hba.conf and pg_ident.conf (outside the data dir: root's files, which
    the postmaster only reads). True when one of them was rewritten."""
    pgdir = layout.postgres_dir(state.dir)
    changed = host.write_if_changed(pgdir / "pg_hba.conf", layout.pg_hba_conf())
    return host.write_if_changed(pgdir / "pg_ident.conf", layout.pg_ident_conf()) or changed


def _start(state: State) -> None:
    data = layout.postgres_data(state.dir)
    if not (layout.POSTGRES_BIN / "postgres").exists():
        raise LabError(f"{layout.POSTGRES_BIN / 'postgres'} is missing: install Debian's "
                       f"{layout.POSTGRES_PACKAGE} (PostgreSQL {layout.POSTGRES_VERSION}) "
                       "with scripts/install-system")
    # A postmaster killed with SIGKILL leaves its backends, which end by themselves once they
    # notice; while they run, a new postmaster refuses the cluster.
    if host.pids_in_dir(data) and not host.answers(lambda: not host.pids_in_dir(data), 5):
        host.stop_all(host.pids_in_dir(data), timeout=5)
    if not data.exists():
        _initdb(state)
    # No process of the cluster is left (above): its lock files are stale. The postmaster
    # takes the pid in them for a running postmaster while that pid exists, and a killed one
    # stays a zombie until init reaps it (slow here), or the pid is reused.
    (data / "postmaster.pid").unlink(missing_ok=True)
    for name in layout.postgres_socket_files():
        (layout.POSTGRES_SOCKET_DIR / name).unlink(missing_ok=True)
    owner = pwd.getpwnam(layout.POSTGRES_OS_USER)
    layout.POSTGRES_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    os.chown(layout.POSTGRES_SOCKET_DIR, owner.pw_uid, owner.pw_gid)
    state.log(f"starting postgres on {layout.POSTGRES_HOST}:{layout.POSTGRES_PORT} ({data})")
    log_path = state.dir / "logs" / "postgres.log"
    rec = host.spawn(layout.postgres_argv(state.dir), log_path, user=layout.POSTGRES_OS_USER)
    state.record("postgres", rec)
    host.wait_for(host.postgres_answers, "postgres", 60, rec, log_path)


def _initdb(state: State) -> None:
    """initdb into a dir beside the data dir, renamed when it is done: the data dir exists
    only as a whole cluster, and an interrupted initdb's leftovers are removed next time."""
    data = layout.postgres_data(state.dir)
    tmp = data.with_name(data.name + ".initdb")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700, parents=True)
    owner = pwd.getpwnam(layout.POSTGRES_OS_USER)
    os.chown(tmp, owner.pw_uid, owner.pw_gid)
    reach = host.run(layout.runuser_argv(["test", "-w", str(tmp)]), check=False)
    if reach.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LabError(f"the {layout.POSTGRES_OS_USER} user cannot reach {tmp}: every parent "
                       f"dir of the lab's state dir {state.dir} must be searchable by it")
    state.log(f"creating the lab's PostgreSQL cluster in {data} (initdb)")
    host.run(layout.runuser_argv(layout.initdb_argv(tmp)), cwd=tmp.parent, timeout=120)
    os.rename(tmp, data)


def _ensure_role(state: State, password: str) -> None:
    """Role POSTGRES_USER (login, CREATEDB: tests make a database each) with the password of
    the file, and its database. The server gets a SCRAM verifier, never the password."""
    pg = host.psycopg()
    ident, literal = pg.sql.Identifier, pg.sql.Literal

    def verifier():
        return literal(layout.scram_verifier(password, secrets.token_bytes(16)))

    user = ident(layout.POSTGRES_USER)
    with host.postgres_superuser() as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                              (layout.POSTGRES_USER,)).fetchone() is not None
        if not exists:
            conn.execute(pg.sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}")
                         .format(user, verifier()))
            state.log(f"created PostgreSQL role {layout.POSTGRES_USER}")
        else:
            conn.execute(pg.sql.SQL("ALTER ROLE {} LOGIN CREATEDB NOSUPERUSER").format(user))
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                        (layout.POSTGRES_DB,)).fetchone() is None:
            conn.execute(pg.sql.SQL("CREATE DATABASE {} OWNER {}")
                         .format(ident(layout.POSTGRES_DB), user))
            state.log(f"created PostgreSQL database {layout.POSTGRES_DB}")
        if exists and not host.postgres_login(password):
            # a password file made again (removed by hand) while the cluster was kept
            conn.execute(pg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(user, verifier()))
            state.log(f"set the password of PostgreSQL role {layout.POSTGRES_USER} to the "
                      f"one in {layout.postgres_password_file(state.dir)}")
    if not host.postgres_login(password):
        raise LabError(f"role {layout.POSTGRES_USER} cannot log in to "
                       f"{layout.POSTGRES_HOST}:{layout.POSTGRES_PORT}/{layout.POSTGRES_DB} "
                       "with its password; the server's log: "
                       f"{state.dir / 'logs' / 'postgres.log'}")
