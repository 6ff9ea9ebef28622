"""The dashboard's pages, forms and event streams, served by the daemon beside its JSON API.

  GET  /                       -> /runs
  GET  /runs                   runs, newest first; ?pipeline=&branch=&status=&trigger=&before=
  GET  /runs/rows              the table's rows alone (what the page's script swaps in live)
  GET  /runs/events            SSE: "changed" whenever a run may have changed
  GET  /runs/{id}              a run: stages, scan findings, deploy per server, logs
  GET  /runs/{id}/summary      the run's header, actions and stage tables alone (swapped in live)
  GET  /runs/{id}/events       SSE: "log" lines (after ?after= or Last-Event-ID), "changed", "end"
  GET  /deliveries             every webhook, poll and cron delivery with its outcome and reason
  GET  /servers                what runs where, the releases, the deploy lock, recent deploys
  GET  /login, POST /login     the API token -> a session cookie
  POST /logout
  POST /runs/{id}/cancel, /runs/{id}/retry, /pipelines/{name}/rollback   (session + CSRF token)

Reading follows `read_requires_token` (a login, or the API token as a Bearer header); every form
needs a login and its CSRF token, and a POST whose Origin is another site is refused. Wrong
tokens count per address with the API's (session.TokenGate): the login answers 429 when there
were too many. `{id}` is a run id (runner.daemon.ids) or the "No such run" page.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from pathlib import Path

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from runner.daemon.dashboard import views
from runner.daemon.dashboard.live import POLL
from runner.daemon.dashboard.servers import DeployState
from runner.daemon import ids
from runner.daemon.dashboard.session import (COOKIE, Session, Sessions, TokenGate, TooManyGuesses,
                                              client_address, presented_token)
from runner.daemon.run_requests import stored_request
from runner.daemon.store import ACTIVE, FINAL, StoreError
from runner.errors import InvalidInput

HERE = Path(__file__).parent
LOG_LINES_SHOWN = 20_000  # a run page shows at most this many log lines; the API has them all
_FORM_LIMIT = 16 * 1024
KEEPALIVE = 15.0  # seconds an event stream may stay silent before it sends a comment

# Scripts and styles come from /static only: no inline script can run, whatever a log contains.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _environment() -> jinja2.Environment:
    # Stage outputs come from runs of older runners too: a key one lacks renders as nothing
    # (ChainableUndefined) instead of failing the page.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(duration=views.duration, timestamp=views.timestamp, iso=views.iso, ago=views.ago,
                       status_label=views.status_label, short=views.short, ansi=views.ansi_to_html)
    env.globals.update(STATUSES=views.STATUSES, TRIGGERS=views.TRIGGERS, ACTIVE=ACTIVE, FINAL=FINAL,
                       commit_url=views.commit_url)
    return env


def _same_origin(request: Request) -> bool:
    """A browser names the page a form was sent from; refuse one from another site. (No
    Origin at all: not a browser's cross-site request, which always carries it.)"""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    o = urllib.parse.urlsplit(origin)
    return o.netloc == request.headers.get("host", "")


async def _form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (the only kind these forms send)."""
    if int(request.headers.get("content-length") or 0) > _FORM_LIMIT:
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _FORM_LIMIT:
            return {}
    return {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (never //host or a scheme)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/runs"


def _sse(event: str, data: object, event_id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {part}" for part in json.dumps(data).split("\n")]
    return "\n".join(lines) + "\n\n"


class Dashboard:
    def __init__(self, core, gate: TokenGate):
        self.core = core
        self.gate = gate  # the API token, and who guessed it wrong too often
        self.env = _environment()
        # Stored lines were masked when they were written; masked again here with the daemon's
        # current secrets (one added since, a rotated token) before they become HTML.
        self.env.filters["log"] = lambda line: views.ansi_to_html(core.masker.mask(line))
        self.sessions = Sessions(core.api_token)
        self.deploy_state = DeployState(core)

    @property
    def hub(self):
        return self.core.live

    # -- who is asking -------------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        return self.sessions.check(request.cookies.get(COOKIE))

    def may_read(self, request: Request) -> bool:
        if not self.core.config.read_requires_token:
            return True
        return self.session(request) is not None or \
            self.gate.ok(presented_token(request.headers), client_address(request))

    def page(self, request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
        started = time.perf_counter()
        session = self.session(request)
        body = self.env.get_template(template).render(
            request=request, session=session, csrf=self.sessions.csrf(session) if session else "",
            logins=self.sessions.enabled, daemon=self.core.owner, path=request.url.path,
            flash=request.query_params.get("done", "")[:200], **context)
        # The page's own render time, for the bench and the browser's devtools.
        headers = {**_HEADERS, "Server-Timing": f"render;dur={(time.perf_counter() - started) * 1000:.1f}"}
        return HTMLResponse(self.core.masker.mask(body), status_code=status_code, headers=headers)

    def refuse(self, request: Request, status_code: int, title: str, message: str) -> HTMLResponse:
        return self.page(request, "message.html", status_code=status_code, title=title, message=message)

    def login_first(self, request: Request) -> Response:
        if not self.sessions.enabled:
            return self.refuse(request, 403, "Closed",
                               "This daemon has no api_token, so its pages are closed (read_requires_token is on). "
                               "Configure api_token to log in, or set read_requires_token: false to open the pages "
                               "to anyone who reaches the listener.")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urllib.parse.urlencode({"next": target}), status_code=303)

    def by_run(self, fn):
        """The route's {run_id}: anything but a run id (1 to 2**63-1) names no run."""
        async def endpoint(request: Request, *form):
            run_id = ids.run_id(request.path_params["run_id"])
            if run_id is None:
                return self.refuse(request, 404, "No such run", "There is no such run.")
            return await fn(request, run_id, *form)
        return endpoint

    def reader(self, fn):
        async def endpoint(request: Request):
            if not self.may_read(request):
                if request.url.path.endswith(("/events", "/rows", "/summary")):
                    return Response("login required", status_code=401, media_type="text/plain")
                return self.login_first(request)
            return await fn(request)
        return endpoint

    async def posted(self, request: Request) -> dict[str, str] | Response:
        """A form's fields, or the answer refusing it: sent from another site's page, or the
        sender went away."""
        if not _same_origin(request):
            return self.refuse(request, 403, "Refused", "This form was sent from another site.")
        try:
            return await _form(request)
        except ClientDisconnect:
            return Response(status_code=400)

    def action(self, fn):
        """A form that changes something: a login, its CSRF token, and this site as the origin."""
        async def endpoint(request: Request):
            session = self.session(request)
            if session is None:
                if not self.sessions.enabled:
                    return self.refuse(request, 403, "Actions are off",
                                       "This daemon has no api_token: nothing can be changed from its pages.")
                return self.refuse(request, 401, "Log in first", "Log in with the API token to do this.")
            form = await self.posted(request)
            if isinstance(form, Response):
                return form
            if not self.sessions.csrf_ok(session, form.get("csrf")):
                return self.refuse(request, 403, "Refused",
                                   "The form's CSRF token is missing or wrong (a form from another page or an "
                                   "old login): reload the page and try again.")
            return await fn(request, form)
        return endpoint

    # -- login -------------------------------------------------------------------------------

    async def login_page(self, request: Request):
        return self.page(request, "login.html", next=_safe_next(request.query_params.get("next")), error="")

    async def login(self, request: Request):
        form = await self.posted(request)
        if isinstance(form, Response):
            return form
        target = _safe_next(form.get("next"))
        if not self.sessions.enabled:
            return self.page(request, "login.html", status_code=403, next=target,
                             error="This daemon has no api_token configured: there is nothing to log in with.")
        address = client_address(request)
        try:
            self.gate.check(address)
        except TooManyGuesses as exc:
            response = self.page(request, "login.html", status_code=429, next=target,
                                 error=f"Too many wrong tokens from your address: try again in {exc.retry_after} s.")
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        cookie = self.sessions.login(form.get("token", "").strip())
        if cookie is None:
            self.gate.failed(address)
            await asyncio.sleep(0.5)  # a guess costs time
            return self.page(request, "login.html", status_code=401, next=target, error="That is not the API token.")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, cookie, max_age=int(self.sessions.max_age), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    async def logout(self, request: Request, form: dict):
        session = self.session(request)
        if session is not None:
            self.sessions.logout(session)
        response = RedirectResponse("/runs", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- runs --------------------------------------------------------------------------------

    def _runs(self, query: views.RunQuery) -> list[dict]:
        return self.core.store.list_runs(pipeline=query.pipeline, status=query.status, branch=query.branch,
                                         trigger=query.trigger, limit=views.PAGE_SIZE + 1, before_id=query.before)

    async def runs(self, request: Request):
        query = views.RunQuery.parse(request.query_params)
        rows = await run_in_threadpool(self._runs, query)
        return self.page(request, "runs.html", query=query, runs=rows[:views.PAGE_SIZE],
                         older=views.older_page(query, rows), now=time.time(), repos=self._repos(),
                         pipelines=[p.name for p in self.core.config.pipelines])

    async def runs_rows(self, request: Request):
        query = views.RunQuery.parse(request.query_params)
        rows = await run_in_threadpool(self._runs, query)
        return self.page(request, "runs_rows.html", runs=rows[:views.PAGE_SIZE], now=time.time(),
                         repos=self._repos())

    def _repos(self) -> dict[str, str]:
        """Each pipeline's repository, for the commit links of a list (the run page also has the
        webhook's own address of the repository)."""
        return {p.name: p.repo for p in self.core.config.pipelines if p.repo}

    async def runs_events(self, request: Request):
        # A store that other daemons write (PostgreSQL) changes without waking this one: the
        # page looks again every few seconds. This daemon's own SQLite file only changes here.
        shared = getattr(self.core.store, "dialect", "") != "sqlite"

        async def stream():
            yield "retry: 2000\n\n"
            while not self.hub.closed:
                since = self.hub.version(None)
                await self.hub.wait(None, since, timeout=3 * POLL if shared else KEEPALIVE)
                if self.hub.version(None) != since or shared:
                    yield _sse("changed", {"at": time.time()})
                else:
                    yield ": keepalive\n\n"  # a proxy closes a stream that stays silent
        return StreamingResponse(stream(), media_type="text/event-stream", headers=_HEADERS)

    def _run(self, run_id: int) -> dict | None:
        run = self.core.store.get_run(run_id)
        if run is None:
            return None
        stages = {s["name"]: s for s in self.core.store.stages(run_id)}
        entry = self.core.config.pipeline(run["pipeline"])
        request = stored_request(self.core.store.run_event(run_id), run.get("commit"))
        deploy = stages.get("deploy")
        # Which release runs now, by the stored deploys: only asked when this run has one to offer.
        running = views.running_release(self.core.store.deploys(run["pipeline"], 8)) \
            if deploy and deploy["status"] == "success" else None
        return {"run": run, "stages": stages, "facts": views.commit_facts(request),
                "commit_url": views.commit_url(run.get("commit"), request, entry.repo if entry else None),
                "duration": views.run_duration(run), "can_rollback": entry is not None,
                "running_release": running, "state": views.run_state(run["status"], stages.values())}

    async def run_page(self, request: Request, run_id: int):
        data = await run_in_threadpool(self._run, run_id)
        if data is None:
            return self.refuse(request, 404, "No such run", f"There is no run {run_id} (it may have been pruned).")
        lines = await run_in_threadpool(self.core.store.logs, run_id, None, 0, LOG_LINES_SHOWN)
        by_stage: dict[str, list[dict]] = {}
        for line in lines:
            by_stage.setdefault(line["stage"], []).append(line)
        return self.page(request, "run.html", **data, logs=by_stage,
                         last_seq=lines[-1]["seq"] if lines else 0, truncated=len(lines) >= LOG_LINES_SHOWN)

    async def run_summary(self, request: Request, run_id: int):
        data = await run_in_threadpool(self._run, run_id)
        if data is None:
            return Response("no such run", status_code=404, media_type="text/plain")
        return self.page(request, "run_summary.html", **data)

    async def run_events(self, request: Request, run_id: int):
        after = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        after_seq = ids.whole(after) or 0  # an unusable position: from the start
        store, masker = self.core.store, self.core.masker

        async def stream():
            nonlocal after_seq
            yield "retry: 1000\n\n"
            said_state = None
            said = time.monotonic()
            while True:
                since = self.hub.version(run_id)
                run = await run_in_threadpool(store.get_run, run_id)
                if run is None:
                    yield _sse("end", {"status": "gone"})
                    return
                while True:
                    lines = await run_in_threadpool(store.logs, run_id, None, after_seq, 500)
                    for line in lines:
                        after_seq = line["seq"]
                        said = time.monotonic()
                        yield _sse("log", {"seq": line["seq"], "stage": line["stage"], "t": line["time"],
                                           "html": views.ansi_to_html(masker.mask(line["line"]))}, line["seq"])
                    if len(lines) < 500:
                        break
                state = views.run_state(run["status"], await run_in_threadpool(store.stages, run_id))
                if state != said_state:
                    # The first one too: the page was rendered before this stream connected, and
                    # a stage may have ended in between; the page compares it with its own.
                    yield _sse("changed", {"status": run["status"], "state": state})
                    said_state = state
                if run["status"] in FINAL or self.hub.closed:
                    yield _sse("end", {"status": run["status"]})
                    return
                if time.monotonic() - said > KEEPALIVE:
                    yield ": keepalive\n\n"  # a stage silent for minutes: a proxy would close it
                    said = time.monotonic()
                await self.hub.wait(run_id, since)
        return StreamingResponse(stream(), media_type="text/event-stream", headers=_HEADERS)

    # -- actions -----------------------------------------------------------------------------

    def confirm(self, request: Request, form: dict, question: str, button: str, back: str,
                **fields) -> HTMLResponse | None:
        """None when the form says it was confirmed (the page's script asked, or this page was
        answered); else the page that asks, whose form posts the same fields again, confirmed."""
        if form.get("confirmed") == "yes":
            return None
        return self.page(request, "confirm.html", question=question, button=button, action=request.url.path,
                         fields={k: v for k, v in fields.items() if v}, back=back)

    async def cancel(self, request: Request, run_id: int, form: dict):
        if await run_in_threadpool(self.core.store.get_run, run_id) is None:
            return self.refuse(request, 404, "No such run", f"There is no run {run_id}.")
        asked = self.confirm(request, form, f"Cancel run {run_id}?", "Yes, cancel the run",
                             f"/runs/{run_id}")
        if asked is not None:
            return asked
        before = await run_in_threadpool(self.core.cancel, run_id, "cancelled from the dashboard")
        if before is None:
            return self.refuse(request, 404, "No such run", f"There is no run {run_id}.")
        done = ("cancel requested: the run stops its stage" if before == "running" else
                "cancelled" if before == "queued" else f"nothing to cancel: the run had already ended ({before})")
        return RedirectResponse(f"/runs/{run_id}?" + urllib.parse.urlencode({"done": done}), status_code=303)

    async def retry(self, request: Request, run_id: int, form: dict):
        run = await run_in_threadpool(self.core.store.get_run, run_id)
        if run is None:
            return self.refuse(request, 404, "No such run", f"There is no run {run_id}.")
        if run["status"] not in FINAL:
            return self.refuse(request, 409, "Not yet", f"Run {run_id} is {run['status']}: only a run that ended "
                               "can be retried.")
        try:
            new_id = await run_in_threadpool(self.core.store.retry, run_id)
        except StoreError as exc:
            return self.refuse(request, 503, "Not now", f"Cannot queue a retry of run {run_id} now: {exc}")
        if new_id is None:
            return self.refuse(request, 404, "No such run", f"There is no run {run_id}.")
        await run_in_threadpool(self.core.after_accept, [])
        return RedirectResponse(f"/runs/{new_id}?" + urllib.parse.urlencode({"done": f"retry of run {run_id} queued"}),
                                status_code=303)

    async def rollback(self, request: Request, form: dict):
        name = request.path_params["name"]
        if self.core.config.pipeline(name) is None:
            return self.refuse(request, 404, "No such pipeline", f"This daemon has no pipeline {name!r}.")
        to = (form.get("to") or "").strip() or None
        asked = self.confirm(request, form, f"Roll {name} back to {views.short(to) if to else 'its previous verified release'}"
                             " on every server?", "Yes, roll back", "/servers", to=to)
        if asked is not None:
            return asked
        try:
            run_id = await run_in_threadpool(self.core.trigger_rollback, name, to)
        except InvalidInput as exc:
            return self.refuse(request, 400, "Not a release", str(exc))
        self.deploy_state.forget(name)
        what = f"rollback of {name} to {to}" if to else f"rollback of {name} to its previous verified release"
        return RedirectResponse(f"/runs/{run_id}?" + urllib.parse.urlencode({"done": f"{what} queued"}),
                                status_code=303)

    # -- deliveries and servers ----------------------------------------------------------------

    async def deliveries(self, request: Request):
        provider = (request.query_params.get("provider") or "").strip() or None
        rows = await run_in_threadpool(self.core.store.deliveries, 200, provider)
        return self.page(request, "deliveries.html", deliveries=rows, provider=provider or "",
                         providers=("github", "gitea", "gitlab", "generic", "poll", "cron"))

    async def servers(self, request: Request):
        refresh = request.query_params.get("refresh") == "1"
        entries = self.core.config.pipelines
        states = await asyncio.gather(*(run_in_threadpool(self.deploy_state.get, p.name, refresh) for p in entries))
        # Per pipeline: one busy pipeline's deploys must not push another's off the page.
        deploys = {p.name: await run_in_threadpool(self.core.store.deploys, p.name, 8) for p in entries}
        return self.page(request, "servers.html", apps=[s for s in states if s is not None], deploys=deploys,
                         now=time.time())

    def routes(self) -> list:
        r = self.reader
        return [
            Route("/", lambda request: RedirectResponse("/runs", status_code=303)),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.action(self.logout), methods=["POST"]),
            Route("/runs", r(self.runs)),
            Route("/runs/rows", r(self.runs_rows)),
            Route("/runs/events", r(self.runs_events)),
            Route("/runs/{run_id}", r(self.by_run(self.run_page))),
            Route("/runs/{run_id}/summary", r(self.by_run(self.run_summary))),
            Route("/runs/{run_id}/events", r(self.by_run(self.run_events))),
            Route("/runs/{run_id}/cancel", self.action(self.by_run(self.cancel)), methods=["POST"]),
            Route("/runs/{run_id}/retry", self.action(self.by_run(self.retry)), methods=["POST"]),
            Route("/pipelines/{name}/rollback", self.action(self.rollback), methods=["POST"]),
            Route("/deliveries", r(self.deliveries)),
            Route("/servers", r(self.servers)),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]


def dashboard_routes(core, gate: TokenGate) -> list:
    return Dashboard(core, gate).routes()

