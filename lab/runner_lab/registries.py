"""The lab's three registries (distribution's `docker-registry`) and the token issuer:

- `registry`        10.87.53.1:5000, plain HTTP, no login;
- `auth-registry`   10.87.53.1:5001, htpasswd login (user `lab`, password file made once);
- `token-registry`  127.0.0.1:5002, token auth, its tokens from `token-issuer` on 127.0.0.1:5003
                    (runner_lab/token_issuer.py, run with the runner's python), signed with a key
                    made once.

distribution 2.8 reads its htpasswd file and its rootcertbundle only when it starts, so a
registry is restarted when either is written again; the issuer reads its users file at every
request and needs a restart only for a new key or config.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from runner_lab import host, layout
from runner_lab.credentials import ensure_password, read_password, write_private
from runner_lab.state import State


def problems(state: State) -> list[str]:
    found = []
    if not host.alive(state.recorded("registry")) or not host.registry_ready():
        found.append(f"registry {layout.REGISTRY} does not answer")
    if not host.alive(state.recorded("auth-registry")) or not _auth_registry_ready(state):
        found.append(f"registry {layout.AUTH_REGISTRY} does not answer or refuses the "
                     f"login {layout.AUTH_REGISTRY_USER} with the password in "
                     f"{layout.auth_registry_password_file(state.dir)}")
    if not host.alive(state.recorded("token-issuer")) or not host.token_issuer_token():
        found.append(f"token issuer {layout.TOKEN_REALM} does not answer")
    elif not _token_issuer_current(state):
        found.append(f"token issuer {layout.TOKEN_REALM} runs with another config than "
                     "`runner lab up` writes now, or refuses one of its users: `up` "
                     "mends it")
    elif not host.alive(state.recorded("token-registry")) or not _token_registry_ready(state):
        found.append(f"registry {layout.TOKEN_REGISTRY} (token auth) does not answer or "
                     f"refuses the token the issuer gives {layout.TOKEN_REGISTRY_USER} for "
                     f"the password in {layout.token_registry_password_file(state.dir)}")
    return found


def ensure(state: State) -> None:
    """The plain registry, the one with login, then the token issuer and its registry: each
    left alone while it runs as `up` would start it now and answers."""
    _ensure_process(state, "registry", layout.REGISTRY, state.dir / "registry.yml",
                    layout.registry_config(state.dir), state.dir / "registry",
                    layout.registry_argv(state.dir), host.registry_ready)
    rewritten = ensure_auth_credentials(state)
    _ensure_process(state, "auth-registry", layout.AUTH_REGISTRY,
                    state.dir / "auth-registry.yml", layout.auth_registry_config(state.dir),
                    state.dir / "auth-registry", layout.auth_registry_argv(state.dir),
                    lambda: _auth_registry_ready(state), restart=rewritten)
    _ensure_token_registry(state)


def markers(state: State) -> list[tuple[str, str, str]]:
    """(key, marker, program) of each process here: how `down` finds one that lost its record
    (the lab's own config path in its argv)."""
    return [("registry", str(state.dir / "registry.yml"), "docker-registry"),
            ("auth-registry", str(state.dir / "auth-registry.yml"), "docker-registry"),
            ("token-registry", str(state.dir / "token-registry.yml"), "docker-registry"),
            # the issuer runs under whichever name of the runner's python `up` was started with
            *(("token-issuer", str(layout.token_issuer_config_file(state.dir)), exe)
              for exe in sorted({os.path.basename(sys.executable), "python", "python3"}))]


def _ensure_process(state: State, key: str, address: str, config: Path, config_text: str,
                    storage: Path, argv: list[str], ready: Callable[[], bool], *,
                    restart: bool = False, why: str = "its htpasswd changed") -> None:
    """One registry: adopted or started (config written first), restarted when `restart`
    (for `why`), waited for until `ready`."""
    rec = state.adopt(key, str(config), "docker-registry")
    if rec and restart:
        # distribution 2.8 reads its htpasswd file (and rootcertbundle) only when it starts
        state.log(f"restarting {key} (pid {rec['pid']}): {why}")
        host.stop(rec)
        rec = None
    if rec and ready():
        return
    if rec:
        host.wait_for(ready, key, 5, rec, Path(rec.get("log", "")))
        return
    storage.mkdir(parents=True, exist_ok=True)
    host.write_if_changed(config, config_text)
    state.log(f"starting {key} on {address}")
    log_path = state.dir / "logs" / f"{key}.log"
    rec = host.spawn(argv, log_path)
    state.record(key, rec)
    host.wait_for(ready, key, 20, rec, log_path)


# ---- logins ----------------------------------------------------------------------------------

def ensure_auth_credentials(state: State) -> bool:
    """The auth registry's password, made once and kept in a 0600 file, and its htpasswd
    entry. True when the htpasswd file had to be (re)written."""
    return ensure_htpasswd(state, layout.auth_registry_password_file(state.dir),
                           layout.auth_registry_htpasswd(state.dir),
                           (layout.AUTH_REGISTRY_USER,),
                           f"{layout.AUTH_REGISTRY}'s user {layout.AUTH_REGISTRY_USER}")


def ensure_htpasswd(state: State, pw_file: Path, htpasswd: Path, users: tuple[str, ...],
                    whose: str) -> bool:
    """The password, made once and kept in `pw_file` (0600), and a bcrypt entry of it for
    each of `users` in `htpasswd` (0600). True when the htpasswd file had to be
    (re)written."""
    import bcrypt  # a paramiko dependency; only `up` needs it

    password = ensure_password(pw_file, whose, state.log)
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
    write_private(htpasswd, "".join(
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()}\n"
        for user in users))
    return True


