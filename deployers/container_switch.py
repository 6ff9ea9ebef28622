"""The switch both cutovers over SSH share: the container under the app's name set aside as
`<app>_prev_<run>` (stopped first when it publishes host ports, which two containers cannot
share), then the new one started (the plan's `rename_previous`, `stop_previous`, `run`). What
counts as "already running" and how the new container starts are the cutover's."""
from __future__ import annotations

from collections.abc import Callable

from deployers import commands as cmd
from deployers.base import StepFailed, Switch
from deployers.health import ContainerState
from deployers.server_session import OnServer, Run, ServerSession
from deployers.spec import env_file_content, identity_of, record_identity
from deployers.ssh_connection import Connection


def switch_server(s: ServerSession, sw: Switch, *,
                  unchanged: Callable[[Connection, OnServer, ContainerState], bool],
                  start: Callable[[Connection, Run, OnServer], str]) -> None:
    """`unchanged(conn, st, cur)`: the container found under the app's name is this release,
    nothing to switch (sets sw.unchanged); `start(conn, run, st)`: start the new release,
    returning its container's id."""
    conn, run, st = s.on(sw)
    spec = sw.release.spec
    with s.as_step(sw.server, touched=True):
        cur = s.d.inspect(conn, spec.name, run)
        if cur is not None and unchanged(conn, st, cur):
            sw.unchanged = True
            return
        with s.phase(sw.server, "switch"):
            if cur is not None:
                set_aside(run, st, cur)
            if st.prev_name and st.prev_was_running and spec.ports:
                run(st.plan.argv("stop_previous"), check=True, timeout=spec.stop_timeout + 30)
                st.prev_stopped = True
        with s.phase(sw.server, "start"):
            st.new_id = start(conn, run, st)


def already_running(st: OnServer, sw: Switch, cur: ContainerState) -> bool:
    """`cur` is this very release, verified, running well: nothing to switch. Pure."""
    verified = record_identity(st.history[-1]) if st.history else None
    return (identity_of(cur.labels) == sw.release.identity == verified and cur.running
            and cur.health != "unhealthy" and cur.restart_count == 0)


def start_new(s: ServerSession, conn: Connection, run: Run, sw: Switch, st: OnServer) -> str:
    """The plan's `run` of the new container, its env through a 0600 file removed right
    after; returns the new container's id."""
    spec = sw.release.spec
    values: dict = {}
    if spec.secret_env:
        values[cmd.SECRETS] = sw.release.secrets
    env_path = None
    if spec.has_env:
        env_path = s.scratch_path(conn, "env", ".env")
        conn.write_private_file(env_path, env_file_content(st.secret_values))
        values[cmd.ENV_FILE] = env_path
    try:
        r = run(st.plan.argv("run", values), check=False, timeout=s.d.stage.ssh.command_timeout)
    finally:
        if env_path:
            conn.remove_file(env_path)
    if not r.ok:
        raise StepFailed(sw.server, f"docker run failed: {r.output[-500:]}")
    new_id = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    s.d.log(f"{sw.server}: started {spec.name} ({sw.release.digest[:19]})")
    return new_id


def set_aside(run: Run, st: OnServer, cur: ContainerState) -> None:
    """The plan's `rename_previous` of the container found under the app's name."""
    st.prev_id, st.prev_was_running = cur.id, cur.running
    st.prev_labels = dict(cur.labels)
    run(st.plan.argv("rename_previous"), check=True)
    st.prev_name = st.plan.command("rename_previous").argv[-1]


