"""Pull / merge request runs: the policy (pure, case by case), the run a pull request queues, and
real GitHub, Gitea and GitLab deliveries (tests/data/events) over HTTP to an in-process daemon."""
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
from harness import (SECRET, config, daemon_in_process, fake_forge, fake_pipeline, push_payload,  # noqa: E402
                     send_github, wait_for)

from runner.daemon import webhooks as wh  # noqa: E402
from runner.daemon.config import config_from_dict  # noqa: E402
from runner.daemon.store import FINAL  # noqa: E402
from runner.errors import InvalidInput  # noqa: E402
from runner.trigger import parse_event  # noqa: E402

EVENTS = Path(__file__).resolve().parents[1] / "data" / "events"
GH_REPO = "https://github.com/octo-org/app.git"  # the base repository of github_pull_request.json
GT_REPO = "http://localhost:3000/gitea/webhooks.git"
GL_REPO = "http://example.com/mike/diaspora.git"
GH_HDR = {"X-GitHub-Event": "pull_request"}


def event(name: str) -> dict:
    return json.loads((EVENTS / f"{name}.json").read_text())


def github_pr(number: int = 3, head: str | None = None, action: str = "opened", fork: bool = True,
              base: str = "main") -> dict:
    """github_pull_request.json (a fork's pull request), with another number, head commit,
    action, target branch, or its head in the base repository itself."""
    p = event("github_pull_request")
    p["action"], p["number"] = action, number
    pr = p["pull_request"]
    pr["number"] = number
    pr["base"]["ref"] = base
    if head:
        pr["head"]["sha"] = head
    if not fork:
        pr["head"]["repo"] = copy.deepcopy(pr["base"]["repo"])
        pr["head"]["label"] = "octo-org:fix-login"
    return p


def other_repository(payload: dict, full_name: str) -> dict:
    """The payload's base repository, with every URL of it pointing at `full_name`."""
    repo = copy.deepcopy(payload["repository"])
    repo.update(full_name=full_name, name=full_name.split("/")[1],
                html_url=f"https://github.com/{full_name}", url=f"https://api.github.com/repos/{full_name}",
                git_url=f"git://github.com/{full_name}.git", ssh_url=f"git@github.com:{full_name}.git",
                clone_url=f"https://github.com/{full_name}.git")
    return repo


def entry(pull_request: dict | None, **over):
    triggers = {} if pull_request is None else {"pull_request": pull_request}
    return config_from_dict({"pipelines": [{"name": "app", "file": "p.yaml", "repo": GH_REPO,
                                            "triggers": triggers, **over}]}).pipelines[0]


def trig(fork: bool, **payload_changes):
    return parse_event(github_pr(fork=fork, **payload_changes), headers=GH_HDR)


# -- pure --------------------------------------------------------------------------------------

BOTH = ("push", "deploy")


@pytest.mark.parametrize("rule,fork,expected", [
    # Same repository: its author can push the branch anyway, so it gets the secrets; push and
    # deploy only when allowed one by one.
    ({}, False, (False, BOTH)),
    ({"push": True}, False, (False, ("deploy",))),
    ({"deploy": True}, False, (False, ("push",))),
    ({"push": True, "deploy": True}, False, (False, ())),
    # A fork: nothing, whatever push / deploy say, unless forks: trusted.
    ({}, True, (True, BOTH)),
    ({"push": True, "deploy": True}, True, (True, BOTH)),
    ({"forks": "restricted", "push": True}, True, (True, BOTH)),
    # A trusted fork is a same-repository pull request.
    ({"forks": "trusted"}, True, (False, BOTH)),
    ({"forks": "trusted", "deploy": True}, True, (False, ("push",))),
    ({"forks": "trusted", "push": True, "deploy": True}, True, (False, ())),
    ({"forks": "trusted", "push": True}, False, (False, ("deploy",))),
])
def test_pull_request_policy(rule, fork, expected):
    assert wh.pull_request_policy(entry(rule), trig(fork)) == expected


