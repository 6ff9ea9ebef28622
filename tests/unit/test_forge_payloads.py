"""The forges' own published webhook payloads (tests/data/webhooks, each file's source in its
README) replayed over HTTP through an in-process daemon with a real SQLite store: the run each
queues (ref, branch, tag, commit, trigger) and what its delivery says. Only commit ids are
replaced, and only where a case needs another commit. Plus the runs no webhook starts: a manual
trigger resolves the commit through the pipeline's own repository, and a retry keeps it; the
commit a run's checkout reports becomes the run's commit."""
from __future__ import annotations

import copy
import hashlib
import hmac
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import (AUTH, SECRET, bare_repo, commit, config, daemon_in_process,  # noqa: E402
                     fake_pipeline, send_github, wait_for)

DATA = Path(__file__).resolve().parents[1] / "data" / "webhooks"
GH_REPO = "https://github.com/Codertocat/Hello-World.git"  # github/*.json
GT_REPO = "http://localhost:3000/gitea/webhooks.git"  # gitea/push.json
GL_PUSH_REPO = "http://example.com/mike/diaspora.git"  # gitlab/push.json
GL_TAG_REPO = "http://example.com/jsmith/example.git"  # gitlab/tag_push.json
GL_MR_REPO = "http://example.com/gitlabhq/gitlab-test.git"  # gitlab/merge_request.json
TAG_OBJECT = "4f0e5d6c7b8a99887766554433221100ffeeddcc"  # an annotated tag's own sha (not a commit)


def published(path: str) -> dict:
    return json.loads((DATA / path).read_text())


def annotated_tag_push(payload: dict, tag: str) -> dict:
    """A published branch push as GitHub and Gitea send it for an annotated tag (no forge
    publishes one; README): the tag's ref, `after` the tag object, head_commit the commit."""
    p = copy.deepcopy(payload)
    p.update(ref=f"refs/tags/{tag}", before="0" * 40, after=TAG_OBJECT)
    if "created" in p:  # GitHub's fields
        p.update(created=True, base_ref="refs/heads/master")
    return p


def send_gitea(url: str, payload: dict, delivery: str, forge: str = "Gitea",
               event: str = "push") -> httpx.Response:
    body = json.dumps(payload).encode()
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return httpx.post(f"{url}/hooks/gitea", content=body, timeout=10, headers={
        "Content-Type": "application/json", f"X-{forge}-Event": event,
        f"X-{forge}-Delivery": delivery, f"X-{forge}-Signature": sig})


def send_gitlab(url: str, payload: dict, delivery: str, event: str) -> httpx.Response:
    return httpx.post(f"{url}/hooks/gitlab", content=json.dumps(payload).encode(), timeout=10,
                      headers={"Content-Type": "application/json", "X-Gitlab-Event": event,
                               "X-Gitlab-Event-UUID": delivery, "X-Gitlab-Token": SECRET})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forges")
    pf = str(fake_pipeline(tmp))
    every = {"push": {"branches": ["*"], "tags": ["*"]}, "pull_request": {}}
    cfg = config(tmp, [{"name": name, "file": pf, "repo": repo, "triggers": every}
                       for name, repo in (("gh", GH_REPO), ("gitea", GT_REPO), ("gl-push", GL_PUSH_REPO),
                                          ("gl-tag", GL_TAG_REPO), ("gl-mr", GL_MR_REPO))],
                 concurrency=0)  # accept and queue, run nothing
    with daemon_in_process(cfg) as d:
        yield d


def queued(d, r: httpx.Response) -> dict:
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["outcome"] == "queued" and len(body["runs"]) == 1, body
    return d.store.get_run(body["runs"][0])


def facts(run: dict) -> tuple:
    return run["trigger"], run["ref"], run["branch"], run["tag"], run["commit"]


def told(d, run: dict) -> tuple:
    """What the run page shows of the change: the request stored with the run when its delivery
    arrived (commit message and author; a pull request's number, title and link)."""
    from runner.daemon.run_requests import stored_request

    r = stored_request(d.store.run_event(run["id"]), run["commit"])
    pr = r.pull_request
    return r.commit_message, r.commit_author, (pr.number, pr.title, pr.url) if pr else None


# -- pushes --------------------------------------------------------------------------------------

