"""Webhook signatures (pure) and the webhook endpoints over real HTTP on loopback."""
from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import (SECRET, config, daemon_in_process, fake_pipeline, github_signature,  # noqa: E402
                     push_payload, send_github)

from runner.daemon import webhooks as wh  # noqa: E402
from runner.daemon.config import config_from_dict  # noqa: E402

REPO = "https://git.example.com/me/app.git"


# -- pure ---------------------------------------------------------------------------------------

def test_github_documented_vector():
    # https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
    sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert wh.verify_github("It's a Secret to Everybody", b"Hello, World!", sig)
    assert not wh.verify_github("It's a Secret to Everybody", b"Hello, World?", sig)
    assert not wh.verify_github("another secret", b"Hello, World!", sig)
    assert not wh.verify_github("It's a Secret to Everybody", b"Hello, World!", sig[len("sha256="):])
    assert not wh.verify_github("It's a Secret to Everybody", b"Hello, World!", None)
    assert not wh.verify_github("", b"Hello, World!", sig)


def test_other_providers_signatures():
    body = b'{"ref":"refs/heads/main"}'
    hexsig = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert wh.verify_gitea("k", body, hexsig)
    assert wh.verify_gitea("k", body, hexsig.upper())
    assert not wh.verify_gitea("k", body, "sha256=" + hexsig)  # Gitea's is bare hex
    assert not wh.verify_gitea("k", body + b" ", hexsig)
    assert wh.verify_gitlab("plain-token", "plain-token")
    assert not wh.verify_gitlab("plain-token", "plain-token2")
    assert not wh.verify_gitlab("plain-token", "")
    assert wh.verify_generic("k", body, "sha256=" + hexsig)
    assert wh.verify_generic("k", body, hexsig)
    assert not wh.verify_generic("k", body, "sha256=" + "0" * 64)
    # Non-ASCII in a forged header is a mismatch, not a crash.
    assert not wh.verify_github("k", body, "sha256=é" + hexsig)


@pytest.mark.parametrize("url,norm", [
    ("https://GitHub.com/me/app.git", "github.com/me/app"),
    ("https://user:pw@github.com:443/me/app/", "github.com/me/app"),
    ("git@github.com:me/app.git", "github.com/me/app"),
    ("ssh://git@github.com/me/app", "github.com/me/app"),
    ("/srv/git/app.git", "/srv/git/app"),
    ("file:///srv/git/app.git", "/srv/git/app"),
])
def test_normalize_repo(url, norm):
    assert wh.normalize_repo(url) == norm


def test_push_filter_and_groups():
    cfg = config_from_dict({"pipelines": [{"name": "app", "file": "p.yaml",
                                           "triggers": {"push": {"branches": ["main", "release/*"],
                                                                 "tags": ["v*"]}}}]})
    p = cfg.pipelines[0]
    assert wh.push_filter(p, "main", None) is None
    assert wh.push_filter(p, "release/1.2", None) is None
    assert "matches none of triggers.push.branches" in wh.push_filter(p, "feature/x", None)
    assert wh.push_filter(p, None, "v1.0") is None
    assert "matches none of triggers.push.tags" in wh.push_filter(p, None, "nightly")
    assert wh.group_key(p, "main", None, "refs/heads/main") == "app/main"
    assert wh.classify("gitlab", "Tag Push Hook") == "push"
    assert wh.classify("github", "issues") == "other"
    assert wh.classify("github", "ping") == "ping"
    assert wh.classify("github", "pull_request") == "pull_request"
    assert wh.classify("gitea", "pull_request") == "pull_request"
    assert wh.classify("gitlab", "Merge Request Hook") == "pull_request"
    assert wh.classify("gitlab", "Note Hook") == "other"
    assert wh.classify("generic", "pull_request") == "other"


def test_named_pipelines_still_match_the_payloads_repository():
    cfg = config_from_dict({"pipelines": [
        {"name": "a", "file": "p.yaml", "repo": "https://git.example.com/me/a.git"},
        {"name": "b", "file": "p.yaml", "repo": "git@git.example.com:me/b.git"},
        {"name": "script", "file": "p.yaml"}]})
    payload_a = push_payload("https://git.example.com/me/a.git")
    trig = wh.parse_push("github", payload_a, {"x-github-event": "push"})
    found, why = wh.match_pipelines(cfg, trig, payload_a, ["b"])
    assert found == [] and why == ("b: the payload's repository git.example.com/me/a is not this "
                                   "pipeline's repository git.example.com/me/b")
    found, why = wh.match_pipelines(cfg, trig, payload_a, ["a", "b", "script", "nope"])
    assert [p.name for p in found] == ["a", "script"]  # no repo: started by name, as before
    assert why == ("no such pipeline: nope; b: the payload's repository git.example.com/me/a is "
                   "not this pipeline's repository git.example.com/me/b")
    bare = {"ref": "refs/heads/main", "commit": "a" * 40}  # a script's payload, no repository
    trig = wh.parse_push("generic", bare, {})
    found, why = wh.match_pipelines(cfg, trig, bare, ["b", "script"])
    assert [p.name for p in found] == ["script"]
    assert why == "b: the payload names no repository; this pipeline builds git.example.com/me/b"


