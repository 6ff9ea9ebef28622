"""The daemon's HTTP API beyond the queue: the trigger body checked once before anything is
queued, retry, the `runner trigger` / `runner retry` commands, and connections that never send a
whole request (real sockets against an in-process daemon)."""
from __future__ import annotations

import json
import selectors
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import AUTH, TOKEN, config, daemon_in_process, fake_pipeline, wait_for  # noqa: E402

from runner.daemon.api import BadBody, trigger_request  # noqa: E402

SHA1 = "0123456789abcdef0123456789abcdef01234567"
SHA256 = "ab" * 32


# -- the trigger body, by equality ----------------------------------------------------------------

@pytest.mark.parametrize("body,expected", [
    ({}, (None, None, None, {})),
    ({"branch": "main"}, ("main", None, None, {})),
    ({"tag": "v1.2"}, (None, "v1.2", None, {})),
    ({"ref": "refs/heads/feature/x"}, ("feature/x", None, None, {})),
    ({"ref": "refs/tags/v1"}, (None, "v1", None, {})),
    ({"ref": "dev"}, ("dev", None, None, {})),
    ({"ref": "main", "commit": SHA1.upper(), "vars": {"X": "1", "_y2": ""}}, ("main", None, SHA1, {"X": "1", "_y2": ""})),
    ({"commit": SHA256}, (None, None, SHA256, {})),
    ({"branch": None, "commit": None, "vars": None}, (None, None, None, {})),
])
def test_trigger_request_accepts(body, expected):
    assert trigger_request(body) == expected


@pytest.mark.parametrize("body,fields", [
    ({"commit": {"sha": SHA1}}, ["commit"]),
    ({"commit": "abc123"}, ["commit"]),  # short: a run must name the commit it builds in full
    ({"commit": "g" * 40}, ["commit"]),
    ({"commit": 123}, ["commit"]),
    ({"branch": 5}, ["branch"]),
    ({"branch": ""}, ["branch"]),
    ({"branch": "--upload-pack=touch /tmp/x"}, ["branch"]),
    ({"tag": "v1 2"}, ["tag"]),
    ({"ref": "refs/pull/1/head"}, ["ref"]),
    ({"branch": "main", "tag": "v1"}, ["tag"]),
    ({"brnach": "main"}, ["brnach"]),
    ({"vars": ["X=1"]}, ["vars"]),
    ({"vars": {"X": 1, "1X": "a", "A-B": "b", "Z": "nul\0"}}, ["vars.X", "vars.1X", "vars.A-B", "vars.Z"]),
    ({"commit": "x", "brnach": "y", "vars": {"X": 1}}, ["brnach", "commit", "vars.X"]),  # all at once
    (["main"], [""]),
])
def test_trigger_request_refuses_naming_every_field(body, fields):
    with pytest.raises(BadBody) as e:
        trigger_request(body)
    assert [f for f, _ in e.value.fields] == fields
    for f in fields:
        assert f in str(e.value)


# -- trigger and retry over HTTP ------------------------------------------------------------------

def _cfg(tmp_path, **over):
    pf = fake_pipeline(tmp_path)
    # No repo: a manual run without a commit resolves nothing before it is queued.
    return config(tmp_path, [{"name": "app", "file": str(pf)}], concurrency=0, **over)


def _vars(d, run_id: int) -> dict:
    """The vars a run was queued with (the run dicts leave them out)."""
    return json.loads(d.store._read("SELECT vars FROM runs WHERE id=?", (run_id,))[0]["vars"])


