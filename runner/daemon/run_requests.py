"""A stored run -> the RunRequest its `runner exec` (or `runner rollback`) is given. Pure.

The store keeps what the daemon decided when it queued the run (its kind, ref, branch, tag and
commit: these win) and, for a webhook's run, the delivery as it came (read here through the same
parser that accepted it, for what only the payload says: the provider, the pull request, who
pushed). Runs no webhook started carry no payload at all: their columns say everything.
"""
from __future__ import annotations

from runner.daemon.store import Claimed
from runner.run_request import RepositoryPipeline, RunRequest, checked
from runner.trigger import parse_event


def run_request(run: Claimed, pipeline_from: RepositoryPipeline | None = None) -> RunRequest:
    """`pipeline_from`: the entry's repository pipeline and its limits (None: a `file:` entry).
    Raises InvalidInput for a stored run whose values do not make a request (a row written by
    hand, or by a version that checked less)."""
    event = run.event or {}
    columns = dict(kind=run.trigger or "manual", ref=run.ref, branch=run.branch, tag=run.tag,
                   commit=run.commit, pipeline_from=pipeline_from)
    if run.trigger == "rollback":
        return checked(lambda: RunRequest(kind="rollback", rollback_to=(event.get("rollback") or {}).get("to")),
                       f"run {run.id}'s request")
    if isinstance(event.get("payload"), dict):
        trig = parse_event(event["payload"], headers=event.get("headers") or {}, provider=event.get("provider"))
        return RunRequest.from_trigger(trig, **columns)
    return checked(lambda: RunRequest(**columns), f"run {run.id}'s request")
