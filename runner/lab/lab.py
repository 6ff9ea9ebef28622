"""Bringing the lab up, checking it, and taking it down.

state.json (in the state dir) records every process `up` started (pid + start time) and the
network pieces it made, so that `down` stops exactly those, by pid. `up` is a health check first:
a part that answers is left alone, a dead one is restarted, a missing server is added.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner.lab import host, images, layout
from runner.lab.errors import LabError
from runner.lab.layout import Server

STATE_VERSION = 1


def _empty_state() -> dict:
    return {"version": STATE_VERSION, "servers": [], "procs": {}, "created": {}}


class Lab:
    def __init__(self, state: Path | None = None, log: host.Log = host.stderr_log):
        self.state = state or layout.state_dir()
        self.log = log
        self.file = self.state / "state.json"
        self._mutex = threading.Lock()
        self.data = _empty_state()

    # ---- state file ------------------------------------------------------------------------

    def load(self) -> dict:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            data = _empty_state()
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {self.file}: {exc}") from exc
        for key, value in _empty_state().items():
            data.setdefault(key, value)
        self.data = data
        return data

    def save(self) -> None:
        with self._mutex:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.file)

    def _record(self, key: str, rec: dict | None) -> None:
        with self._mutex:
            if rec is None:
                self.data["procs"].pop(key, None)
            else:
                self.data["procs"][key] = rec
        self.save()

    def _created(self, key: str, value) -> None:
        with self._mutex:
            created = self.data["created"]
            if isinstance(value, str):
                items = created.setdefault(key, [])
                if value not in items:
                    items.append(value)
            else:
                created[key] = value
        self.save()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One `up` or `down` at a time (test sessions of several engineers call `up`)."""
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def servers(self) -> list[Server]:
        return sorted((layout.server_from_name(n, self.state) for n in self.data["servers"]),
                      key=lambda s: s.index)

    def describe(self) -> dict:
        return layout.describe(self.state, self.servers(), self._postgres_password())

    # ---- status ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every part that is missing or not answering, each as one line. Empty: the lab is up."""
        if not self.data["servers"]:
            return ["the lab is not up: run `runner lab up`"]
        found = []
        procs = self.data["procs"]
        if not host.link_exists(layout.BRIDGE) or not host.link_up(layout.BRIDGE):
            found.append(f"bridge {layout.BRIDGE} is missing or down")
        if not host.fw_chain_present():
            found.append(f"iptables chain {layout.FW_CHAIN} is not linked from FORWARD")
        if not host.alive(procs.get("registry")) or not host.registry_ready():
            found.append(f"registry {layout.REGISTRY} does not answer")
        if not host.alive(procs.get("auth-registry")) or not self._auth_registry_ready():
            found.append(f"registry {layout.AUTH_REGISTRY} does not answer or refuses the "
                         f"login {layout.AUTH_REGISTRY_USER} with the password in "
                         f"{layout.auth_registry_password_file(self.state)}")
        if not host.alive(procs.get("token-issuer")) or not host.token_issuer_token():
            found.append(f"token issuer {layout.TOKEN_REALM} does not answer")
        elif not self._token_issuer_current():
            found.append(f"token issuer {layout.TOKEN_REALM} runs with another config than "
                         "`runner lab up` writes now, or refuses one of its users: `up` "
                         "mends it")
        elif not host.alive(procs.get("token-registry")) or not self._token_registry_ready():
            found.append(f"registry {layout.TOKEN_REGISTRY} (token auth) does not answer or "
                         f"refuses the token the issuer gives {layout.TOKEN_REGISTRY_USER} for "
                         f"the password in {layout.token_registry_password_file(self.state)}")
        found += self._postgres_problems()
        if not host.alive(procs.get("build-dockerd")) or not host.docker_ready(layout.BUILD_SOCK):
            found.append(f"build engine {layout.BUILD_DOCKER_HOST} does not answer")
        elif self._outdated(procs.get("build-dockerd"), layout.build_dockerd_argv(self.state)):
            found.append(f"build engine {layout.BUILD_DOCKER_HOST} runs with other flags than "
                         "`runner lab up` starts it with now: `up` restarts it")
        else:
            for image in (layout.BUSYBOX_IMAGE, layout.PYTHON_IMAGE):
                if not host.image_exists(layout.BUILD_SOCK, image):
                    found.append(f"image {image} is missing from the build engine")
        if host.registry_ready() and not images.proxy_in_registry():
            found.append(f"proxy image {layout.PROXY_IMAGE} is missing from the registry or was "
                         "made another way than `runner lab up` makes it: `up` builds it")
        for s in self.servers():
            found += self._server_problems(s)
        return found

    def _postgres_problems(self) -> list[str]:
        rec = self.data["procs"].get("postgres")
        if not host.alive(rec) or not host.postgres_login(self._postgres_password()):
            return [f"postgres {layout.POSTGRES_HOST}:{layout.POSTGRES_PORT} does not answer or "
                    f"refuses the login {layout.POSTGRES_USER} with the password in "
                    f"{layout.postgres_password_file(self.state)}"]
        if self._outdated(rec, layout.postgres_argv(self.state)):
            return [f"postgres {layout.POSTGRES_HOST}:{layout.POSTGRES_PORT} runs with other "
                    "settings than `runner lab up` starts it with now: `up` restarts it"]
        return []

    def _server_problems(self, s: Server) -> list[str]:
        procs = self.data["procs"]
        if not self._server_net_ok(s):
            return [f"{s.name}: network namespace {s.netns} or veth {s.veth} is missing"]
        found = []
        if not host.alive(procs.get(f"{s.name}-dockerd")) or not host.docker_ready(s.sock):
            found.append(f"{s.name}: engine {s.docker_host} does not answer")
        elif self._outdated(procs.get(f"{s.name}-dockerd"), layout.server_dockerd_argv(s)):
            found.append(f"{s.name}: engine {s.docker_host} runs with other flags than "
                         "`runner lab up` starts it with now: `up` restarts it")
        if not host.alive(procs.get(f"{s.name}-sshd")) or not host.ssh_banner(s.ip):
            found.append(f"{s.name}: sshd {s.ip}:{layout.SSH_PORT} does not answer")
        return found

    @staticmethod
    def _outdated(rec: dict | None, wanted: list[str]) -> bool:
        """A live process that runs another command line than `up` would start now (a lab
        brought up by an older version, e.g. without a registry that is insecure now)."""
        running = host.cmdline(rec)
        return running is not None and not layout.runs_as_started(running, wanted)

    def _auth_password(self) -> str | None:
        return _read_password(layout.auth_registry_password_file(self.state))

    def _postgres_password(self) -> str | None:
        return _read_password(layout.postgres_password_file(self.state))

    def _auth_registry_ready(self) -> bool:
        password = self._auth_password()
        return password is not None and host.registry_ready(
            layout.AUTH_REGISTRY_PORT, (layout.AUTH_REGISTRY_USER, password))

    def status(self) -> dict:
        self.load()
        problems = self.problems()
        return {"up": not problems, **self.describe(), "problems": problems}

    # ---- up --------------------------------------------------------------------------------

    def up(self, count: int) -> dict:
        if not 1 <= count <= layout.MAX_SERVERS:
            raise LabError(f"--servers must be between 1 and {layout.MAX_SERVERS}")
        with self.locked():
            host.ensure_packages(self.log)  # ~30 ms when everything is installed
            self.load()
            wanted = sorted({int(n[3:]) for n in self.data["servers"]} | set(range(1, count + 1)))
            if set(wanted) == {s.index for s in self.servers()} and not self.problems():
                return self.describe()  # everything answers: the fast path
            started = time.monotonic()
            layout.RUN_DIR.mkdir(parents=True, exist_ok=True)
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
            self._ensure_base_network()
            self._ensure_client_key()
            self._ensure_registry()
            self._ensure_auth_registry()
            self._ensure_token_registry()
            build_rec = self._start_build_engine()
            servers = [Server(i, self.state) for i in wanted]
            with ThreadPoolExecutor(max_workers=len(servers) + 2) as pool:
                futures = {"build engine": pool.submit(self._finish_build_engine, build_rec),
                           "postgres": pool.submit(self._ensure_postgres)}
                for s in servers:
                    futures[s.name] = pool.submit(self._ensure_server, s)
                errors = []
                for what, fut in futures.items():
                    try:
                        fut.result()
                    except Exception as exc:  # collect every failure, not just the first
                        errors.append(f"{what}: {exc}")
            ok = [s.name for s in servers if not any(e.startswith(f"{s.name}:") for e in errors)]
            with self._mutex:
                self.data["servers"] = sorted(set(self.data["servers"]) | set(ok),
                                              key=lambda n: int(n[3:]))
            self.save()
            self._write_known_hosts()
            if errors:
                raise LabError("the lab is not fully up:\n" + "\n".join(errors))
            problems = self.problems()
            if problems:
                raise LabError("the lab started but does not answer:\n" + "\n".join(problems))
            self.log(f"up in {time.monotonic() - started:.1f}s: registry {layout.REGISTRY}, "
                     f"registry with login {layout.AUTH_REGISTRY}, registry with token auth "
                     f"{layout.TOKEN_REGISTRY} (issuer {layout.TOKEN_REALM}), proxy image {layout.PROXY_IMAGE}, "
                     f"postgres {layout.POSTGRES_HOST}:{layout.POSTGRES_PORT}, "
                     f"build engine {layout.BUILD_DOCKER_HOST}, servers "
                     + ", ".join(f"{s.name}={s.ip}" for s in self.servers()))
            return self.describe()

    def _ensure_base_network(self) -> None:
        for name, cidr, cmds in ((layout.BRIDGE, f"{layout.BRIDGE_IP}/{layout.PREFIX}",
                                  layout.bridge_cmds()),
                                 (layout.BUILD_BRIDGE, layout.BUILD_BRIDGE_CIDR,
                                  layout.build_bridge_cmds())):
            if not host.link_exists(name):
                self.log(f"creating bridge {name} {cidr}")
                host.run(cmds[0])
                self._created("bridges", name)
            if not host.link_has_addr(name, cidr):
                host.run(cmds[1])
            if not host.link_up(name):
                host.run(cmds[2])
        if not host.fw_chain_present():
            for argv in layout.firewall_down_cmds():  # a chain left without its jump
                host.run(argv, check=False)
            for argv in layout.firewall_cmds():
                host.run(argv)
            self._created("firewall", True)

    def _ensure_client_key(self) -> None:
        key = layout.client_key(self.state)
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            host.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "runner-lab",
                      "-f", str(key)])

    def _adopt_or_stop(self, key: str, marker: str, exe: str) -> dict | None:
        """The recorded process if it is alive; else a process of ours that lost its record
        (found by its own config/pidfile path in argv, never by name alone)."""
        rec = self.data["procs"].get(key)
        if host.alive(rec):
            return rec
        for found in host.pids_with_arg(marker, exe):
            self.log(f"adopting {key} (pid {found['pid']}) left without a record")
            self._record(key, found)
            return found
        return None

    def _ensure_registry(self) -> None:
        self._ensure_registry_process("registry", layout.REGISTRY, self.state / "registry.yml",
                                      layout.registry_config(self.state),
                                      self.state / "registry", layout.registry_argv(self.state),
                                      host.registry_ready)

    def _ensure_auth_registry(self) -> None:
        rewritten = self._ensure_auth_credentials()
        self._ensure_registry_process("auth-registry", layout.AUTH_REGISTRY,
                                      self.state / "auth-registry.yml",
                                      layout.auth_registry_config(self.state),
                                      self.state / "auth-registry",
                                      layout.auth_registry_argv(self.state),
                                      self._auth_registry_ready, restart=rewritten)

    def _ensure_registry_process(self, key: str, address: str, config: Path, config_text: str,
                                 storage: Path, argv: list[str], ready, *,
                                 restart: bool = False,
                                 why: str = "its htpasswd changed") -> None:
        rec = self._adopt_or_stop(key, str(config), "docker-registry")
        if rec and restart:
            # distribution 2.8 reads its htpasswd file (and rootcertbundle) only when it starts
            self.log(f"restarting {key} (pid {rec['pid']}): {why}")
            host.stop(rec)
            rec = None
        if rec and ready():
            return
        if rec:
            host.wait_for(ready, key, 5, rec, Path(rec.get("log", "")))
            return
        storage.mkdir(parents=True, exist_ok=True)
        host.write_if_changed(config, config_text)
        self.log(f"starting {key} on {address}")
        log_path = self.state / "logs" / f"{key}.log"
        rec = host.spawn(argv, log_path)
        self._record(key, rec)
        host.wait_for(ready, key, 20, rec, log_path)

    def _ensure_auth_credentials(self) -> bool:
        """The auth registry's password, made once and kept in a 0600 file, and its htpasswd
        entry. True when the htpasswd file had to be (re)written."""
        return self._ensure_htpasswd(layout.auth_registry_password_file(self.state),
                                     layout.auth_registry_htpasswd(self.state),
                                     (layout.AUTH_REGISTRY_USER,),
                                     f"{layout.AUTH_REGISTRY}'s user {layout.AUTH_REGISTRY_USER}")

    def _ensure_htpasswd(self, pw_file: Path, htpasswd: Path, users: tuple[str, ...],
                         whose: str) -> bool:
        """The password, made once and kept in `pw_file` (0600), and a bcrypt entry of it for
        each of `users` in `htpasswd` (0600). True when the htpasswd file had to be
        (re)written."""
        import bcrypt  # a paramiko dependency; only `up` needs it

        password = self._password_file(pw_file, whose)
        try:
            text = htpasswd.read_text()
        except OSError:
            text = ""

        def matches(user: str) -> bool:
            hashed = layout.htpasswd_entry(text, user)
            try:
                return bool(hashed) and bcrypt.checkpw(password.encode(), hashed.encode())
            except ValueError:  # not a bcrypt hash: written again below
                return False

        if all(matches(user) for user in users):
            return False
        # The password is 128 random bits: a low bcrypt cost does not weaken it, and the
        # registry checks the hash on every request of a push or pull.
        _write_private(htpasswd, "".join(
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()}\n"
            for user in users))
        return True

    # ---- the registry with token auth, and its token issuer ---------------------------------

    def _ensure_token_registry(self) -> None:
        """The issuer first (the registry's readiness is a token of the issuer's that it
        accepts). Both are restarted when the signing key is made again (distribution reads its
        rootcertbundle only when it starts); the issuer also when its config changed. A new
        password needs no restart: the issuer reads its users file at every request."""
        self._ensure_htpasswd(layout.token_registry_password_file(self.state),
                              layout.token_registry_htpasswd(self.state),
                              (layout.TOKEN_REGISTRY_USER, layout.TOKEN_REGISTRY_PUSH_ONLY_USER),
                              f"{layout.TOKEN_REGISTRY}'s users {layout.TOKEN_REGISTRY_USER} and "
                              f"{layout.TOKEN_REGISTRY_PUSH_ONLY_USER}")
        new_key = self._ensure_token_signing_key()
        config = layout.token_issuer_config_file(self.state)
        new_config = host.write_if_changed(config, layout.token_issuer_config(self.state))
        argv = layout.token_issuer_argv(self.state, sys.executable)
        key = "token-issuer"
        rec = self._adopt_or_stop(key, str(config), os.path.basename(argv[0]))
        if rec and (new_key or new_config):
            self.log(f"restarting {key} (pid {rec['pid']}): its "
                     f"{'signing key' if new_key else 'config'} changed")
            host.stop(rec)
            rec = None
        if rec and not _answers(host.token_issuer_token, 5):
            self.log(f"{key} (pid {rec['pid']}) alive but not answering; restarting it")
            host.stop(rec)
            rec = None
        if not rec:
            self.log(f"starting {key} on {layout.TOKEN_ISSUER_LISTEN}")
            log_path = self.state / "logs" / f"{key}.log"
            rec = host.spawn(argv, log_path)
            self._record(key, rec)
            host.wait_for(host.token_issuer_token, key, 20, rec, log_path)
        self._ensure_registry_process("token-registry", layout.TOKEN_REGISTRY,
                                      self.state / "token-registry.yml",
                                      layout.token_registry_config(self.state),
                                      self.state / "token-registry",
                                      layout.token_registry_argv(self.state),
                                      self._token_registry_ready, restart=new_key,
                                      why="the issuer's signing key changed")

    def _ensure_token_signing_key(self) -> bool:
        """The issuer's key (0600) and its self-signed certificate, made once; made again when
        either is missing or they do not belong together. True when they were (re)made."""
        from runner.lab import token_issuer

        directory = layout.token_issuer_dir(self.state)
        key_file, cert_file = directory / "key.pem", directory / "cert.pem"
        try:
            if token_issuer.key_matches_cert(key_file.read_bytes(), cert_file.read_bytes()):
                return False
        except OSError:
            pass
        key_pem, cert_pem = token_issuer.make_signing_key(layout.TOKEN_ISSUER)
        _write_private(key_file, key_pem.decode())
        host.write_if_changed(cert_file, cert_pem.decode())
        self.log(f"made the token issuer's signing key and certificate: {directory}")
        return True

    def _token_issuer_current(self) -> bool:
        """The issuer's config is the one `up` writes now, and it accepts every user's login
        (a lab brought up by an older version lacks the push-only user)."""
        try:
            config = layout.token_issuer_config_file(self.state).read_text()
        except OSError:
            return False
        password = self._token_password()
        return (config == layout.token_issuer_config(self.state) and password is not None
                and all(host.token_issuer_token((user, password)) for user in
                        (layout.TOKEN_REGISTRY_USER, layout.TOKEN_REGISTRY_PUSH_ONLY_USER)))

    def _token_password(self) -> str | None:
        return _read_password(layout.token_registry_password_file(self.state))

    def _token_registry_ready(self) -> bool:
        password = self._token_password()
        return password is not None and host.token_registry_ready(
            (layout.TOKEN_REGISTRY_USER, password))

    # ---- postgres ------------------------------------------------------------------------

    def _ensure_postgres(self) -> None:
        """The lab's own cluster: made once (initdb), started as the postgres user, its role and
        database made or mended. A live postmaster that answers is left alone."""
        key = "postgres"
        data = layout.postgres_data(self.state)
        password = self._ensure_postgres_password()
        confs_changed = self._write_postgres_confs()
        rec = self._adopt_or_stop(key, str(data), "postgres")
        if rec and self._outdated(rec, layout.postgres_argv(self.state)):
            self.log(f"postgres (pid {rec['pid']}) runs with other settings than this version "
                     "starts it with; restarting it (its clients lose their connections)")
            _stop_postgres(rec)
            rec = None
        elif rec and confs_changed:
            # the postmaster reads pg_hba.conf and pg_ident.conf again on SIGHUP
            os.kill(rec["pid"], signal.SIGHUP)
        if rec and not _answers(host.postgres_answers, 10):
            self.log(f"postgres (pid {rec['pid']}) alive but not answering; restarting it")
            _stop_postgres(rec)
            rec = None
        if not rec:
            self._start_postgres()
        self._ensure_postgres_role(password)

    def _ensure_postgres_password(self) -> str:
        return self._password_file(layout.postgres_password_file(self.state),
                                   f"the lab's PostgreSQL role {layout.POSTGRES_USER}")

    def _password_file(self, pw_file: Path, whose: str) -> str:
        """The password kept in `pw_file` (0600), made once at random and kept across down/up."""
        password = _read_password(pw_file)
        if password is None:
            password = secrets.token_hex(16)
            _write_private(pw_file, password + "\n")
            self.log(f"made the password of {whose}: {pw_file}")
        elif pw_file.stat().st_mode & 0o077:
            pw_file.chmod(0o600)
        return password

    def _write_postgres_confs(self) -> bool:
        """The lab's own pg_hba.conf and pg_ident.conf (outside the data dir: root's files, which
        the postmaster only reads). True when one of them was rewritten."""
        pgdir = layout.postgres_dir(self.state)
        changed = host.write_if_changed(pgdir / "pg_hba.conf", layout.pg_hba_conf())
        return host.write_if_changed(pgdir / "pg_ident.conf", layout.pg_ident_conf()) or changed

    def _start_postgres(self) -> None:
        data = layout.postgres_data(self.state)
        if not (layout.POSTGRES_BIN / "postgres").exists():
            raise LabError(f"{layout.POSTGRES_BIN / 'postgres'} is missing: install Debian's "
                           f"{layout.POSTGRES_PACKAGE} (PostgreSQL {layout.POSTGRES_VERSION}) "
                           "with scripts/install-system")
        # A postmaster killed with SIGKILL leaves its backends, which end by themselves once they
        # notice; while they run, a new postmaster refuses the cluster.
        if host.pids_in_dir(data) and not _answers(lambda: not host.pids_in_dir(data), 5):
            host.stop_all(host.pids_in_dir(data), timeout=5)
        if not data.exists():
            self._initdb()
        # No process of the cluster is left (above): its lock files are stale. The postmaster
        # takes the pid in them for a running postmaster while that pid exists, and a killed one
        # stays a zombie until init reaps it (slow here), or the pid is reused.
        (data / "postmaster.pid").unlink(missing_ok=True)
        for name in layout.postgres_socket_files():
            (layout.POSTGRES_SOCKET_DIR / name).unlink(missing_ok=True)
        owner = pwd.getpwnam(layout.POSTGRES_OS_USER)
        layout.POSTGRES_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        os.chown(layout.POSTGRES_SOCKET_DIR, owner.pw_uid, owner.pw_gid)
        self.log(f"starting postgres on {layout.POSTGRES_HOST}:{layout.POSTGRES_PORT} ({data})")
        log_path = self.state / "logs" / "postgres.log"
        rec = host.spawn(layout.postgres_argv(self.state), log_path, user=layout.POSTGRES_OS_USER)
        self._record("postgres", rec)
        host.wait_for(host.postgres_answers, "postgres", 60, rec, log_path)

    def _initdb(self) -> None:
        """initdb into a dir beside the data dir, renamed when it is done: the data dir exists
        only as a whole cluster, and an interrupted initdb's leftovers are removed next time."""
        data = layout.postgres_data(self.state)
        tmp = data.with_name(data.name + ".initdb")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700, parents=True)
        owner = pwd.getpwnam(layout.POSTGRES_OS_USER)
        os.chown(tmp, owner.pw_uid, owner.pw_gid)
        reach = host.run(layout.runuser_argv(["test", "-w", str(tmp)]), check=False)
        if reach.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LabError(f"the {layout.POSTGRES_OS_USER} user cannot reach {tmp}: every parent "
                           f"dir of the lab's state dir {self.state} must be searchable by it")
        self.log(f"creating the lab's PostgreSQL cluster in {data} (initdb)")
        host.run(layout.runuser_argv(layout.initdb_argv(tmp)), cwd=tmp.parent, timeout=120)
        os.rename(tmp, data)

    def _ensure_postgres_role(self, password: str) -> None:
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
                self.log(f"created PostgreSQL role {layout.POSTGRES_USER}")
            else:
                conn.execute(pg.sql.SQL("ALTER ROLE {} LOGIN CREATEDB NOSUPERUSER").format(user))
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (layout.POSTGRES_DB,)).fetchone() is None:
                conn.execute(pg.sql.SQL("CREATE DATABASE {} OWNER {}")
                             .format(ident(layout.POSTGRES_DB), user))
                self.log(f"created PostgreSQL database {layout.POSTGRES_DB}")
            if exists and not host.postgres_login(password):
                # a password file made again (removed by hand) while the cluster was kept
                conn.execute(pg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(user, verifier()))
                self.log(f"set the password of PostgreSQL role {layout.POSTGRES_USER} to the "
                         f"one in {layout.postgres_password_file(self.state)}")
        if not host.postgres_login(password):
            raise LabError(f"role {layout.POSTGRES_USER} cannot log in to "
                           f"{layout.POSTGRES_HOST}:{layout.POSTGRES_PORT}/{layout.POSTGRES_DB} "
                           "with its password; the server's log: "
                           f"{self.state / 'logs' / 'postgres.log'}")

    def _start_build_engine(self) -> dict | None:
        """Start the build engine's dockerd if it is not running; None when it already was."""
        key = "build-dockerd"
        rec = self._adopt_or_stop(key, str(layout.RUN_DIR / "docker.pid"), "dockerd")
        if rec and self._outdated(rec, layout.build_dockerd_argv(self.state)):
            self.log(f"build engine (pid {rec['pid']}) runs with other flags than this version "
                     "starts it with; restarting it (a build running on it now fails)")
            host.stop(rec)
            rec = None
        if rec:
            return None
        host.stop_all(host.pids_using([f"{layout.RUN_DIR / 'exec'}/"]))
        _remove_stale_pidfiles(layout.RUN_DIR / "docker.pid", layout.RUN_DIR / "exec")
        (self.state / "docker").mkdir(parents=True, exist_ok=True)
        host.write_if_changed(self.state / "daemon.json",
                          json.dumps({"features": {"buildkit": True}}) + "\n")
        self.log(f"starting build engine on {layout.BUILD_DOCKER_HOST}")
        log_path = self.state / "logs" / "build-dockerd.log"
        rec = host.spawn(layout.build_dockerd_argv(self.state), log_path)
        self._record(key, rec)
        return rec

    def _finish_build_engine(self, rec: dict | None) -> None:
        rec = rec or self.data["procs"].get("build-dockerd")
        host.wait_for(lambda: host.docker_ready(layout.BUILD_SOCK), "build engine dockerd", 60,
                      rec, Path(rec["log"]) if rec and rec.get("log") else None)
        images.ensure_busybox(self.log)
        images.ensure_python(self.state, self.log)
        images.ensure_caddy(self.state, self.log)  # FROM the python image

    def _server_net_ok(self, s: Server) -> bool:
        return (host.netns_exists(s.netns) and host.link_exists(s.veth)
                and host.link_master(s.veth) == layout.BRIDGE and host.link_up(s.veth))

    def _ensure_server(self, s: Server) -> None:
        procs = self.data["procs"]
        if not self._server_net_ok(s):
            self.log(f"{s.name}: creating network namespace {s.netns} ({s.ip})")
            for key in (f"{s.name}-sshd", f"{s.name}-dockerd"):
                host.stop(procs.get(key))
            host.stop_all(host.pids_using([f"{s.run_dir / 'exec'}/"]))
            _remove_server_net(s)
            for argv in layout.server_net_cmds(s):
                host.run(argv)
            self._created("netns", s.netns)
            self._created("veths", s.veth)
        s.dir.mkdir(parents=True, exist_ok=True)
        s.run_dir.mkdir(parents=True, exist_ok=True)
        if not s.host_key.exists():
            host.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", s.name,
                      "-f", str(s.host_key)])
        client_pub = layout.client_key(self.state).with_suffix(".pub").read_text()
        host.write_if_changed(s.authorized_keys, client_pub)
        host.write_if_changed(s.sshd_config, layout.sshd_config(s))
        host.write_if_changed(s.daemon_json, "{}\n")

        waits = []
        dkey = f"{s.name}-dockerd"
        drec = self._adopt_or_stop(dkey, str(s.run_dir / "docker.pid"), "dockerd")
        if drec and self._outdated(drec, layout.server_dockerd_argv(s)):
            self.log(f"{s.name}: engine (pid {drec['pid']}) runs with other flags than this "
                     "version starts it with; restarting it: its containers stop (those with a "
                     "restart policy start again with the new engine)")
            host.stop(drec)
            drec = None
        if drec and not _answers(lambda: host.docker_ready(s.sock), 10):
            self.log(f"{s.name}: engine alive but not answering; restarting it")
            host.stop(drec)
            drec = None
        if not drec:
            host.stop_all(host.pids_using([f"{s.run_dir / 'exec'}/"]))
            _remove_stale_pidfiles(s.run_dir / "docker.pid", s.run_dir / "exec")
            self.log(f"{s.name}: starting dockerd ({s.docker_host})")
            log_path = s.dir / "dockerd.log"
            drec = host.spawn(layout.server_dockerd_argv(s), log_path)
            self._record(dkey, drec)
            waits.append((lambda: host.docker_ready(s.sock), f"{s.name} dockerd", 60, drec, log_path))

        skey = f"{s.name}-sshd"
        srec = self._adopt_or_stop(skey, str(s.sshd_config), "sshd")
        if srec and not _answers(lambda: host.ssh_banner(s.ip), 5):
            host.stop(srec)
            srec = None
        if not srec:
            log_path = s.dir / "sshd.log"
            self.log(f"{s.name}: starting sshd ({s.ip}:{layout.SSH_PORT})")
            srec = host.spawn(layout.server_sshd_argv(s), log_path)
            self._record(skey, srec)
            waits.append((lambda: host.ssh_banner(s.ip), f"{s.name} sshd", 15, srec, log_path))
        for probe, what, timeout, rec, log_path in waits:
            host.wait_for(probe, what, timeout, rec, log_path)

    def _write_known_hosts(self) -> None:
        lines = []
        for s in self.servers():
            pub = s.host_key.with_name(s.host_key.name + ".pub")
            if pub.exists():
                lines.append(layout.known_hosts_line(s, pub.read_text()))
        host.write_if_changed(layout.known_hosts(self.state), "".join(f"{ln}\n" for ln in lines))

    # ---- down ------------------------------------------------------------------------------

    def down(self) -> None:
        with self.locked():
            self.load()
            procs = dict(self.data["procs"])
            # Processes of ours that lost their record (an interrupted `up`) are found by the
            # lab's own config and pid file paths in their argv.
            markers = [("registry", str(self.state / "registry.yml"), "docker-registry"),
                       ("auth-registry", str(self.state / "auth-registry.yml"), "docker-registry"),
                       ("token-registry", str(self.state / "token-registry.yml"),
                        "docker-registry"),
                       # the issuer runs under whichever name of the runner's python `up`
                       # was started with
                       *(("token-issuer", str(layout.token_issuer_config_file(self.state)), exe)
                         for exe in sorted({os.path.basename(sys.executable), "python",
                                            "python3"})),
                       ("build-dockerd", str(layout.RUN_DIR / "docker.pid"), "dockerd"),
                       ("postgres", str(layout.postgres_data(self.state)), "postgres")]
            names = set(self.data["servers"]) | {f"srv{i}" for i in _netns_indexes()}
            for name in names:
                s = layout.server_from_name(name, self.state)
                markers += [(f"{name}-dockerd", str(s.run_dir / "docker.pid"), "dockerd"),
                            (f"{name}-sshd", str(s.sshd_config), "sshd")]
            for key, marker, exe in markers:
                if not host.alive(procs.get(key)):
                    for found in host.pids_with_arg(marker, exe):
                        procs[f"{key}:{found['pid']}"] = found
            live = {k: r for k, r in procs.items() if host.alive(r)}
            for key, rec in list(live.items()):
                if "sshd" in key:  # open ssh sessions would live on in a deleted namespace
                    for child in host.children(rec["pid"]):
                        live[f"{key}-session:{child['pid']}"] = child
            if live:
                self.log(f"stopping {len(live)} processes: "
                         + ", ".join(f"{k} (pid {r['pid']})" for k, r in sorted(live.items())))
            with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
                list(pool.map(_stop_part, live.keys(), live.values()))
            # backends a postmaster killed before (or just now, after its timeout) left behind
            host.stop_all(host.pids_in_dir(layout.postgres_data(self.state)))
            # containerd and shims a killed dockerd may have left, found by our exec-root paths
            host.stop_all(host.pids_using(
                [f"{layout.RUN_DIR / 'exec'}/"]
                + [f"{layout.server_from_name(n, self.state).run_dir / 'exec'}/" for n in names]))
            host.unmount_under([layout.RUN_DIR, self.state])
            for name in sorted(names):
                _remove_server_net(layout.server_from_name(name, self.state))
            for bridge in (layout.BRIDGE, layout.BUILD_BRIDGE):
                if host.link_exists(bridge):
                    host.run(["ip", "link", "del", bridge], check=False)
            for argv in layout.firewall_down_cmds():
                host.run(argv, check=False)
            for table in ("filter", "nat"):
                rules = host.run(["iptables", "-w", "-t", table, "-S"], check=False)
                for argv in layout.build_bridge_rule_deletions(table, rules.stdout.decode()):
                    host.run(argv, check=False)
            shutil.rmtree(layout.RUN_DIR, ignore_errors=True)
            self.data = _empty_state()
            self.save()
            self.log("down: everything the lab started is stopped")