def test_policy_without_a_pull_request_trigger_is_the_strictest():
    assert wh.pull_request_policy(entry(None), trig(False)) == (True, BOTH)


@pytest.mark.parametrize("fork,withhold,skip,said", [
    (True, True, BOTH, "pull request #3 from a fork: secrets withheld, push and deploy skipped"),
    (False, False, BOTH, "pull request #3 from branch 'fix-login': secrets given, push and deploy skipped"),
    (False, False, ("deploy",), "pull request #3 from branch 'fix-login': secrets given, deploy skipped"),
    (True, False, (), "pull request #3 from a fork: secrets given, push and deploy allowed"),
])
def test_describe_policy(fork, withhold, skip, said):
    assert wh.describe_policy(trig(fork), withhold, skip) == said


def test_describe_policy_gitlab_words():
    mr = parse_event(event("gitlab_merge_request"), headers={"X-Gitlab-Event": "Merge Request Hook"})
    assert wh.describe_policy(mr, False, ("push",)) == \
        "merge request !5 from branch 'ms-viewport': secrets given, push skipped"


def test_pull_request_filter():
    assert wh.pull_request_filter(entry(None), trig(True)) == \
        "app: pull requests start nothing (no triggers.pull_request)"
    rule = {"branches": ["main", "release/*"]}
    assert wh.pull_request_filter(entry(rule), trig(True)) is None
    assert wh.pull_request_filter(entry(rule), trig(True, base="release/2.0")) is None
    # The TARGET branch decides, not the pull request's own (fix-login).
    assert wh.pull_request_filter(entry(rule), trig(True, base="develop")) == (
        "app: pull request #3 targets 'develop', which matches none of "
        "triggers.pull_request.branches ['main', 'release/*']")
    assert wh.pull_request_filter(entry({}), trig(True, base="anything")) is None  # default ["*"]


def test_new_pull_request_run():
    event_doc = {"provider": "github", "headers": {}, "payload": {}}
    run = wh.new_pull_request_run(entry({}, vars={"A": "1"}), trig(True), event_doc, delivery="d-9")
    assert run == wh.NewRun(
        pipeline="app", trigger="pull_request", provider="github", ref="refs/pull/3/head",
        branch=None, tag=None, commit="8e2b6f3a1c9d4e5f60718293a4b5c6d7e8f90a1b", event=event_doc,
        vars={"A": "1"}, group="app/pr:3", cancel_in_progress=True, delivery="d-9", once=True,
        withhold_secrets=True, skip_stages=BOTH,
        note="app: pull request #3 from a fork: secrets withheld, push and deploy skipped")
    same = wh.new_pull_request_run(entry({"push": True, "deploy": True}), trig(False), event_doc)
    assert (same.withhold_secrets, same.skip_stages) == (False, ())
    assert wh.new_pull_request_run(entry({}, concurrency_group=None), trig(True), event_doc).group is None
    # The push to main and the pull request into main are in different groups.
    p = entry({})
    assert wh.group_key(p, "main", None, "refs/heads/main") == "app/main"
    assert wh.new_pull_request_run(p, trig(True), event_doc).group == "app/pr:3"


def test_config_pull_request_trigger():
    assert entry(None).triggers.pull_request is None  # the default: pull requests start nothing
    pr = entry({}).triggers.pull_request
    assert (pr.branches, pr.push, pr.deploy, pr.forks) == (("*",), False, False, "restricted")
    with pytest.raises(InvalidInput) as info:
        config_from_dict({"pipelines": [{"name": "app", "file": "p.yaml", "triggers": {
            "pull_request": {"forks": "everyone", "secrets": True}}}]})
    fields = {p.path for p in info.value.problems}
    assert "pipelines[0].triggers.pull_request.forks" in fields
    assert "pipelines[0].triggers.pull_request.secrets" in fields


# -- over HTTP ---------------------------------------------------------------------------------

