"""The dashboard's pages over HTTP against an in-process daemon whose runs are the fake
`runner exec` (tests/data/daemon/fake_exec.py): who may read and act, what a log line becomes in
a page and in the event stream, and where a login may send the browser. The real browser, real
pipelines and the lab are in tests/lab/test_dashboard.py."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import (AUTH, TOKEN, config, daemon_in_process, fake_pipeline, push_payload, send_github,  # noqa: E402
                     wait_for)

from runner.daemon.store import NewRun  # noqa: E402
from runner.run_request import PullRequest, RunRequest  # noqa: E402

SHA1 = "0123456789abcdef0123456789abcdef01234567"
FINAL = ("success", "failed", "invalid", "cancelled", "interrupted")


def _cfg(tmp_path, **over):
    return config(tmp_path, [{"name": "app", "file": str(fake_pipeline(tmp_path))}], **over)


def _run(d, variables=None) -> int:
    r = httpx.post(f"{d.url}/api/pipelines/app/trigger", json={"branch": "main", "commit": SHA1,
                                                                 "vars": variables or {}}, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["run"]["id"]


def _ended(d, run_id: int) -> dict:
    return wait_for(lambda: (r := d.store.get_run(run_id)) and r["status"] in FINAL and r, 20, f"run {run_id}")


def _logged_in(url: str) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=10)
    r = c.post("/login", data={"token": TOKEN, "next": "/runs"})
    assert r.status_code == 303 and "runner_session" in c.cookies
    return c


def _csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def test_a_log_line_is_escaped_and_masked_in_the_page_and_the_stream(tmp_path):
    hostile = f'<script>alert(1)</script> \x1b[31m{TOKEN}\x1b[0m <img src=x onerror=alert(2)>'
    with daemon_in_process(_cfg(tmp_path)) as d:
        run_id = _run(d, {"FAKE_ECHO": hostile})
        _ended(d, run_id)
        c = _logged_in(d.url)
        page = c.get(f"/runs/{run_id}").text
        events = c.get(f"/runs/{run_id}/events").text
        for where, text in (("page", page), ("events", events)):
            assert TOKEN not in text, where  # the daemon's own secret, masked
            assert "<script>alert" not in text and "<img src=x" not in text, where
        assert '&lt;script&gt;alert(1)&lt;/script&gt; <span class="fg-red">***</span>' in page
        assert "&lt;img src=x onerror=alert(2)&gt;" in page
        # No inline script may run whatever a page holds: scripts come from /static only.
        csp = c.get(f"/runs/{run_id}").headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_the_event_stream_resumes_after_the_last_line_it_sent(tmp_path):
    with daemon_in_process(_cfg(tmp_path)) as d:
        run_id = _ended(d, _run(d))["id"]
        c = _logged_in(d.url)
        seqs = [x["seq"] for x in d.store.logs(run_id)]
        assert len(seqs) >= 4

        def ids(text: str) -> list[int]:
            return [int(x) for x in re.findall(r"^id: (\d+)$", text, re.M)]
        assert ids(c.get(f"/runs/{run_id}/events").text) == seqs
        assert ids(c.get(f"/runs/{run_id}/events", params={"after": seqs[1]}).text) == seqs[2:]
        # What EventSource sends when it reconnects.
        assert ids(c.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": str(seqs[2])}).text) == seqs[3:]
        assert "event: end" in c.get(f"/runs/{run_id}/events").text


def test_open_read_pages_still_need_a_login_to_act(tmp_path):
    with daemon_in_process(_cfg(tmp_path, read_requires_token=False, concurrency=0)) as d:
        run_id = _run(d)
        anon = httpx.Client(base_url=d.url, timeout=10)
        page = anon.get(f"/runs/{run_id}")
        assert page.status_code == 200 and f"#{run_id}" in page.text
        assert 'action="/runs/%d/cancel"' % run_id not in page.text  # no buttons without a login
        assert anon.get("/runs").status_code == 200 and anon.get("/deliveries").status_code == 200
        refused = anon.post(f"/runs/{run_id}/cancel", data={"csrf": "anything"})
        assert refused.status_code == 401
        assert d.store.get_run(run_id)["status"] == "queued"
        # Logged in, the queued run is cancelled from its page's form.
        c = _logged_in(d.url)
        form_page = c.get(f"/runs/{run_id}").text
        r = c.post(f"/runs/{run_id}/cancel", data={"csrf": _csrf(form_page), "confirmed": "yes"})
        assert r.status_code == 303 and r.headers["location"].startswith(f"/runs/{run_id}?done=")
        assert d.store.get_run(run_id)["status"] == "cancelled"
        assert "cancelled" in c.get(r.headers["location"]).text


def test_without_an_api_token_the_pages_are_closed_and_say_why(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.pop("api_token")
    with daemon_in_process(cfg) as d:
        r = httpx.get(f"{d.url}/runs")
        assert r.status_code == 403 and "api_token" in r.text and "read_requires_token" in r.text
        r = httpx.post(f"{d.url}/login", data={"token": ""})
        assert r.status_code == 403 and "no api_token" in r.text


def test_a_login_goes_back_only_to_a_page_of_this_site(tmp_path):
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        for target, expected in (("/runs/7", "/runs/7"), ("//evil.example/x", "/runs"),
                                 ("https://evil.example/", "/runs"), ("/\\evil.example", "/runs")):
            r = httpx.post(f"{d.url}/login", data={"token": TOKEN, "next": target})
            assert r.status_code == 303 and r.headers["location"] == expected, target
        wrong = httpx.post(f"{d.url}/login", data={"token": TOKEN + "x"})
        assert wrong.status_code == 401 and "runner_session" not in wrong.cookies
        # Reading without a login sends the browser to the login page, and back after it.
        r = httpx.get(f"{d.url}/runs?status=failed")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fruns%3Fstatus%3Dfailed"
        assert httpx.get(f"{d.url}/runs/events").status_code == 401  # a stream is refused, not redirected


def test_runs_page_filters_and_pages_without_counting(tmp_path):
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        ids = [_run(d) for _ in range(3)]
        c = _logged_in(d.url)
        with_limit = c.get("/runs").text
        assert all(f"#{i}" in with_limit for i in ids) and "Older runs" not in with_limit
        older = c.get("/runs", params={"before": ids[-1]}).text
        assert f"#{ids[-1]}<" not in older and f"#{ids[0]}<" in older
        filtered = c.get("/runs", params={"status": "failed"}).text
        assert "No runs match these filters" in filtered
        assert '<option value="failed" selected>' in filtered  # the form says what it filters by
        assert c.get("/runs/999").status_code == 404


def test_a_run_page_shows_the_build_scan_and_deploy_outputs(tmp_path):
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        run_id = _run(d)
        d.store.stage_event(run_id, "build", "success", duration=3.2, outputs={
            "cached_steps": 4, "total_steps": 6, "tags": ["reg/app:abc1234"]})
        d.store.stage_event(run_id, "scan", "failed", duration=1.0, error="2 findings at or above HIGH", outputs={
            "passed": False, "fail_on": "HIGH", "counts": {"CRITICAL": 1, "HIGH": 1}, "ignored": 3,
            "checked": ["vuln", "secret"], "skipped_scanners": {"misconfig": "not asked for"},
            "top": [{"id": "CVE-2024-0001", "scanner": "vuln", "severity": "CRITICAL", "target": "image",
                     "where": "openssl 3.0.1", "title": "a <bad> bug", "fixed_version": "3.0.2"}]})
        d.store.stage_event(run_id, "deploy", "failed", duration=9.0, outputs={
            "app": "app", "what": "deploy", "ok": False, "headline": "deploy of app failed on web-2",
            "servers": [
                {"name": "web-1", "status": "rolled_back", "digest": "sha256:" + "1" * 64,
                 "previous_digest": "sha256:" + "1" * 64, "rolled_back": True, "verified": True,
                 "reason": "another server of the rollout failed", "duration": 4.0,
                 "phases": {"pull": 1.25, "health": 2.0}},
                {"name": "web-2", "status": "failed", "digest": "sha256:" + "1" * 64,
                 "previous_digest": "sha256:" + "1" * 64, "rolled_back": True, "verified": True,
                 "reason": "web-2: not healthy within 20s", "duration": 21.0, "phases": {"health": 20.0}}]})
        page = _logged_in(d.url).get(f"/runs/{run_id}").text
        assert "4 of 6 steps cached, 2 ran; reg/app:abc1234" in page
        assert "gate failed (fail on HIGH)" in page and "2 findings at or above HIGH" in page
        assert "CVE-2024-0001" in page and "openssl 3.0.1" in page and "a &lt;bad&gt; bug" in page
        assert "Skipped misconfig: not asked for" in page and "ignored 3" in page
        assert "deploy of app failed on web-2" in page
        web1 = re.search(r"<th scope=\"row\">web-1</th>(.*?)</tr>", page, re.S).group(1)
        assert "rolled_back" in web1 and "pull 1.2s, health 2.0s" in web1 and "yes" in web1
        assert "another server of the rollout failed" in web1
        assert "web-2: not healthy within 20s" in page


def test_retry_from_the_page_queues_the_same_commit_linked(tmp_path):
    with daemon_in_process(_cfg(tmp_path)) as d:
        run_id = _ended(d, _run(d))["id"]
        c = _logged_in(d.url)
        r = c.post(f"/runs/{run_id}/retry", data={"csrf": _csrf(c.get(f"/runs/{run_id}").text)})
        assert r.status_code == 303
        new_id = int(re.match(r"/runs/(\d+)\?", r.headers["location"]).group(1))
        new = d.store.get_run(new_id)
        assert new["retry_of"] == run_id and new["commit"] == SHA1 and new["trigger"] == "retry"
        assert f"retry of run {run_id} queued" in c.get(r.headers["location"]).text


def test_a_commit_links_to_the_forge_from_the_runs_stored_event(tmp_path):
    cfg = config(tmp_path, [{"name": "app", "file": str(fake_pipeline(tmp_path)),
                             "repo": "https://github.com/acme/app.git"}], concurrency=0)
    with daemon_in_process(cfg) as d:
        run_id = _run(d)  # a commit is given: nothing asks the remote
        c = _logged_in(d.url)
        link = f'href="https://github.com/acme/app/commit/{SHA1}"'
        assert link in c.get(f"/runs/{run_id}").text
        assert link in c.get("/runs").text


def _queued(d, event: dict, pipeline: str = "app") -> int:
    """A run with this stored event, left queued (the daemons here run nothing: concurrency 0)."""
    ids, _ = d.store.enqueue([NewRun(pipeline=pipeline, trigger="push", provider="github", ref="refs/heads/main",
                                     branch="main", commit=SHA1, event=event)])
    return ids[0]


def test_a_run_page_shows_the_commit_message_author_and_the_pull_request_escaped(tmp_path):
    """From the run's stored request (the delivery parsed once when it arrived), not its payload."""
    hostile = "<script>alert(1)</script> fix the <b>cache</b>"
    push = {"provider": "github", "headers": {}, "payload": {
        "ref": "refs/heads/main", "after": SHA1, "repository": {"html_url": "https://github.com/payload/not-read"},
        "head_commit": {"id": SHA1, "message": "the payload's message", "author": {"name": "Payload"}}},
        "request": RunRequest(kind="push", provider="github", commit=SHA1, repo_url="https://github.com/acme/app",
                              commit_message=f"{hostile}\n\nbody <img src=x onerror=alert(2)>\nmore",
                              commit_author="Eve <eve@example.com>", sender="eve").to_dict()}
    pull = {"provider": "github", "headers": {}, "payload": {}, "request": RunRequest(
        kind="pull_request", provider="github", commit=SHA1, sender="contributor", pull_request=PullRequest(
            number=2, title="Add the <login> page", url="https://github.com/acme/app/pull/2",
            head_branch="feature/login", base_branch="main")).to_dict()}
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        push_id, pull_id = _queued(d, push), _queued(d, pull)
        c = _logged_in(d.url)
        page = c.get(f"/runs/{push_id}").text
        assert "<script>alert(1)" not in page and "<img src=x" not in page and "<b>cache" not in page
        assert "the payload's message" not in page and "Payload" not in page and "payload/not-read" not in page
        # The first line shown, the rest collapsed under it.
        assert ('<summary><span class="title">&lt;script&gt;alert(1)&lt;/script&gt; fix the &lt;b&gt;cache&lt;/b&gt;'
                '</span></summary><pre class="body">body &lt;img src=x onerror=alert(2)&gt;\nmore</pre>') in page
        assert '<dd id="commit-author">Eve &lt;eve@example.com&gt;</dd>' in page
        assert f'href="https://github.com/acme/app/commit/{SHA1}"' in page
        page = c.get(f"/runs/{pull_id}").text
        assert ('<a href="https://github.com/acme/app/pull/2" rel="noopener noreferrer">#2</a> Add the &lt;login&gt; page'
                in page)
        assert "feature/login → main" in page and "refs/pull" not in page
        # GitHub's pull request event names no commit author: none is shown, who opened it is.
        assert 'id="commit-author"' not in page and '<dd id="sender">contributor</dd>' in page