def _trigger(d, body, token=TOKEN) -> httpx.Response:
    return httpx.post(f"{d.url}/api/pipelines/app/trigger", json=body,
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_a_bad_trigger_body_queues_nothing_and_cancels_nothing(tmp_path):
    with daemon_in_process(_cfg(tmp_path)) as d:
        first = _trigger(d, {"branch": "main", "commit": SHA1})
        assert first.status_code == 201, first.text
        first_id = first.json()["run"]["id"]
        for body, field in ((({"branch": "main", "commit": {"a": 1}}), "commit"),
                            ({"branch": "main", "commit": "not-a-sha"}, "commit"),
                            ({"branch": "main", "bogus": 1}, "bogus"),
                            ({"ref": "refs/heads/main", "vars": {"X": 2}}, "vars.X")):
            r = _trigger(d, body)
            assert r.status_code == 400, (body, r.text)
            assert field in r.json()["error"] and field in [p["field"] for p in r.json()["problems"]]
        r = httpx.post(f"{d.url}/api/pipelines/app/trigger", content=b"[1, 2]", headers=AUTH)
        assert r.status_code == 400 and "JSON object" in r.json()["error"]
        # The earlier run in the same group (app/main) was neither superseded nor joined.
        assert [x["id"] for x in d.store.list_runs()] == [first_id]
        assert d.store.get_run(first_id)["status"] == "queued"


def test_trigger_by_ref(tmp_path):
    with daemon_in_process(_cfg(tmp_path)) as d:
        tag = _trigger(d, {"ref": "refs/tags/v1", "commit": SHA1}).json()["run"]
        assert (tag["ref"], tag["tag"], tag["branch"], tag["commit"]) == ("refs/tags/v1", "v1", None, SHA1)
        short = _trigger(d, {"ref": "dev"}).json()["run"]
        assert (short["ref"], short["branch"]) == ("refs/heads/dev", "dev")
        full = _trigger(d, {"ref": "refs/heads/feature/x", "vars": {"X": "1"}}).json()["run"]
        assert (full["ref"], full["branch"]) == ("refs/heads/feature/x", "feature/x")
        assert _vars(d, full["id"])["X"] == "1"


def test_retry(tmp_path):
    with daemon_in_process(_cfg(tmp_path)) as d:
        run = _trigger(d, {"branch": "main", "commit": SHA1, "vars": {"X": "1"}}).json()["run"]
        url = f"{d.url}/api/runs/{run['id']}/retry"
        assert httpx.post(url).status_code == 401
        assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(url, headers=AUTH)
        assert r.status_code == 409 and "queued" in r.json()["error"]  # it has not ended yet
        assert httpx.post(f"{d.url}/api/runs/{run['id']}/cancel", headers=AUTH).status_code == 200
        r = httpx.post(url, headers=AUTH)
        assert r.status_code == 201, r.text
        again = r.json()["run"]
        assert again["id"] != run["id"] and again["status"] == "queued" and again["trigger"] == "retry"
        assert again["retry_of"] == run["id"]
        assert (again["pipeline"], again["ref"], again["commit"]) == ("app", "refs/heads/main", SHA1)
        assert _vars(d, again["id"])["X"] == "1"
        assert httpx.post(f"{d.url}/api/runs/999/retry", headers=AUTH).status_code == 404


def test_retry_wakes_the_workers(tmp_path):
    pf = fake_pipeline(tmp_path, sleep=0.01)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf)}])
    with daemon_in_process(cfg) as d:
        first = _trigger(d, {"branch": "main", "commit": SHA1}).json()["run"]["id"]
        wait_for(lambda: d.store.get_run(first)["status"] == "success", 20, "the first run")
        again = httpx.post(f"{d.url}/api/runs/{first}/retry", headers=AUTH).json()["run"]["id"]
        wait_for(lambda: d.store.get_run(again)["status"] in ("success", "failed"), 20, "the retry")
        assert d.store.get_run(again)["status"] == "success"


# -- runner trigger / runner retry ----------------------------------------------------------------

