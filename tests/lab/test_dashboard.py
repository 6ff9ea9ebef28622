"""The web dashboard in a real browser (Debian's chromium through Selenium, headless) against a
real daemon on loopback running the real `runner exec` on the lab: a push webhook builds (with a
build secret the Dockerfile prints), pushes and deploys to a lab server.

One daemon and one browser for the module; the tests run in file order and build on each other
(the first run's deploy is what the servers page shows). A screenshot of every page is saved
under test-output/screenshots/ (tests/lab/browser.py says where).
"""
from __future__ import annotations

import os
import re
import time
import secrets as _random
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import commit_files, make_repo, remove_app_on_server
from tests.lab.deploy_fixtures import _port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import (TOKEN, config, daemon_in_process, fake_pipeline, git, push_payload, send_github,  # noqa: E402
                     wait_for)

from runner.daemon.run_requests import stored_event  # noqa: E402
from runner.daemon.store import NewRun  # noqa: E402
from runner.run_request import PullRequest, RunRequest  # noqa: E402
from runner.trigger import parse_event  # noqa: E402

from tests.lab.browser import phone, screenshot  # noqa: E402
from tests.lab.browser import wait_for as wait_page  # noqa: E402

UID = _random.token_hex(3)
SECRET = f"dash-{UID}-never-show-me-9f2c4e1b"
SECRET_ENV = f"RUNNER_TEST_DASH_TOKEN_{UID}"
FINAL = ("success", "failed", "invalid", "cancelled", "interrupted")

