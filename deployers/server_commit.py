"""A deploy's commit on one server, the same for every cutover over SSH: with the lock
confirmed, the release recorded as verified in the server's history (the newest last, the
last keep_versions kept), then the cutover retires its previous container, then the images
deployers.pruning says may go are removed (the plan's `prune`)."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

from deployers import commands as cmd
from deployers import pruning
from deployers.base import Switch
from deployers.server_session import OnServer, Run, ServerSession
from deployers.spec import Release, record_identity
from deployers.ssh_connection import Connection


def recorded(history: list[dict], release: Release, keep: int, now: float
             ) -> tuple[list[dict], list[dict]] | None:
    """The history with `release` as the newest verified one, the last `keep` entries, and
    the entries that fell out; None when it is the newest already. Pure."""
    newest = record_identity(history[-1]) if history else None
    if newest == release.identity:
        return None
    history = [h for h in history if record_identity(h) != release.identity]
    history.append(release.record(now))
    return history[-keep:], history[:-keep]


def commit_release(s: ServerSession, sw: Switch,
                   retire: Callable[[Connection, Run, OnServer, list[dict]], None]) -> None:
    """`retire(conn, run, st, history)`: what the cutover does with its previous container
    once its successor is recorded."""
    conn, run, st = s.on(sw)
    d = s.d
    with s.shielded(), s.as_step(sw.server, touched=True), s.phase(sw.server, "commit"):
        lease = s.leases[sw.server]
        lease.verify()
        history = d.history(conn)
        dropped: list[dict] = []
        changed = recorded(history, sw.release, d.stage.keep_versions, time.time())
        if changed is not None:
            history, dropped = changed
            write_history(s, conn, history)
        # Only now, with its successor recorded as verified, is the previous one not needed.
        retire(conn, run, st, history)
        pulled = d.pulled_images(conn)
        for item in pruning.images_to_prune(
                pulled=pulled, dropped=[h["ref"] for h in dropped if h.get("ref")],
                kept=[h["ref"] for h in history if h.get("ref")],
                running=str(sw.release.image)):
            # `docker image rm` refuses an image a container (another app's too) still uses.
            r = run(st.plan.argv("prune", {cmd.PRUNED: item.ref}), check=False)
            if item.ref in pulled and (r.ok or "no such image" in r.output.lower()):
                d.forget_pull(conn, item.ref)
            if r.ok:
                d.log(f"{conn.label}: pruned {item.ref.split('@', 1)[1][:19]} ({item.why})")


def write_history(s: ServerSession, conn: Connection, history: list[dict]) -> None:
    """The server's history file, replaced atomically."""
    conn.ensure_private_dir(f"{s.d.runner_dir(conn)}/apps/{s.d.key}")
    path = s.d.history_path(conn)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    data = json.dumps(history, indent=1).encode()

    def op(sftp):
        with sftp.open(tmp, "w") as f:
            f.write(data)
        sftp.posix_rename(tmp, path)
    conn.sftp_do(op)
