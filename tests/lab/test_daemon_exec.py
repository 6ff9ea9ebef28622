"""The daemon driving the real `runner exec`: a signed push webhook to a local repository starts a
run whose checkout takes the pushed commit (no lab needed), and on the lab, one that builds and
pushes an image the registry serves."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import (TOKEN, api_get, bare_repo, commit, config, daemon_in_process, push_payload,  # noqa: E402
                     send_github, wait_for)
from tests.lab.test_checkout import TOKEN as CHECKOUT_TOKEN, git as checkout_git  # noqa: E402
from tests.lab.test_checkout import http_origin  # noqa: E402,F401 - a fixture

FINAL = ("success", "failed", "invalid", "cancelled", "interrupted")


def _final(d, run_id, timeout=60):
    return wait_for(lambda: (r := d.store.get_run(run_id)) and r["status"] in FINAL and r, timeout,
                    f"run {run_id} to end", every=0.1)


def _checkout_only(tmp_path: Path, repo: Path) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "name": "checkout-only", "repository": {"url": str(repo)},
                                 "image": {"name": "localhost/test/app"},
                                 "stages": {"build": {"enabled": False}, "push": {"enabled": False}}}))
    return p


def _real(cfg: dict) -> dict:
    cfg.pop("exec_command")  # the default: this python -m runner exec
    return cfg


def test_webhook_runs_the_real_runner_exec_on_the_pushed_commit(tmp_path):
    bare, work = bare_repo(tmp_path)
    pipeline = _checkout_only(tmp_path, bare)
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nname: broken\nrepository: {url: " + str(bare) + "}\n")  # no image
    cfg = _real(config(tmp_path, [
        {"name": "app", "file": str(pipeline), "repo": str(bare)},
        {"name": "broken", "file": str(broken), "repo": str(bare), "concurrency_group": None},
    ]))
    with daemon_in_process(cfg) as d:
        wait_for(lambda: d.pool._spare[0] is not None, 10, "a warm spare")
        time.sleep(1.5)  # let it finish importing, as it would have long before a real push
        first = commit(work, "second")
        second = commit(work, "third")  # the branch moved on: the webhook's commit is the one built
        r = send_github(d.url, push_payload(str(bare), after=first), "real-1")
        assert r.status_code == 202, r.text
        by_pipeline = {d.store.get_run(i)["pipeline"]: i for i in r.json()["runs"]}
        run = _final(d, by_pipeline["app"])
        assert run["status"] == "success", (run, d.store.logs(run["id"]))
        stages = {s["name"]: s for s in d.store.stages(run["id"])}
        assert stages["checkout"]["status"] == "success"
        assert stages["checkout"]["outputs"]["commit"] == first != second
        assert any("checked out" in x["line"] for x in d.store.logs(run["id"], stage="checkout"))
        # The request the daemon wrote from the delivery parsed once, as the child recorded it.
        recorded = json.loads((d.work_dir / "runs" / str(run["id"]) / "run.json").read_text())["trigger"]
        assert (recorded["kind"], recorded["commit"], recorded["commit_message"], recorded["sender"]) == \
            ("push", first, "change", "me")
        # A pipeline file that is invalid fails its run with the validation error; the daemon
        # keeps serving.
        bad = _final(d, by_pipeline["broken"])
        assert bad["status"] == "invalid" and "image" in bad["reason"], bad
        # A manual run names only the branch when given no commit; the checkout resolves it.
        t = httpx.post(f"{d.url}/api/pipelines/app/trigger", json={"branch": "main"},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        manual = _final(d, t.json()["run"]["id"])
        assert manual["status"] == "success"
        out = {s["name"]: s for s in d.store.stages(manual["id"])}["checkout"]["outputs"]
        assert out["commit"] == second and out["branch"] == "main"
        assert d.pool.spares_used >= 1  # at least one run started in a warm `runner` process


def test_runner_exec_reads_a_request_file_and_refuses_a_malformed_one_naming_it(tmp_path):
    """`runner exec --request FILE`, as the daemon's child: a good request's facts in --json; a
    malformed file is exit 2 with the file and what is wrong, before anything runs."""
    from tests.helpers import events, runner

    bare, work = bare_repo(tmp_path)
    head = commit(work, "Fix the cache\n\nIt was keyed by path.")
    pipeline = _checkout_only(tmp_path, bare)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"kind": "pull_request", "provider": "gitea", "ref": "refs/heads/main",
                                "commit": head, "commit_message": "Fix the cache\n\nIt was keyed by path.",
                                "commit_author": "Ann", "sender": "ann", "pull_request": {
                                    "number": 7, "title": "Fix the cache", "url": "https://git.example.com/a/b/pulls/7",
                                    "head_branch": "fix", "base_branch": "main", "fork": False}}))
    p = runner("exec", str(pipeline), "--json", "--only", "checkout", "--request", str(good),
               "--data-dir", str(tmp_path / "data"), timeout=120)
    assert p.returncode == 0, p.stderr
    start = events(p.stdout)[0]
    assert start["event"] == "run.start" and start["trigger"] == json.loads(good.read_text())
    for body, why in [
        ('{"kind": "push", "commit": "main"}', " is invalid: commit: 'main' is not a full hex commit sha"),
        ('{"kind": "push", "pull_request": {"number": 3, "url": "javascript:alert(1)"}}',
         " is invalid: pull_request.url: 'javascript:alert(1)' is not an http(s) address"),
        ('{"kind": "push", "surprise": 1}', " is invalid: surprise: not a field of a run request"),
        ('{"kind": "push",\n', ":2:1: not JSON"),
        ("[1]", ": expected a JSON object"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(body)
        p = runner("exec", str(pipeline), "--request", str(bad), "--data-dir", str(tmp_path / "data"), timeout=60)
        assert p.returncode == 2 and f"error: --request {bad}{why}" in p.stderr, (body, p.stderr)
    p = runner("exec", str(pipeline), "--json", "--request", str(tmp_path / "none.json"), timeout=60)
    assert p.returncode == 2 and events(p.stdout)[-1]["status"] == "invalid"
    assert f"--request {tmp_path / 'none.json'}: cannot read: No such file or directory" in p.stderr


def test_launcher_runs_the_command_it_is_given(tmp_path):
    import subprocess
    argv = [sys.executable, "-m", "runner.daemon.launcher"]
    p = subprocess.run(argv, input='["--version"]\n', capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "version" in p.stdout.lower(), p
    p = subprocess.run(argv, input="", capture_output=True, text=True, timeout=60)  # not needed: quiet
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""


def test_poll_run_with_the_real_runner_exec(tmp_path):
    bare, work = bare_repo(tmp_path)
    pipeline = _checkout_only(tmp_path, bare)
    cfg = _real(config(tmp_path, [{"name": "app", "file": str(pipeline), "repo": str(bare),
                                   "triggers": {"poll": {"interval": 0.5, "initial": "run"}}}]))
    with daemon_in_process(cfg) as d:
        runs = wait_for(lambda: d.store.list_runs(trigger="poll"), 15, "the first poll to queue a run")
        run = _final(d, runs[0]["id"])
        assert run["status"] == "success", (run, d.store.logs(run["id"]))
        out = {s["name"]: s for s in d.store.stages(run["id"])}["checkout"]["outputs"]
        assert out["commit"] == run["commit"] and out["branch"] == "main"


def test_push_webhook_builds_and_pushes_on_the_lab(lab, tmp_path):
    from tests.helpers import make_repo

    repo = make_repo(tmp_path / "repo", {"Dockerfile": "FROM local/busybox:1\nCOPY hello.txt /hello.txt\n",
                                         "hello.txt": "hi\n"})
    from harness import git
    sha = git("rev-parse", "HEAD", cwd=repo)
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"name: daemon-lab\nrepository: {{url: {repo}}}\nimage: {{name: \"{lab['registry']}/test/daemon\"}}\n")
    cfg = _real(config(tmp_path, [{"name": "app", "file": str(p), "repo": str(repo)}]))
    with daemon_in_process(cfg) as d:
        r = send_github(d.url, push_payload(str(repo), after=sha), "lab-1")
        assert r.status_code == 202, r.text
        run = _final(d, r.json()["runs"][0], timeout=300)
        assert run["status"] == "success", (run, d.store.logs(run["id"])[-30:])
        stages = {s["name"]: s for s in d.store.stages(run["id"])}
        assert stages["checkout"]["outputs"]["commit"] == sha
        digest = stages["push"]["outputs"]["digest"]
        assert digest.startswith("sha256:")
        short = stages["checkout"]["outputs"]["short_sha"]
        m = httpx.get(f"http://{lab['registry']}/v2/test/daemon/manifests/{short}", timeout=10, headers={
            "Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
                      "application/vnd.docker.distribution.manifest.v2+json, "
                      "application/vnd.docker.distribution.manifest.list.v2+json"})
        assert m.status_code == 200 and m.headers["Docker-Content-Digest"] == digest


def test_newer_push_cancels_a_running_build_on_the_lab(lab, tmp_path):
    from harness import git
    from tests.helpers import commit_files, make_repo

    repo = make_repo(tmp_path / "repo", {"Dockerfile": "FROM local/busybox:1\nRUN sleep 27.183\n"})
    slow = git("rev-parse", "HEAD", cwd=repo)
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"name: daemon-cancel\nrepository: {{url: {repo}}}\n"
                 f"image: {{name: \"{lab['registry']}/test/daemon-cancel\"}}\n")
    cfg = _real(config(tmp_path, [{"name": "app", "file": str(p), "repo": str(repo)}]))
    with daemon_in_process(cfg) as d:
        first = send_github(d.url, push_payload(str(repo), after=slow), "lab-c1").json()["runs"][0]
        wait_for(lambda: any(s["name"] == "build" and s["status"] == "running" for s in d.store.stages(first)),
                 120, "the slow build to start", every=0.2)
        fast = commit_files(repo, {"Dockerfile": "FROM local/busybox:1\nRUN echo fast\n"}, "fast")
        t0 = time.monotonic()
        second = send_github(d.url, push_payload(str(repo), after=fast, before=slow), "lab-c2").json()["runs"][0]
        r1 = _final(d, first, timeout=60)
        stopped_in = time.monotonic() - t0
        r2 = _final(d, second, timeout=300)
        assert r1["status"] == "cancelled" and r1["reason"] == f"superseded by run {second}", r1
        assert stopped_in < 20, f"the superseded build took {stopped_in:.1f}s to stop"
        assert {s["name"]: s["status"] for s in d.store.stages(first)}["build"] == "cancelled"
        assert r2["status"] == "success", (r2, d.store.logs(second)[-20:])
        assert {s["name"]: s for s in d.store.stages(second)}["checkout"]["outputs"]["commit"] == fast


def _push_file(work: Path, files: dict[str, str], message: str, branch: str = "main") -> str:
    from harness import git

    known = git("branch", "--list", branch, cwd=work)
    git("checkout", *(() if known else ("-b",)), branch, cwd=work)
    for name, text in files.items():
        (work / name).write_text(text)
        git("add", name, cwd=work)
    git("commit", "-m", message, cwd=work)
    git("push", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def test_the_pipeline_committed_in_the_repository_is_read_at_each_run_s_commit(tmp_path):
    """`pipeline: .runner.yaml`: each run reads the file at its own commit. Broken at one commit:
    that run is invalid with every problem at .runner.yaml@COMMIT:line:column, no stage runs, and
    the next commit's fix runs. A branch whose file asks for a server outside the daemon's
    allow-list or a secret it does not grant is refused before anything runs, and changes
    nothing for main."""
    bare, work = bare_repo(tmp_path)
    checkout_only = ("version: 1\nname: from-repo\nrepository: {url: /somewhere/else}\n"
                     "image: {name: localhost/test/app}\n"
                     "stages: {build: {enabled: false}, push: {enabled: false}}\n")
    cfg = _real(config(tmp_path, [{"name": "app", "pipeline": ".runner.yaml", "repo": str(bare),
                                   "servers": ["10.0.0.1"], "secrets": {"token": {"env": "HOME"}},
                                   "concurrency_group": None}]))

    def run_of(sha: str, delivery: str, ref: str = "refs/heads/main") -> dict:
        r = send_github(d.url, push_payload(str(bare), ref=ref, after=sha), delivery)
        assert r.status_code == 202, r.text
        return _final(d, r.json()["runs"][0])

    with daemon_in_process(cfg) as d:
        good = _push_file(work, {".runner.yaml": checkout_only}, "pipeline in the repository")
        run = run_of(good, "repo-1")
        assert run["status"] == "success", (run, d.store.logs(run["id"]))
        stages = {s["name"]: s for s in d.store.stages(run["id"])}
        # Built from the entry's repository, not the file's repository.url.
        assert stages["checkout"]["outputs"]["commit"] == good and str(bare) in stages["checkout"]["outputs"]["url"]

        broken = _push_file(work, {".runner.yaml": checkout_only.replace("image:", "imagez:")
                                   + "stages_typo: 1\n"}, "break the pipeline")
        bad = run_of(broken, "repo-2")
        where = f".runner.yaml@{broken[:12]}"
        assert bad["status"] == "invalid", bad
        assert f"{where}:4:1" in bad["reason"] and f"{where}:6:1" in bad["reason"], bad["reason"]
        assert d.store.stages(bad["id"]) == []  # nothing ran, not even the checkout
        assert any(f"{where}:4:1" in x["line"] for x in d.store.logs(bad["id"]))  # `runner logs`

        fixed = _push_file(work, {".runner.yaml": checkout_only}, "fix the pipeline")
        assert run_of(fixed, "repo-3")["status"] == "success"

        wider = checkout_only + ("secrets: {token: {env: TOKEN}, stolen: {file: /etc/shadow}}\n"
                                 "stages:\n  build: {enabled: false}\n  push: {enabled: false}\n"
                                 "  deploy: {servers: [10.0.0.1, root@10.6.6.6]}\n")
        wider = wider.replace("stages: {build: {enabled: false}, push: {enabled: false}}\n", "")
        branch = _push_file(work, {".runner.yaml": wider}, "deploy elsewhere", branch="feature")
        refused = run_of(branch, "repo-4", ref="refs/heads/feature")
        assert refused["status"] == "invalid", refused
        assert "secret 'stolen' is not granted" in refused["reason"], refused["reason"]
        assert "server '10.6.6.6' is not one this pipeline may deploy to" in refused["reason"]
        assert f".runner.yaml@{branch[:12]}:9:" in refused["reason"]
        assert "10.0.0.1'" not in refused["reason"]  # the allowed server is not a problem
        assert d.store.stages(refused["id"]) == []

        # main keeps its own pipeline: its next commit runs as before.
        later = _push_file(work, {"file.txt": "main moves on\n"}, "main moves on")
        assert run_of(later, "repo-5")["status"] == "success"


def test_a_private_https_repository_s_pipeline_is_read_built_and_polled_with_the_entry_s_token(
        tmp_path, http_origin, monkeypatch):  # noqa: F811
    """`pipeline:` with `token:` (a secret of the entry's `secrets:`), against `git http-backend`
    behind Basic auth: the poll, the read of .runner.yaml at the commit and the checkout all
    authenticate, a fork's pull request's too (it gets no secret, git still gets the entry's
    credential), and the token is nowhere the daemon writes (store, logs, work directories)."""
    monkeypatch.setenv("REPO_PIPELINE_GIT_TOKEN", CHECKOUT_TOKEN)
    sha = http_origin.commit(".runner.yaml", "version: 1\nname: private\nrepository: {url: /elsewhere}\n"
                             "image: {name: localhost/test/app}\n"
                             "stages: {build: {enabled: false}, push: {enabled: false}}\n")
    cfg = _real(config(tmp_path, [{
        "name": "app", "pipeline": ".runner.yaml", "repo": http_origin.url, "token": "git",
        "secrets": {"git": {"env": "REPO_PIPELINE_GIT_TOKEN"}},
        "triggers": {"poll": {"interval": 0.5, "initial": "run"}, "pull_request": {}}}]))
    with daemon_in_process(cfg) as d:
        runs = wait_for(lambda: d.store.list_runs(trigger="poll"), 15, "the first poll to queue a run")
        run = _final(d, runs[0]["id"])
        assert run["status"] == "success", (run, d.store.logs(run["id"]))
        checkout = {s["name"]: s for s in d.store.stages(run["id"])}["checkout"]["outputs"]
        assert checkout["commit"] == sha and checkout["url"] == http_origin.url
        logs = "\n".join(x["line"] for x in d.store.logs(run["id"]))
        # A fork's pull request gets no secret, but git still reads the repository with the
        # entry's token: its file at the head commit, and refs/pull/1/head for the checkout.
        (http_origin.work / "fix.txt").write_text("a fork's change\n")
        checkout_git("add", "fix.txt", cwd=http_origin.work)
        checkout_git("commit", "-q", "-m", "fix", cwd=http_origin.work)  # no branch: the poll sees nothing
        checkout_git("push", "-q", "origin", "HEAD:refs/pull/1/head", cwd=http_origin.work)
        head = checkout_git("rev-parse", "HEAD", cwd=http_origin.work)
        pr = json.loads((Path(__file__).resolve().parents[1] / "data" / "events" / "github_pull_request.json")
                        .read_text())
        pr["repository"]["clone_url"] = http_origin.url
        pr["number"] = pr["pull_request"]["number"] = 1
        pr["pull_request"]["head"]["sha"], pr["pull_request"]["base"]["ref"] = head, "main"
        r = send_github(d.url, pr, "private-pr-1", event="pull_request")
        assert r.status_code == 202 and "from a fork: secrets withheld" in r.text, r.text
        fork = _final(d, r.json()["runs"][0])
        assert fork["status"] == "success", (fork, d.store.logs(fork["id"]))
        checkout = {s["name"]: s for s in d.store.stages(fork["id"])}["checkout"]["outputs"]
        assert checkout["commit"] == head
        assert json.loads((d.work_dir / "runs" / str(fork["id"]) / "run.json").read_text())["secrets_withheld"]
        logs += "\n".join(x["line"] for x in d.store.logs(fork["id"]))
        (listed,) = api_get(d.url, "/api/pipelines").json()["pipelines"]
        assert (listed["file"], listed["pipeline"], listed["repo"]) == (None, ".runner.yaml", http_origin.url)
    assert any(a.startswith("Basic ") for a in http_origin.handler.seen_auth)
    assert CHECKOUT_TOKEN not in logs and CHECKOUT_TOKEN not in json.dumps(run)
    for path in tmp_path.rglob("*"):  # the store, the run's logs and run.json, the caches
        if path.is_file() and "served" not in path.parts:
            assert CHECKOUT_TOKEN.encode() not in path.read_bytes(), path


def test_daemon_check_reads_a_repository_s_pipeline_at_its_default_branch_s_head(tmp_path):
    """`runner daemon --check`: a `pipeline:` entry is read and validated at the head of its
    default branch (problems at .runner.yaml@COMMIT:line:column, exit 2); a repository it cannot
    read is a warning saying why, not a refusal."""
    import subprocess

    bare, work = bare_repo(tmp_path)
    good = _push_file(work, {".runner.yaml": "version: 1\nname: app\nrepository: {url: .}\n"
                             "image: {name: localhost/test/app}\n"}, "pipeline")
    cfg = config(tmp_path, [
        {"name": "app", "pipeline": ".runner.yaml", "repo": str(bare)},
        {"name": "gone", "pipeline": ".runner.yaml", "repo": str(tmp_path / "nowhere.git")}])
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "runner", "daemon", "--config", str(path), "--check"],
                              capture_output=True, text=True, timeout=60)

    ok = check()
    assert ok.returncode == 0 and "ok (2 pipeline(s)" in ok.stdout, ok
    assert f"{path}:" in ok.stderr and "warning: pipelines[1].pipeline: cannot check .runner.yaml at the " \
        "head of main" in ok.stderr, ok.stderr
    assert good[:12] not in ok.stderr
    broken = _push_file(work, {".runner.yaml": "version: 1\nname: app\nrepository: {url: .}\n"
                               "imagez: {name: localhost/test/app}\n"}, "break it")
    bad = check()
    assert bad.returncode == 2, bad
    assert f".runner.yaml@{broken[:12]}:4:1: error:" in bad.stderr, bad.stderr
    assert "2 problem(s); the daemon would not start" in bad.stderr  # the warning is not one
