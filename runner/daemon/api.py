"""The JSON HTTP API and the ASGI app (webhooks + API + health).

Reading is open unless `read_requires_token`; anything that changes state (cancel, trigger)
needs the API token: `Authorization: Bearer TOKEN`, compared in constant time.
"""
from __future__ import annotations

import hmac
import json
from datetime import datetime, timezone

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runner.daemon.webhooks import make_hook_handler
from runner.gitsafety import check_ref
from runner.errors import InvalidInput


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds") if t else None


def run_view(run: dict) -> dict:
    out = dict(run)
    for k in ("created_at", "started_at", "finished_at"):
        out[k] = _iso(run.get(k))
    if run.get("started_at") and run.get("finished_at"):
        out["duration"] = round(run["finished_at"] - run["started_at"], 3)
    return out


def _token_ok(core, request: Request) -> bool:
    token = core.api_token
    if not token:
        return False
    given = request.headers.get("authorization", "")
    if given.lower().startswith("bearer "):
        given = given[7:].strip()
    else:
        given = request.headers.get("x-runner-token", "")
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def _deny(core) -> JSONResponse:
    if not core.api_token:
        return JSONResponse({"error": "no api_token is configured in this daemon: state-changing calls are off"},
                            status_code=403)
    return JSONResponse({"error": "a valid API token is required (Authorization: Bearer TOKEN)"},
                        status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _int(value: str | None, default: int | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def build_app(core) -> Starlette:
    def reader(fn):
        async def endpoint(request: Request):
            if core.config.read_requires_token and not _token_ok(core, request):
                return _deny(core)
            return await fn(request)
        return endpoint

    async def healthz(request: Request):
        return JSONResponse({"ok": True, "daemon": core.owner, "active_runs": len(core.pool.active),
                             "draining": core.pool.draining})

    async def list_runs(request: Request):
        q = request.query_params
        runs = await run_in_threadpool(core.store.list_runs, pipeline=q.get("pipeline"), status=q.get("status"),
                                    branch=q.get("branch"),
                                    trigger=q.get("trigger"), limit=_int(q.get("limit"), 50) or 50,
                                    before_id=_int(q.get("before"), None))
        return JSONResponse({"runs": [run_view(r) for r in runs]})

    async def get_run(request: Request):
        run_id = _int(request.path_params["run_id"], 0)
        run = await run_in_threadpool(core.store.get_run, run_id)
        if run is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        stages = await run_in_threadpool(core.store.stages, run_id)
        for s in stages:
            s["started_at"], s["finished_at"] = _iso(s["started_at"]), _iso(s["finished_at"])
        return JSONResponse({**run_view(run), "stages": stages})

    async def run_logs(request: Request):
        run_id = _int(request.path_params["run_id"], 0)
        run = await run_in_threadpool(core.store.get_run, run_id)
        if run is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        q = request.query_params
        stage = request.path_params.get("stage") or q.get("stage")
        lines = await run_in_threadpool(core.store.logs, run_id, stage=stage, after=_int(q.get("after"), 0) or 0,
                                limit=_int(q.get("limit"), 1000) or 1000)
        return JSONResponse({"run_id": run_id, "status": run["status"], "lines": lines,
                             "next": lines[-1]["seq"] if lines else _int(q.get("after"), 0) or 0})

    async def deliveries(request: Request):
        q = request.query_params
        rows = await run_in_threadpool(core.store.deliveries, limit=_int(q.get("limit"), 50) or 50, provider=q.get("provider"))
        for r in rows:
            r["received_at"] = _iso(r["received_at"])
        return JSONResponse({"deliveries": rows})

    async def pipelines(request: Request):
        return JSONResponse({"pipelines": [
            {"name": p.name, "file": p.file, "repo": p.repo, "concurrency": p.concurrency,
             "concurrency_group": p.concurrency_group, "cancel_in_progress": p.cancel_in_progress,
             "triggers": p.triggers.model_dump(mode="json")} for p in core.config.pipelines]})

    async def cancel(request: Request):
        if not _token_ok(core, request):
            return _deny(core)
        run_id = _int(request.path_params["run_id"], 0)
        before = await run_in_threadpool(core.cancel, run_id, "cancelled through the API")
        if before is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        run = await run_in_threadpool(core.store.get_run, run_id)
        return JSONResponse({"run": run_view(run), "was": before,
                             "cancelled": before in ("queued", "running")},
                            status_code=202 if before == "running" else 200)

    async def trigger(request: Request):
        if not _token_ok(core, request):
            return _deny(core)
        name = request.path_params["name"]
        if core.config.pipeline(name) is None:
            return JSONResponse({"error": f"no pipeline {name!r}"}, status_code=404)
        if int(request.headers.get("content-length") or 0) > 64 * 1024:
            return JSONResponse({"error": "body over 64 KiB"}, status_code=413)
        try:
            raw = await request.body()
            if len(raw) > 64 * 1024:
                return JSONResponse({"error": "body over 64 KiB"}, status_code=413)
            body = json.loads(raw) if raw else {}
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        branch, tag = body.get("branch"), body.get("tag")
        variables = body.get("vars") or {}
        try:
            for v in (branch, tag):
                if v is not None:
                    check_ref(str(v))
            if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
                raise InvalidInput("vars must be an object of strings")
        except InvalidInput as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        run_id = await run_in_threadpool(core.trigger_manual, name, branch, tag, body.get("commit"), variables)
        return JSONResponse({"run": run_view(await run_in_threadpool(core.store.get_run, run_id))},
                            status_code=201)

    routes = [
        Route("/healthz", healthz),
        Route("/hooks/github", make_hook_handler(core, "github"), methods=["POST"]),
        Route("/hooks/gitea", make_hook_handler(core, "gitea"), methods=["POST"]),
        Route("/hooks/gitlab", make_hook_handler(core, "gitlab"), methods=["POST"]),
        Route("/hooks/generic", make_hook_handler(core, "generic"), methods=["POST"]),
        Route("/api/runs", reader(list_runs)),
        Route("/api/runs/{run_id}", reader(get_run)),
        Route("/api/runs/{run_id}/logs", reader(run_logs)),
        Route("/api/runs/{run_id}/stages/{stage}/log", reader(run_logs)),
        Route("/api/runs/{run_id}/cancel", cancel, methods=["POST"]),
        Route("/api/deliveries", reader(deliveries)),
        Route("/api/pipelines", reader(pipelines)),
        Route("/api/pipelines/{name}/trigger", trigger, methods=["POST"]),
    ]
    return Starlette(routes=routes)