def send_gitea(url: str, payload: dict, delivery: str) -> httpx.Response:
    body = json.dumps(payload).encode()
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    # Gitea sends the GitHub event header as well; the Gitea endpoint reads its own.
    return httpx.post(f"{url}/hooks/gitea", content=body, timeout=10, headers={
        "Content-Type": "application/json", "X-Gitea-Event": "pull_request",
        "X-GitHub-Event": "pull_request", "X-Gitea-Event-Type": "pull_request_sync",
        "X-Gitea-Delivery": delivery, "X-Gitea-Signature": sig})


def send_gitlab(url: str, payload: dict, delivery: str) -> httpx.Response:
    return httpx.post(f"{url}/hooks/gitlab", content=json.dumps(payload).encode(), timeout=10,
                      headers={"Content-Type": "application/json", "X-Gitlab-Event": "Merge Request Hook",
                               "X-Gitlab-Event-UUID": delivery, "X-Gitlab-Token": SECRET})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prs")
    pf = fake_pipeline(tmp)
    cfg = config(tmp, [
        {"name": "app", "file": str(pf), "repo": GH_REPO,
         "triggers": {"push": {"branches": ["main"]},
                      "pull_request": {"branches": ["main", "release/*"]}}},
        {"name": "nopr", "file": str(pf), "repo": GH_REPO, "triggers": {"push": None}},
        # The fork's own repository: a pull request FROM it is not a delivery of it.
        {"name": "contrib", "file": str(pf), "repo": "https://github.com/contributor/app.git",
         "triggers": {"pull_request": {}}},
        {"name": "gitea-app", "file": str(pf), "repo": GT_REPO,
         "triggers": {"pull_request": {"push": True}}},
        {"name": "gitlab-app", "file": str(pf), "repo": GL_REPO,
         "triggers": {"pull_request": {"forks": "trusted", "deploy": True}}},
    ], concurrency=0)  # accept and queue, run nothing
    with daemon_in_process(cfg) as d:
        yield d


def _delivery(d, row: int) -> dict:
    return next(x for x in d.store.deliveries(limit=1000) if x["id"] == row)


def _queued_one(r: httpx.Response, d) -> dict:
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["outcome"] == "queued" and len(body["runs"]) == 1, body
    return d.store.get_run(body["runs"][0])


def test_github_fork_pull_request_runs_without_secrets_push_or_deploy(daemon):
    r = send_github(daemon.url, github_pr(), "pr-gh-1", event="pull_request")
    run = _queued_one(r, daemon)
    assert (run["pipeline"], run["trigger"], run["provider"]) == ("app", "pull_request", "github")
    assert (run["ref"], run["branch"], run["tag"]) == ("refs/pull/3/head", None, None)
    assert run["commit"] == "8e2b6f3a1c9d4e5f60718293a4b5c6d7e8f90a1b"
    assert run["group"] == "app/pr:3" and run["status"] == "queued"
    assert run["withhold_secrets"] is True and run["skip_stages"] == ["push", "deploy"]
    reason = _delivery(daemon, r.json()["delivery"])["reason"]
    assert "app: pull request #3 from a fork: secrets withheld, push and deploy skipped" in reason
    assert "nopr: pull requests start nothing (no triggers.pull_request)" in reason
    assert "contrib" not in reason  # matched by the BASE repository only
    # The run replays the delivery: `runner exec --event` parses the same pull request.
    stored = daemon.store.run_event(run["id"])
    again = parse_event(stored["payload"], headers=stored["headers"], provider=stored["provider"])
    assert (again.kind, again.ref, again.commit, again.fork) == ("pull_request", run["ref"], run["commit"], True)


def test_github_same_repository_pull_request_gets_secrets_but_no_push_or_deploy(daemon):
    r = send_github(daemon.url, github_pr(4, head="4" * 40, fork=False, action="synchronize"),
                    "pr-gh-2", event="pull_request")
    run = _queued_one(r, daemon)
    assert (run["ref"], run["commit"], run["group"]) == ("refs/pull/4/head", "4" * 40, "app/pr:4")
    assert run["withhold_secrets"] is False and run["skip_stages"] == ["push", "deploy"]
    assert "app: pull request #4 from branch 'fix-login': secrets given, push and deploy skipped" in \
        r.json()["reason"]