# -- over HTTP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hooks")
    pf = fake_pipeline(tmp)
    cfg = config(tmp, [
        {"name": "app", "file": str(pf), "repo": REPO,
         "triggers": {"push": {"branches": ["main", "release/*"], "tags": ["v*"]}}},
        {"name": "other", "file": str(pf), "repo": "https://git.example.com/me/other.git"},
        {"name": "script", "file": str(pf)},  # no repo: started by name only
    ], concurrency=0, max_body_bytes=64 * 1024)  # concurrency 0: accept and queue, run nothing
    with daemon_in_process(cfg) as d:
        yield d


def _runs(d, **kw):
    return d.store.list_runs(limit=1000, **kw)


def _delivery(d, row: int) -> dict:
    return next(x for x in d.store.deliveries(limit=1000) if x["id"] == row)


def test_signed_push_queues_a_run_before_answering(daemon):
    r = send_github(daemon.url, push_payload(REPO, after="1" * 40), "push-1")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["outcome"] == "queued" and len(body["runs"]) == 1
    run = daemon.store.get_run(body["runs"][0])  # committed before the response was sent
    assert run["pipeline"] == "app" and run["commit"] == "1" * 40 and run["branch"] == "main"
    assert run["status"] == "queued" and run["delivery"] == "push-1" and run["trigger"] == "push"
    assert "queued as run" in _delivery(daemon, body["delivery"])["reason"]


