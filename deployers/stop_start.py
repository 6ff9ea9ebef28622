"""The stop-start cutover over SSH: one implementation of the per-server steps
(deployers.base.ServerSteps), over the shared building blocks of deploy targets that run the
docker CLI on a server (deployers.server_session and the modules it names).

- reach, take_lock: connect to every server, then take the app's deploy lock on each, one at a
  time in the order of the lock's directory (which names the server's docker engine), within
  lock.wait in all.
- prepare (deployers.server_prepare): pull by digest if the image is not there; return the
  server to its last verified release if an earlier run left it mid-switch; the keyed
  fingerprint of the secret values.
- switch: the running container `<app>` is renamed `<app>_prev_<run>` and kept (stopped first
  when the spec publishes host ports, which two containers cannot share); the new one starts as
  `<app>` with env through a 0600 env file removed right after `docker run`.
- verify: the health gate (deployers.health, deployers.health_probe) on the new container by
  its id; then the previous one stops.
- restore (deployers.previous_container): remove what this run started, rename the previous
  container back, start it again.
- commit (deployers.server_commit): record the release as verified in the server's history,
  then remove the previous container and prune images (deployers.pruning).

Every remote command first checks that this run still holds the server's lock: a lost lease
stops the deploy on that server at once. Every command that changes the server is one of the
server's plan (deployers.plan), so `--dry-run` shows it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from deployers.base import Restored, ServerPlan, StepFailed, Switch
from deployers.container_switch import already_running, start_new, switch_server
from deployers.health import wait_healthy
from deployers.health_probe import announce, check_name, probe_for, unhealthy_reason
from deployers.previous_container import put_back_previous
from deployers.server_commit import commit_release
from deployers.server_prepare import prepare_server
from deployers.server_session import OnServer, Run, SessionSteps
from deployers.ssh_connection import Connection

if TYPE_CHECKING:
    from deployers.ssh_docker import SSHDockerDeployer


class StopStartSteps(SessionSteps):
    """The per-server steps of the stop-start cutover; see the module docstring."""

    def prepare(self, plan: ServerPlan) -> Switch:
        return prepare_server(self.s, plan)

    def switch(self, sw: Switch) -> None:
        switch_server(self.s, sw,
                      unchanged=lambda conn, st, cur: already_running(st, sw, cur),
                      start=lambda conn, run, st: start_new(self.s, conn, run, sw, st))

    def verify(self, sw: Switch) -> None:
        s = self.s
        conn, run, st = s.on(sw)
        spec = sw.release.spec
        with s.as_step(sw.server, touched=True):
            with s.phase(sw.server, "health"):
                probe = probe_for(s, conn, run, st, st.new_id)
                announce(s, sw, check_name(spec.health) if probe else "", spec.health.timeout)
                verdict = wait_healthy(inspect=lambda: self.d.inspect(conn, st.new_id, run),
                                       probe=probe, health=spec.health, cancel=self.d.cancel)
            if not verdict.healthy:
                raise StepFailed(sw.server, unhealthy_reason(run, st, verdict))
            if st.prev_name and st.prev_was_running and not st.prev_stopped:
                with s.phase(sw.server, "switch"):
                    run(st.plan.argv("stop_previous"), check=True,
                        timeout=spec.stop_timeout + 30)
                st.prev_stopped = True

    def restore(self, sw: Switch) -> Restored:
        return self.s.restore(sw, lambda sw, conn, run: put_back_previous(self.s, sw, conn, run))

    def commit(self, sw: Switch) -> None:
        commit_release(self.s, sw, self._retire)

    def _retire(self, conn: Connection, run: Run, st: OnServer, history: list[dict]) -> None:
        """After the commit: the stop-start cutover removes the previous container."""
        if st.prev_name:
            run(st.plan.argv("remove_previous"), check=False)
