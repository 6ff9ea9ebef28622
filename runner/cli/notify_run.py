"""The notifications of a run that has ended (`runner exec`) and of a rollback (`runner
rollback`): what runner.notifications needs, gathered from the run's result and request.
Warnings and "sent" lines go to stderr (the daemon keeps a run's stderr in its log)."""
from __future__ import annotations

import getpass
import socket
from collections.abc import Callable

from runner.cli.common import say
from runner.model import Pipeline
from runner.notifications import RunOutcome, deliver, previous_local_status
from runner.run_request import RunRequest
from runner.secrets import Masker


def who(request: RunRequest | None) -> str:
    """Who the run is for: who pushed or asked (as the forge said it), else the commit's
    author; else what started it in the daemon (which sets `previous_status` in every request
    it writes); else the user and host that ran it by hand."""
    if request is not None:
        if request.sender or request.commit_author:
            return request.sender or request.commit_author or ""
        if request.previous_status is not None or request.kind != "manual":
            return f"the daemon ({request.kind})"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user} on {socket.gethostname()}"


def notify_run(prep, result) -> None:
    """After `runner exec`'s run (runner.engine's Prepared and RunResult)."""
    pipeline: Pipeline = prep.pipeline
    if not pipeline.notify or result.status not in ("success", "failed"):
        return
    request: RunRequest = prep.request
    failed = next((s for s in result.stages if s.status == "failed"), None)
    checkout = next((s.outputs for s in result.stages if s.name == "checkout" and s.outputs), {})
    if request.previous_status is not None:
        previous = None if request.previous_status == "none" else request.previous_status
    else:
        previous = previous_local_status(prep.data_dir / "runs", pipeline.name,
                                         pipeline.destination, prep.run_id)
    outcome = RunOutcome(
        pipeline=pipeline.name, status=result.status, destination=pipeline.destination,
        failed_stage=failed.name if failed else None,
        reason=(failed.error if failed else None) or result.error,
        commit=checkout.get("commit") or request.commit,
        ref=checkout.get("branch") or checkout.get("tag") or request.branch or request.tag,
        who=who(request),
        run_url=request.run_url, previous=previous,
        deployed=any(s.name == "deploy" and s.status == "success" for s in result.stages))
    deliver(pipeline.notify, outcome, prep.secrets.value, prep.masker, say)


def notify_rollback(pipeline: Pipeline, secret: Callable[[str], str], masker: Masker, ok: bool,
                    reason: str | None, request: RunRequest | None) -> None:
    """After `runner rollback`, either way (an interrupted one says nothing)."""
    if not pipeline.notify:
        return
    outcome = RunOutcome(pipeline=pipeline.name, what="rollback",
                         status="success" if ok else "failed", destination=pipeline.destination,
                         reason=reason, who=who(request),
                         run_url=request.run_url if request else None)
    deliver(pipeline.notify, outcome, secret, masker, say)