def test_github_branch_push(daemon):
    run = queued(daemon, send_github(daemon.url, published("github/push.json"), "gh-push"))
    assert facts(run) == ("push", "refs/heads/master", "master", None,
                          "6113728f27ae82c7b1a177c8d03f9e96e0adf246")
    assert told(daemon, run) == ("Initial commit", "Codertocat", None)


def test_github_annotated_tag_push_records_the_commit_not_the_tag_object(daemon):
    payload = annotated_tag_push(published("github/push.json"), "v1.0.0")
    run = queued(daemon, send_github(daemon.url, payload, "gh-tag"))
    # head_commit.id: the commit the tag points at, which has a page, a status and a checkout.
    assert facts(run) == ("tag", "refs/tags/v1.0.0", None, "v1.0.0",
                          "6113728f27ae82c7b1a177c8d03f9e96e0adf246")


def test_gitea_and_forgejo_push(daemon):
    run = queued(daemon, send_gitea(daemon.url, published("gitea/push.json"), "gt-push"))
    assert facts(run) == ("push", "refs/heads/develop", "develop", None,
                          "bffeb74224043ba2feb48d137756c8a9331c449a")
    assert told(daemon, run) == ("Webhooks Yay!", "Gitea", None)
    # Forgejo sends the same body under its own headers (another commit: the first one ran).
    other = "c0ffee" + "0" * 34
    payload = published("gitea/push.json")
    payload["after"] = payload["commits"][0]["id"] = other
    run = queued(daemon, send_gitea(daemon.url, payload, "fj-push", forge="Forgejo"))
    assert facts(run) == ("push", "refs/heads/develop", "develop", None, other)
    assert told(daemon, run) == ("Webhooks Yay!", "Gitea", None)


def test_gitea_annotated_tag_push(daemon):
    payload = annotated_tag_push(published("gitea/push.json"), "v2.0.0")
    payload["head_commit"] = copy.deepcopy(payload["commits"][0])
    run = queued(daemon, send_gitea(daemon.url, payload, "gt-tag"))
    assert facts(run) == ("tag", "refs/tags/v2.0.0", None, "v2.0.0",
                          "bffeb74224043ba2feb48d137756c8a9331c449a")


