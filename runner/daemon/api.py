"""The JSON HTTP API and the ASGI app (webhooks + API + health + metrics), and the HTTP
connection protocol the daemon serves them with.

Reading (runs, logs, deliveries, /metrics) needs the API token unless `read_requires_token` is
off; anything that changes state (cancel, trigger, retry) always needs it:
`Authorization: Bearer TOKEN`, compared in constant time. /healthz is open. An address that gave
a wrong token 5 times within a minute is answered 429 (Retry-After) until that minute has passed
(session.TokenGate, shared with the dashboard's login). A run id in a path that is not one (1 to
2**63-1) is a 404; a number in the query that is not a whole number up to 2**63-1, a 400.
"""
from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timezone

import h11
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from runner.daemon.dashboard.routes import dashboard_routes
from runner.daemon import ids
from runner.daemon.dashboard.session import TokenGate, TooManyGuesses, client_address, presented_token
from runner.daemon.store import FINAL, StoreError
from runner.daemon.webhooks import make_hook_handler
from runner.errors import InvalidInput
from runner.gitsafety import check_ref
from runner.interpolate import NAME_RE


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds") if t else None


def run_view(run: dict) -> dict:
    out = dict(run)
    for k in ("created_at", "started_at", "finished_at"):
        out[k] = _iso(run.get(k))
    if run.get("started_at") and run.get("finished_at"):
        out["duration"] = round(run["finished_at"] - run["started_at"], 3)
    return out


def _deny(core, reading: bool = False) -> JSONResponse:
    if not core.api_token:
        what = ("the read API is closed (configure api_token, or set read_requires_token: false to open it "
                "to anyone who reaches the listener)") if reading else "state-changing calls are off"
        return JSONResponse({"error": f"no api_token is configured in this daemon: {what}"}, status_code=403)
    return JSONResponse({"error": "a valid API token is required (Authorization: Bearer TOKEN)"},
                        status_code=401, headers={"WWW-Authenticate": "Bearer"})


class BadQuery(InvalidInput):
    """A query parameter refused: answered 400."""


def _number(request: Request, name: str, default: int | None) -> int | None:
    """A whole-number query parameter (0 to 2**63-1), `default` when absent. Raises BadQuery."""
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    n = ids.whole(raw)
    if n is None:
        raise BadQuery(f"{name}: {raw[:40]!r} is not a whole number from 0 to {ids.MAX}")
    return n


class BadBody(InvalidInput):
    """A request body refused, with every bad field: [(field path, why)]."""

    def __init__(self, what: str, fields: list[tuple[str, str]]):
        self.fields = fields
        super().__init__(f"invalid {what}: " + "; ".join(f"{f}: {m}" if f else m for f, m in fields))


_TRIGGER_FIELDS = ("branch", "tag", "ref", "commit", "vars")
_COMMIT = re.compile(r"(?:[0-9a-f]{40}|[0-9a-f]{64})")  # sha-1 or sha-256, in full


def trigger_request(body) -> tuple[str | None, str | None, str | None, dict[str, str]]:
    """Check a trigger body once, before anything is queued: (branch, tag, commit, vars).

    `ref` may stand for branch or tag: refs/heads/X, refs/tags/X, or a short name (a branch).
    Raises BadBody naming every bad field at once."""
    problems: list[tuple[str, str]] = []

    def bad(where: str, why: str) -> None:
        problems.append((where, why))

    if not isinstance(body, dict):
        raise BadBody("trigger request", [("", "the body must be a JSON object")])
    for key in body:
        if key not in _TRIGGER_FIELDS:
            bad(str(key), f"unknown field (known: {', '.join(_TRIGGER_FIELDS)})")
    names: dict[str, str] = {}
    for key in ("branch", "tag", "ref"):
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, str) or not v:
            bad(key, "must be a non-empty string")
            continue
        try:
            check_ref(v)
        except InvalidInput as exc:
            bad(key, str(exc))
            continue
        names[key] = v
    given = [k for k in ("branch", "tag", "ref") if body.get(k) is not None]
    if len(given) > 1:
        bad(given[1], f"give one of branch, tag, ref (got {', '.join(given)})")
    branch, tag = names.get("branch"), names.get("tag")
    ref = names.get("ref")
    if ref is not None:
        if ref.startswith("refs/heads/"):
            branch = ref[len("refs/heads/"):]
        elif ref.startswith("refs/tags/"):
            tag = ref[len("refs/tags/"):]
        elif ref.startswith("refs/"):
            bad("ref", f"{ref!r}: only refs/heads/... and refs/tags/... can be triggered")
        else:
            branch = ref
    commit = body.get("commit")
    if commit is not None:
        if not isinstance(commit, str) or not _COMMIT.fullmatch(commit.lower()):
            bad("commit", "must be a full commit sha as a string (40 or 64 hex digits)")
            commit = None
        else:
            commit = commit.lower()
    variables = body.get("vars")
    out_vars: dict[str, str] = {}
    if variables is not None:
        if not isinstance(variables, dict):
            bad("vars", "must be an object of strings")
        else:
            for k, v in variables.items():
                if not NAME_RE.fullmatch(k):
                    bad(f"vars.{k}", "not a variable name (letters, digits, '_'; not starting with a digit)")
                elif not isinstance(v, str):
                    bad(f"vars.{k}", "must be a string")
                elif "\0" in v:  # argv cannot carry it: the run's `runner exec` would not start
                    bad(f"vars.{k}", "must not contain a NUL character")
                else:
                    out_vars[k] = v
    if problems:
        raise BadBody("trigger request", problems)
    return branch, tag, commit, out_vars