def test_a_run_page_shows_the_test_results(tmp_path):
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        run_id = _run(d)
        d.store.stage_event(run_id, "test", "failed", duration=7.5, error="step unit failed", outputs={
            "passed": False, "summary": "41 passed, 2 failed, 1 skipped", "services": ["db"],
            "counts": {"passed": 41, "failed": 2, "errors": 0, "skipped": 1, "total": 44},
            "steps": [{"name": "unit", "image": "sha256:abc", "status": "failed", "exit_code": 1,
                       "failed_command": "pytest -q", "duration": 6.0,
                       "counts": {"passed": 41, "failed": 2, "errors": 0, "skipped": 1, "total": 44}, "reports": []},
                      {"name": "lint", "image": "python:3", "status": "not run", "exit_code": None,
                       "failed_command": None, "duration": 0.0, "counts": {}, "reports": []}],
            "failures": [{"step": "unit", "test": "tests.test_db.test_insert", "message": "assert 1 == <2>",
                          "error": False}],
            "phases": {}})
        page = _logged_in(d.url).get(f"/runs/{run_id}").text
        assert '<p id="test-summary">' in page and "41 passed, 2 failed, 1 skipped; services db." in page
        unit = re.search(r'<th scope="row">unit</th>(.*?)</tr>', page, re.S).group(1)
        assert "✘ failed" in unit and "41 passed, 2 failed, 1 skipped" in unit and "<code>pytest -q</code> exited 1" in unit
        assert "– not run" in re.search(r'<th scope="row">lint</th>(.*?)</tr>', page, re.S).group(1)
        assert "<code>tests.test_db.test_insert</code>" in page and "assert 1 == &lt;2&gt;" in page


