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

EVENTS = Path(__file__).resolve().parents[1] / "data" / "events"
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
                            commit_message="Update README.md", commit_author="Mona Octocat", **GH)),
    ("github_tag_push", Trigger(kind="tag", ref="refs/tags/v1.2.0", branch=None, tag="v1.2.0",
                                commit="0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", before=None,
                                deleted=False, commit_message="Update README.md",
                                commit_author="Mona Octocat", **GH)),
    ("github_delete", Trigger(kind="push", ref="refs/heads/feature/old-login",
                              branch="feature/old-login", tag=None, commit=None,
                              before="6113728f27ae82c7b1a177c8d03f9e96e0adf246", deleted=True,
                              **GH)),
    ("gitea_push", Trigger(kind="push", ref="refs/heads/develop", branch="develop", tag=None,
                           commit="bffeb74224043ba2feb48d137756c8a9331c449a",
                           before="28e1879d029cb852e4844d9c718537df08844e03", deleted=False,
                           commit_message="Webhooks Yay!", commit_author="Gitea", **GT)),
    ("gitea_tag_push", Trigger(kind="tag", ref="refs/tags/v0.3.0", branch=None, tag="v0.3.0",
                               commit="bffeb74224043ba2feb48d137756c8a9331c449a", before=None,
                               deleted=False, commit_message="Webhooks Yay!", commit_author="Gitea",
                               **GT)),
    ("gitea_delete", Trigger(kind="push", ref="refs/heads/feature/old", branch="feature/old",
                             tag=None, commit=None, before=None, deleted=True, **GT)),
    ("gitlab_push", Trigger(kind="push", ref="refs/heads/master", branch="master", tag=None,
                            commit="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
                            before="95790bf891e76fee5e1747ab589903a6a1f80f22", deleted=False,
                            commit_message="fixed readme", commit_author="GitLab dev user", **GL)),
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
    ({}, None, InvalidInput, "not a push or pull request event"),
    ({"zen": "Keep it logically awesome.", "hook_id": 1}, {"X-GitHub-Event": "ping"},
     UnsupportedEvent, "github event 'ping' is not handled"),
    # A pull_request header on a push payload: not a pull request this parser understands.
    (event("github_push"), {"X-GitHub-Event": "pull_request"}, InvalidInput, "'action' is missing"),
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


# -- pull / merge requests -----------------------------------------------------------------------

GH_PR = Trigger(kind="pull_request", provider="github", repo_url="https://github.com/octo-org/app",
                clone_url="https://github.com/octo-org/app.git", ref="refs/pull/3/head", branch=None,
                tag=None, commit="8e2b6f3a1c9d4e5f60718293a4b5c6d7e8f90a1b", before=None,
                deleted=False, pusher="contributor", delivery=None, default_branch="main",
                number=3, action="opened", head_branch="fix-login", base_branch="main",
                head_repo_url="https://github.com/contributor/app.git", fork=True,
                title="Fix the login redirect", url="https://github.com/octo-org/app/pull/3")
GT_PR = Trigger(kind="pull_request", provider="gitea", repo_url="http://localhost:3000/gitea/webhooks",
                clone_url="http://localhost:3000/gitea/webhooks.git", ref="refs/pull/7/head",
                branch=None, tag=None, commit="c3f1e2d4b5a69788796a5b4c3d2e1f0a9b8c7d6e",
                before=None, deleted=False, pusher="gitea", delivery=None, default_branch="master",
                number=7, action="synchronized", head_branch="feature/login",
                base_branch="master", head_repo_url="http://localhost:3000/gitea/webhooks.git",
                fork=False, title="Add the login page", url="http://localhost:3000/gitea/webhooks/pulls/7")