def test_gitlab_push_and_annotated_tag_push(daemon):
    run = queued(daemon, send_gitlab(daemon.url, published("gitlab/push.json"), "gl-push", "Push Hook"))
    assert facts(run) == ("push", "refs/heads/master", "master", None,
                          "da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
    assert told(daemon, run) == ("fixed readme", "GitLab dev user", None)
    payload = published("gitlab/tag_push.json")
    payload["after"] = TAG_OBJECT  # annotated: GitLab's `after` is the tag, checkout_sha the commit
    run = queued(daemon, send_gitlab(daemon.url, payload, "gl-tag", "Tag Push Hook"))
    assert facts(run) == ("tag", "refs/tags/v1.0.0", None, "v1.0.0",
                          "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7")


# -- pull and merge requests ---------------------------------------------------------------------

def test_github_pull_request_opened_synchronize_reopened(daemon):
    run = queued(daemon, send_github(daemon.url, published("github/pull_request-opened.json"), "gh-pr-1",
                                     event="pull_request"))
    assert facts(run) == ("pull_request", "refs/pull/2/head", None, None,
                          "ec26c3e57ca3a959ca5aad62de7213c562f8c821")
    assert told(daemon, run) == (None, None, (2, "Update the README with new information.",
                                              "https://github.com/Codertocat/Hello-World/pull/2"))
    # The published synchronize names the same head: it already runs, and the delivery says so
    # and describes no run of it.
    r = send_github(daemon.url, published("github/pull_request-synchronize.json"), "gh-pr-2",
                    event="pull_request")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored", r.text
    reason = r.json()["reason"]
    assert f"already ran as run {run['id']}" in reason
    assert "secrets" not in reason and "skipped" not in reason, reason
    # Reopened builds again, as Actions and Woodpecker do, and says what that run may do.
    again = queued(daemon, send_github(daemon.url, published("github/pull_request-reopened.json"),
                                       "gh-pr-3", event="pull_request"))
    assert facts(again) == facts(run) and again["id"] != run["id"]
    row = next(x for x in daemon.store.deliveries(limit=1000) if x["delivery_id"] == "gh-pr-3")
    assert "gh: pull request #2 from branch 'changes': secrets given, push and deploy skipped" \
        in row["reason"] and f"queued as run {again['id']}" in row["reason"], row


def test_gitlab_merge_request_open_update_reopen(daemon):
    mr = published("gitlab/merge_request.json")
    run = queued(daemon, send_gitlab(daemon.url, mr, "gl-mr-1", "Merge Request Hook"))
    assert facts(run) == ("pull_request", "refs/merge-requests/1/head", None, None,
                          "da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
    assert told(daemon, run) == ("fixed readme", "GitLab dev user",
                                 (1, "MS-Viewport", "http://example.com/diaspora/merge_requests/1"))
    update = copy.deepcopy(mr)
    update["object_attributes"].update(action="update", oldrev="95790bf891e76fee5e1747ab589903a6a1f80f22")
    r = send_gitlab(daemon.url, update, "gl-mr-2", "Merge Request Hook")
    assert r.json()["outcome"] == "ignored" and "already ran" in r.json()["reason"], r.text
    reopen = copy.deepcopy(mr)
    reopen["object_attributes"]["action"] = "reopen"
    again = queued(daemon, send_gitlab(daemon.url, reopen, "gl-mr-3", "Merge Request Hook"))
    assert facts(again) == facts(run) and again["id"] != run["id"]


# -- runs no webhook starts ----------------------------------------------------------------------

def test_manual_trigger_resolves_the_pipelines_repository_and_retry_keeps_the_commit(tmp_path):
    """No `repo:` in the daemon's entry: the head is read from the pipeline's repository.url (what
    the checkout clones), and a retry after a newer push still names the commit first queued."""
    bare, work = bare_repo(tmp_path)
    head = commit(work, "second")
    pipeline = tmp_path / "app.yaml"
    pipeline.write_text(f"name: app\nrepository: {{url: {bare}}}\n"
                        "image: {name: registry.example.com/team/app}\n")
    cfg = config(tmp_path, [{"name": "app", "file": str(pipeline)}], concurrency=0)
    with daemon_in_process(cfg) as d:
        r = httpx.post(f"{d.url}/api/pipelines/app/trigger", json={"branch": "main"}, headers=AUTH,
                       timeout=10)
        assert r.status_code == 201, r.text
        run = d.store.get_run(r.json()["run"]["id"])
        assert facts(run) == ("manual", "refs/heads/main", "main", None, head)
        commit(work, "third")  # main moves on before the retry
        assert httpx.post(f"{d.url}/api/runs/{run['id']}/cancel", headers=AUTH, timeout=10).status_code < 300
        wait_for(lambda: d.store.get_run(run["id"])["status"] == "cancelled", 10, "the cancel")
        r = httpx.post(f"{d.url}/api/runs/{run['id']}/retry", headers=AUTH, timeout=10)
        assert r.status_code == 201, r.text
        retry = d.store.get_run(r.json()["run"]["id"])
        assert retry["commit"] == head and retry["trigger"] == "retry"


def test_the_checked_out_commit_becomes_the_runs_commit(tmp_path):
    """A run queued on a tag object (Gitea's `after` without head_commit) or on a ref alone: the
    commit its checkout reports is recorded, for its links, its status and a retry."""
    peeled = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    pf = tmp_path / "fake.json"
    pf.write_text(json.dumps({"name": "fake", "stages": ["checkout", "build"], "sleep": 0.01,
                              "outputs": {"checkout": {"commit": peeled}}}))
    cfg = config(tmp_path, [{"name": "gitea", "file": str(pf), "repo": GT_REPO,
                             "triggers": {"push": {"tags": ["*"]}}}], concurrency=1)
    with daemon_in_process(cfg) as d:
        payload = published("gitea/push.json")
        payload.update(ref="refs/tags/v3.0.0", before="0" * 40, after=TAG_OBJECT)
        run = queued(d, send_gitea(d.url, payload, "gt-peel"))
        assert run["commit"] == TAG_OBJECT  # all the payload says
        done = wait_for(lambda: (x := d.store.get_run(run["id"]))["status"] == "success" and x, 20,
                        "the run to succeed")
        assert done["commit"] == peeled