def test_cli_trigger_and_retry(tmp_path):
    from runner.cli import cli as runner_cli
    from runner.cli.daemon import retry, runs, trigger

    with daemon_in_process(_cfg(tmp_path)) as d:
        cli = CliRunner()
        env = {"RUNNER_SERVER": d.url, "RUNNER_TOKEN": TOKEN}
        res = cli.invoke(trigger, ["app", "--ref", "refs/tags/v2", "--commit", SHA1, "--var", "A=1",
                                   "--var", "B=x=y"], env=env)
        assert res.exit_code == 0, res.output
        rid = int(res.output.split()[2])
        assert res.output.startswith(f"queued run {rid} (app v2 at {SHA1[:12]})")
        run = d.store.get_run(rid)
        assert (run["tag"], run["commit"], _vars(d, rid)) == ("v2", SHA1, {"A": "1", "B": "x=y"})
        res = cli.invoke(trigger, ["app", "--json"], env=env)
        assert res.exit_code == 0 and json.loads(res.output)["run"]["branch"] == "main"
        res = cli.invoke(trigger, ["app", "--commit", "nope"], env=env)
        assert res.exit_code != 0 and "400" in res.output and "commit" in res.output
        res = cli.invoke(trigger, ["app", "--var", "novalue"], env=env)
        assert res.exit_code != 0 and "KEY=VALUE" in res.output
        res = cli.invoke(trigger, ["app"], env={"RUNNER_SERVER": d.url, "RUNNER_TOKEN": ""})
        assert res.exit_code != 0 and "token" in res.output
        res = cli.invoke(trigger, ["nosuch"], env=env)
        assert res.exit_code != 0 and "404" in res.output

        res = cli.invoke(retry, [str(rid)], env=env)
        assert res.exit_code != 0 and "409" in res.output  # still queued
        d.store.request_cancel(rid, "for the test")
        res = cli.invoke(retry, [str(rid)], env=env)
        assert res.exit_code == 0, res.output
        again = int(res.output.split()[2])
        assert f"retry of #{rid}" in res.output
        res = cli.invoke(retry, [str(rid), "--json", "--server", d.url, "--token", TOKEN])
        assert json.loads(res.output)["run"]["retry_of"] == rid

        res = cli.invoke(runs, [], env=env)
        assert res.exit_code == 0, res.output
        line = next(x for x in res.output.splitlines() if x.split()[0] == str(again))
        assert "retry" in line and f"retry of #{rid}" in line
        # Both commands are registered on `runner`.
        res = cli.invoke(runner_cli, ["--help"])
        assert " trigger " in res.output and " retry " in res.output


# -- connections that never send a whole request --------------------------------------------------

def _wait_closed(socks: list[socket.socket], bound: float) -> dict[socket.socket, float]:
    """When the server closed each socket (read returns b'' or the connection is reset)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + bound
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            try:
                data = key.fileobj.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                closed[key.fileobj] = time.monotonic()
                sel.unregister(key.fileobj)
    sel.close()
    return closed


def test_silent_and_half_sent_connections_are_closed(tmp_path):
    cfg = _cfg(tmp_path, listen={"host": "127.0.0.1", "port": 0, "read_timeout": 1.0, "idle_timeout": 0.5})
    with daemon_in_process(cfg) as d:
        t0 = time.monotonic()
        silent = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(50)]
        halves = []
        for i in range(10):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall([b"GET /api/ru", b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
                       b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\""][i % 3])
            halves.append(s)
        # A request from a client that behaves is still served, while all of those are held open.
        r = httpx.get(f"{d.url}/api/runs", headers=AUTH, timeout=5)
        assert r.status_code == 200
        # After one whole request and response, half of a second one: uvicorn's keep-alive timer
        # stops at the first byte; the read timeout still closes it.
        kept = socket.create_connection(("127.0.0.1", d.port))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /hea")
        idle = socket.create_connection(("127.0.0.1", d.port))
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        opened = time.monotonic()
        closed = _wait_closed([*silent, *halves, kept], bound=6)
        assert len(closed) == 61, f"{61 - len(closed)} connections still open after 6 s"
        # Not at once (then the timeout would be 0), and not long after read_timeout.
        assert min(closed.values()) - t0 >= 0.9
        assert max(closed.values()) - opened < 3.5
        idle_closed = _wait_closed([idle], bound=3)
        assert idle in idle_closed  # idle_timeout, after a response
        wait_for(lambda: len(d.server.server_state.connections) == 0, 3, "the server to drop them all")
        assert httpx.get(f"{d.url}/healthz", timeout=5).status_code == 200
        for s in (*silent, *halves, kept, idle):
            s.close()
        # A webhook body that stopped coming is counted, not crashed on.
        got = httpx.get(f"{d.url}/metrics", headers=AUTH).text
        assert 'runner_deliveries_total{outcome="disconnected",provider="github"}' in got


def test_a_request_arriving_in_pieces_within_the_read_timeout_is_served(tmp_path):
    cfg = _cfg(tmp_path, listen={"host": "127.0.0.1", "port": 0, "read_timeout": 1.0})
    with daemon_in_process(cfg) as d:
        body = json.dumps({"branch": "main", "commit": SHA1}).encode()
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        s.sendall(b"POST /api/pipelines/app/trigger HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n")
        time.sleep(0.4)
        s.sendall(body[:10])
        time.sleep(0.4)
        s.sendall(body[10:])
        assert s.recv(65536).startswith(b"HTTP/1.1 201")
        s.close()
