"""Putting the previous container back on a server (what a restore ends with, in every
cutover): decided by deployers.restore_plan.put_back from what holds the app's name now,
carried out with the plan's `remove_new`, `rename_back` and `start_previous`."""
from __future__ import annotations

from deployers.base import Restored, Switch
from deployers.restore_plan import put_back
from deployers.server_session import OnServer, Run, ServerSession, run_actions
from deployers.ssh_connection import Connection


def put_back_previous(s: ServerSession, sw: Switch, conn: Connection, run: Run) -> Restored:
    st: OnServer = sw.detail
    name = sw.release.spec.name
    holds = s.d.inspect(conn, name, run)
    decided = put_back(new_id=st.new_id, holds_name=holds.id if holds else "",
                       prev_id=st.prev_id, prev_was_running=st.prev_was_running)
    run_actions(run, st.plan, decided.actions)
    if decided.none_before:
        return Restored(True, note="new container removed", none_before=True)
    if decided.started:
        back = s.d.inspect(conn, name, run)
        if back is None or not back.running:
            return Restored(False, kept=name,
                            note=f"the previous container {name} did not start again "
                                 f"({back.status if back else 'gone'})")
    s.d.log(f"{sw.server}: rolled back to the previous container "
            f"({sw.previous_digest[:19] or 'unlabelled'})")
    return Restored(True, running=sw.previous_digest,
                    note=f"rolled back: previous version {sw.previous_digest[:19] or name} "
                         f"{'running' if st.prev_was_running else 'restored'} again")
