"""The deploy's check, before any server switches, that the accessories it needs run (the
plan's `accessories` command on each server), and that the runner's network the app joins is
there (the plan's `network` command). Called from the SSH steps' reach, for every server before
any lock, pull or switch: a missing accessory fails the deploy with nothing changed anywhere."""
from __future__ import annotations

import json
import threading

from deployers import commands as cmd
from deployers.accessory_plan import LABEL_ACCESSORY
from deployers.base import ServerPlan, StepFailed
from deployers.health import ContainerState, parse_state
from deployers.ssh_connection import Connection


def states(stdout: str) -> dict[str, ContainerState]:
    try:
        data = json.loads(stdout or "[]")
    except ValueError:
        return {}
    return {s.name: s for s in (parse_state(o) for o in data if isinstance(o, dict))}


def _not_running(state: ContainerState | None) -> str:
    """Why `state` does not count as a running accessory ("" when it does)."""
    if state is None:
        return "no such container"
    if LABEL_ACCESSORY not in state.labels:
        return "a container of that name is there, but not one the runner booted as an accessory"
    if not state.running or state.status == "restarting":
        return f"its container is {state.status}"
    if state.health == "unhealthy":
        return "its container is unhealthy"
    return ""


def check_before_switch(conn: Connection, plan: ServerPlan, *, app: str,
                        cancel: threading.Event | None) -> None:
    """Before any server of a deploy switches: each accessory the plan names for this server
    runs there (else StepFailed, nothing touched, naming it), and the runner's network the app
    joins exists."""
    if plan.has("accessories"):
        argv = plan.argv("accessories")
        r = conn.run(argv, check=False, cancel=cancel)
        found = states(r.stdout)
        bad, names = [], []
        for container in argv[3:]:  # docker container inspect NAME...
            why = _not_running(found.get(container))
            if why:
                names.append(container[len(app) + 1:])
                bad.append(f"accessory {names[-1]!r} ({container}) is not running there: {why}")
        if bad:
            boot = "runner accessory boot PIPELINE" + (f" {names[0]}" if len(names) == 1 else "")
            raise StepFailed(plan.server, "; ".join(bad) + f" (boot it first: `{boot}`)",
                             touched=False)
    if plan.has("network") and not conn.run(cmd.network_inspect(), check=False,
                                            cancel=cancel).ok:
        r = conn.run(plan.argv("network"), check=False, cancel=cancel)
        if not r.ok and "already exists" not in r.output:
            raise StepFailed(plan.server, f"cannot create the runner's network: {r.output}",
                             touched=False)
