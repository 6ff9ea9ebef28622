"""The run request across the daemon -> `runner exec` boundary (runner.run_request,
runner.daemon.run_requests), by equality: a stored run of each forge, and of each trigger no
webhook starts, becomes one RunRequest; written and read back it is the same value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.daemon.config import config_from_dict
from runner.daemon.run_requests import run_request
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
    event = {"provider": "github", "headers": {"x-github-event": "push", "x-github-delivery": "d-1"},
             "payload": payload}
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
    event = {"provider": "gitlab", "headers": {"x-gitlab-event": "Merge Request Hook"}, "payload": payload}
    run = new_pull_request_run(ENTRY, parse_event(payload, headers=event["headers"], provider="gitlab"), event)
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
    event = {"provider": provider, "headers": {}, "payload": payload}
    trig = parse_event(payload, provider=provider)
    run = new_pull_request_run(ENTRY, trig, event) if trig.kind == "pull_request" else \
        new_run(ENTRY, trig.kind, provider, trig.ref, trig.branch, trig.tag, trig.commit, event)
    request = run_request(claimed(run))
    assert request == request_from_event(event)
    assert (request.kind, request.ref, request.commit) == (run.trigger, run.ref, run.commit)
    assert (request.pull_request.number if request.pull_request else None) == trig.number
    retried = run_request(claimed(run.__class__(**{**run.__dict__, "trigger": "retry", "commit": B})))
    assert retried == request.model_copy(update={"kind": "retry", "commit": B})


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