GL_MR = Trigger(kind="pull_request", provider="gitlab", repo_url="http://example.com/mike/diaspora",
                clone_url="http://example.com/mike/diaspora.git",
                ref="refs/merge-requests/5/head", branch=None, tag=None,
                commit="4d6c2a1f0e9b8d7c6a5b4c3d2e1f0a9b8c7d6e5f",
                before="da1560886d4f094c3e6c9ef40349f7d38b5d27d7", deleted=False, pusher="jsmith",
                delivery=None, default_branch="master", number=5, action="update",
                head_branch="ms-viewport", base_branch="master",
                head_repo_url="http://example.com/mike/diaspora.git", fork=False,
                title="MS-Viewport", url="http://example.com/mike/diaspora/-/merge_requests/5",
                commit_message="Move the viewport settings\n", commit_author="John Smith")

PR_CASES = [
    ("github_pull_request", {"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": "d-1"}, GH_PR),
    # Gitea sends X-GitHub-Event too; X-Gitea-Event decides the provider.
    ("gitea_pull_request", {"X-Gitea-Event": "pull_request", "X-GitHub-Event": "pull_request",
                            "X-Gitea-Delivery": "d-1"}, GT_PR),
    ("gitlab_merge_request", {"X-Gitlab-Event": "Merge Request Hook", "X-Gitlab-Event-UUID": "d-1"},
     GL_MR),
]


@pytest.mark.parametrize("name,headers,expected", PR_CASES, ids=[c[0] for c in PR_CASES])
def test_pull_request_payloads(name, headers, expected):
    assert parse_event(json.dumps(event(name)), headers=headers) == \
        Trigger(**{**expected.as_dict(), "delivery": "d-1"})
    assert parse_event(event(name)) == expected  # by shape, without headers


def nested(name: str, path: str, value) -> dict:
    """The sample with the value at a dotted path replaced (... removes it)."""
    payload = copy.deepcopy(event(name))
    *parents, last = path.split(".")
    node = payload
    for key in parents:
        node = node[key]
    if value is ...:
        node.pop(last)
    else:
        node[last] = value
    return payload


GH_HDR = {"X-GitHub-Event": "pull_request"}
GT_HDR = {"X-Gitea-Event": "pull_request", "X-GitHub-Event": "pull_request"}
GL_HDR = {"X-Gitlab-Event": "Merge Request Hook"}


@pytest.mark.parametrize("payload,headers,fragment", [
    (nested("github_pull_request", "action", "closed"), GH_HDR,
     "pull request #3 'closed' starts nothing (only opened, synchronize and reopened do)"),
    (nested("github_pull_request", "action", "labeled"), GH_HDR, "'labeled' starts nothing"),
    (nested("github_pull_request", "action", "edited"), GH_HDR, "'edited' starts nothing"),
    (nested("gitea_pull_request", "action", "closed"), GT_HDR, "#7 'closed' starts nothing"),
    (nested("gitea_pull_request", "action", "label_updated"), GT_HDR, "'label_updated' starts"),
    (nested("gitlab_merge_request", "object_attributes.action", "close"), GL_HDR,
     "merge request !5 'close' starts nothing"),
    (nested("gitlab_merge_request", "object_attributes.action", "merge"), GL_HDR, "'merge' starts"),
    (nested("gitlab_merge_request", "object_attributes.action", "approved"), GL_HDR, "'approved'"),
    (nested("gitlab_merge_request", "object_attributes.oldrev", ...), GL_HDR,
     "merge request !5 'update' brings no new commits (no oldrev)"),
])
def test_pull_request_actions_that_start_nothing(payload, headers, fragment):
    with pytest.raises(UnsupportedEvent) as info:
        parse_event(payload, headers=headers)
    assert fragment in str(info.value)


def test_pull_request_actions_that_run():
    for action in ("opened", "synchronize", "reopened"):
        got = parse_event(nested("github_pull_request", "action", action), headers=GH_HDR)
        assert (got.kind, got.action) == ("pull_request", action)
    assert parse_event(nested("gitea_pull_request", "action", "opened"), headers=GT_HDR).number == 7
    for action in ("open", "reopen"):  # no oldrev needed: the whole merge request is new
        payload = nested("gitlab_merge_request", "object_attributes.action", action)
        del payload["object_attributes"]["oldrev"]
        got = parse_event(payload, headers=GL_HDR)
        assert (got.commit, got.before) == (GL_MR.commit, None)


