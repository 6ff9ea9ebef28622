"""The run request across the daemon -> `runner exec` boundary (runner.run_request,
runner.daemon.run_requests), by equality: a stored run of each forge, and of each trigger no
webhook starts, becomes one RunRequest; written and read back it is the same value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.daemon.config import config_from_dict
from runner.daemon.run_requests import run_request, stored_event
from runner.daemon.store import Claimed
from runner.daemon.webhooks import new_pull_request_run, new_run
from runner.errors import InvalidInput
from runner.run_request import PullRequest, RunRequest, read_request, request_from_event
from runner.trigger import parse_event

EVENTS = Path(__file__).resolve().parents[1] / "data" / "events"
A, B = "a" * 40, "b" * 40


def claimed(run, run_id: int = 1) -> Claimed:
    """What the store's claim gives back for a queued NewRun (its columns and stored event)."""
    return Claimed(id=run_id, pipeline=run.pipeline, event=json.loads(json.dumps(run.event)),
                   vars=run.vars, attempt=1, ref=run.ref, branch=run.branch, tag=run.tag,
                   commit=run.commit, trigger=run.trigger)


ENTRY = config_from_dict({"pipelines": [{"name": "app", "file": "p.yaml",
                                         "triggers": {"pull_request": {}}}]}).pipelines[0]


def test_a_github_push_run():
    payload = {"ref": "refs/heads/main", "before": B, "after": A,
               "repository": {"html_url": "https://github.com/o/app", "clone_url": "https://github.com/o/app.git",
                              "default_branch": "main"},
               "pusher": {"name": "octocat"}, "sender": {"login": "octocat"}}
    headers = {"x-github-event": "push", "x-github-delivery": "d-1"}
    event = stored_event("github", headers, payload, parse_event(payload, headers=headers))
    run = new_run(ENTRY, "push", "github", "refs/heads/main", "main", None, A, event, delivery="d-1")
    assert run_request(claimed(run)) == RunRequest(
        kind="push", provider="github", ref="refs/heads/main", branch="main", commit=A, before=B,
        default_branch="main", repo_url="https://github.com/o/app", clone_url="https://github.com/o/app.git",
        sender="octocat", delivery="d-1")


def test_a_gitlab_merge_request_run():
    payload = {"object_kind": "merge_request", "user": {"username": "jsmith"},
               "project": {"web_url": "https://gitlab.example.com/g/app",
                           "git_http_url": "https://gitlab.example.com/g/app.git", "default_branch": "main"},
               "object_attributes": {"iid": 5, "action": "open", "target_branch": "main",
                                     "source_branch": "fix", "last_commit": {"id": A},
                                     "source_project_id": 9, "target_project_id": 2,
                                     "source": {"git_http_url": "https://gitlab.example.com/f/app.git"}}}
    trig = parse_event(payload, headers={"x-gitlab-event": "Merge Request Hook"}, provider="gitlab")
    run = new_pull_request_run(ENTRY, trig, stored_event("gitlab", {}, payload, trig))
    assert run_request(claimed(run)) == RunRequest(
        kind="pull_request", provider="gitlab", ref="refs/merge-requests/5/head", commit=A,
        default_branch="main", repo_url="https://gitlab.example.com/g/app",
        clone_url="https://gitlab.example.com/g/app.git", sender="jsmith",
        pull_request=PullRequest(number=5, action="open", head_branch="fix", base_branch="main",
                                 head_repo_url="https://gitlab.example.com/f/app.git", fork=True))


@pytest.mark.parametrize("name", ["github_push", "github_tag_push", "github_pull_request", "gitea_push",
                                  "gitea_tag_push", "gitea_pull_request", "gitlab_push", "gitlab_tag_push",
                                  "gitlab_merge_request"])