def test_wrong_or_missing_signature_is_401_and_queues_nothing(daemon):
    before = len(_runs(daemon))
    r = send_github(daemon.url, push_payload(REPO, after="2" * 40), "forged-1", secret="wrong")
    assert r.status_code == 401
    body = json.dumps(push_payload(REPO)).encode()
    r2 = httpx.post(daemon.url + "/hooks/github", content=body,
                    headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": "forged-2"})
    assert r2.status_code == 401
    assert len(_runs(daemon)) == before
    rows = {x["delivery_id"]: x for x in daemon.store.deliveries(limit=1000)}
    assert rows["forged-1"]["outcome"] == "rejected" and "does not match" in rows["forged-1"]["reason"]
    assert rows["forged-2"]["outcome"] == "rejected" and "missing" in rows["forged-2"]["reason"]
    # A forged delivery does not burn its id: the genuine one with the same id still queues.
    r3 = send_github(daemon.url, push_payload(REPO, after="2" * 40), "forged-1")
    assert r3.status_code == 202


def test_same_delivery_twice_gives_one_run(daemon):
    p = push_payload(REPO, after="3" * 40)
    first = send_github(daemon.url, p, "dup-1")
    second = send_github(daemon.url, p, "dup-1")
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["outcome"] == "duplicate" and second.json()["runs"] == first.json()["runs"]
    assert len([r for r in _runs(daemon) if r["delivery"] == "dup-1"]) == 1
    # Another delivery of the same push (new id, same ref and commit) runs nothing either.
    third = send_github(daemon.url, p, "dup-2")
    assert third.status_code == 200 and third.json()["outcome"] == "ignored"
    assert f"already ran as run {first.json()['runs'][0]}" in third.json()["reason"]


def test_oversized_malformed_ping_unknown(daemon):
    big = b'{"x": "' + b"a" * (70 * 1024) + b'"}'
    assert send_github(daemon.url, big, "big-1").status_code == 413
    bad = b'{"ref": '
    r = send_github(daemon.url, bad, "bad-1")
    assert r.status_code == 400 and "not JSON" in r.json()["reason"]
    r = send_github(daemon.url, {"zen": "Keep it simple", "hook_id": 1}, "ping-1", event="ping")
    assert r.status_code == 200 and r.json()["outcome"] == "ping"
    r = send_github(daemon.url, {"action": "opened"}, "issue-1", event="issues")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored"
    assert "'issues' is not handled" in r.json()["reason"]
    outcomes = {x["delivery_id"]: (x["outcome"], x["status_code"]) for x in daemon.store.deliveries(limit=1000)}
    assert outcomes["big-1"] == ("rejected", 413)
    assert outcomes["bad-1"] == ("rejected", 400)
    assert outcomes["ping-1"] == ("ping", 200)
    assert outcomes["issue-1"] == ("ignored", 200)


def test_filters_and_deletion_start_nothing_and_say_why(daemon):
    before = len(_runs(daemon))
    r = send_github(daemon.url, push_payload(REPO, ref="refs/heads/feature/x", after="4" * 40), "f-1")
    assert r.json()["outcome"] == "ignored"
    assert "branch 'feature/x' matches none of triggers.push.branches" in r.json()["reason"]
    r = send_github(daemon.url, push_payload(REPO, after="0" * 40, deleted=True), "del-1")
    assert r.json()["outcome"] == "ignored" and "deletes refs/heads/main" in r.json()["reason"]
    r = send_github(daemon.url, push_payload("https://elsewhere.example/x/y.git"), "repo-1")
    assert r.json()["outcome"] == "ignored" and "no pipeline serves" in r.json()["reason"]
    assert len(_runs(daemon)) == before
    r = send_github(daemon.url, push_payload(REPO, ref="refs/tags/v1.0", after="5" * 40), "tag-1")
    assert r.status_code == 202
    run = daemon.store.get_run(r.json()["runs"][0])
    assert run["tag"] == "v1.0" and run["trigger"] == "tag"


def test_gitea_gitlab_generic(daemon):
    body = json.dumps(push_payload(REPO, after="6" * 40)).encode()
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    r = httpx.post(daemon.url + "/hooks/gitea", content=body,
                   headers={"X-Gitea-Event": "push", "X-Gitea-Delivery": "g-1", "X-Gitea-Signature": sig})
    assert r.status_code == 202, r.text
    gl = {"object_kind": "push", "ref": "refs/heads/main", "before": "0" * 40, "after": "7" * 40,
          "checkout_sha": "7" * 40, "user_username": "me",
          "project": {"git_http_url": REPO, "web_url": "https://git.example.com/me/app"},
          "repository": {"git_http_url": REPO}}
    body = json.dumps(gl).encode()
    r = httpx.post(daemon.url + "/hooks/gitlab", content=body,
                   headers={"X-Gitlab-Event": "Push Hook", "Idempotency-Key": "gl-1", "X-Gitlab-Token": SECRET})
    assert r.status_code == 202, r.text
    r = httpx.post(daemon.url + "/hooks/gitlab", content=body,
                   headers={"X-Gitlab-Event": "Push Hook", "Idempotency-Key": "gl-2", "X-Gitlab-Token": "nope"})
    assert r.status_code == 401
    body = json.dumps(push_payload(REPO, after="8" * 40)).encode()
    r = httpx.post(daemon.url + "/hooks/generic?pipeline=app", content=body,
                   headers={"X-Runner-Delivery": "gen-1", "X-Runner-Signature": github_signature(SECRET, body)})
    assert r.status_code == 202, r.text
    assert daemon.store.get_run(r.json()["runs"][0])["provider"] == "generic"


def test_healthz(daemon):
    r = httpx.get(daemon.url + "/healthz")
    assert r.status_code == 200 and r.json()["ok"] is True


def test_github_form_encoded_delivery(daemon):
    from urllib.parse import urlencode
    body = urlencode({"payload": json.dumps(push_payload(REPO, after="9" * 40))}).encode()
    r = httpx.post(daemon.url + "/hooks/github", content=body,
                   headers={"Content-Type": "application/x-www-form-urlencoded", "X-GitHub-Event": "push",
                            "X-GitHub-Delivery": "form-1", "X-Hub-Signature-256": github_signature(SECRET, body)})
    assert r.status_code == 202, r.text
    assert daemon.store.get_run(r.json()["runs"][0])["commit"] == "9" * 40


def test_provider_secret_and_another_pipelines_name_start_nothing(daemon):
    # The provider-wide secret signs every repository's hooks: a hook of repository `app` that
    # names ?pipeline=other must not build app's commit as `other`.
    before = len(_runs(daemon))
    r = send_github(daemon.url, push_payload(REPO, after="d" * 40), "named-1", query="?pipeline=other")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored", r.text
    assert r.json()["reason"] == ("other: the payload's repository git.example.com/me/app is not this "
                                  "pipeline's repository git.example.com/me/other")
    assert len(_runs(daemon)) == before
    # Its own name, and a pipeline without repo, still start by name.
    r = send_github(daemon.url, push_payload(REPO, after="d" * 40), "named-2", query="?pipeline=app,script")
    assert r.status_code == 202, r.text
    assert sorted(daemon.store.get_run(i)["pipeline"] for i in r.json()["runs"]) == ["app", "script"]
