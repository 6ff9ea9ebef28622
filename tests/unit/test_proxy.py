"""Pure tests of the proxy cutover: the Caddy config made from routes, the proxy's argv, the
planned commands, the model's rules, and the health probe explained in the user's terms."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployers import commands as cmd
from deployers.health import explain_http, parse_http_answer
from deployers.plan import plan_deploy
from deployers.proxy import (DEFAULT_MESSAGE, Route, alias, caddy_config, in_maintenance, live,
                             moved, published)
from runner.model.deploy import DeploySettings, Proxy
from runner.model.image import ImageRef

IMG = ImageRef.parse("reg/web@sha256:" + "a" * 64)


def stage(**proxy) -> DeploySettings:
    return DeploySettings.model_validate({"enabled": True, "servers": "10.0.0.1",
                                       "container": {"name": "web"},
                                       "proxy": {"app_port": 8080, **proxy}})


def test_caddy_config_orders_routes_and_answers_unrouted_requests():
    routes = [Route("b", (), "/", "b--r1:80"),
              Route("a", ("a.example.com",), "/", "a--r2:8080"),
              Route("api", ("a.example.com",), "/api/", "api--r3:9000")]
    cfg = caddy_config(routes)
    assert cfg["admin"] == {"listen": "localhost:2019"}
    server = cfg["apps"]["http"]["servers"]["http"]
    assert server["listen"] == [":80"] and server["automatic_https"] == {"disable": True}
    got = [(r.get("@id"), r.get("match")) for r in server["routes"]]
    assert got == [
        ("runner-app-api", [{"host": ["a.example.com"], "path": ["/api", "/api/*"]}]),
        ("runner-app-a", [{"host": ["a.example.com"]}]),
        ("runner-app-b", None),
        (None, None),
    ]
    assert server["routes"][0]["handle"] == [{"handler": "reverse_proxy",
                                              "upstreams": [{"dial": "api--r3:9000"}]}]
    assert server["routes"][-1]["handle"][0]["status_code"] == 404


def test_tls_routes_get_a_server_of_their_own_with_automatic_https():
    cfg = caddy_config([Route("a", ("a.example.com",), "/", "a--r:80", tls=True),
                        Route("b", (), "/", "b--r:80")])
    servers = cfg["apps"]["http"]["servers"]
    assert servers["https"]["listen"] == [":443"] and "automatic_https" not in servers["https"]
    assert "automatic_https" not in servers["http"]  # Caddy may add its HTTP->HTTPS redirects
    assert [r.get("@id") for r in servers["https"]["routes"]] == ["runner-app-a", None]


def test_route_round_trip_and_alias():
    r = Route("web", ("x.test",), "/", "web--r1:8080", digest="sha256:" + "b" * 64,
              container="c1", tls=False)
    assert Route.from_dict(r.to_dict()) == r
    assert alias("Web", "Run 1/x") == "web--run-1-x"


def test_a_route_in_maintenance_answers_503_with_the_message_escaped():
    r = Route("web", ("x.test",), "/api/", "web--r1:8080", digest="sha256:" + "b" * 64)
    down = in_maintenance(r, 'back at <b>5</b> & "soon" {env.HOME} {http.request.uri}')
    assert Route.from_dict(down.to_dict()) == down and live(down) == r
    [route, _] = caddy_config([down])["apps"]["http"]["servers"]["http"]["routes"]
    assert route["match"] == [{"host": ["x.test"], "path": ["/api", "/api/*"]}]
    [h] = route["handle"]
    assert h["handler"] == "static_response" and h["status_code"] == 503
    assert h["headers"]["Retry-After"] == ["60"]
    assert h["headers"]["Content-Type"] == ["text/html; charset=utf-8"]
    assert ("back at &lt;b&gt;5&lt;/b&gt; &amp; &quot;soon&quot; &#123;env.HOME&#125; "
            "&#123;http.request.uri&#125;") in h["body"]
    assert "<b>" not in h["body"] and "{" not in h["body"] and "}" not in h["body"]
    [h] = caddy_config([in_maintenance(r, "")])["apps"]["http"]["servers"]["http"][
        "routes"][0]["handle"]
    assert DEFAULT_MESSAGE in h["body"]


def test_a_deploy_moves_the_upstream_and_keeps_maintenance():
    old = in_maintenance(Route("web", (), "/", "web--r1:8080", digest="sha256:1"), "later")
    new = Route("web", (), "/", "web--r2:8080", digest="sha256:2", container="c2")
    assert moved(new, old) == in_maintenance(new, "later")
    assert moved(new, live(old)) == new and moved(new, None) == new


def test_proxy_argv_and_reload_exact():
    p = Proxy(http_port=8000, image="reg/caddy:2")
    assert published(p) == ("8000:80",)
    assert cmd.bind(cmd.proxy_run(p), {cmd.PROXY_DIR: "/r"}) == [
        "docker", "run", "--detach", "--name", "runner-proxy", "--restart", "always",
        "--network", "runner", "--label", "runner.proxy=2",
        "--sysctl", "net.ipv4.tcp_migrate_req=1", "--publish", "8000:80",
        "--volume", "/r/proxy:/etc/runner-proxy:ro", "--volume", "runner-proxy-data:/data",
        "--volume", "runner-proxy-config:/config", "reg/caddy:2",
        "caddy", "run", "--config", "/etc/runner-proxy/config.json"]
    tls = Proxy(hosts=("a.test",), tls=True, http_port=80, https_port=443)
    assert published(tls) == ("80:80", "443:443")
    assert cmd.bind(cmd.proxy_reload(cmd.CONFIG), {cmd.CONFIG: "/etc/runner-proxy/n.json"}) == [
        "docker", "exec", "runner-proxy", "caddy", "reload", "--config",
        "/etc/runner-proxy/n.json", "--address", "localhost:2019", "--force"]


def test_planned_proxy_commands():
    plan = plan_deploy(stage(hosts=["web.test"], drain_timeout=7), pipeline="web",
                       image_name="reg/web", run_id="r9", image=IMG)
    sp = plan.servers[0]
    keys = [c.key for c in sp.commands]
    assert keys.index("route") < keys.index("stop_previous")  # drain only after the switch
    assert keys.index("route_back") < keys.index("remove_new")  # traffic back before removal
    assert "remove_previous" not in keys and "keep_previous" in keys
    run = sp.argv("run")
    assert run[run.index("--network") + 1] == "runner"
    assert run[run.index("--network-alias") + 1] == "web--r9"
    assert "runner.alias=web--r9" in run and "--publish" not in run
    assert sp.argv("stop_previous") == ["docker", "container", "stop", "--time", "7",
                                        "web_prev_r9"]
    assert sp.command("stop_previous").phase == "verify"


def test_model_rules_of_the_proxy():
    assert stage().cutover == "proxy"
    assert DeploySettings.model_validate({"servers": "a"}).cutover == "stop-start"
    with pytest.raises(ValidationError, match="publishes no host port"):
        DeploySettings.model_validate({"servers": "a", "container": {"ports": ["80:80"]},
                                    "proxy": {}})
    with pytest.raises(ValidationError, match="tls: true needs hosts"):
        stage(tls=True)
    with pytest.raises(ValidationError, match="not a host name"):
        stage(hosts=["bad host"])
    assert stage(hosts="one.test").proxy.hosts == ("one.test",)


def _answer(raw: bytes):
    return parse_http_answer(raw)


@pytest.mark.parametrize("raw,error,says", [
    (b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://web.test/up\r\n\r\n", "",
     "redirected (301) to https://web.test/up"),
    (b"HTTP/1.1 404 Not Found\r\n\r\nno such page\n", "", "404 not found (no such page)"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\nDisallowedHost: Invalid HTTP_HOST header\n", "",
     "rejected the Host header 'web.test'"),
    (b"HTTP/1.1 421 Misdirected Request\r\n\r\n", "", "rejected the Host header"),
    (b"HTTP/1.1 500 Internal Server Error\r\n\r\nTraceback (most recent call last):\n", "",
     "500, the app failed (Traceback"),
    (None, "Connect failed (code 2)", "connection refused: nothing listens on port 8080"),
    (None, "timed out", "no answer in time"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "", "not HTTP"),
])
def test_a_failed_probe_is_explained_with_the_setting_to_change(raw, error, says):
    text = explain_http("/up", "web.test", 8080, _answer(raw) if raw else None, error)
    assert says in text, text
    assert "GET /up (Host: web.test)" in text


def test_explanations_name_the_setting():
    assert "proxy.health.path" in explain_http(
        "/up", "h", 80, _answer(b"HTTP/1.1 404 Not Found\r\n\r\n"))
    assert "proxy.app_port" in explain_http("/up", "h", 80, None, "Connection refused")
    assert "proxy.health.timeout" in explain_http("/up", "h", 80, None, "timeout")