def _auth_registry_ready(state: State) -> bool:
    password = read_password(layout.auth_registry_password_file(state.dir))
    return password is not None and host.registry_ready(
        layout.AUTH_REGISTRY_PORT, (layout.AUTH_REGISTRY_USER, password))


# ---- the registry with token auth, and its token issuer ---------------------------------------

def _ensure_token_registry(state: State) -> None:
    """The issuer first (the registry's readiness is a token of the issuer's that it
    accepts). Both are restarted when the signing key is made again (distribution reads its
    rootcertbundle only when it starts); the issuer also when its config changed. A new
    password needs no restart: the issuer reads its users file at every request."""
    ensure_htpasswd(state, layout.token_registry_password_file(state.dir),
                    layout.token_registry_htpasswd(state.dir),
                    (layout.TOKEN_REGISTRY_USER, layout.TOKEN_REGISTRY_PUSH_ONLY_USER),
                    f"{layout.TOKEN_REGISTRY}'s users {layout.TOKEN_REGISTRY_USER} and "
                    f"{layout.TOKEN_REGISTRY_PUSH_ONLY_USER}")
    new_key = ensure_token_signing_key(state)
    config = layout.token_issuer_config_file(state.dir)
    new_config = host.write_if_changed(config, layout.token_issuer_config(state.dir))
    argv = layout.token_issuer_argv(state.dir, sys.executable)
    key = "token-issuer"
    rec = state.adopt(key, str(config), os.path.basename(argv[0]))
    if rec and (new_key or new_config):
        state.log(f"restarting {key} (pid {rec['pid']}): its "
                  f"{'signing key' if new_key else 'config'} changed")
        host.stop(rec)
        rec = None
    if rec and not host.answers(host.token_issuer_token, 5):
        state.log(f"{key} (pid {rec['pid']}) alive but not answering; restarting it")
        host.stop(rec)
        rec = None
    if not rec:
        state.log(f"starting {key} on {layout.TOKEN_ISSUER_LISTEN}")
        log_path = state.dir / "logs" / f"{key}.log"
        rec = host.spawn(argv, log_path)
        state.record(key, rec)
        host.wait_for(host.token_issuer_token, key, 20, rec, log_path)
    _ensure_process(state, "token-registry", layout.TOKEN_REGISTRY,
                    state.dir / "token-registry.yml", layout.token_registry_config(state.dir),
                    state.dir / "token-registry", layout.token_registry_argv(state.dir),
                    lambda: _token_registry_ready(state), restart=new_key,
                    why="the issuer's signing key changed")


def ensure_token_signing_key(state: State) -> bool:
    """The issuer's key (0600) and its self-signed certificate, made once; made again when
    either is missing or they do not belong together. True when they were (re)made."""
    from runner_lab import token_issuer

    directory = layout.token_issuer_dir(state.dir)
    key_file, cert_file = directory / "key.pem", directory / "cert.pem"
    try:
        if token_issuer.key_matches_cert(key_file.read_bytes(), cert_file.read_bytes()):
            return False
    except OSError:
        pass
    key_pem, cert_pem = token_issuer.make_signing_key(layout.TOKEN_ISSUER)
    write_private(key_file, key_pem.decode())
    host.write_if_changed(cert_file, cert_pem.decode())
    state.log(f"made the token issuer's signing key and certificate: {directory}")
    return True


def _token_issuer_current(state: State) -> bool:
    """The issuer's config is the one `up` writes now, and it accepts every user's login
    (a lab brought up by an older version lacks the push-only user)."""
    try:
        config = layout.token_issuer_config_file(state.dir).read_text()
    except OSError:
        return False
    password = _token_password(state)
    return (config == layout.token_issuer_config(state.dir) and password is not None
            and all(host.token_issuer_token((user, password)) for user in
                    (layout.TOKEN_REGISTRY_USER, layout.TOKEN_REGISTRY_PUSH_ONLY_USER)))


def _token_password(state: State) -> str | None:
    return read_password(layout.token_registry_password_file(state.dir))


def _token_registry_ready(state: State) -> bool:
    password = _token_password(state)
    return password is not None and host.token_registry_ready(
        (layout.TOKEN_REGISTRY_USER, password))