def test_gitea_pull_request(daemon):
    r = send_gitea(daemon.url, event("gitea_pull_request"), "pr-gt-1")
    run = _queued_one(r, daemon)
    assert (run["pipeline"], run["trigger"], run["provider"]) == ("gitea-app", "pull_request", "gitea")
    assert (run["ref"], run["commit"]) == ("refs/pull/7/head", "c3f1e2d4b5a69788796a5b4c3d2e1f0a9b8c7d6e")
    assert run["group"] == "gitea-app/pr:7"
    assert run["withhold_secrets"] is False and run["skip_stages"] == ["deploy"]  # push: true
    assert "gitea-app: pull request #7 from branch 'feature/login': secrets given, deploy skipped" in \
        r.json()["reason"]
    closed = event("gitea_pull_request")
    closed["action"] = "closed"
    r = send_gitea(daemon.url, closed, "pr-gt-2")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored"
    assert "pull request #7 'closed' starts nothing" in r.json()["reason"]


def test_gitlab_merge_request_from_a_trusted_fork(daemon):
    mr = event("gitlab_merge_request")
    attrs = mr["object_attributes"]
    attrs["source_project_id"] = 31  # a fork of mike/diaspora
    attrs["source"] = {**attrs["source"], "path_with_namespace": "jsmith/diaspora",
                       "git_http_url": "http://example.com/jsmith/diaspora.git"}
    r = send_gitlab(daemon.url, mr, "mr-1")
    run = _queued_one(r, daemon)
    assert (run["pipeline"], run["trigger"], run["provider"]) == ("gitlab-app", "pull_request", "gitlab")
    assert (run["ref"], run["commit"]) == ("refs/merge-requests/5/head", attrs["last_commit"]["id"])
    assert run["group"] == "gitlab-app/pr:5"
    # forks: trusted, deploy: true
    assert run["withhold_secrets"] is False and run["skip_stages"] == ["push"]
    assert "gitlab-app: merge request !5 from a fork: secrets given, push skipped" in \
        _delivery(daemon, r.json()["delivery"])["reason"]
    # An update that changes the title only (no oldrev) builds nothing.
    del attrs["oldrev"]
    attrs["last_commit"]["id"] = "5" * 40
    r = send_gitlab(daemon.url, mr, "mr-2")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored"
    assert "merge request !5 'update' brings no new commits" in r.json()["reason"]


@pytest.mark.parametrize("action", ["closed", "labeled", "edited", "review_requested"])
def test_github_actions_that_start_nothing_are_recorded_with_the_reason(daemon, action):
    r = send_github(daemon.url, github_pr(head="6" * 40, action=action), f"pr-act-{action}",
                    event="pull_request")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored" and r.json()["runs"] == []
    assert f"pull request #3 {action!r} starts nothing (only opened, synchronize and reopened do)" in \
        _delivery(daemon, r.json()["delivery"])["reason"]


def test_target_branch_filter(daemon):
    r = send_github(daemon.url, github_pr(head="7" * 40, base="develop"), "pr-base-1", event="pull_request")
    assert r.json()["outcome"] == "ignored"
    assert ("app: pull request #3 targets 'develop', which matches none of triggers.pull_request.branches "
            "['main', 'release/*']") in r.json()["reason"]
    run = _queued_one(send_github(daemon.url, github_pr(head="8" * 40, base="release/2.1"), "pr-base-2",
                                  event="pull_request"), daemon)
    assert run["ref"] == "refs/pull/3/head"