def _stop_postgres(rec: dict | None) -> None:
    """Fast shutdown (SIGINT): open sessions are ended, not waited for as SIGTERM (smart
    shutdown) would; SIGKILL after the timeout."""
    host.stop(rec, timeout=20, first=signal.SIGINT)


def _stop_part(key: str, rec: dict) -> None:
    if key == "postgres" or key.startswith("postgres:"):
        _stop_postgres(rec)
    else:
        host.stop(rec)


def _answers(probe, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _remove_stale_pidfiles(pidfile: Path, exec_root: Path) -> None:
    """dockerd refuses to start while its pid file names an existing pid, and waits for "still
    running" containerd named in exec-root; a killed one stays a zombie until init reaps it (slow
    here). Called once no process of ours is left (checked by the caller): both files are stale."""
    pidfile.unlink(missing_ok=True)
    (exec_root / "containerd" / "containerd.pid").unlink(missing_ok=True)


def _netns_indexes() -> list[int]:
    try:
        names = os.listdir("/var/run/netns")
    except OSError:
        return []
    return [int(n[len("rlab-srv"):]) for n in names
            if n.startswith("rlab-srv") and n[len("rlab-srv"):].isdigit()]


def _remove_server_net(s: Server) -> None:
    if host.link_exists(s.veth):
        host.run(["ip", "link", "del", s.veth], check=False)
    if host.netns_exists(s.netns):
        host.run(["ip", "netns", "del", s.netns], check=False)


def _read_password(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, from its first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
