"""What a run's notifications need from the daemon (runner.notifications), given to `runner
exec` in the run's request: the run's page on the dashboard, when `public_url` says where people
reach it, and how the pipeline's previous run ended, from the store (the one history every
daemon sharing it sees)."""
from __future__ import annotations

import logging

from runner.daemon.config import DaemonConfig
from runner.daemon.store import Claimed, Store

log = logging.getLogger(__name__)
LOOK_BACK = 100  # runs of the pipeline looked at for one that ended (others were cancelled)


def previous_status(store: Store, run: Claimed) -> str | None:
    """success or failed: the newest run of the pipeline (and destination) queued before `run`
    that has ended so; "none" when there is none; None when the store cannot say now (the run
    then reads its data directory). Rollbacks are passed over, and so are runs cancelled or
    still running."""
    try:
        earlier = store.list_runs(pipeline=run.pipeline, before_id=run.id, limit=LOOK_BACK)
    except Exception as exc:  # noqa: BLE001 - notifications never stop a run
        log.warning("previous run of %s not read: %s", run.pipeline, exc)
        return None
    for r in earlier:
        if r.get("trigger") == "rollback" or (r.get("destination") or None) != \
                (getattr(run, "destination", None) or None):
            continue
        if r.get("status") in ("success", "failed"):
            return r["status"]
    return "none"


def notice(config: DaemonConfig, store: Store, run: Claimed) -> dict[str, str | None]:
    """The request's run_url and previous_status for `run`."""
    url = f"{config.public_url.rstrip('/')}/runs/{run.id}" if config.public_url else None
    return {"run_url": url, "previous_status": previous_status(store, run)}
