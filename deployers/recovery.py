"""What a deploy's prepare does to a server that an earlier run left mid-switch. Pure: the
steps (deployers.server_prepare) list the app's containers and read the history, this decides,
they run the planned commands it names.

The decision goes by the server's history (verified releases only), never by which containers
happen to exist: the newest history entry is the last verified release; a container of the app
that is not it is unverified; containers `<app>_prev_<run>` are what a run set aside.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deployers.health import ContainerState
from deployers.plan import ASIDE, UNVERIFIED, VERIFIED, Action
from deployers.spec import LABEL_DIGEST, identity_of, record_identity


@dataclass(frozen=True)
class Recovery:
    """`actions`: the planned commands to run, in order; `say`: the log line before them ("":
    none); `did`: what it did to what runs, for the report ("" when nothing changed)."""

    actions: tuple[Action, ...] = ()
    say: str = ""
    did: str = ""


def decide_recovery(app: str, history: Sequence[dict], found: Sequence[ContainerState]
                    ) -> Recovery:
    """`history`: the server's verified releases, oldest first; `found`: every container of
    the app there (any state)."""
    current = next((c for c in found if c.name == app), None)
    aside = sorted((c for c in found if c.name.startswith(f"{app}_prev_")),
                   key=lambda c: c.started_at, reverse=True)
    verified = record_identity(history[-1]) if history else None
    if current is not None and verified is not None and \
            identity_of(current.labels) == verified:
        # The last verified release runs: what is aside are older versions a dead run never
        # removed.
        return Recovery(tuple(Action("recover_remove_aside", ((ASIDE, c.id),), check=False)
                              for c in aside))
    if verified is None:
        if current is None and aside:  # an older runner's interrupted deploy
            return Recovery(
                (Action("recover_rename", ((VERIFIED, aside[0].id),)),
                 Action("recover_start", check=False)),
                say=f"an interrupted deploy left {aside[0].name} aside; restoring it",
                did=f"restored {aside[0].name}, left aside by an interrupted deploy")
        return Recovery()
    last = history[-1]["digest"][:19]
    good = next((c for c in aside if identity_of(c.labels) == verified), None)
    if good is None:
        if current is None:
            return Recovery()
        return Recovery(say=f"WARNING: {app} runs {current.labels.get(LABEL_DIGEST, '?')[:19]}, "
                            f"which was never verified, and no container of the last verified "
                            f"release {last} is left; this run replaces it")
    actions: list[Action] = []
    if current is not None:
        say = (f"{app} runs an unverified release ({current.labels.get(LABEL_DIGEST, '?')[:19]}, "
               f"left by an interrupted run); returning to the last verified one {last} first")
        actions.append(Action("recover_remove", ((UNVERIFIED, current.id),)))
    else:
        say = f"an interrupted run left the last verified release aside ({good.name}); restoring it"
    actions += [Action("recover_rename", ((VERIFIED, good.id),)), Action("recover_start")]
    actions += [Action("recover_remove_aside", ((ASIDE, c.id),), check=False)
                for c in aside if c.id != good.id]
    return Recovery(tuple(actions), say=say,
                    did=f"returned to the last verified release {last} first")