def timed_h11_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with a read timeout uvicorn lacks: its keep-alive timer only starts
    after a response, so a connection that never sends a whole request (nothing at all, half a
    request line, headers or a body trickling in) would be held open forever.

    Here a request must have arrived whole within `read_timeout` seconds of the connection
    opening or the previous response ending; otherwise the connection is closed. Once a request
    is in, the timer stops: how long the app takes to answer is not the client's doing."""

    class TimedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_read_timer()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._cancel_read_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start the next (pipelined) request
            self._arm_read_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_read_timer()
            super().connection_lost(exc)

        def _arm_read_timer(self) -> None:
            self._cancel_read_timer()
            if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _cancel_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                # An app still reading the body sees a disconnect (starlette's ClientDisconnect).
                self.transport.close()

    return TimedH11Protocol


def build_app(core) -> Starlette:
    gate = TokenGate(core.api_token)

    def token_ok(request: Request) -> bool:
        return gate.ok(presented_token(request.headers), client_address(request))

    def reader(fn):
        async def endpoint(request: Request):
            if core.config.read_requires_token and not token_ok(request):
                return _deny(core, reading=True)
            return await fn(request)
        return endpoint

    def writer(fn):
        async def endpoint(request: Request):
            if not token_ok(request):
                return _deny(core)
            return await fn(request)
        return endpoint

    def by_run(fn):
        """The route's {run_id}: anything but a run id (1 to 2**63-1) names no run."""
        async def endpoint(request: Request):
            raw = request.path_params["run_id"]
            run_id = ids.run_id(raw)
            if run_id is None:
                return JSONResponse({"error": f"no run {raw[:40]!r}"}, status_code=404)
            return await fn(request, run_id)
        return endpoint

    def counted(provider: str, handler):
        """The webhook handler, counting each answer by its outcome in runner_deliveries_total."""
        async def endpoint(request: Request):
            try:
                response = await handler(request)
            except ClientDisconnect:
                # The sender went away, or the read timeout closed a body that stopped coming.
                core.metrics.delivery(provider, "disconnected")
                return Response(status_code=400)  # nobody is left to read it
            except Exception:
                core.metrics.delivery(provider, "error")  # answered 500 by starlette
                raise
            try:
                outcome = json.loads(response.body).get("outcome") or "unknown"
            except (ValueError, AttributeError):
                outcome = "unknown"
            core.metrics.delivery(provider, str(outcome))
            return response
        return endpoint

    async def healthz(request: Request):
        return JSONResponse({"ok": True, "daemon": core.owner, "active_runs": len(core.pool.active),
                             "draining": core.pool.draining, "leader": core.schedules.leading})

    async def list_runs(request: Request):
        q = request.query_params
        runs = await run_in_threadpool(core.store.list_runs, pipeline=q.get("pipeline"), status=q.get("status"),
                                    branch=q.get("branch"),
                                    trigger=q.get("trigger"), limit=_number(request, "limit", 50) or 50,
                                    before_id=_number(request, "before", None))
        return JSONResponse({"runs": [run_view(r) for r in runs]})

    async def get_run(request: Request, run_id: int):
        run = await run_in_threadpool(core.store.get_run, run_id)
        if run is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        stages = await run_in_threadpool(core.store.stages, run_id)
        for s in stages:
            s["started_at"], s["finished_at"] = _iso(s["started_at"]), _iso(s["finished_at"])
        return JSONResponse({**run_view(run), "stages": stages})

    async def run_logs(request: Request, run_id: int):
        after = _number(request, "after", 0)
        limit = _number(request, "limit", 1000) or 1000
        run = await run_in_threadpool(core.store.get_run, run_id)
        if run is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        stage = request.path_params.get("stage") or request.query_params.get("stage")
        lines = await run_in_threadpool(core.store.logs, run_id, stage=stage, after=after, limit=limit)
        return JSONResponse({"run_id": run_id, "status": run["status"], "lines": lines,
                             "next": lines[-1]["seq"] if lines else after})

    async def deliveries(request: Request):
        q = request.query_params
        rows = await run_in_threadpool(core.store.deliveries, limit=_number(request, "limit", 50) or 50,
                                       provider=q.get("provider"))
        for r in rows:
            r["received_at"] = _iso(r["received_at"])
        return JSONResponse({"deliveries": rows})

    async def daemons(request: Request):
        rows = await run_in_threadpool(core.store.daemons)
        for r in rows:
            r["started_at"], r["seen_at"] = _iso(r["started_at"]), _iso(r["seen_at"])
        return JSONResponse({"daemons": rows, "leader": core.schedules.leading and core.owner or None,
                             "this": core.owner})

    async def pipelines(request: Request):
        return JSONResponse({"pipelines": [
            # `pipeline`: the path inside `repo` of a repository's pipeline (then `file` is null).
            {"name": p.name, "file": p.file, "pipeline": p.pipeline, "repo": p.repo,
             "destination": p.destination, "concurrency": p.concurrency,
             "concurrency_group": p.concurrency_group, "cancel_in_progress": p.cancel_in_progress,
             "triggers": p.triggers.model_dump(mode="json")} for p in core.config.pipelines]})

    async def cancel(request: Request, run_id: int):
        before = await run_in_threadpool(core.cancel, run_id, "cancelled through the API")
        if before is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        run = await run_in_threadpool(core.store.get_run, run_id)
        return JSONResponse({"run": run_view(run), "was": before,
                             "cancelled": before in ("queued", "running")},
                            status_code=202 if before == "running" else 200)

    async def trigger(request: Request):
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
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        try:
            branch, tag, commit, variables = trigger_request(body)
        except BadBody as exc:
            return JSONResponse({"error": str(exc), "problems": [{"field": f, "message": m} for f, m in exc.fields]},
                                status_code=400)
        run_id = await run_in_threadpool(core.trigger_manual, name, branch, tag, commit, variables)
        return JSONResponse({"run": run_view(await run_in_threadpool(core.store.get_run, run_id))},
                            status_code=201)

    async def retry(request: Request, run_id: int):
        run = await run_in_threadpool(core.store.get_run, run_id)
        if run is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        if run["status"] not in FINAL:
            return JSONResponse({"error": f"run {run_id} is {run['status']}: only a run that ended can be retried"},
                                status_code=409)
        try:
            new_id = await run_in_threadpool(core.store.retry, run_id)
        except StoreError as exc:
            # It had ended (checked above) and ended runs stay ended: the store cannot write now.
            return JSONResponse({"error": f"cannot queue a retry of run {run_id} now: {exc.public}"},
                                status_code=503)
        if new_id is None:  # pruned since it was read
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        await run_in_threadpool(core.after_accept, [])
        return JSONResponse({"run": run_view(await run_in_threadpool(core.store.get_run, new_id))},
                            status_code=201)

    async def metrics(request: Request):
        # The queue gauges read the store: off the event loop.
        body, content_type = await run_in_threadpool(core.metrics.exposition, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    routes = [
        Route("/healthz", healthz),
        *(Route(f"/hooks/{provider}", counted(provider, make_hook_handler(core, provider)), methods=["POST"])
          for provider in ("github", "gitea", "gitlab", "generic")),
        Route("/metrics", reader(metrics)),
        Route("/api/runs", reader(list_runs)),
        Route("/api/runs/{run_id}", reader(by_run(get_run))),
        Route("/api/runs/{run_id}/logs", reader(by_run(run_logs))),
        Route("/api/runs/{run_id}/stages/{stage}/log", reader(by_run(run_logs))),
        Route("/api/runs/{run_id}/cancel", writer(by_run(cancel)), methods=["POST"]),
        Route("/api/runs/{run_id}/retry", writer(by_run(retry)), methods=["POST"]),
        Route("/api/deliveries", reader(deliveries)),
        Route("/api/daemons", reader(daemons)),
        Route("/api/pipelines", reader(pipelines)),
        Route("/api/pipelines/{name}/trigger", writer(trigger), methods=["POST"]),
        *dashboard_routes(core, gate),
    ]

    async def bad_query(request: Request, exc: BadQuery):
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def too_many_guesses(request: Request, exc: TooManyGuesses):
        return JSONResponse({"error": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)})

    return Starlette(routes=routes, exception_handlers={BadQuery: bad_query, TooManyGuesses: too_many_guesses})
