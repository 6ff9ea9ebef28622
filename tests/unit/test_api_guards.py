"""What the daemon's HTTP side refuses before it reaches the store or compares a token: ids beyond
64 bits (404 in a path, 400 in the API's query, ignored in a page's), and an address that keeps
giving wrong tokens (429 with Retry-After, for the login form and the Bearer header alike).
Real HTTP against an in-process daemon; other client addresses are other loopback addresses."""
from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import AUTH, TOKEN, config, daemon_in_process, fake_pipeline  # noqa: E402

from runner.daemon.dashboard.session import TokenGate, TooManyGuesses  # noqa: E402

HUGE = "99999999999999999999"  # beyond 2**63-1
SHA1 = "0123456789abcdef0123456789abcdef01234567"


def _cfg(tmp_path):
    return config(tmp_path, [{"name": "app", "file": str(fake_pipeline(tmp_path))}], concurrency=0)


def _from(address: str, url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=10, transport=httpx.HTTPTransport(local_address=address))


def test_ids_beyond_64_bits_are_no_run_not_a_server_error(tmp_path):
    with daemon_in_process(_cfg(tmp_path)) as d:
        c = httpx.Client(base_url=d.url, timeout=10, headers=AUTH)
        for path in (f"/api/runs/{HUGE}", f"/api/runs/{HUGE}/logs", f"/api/runs/{HUGE}/stages/build/log",
                     "/api/runs/0", "/api/runs/-1", "/api/runs/abc"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"].startswith("no run"), path
        for path in (f"/api/runs/{HUGE}/cancel", f"/api/runs/{HUGE}/retry"):
            assert c.post(path).status_code == 404, path
        for path, params in (("/api/runs", {"before": HUGE}), ("/api/runs", {"limit": HUGE}),
                             ("/api/runs", {"before": "x"}), ("/api/deliveries", {"limit": HUGE}),
                             ("/api/runs/1/logs", {"after": HUGE})):
            r = c.get(path, params=params)
            assert r.status_code == 400 and list(params)[0] in r.json()["error"], (path, params)
        # The pages: a path is a 404 page; a position in the query is ignored like a bad filter.
        page = httpx.Client(base_url=d.url, timeout=10)
        assert page.post("/login", data={"token": TOKEN}).status_code == 303
        for path in (f"/runs/{HUGE}", f"/runs/{HUGE}/summary", f"/runs/{HUGE}/events", "/runs/0"):
            r = page.get(path)
            assert r.status_code == 404 and "No such run" in r.text, path
        assert page.get("/runs", params={"before": HUGE}).status_code == 200
        run_id = c.post("/api/pipelines/app/trigger", json={"branch": "main", "commit": SHA1}).json()["run"]["id"]
        with page.stream("GET", f"/runs/{run_id}/events", params={"after": HUGE}) as stream:  # queued: it stays open
            assert stream.status_code == 200
        assert c.get(f"/api/runs/{run_id}").status_code == 200


def test_wrong_logins_from_one_address_are_refused_for_a_while(tmp_path, caplog):
    with daemon_in_process(_cfg(tmp_path)) as d, caplog.at_level(logging.WARNING, logger="runner.daemon"):
        guesser = _from("127.0.0.2", d.url)
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda i: guesser.post("/login", data={"token": f"guess-{i}"}), range(30)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [401] * 5 + [429] * 25, codes
        refused = next(r for r in answers if r.status_code == 429)
        assert 0 < int(refused.headers["retry-after"]) <= 60 and "try again in" in refused.text
        # The right token from that address waits for the window too; from another it is let in.
        assert guesser.post("/login", data={"token": TOKEN}).status_code == 429
        assert "runner_session" in _from("127.0.0.3", d.url).post("/login", data={"token": TOKEN}).cookies
        # The Bearer header counts against the same address, in the API and the pages.
        r = guesser.get("/api/runs", headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"]
        assert _from("127.0.0.3", d.url).get("/api/runs", headers=AUTH).status_code == 200
    limited = [r for r in caplog.records if r.getMessage().startswith("too many wrong API tokens")]
    assert [r.address for r in limited] == ["127.0.0.2"]
    assert all("guess-" not in r.getMessage() and "guess-" not in str(vars(r)) for r in caplog.records)


def test_wrong_bearer_tokens_are_limited_like_logins(tmp_path):
    with daemon_in_process(_cfg(tmp_path)) as d:
        c = _from("127.0.0.4", d.url)
        codes = [c.get("/api/runs", headers={"Authorization": f"Bearer wrong-{i}"}).status_code for i in range(7)]
        assert codes == [401] * 5 + [429] * 2
        assert c.get("/api/runs", headers=AUTH).status_code == 429
        assert c.get("/api/runs").status_code == 401  # no token presented: not a guess, not refused


def test_the_gate_forgets_after_the_window_and_stays_bounded():
    gate = TokenGate("the-token", limit=3, window=60, capacity=100)
    for t in range(3):
        assert not gate.ok("wrong", "10.0.0.1", now=t)
    with pytest.raises(TooManyGuesses) as refused:
        gate.ok("the-token", "10.0.0.1", now=10)
    assert refused.value.retry_after == 50  # 60 s after its first failure
    assert gate.ok("the-token", "10.0.0.2", now=10)  # another address
    assert gate.ok("the-token", "10.0.0.1", now=60)  # the window passed
    for n in range(1000):  # many addresses: the table keeps at most `capacity`
        gate.failed(f"10.1.{n // 256}.{n % 256}", now=61)
    assert len(gate._failures) <= 100
