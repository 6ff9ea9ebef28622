"""The dashboard's pure helpers, by equality: ANSI colours to HTML, times, forge links, the runs
page's query and pagination, and the session cookie and CSRF token (runner/daemon/dashboard)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.daemon.dashboard import views
from runner.daemon.dashboard.session import Sessions
from runner.run_request import PullRequest, RunRequest

SHA = "0123456789abcdef0123456789abcdef01234567"


# -- ANSI -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,html", [
    ("plain", "plain"),
    ("<script>alert(1)</script> & co", "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"),
    ("\x1b[31mred\x1b[0m after", '<span class="fg-red">red</span> after'),
    ("\x1b[1;32mok\x1b[22m still green\x1b[39m", '<span class="fg-green b">ok</span><span class="fg-green"> still green</span>'),
    ("\x1b[91;44mx", '<span class="fg-bright-red bg-blue">x</span>'),
    ("\x1b[38;5;208morange\x1b[m", "orange"),  # 256 colours: the text stays, the colour goes
    ("\x1b[38;2;1;2;3mtrue\x1b[0m", "true"),
    ("\x1b[2K\x1b[1Aprogress\r", "progress"),  # cursor moves and a carriage return: dropped
    ("\x1b]0;title\x07text", "text"),  # an OSC window title
    ("\x1b[31m<b>\x1b[0m", '<span class="fg-red">&lt;b&gt;</span>'),
    ("", ""),
])
def test_ansi_to_html(text, html):
    assert views.ansi_to_html(text) == html


# -- times ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds,text", [
    (None, ""), (0.04, "0.0s"), (1.25, "1.2s"), (42.4, "42s"), (185, "3m 05s"), (3725, "1h 02m"),
])
def test_duration(seconds, text):
    assert views.duration(seconds) == text


def test_run_duration_counts_a_running_run_up_to_now():
    assert views.run_duration({"status": "queued", "started_at": None}) is None
    assert views.run_duration({"status": "success", "started_at": 10.0, "finished_at": 12.5}) == 2.5
    assert views.run_duration({"status": "running", "started_at": 10.0}, now=15.0) == 5.0


def test_timestamps_are_utc():
    assert views.timestamp(0) == ""
    assert views.timestamp(1_700_000_000) == "2023-11-14 22:13:20"
    assert views.iso(1_700_000_000) == "2023-11-14T22:13:20Z"
    assert views.ago(100, now=130) == "30s ago"
    assert views.ago(100, now=100 + 7200) == "2h ago"


# -- forge links ----------------------------------------------------------------------------------

def _req(provider: str | None = None, repo_url: str | None = None, **more) -> RunRequest:
    """A run's stored request (runner.daemon.run_requests: what the webhook's delivery said)."""
    return RunRequest(kind="push", provider=provider, repo_url=repo_url, **more)


@pytest.mark.parametrize("request_,repo,url", [
    (_req("github", "https://github.com/acme/app"), None, f"https://github.com/acme/app/commit/{SHA}"),
    (_req("gitea", "https://git.example.com/acme/app"), None, f"https://git.example.com/acme/app/commit/{SHA}"),
    (_req("gitlab", "https://gitlab.example.com/group/sub/app"), None,
     f"https://gitlab.example.com/group/sub/app/-/commit/{SHA}"),
    # The webhook's address wins over the pipeline's clone URL.
    (_req("github", "https://github.com/acme/app"), "https://mirror.example.com/x/y.git",
     f"https://github.com/acme/app/commit/{SHA}"),
    (None, "https://user:pw@github.com/acme/app.git", f"https://github.com/acme/app/commit/{SHA}"),
    (_req(), "https://gitlab.com/acme/app.git", f"https://gitlab.com/acme/app/-/commit/{SHA}"),  # a poll's
    (None, "git@github.com:acme/app.git", None),  # ssh: no web address to guess
    (None, "/srv/git/app.git", None),
    (_req("github", "javascript:alert(1)//x/y"), None, None),  # never a script link
    (_req("generic", "/srv/git/app.git"), None, None),  # a local path links nowhere
])
def test_commit_url(request_, repo, url):
    assert views.commit_url(SHA, request_, repo) == url


def test_commit_url_needs_a_commit():
    request = _req("github", "https://github.com/a/b")
    assert views.commit_url(None, request) is None
    assert views.commit_url("not-a-sha", request) is None


# -- what a run's stored request says of its commit and pull request -------------------------------

EVENTS = Path(__file__).resolve().parents[1] / "data" / "events"


def test_commit_facts_split_the_message():
    request = _req(commit_message="Fix the cache\n\nIt was keyed by path.\nNow by digest.\n",
                   commit_author="Ann", sender="ann")
    assert views.commit_facts(request) == views.CommitFacts(
        title="Fix the cache", body="It was keyed by path.\nNow by digest.", author="Ann", sender="ann")


def test_commit_facts_of_a_pull_request():
    request = RunRequest(kind="pull_request", sender="contributor", pull_request=PullRequest(
        number=3, title="Fix the login redirect", url="https://github.com/octo-org/app/pull/3",
        head_branch="fix-login", base_branch="main"))
    assert views.commit_facts(request) == views.CommitFacts(
        sender="contributor", pull_number=3, pull_title="Fix the login redirect",
        pull_url="https://github.com/octo-org/app/pull/3", pull_branches="fix-login → main")


@pytest.mark.parametrize("request_", [None, RunRequest(kind="poll", commit=SHA), RunRequest(kind="manual")])
def test_commit_facts_of_runs_without_them_are_empty(request_):
    assert views.commit_facts(request_) == views.CommitFacts()


# -- which release runs now, and what the stream replays ---------------------------------------

def _deploy(status, *servers):
    return {"stage_status": status, "outputs": {"servers": [
        {"digest": d, "previous_digest": p, "rolled_back": rb} for d, p, rb in servers]}}


A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@pytest.mark.parametrize("deploys,running", [
    ([], None),
    ([_deploy("success", (B, A, False), (B, A, False)), _deploy("success", (A, None, False))], B),
    # A failed deploy that put every server back: the release before it still runs.
    ([_deploy("failed", (B, A, True), (B, A, True)), _deploy("success", (A, None, False))], A),
    # A failed one that left a server switched, or one still going: unknown.
    ([_deploy("failed", (B, A, False), (B, A, True)), _deploy("success", (A, None, False))], None),
    ([_deploy("running"), _deploy("success", (A, None, False))], None),
    ([_deploy("skipped"), _deploy("success", (A, None, False))], A),
    ([_deploy("success", (A, None, False), (B, None, False))], None),  # servers disagree
])
def test_running_release(deploys, running):
    assert views.running_release(deploys) == running


def test_run_state_names_the_run_and_every_stage():
    assert views.run_state("running", [{"name": "checkout", "status": "success"},
                                       {"name": "build", "status": "running"}]) == \
        "running;checkout=success;build=running"
    assert views.run_state("queued", []) == "queued"

# -- the runs page's query --------------------------------------------------------------------------

def test_run_query_keeps_only_known_values():
    q = views.RunQuery.parse({"pipeline": " web ", "status": "bogus", "trigger": "poll", "before": "-3",
                              "branch": ""})
    assert q == views.RunQuery(pipeline="web", trigger="poll")
    assert views.RunQuery.parse({"before": "120"}).before == 120
    assert views.RunQuery.parse({"before": "12a"}).before is None


def test_run_query_links():
    q = views.RunQuery(pipeline="web", status="failed", before=90)
    assert q.href() == "/runs?pipeline=web&status=failed&before=90"
    assert q.href(before=None) == "/runs?pipeline=web&status=failed"
    assert views.RunQuery().href() == "/runs"


def test_older_page_only_when_more_rows_exist():
    q = views.RunQuery(branch="main")
    rows = [{"id": i} for i in range(100, 49, -1)]  # 51 rows read for a page of 50
    assert views.older_page(q, rows, page_size=50) == "/runs?branch=main&before=51"
    assert views.older_page(q, rows[:50], page_size=50) is None


def test_status_label_reads_without_colour():
    assert views.status_label("failed") == "✘ failed"
    assert views.status_label("weird") == "weird"
    assert views.short("sha256:" + "a" * 64) == "sha256:" + "a" * 12


# -- sessions and CSRF ------------------------------------------------------------------------------

def test_a_session_needs_the_token_and_expires():
    s = Sessions("the-api-token", max_age=100)
    assert s.login("wrong", now=1000) is None
    cookie = s.login("the-api-token", now=1000)
    assert cookie is not None
    session = s.check(cookie, now=1050)
    assert session is not None and session.issued == 1000
    assert s.check(cookie, now=1101) is None  # expired
    assert s.check(cookie, now=900) is None  # issued in the future (beyond the allowed skew)


def test_a_forged_or_foreign_cookie_is_refused():
    s = Sessions("the-api-token")
    cookie = s.login("the-api-token")
    issued, nonce, mac = cookie.split(".")
    assert s.check(f"{int(issued) + 1}.{nonce}.{mac}") is None  # the time changed
    assert s.check(f"{issued}.{nonce}x.{mac}") is None
    assert s.check("garbage") is None and s.check("") is None and s.check(None) is None
    assert Sessions("another-token").check(cookie) is None  # a rotated token ends every session


def test_logout_ends_the_session():
    s = Sessions("the-api-token")
    cookie = s.login("the-api-token")
    session = s.check(cookie)
    s.logout(session)
    assert s.check(cookie) is None
    assert s.check(s.login("the-api-token")) is not None  # a new login works


def test_csrf_token_is_bound_to_the_session():
    s = Sessions("the-api-token")
    a = s.check(s.login("the-api-token"))
    b = s.check(s.login("the-api-token"))
    assert s.csrf_ok(a, s.csrf(a))
    assert not s.csrf_ok(a, s.csrf(b))
    assert not s.csrf_ok(a, "") and not s.csrf_ok(a, None)


def test_no_token_no_logins():
    s = Sessions(None)
    assert not s.enabled
    assert s.login("") is None and s.login("anything") is None


# -- what a delivery was about (the deliveries page's columns) -------------------------------------

@pytest.mark.parametrize("name,provider,event,about", [
    ("github_push", "github", "push", ("https://github.com/octo-org/app", "refs/heads/main", "")),
    ("github_delete", "github", "push", ("https://github.com/octo-org/app", "refs/heads/feature/old-login", "deleted")),
    ("gitlab_tag_push", "gitlab", "Tag Push Hook", ("http://example.com/mike/diaspora", "refs/tags/v1.0.0", "created")),
    ("gitea_pull_request", "gitea", "pull_request",
     ("http://localhost:3000/gitea/webhooks", "#7 feature/login → master", "synchronized")),
    ("gitlab_merge_request", "gitlab", "Merge Request Hook",
     ("http://example.com/mike/diaspora", "#5 ms-viewport → master", "update")),
])
def test_delivery_about_each_forges_published_payload(name, provider, event, about):
    from runner.daemon.store import DeliveryAbout
    from runner.daemon.webhooks import delivery_about, parse_push

    header = {"github": "x-github-event", "gitea": "x-gitea-event", "gitlab": "x-gitlab-event"}[provider]
    trigger = parse_push(provider, json.loads((EVENTS / f"{name}.json").read_text()), {header: event})
    assert delivery_about(trigger) == DeliveryAbout(*about)