def test_github_synchronize_names_the_previous_head():
    payload = nested("github_pull_request", "action", "synchronize")
    payload["before"], payload["after"] = "1" * 40, GH_PR.commit
    got = parse_event(payload, headers=GH_HDR)
    assert (got.before, got.commit) == ("1" * 40, GH_PR.commit)


def test_fork_or_not():
    gh = event("github_pull_request")
    same = nested("github_pull_request", "pull_request.head.repo", gh["pull_request"]["base"]["repo"])
    assert parse_event(same, headers=GH_HDR).fork is False
    # The fork was deleted: GitHub says head.repo null. Whose code it is cannot be told.
    gone = nested("github_pull_request", "pull_request.head.repo", None)
    got = parse_event(gone, headers=GH_HDR)
    assert (got.fork, got.head_repo_url) == (True, None)
    # Same name, other id (a repository deleted and created again): another repository.
    renamed = copy.deepcopy(same)
    renamed["pull_request"]["head"]["repo"] = {**gh["pull_request"]["base"]["repo"], "id": 1}
    assert parse_event(renamed, headers=GH_HDR).fork is True
    gitea_fork = nested("gitea_pull_request", "pull_request.head.repo_id", 12)
    assert parse_event(gitea_fork, headers=GT_HDR).fork is True
    gitea_gone = nested("gitea_pull_request", "pull_request.head.repo_id", -1)
    assert parse_event(gitea_gone, headers=GT_HDR).fork is True
    gl_fork = nested("gitlab_merge_request", "object_attributes.source_project_id", 31)
    assert parse_event(gl_fork, headers=GL_HDR).fork is True
    gl_unknown = nested("gitlab_merge_request", "object_attributes.source_project_id", ...)
    del gl_unknown["object_attributes"]["source"]
    assert parse_event(gl_unknown, headers=GL_HDR).fork is True


@pytest.mark.parametrize("payload,headers,fragment", [
    (nested("github_pull_request", "pull_request", ...), GH_HDR, "'pull_request' is missing"),
    (nested("github_pull_request", "number", "3"), GH_HDR, "'number' should be a pull request number"),
    (nested("github_pull_request", "pull_request.head.sha", ...), GH_HDR,
     "'pull_request.head.sha' is missing"),
    (nested("github_pull_request", "pull_request.head.sha", "main"), GH_HDR,
     "'pull_request.head.sha' is not a commit sha"),
    (nested("github_pull_request", "pull_request.base.ref", ...), GH_HDR,
     "'pull_request.base.ref' is missing"),
    (nested("github_pull_request", "pull_request.head", []), GH_HDR,
     "'pull_request.head' should be an object"),
    (nested("gitlab_merge_request", "object_attributes.iid", ...), GL_HDR,
     "'object_attributes.iid' is missing"),
    (nested("gitlab_merge_request", "object_attributes.last_commit", ...), GL_HDR,
     "'object_attributes.last_commit.id' is missing"),
    (nested("gitlab_merge_request", "object_attributes.target_branch", ...), GL_HDR,
     "'object_attributes.target_branch' is missing"),
])
def test_bad_pull_request_payloads(payload, headers, fragment):
    with pytest.raises(InvalidInput) as info:
        parse_event(payload, headers=headers)
    assert not isinstance(info.value, UnsupportedEvent)
    assert fragment in str(info.value)


def test_pull_request_detection_and_serialisation():
    assert provider_from_payload(event("github_pull_request")) == "github"
    assert provider_from_payload(event("gitea_pull_request")) == "gitea"
    assert provider_from_payload(event("gitlab_merge_request")) == "gitlab"
    data = json.loads(json.dumps(parse_event(event("github_pull_request")).as_dict()))
    assert (data["kind"], data["number"], data["fork"]) == ("pull_request", 3, True)
