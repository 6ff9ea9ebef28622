"""Commit status: pending when a run starts, then success / failure / error, reported back to
GitHub or Gitea/Forgejo (both take the same body at .../repos/OWNER/NAME/statuses/SHA), or to
GitLab (.../projects/GROUP%2FNAME/statuses/SHA, its own states and field names).

Posted from one background thread so that a slow or unreachable forge never delays a run or a
webhook answer; each report is tried a few times and its outcome logged, never raised.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from urllib.parse import quote

import httpx

from runner.daemon.config import CommitStatus

log = logging.getLogger("runner.daemon.status")

STATE = {"running": "pending", "queued": "pending", "success": "success", "failed": "failure",
         "invalid": "error", "cancelled": "error", "interrupted": "error"}
# GitLab's commit status states (POST /projects/:id/statuses/:sha): it has its own running and
# canceled, and no error (a run that could not run is failed there).
GITLAB_STATE = {"running": "running", "queued": "pending", "success": "success", "failed": "failed",
                "invalid": "failed", "cancelled": "canceled", "interrupted": "canceled"}
DESCRIPTION = {"running": "running", "queued": "queued", "success": "succeeded", "failed": "failed",
               "invalid": "pipeline invalid", "cancelled": "cancelled", "interrupted": "interrupted"}


def reported_event(trigger: str, event: Mapping | None) -> str:
    """The event a run reports under (`{event}` of the context): its trigger (push, tag,
    pull_request, poll, cron, manual, rollback); a retry reports under the trigger of the run it
    runs again, which its stored request keeps, so that a retried pull-request run does not
    overwrite the push's status of the same commit."""
    if trigger == "retry":
        request = (event or {}).get("request")
        if isinstance(request, dict) and isinstance(request.get("kind"), str):
            return request["kind"]
    return trigger or "manual"


def status_context(cfg: CommitStatus, pipeline: str, event: str) -> str:
    """The status's name on the forge. Without `{event}` in it, a pull request's run gets
    " (pull_request)" appended (as GitHub Actions names its checks): a push and a pull request
    of the same commit are two statuses, not one the later overwrites."""
    context = cfg.context.replace("{pipeline}", pipeline)
    if "{event}" in context:
        return context.replace("{event}", event)
    return f"{context} (pull_request)" if event == "pull_request" else context


def status_request(cfg: CommitStatus, token: str, pipeline: str, run_id: int, commit: str,
                   status: str, reason: str = "", event: str = "manual") -> tuple[str, dict, dict]:
    """(url, headers, body) of one status report. Pure; tested by equality."""
    base = cfg.api_url.rstrip("/")
    description = DESCRIPTION.get(status, status)
    if reason and status != "success":
        description = f"{description}: {reason.splitlines()[0]}"
    target_url = (cfg.target_url.replace("{run_id}", str(run_id)).replace("{pipeline}", pipeline)
                  if cfg.target_url else None)
    context = status_context(cfg, pipeline, event)
    if cfg.provider == "gitlab":
        # the project by its path, URL-encoded whole (group/subgroup/name -> group%2Fsubgroup%2Fname)
        url = f"{base}/projects/{quote(cfg.repo, safe='')}/statuses/{commit}"
        headers = {"Accept": "application/json", "PRIVATE-TOKEN": token, "User-Agent": "runner-daemon"}
        body = {"state": GITLAB_STATE.get(status, "failed"), "name": context,
                "description": description[:140]}
    else:
        url = f"{base}/repos/{cfg.repo}/statuses/{commit}"
        headers = {"Accept": "application/vnd.github+json" if cfg.provider == "github" else "application/json",
                   "Authorization": f"{'Bearer' if cfg.provider == 'github' else 'token'} {token}",
                   "User-Agent": "runner-daemon"}
        body = {"state": STATE.get(status, "error"), "context": context, "description": description[:140]}
    if target_url:
        body["target_url"] = target_url
    return url, headers, body


class StatusReporter:
    def __init__(self, core):
        self.core = core
        self._q: queue.Queue = queue.Queue(maxsize=10000)
        self._thread = threading.Thread(target=self._loop, name="commit-status", daemon=True)
        self._thread.start()

    def report(self, pipeline: str, run_id: int, commit: str | None, event: str, status: str,
               reason: str = "") -> None:
        """`event`: what started the run (reported_event), for the status's context."""
        entry = self.core.config.pipeline(pipeline)
        if entry is None or entry.commit_status is None or not commit:
            return
        try:
            self._q.put_nowait((entry.commit_status, pipeline, run_id, commit, event, status, reason))
        except queue.Full:
            log.warning("commit status queue full; report dropped", extra={"run": run_id})

    def report_stored(self, run_id: int, run: Mapping, status: str) -> None:
        """A run as the store gives it back (one recovered or that no daemon serves)."""
        trigger = run.get("trigger") or ""
        event = self.core.store.run_event(run_id) if trigger == "retry" else None
        self.report(run.get("pipeline", ""), run_id, run.get("commit"), reported_event(trigger, event),
                    status, run.get("reason", ""))

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        with httpx.Client(timeout=10) as client:
            while True:
                item = self._q.get()
                if item is None:
                    return
                cfg, pipeline, run_id, commit, event, status, reason = item
                try:
                    token = cfg.token.resolve()
                except Exception as exc:  # noqa: BLE001
                    log.warning("commit status: no token", extra={"run": run_id, "error": str(exc)})
                    continue
                url, headers, body = status_request(cfg, token, pipeline, run_id, commit, status, reason, event)
                for attempt in range(3):
                    try:
                        r = client.post(url, json=body, headers=headers)
                        if r.status_code < 300:
                            log.info("commit status reported", extra={"run": run_id, "state": body["state"]})
                            break
                        log.warning("commit status refused", extra={"run": run_id, "http": r.status_code,
                                                                    "body": r.text[:200]})
                        if r.status_code < 500:
                            break
                    except httpx.HTTPError as exc:
                        log.warning("commit status failed", extra={"run": run_id, "error": str(exc)})
                    time.sleep(0.5 * (attempt + 1))
