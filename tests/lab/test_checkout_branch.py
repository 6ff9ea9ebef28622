"""A trigger's commit must be on the ref the trigger names: real repositories, no mocks.

Whoever holds a webhook secret can name any commit the repository has; the checkout stage builds
it only if it is the named branch's (or pull/merge request ref's) head or an ancestor of it, or,
for a tag, what the tag points at.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.checkout import claimed_ref, describe_ref
from runner.errors import StageFailed
from tests.helpers import events, runner, stage_end
from tests.lab.test_checkout import Origin, git, run


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    """main: a -> b; feature (from b): f, pushed only to the feature branch."""
    o = Origin(tmp_path / "o")
    o.first = o.commit("a.txt")
    o.second = o.commit("b.txt")
    o.feature = o.commit("f.txt", branch="feature")
    return o


def _fails(tmp_path: Path, url: str, **kw) -> str:
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, url, **kw)
    assert exc.value.stage == "checkout"
    return exc.value.reason


# --- pure -----------------------------------------------------------------------------------

def test_claimed_ref_and_its_name():
    assert claimed_ref("refs/pull/7/head", "feature", None) == "refs/pull/7/head"
    assert claimed_ref(None, "main", None) == "refs/heads/main"
    assert claimed_ref(None, None, "v1") == "refs/tags/v1"
    assert claimed_ref(None, None, None) is None
    assert describe_ref("refs/heads/feature/x") == "branch feature/x"
    assert describe_ref("refs/tags/v1") == "tag v1"
    assert describe_ref("refs/merge-requests/3/head") == "refs/merge-requests/3/head"


# --- branches -------------------------------------------------------------------------------

def test_commit_only_on_another_branch_is_refused_for_main(tmp_path, origin):
    reason = _fails(tmp_path, str(origin.bare), request={
        "kind": "push", "ref": "refs/heads/main", "branch": "main", "commit": origin.feature})
    assert reason == (f"commit {origin.feature[:12]} is not on branch main of {origin.bare} "
                      f"(its head is {origin.second[:12]})")
    assert not (tmp_path / "runs" / "r1" / "src").exists()  # nothing was checked out


def test_branch_name_alone_is_checked_too(tmp_path, origin):
    reason = _fails(tmp_path, str(origin.bare), request={"branch": "main",
                                                         "commit": origin.feature})
    assert f"is not on branch main of {origin.bare}" in reason


def test_head_and_ancestors_of_the_branch_pass(tmp_path, origin):
    for i, commit in enumerate((origin.second, origin.first)):
        out, _ = run(tmp_path, str(origin.bare), run=f"r{i}", request={
            "kind": "push", "ref": "refs/heads/main", "branch": "main", "commit": commit})
        assert out["commit"] == commit and out["branch"] == "main"
    # The feature branch contains main's commits as well as its own.
    out, _ = run(tmp_path, str(origin.bare), run="r3", request={
        "ref": "refs/heads/feature", "branch": "feature", "commit": origin.second})
    assert out["commit"] == origin.second and out["branch"] == "feature"


def test_a_branch_the_repository_does_not_have_is_refused(tmp_path, origin):
    reason = _fails(tmp_path, str(origin.bare), request={
        "ref": "refs/heads/gone", "branch": "gone", "commit": origin.second})
    assert reason == (f"commit {origin.second[:12]} is not on branch gone of {origin.bare}: "
                      f"{origin.bare} has no branch gone")


def test_a_commit_force_pushed_away_is_refused(tmp_path, origin):
    run(tmp_path, str(origin.bare), run="r1")  # the mirror holds the old commit from now on
    git("push", "-q", "--force", "origin", f"{origin.first}:refs/heads/main", cwd=origin.work)
    reason = _fails(tmp_path, str(origin.bare), run="r2", request={
        "ref": "refs/heads/main", "commit": origin.second})
    assert reason.endswith(f"(its head is {origin.first[:12]})")


def test_shallow_mirror_refuses_a_foreign_commit_and_accepts_an_older_one(tmp_path, origin):
    url = f"file://{origin.bare}"
    run(tmp_path, url, run="r1", depth=1)
    reason = _fails(tmp_path, url, run="r2", depth=1, request={
        "ref": "refs/heads/main", "commit": origin.feature})
    assert f"commit {origin.feature[:12]} is not on branch main" in reason
    assert "the mirror is shallow" in reason
    out, ctx = run(tmp_path, url, run="r3", depth=1, request={
        "ref": "refs/heads/main", "commit": origin.first})
    assert out["commit"] == origin.first
    assert any("the mirror is shallow: fetching branch main since" in line
               for line in ctx.log.lines)


# --- tags -----------------------------------------------------------------------------------

@pytest.mark.parametrize("annotated", [True, False])
def test_tag_must_point_at_the_commit(tmp_path, origin, annotated):
    git("checkout", "-q", origin.first, cwd=origin.work)
    origin.tag("v1", annotated=annotated)
    out, _ = run(tmp_path, str(origin.bare), run="r1", request={
        "ref": "refs/tags/v1", "tag": "v1", "commit": origin.first})
    assert out["commit"] == origin.first and out["tag"] == "v1"
    reason = _fails(tmp_path, str(origin.bare), run="r2", request={
        "ref": "refs/tags/v1", "tag": "v1", "commit": origin.second})
    assert reason == (f"commit {origin.second[:12]} is not what tag v1 of {origin.bare} points "
                      f"at (it points at {origin.first[:12]})")


# --- pull / merge request refs ----------------------------------------------------------------

@pytest.mark.parametrize("ref", ["refs/pull/1/head", "refs/merge-requests/1/head"])
def test_pull_request_ref_is_fetched_and_checked(tmp_path, origin, ref):
    # The pull request's head, as GitHub/Gitea (refs/pull) and GitLab (refs/merge-requests) keep
    # it in the base repository; the source branch itself is not there.
    pr = origin.commit("pr.txt", branch="pr-source")
    git("update-ref", ref, pr, cwd=origin.bare)
    git("push", "-q", "origin", "--delete", "pr-source", cwd=origin.work)
    out, _ = run(tmp_path, str(origin.bare), run="r1", request={"ref": ref, "commit": pr})
    assert out["commit"] == pr and out["branch"] is None and out["tag"] is None
    assert (Path(out["path"]) / "pr.txt").exists()
    out, _ = run(tmp_path, str(origin.bare), run="r2", request={"ref": ref,
                                                                "commit": origin.feature})
    assert out["commit"] == origin.feature  # an ancestor of the pull request's head
    side = _side_commit(origin)
    reason = _fails(tmp_path, str(origin.bare), run="r3", request={"ref": ref, "commit": side})
    assert reason == f"commit {side[:12]} is not on {ref} of {origin.bare} (its head is {pr[:12]})"


def _side_commit(origin: Origin) -> str:
    """A commit on a branch of its own, from main: in no pull request."""
    git("checkout", "-q", "-B", "side", origin.second, cwd=origin.work)
    return origin.commit("side.txt", branch="side")


def test_pull_request_ref_as_the_pipeline_ref(tmp_path, origin):
    git("update-ref", "refs/pull/2/head", origin.feature, cwd=origin.bare)
    out, _ = run(tmp_path, str(origin.bare), ref="refs/pull/2/head")
    assert out["commit"] == origin.feature


# --- through `runner exec --event` ------------------------------------------------------------

def _exec(tmp_path: Path, origin: Origin, commit: str, run_id: str):
    event = tmp_path / f"{run_id}.json"
    event.write_text(json.dumps({"provider": "generic", "headers": {},
                                 "payload": {"ref": "refs/heads/main", "commit": commit}}))
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"name: x\nrepository: {{url: {origin.bare}}}\n"
                 "image: {name: 127.0.0.1:5000/x}\n")
    proc = runner("exec", str(p), "--only", "checkout", "--json", "--event", str(event),
                  "--run-id", run_id, "--data-dir", str(tmp_path / "d"))
    record = json.loads((tmp_path / "d" / "runs" / run_id / "run.json").read_text())
    return proc, record


def test_event_naming_main_with_a_feature_commit_fails_the_checkout(tmp_path, origin):
    proc, record = _exec(tmp_path, origin, origin.feature, "bad")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    end = stage_end(events(proc.stdout), "checkout")
    message = (f"commit {origin.feature[:12]} is not on branch main of {origin.bare} "
               f"(its head is {origin.second[:12]})")
    assert end["status"] == "failed" and end["error"] == message
    assert record["status"] == "failed" and record["stages"][0]["error"] == message

    proc, record = _exec(tmp_path, origin, origin.second, "good")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert record["stages"][0]["outputs"]["commit"] == origin.second


DATA = Path(__file__).resolve().parents[1] / "data" / "events"


def _pull_request_event(kind: str, commit: str) -> dict:
    """A stored pull / merge request delivery for request #1 with head `commit`."""
    if kind == "github":
        payload = json.loads((DATA / "github_pull_request.json").read_text())
        payload["number"] = payload["pull_request"]["number"] = 1
        payload["pull_request"]["head"]["sha"] = commit
        return {"provider": "github", "headers": {"X-GitHub-Event": "pull_request"},
                "payload": payload}
    payload = json.loads((DATA / "gitlab_merge_request.json").read_text())
    payload["object_attributes"]["iid"] = 1
    payload["object_attributes"]["last_commit"]["id"] = commit
    return {"provider": "gitlab", "headers": {"X-Gitlab-Event": "Merge Request Hook"},
            "payload": payload}


