"""A release's secret values on one server: the values of its whole env (plain and secret) for
the env file, and the keyed fingerprint of the secret values (deployers.spec.secret_fingerprint)
that the release is recorded with, keyed by the app's own key kept on the server (0600, made
once), so that two servers' fingerprints of one value differ and none can be guessed."""
from __future__ import annotations

import os

from deployers.server_session import ServerSession
from deployers.spec import Release, secret_fingerprint
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError


def with_secrets(s: ServerSession, conn: Connection, release: Release
                 ) -> tuple[Release, dict[str, str]]:
    """The release with the fingerprint of its secret values on this server, and the
    values of its whole env (plain and secret) for the env file."""
    spec = release.spec
    values = dict(spec.env)
    for var, name in spec.secret_env:
        values[var] = s.d.secret_value(name)
    if not spec.secret_env:
        return release, values
    fp = secret_fingerprint(app_key(s, conn), spec, values)
    if release.secrets and release.secrets != fp:
        s.d.log(f"{conn.label}: the secret values differ from those this release was "
                f"recorded with (rotated since): the current values are used")
    return release.with_secrets(fp), values


def app_key(s: ServerSession, conn: Connection) -> bytes:
    """The app's fingerprint key on this server (32 random bytes, 0600), made once."""
    directory = f"{s.d.runner_dir(conn)}/apps/{s.d.key}"
    conn.ensure_private_dir(directory)
    path = f"{directory}/secrets.key"

    def read(sftp):
        try:
            with sftp.open(path, "r") as f:
                return f.read()
        except FileNotFoundError:
            return None
    key = conn.sftp_do(read)
    if not key:
        try:
            conn.write_private_file(path, os.urandom(32))
        except OSError:
            pass  # made by another run in between: read that one
        key = conn.sftp_do(read)
    if not key or len(key) < 32:
        raise TransportError(conn.label, f"the app's fingerprint key {path} is unreadable")
    return bytes(key)