def test_every_forge_s_stored_run_gives_the_request_its_replay_gives(name):
    """The daemon's request of a stored webhook run equals what `runner exec --event` makes of the
    same delivery, but for what the store decided (the kind, ref and commit: a retry is a retry)."""
    provider = name.split("_")[0]
    payload = json.loads((EVENTS / f"{name}.json").read_text())
    trig = parse_event(payload, provider=provider)
    event = stored_event(provider, {}, payload, trig)
    run = new_pull_request_run(ENTRY, trig, event) if trig.kind == "pull_request" else \
        new_run(ENTRY, trig.kind, provider, trig.ref, trig.branch, trig.tag, trig.commit, event)
    request = run_request(claimed(run))
    assert request == request_from_event(event)
    assert (request.kind, request.ref, request.commit) == (run.trigger, run.ref, run.commit)
    assert (request.pull_request.number if request.pull_request else None) == trig.number
    retried = run_request(claimed(run.__class__(**{**run.__dict__, "trigger": "retry", "commit": B})))
    # Another commit: the message and author of the delivery's are not its.
    assert retried == request.model_copy(update={"kind": "retry", "commit": B, "commit_message": None,
                                                 "commit_author": None})


WEBHOOKS = Path(__file__).resolve().parents[1] / "data" / "webhooks"


@pytest.mark.parametrize("path,headers,message,author,pull", [
    ("webhooks/github/push.json", {"X-GitHub-Event": "push"}, "Initial commit", "Codertocat", None),
    # GitHub's pull request events carry no commit message: none is made up.
    ("webhooks/github/pull_request-opened.json", {"X-GitHub-Event": "pull_request"}, None, None,
     ("Update the README with new information.", "https://github.com/Codertocat/Hello-World/pull/2")),
    ("webhooks/gitea/push.json", {"X-Gitea-Event": "push"}, "Webhooks Yay!", "Gitea", None),
    ("webhooks/gitea/push.json", {"X-Forgejo-Event": "push"}, "Webhooks Yay!", "Gitea", None),
    ("events/gitea_pull_request.json", {"X-Gitea-Event": "pull_request"}, None, None,
     ("Add the login page", "http://localhost:3000/gitea/webhooks/pulls/7")),
    ("webhooks/gitlab/push.json", {"X-Gitlab-Event": "Push Hook"}, "fixed readme", "GitLab dev user", None),
    # The published tag push lists no commit: its message is unknown, not another commit's.
    ("webhooks/gitlab/tag_push.json", {"X-Gitlab-Event": "Tag Push Hook"}, None, None, None),
    ("webhooks/gitlab/merge_request.json", {"X-Gitlab-Event": "Merge Request Hook"}, "fixed readme",
     "GitLab dev user", ("MS-Viewport", "http://example.com/diaspora/merge_requests/1")),
])
def test_the_commit_s_message_and_author_and_the_pull_request_s_title_and_link(path, headers, message, author,
                                                                                pull):
    """From each forge's published payload (tests/data/webhooks; Gitea's pull request from
    tests/data/events), parsed once into the request."""
    payload = json.loads((Path(__file__).resolve().parents[1] / "data" / path).read_text())
    request = request_from_event({"provider": None, "headers": headers, "payload": payload})
    assert (request.commit_message, request.commit_author) == (message, author)
    pr = request.pull_request
    assert ((pr.title, pr.url) if pr else None) == pull


def test_only_the_built_commit_s_message_is_taken_and_only_web_links(tmp_path):
    payload = json.loads((WEBHOOKS / "gitea" / "push.json").read_text())
    payload["after"] = A  # a head the payload lists no entry for (Gitea lists up to a limit)
    request = request_from_event({"provider": "gitea", "headers": {}, "payload": payload})
    assert (request.commit, request.commit_message, request.commit_author) == (A, None, None)
    pull = json.loads((EVENTS / "github_pull_request.json").read_text())
    pull["pull_request"].update(html_url="javascript:alert(1)", title=["not", "text"])
    pr = request_from_event(pull).pull_request
    assert (pr.number, pr.title, pr.url) == (3, None, None)
    (tmp_path / "r.json").write_text(json.dumps({"pull_request": {"number": 1, "url": "file:///etc/passwd"}}))
    with pytest.raises(InvalidInput, match="pull_request.url: .*not an http"):
        read_request(tmp_path / "r.json")