def _first_event(c: httpx.Client, path: str, event: str) -> dict:
    with c.stream("GET", path) as s:
        name = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == event:
                return json.loads(line[6:])
    raise AssertionError(f"no {event} event")


def test_the_event_stream_first_replays_the_stage_states(tmp_path):
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        run_id = _run(d)
        d.store.stage_event(run_id, "build", "running")
        c = _logged_in(d.url)
        page = c.get(f"/runs/{run_id}").text
        assert 'data-state="queued;build=running"' in page
        # The stage ends after the page was made, before its stream connects: the stream's first
        # word is the state now, which the page's script compares with its own.
        d.store.stage_event(run_id, "build", "success", duration=1.0)
        assert _first_event(c, f"/runs/{run_id}/events", "changed") == {
            "status": "queued", "state": "queued;build=success"}
        assert 'data-state="queued;build=success"' in c.get(f"/runs/{run_id}/summary").text


def test_cancel_and_roll_back_ask_first(tmp_path):
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        run_id = _run(d)
        c = _logged_in(d.url)
        page = c.get(f"/runs/{run_id}").text
        assert f'data-confirm="Cancel run {run_id}?"' in page  # the page's script asks
        assert c.post("/runs/999/cancel", data={"csrf": _csrf(page)}).status_code == 404  # nothing to ask
        # Without the script: a page that asks, whose form carries the CSRF token and the answer.
        r = c.post(f"/runs/{run_id}/cancel", data={"csrf": _csrf(page)})
        assert r.status_code == 200 and f"Cancel run {run_id}?" in r.text
        assert d.store.get_run(run_id)["status"] == "queued"
        assert '<input type="hidden" name="confirmed" value="yes">' in r.text and _csrf(r.text) == _csrf(page)
        r = c.post(f"/runs/{run_id}/cancel", data={"csrf": _csrf(r.text), "confirmed": "yes"})
        assert r.status_code == 303 and d.store.get_run(run_id)["status"] == "cancelled"
        r = c.post("/pipelines/app/rollback", data={"csrf": _csrf(page), "to": "sha256:" + "a" * 64})
        assert r.status_code == 200 and "Roll app back to sha256:aaaaaaaaaaaa on every server?" in r.text
        assert f'name="to" value="sha256:{"a" * 64}"' in r.text
        assert [x["trigger"] for x in d.store.list_runs()] == ["manual"]  # no rollback queued