# The build prints the secret (masked by the engine: the page must show ***), then a line every
# 0.4 s for a few seconds: the live log's lines. {version} is new in each session: never cached.
DOCKERFILE = """FROM local/busybox:1
RUN --mount=type=secret,id=tok echo "build {version}" && echo "build-secret: $(cat /run/secrets/tok)" && \\
    for i in 1 2 3 4 5 6 7 8 9 10; do echo "tick $i"; sleep 0.4; done
RUN mkdir -p /www && echo ok > /www/health && echo {version} > /www/index.html
HEALTHCHECK --interval=1s --timeout=2s CMD wget -q -O /dev/null http://127.0.0.1:8080/health || exit 1
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


def _final(d, run_id: int, timeout: float = 240) -> dict:
    return wait_for(lambda: (r := d.store.get_run(run_id)) and r["status"] in FINAL and r, timeout,
                    f"run {run_id} to end", every=0.2)


@pytest.fixture(scope="module")
def dash(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    repo = make_repo(tmp / "repo", {"Dockerfile": DOCKERFILE.format(version=f"v1-{UID}")})
    server = lab["servers"][0]
    app, port = f"dash-{UID}", _port()
    pipeline = tmp / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "version": 1, "name": "dash",
        "repository": {"url": str(repo)},
        "image": {"name": f"{lab['registry']}/test/dash-{UID}", "tags": ["{short_sha}"]},
        "secrets": {"TOKEN": {"env": SECRET_ENV}},
        "stages": {
            "build": {"secrets": [{"id": "tok", "secret": "TOKEN"}]},
            "deploy": {
                "servers": [f"{server['user']}@{server['host']}:{server['port']}"],
                "ssh": {"key_file": server["key_file"], "known_hosts": server["known_hosts"],
                        "connect_timeout": 5, "retries": 1},
                "container": {"name": app, "ports": [f"{port}:8080"], "stop_timeout": 2},
                "healthcheck": {"http": {"port": 8080, "path": "/health"}, "timeout": 20,
                                "probe_interval": 0.2},
            }}}))
    cfg = config(tmp, [{"name": "dash", "file": str(pipeline), "repo": str(repo),
                        "triggers": {"push": {"branches": ["main"]}}}])
    cfg.pop("exec_command")  # the real runner exec
    os.environ[SECRET_ENV] = SECRET  # what the runs' `runner exec` (a child of the daemon) reads
    try:
        with daemon_in_process(cfg) as d:
            yield {"daemon": d, "url": d.url, "repo": repo, "app": app, "port": port, "server": server}
    finally:
        _remove(pipeline, app)
        os.environ.pop(SECRET_ENV, None)


def _remove(pipeline: Path, app: str) -> None:
    from deployers.ssh_docker import SSHDockerDeployer
    from runner.pipeline_file import open_pipeline

    opened = open_pipeline(pipeline, {})
    d = SSHDockerDeployer(opened.pipeline.stages.deploy, pipeline="dash", image_name=opened.pipeline.image.name,
                          run_id="cleanup", secret=opened.secrets.value)
    try:
        remove_app_on_server(d, d.connection(d.targets[0]), app)
    finally:
        d.close()


def _login(browser, url: str) -> None:
    browser.get(f"{url}/login?next=/runs")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("css selector", "form.stacked button[type=submit]").click()
    wait_page(browser, lambda: browser.current_url.endswith("/runs"), what="the runs page after logging in")


def _answer(browser, question: str, accept: bool) -> None:
    """The browser's confirmation dialog, which the page's script opens before a form that
    cancels or rolls back: it must say what it asks; accept or dismiss it."""
    alert = wait_page(browser, lambda: browser.switch_to.alert, timeout=5, what=f"the dialog asking {question!r}")
    assert alert.text == question
    alert.accept() if accept else alert.dismiss()


def _no_secret(text: str, where: str) -> None:
    assert SECRET not in text, f"the secret's value is in {where}"


def test_actions_need_a_login_and_the_forms_csrf_token(dash, browser):
    url = dash["url"]
    # Without a login: reading redirects to the login page, an action is refused.
    assert httpx.get(f"{url}/runs").status_code == 303
    r = httpx.post(f"{url}/runs/1/cancel", data={"csrf": "x"})
    assert r.status_code == 401 and "Log in" in r.text
    # A wrong token is refused on the page, with the reason.
    browser.delete_all_cookies()
    browser.get(f"{url}/login")
    browser.find_element("id", "token").send_keys("not-the-token")
    browser.find_element("css selector", "form.stacked button[type=submit]").click()
    wait_page(browser, lambda: browser.find_elements("id", "login-error"), what="the login error")
    assert "not the API token" in browser.find_element("id", "login-error").text
    screenshot(browser, "login-refused")
    _login(browser, url)
    cookie = browser.get_cookie("runner_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # Logged in, a form without its CSRF token, or with another session's, is refused.
    jar = {"runner_session": cookie["value"]}
    r = httpx.post(f"{url}/runs/1/cancel", data={}, cookies=jar)
    assert r.status_code == 403 and "CSRF" in r.text
    other = httpx.post(f"{url}/login", data={"token": TOKEN}).cookies["runner_session"]
    page = httpx.get(f"{url}/runs", cookies={"runner_session": other}).text
    other_csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    r = httpx.post(f"{url}/runs/1/cancel", data={"csrf": other_csrf}, cookies=jar)
    assert r.status_code == 403
    # A form posted from another site's page (its Origin) is refused even with the token.
    mine = re.search(r'name="csrf" value="([0-9a-f]+)"', httpx.get(f"{url}/runs", cookies=jar).text).group(1)
    r = httpx.post(f"{url}/runs/1/cancel", data={"csrf": mine}, cookies=jar,
                   headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "another site" in r.text
    r = httpx.post(f"{url}/runs/1/cancel", data={"csrf": mine}, cookies=jar)
    assert r.status_code == 404  # accepted as a form; there is no run 1 yet


def test_a_webhook_run_is_listed_and_followed_live(dash, browser):
    d, url, repo = dash["daemon"], dash["url"], dash["repo"]
    browser.get(f"{url}/runs")
    sha = git("rev-parse", "HEAD", cwd=repo)
    r = send_github(url, push_payload(str(repo), after=sha), f"dash-{UID}-1")
    assert r.status_code == 202, r.text
    run_id = r.json()["runs"][0]
    # The runs page, already open, gets the new run by itself (live), with its trigger.
    wait_page(browser, lambda: browser.find_elements("link text", f"#{run_id}"), timeout=15,
              what="the webhook's run to appear on the open runs page")
    row = browser.find_element("link text", f"#{run_id}").find_element("xpath", "./ancestor::tr")
    assert "push" in row.text and "dash" in row.text and "main" in row.text
    screenshot(browser, "runs-live")
    browser.get(f"{url}/runs/{run_id}")
    wait_page(browser, lambda: "ended" in browser.find_element("id", "live-state").text, timeout=240,
              what="the run to end on its page")
    run = _final(d, run_id)
    assert run["status"] == "success", (run, d.store.logs(run_id)[-30:])
    assert "success" in browser.find_element("id", "run-status").text
    # Lines that came live (not in the page as it was first served) carry when the stage wrote
    # them and when the page got them: each within a second.
    live = browser.execute_script(
        "return Array.from(document.querySelectorAll('span.line[data-received]'))"
        ".map(e => [e.textContent, parseFloat(e.dataset.t), parseFloat(e.dataset.received)])")
    assert len(live) >= 5, f"only {len(live)} lines arrived live"
    late = [(text, round(got - t, 3)) for text, t, got in live if got - t > 1.0]
    assert not late, f"lines that took over a second to reach the page: {late[:5]}"
    assert any(text.startswith("tick") or "tick " in text for text, _, _ in live)
    # Everything the stages logged is on the page, in order, once.
    page_lines = browser.execute_script(
        "return Array.from(document.querySelectorAll('span.line')).map(e => e.id)")
    stored = [f"L{x['seq']}" for x in d.store.logs(run_id, limit=10000)]
    assert sorted(page_lines, key=lambda s: int(s[1:])) == stored and len(set(page_lines)) == len(page_lines)
    # The build printed the secret; the page shows it masked.
    text = browser.find_element("id", "log-build").text
    assert "build-secret: ***" in text
    _no_secret(browser.page_source, "the run page")
    stages = [e.text for e in browser.find_elements("css selector", "table.stages th[scope=row]")]
    assert stages == ["checkout", "build", "push", "deploy"]
    assert "steps cached" in browser.find_element("css selector", "table.stages").text
    deploy = browser.find_element("css selector", "table.deploy").text
    assert "deployed" in deploy and dash["server"]["host"] in deploy
    screenshot(browser, "run-success")
    with phone(browser):
        screenshot(browser, "run-success-phone")
    dash["first"] = run_id


def test_no_page_or_event_stream_shows_the_secret(dash, browser):
    url, run_id = dash["url"], dash["first"]
    jar = {"runner_session": browser.get_cookie("runner_session")["value"]}
    with httpx.stream("GET", f"{url}/runs/{run_id}/events", params={"after": 0}, cookies=jar, timeout=30) as s:
        events = s.read().decode()
    assert "build-secret: ***" in events and "event: end" in events
    _no_secret(events, "the run's event stream")
    api = httpx.get(f"{url}/api/runs/{run_id}/logs", headers={"Authorization": f"Bearer {TOKEN}"}).text
    _no_secret(api, "the logs API")
    for path in ("/runs", f"/runs/{run_id}", f"/runs/{run_id}/summary", "/runs/rows", "/deliveries", "/servers"):
        _no_secret(httpx.get(f"{url}{path}", cookies=jar, timeout=60).text, path)


def test_servers_page_says_what_runs_where(dash, browser):
    d, url = dash["daemon"], dash["url"]
    push = {s["name"]: s for s in d.store.stages(dash["first"])}["push"]["outputs"]
    browser.get(f"{url}/servers?refresh=1")
    table = browser.find_element("css selector", "table.servers")
    row = table.find_element("xpath", ".//tbody/tr[1]").text
    assert "running" in row and "healthy" in row and "verified" in row, row
    assert push["digest"][7:19] in row  # the digest the push kept runs there
    assert f"#{dash['first']}" in row and "free" in row  # its run; nobody holds the deploy lock
    assert f"#{dash['first']}" in browser.find_element("css selector", "ul.recent").text
    screenshot(browser, "servers")
    with phone(browser):
        screenshot(browser, "servers-phone")


def test_cancel_from_the_page_cancels_the_run(dash, browser):
    d, url, repo = dash["daemon"], dash["url"], dash["repo"]
    # The module's UID in the step: a layer cached by an earlier run (one whose cancel came after
    # the sleep) would finish at once, with no line to wait for and nothing to cancel.
    slow = commit_files(repo, {"Dockerfile": f"FROM local/busybox:1\nRUN echo slow-build-starts {UID} && sleep 41.7\n"},
                        "slow")
    r = send_github(url, push_payload(str(repo), after=slow), f"dash-{UID}-2")
    run_id = r.json()["runs"][0]
    browser.get(f"{url}/runs/{run_id}")
    wait_page(browser, lambda: "slow-build-starts" in browser.find_element("id", "logs").text, timeout=120,
              what="the slow build's first line on the page")
    screenshot(browser, "run-live")
    browser.find_element("id", "cancel").click()
    _answer(browser, f"Cancel run {run_id}?", accept=True)
    wait_page(browser, lambda: "cancel requested" in browser.page_source, what="the cancel's confirmation")
    run = _final(d, run_id, timeout=60)
    assert run["status"] == "cancelled" and "dashboard" in run["reason"], run
    wait_page(browser, lambda: "cancelled" in browser.find_element("id", "run-status").text, timeout=15,
              what="the page to show the run cancelled")
    assert {s["name"]: s["status"] for s in d.store.stages(run_id)}["build"] == "cancelled"
    screenshot(browser, "run-cancelled")


def test_roll_back_from_the_servers_page(dash, browser):
    d, url, repo, server = dash["daemon"], dash["url"], dash["repo"], dash["server"]
    first = {s["name"]: s for s in d.store.stages(dash["first"])}["push"]["outputs"]["digest"]
    v2 = commit_files(repo, {"Dockerfile": DOCKERFILE.format(version=f"v2-{UID}")}, "v2")
    second = send_github(url, push_payload(str(repo), after=v2), f"dash-{UID}-5").json()["runs"][0]
    assert _final(d, second)["status"] == "success", d.store.logs(second)[-20:]
    assert f"v2-{UID}" in httpx.get(f"http://{server['host']}:{dash['port']}/", timeout=5).text
    browser.get(f"{url}/servers?refresh=1")
    browser.find_element("css selector", "details.releases summary").click()
    button = browser.find_element("css selector", f"button[aria-label='Roll back dash to sha256:{first[7:19]}']")
    screenshot(browser, "servers-releases")
    button.click()
    _answer(browser, f"Roll dash back to sha256:{first[7:19]} on every server?", accept=True)
    wait_page(browser, lambda: re.search(r"/runs/(\d+)\?done=", browser.current_url), what="the rollback run's page")
    run_id = int(re.search(r"/runs/(\d+)", browser.current_url).group(1))
    assert "rollback of dash to" in browser.page_source
    run = _final(d, run_id, timeout=120)
    assert run["status"] == "success" and run["trigger"] == "rollback", (run, d.store.logs(run_id)[-20:])
    wait_page(browser, lambda: browser.find_elements("css selector", "table.deploy"), timeout=15,
              what="the rollback's servers on its page")
    assert browser.find_element("id", "h-deploy").text.startswith("Rollback of")
    assert first[7:19] in browser.find_element("css selector", "table.deploy").text
    assert f"v1-{UID}" in httpx.get(f"http://{server['host']}:{dash['port']}/", timeout=5).text
    screenshot(browser, "run-rollback")
    # The container runs exactly as that release ran: its run is the one that deployed it first.
    browser.get(f"{url}/servers?refresh=1")
    row = browser.find_element("css selector", "table.servers tbody tr").text
    assert first[7:19] in row and f"#{dash['first']}" in row and "verified" in row, row


def test_deliveries_page_says_why_a_push_did_not_run(dash, browser):
    url, repo = dash["url"], dash["repo"]
    sha = git("rev-parse", "HEAD", cwd=repo)
    r = send_github(url, push_payload(str(repo), ref="refs/heads/feature/x", after=sha), f"dash-{UID}-3")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored", r.text
    bad = send_github(url, push_payload(str(repo), after=sha), f"dash-{UID}-4", secret="wrong-secret")
    assert bad.status_code == 401
    browser.get(f"{url}/deliveries")
    text = browser.find_element("css selector", "table.deliveries").text
    assert f"dash-{UID}-3" in text and "ignored" in text and "feature/x" in text, text
    assert f"dash-{UID}-4" in text and "rejected" in text and "401" in text, text
    assert f"dash-{UID}-1" in text and "queued" in text
    # Which repository and ref each was about (not for the rejected one: its payload is not trusted).
    row = browser.find_element("xpath", f"//table[contains(@class,'deliveries')]//tr[td/small/code='dash-{UID}-3']")
    assert row.find_element("css selector", "td.repo").text == str(repo)
    assert row.find_element("css selector", "td.ref").text == "refs/heads/feature/x"
    bad_row = browser.find_element("xpath", f"//table[contains(@class,'deliveries')]//tr[td/small/code='dash-{UID}-4']")
    assert bad_row.find_element("css selector", "td.repo").text == ""
    screenshot(browser, "deliveries")
    with phone(browser):
        screenshot(browser, "deliveries-phone")
    # Every field of every form is labelled (what a screen reader says for it).
    for path in ("/runs", "/deliveries", "/login"):
        browser.get(f"{url}{path}")
        unlabelled = browser.execute_script(
            "return Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea'))"
            ".filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.outerHTML)")
        assert not unlabelled, (path, unlabelled)
    browser.get(f"{url}/runs?status=cancelled")
    screenshot(browser, "runs-filtered")
    with phone(browser):
        browser.get(f"{url}/runs")
        screenshot(browser, "runs-phone")


def test_log_out_ends_the_session(dash, browser):
    url = dash["url"]
    browser.get(f"{url}/runs")
    cookie = browser.get_cookie("runner_session")["value"]
    browser.find_element("css selector", "header form button").click()
    wait_page(browser, lambda: "/login" in browser.current_url, what="the login page after logging out")
    assert browser.get_cookie("runner_session") is None
    assert httpx.get(f"{url}/runs", cookies={"runner_session": cookie}).status_code == 303  # ended here too
    screenshot(browser, "login")


def test_the_log_pane_follows_and_a_stage_that_ended_unseen_shows_ended(browser, tmp_path):
    """A daemon that runs nothing (concurrency 0): the test writes the run's stages and lines into
    its store as a worker would, so that it decides when each arrives."""
    message = "Fix the <b>cache</b> key\n\nIt was keyed by path; now by the file's digest."
    payload = {"ref": "refs/heads/main", "after": "a" * 40, "head_commit": {
        "id": "a" * 40, "message": message, "author": {"name": "Ann Author"}}}
    # As the webhook stores it: the delivery parsed once into the run's request.
    event = stored_event("github", {}, payload, parse_event(payload, provider="github"))
    cfg = config(tmp_path, [{"name": "app", "file": str(fake_pipeline(tmp_path))}], concurrency=0)
    with daemon_in_process(cfg) as d:
        (run_id,), _ = d.store.enqueue([NewRun(pipeline="app", trigger="push", provider="github",
                                               ref="refs/heads/main", branch="main", commit="a" * 40, event=event)])
        d.store.stage_event(run_id, "checkout", "success", duration=0.4)
        d.store.stage_event(run_id, "build", "running")
        seq = 0

        def lines(n: int, shown: bool = True) -> None:
            nonlocal seq
            d.store.append_logs(run_id, [(seq + i + 1, "build", time.time(), f"step {seq + i + 1}") for i in range(n)])
            seq += n
            d.live.changed(run_id)
            if shown:
                wait_page(browser, lambda: browser.find_elements("id", f"L{seq}"), what=f"line {seq} on the page")

        lines(3, shown=False)
        _login(browser, d.url)  # signed with the same API token as the module's daemon: both accept it
        # The page's stream is held back (the browser pauses its request) while a stage ends: as
        # when the page is served just before a stage ends and its stream connects just after.
        browser.execute_cdp_cmd("Fetch.enable", {"patterns": [{"urlPattern": "*/events*"}]})
        try:
            browser.get(f"{d.url}/runs/{run_id}")

            def build_status() -> str:
                return browser.find_element("xpath", "//table[contains(@class,'stages')]//tr[th/a='build']").text
            assert "running" in build_status()
            d.store.stage_event(run_id, "build", "success", duration=2.0)
            d.store.stage_event(run_id, "test", "running")
        finally:
            browser.execute_cdp_cmd("Fetch.disable", {})  # lets the paused request go on
        # The stream connects now and finds nothing new to send but the states: the page must
        # show the build ended all the same.
        wait_page(browser, lambda: "success" in build_status(), timeout=15,
                  what="the build, which ended before the stream connected, shown ended")
        assert "Fix the <b>cache</b> key" in browser.find_element("id", "commit-message").text
        assert browser.find_element("id", "commit-author").text == "Ann Author"
        browser.find_element("css selector", "#commit-message summary").click()  # the rest of the message
        assert "now by the file's digest" in browser.find_element("id", "commit-message").text
        screenshot(browser, "run-commit")
        with phone(browser):
            screenshot(browser, "run-commit-phone")

        # The log pane follows new lines while it is at its end...
        for _ in range(4):
            lines(40)
        pane = "document.querySelector('#log-build pre')"
        height, top, client = browser.execute_script(f"var p = {pane}; return [p.scrollHeight, p.scrollTop, p.clientHeight]")
        assert height > client + 500, "the pane should overflow for this test to mean anything"
        assert height - top - client < 30, (height, top, client)
        browser.execute_script("window.scrollTo(0, 0)")
        screenshot(browser, "run-following")
        with phone(browser):
            screenshot(browser, "run-following-phone")
        # ...stays where the reader scrolled up to...
        browser.execute_script(f"{pane}.scrollTop = 100")
        time.sleep(0.2)  # the scroll event
        lines(20)
        assert browser.execute_script(f"return {pane}.scrollTop") == 100
        # ...and follows again once scrolled back down to the end.
        browser.execute_script(f"var p = {pane}; p.scrollTop = p.scrollHeight")
        time.sleep(0.2)
        lines(20)
        height, top, client = browser.execute_script(f"var p = {pane}; return [p.scrollHeight, p.scrollTop, p.clientHeight]")
        assert height - top - client < 30, (height, top, client)

        # Cancel asks first: dismissed, nothing happens; accepted, the run is cancelled.
        browser.find_element("id", "cancel").click()
        _answer(browser, f"Cancel run {run_id}?", accept=False)
        time.sleep(0.3)
        assert d.store.get_run(run_id)["status"] == "queued" and f"/runs/{run_id}" in browser.current_url
        browser.find_element("id", "cancel").click()
        _answer(browser, f"Cancel run {run_id}?", accept=True)
        wait_page(browser, lambda: d.store.get_run(run_id)["status"] == "cancelled", what="the run cancelled")
        wait_page(browser, lambda: "cancelled" in browser.find_element("id", "run-status").text,
                  what="the page to show the run cancelled")

        # A pull request's run whose tests failed, as the page shows it (for the screenshots).
        pull = {"request": RunRequest(kind="pull_request", provider="github", commit="b" * 40, sender="contributor",
                                      pull_request=PullRequest(number=2, title="Add the login page",
                                                               url="https://github.com/acme/app/pull/2",
                                                               head_branch="feature/login", base_branch="main")
                                      ).to_dict()}
        (failed,), _ = d.store.enqueue([NewRun(pipeline="app", trigger="pull_request", provider="github",
                                               ref="refs/pull/2/head", commit="b" * 40, event=pull)])
        d.store.stage_event(failed, "checkout", "success", duration=0.4)
        d.store.stage_event(failed, "build", "success", duration=3.1, outputs={"cached_steps": 5, "total_steps": 6})
        d.store.stage_event(failed, "test", "failed", duration=7.5, error="step unit failed: 2 tests failed", outputs={
            "passed": False, "summary": "41 passed, 2 failed, 1 skipped", "services": ["db"],
            "counts": {"passed": 41, "failed": 2, "errors": 0, "skipped": 1, "total": 44},
            "steps": [{"name": "unit", "image": "sha256:abc", "status": "failed", "exit_code": 1,
                       "failed_command": "pytest -q --junitxml=reports/unit.xml", "duration": 6.0,
                       "counts": {"passed": 41, "failed": 2, "errors": 0, "skipped": 1, "total": 44}, "reports": []},
                      {"name": "lint", "image": "python:3.12", "status": "not run", "exit_code": None,
                       "failed_command": None, "duration": 0.0, "counts": {}, "reports": []}],
            "failures": [{"step": "unit", "test": "tests.test_db.test_insert", "message": "assert 1 == 2",
                          "error": False},
                         {"step": "unit", "test": "tests.test_db.test_unique_email",
                          "message": "psycopg.errors.UniqueViolation: duplicate key value", "error": False}],
            "phases": {}})
        browser.get(f"{d.url}/runs/{failed}")
        assert browser.find_element("id", "pull-request").text == "#2 Add the login page"
        assert "41 passed, 2 failed, 1 skipped" in browser.find_element("id", "test-summary").text
        assert "tests.test_db.test_unique_email" in browser.find_element("css selector", "table.test-failures").text
        screenshot(browser, "run-pull-request-tests")
        with phone(browser):
            screenshot(browser, "run-pull-request-tests-phone")
