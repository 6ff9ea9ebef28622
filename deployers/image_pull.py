"""Making a release's image present on a server: `docker pull` by digest when it is not there
yet, after a `docker login` into a config dir of this deploy's own (removed right after the
pull, so that the registry password is not left in the server's ~/.docker/config.json). The
commands are the plan's `login` and `pull`; each pulled image is recorded for pruning
(deployers.pruning)."""
from __future__ import annotations

import re
import time

from deployers import commands as cmd
from deployers.base import ServerPlan, StepFailed
from deployers.remote_files import remove_tree
from deployers.server_session import ServerSession
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

# How docker says that a registry wants a login it did not get (or refused).
REGISTRY_AUTH = re.compile(r"no basic auth credentials|unauthori[sz]ed|authentication required|"
                           r"denied", re.I)
STALE_LOGIN_AGE = 3600.0  # seconds; far longer than any pull: older login dirs are a dead run's


def pull_image(s: ServerSession, conn: Connection, plan: ServerPlan) -> None:
    """The plan's image on the server; raises StepFailed(touched=False) saying why not."""
    d = s.d
    ref = str(plan.release.image)
    if conn.run(cmd.image_present(ref), check=False, cancel=d.cancel).ok:
        return
    registry = plan.release.image.registry
    user = d.stage.registry.username
    auth_dir = None
    try:
        values = {}
        if user:
            auth_dir = _login(s, conn, plan, registry, user)
            values[cmd.LOGIN_DIR] = auth_dir
        t0 = time.monotonic()
        r = conn.run(plan.argv("pull", values), check=False, cancel=d.cancel)
    finally:
        if auth_dir:
            _forget_login(s, conn, auth_dir)
    if not r.ok:
        tail = " ".join(r.output.splitlines()[-3:])
        reason = f"pulling {ref} failed: {tail}"
        if REGISTRY_AUTH.search(tail):
            reason += (f"; registry {registry} refused the server's login as {user!r}"
                       if user else
                       f"; registry {registry} wants a login: set "
                       "stages.deploy.registry.username and password")
        raise StepFailed(conn.label, reason, touched=False)
    # Recorded at once: if this release never gets verified, a later commit removes it.
    d.record_pull(conn, ref)
    d.log(f"{conn.label}: pulled {plan.release.digest[:19]} in {time.monotonic() - t0:.1f}s")


def _login(s: ServerSession, conn: Connection, plan: ServerPlan, registry: str,
           user: str) -> str:
    """`docker login` into a docker config dir of this deploy's own (0700)."""
    d = s.d
    password = d.secret_value(d.stage.registry.password_secret or "")
    auth_dir = s.scratch_path(conn, "auth")
    conn.sftp_do(lambda sftp: sftp.mkdir(auth_dir, 0o700))
    r = conn.run(plan.argv("login", {cmd.LOGIN_DIR: auth_dir}), stdin=password.encode(),
                 check=False, cancel=d.cancel)
    if not r.ok:
        _forget_login(s, conn, auth_dir)
        tail = " ".join(r.output.splitlines()[-3:])
        raise StepFailed(conn.label, f"docker login to {registry} as {user!r} failed: "
                         f"{tail}; check stages.deploy.registry", touched=False)
    return auth_dir


def _forget_login(s: ServerSession, conn: Connection, auth_dir: str) -> None:
    try:
        conn.sftp_do(lambda sftp: remove_tree(sftp, auth_dir))
    except (OSError, TransportError) as exc:
        s.d.log(f"{conn.label}: WARNING: could not remove the login in {auth_dir} "
                f"({exc}); the next deploy of {s.d.app} removes it")