def test_pushes_to_a_pull_request_supersede_its_runs_not_the_base_branchs(daemon):
    main = send_github(daemon.url, push_payload(GH_REPO, after="9" * 40), "sup-main").json()["runs"]
    [first] = send_github(daemon.url, github_pr(9, head="a1" * 20, action="opened"), "sup-1",
                          event="pull_request").json()["runs"]
    [other_pr] = send_github(daemon.url, github_pr(10, head="a2" * 20), "sup-2",
                             event="pull_request").json()["runs"]
    [second] = send_github(daemon.url, github_pr(9, head="a3" * 20, action="synchronize"), "sup-3",
                           event="pull_request").json()["runs"]
    got = daemon.store.get_run
    assert got(first)["status"] == "cancelled" and got(first)["reason"] == f"superseded by run {second}"
    assert got(second)["status"] == "queued" and got(second)["group"] == "app/pr:9"
    assert got(other_pr)["status"] == "queued"  # another pull request: its own group
    assert [got(i)["status"] for i in main] == ["queued"]  # the base branch's run stays
    assert got(main[0])["group"] == "app/main"


def test_named_pipeline_of_another_repository_is_not_started_by_a_pull_request(daemon):
    # The provider-wide secret, a pull request of another repository, ?pipeline=app.
    p = github_pr(11, head="b" * 40)
    p["repository"] = p["pull_request"]["base"]["repo"] = other_repository(p, "octo-org/site")
    r = send_github(daemon.url, p, "pr-named-1", event="pull_request", query="?pipeline=app")
    assert r.status_code == 200 and r.json()["outcome"] == "ignored", r.text
    assert r.json()["reason"] == ("app: the payload's repository github.com/octo-org/site is not this "
                                  "pipeline's repository github.com/octo-org/app")


def test_a_pull_request_of_an_unconfigured_repository_says_so(daemon):
    p = github_pr(12, head="c" * 40)
    p["repository"] = p["pull_request"]["base"]["repo"] = other_repository(p, "octo-org/site")
    r = send_github(daemon.url, p, "pr-none-1", event="pull_request")
    assert r.json()["outcome"] == "ignored" and "no pipeline serves repository" in r.json()["reason"]


# -- commit status of a pull request run --------------------------------------------------------

def test_commit_status_is_reported_on_the_head_commit_to_the_base_repository(tmp_path):
    with fake_forge() as (forge_url, seen):
        cfg = config(tmp_path, [{"name": "app", "file": str(fake_pipeline(tmp_path)), "repo": GH_REPO,
                                 "triggers": {"pull_request": {}},
                                 "commit_status": {"api_url": forge_url,
                                                   "repo": "octo-org/app", "token": {"value": "forge-token"}}}])
        with daemon_in_process(cfg) as d:
            r = send_github(d.url, github_pr(), "st-pr-1", event="pull_request")
            [rid] = r.json()["runs"]
            wait_for(lambda: d.store.get_run(rid)["status"] in FINAL, 20, "the run to end")
            wait_for(lambda: len(seen) >= 2, 15, "two status reports")
            assert d.store.get_run(rid)["status"] == "success"
            # What `runner exec` was told (tests/data/daemon/fake_exec.py records it).
            [ran] = [json.loads(x) for x in (d.work_dir / "fake-runs.jsonl").read_text().splitlines()]
        (p1, _, first), (p2, _, last) = seen[:2]
        head = "8e2b6f3a1c9d4e5f60718293a4b5c6d7e8f90a1b"  # the fork's commit, not base.sha
        assert p1 == p2 == f"/repos/octo-org/app/statuses/{head}"
        assert (first["state"], last["state"]) == ("pending", "success")
        # a status of its own, beside the push's "runner/app" of the same commit
        assert first["context"] == last["context"] == "runner/app (pull_request)"
        assert ran["withhold_secrets"] is True and ran["skip"] == ["push", "deploy"]
        assert ran["request"]["kind"] == "pull_request" and ran["request"]["commit"] == head
        fork_url = github_pr()["pull_request"]["head"]["repo"]["clone_url"]
        assert ran["request"]["pull_request"] == {"number": 3, "action": "opened", "head_branch": "fix-login",
                                                  "base_branch": "main", "fork": True, "head_repo_url": fork_url,
                                                  "title": "Fix the login redirect",
                                                  "url": "https://github.com/octo-org/app/pull/3"}