def test_a_webhook_s_runs_store_the_request_and_the_commit_s_facts_follow_the_run_s_commit():
    """What the worker gives `runner exec` is the request stored when the delivery arrived
    (nothing parses the payload again), with the store's columns winning; the message and author
    only while the run builds the commit they belong to."""
    from runner.daemon.run_requests import stored_request

    payload = json.loads((WEBHOOKS / "github" / "push.json").read_text())
    trig = parse_event(payload, provider="github")
    event = stored_event("github", {}, payload, trig)
    run = new_run(ENTRY, "push", "github", trig.ref, trig.branch, None, trig.commit, event)
    event["payload"] = {}  # the payload is not read again
    request = run_request(claimed(run))
    assert request == request_from_event({"provider": "github", "headers": {}, "payload": payload})
    assert request.commit_message == "Initial commit"
    assert stored_request(event, trig.commit) == request
    other = run_request(claimed(run.__class__(**{**run.__dict__, "trigger": "retry", "commit": B})))
    assert (other.kind, other.commit, other.commit_message, other.commit_author) == ("retry", B, None, None)
    assert stored_request(event, B).commit_message is None
    assert stored_request({}, A) is None and stored_request({"request": {"kind": "webhook"}}, A) is None


def test_runs_no_webhook_started_are_their_columns():
    for kind in ("poll", "cron", "manual"):
        run = new_run(ENTRY, kind, None, "refs/heads/dev", "dev", None, A, {})
        assert run_request(claimed(run)) == RunRequest(kind=kind, ref="refs/heads/dev", branch="dev", commit=A)
    unresolved = new_run(ENTRY, "manual", None, "refs/tags/v1", None, "v1", None, {})
    assert run_request(claimed(unresolved)) == RunRequest(kind="manual", ref="refs/tags/v1", tag="v1")
    rollback = new_run(ENTRY, "rollback", None, None, None, None, None, {"rollback": {"to": "1"}})
    assert run_request(claimed(rollback)) == RunRequest(kind="rollback", rollback_to="1")


def test_written_and_read_back_it_is_the_same_request(tmp_path):
    payload = json.loads((EVENTS / "github_pull_request.json").read_text())
    request = request_from_event(payload)
    request.write(tmp_path / "r.json")
    assert read_request(tmp_path / "r.json") == request
    assert read_request(tmp_path / "r.json").pull_request.fork is True


@pytest.mark.parametrize("data,why", [
    ({"kind": "push", "commit": "main"}, "commit"),
    ({"kind": "push", "ref": "refs/heads/a..b"}, "ref"),
    ({"kind": "push", "ref": "--upload-pack=x"}, "ref"),
    ({"kind": "webhook"}, "kind"),
    ({"kind": "rollback", "rollback_to": "; rm -rf /"}, "rollback_to"),
    ({"kind": "push", "unknown": 1}, "unknown"),
])
def test_a_request_that_does_not_check_is_refused_naming_the_field(tmp_path, data, why):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(data))
    with pytest.raises(InvalidInput, match=why):
        read_request(f)


def test_a_stored_run_that_makes_no_request_is_invalid_input():
    with pytest.raises(InvalidInput, match="run 4's request is invalid: commit"):
        run_request(Claimed(id=4, pipeline="app", event={}, vars={}, attempt=1, commit="zz", trigger="poll"))


# -- a repository's pipeline, held to the daemon entry's limits (runner.repository_pipeline) -------

REPO_PIPELINE = """version: 1
name: app
repository: {url: https://elsewhere.example.com/x.git, token: git}
image: {name: localhost/app}
secrets: {git: {env: GIT_TOKEN}, stolen: {file: /etc/shadow}}
stages:
  deploy:
    servers: [10.0.0.1, "root@10.6.6.6:2222"]
    ssh: {jump: "bastion.example.com"}
"""


