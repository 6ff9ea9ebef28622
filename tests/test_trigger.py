"""Webhook payloads (stored samples in tests/data/events) -> Trigger."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from runner.errors import InvalidInput
from runner.trigger import (
    Trigger, UnsupportedEvent, normalize_provider, parse_event, provider_from_headers,
    provider_from_payload,
)

EVENTS = Path(__file__).parent / "data" / "events"
Z = "0" * 40


def event(name: str) -> dict:
    return json.loads((EVENTS / f"{name}.json").read_text())


GH = dict(provider="github", repo_url="https://github.com/octo-org/app",
          clone_url="https://github.com/octo-org/app.git", pusher="octocat",
          default_branch="main", delivery=None)
GT = dict(provider="gitea", repo_url="http://localhost:3000/gitea/webhooks",
          clone_url="http://localhost:3000/gitea/webhooks.git", pusher="gitea",
          default_branch="master", delivery=None)
GL = dict(provider="gitlab", repo_url="http://example.com/mike/diaspora",
          clone_url="http://example.com/mike/diaspora.git", pusher="jsmith",
          default_branch="master", delivery=None)

CASES = [
    ("github_push", Trigger(kind="push", ref="refs/heads/main", branch="main", tag=None,
                            commit="0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
                            before="6113728f27ae82c7b1a177c8d03f9e96e0adf246", deleted=False,
                            **GH)),
    ("github_tag_push", Trigger(kind="tag", ref="refs/tags/v1.2.0", branch=None, tag="v1.2.0",
                                commit="0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", before=None,
                                deleted=False, **GH)),
    ("github_delete", Trigger(kind="push", ref="refs/heads/feature/old-login",
                              branch="feature/old-login", tag=None, commit=None,
                              before="6113728f27ae82c7b1a177c8d03f9e96e0adf246", deleted=True,
                              **GH)),
    ("gitea_push", Trigger(kind="push", ref="refs/heads/develop", branch="develop", tag=None,
                           commit="bffeb74224043ba2feb48d137756c8a9331c449a",
                           before="28e1879d029cb852e4844d9c718537df08844e03", deleted=False,
                           **GT)),
    ("gitea_tag_push", Trigger(kind="tag", ref="refs/tags/v0.3.0", branch=None, tag="v0.3.0",
                               commit="bffeb74224043ba2feb48d137756c8a9331c449a", before=None,
                               deleted=False, **GT)),
    ("gitea_delete", Trigger(kind="push", ref="refs/heads/feature/old", branch="feature/old",
                             tag=None, commit=None, before=None, deleted=True, **GT)),
    ("gitlab_push", Trigger(kind="push", ref="refs/heads/master", branch="master", tag=None,
                            commit="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
                            before="95790bf891e76fee5e1747ab589903a6a1f80f22", deleted=False,
                            **GL)),
    ("gitlab_tag_push", Trigger(kind="tag", ref="refs/tags/v1.0.0", branch=None, tag="v1.0.0",
                                commit="82b3d5ae55f7080f1e6022629cdb57bfae7cccc7", before=None,
                                deleted=False, **GL)),
    ("gitlab_delete", Trigger(kind="push", ref="refs/heads/feature-x", branch="feature-x",
                              tag=None, commit=None,
                              before="95790bf891e76fee5e1747ab589903a6a1f80f22", deleted=True,
                              **GL)),
]


@pytest.mark.parametrize("name,expected", CASES, ids=[c[0] for c in CASES])
def test_sample_payloads_by_shape(name, expected):
    assert parse_event(event(name)) == expected


HEADERS = {
    "github_push": {"X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1"},
    "github_delete": {"X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1"},
    # Gitea sends the GitHub header too; its own header decides.
    "gitea_push": {"X-Gitea-Event": "push", "X-GitHub-Event": "push", "X-Gitea-Delivery": "d-1"},
    "gitea_delete": {"X-Gitea-Event": "delete", "X-Gitea-Delivery": "d-1"},
    "gitea_tag_push": {"X-Forgejo-Event": "push", "X-Forgejo-Delivery": "d-1"},
    "gitlab_push": {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": "d-1"},
    "gitlab_tag_push": {"x-gitlab-event": "Tag Push Hook", "x-gitlab-event-uuid": "d-1"},
}


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_sample_payloads_with_headers(name, ):
    expected = dict(CASES)[name]
    got = parse_event(json.dumps(event(name)), headers=HEADERS[name])
    assert got == Trigger(**{**expected.as_dict(), "delivery": "d-1"})


@pytest.mark.parametrize("name,provider", [
    ("github_push", "GitHub"), ("gitea_push", "forgejo"), ("gitea_push", "gogs"),
    ("gitlab_push", "gitlab"), ("gitea_delete", "gitea"),
])
def test_provider_given(name, provider):
    got = parse_event(event(name), provider=provider)
    assert got.provider == normalize_provider(provider)
    assert got.ref == dict(CASES)[name].ref


def test_github_delete_event():
    payload = {"ref": "v0.9", "ref_type": "tag", "pusher_type": "user",
               "repository": event("github_push")["repository"],
               "sender": {"login": "octocat"}}
    got = parse_event(payload, headers={"X-GitHub-Event": "delete"})
    assert (got.kind, got.ref, got.tag, got.deleted, got.commit, got.pusher) == (
        "tag", "refs/tags/v0.9", "v0.9", True, None, "octocat")


def test_generic_payload():
    sha = "a" * 40
    got = parse_event({"ref": "refs/heads/main", "commit": sha,
                       "repo_url": "https://git.local/app", "clone_url": "https://git.local/app.git"},
                      headers={"X-Runner-Delivery": "abc"})
    assert got == Trigger(kind="push", provider="generic", repo_url="https://git.local/app",
                          clone_url="https://git.local/app.git", ref="refs/heads/main",
                          branch="main", tag=None, commit=sha, before=None, deleted=False,
                          pusher=None, delivery="abc")
    assert parse_event({"ref": "refs/heads/x", "after": Z}).deleted is True


def test_sha256_repositories():
    payload = event("github_push")
    payload["after"] = "b" * 64
    assert parse_event(payload).commit == "b" * 64


def mutate(name: str, **changes) -> dict:
    payload = copy.deepcopy(event(name))
    for key, value in changes.items():
        if value is ...:
            payload.pop(key)
        else:
            payload[key] = value
    return payload


@pytest.mark.parametrize("payload,headers,error,fragment", [
    ("not json", None, InvalidInput, "not JSON"),
    (b"\xff", None, InvalidInput, "not JSON"),
    ("[1, 2]", None, InvalidInput, "expected a JSON object"),
    ({}, None, InvalidInput, "not a push event"),
    ({"zen": "Keep it logically awesome.", "hook_id": 1}, {"X-GitHub-Event": "ping"},
     UnsupportedEvent, "github event 'ping' is not handled"),
    (event("github_push"), {"X-GitHub-Event": "pull_request"}, UnsupportedEvent, "pull_request"),
    (event("gitlab_push"), {"X-Gitlab-Event": "Merge Request Hook"}, UnsupportedEvent,
     "merge request hook"),
    ({"object_kind": "merge_request"}, {"X-Gitlab-Event": "Push Hook"}, UnsupportedEvent,
     "object_kind 'merge_request'"),
    (mutate("github_push", ref="refs/notes/commits"), None, UnsupportedEvent,
     "neither a branch nor a tag"),
    (mutate("github_push", ref="main"), None, InvalidInput, "full ref"),
    (mutate("github_push", ref=5), None, InvalidInput, "'ref' should be a string"),
    (mutate("github_push", ref=...), {"X-GitHub-Event": "push"}, InvalidInput, "'ref' is missing"),
    (mutate("github_push", after="xyz"), None, InvalidInput, "'after' is not a commit sha"),
    (mutate("github_push", repository=[]), {"X-GitHub-Event": "push"}, InvalidInput, "'repository' should be an object"),
    (mutate("gitlab_push", checkout_sha="nope"), None, InvalidInput, "'checkout_sha' is not a commit"),
    ({"ref": "refs/heads/main", "commit": None}, {"X-Runner-Event": "push"}, InvalidInput,
     "'commit' (or 'after') is missing"),
])
def test_bad_payloads(payload, headers, error, fragment):
    with pytest.raises(error) as info:
        parse_event(payload, headers=headers)
    assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_provider():
    with pytest.raises(InvalidInput, match="unknown provider 'bitbucket'"):
        parse_event(event("github_push"), provider="bitbucket")


def test_detection_helpers():
    assert provider_from_headers({"X-Gitea-Event": "push", "X-GitHub-Event": "push"}) == "gitea"
    assert provider_from_headers({"x-github-event": "push"}) == "github"
    assert provider_from_headers({}) is None
    assert provider_from_payload(event("gitlab_tag_push")) == "gitlab"
    assert provider_from_payload(event("gitea_delete")) == "gitea"
    assert provider_from_payload(event("github_delete")) == "github"
    assert provider_from_payload({"hello": 1}) is None


def test_trigger_is_frozen_and_serialisable():
    t = parse_event(event("github_push"))
    with pytest.raises(AttributeError):
        t.commit = "x"  # type: ignore[misc]
    assert json.loads(json.dumps(t.as_dict()))["branch"] == "main"
