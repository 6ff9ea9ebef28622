"""The reverse proxy of the zero-downtime cutover, as data. Pure: no I/O.

One Caddy 2 container per server (`runner-proxy`, `--restart=always`) serves every app deployed
there through the runner's docker network (`runner`). Each app has one route (its hosts, its
path prefix, the upstream `<alias>:<app_port>` of the container that serves it now), kept by
the deployer in `<runner dir>/proxy/routes/<app>.json` on the server. The whole Caddy config is
composed from all routes (`caddy_config`), written as a new file in `<runner dir>/proxy/`
(mounted read-only at /etc/runner-proxy), and loaded with `caddy reload` inside the container:
Caddy's admin API `/load`, which swaps the config atomically and lets in-flight requests finish.
The admin API listens on the container's own loopback only, out of reach of the apps sharing
its network. `config.json` is the last config that loaded: what a restarted proxy starts with.

Maintenance (`runner app maintenance` / `live`) is a flag on the route: while it is set, the
route's hosts and path get a 503 page with the message (and Retry-After) from Caddy itself; the
upstream stays recorded, the containers are not touched, and a deploy moves the upstream
without clearing the flag (`moved`).
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, replace

from runner.model.accessories import NETWORK  # the runner's network, named once

PROXY_CONTAINER = "runner-proxy"
CONFIG_DIR = "/etc/runner-proxy"  # inside the proxy container
CONFIG_FILE = "config.json"  # the last config that loaded
LABEL_PROXY = "runner.proxy"  # its value: PROXY_RECIPE of the runner that made the proxy
PROXY_RECIPE = "2"  # bumped when the proxy container's settings change (2: tcp_migrate_req)
LABEL_ALIAS = "runner.alias"  # an app container's name on the runner network
ADMIN = "localhost:2019"
HTTP_INSIDE, HTTPS_INSIDE = 80, 443
RETRY_AFTER = 60  # seconds, the Retry-After of the maintenance page
DEFAULT_MESSAGE = "This service is down for maintenance. Please try again shortly."


def alias(app: str, run_id: str) -> str:
    """The network alias of the container a run starts: unique per run, so a route names
    exactly one container (renaming containers never moves traffic)."""
    from deployers.plan import safe_name
    return f"{app}--{safe_name(run_id, 40)}".lower()


@dataclass(frozen=True)
class Route:
    app: str
    hosts: tuple[str, ...]
    path_prefix: str
    upstream: str  # "<alias>:<port>"
    digest: str = ""  # what it serves, for `runner status`
    container: str = ""  # the id of the container behind the alias
    tls: bool = False
    maintenance: bool = False  # the proxy answers the 503 page instead of the upstream
    message: str = ""  # the page's text, as given (escaped when the page is made)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Route:
        return cls(app=str(data["app"]), hosts=tuple(data.get("hosts") or ()),
                   path_prefix=str(data.get("path_prefix") or "/"),
                   upstream=str(data["upstream"]), digest=str(data.get("digest", "")),
                   container=str(data.get("container", "")), tls=bool(data.get("tls")),
                   maintenance=bool(data.get("maintenance")),
                   message=str(data.get("message") or ""))


def in_maintenance(route: Route, message: str) -> Route:
    return replace(route, maintenance=True, message=message)


def live(route: Route) -> Route:
    return replace(route, maintenance=False, message="")


def moved(new: Route, old: Route | None) -> Route:
    """The route a deploy, rollback or restore writes: its upstream, with the maintenance of
    the route it replaces (maintenance lasts until `runner app live`, whatever is deployed)."""
    if old is None or not old.maintenance:
        return new
    return in_maintenance(new, old.message)


def _escaped(text: str) -> str:
    """HTML-escaped; braces too, as character references: Caddy expands {placeholders} in a
    static_response body, and a message must not reach request data or the environment."""
    return html.escape(text, quote=True).replace("{", "&#123;").replace("}", "&#125;")


def maintenance_page(message: str) -> str:
    text = _escaped(message or DEFAULT_MESSAGE)
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Down for maintenance'
            f'</title></head>\n<body><h1>Down for maintenance</h1>\n<p>{text}</p></body></html>\n')


def _handle(r: Route) -> list[dict]:
    if r.maintenance:
        return [{"handler": "static_response", "status_code": 503,
                 "headers": {"Content-Type": ["text/html; charset=utf-8"],
                             "Retry-After": [str(RETRY_AFTER)],
                             "Cache-Control": ["no-store"]},
                 "body": maintenance_page(r.message)}]
    return [{"handler": "reverse_proxy", "upstreams": [{"dial": r.upstream}]}]


def _match(r: Route) -> dict:
    m: dict = {}
    if r.hosts:
        m["host"] = list(r.hosts)
    prefix = r.path_prefix.rstrip("/")
    if prefix:
        m["path"] = [prefix, f"{prefix}/*"]
    return m


def _order(r: Route) -> tuple:
    """Caddy tries routes in order: the more specific first (a host before none, a longer
    path prefix before a shorter one), then by app name for a stable config."""
    return (not r.hosts, -len(r.path_prefix.rstrip("/")), r.app)


def _routes(routes: list[Route]) -> list[dict]:
    out = []
    for r in sorted(routes, key=_order):
        route: dict = {"@id": f"runner-app-{r.app}", "handle": _handle(r), "terminal": True}
        m = _match(r)
        if m:
            route["match"] = [m]
        out.append(route)
    # Nothing matched: say so, instead of Caddy's empty 200.
    out.append({"handle": [{"handler": "static_response", "status_code": 404,
                            "body": "runner-proxy: no app is routed for this host and path\n"}]})
    return out


def caddy_config(routes: list[Route]) -> dict:
    """The whole Caddy JSON config for these routes. Routes with tls go to a server on the
    HTTPS port with Caddy's automatic HTTPS (certificates by ACME for their hosts, HTTP
    redirected); the others to a plain HTTP server."""
    plain = [r for r in routes if not r.tls]
    secure = [r for r in routes if r.tls]
    servers: dict = {"http": {"listen": [f":{HTTP_INSIDE}"], "routes": _routes(plain),
                              "automatic_https": {"disable": True}}}
    if secure:
        servers["http"].pop("automatic_https")
        servers["https"] = {"listen": [f":{HTTPS_INSIDE}"], "routes": _routes(secure)}
    return {"admin": {"listen": ADMIN}, "apps": {"http": {"servers": servers}}}


def config_bytes(routes: list[Route]) -> bytes:
    return json.dumps(caddy_config(routes), indent=1, sort_keys=True).encode()


def route_for(app: str, proxy, upstream_alias: str, digest: str = "",
              container: str = "") -> Route:
    """The route of `app` (settings `proxy`, a runner.model.deploy.Proxy) to one container."""
    return Route(app=app, hosts=tuple(proxy.hosts), path_prefix=proxy.path_prefix,
                 upstream=f"{upstream_alias}:{proxy.app_port}", digest=digest,
                 container=container, tls=proxy.tls)


def published(proxy) -> tuple[str, ...]:
    """The host ports the proxy container publishes, docker -p syntax."""
    ports = [f"{proxy.http_port}:{HTTP_INSIDE}"]
    if proxy.tls:
        ports.append(f"{proxy.https_port}:{HTTPS_INSIDE}")
    return tuple(ports)
