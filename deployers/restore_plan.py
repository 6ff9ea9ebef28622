"""What a restore does, given what the switch did on the server. Pure: the cutovers
(deployers.stop_start, deployers.ssh_proxy) read the server, this decides, they run the planned
commands it names.

- `put_back`: the stop-start undo, which the proxy cutover ends with too: remove what this run
  started (and whatever holds the app's name that is not the previous container: a `docker run`
  whose answer the connection lost), rename the previous container back, start it again.
- `route_back`: the proxy cutover's first move when the route had moved to the new container.
- `unreuse`: a kept container that a rollback started again goes back to being kept, stopped.
"""
from __future__ import annotations

from dataclasses import dataclass

from deployers import commands as cmd
from deployers.health import ContainerState
from deployers.plan import Action


@dataclass(frozen=True)
class PutBack:
    """`actions` in order; `none_before`: nothing of the app ran there before (nothing to put
    back once the new container is gone); `started`: the previous container is started again
    (the steps then check that it runs)."""

    actions: tuple[Action, ...]
    none_before: bool = False
    started: bool = False


def put_back(*, new_id: str, holds_name: str, prev_id: str, prev_was_running: bool) -> PutBack:
    """`new_id`: the container this run started ("" if none is known); `holds_name`: the id of
    the container that has the app's name now ("" if none); `prev_id`, `prev_was_running`:
    the container this run found there, and whether it ran."""
    actions = []
    if new_id:
        actions.append(Action("remove_new", ((cmd.NEW, new_id),), check=False))
    if holds_name and holds_name not in (prev_id, new_id):
        # `docker run` may have made it before the connection dropped, without its id
        actions.append(Action("remove_new", ((cmd.NEW, holds_name),), check=False))
    if not prev_id:
        return PutBack(tuple(actions), none_before=True)
    if holds_name != prev_id:
        actions.append(Action("rename_back"))
    if prev_was_running:
        actions.append(Action("start_previous"))
    return PutBack(tuple(actions), started=prev_was_running)


@dataclass(frozen=True)
class RouteBack:
    """kind: "drop" (nothing ran before: the app's route goes), "gone" (the previous container
    is gone or never was on the runner's network: the route stays, the restore fails),
    "route" (the route goes back to it), "start" (it was drained: start it, gate it, then the
    route goes back to it); `alias`: its name on the runner's network."""

    kind: str
    alias: str = ""


def route_back(prev_id: str, prev: ContainerState | None, alias_label: str) -> RouteBack:
    """`prev`: the previous container as inspected now (None: gone); `alias_label`: the label
    that holds a container's network alias."""
    if not prev_id:
        return RouteBack("drop")
    alias = (prev.labels.get(alias_label) if prev else "") or ""
    if prev is None or not alias:
        return RouteBack("gone")
    return RouteBack("route" if prev.running else "start", alias)


def unreuse(new_id: str, kept_name: str, name_free: bool, drain_timeout: int
            ) -> tuple[Action, ...]:
    """The kept container `new_id` (named `kept_name` before this run started it) stopped and
    kept again: its restart policy off, stopped, renamed back when that name is free."""
    actions = [Action("unrestart_reused", ((cmd.NEW, new_id),), check=False),
               Action("stop_reused", ((cmd.NEW, new_id),), check=False,
                      timeout=drain_timeout + 30)]
    if name_free:
        actions.append(Action("rename_reused_back", ((cmd.NEW, new_id), (cmd.KEPT, kept_name)),
                              check=False))
    return tuple(actions)
