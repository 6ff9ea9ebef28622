"""A delivery -> the request stored with its runs, and a stored run -> the RunRequest its
`runner exec` (or `runner rollback`) is given. Pure.

A webhook's payload is parsed once, when it arrives (runner.trigger): what it says (the provider,
the pull request, the commit's message and author, who pushed) is stored with each run it queues
as the run's request (`event["request"]`), beside the delivery as it came. The store's columns
(the run's kind, ref, branch, tag and commit, as the daemon decided them and as the checkout
later reported the commit) win over it. Runs no webhook started store no request: their columns
say everything. The dashboard reads the same stored request (stored_request).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runner.daemon.store import Claimed
from runner.errors import InvalidInput
from runner.run_request import RepositoryPipeline, RunRequest, checked
from runner.trigger import Trigger


def stored_event(provider: str, headers: Mapping[str, str], payload: dict, trig: Trigger) -> dict[str, Any]:
    """What a webhook's runs store as their event: the delivery as it came and the request it
    makes. InvalidInput when its values make no request (the delivery is refused then)."""
    return {"provider": provider, "headers": dict(headers), "payload": payload,
            "request": RunRequest.from_trigger(trig).to_dict()}


def _stored(event: Mapping[str, Any], commit: str | None) -> dict[str, Any]:
    """The stored request's fields, without the commit's message and author when the run's commit
    is not the one the delivery named (the checkout peeled a tag object): they say nothing of it."""
    stored = event.get("request") if isinstance(event.get("request"), dict) else {}
    if stored.get("commit") != commit:
        stored = {k: v for k, v in stored.items() if k not in ("commit_message", "commit_author")}
    return stored


def stored_request(event: Mapping[str, Any] | None, commit: str | None) -> RunRequest | None:
    """What the run page shows: the request a webhook's run was stored with, for the run's
    `commit`. None for a run no webhook started, and for a row whose request does not check
    (written by hand, or by a version that stored none)."""
    stored = _stored(event or {}, commit)
    if not stored:
        return None
    try:
        return checked(lambda: RunRequest.model_validate(stored), "the stored request")
    except InvalidInput:
        return None


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
    stored = _stored(event, run.commit)
    return checked(lambda: RunRequest.model_validate({**stored, **columns}), f"run {run.id}'s request")
