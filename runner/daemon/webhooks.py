"""Webhook deliveries: signature checks, event classification, filters, and the ASGI handlers.

The pure half (verify_*, classify, match_pipelines, push_filter, pull_request_filter,
pull_request_policy, new_run, new_pull_request_run) takes bytes and dicts and returns values; the
handler half reads the request, records the outcome in the store and answers. The run row is
committed before the response is sent; no work happens here.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import time
import urllib.parse
from typing import Any, Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from runner.daemon.config import DaemonConfig, PipelineEntry
from runner.daemon.run_requests import stored_event
from runner.daemon.store import DeliveryAbout, NewRun, StoreError
from runner.errors import InvalidInput
from runner.gitsafety import redact_url
from runner.trigger import Trigger, UnsupportedEvent, parse_event

log = logging.getLogger("runner.daemon.webhooks")

# Headers kept with a run's event (for `runner exec --event`): never signatures or tokens.
_KEEP_HEADERS = ("x-github-event", "x-github-delivery", "x-gitea-event", "x-gitea-delivery",
                 "x-forgejo-event", "x-gitlab-event", "x-gitlab-event-uuid", "idempotency-key",
                 "x-runner-event", "x-runner-delivery", "content-type", "user-agent")


# -- signatures (pure) ------------------------------------------------------------------------

def _b(text: str | bytes | None) -> bytes:
    if text is None:
        return b""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def hmac_sha256_hex(secret: str | bytes, body: bytes) -> str:
    return hmac.new(_b(secret), body, hashlib.sha256).hexdigest()


def verify_github(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """X-Hub-Signature-256: "sha256=" + hex HMAC-SHA256 of the raw body."""
    if not header or not secret:
        return False
    return hmac.compare_digest(_b("sha256=" + hmac_sha256_hex(secret, body)), _b(header.strip()))


def verify_gitea(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """X-Gitea-Signature (and Forgejo's X-Forgejo-Signature): bare hex HMAC-SHA256."""
    if not header or not secret:
        return False
    return hmac.compare_digest(_b(hmac_sha256_hex(secret, body)), _b(header.strip().lower()))


def verify_gitlab(secret: str | bytes, header: str | None) -> bool:
    """X-Gitlab-Token: the secret itself, compared in constant time."""
    if not header or not secret:
        return False
    return hmac.compare_digest(_b(secret), _b(header))


def verify_generic(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """X-Runner-Signature: "sha256=<hex>" (GitHub's form) or bare hex, HMAC-SHA256 of the body."""
    if not header or not secret:
        return False
    value = header.strip()
    if value.startswith("sha256="):
        value = value[len("sha256="):]
    return hmac.compare_digest(_b(hmac_sha256_hex(secret, body)), _b(value.lower()))


def verify(provider: str, secret: str, body: bytes, headers: Mapping[str, str]) -> bool:
    if provider == "github":
        return verify_github(secret, body, headers.get("x-hub-signature-256"))
    if provider == "gitea":
        return verify_gitea(secret, body, headers.get("x-gitea-signature") or headers.get("x-forgejo-signature"))
    if provider == "gitlab":
        return verify_gitlab(secret, headers.get("x-gitlab-token"))
    if provider == "generic":
        return verify_generic(secret, body, headers.get("x-runner-signature") or headers.get("x-hub-signature-256"))
    return False


def signature_header_present(provider: str, headers: Mapping[str, str]) -> bool:
    names = {"github": ("x-hub-signature-256",), "gitea": ("x-gitea-signature", "x-forgejo-signature"),
             "gitlab": ("x-gitlab-token",), "generic": ("x-runner-signature", "x-hub-signature-256")}
    return any(headers.get(n) for n in names.get(provider, ()))


# -- what kind of delivery (pure) -------------------------------------------------------------

def delivery_id(provider: str, headers: Mapping[str, str]) -> str | None:
    names = {"github": ("x-github-delivery",), "gitea": ("x-gitea-delivery", "x-forgejo-delivery"),
             "gitlab": ("idempotency-key", "x-gitlab-event-uuid"),
             "generic": ("x-runner-delivery", "idempotency-key")}
    for n in names.get(provider, ()):
        v = headers.get(n)
        if v:
            return v.strip()[:200]
    return None


def event_name(provider: str, headers: Mapping[str, str]) -> str:
    if provider == "github":
        return headers.get("x-github-event", "")
    if provider == "gitea":
        return headers.get("x-gitea-event") or headers.get("x-forgejo-event", "")
    if provider == "gitlab":
        return headers.get("x-gitlab-event", "")
    return headers.get("x-runner-event", "push")


def classify(provider: str, event: str) -> str:
    """"push", "pull_request", "ping" or "other"."""
    e = event.strip().lower()
    if provider == "github":  # "delete" is parsed too, so that it is recorded as a deletion
        return {"push": "push", "delete": "push", "ping": "ping",
                "pull_request": "pull_request"}.get(e, "other")
    if provider == "gitea":
        return {"push": "push", "delete": "push", "pull_request": "pull_request"}.get(e, "other")
    if provider == "gitlab":
        return {"push hook": "push", "tag push hook": "push",
                "merge request hook": "pull_request"}.get(e, "other")
    return {"push": "push", "ping": "ping", "": "push"}.get(e, "other")


# -- which pipelines a push starts (pure) -----------------------------------------------------

_SCP = re.compile(r"^(?:[^@/:]+@)?([^@/:\[\]]+):(.*)$")


def normalize_repo(url: str | None) -> str:
    """A comparable form of a repository URL: host/path for remote ones (scheme, user, port and
    .git dropped, host lowercased), the absolute path for local ones."""
    if not url:
        return ""
    u = url.strip()
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", u)
    if m:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "file":
            return normalize_repo(rest)
        host, _, path = rest.partition("/")
        host = host.rsplit("@", 1)[-1].split(":")[0].lower()
        return f"{host}/{path.strip('/').removesuffix('.git')}"
    if not u.startswith("/") and _SCP.match(u):
        host, path = _SCP.match(u).groups()
        return f"{host.lower()}/{path.strip('/').removesuffix('.git')}"
    return os.path.abspath(u).rstrip("/").removesuffix(".git") if u else ""


def _payload_urls(payload: Mapping[str, Any]) -> set[str]:
    repo = payload.get("repository") or payload.get("project") or {}
    urls = set()
    if isinstance(repo, dict):
        for k in ("clone_url", "html_url", "ssh_url", "git_url", "url", "git_http_url", "git_ssh_url",
                  "http_url", "web_url", "homepage"):
            v = repo.get(k)
            if isinstance(v, str) and v:
                urls.add(v)
    for k in ("repo_url", "clone_url"):
        v = payload.get(k)
        if isinstance(v, str) and v:
            urls.add(v)
    return urls


def _payload_repos(trigger: Any, payload: Mapping[str, Any]) -> set[str]:
    """The normalized URLs the payload gives for its repository (a pull request's: the base
    repository, never the head's: a fork must not pass for the repository it targets)."""
    urls = {normalize_repo(u) for u in _payload_urls(payload)}
    urls |= {normalize_repo(getattr(trigger, k, None)) for k in ("repo_url", "clone_url")}
    urls.discard("")
    return urls


def match_pipelines(config: DaemonConfig, trigger: Any, payload: Mapping[str, Any],
                    names: list[str] | None) -> tuple[list[PipelineEntry], str]:
    """The pipelines a delivery is for: the ones named (?pipeline=a,b) or whose repo matches one of
    the payload's repository URLs. Returns (pipelines, why not: for none, or for those left out).

    A named pipeline that has a `repo` is still only started by a payload of that repository:
    the provider-wide secret is shared by every repository's webhook, and a hook of repository
    A that names pipeline B must not build A's commit as B. One without `repo` (started by
    scripts, the generic hook) is started by name alone."""
    urls = _payload_repos(trigger, payload)
    if names:
        found: list[PipelineEntry] = []
        why: list[str] = []
        missing = [n for n in names if config.pipeline(n) is None]
        if missing:
            why.append(f"no such pipeline: {', '.join(missing)}")
        for p in config.pipelines:
            if p.name not in names:
                continue
            if p.repo and normalize_repo(p.repo) not in urls:
                mine = normalize_repo(p.repo)
                if urls:
                    shown = normalize_repo(getattr(trigger, "clone_url", None)
                                           or getattr(trigger, "repo_url", None)) or sorted(urls)[0]
                    why.append(f"{p.name}: the payload's repository {shown} is not this "
                               f"pipeline's repository {mine}")
                else:
                    why.append(f"{p.name}: the payload names no repository; this pipeline "
                               f"builds {mine}")
                continue
            found.append(p)
        return found, "; ".join(why)
    found = [p for p in config.pipelines if p.repo and normalize_repo(p.repo) in urls]
    return found, ("" if found else f"no pipeline serves repository {sorted(urls)[:3]}")


def push_filter(p: PipelineEntry, branch: str | None, tag: str | None) -> str | None:
    """None if the push should start a run of p; else the reason it does not. With
    triggers.tag, a tag is for it alone (a promotion: runner.daemon.worker)."""
    promote = p.triggers.tag
    if tag is not None and promote is not None:
        if not any(fnmatch.fnmatchcase(tag, pat) for pat in promote.tags):
            return f"{p.name}: tag {tag!r} matches none of triggers.tag.tags {list(promote.tags)}"
        return None
    push = p.triggers.push
    if push is None:
        return f"{p.name}: push trigger disabled"
    if tag is not None:
        if not any(fnmatch.fnmatchcase(tag, pat) for pat in push.tags):
            return f"{p.name}: tag {tag!r} matches none of triggers.push.tags {list(push.tags)}"
        return None
    if branch is not None:
        if not any(fnmatch.fnmatchcase(branch, pat) for pat in push.branches):
            return f"{p.name}: branch {branch!r} matches none of triggers.push.branches {list(push.branches)}"
        return None
    return f"{p.name}: the push names neither a branch nor a tag"


def group_key(p: PipelineEntry, branch: str | None, tag: str | None, ref: str | None) -> str | None:
    if p.concurrency_group is None:
        return None
    return p.concurrency_group.replace("{pipeline}", p.name).replace("{branch}", branch or tag or ref or "")


def pull_request_group(number: int) -> str:
    """What "{branch}" becomes in a pull request run's group: the runs of one pull request
    supersede each other, not the base branch's (config.PullRequestTrigger says why ":")."""
    return f"pr:{number}"


def new_run(p: PipelineEntry, kind: str, provider: str | None, ref: str | None, branch: str | None,
            tag: str | None, commit: str | None, event: dict, delivery: str | None = None,
            extra_vars: Mapping[str, str] | None = None) -> NewRun:
    return NewRun(pipeline=p.name, trigger=kind, provider=provider, ref=ref, branch=branch, tag=tag,
                  commit=commit, event=event, vars={**p.vars, **(extra_vars or {})},
                  group=group_key(p, branch, tag, ref), cancel_in_progress=p.cancel_in_progress,
                  delivery=delivery, once=kind in ("push", "tag", "poll"), destination=p.destination)


# -- pull / merge requests (pure) -------------------------------------------------------------

# The actions that run a pull request's head again even if it already ran (GitHub and Gitea say
# "reopened", GitLab "reopen").
REBUILD_ACTIONS = ("reopened", "reopen")

# The stages a pull request run leaves out unless the pipeline entry allows them.
PRIVILEGED_STAGES = ("push", "deploy")


def pull_request_name(trigger: Trigger) -> str:
    """"pull request #3", or GitLab's own "merge request !3"."""
    return f"merge request !{trigger.number}" if trigger.provider == "gitlab" \
        else f"pull request #{trigger.number}"


def pull_request_filter(p: PipelineEntry, trigger: Trigger) -> str | None:
    """None if the pull request should start a run of p; else the reason it does not."""
    pr = p.triggers.pull_request
    if pr is None:
        return f"{p.name}: pull requests start nothing (no triggers.pull_request)"
    base = trigger.base_branch or ""
    if not any(fnmatch.fnmatchcase(base, pat) for pat in pr.branches):
        return (f"{p.name}: {pull_request_name(trigger)} targets {base!r}, which matches none of "
                f"triggers.pull_request.branches {list(pr.branches)}")
    return None


def pull_request_policy(p: PipelineEntry, trigger: Trigger) -> tuple[bool, tuple[str, ...]]:
    """(withhold_secrets, skip_stages) of a pull request run of p.

    A pull request runs code that nobody with write access has merged. A same-repository one
    gets the secrets (its author could push that branch and run it anyway) but skips push and
    deploy unless triggers.pull_request allows each. A fork's gets neither secrets nor push nor
    deploy, unless `forks: trusted`; then it is treated like a same-repository one. A pipeline
    without triggers.pull_request gets the strictest answer (it should not be asked)."""
    pr = p.triggers.pull_request
    if pr is None:
        return True, PRIVILEGED_STAGES
    trusted = not trigger.fork or pr.forks == "trusted"
    allowed = {"push": pr.push, "deploy": pr.deploy}
    skip = tuple(s for s in PRIVILEGED_STAGES if not (trusted and allowed[s]))
    return not trusted, skip


def describe_policy(trigger: Trigger, withhold_secrets: bool, skip_stages: tuple[str, ...]) -> str:
    """What a pull request run may do, for the delivery's reason:
    "pull request #3 from a fork: secrets withheld, push and deploy skipped"."""
    origin = "from a fork" if trigger.fork else \
        (f"from branch {trigger.head_branch!r}" if trigger.head_branch else "from this repository")
    secrets = "secrets withheld" if withhold_secrets else "secrets given"
    if skip_stages:
        stages = f"{' and '.join(skip_stages)} skipped"
    else:
        stages = f"{' and '.join(PRIVILEGED_STAGES)} allowed"
    return f"{pull_request_name(trigger)} {origin}: {secrets}, {stages}"


def new_pull_request_run(p: PipelineEntry, trigger: Trigger, event: dict,
                         delivery: str | None = None) -> NewRun:
    """The run of a pull request: its head commit on the base repository's ref for it, in the
    pull request's own concurrency group, with what pull_request_policy takes away."""
    assert trigger.kind == "pull_request" and trigger.number is not None, trigger
    withhold, skip = pull_request_policy(p, trigger)
    # Reopening builds again even when its head already built (as Actions and Woodpecker do):
    # whoever reopens wants a fresh result. A redelivery of that one delivery stays a duplicate.
    once = trigger.action not in REBUILD_ACTIONS
    return NewRun(pipeline=p.name, trigger="pull_request", provider=trigger.provider,
                  ref=trigger.ref, branch=None, tag=None, commit=trigger.commit, event=event,
                  vars=dict(p.vars), group=group_key(p, pull_request_group(trigger.number), None, None),
                  cancel_in_progress=p.cancel_in_progress, delivery=delivery, once=once,
                  withhold_secrets=withhold, skip_stages=skip, destination=p.destination,
                  # In the delivery's reason once queued: who reads it knows what the run may do.
                  note=f"{p.name}: {describe_policy(trigger, withhold, skip)}")


def parse_push(provider: str, payload: dict, headers: Mapping[str, str]) -> Trigger:
    """The shared parser (runner.trigger) turns a push or pull request payload into a Trigger."""
    return parse_event(payload, headers=dict(headers), provider=provider)


# -- the handler ------------------------------------------------------------------------------

def delivery_about(trigger: Trigger) -> DeliveryAbout:
    """What the deliveries page says a push or pull request was about (pure)."""
    repository = trigger.repo_url or redact_url(trigger.clone_url or "")
    if trigger.kind == "pull_request":
        branches = " → ".join(b for b in (trigger.head_branch, trigger.base_branch) if b)
        return DeliveryAbout(repository, f"#{trigger.number} {branches}".strip(), trigger.action or "")
    action = "deleted" if trigger.deleted else "created" if trigger.before is None else ""
    return DeliveryAbout(repository, trigger.ref, action)


def _reply(status: int, **body) -> JSONResponse:
    return JSONResponse(body, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The raw body, or None when it is over `limit` bytes (stops reading there)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            pass
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def make_hook_handler(core, provider: str):
    """An ASGI endpoint for one provider. `core` has .config, .store, .secrets, .after_accept()."""

    async def handler(request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            response = await _handle(request)
        except StoreError as exc:
            # Nothing could be recorded (disk full, database locked or unreachable): say so, the
            # sender may retry. The log names the database; the answer does not (exc.public).
            log.error("cannot record a delivery", extra={"provider": provider, "error": str(exc)})
            if "full" in str(exc):
                core.disk_full("webhook delivery")
            response = _reply(503, outcome="error",
                              reason=f"the daemon cannot record deliveries now: {exc.public}")
        # How long the daemon itself took, for the benchmark and for anyone debugging slow hooks.
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        return response

    async def _handle(request: Request) -> JSONResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        remote = request.client.host if request.client else ""
        did = delivery_id(provider, headers)
        event = event_name(provider, headers)
        store = core.store

        # The store is called from a worker thread: a write that waits on the database (another
        # daemon holding it, a slow disk) must not stall every other request on the event loop.
        async def reject(status: int, why: str) -> JSONResponse:
            await run_in_threadpool(store.record_delivery, provider, did, event, "rejected", why, status, remote)
            log.info("delivery rejected", extra={"provider": provider, "delivery": did, "why": why})
            return _reply(status, outcome="rejected", reason=why)

        secrets = core.secrets_for(provider)
        if not secrets:
            return await reject(404, f"the {provider} webhook is not enabled in this daemon (no secret configured)")
        body = await _read_body(request, core.config.max_body_bytes)
        if body is None:
            return await reject(413, f"payload over {core.config.max_body_bytes} bytes")
        if not signature_header_present(provider, headers):
            return await reject(401, "signature missing")
        matched_secret_pipelines = [names for secret, names in secrets if verify(provider, secret, body, headers)]
        if not matched_secret_pipelines:
            return await reject(401, "signature does not match")
        allowed: set[str] | None = set()
        for names in matched_secret_pipelines:
            if names is None:
                allowed = None
                break
            allowed |= set(names)
        try:
            if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                # GitHub's other content type: payload=<url-encoded JSON>; signed over the raw body.
                form = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=False)
                payload = json.loads(form.get("payload", [""])[0])
            else:
                payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return await reject(400, f"body is not JSON: {exc}")
        if not isinstance(payload, dict):
            return await reject(400, "body is not a JSON object")

        kind = classify(provider, event)
        if kind == "ping":
            await run_in_threadpool(store.record_delivery, provider, did, event or "ping", "ping", "pong", 200, remote)
            return _reply(200, outcome="ping", reason="pong")
        runs: list[NewRun] = []
        reasons: list[str] = []
        trig: Trigger | None = None
        if kind not in ("push", "pull_request"):
            reasons.append(f"event {event!r} is not handled (only pushes and pull requests start runs)")
        else:
            try:
                trig = parse_push(provider, payload, headers)
                kept = {k: v for k, v in headers.items() if k in _KEEP_HEADERS}
                event_of_runs = stored_event(provider, kept, payload, trig)
            except UnsupportedEvent as exc:
                reasons.append(str(exc))
            except InvalidInput as exc:
                return await reject(400, str(exc))
        if trig is not None:
            names = [n for n in request.query_params.get("pipeline", "").split(",") if n] or None
            pipelines, why = match_pipelines(core.config, trig, payload, names)
            if why:
                reasons.append(why)
            for p in pipelines:
                if allowed is not None and p.name not in allowed:
                    reasons.append(f"{p.name}: signed with another pipeline's secret")
                    continue
                if trig.kind == "pull_request":
                    no = pull_request_filter(p, trig)
                    if no:
                        reasons.append(no)
                        continue
                    runs.append(new_pull_request_run(p, trig, event_of_runs, delivery=did))
                    continue
                if trig.deleted:
                    reasons.append(f"{p.name}: the push deletes {trig.ref}")
                    continue
                no = push_filter(p, trig.branch, trig.tag)
                if no:
                    reasons.append(no)
                    continue
                runs.append(new_run(p, "tag" if trig.tag else "push", provider, trig.ref, trig.branch,
                                    trig.tag, trig.commit, event_of_runs, delivery=did))
        about = delivery_about(trig) if trig is not None else DeliveryAbout()
        acc = await run_in_threadpool(store.accept_delivery, provider, did, event, runs, reasons, remote, about)
        if acc.duplicate:
            return _reply(200, outcome="duplicate", reason="this delivery was already received",
                          runs=list(acc.run_ids), delivery=acc.delivery_row)
        if acc.run_ids or acc.cancel_running:
            core.after_accept(acc.cancel_running)
        log.info("delivery %s", acc.outcome, extra={"provider": provider, "delivery": did, "runs": list(acc.run_ids)})
        return _reply(acc.status_code, outcome=acc.outcome, reason=acc.reason, runs=list(acc.run_ids),
                      delivery=acc.delivery_row)

    return handler