def _limits(**over):
    from runner.model import SecretSource
    from runner.run_request import RepositoryPipeline

    return RepositoryPipeline(**{"repository": "https://git.example.com/me/app.git", "servers": ("10.0.0.1",),
                                 "secrets": {"git": SecretSource(file="/etc/runner/git-token")}, **over})


def test_a_repository_pipeline_may_not_widen_the_daemon_s_limits():
    from runner.loader import load_pipeline_text
    from runner.repository_pipeline import within_limits

    pipeline = load_pipeline_text(REPO_PIPELINE, ".runner.yaml@0123456789ab", environ={})
    with pytest.raises(InvalidInput) as caught:
        within_limits(pipeline, _limits())
    assert [(p.line, p.column, p.message.split(" (")[0]) for p in caught.value.problems] == [
        (5, 34, "secret 'stolen' is not granted to this pipeline by the daemon"),
        (8, 25, "server '10.6.6.6' is not one this pipeline may deploy to"),
        (9, 17, "jump host 'bastion.example.com' is not one this pipeline may reach"),
    ]
    assert all(p.file == ".runner.yaml@0123456789ab" for p in caught.value.problems)


def test_within_the_limits_the_daemon_s_repository_and_secret_sources_are_used():
    from runner.loader import load_pipeline_text
    from runner.model import SecretSource
    from runner.repository_pipeline import within_limits

    text = REPO_PIPELINE.replace(", stolen: {file: /etc/shadow}", "")
    pipeline = within_limits(load_pipeline_text(text, ".runner.yaml", environ={}),
                             _limits(servers=("10.0.0.1", "10.6.6.6", "bastion.example.com")))
    assert pipeline.repository.url == "https://git.example.com/me/app.git"
    assert pipeline.secrets == {"git": SecretSource(file="/etc/runner/git-token")}


@pytest.mark.parametrize("entry,why", [
    ({"name": "a", "repo": "/r"}, "exactly one of file"),
    ({"name": "a", "file": "p.yaml", "pipeline": ".runner.yaml", "repo": "/r"}, "exactly one of file"),
    ({"name": "a", "pipeline": ".runner.yaml"}, "needs repo"),
    ({"name": "a", "pipeline": "../other/.runner.yaml", "repo": "/r"}, "without '..'"),
    ({"name": "a", "pipeline": "/etc/runner/p.yaml", "repo": "/r"}, "relative path"),
    ({"name": "a", "file": "p.yaml", "servers": ["10.0.0.1"]}, "servers and secrets limit"),
])
def test_a_daemon_entry_names_its_pipeline_once(entry, why):
    with pytest.raises(InvalidInput) as caught:
        config_from_dict({"pipelines": [entry]})
    assert why in str(caught.value.problems)


# -- what the stages get: the typed request, as `runner exec` read it ------------------------------

def test_a_stage_s_context_carries_the_typed_request_and_the_checkout_reads_it(tmp_path):
    import threading

    from pipelines.checkout import _request
    from runner.model import Image, Pipeline, Repository
    from runner.stage import StageContext

    pipeline = Pipeline(name="app", repository=Repository(url="https://git.example.com/me/app.git"),
                        image=Image(name="registry.example/app"))
    request = RunRequest(kind="pull_request", ref="refs/pull/3/head", commit=A, default_branch="main",
                         pull_request=PullRequest(number=3, head_branch="fix", base_branch="main"))
    ctx = StageContext(run_id="r1", pipeline=pipeline, workdir=tmp_path, cache_dir=tmp_path, log=None,
                       secrets=None, cancel=threading.Event(), request=request)
    assert ctx.request is request
    got = _request(ctx.pipeline, ctx.request)
    assert (got.commit, got.ref, got.branch_hint, got.tag_hint, got.claim) == \
        (A, "refs/pull/3/head", None, None, "refs/pull/3/head")
    # `runner exec` by hand: an empty manual request, the pipeline's own ref.
    bare = StageContext(run_id="r2", pipeline=pipeline, workdir=tmp_path, cache_dir=tmp_path, log=None,
                        secrets=None, cancel=threading.Event())
    assert bare.request == RunRequest() and _request(pipeline, bare.request).commit is None
