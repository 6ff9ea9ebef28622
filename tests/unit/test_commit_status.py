"""Commit status reports by equality (their contexts per event, GitLab's request), and GitLab's
through a running daemon to a fake forge on loopback."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import config, daemon_in_process, fake_forge, fake_pipeline, push_payload, send_github, wait_for  # noqa: E402

from runner.daemon.config import config_from_dict  # noqa: E402
from runner.daemon.status import reported_event, status_request  # noqa: E402
from runner.errors import InvalidInput  # noqa: E402

REPO = "https://git.example.com/me/app.git"
SHA = "c" * 40


def commit_status(**over):
    cs = {"repo": "me/app", "token": {"value": "t0ken-value"}, **over}
    return config_from_dict({"pipelines": [{"name": "a", "file": "f", "commit_status": cs}]}
                            ).pipelines[0].commit_status


@pytest.mark.parametrize("context,event,expected", [
    # without {event}: a pull request's run is a status of its own, a push's keeps the name
    ("runner/{pipeline}", "push", "runner/a"),
    ("runner/{pipeline}", "pull_request", "runner/a (pull_request)"),
    ("runner/{pipeline}", "tag", "runner/a"),
    ("ci/{pipeline}/{event}", "push", "ci/a/push"),
    ("ci/{pipeline}/{event}", "pull_request", "ci/a/pull_request"),
    ("ci {event}", "cron", "ci cron"),
])
def test_context_per_event(context, event, expected):
    for provider, field in (("github", "context"), ("gitea", "context"), ("gitlab", "name")):
        cfg = commit_status(provider=provider, context=context)
        _, _, body = status_request(cfg, "t", "a", 1, SHA, "running", event=event)
        assert body[field] == expected, provider


def test_a_retry_reports_under_the_trigger_it_runs_again():
    assert reported_event("pull_request", {}) == "pull_request"
    assert reported_event("retry", {"request": {"kind": "pull_request"}}) == "pull_request"
    assert reported_event("retry", {}) == "retry"  # a manual or cron run stored no request
    assert reported_event("", None) == "manual"


def test_gitlab_status_request():
    cfg = commit_status(provider="gitlab", api_url="https://gitlab.example.com/api/v4/",
                        repo="group/sub.group/app", target_url="https://ci.example/runs/{run_id}")
    url, headers, body = status_request(cfg, "t0ken-value", "a", 5, SHA, "failed",
                                        "stage 'build' failed: exit 3\nmore", event="push")
    assert url == "https://gitlab.example.com/api/v4/projects/group%2Fsub.group%2Fapp/statuses/" + SHA
    assert headers["PRIVATE-TOKEN"] == "t0ken-value" and "Authorization" not in headers
    assert body == {"state": "failed", "name": "runner/a", "description": "failed: stage 'build' failed: exit 3",
                    "target_url": "https://ci.example/runs/5"}
    states = {status: status_request(cfg, "t", "a", 5, SHA, status)[2]["state"]
              for status in ("queued", "running", "success", "failed", "invalid", "cancelled", "interrupted")}
    assert states == {"queued": "pending", "running": "running", "success": "success", "failed": "failed",
                      "invalid": "failed", "cancelled": "canceled", "interrupted": "canceled"}


def test_only_gitlab_takes_a_nested_project_path():
    assert commit_status(provider="gitlab", repo="a/b/c").repo == "a/b/c"
    for provider in ("github", "gitea"):
        with pytest.raises(InvalidInput, match="owner/name"):
            commit_status(provider=provider, repo="a/b/c")
    with pytest.raises(InvalidInput):
        commit_status(provider="gitlab", repo="app")


def test_gitlab_commit_status_through_the_daemon(tmp_path):
    with fake_forge(credential="PRIVATE-TOKEN") as (forge_url, seen):
        pf = fake_pipeline(tmp_path, fail="build")
        cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO,
                                 "commit_status": {"provider": "gitlab", "api_url": forge_url + "/api/v4",
                                                   "repo": "team/backend/app", "context": "runner/{pipeline}/{event}",
                                                   "token": {"value": "gitlab-token-123"}}}])
        with daemon_in_process(cfg) as d:
            send_github(d.url, push_payload(REPO, after=SHA), "gl-1")
            wait_for(lambda: len(seen) >= 2, 15, "two status reports")
        (p1, token, running), (p2, _, final) = seen[:2]
    assert p1 == p2 == "/api/v4/projects/team%2Fbackend%2Fapp/statuses/" + SHA
    assert token == "gitlab-token-123"
    assert (running["state"], final["state"]) == ("running", "failed")
    assert running["name"] == final["name"] == "runner/app/push"
