"""Commit status: pending when a run starts, then success / failure / error, reported back to
GitHub or Gitea/Forgejo (both take the same body at .../repos/OWNER/NAME/statuses/SHA).

Posted from one background thread so that a slow or unreachable forge never delays a run or a
webhook answer; each report is tried a few times and its outcome logged, never raised.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import httpx

from runner.daemon.config import CommitStatus

log = logging.getLogger("runner.daemon.status")

STATE = {"running": "pending", "queued": "pending", "success": "success", "failed": "failure",
         "invalid": "error", "cancelled": "error", "interrupted": "error"}
DESCRIPTION = {"running": "running", "queued": "queued", "success": "succeeded", "failed": "failed",
               "invalid": "pipeline invalid", "cancelled": "cancelled", "interrupted": "interrupted"}


def status_request(cfg: CommitStatus, token: str, pipeline: str, run_id: int, commit: str,
                   status: str, reason: str = "") -> tuple[str, dict, dict]:
    """(url, headers, body) of one status report. Pure; tested by equality."""
    base = cfg.api_url.rstrip("/")
    url = f"{base}/repos/{cfg.repo}/statuses/{commit}"
    headers = {"Accept": "application/vnd.github+json" if cfg.provider == "github" else "application/json",
               "Authorization": f"{'Bearer' if cfg.provider == 'github' else 'token'} {token}",
               "User-Agent": "runner-daemon"}
    description = DESCRIPTION.get(status, status)
    if reason and status != "success":
        description = f"{description}: {reason.splitlines()[0]}"
    body = {"state": STATE.get(status, "error"), "context": cfg.context.replace("{pipeline}", pipeline),
            "description": description[:140]}
    if cfg.target_url:
        body["target_url"] = cfg.target_url.replace("{run_id}", str(run_id)).replace("{pipeline}", pipeline)
    return url, headers, body


class StatusReporter:
    def __init__(self, core):
        self.core = core
        self._q: queue.Queue = queue.Queue(maxsize=10000)
        self._thread = threading.Thread(target=self._loop, name="commit-status", daemon=True)
        self._thread.start()

    def report(self, pipeline: str, run_id: int, commit: str | None, status: str, reason: str = "") -> None:
        entry = self.core.config.pipeline(pipeline)
        if entry is None or entry.commit_status is None or not commit:
            return
        try:
            self._q.put_nowait((entry.commit_status, pipeline, run_id, commit, status, reason))
        except queue.Full:
            log.warning("commit status queue full; report dropped", extra={"run": run_id})

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        with httpx.Client(timeout=10) as client:
            while True:
                item = self._q.get()
                if item is None:
                    return
                cfg, pipeline, run_id, commit, status, reason = item
                try:
                    token = cfg.token.resolve()
                except Exception as exc:  # noqa: BLE001
                    log.warning("commit status: no token", extra={"run": run_id, "error": str(exc)})
                    continue
                url, headers, body = status_request(cfg, token, pipeline, run_id, commit, status, reason)
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