@pytest.mark.parametrize("kind,ref", [("github", "refs/pull/1/head"),
                                      ("gitlab", "refs/merge-requests/1/head")])
def test_pull_request_event_runs_as_the_daemon_will_run_it(tmp_path, origin, kind, ref):
    """`runner exec --event <pull request> --withhold-secrets --skip push --skip deploy`: the
    request's head is checked out from the ref the base repository keeps for it; a delivery
    naming a commit that is not on that ref fails the checkout."""
    pr = origin.commit("pr.txt", branch="pr-source")
    git("update-ref", ref, pr, cwd=origin.bare)
    git("push", "-q", "origin", "--delete", "pr-source", cwd=origin.work)
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"name: x\nrepository: {{url: {origin.bare}}}\n"
                 "image: {name: 127.0.0.1:5000/x}\nstages: {build: {enabled: false}}\n")
    outcomes = {}
    for name, commit in (("good", pr), ("bad", _side_commit(origin))):
        event = tmp_path / f"{name}.json"
        event.write_text(json.dumps(_pull_request_event(kind, commit)))
        proc = runner("exec", str(p), "--json", "--event", str(event), "--withhold-secrets",
                      "--skip", "push", "--skip", "deploy", "--run-id", name,
                      "--data-dir", str(tmp_path / "d"))
        evs = events(proc.stdout)
        assert evs[0]["trigger"]["ref"] == ref and evs[0]["trigger"]["commit"] == commit
        outcomes[name] = (proc.returncode, stage_end(evs, "checkout"), stage_end(evs, "push"))
    code, checkout, push = outcomes["good"]
    assert code == 0 and checkout["outputs"]["commit"] == pr
    assert (push["status"], push["error"]) == ("skipped", "not run: --skip push")
    code, checkout, _ = outcomes["bad"]
    assert code == 1 and checkout["status"] == "failed"
    assert checkout["error"].endswith(f"is not on {ref} of {origin.bare} (its head is {pr[:12]})")
