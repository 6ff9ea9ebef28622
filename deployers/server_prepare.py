"""A deploy's prepare on one server, the same for every cutover over SSH: the image pulled
(deployers.image_pull); a dead run's env files and old logins swept; the server returned to its
last verified release when an earlier run left it mid-switch (decided by deployers.recovery);
the release's secret fingerprint on this server (deployers.release_secrets)."""
from __future__ import annotations

import re

from deployers.base import ServerPlan, Switch
from deployers.health import ContainerState
from deployers.image_pull import STALE_LOGIN_AGE, pull_image
from deployers.recovery import decide_recovery
from deployers.release_secrets import with_secrets
from deployers.remote_files import sweep
from deployers.server_session import SCRATCH_TAIL, OnServer, ServerSession, run_actions
from deployers.spec import LABEL_DIGEST
from deployers.ssh_connection import Connection


def prepare_server(s: ServerSession, plan: ServerPlan) -> Switch:
    """The `Switch` of this server, its `detail` an OnServer. Raises StepFailed (touched only
    when the recovery changed what runs)."""
    t, d = plan.target, s.d
    with s.as_step(t.label, touched=False):
        conn = s.conn(t)
        with s.phase(t.label, "pull"):
            pull_image(s, conn, plan)
    with s.as_step(t.label, touched=False):
        found = d.app_containers(conn, s.runner(conn))
        before = next((c for c in found if c.name == plan.release.spec.name), None)
    with s.as_step(t.label, touched=True):
        history = d.history(conn)
        recovered = recover(s, conn, plan, history, found)
    with s.as_step(t.label, touched=bool(recovered)):
        release, values = with_secrets(s, conn, plan.release)
    return Switch(t.label, release, recovered=recovered,
                  previous_digest=before.labels.get(LABEL_DIGEST, "") if before else "",
                  detail=OnServer(plan, history, values))


def recover(s: ServerSession, conn: Connection, plan: ServerPlan, history: list[dict],
            found: list[ContainerState]) -> str:
    """Sweep what a dead run left (env files, old logins), then return the server to its last
    verified release if an earlier run left it mid-switch. Returns what it did to what runs
    ("" when nothing)."""
    root, app = s.d.runner_dir(conn), s.d.app
    own = re.escape(app) + SCRATCH_TAIL
    # Env files left by a run that died between writing and removing them; logins left by
    # one that died before its pull ended: only old ones, as a runner of an earlier version
    # pulled before it took the lock and may be pulling right now.
    conn.sftp_do(lambda sftp: (sweep(sftp, f"{root}/env", own + r"\.env"),
                               sweep(sftp, f"{root}/auth", own, STALE_LOGIN_AGE)))
    decided = decide_recovery(app, history, found)
    if decided.say:
        s.d.log(f"{conn.label}: {decided.say}")
    run_actions(s.runner(conn), plan, decided.actions)
    return decided.did