def test_roll_back_is_not_offered_for_the_release_that_runs(tmp_path):
    def deployed(run_id: int, digest: str) -> None:
        d.store.stage_event(run_id, "deploy", "success", duration=2.0, outputs={
            "app": "app", "what": "deploy", "ok": True, "headline": "deployed",
            "servers": [{"name": "web-1", "status": "deployed", "digest": digest, "previous_digest": None,
                         "rolled_back": False, "verified": True, "reason": "", "phases": {}}]})
    first, second = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    with daemon_in_process(_cfg(tmp_path, concurrency=0)) as d:
        a = _run(d)
        deployed(a, first)
        c = _logged_in(d.url)
        page = c.get(f"/runs/{a}").text
        assert 'id="rollback-here"' not in page and "This release (sha256:111111111111) runs now" in page
        b = _run(d)
        deployed(b, second)
        assert 'id="rollback-here"' in c.get(f"/runs/{a}").text
        assert 'id="rollback-here"' not in c.get(f"/runs/{b}").text


def test_deliveries_page_shows_repository_ref_and_action(tmp_path):
    repo = "https://forge.example/acme/app"
    cfg = config(tmp_path, [{"name": "app", "file": str(fake_pipeline(tmp_path)), "repo": repo + ".git",
                             "triggers": {"push": {"branches": ["main"]}}}], concurrency=0)
    with daemon_in_process(cfg) as d:
        assert send_github(d.url, push_payload(repo, ref="refs/heads/feature/x"), "d-1").json()["outcome"] == "ignored"
        pull = {"action": "synchronize", "number": 4, "pull_request": {
            "number": 4, "title": "t", "html_url": f"{repo}/pull/4", "user": {"login": "u"},
            "head": {"ref": "feature/y", "sha": "b" * 40, "repo": {"clone_url": repo + ".git", "html_url": repo}},
            "base": {"ref": "main", "sha": "c" * 40, "repo": {"clone_url": repo + ".git", "html_url": repo}}},
            "repository": {"clone_url": repo + ".git", "html_url": repo, "full_name": "acme/app"}}
        send_github(d.url, pull, "d-2", event="pull_request")
        page = _logged_in(d.url).get("/deliveries").text
        rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr class=\"out-\w+\">.*?<code>(d-\d)</code>.*?</tr>",
                                                                page, re.S)}
        assert f'<td class="repo">{repo}</td>' in rows["d-1"] and '<td class="ref">refs/heads/feature/x</td>' in rows["d-1"]
        assert '<small class="action">synchronize</small>' in rows["d-2"]
        assert '<td class="ref">#4 feature/y → main</td>' in rows["d-2"]
