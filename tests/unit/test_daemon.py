"""Pure parts of the daemon, by equality: argv, exit codes, ls-remote parsing, config problems,
commit status requests; plus commit status and masking through a running daemon."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import (HERE, SECRET, TOKEN, config, daemon_in_process, fake_forge, fake_pipeline,  # noqa: E402
                     push_payload, send_github, wait_for)

from runner.daemon.config import check_config, config_from_dict, load_config  # noqa: E402
from runner.daemon.scheduler import ls_remote_argv, parse_ls_remote, poll_decisions  # noqa: E402
from runner.daemon.status import status_request  # noqa: E402
from runner.daemon.service import check_rollback_target  # noqa: E402
from runner.daemon.worker import exec_argv, rollback_argv, status_from_exit  # noqa: E402
from runner.errors import InvalidInput  # noqa: E402

REPO = "https://git.example.com/me/app.git"


def test_exec_argv():
    # Every run gets its request (never a forge's payload, never a bare --ref).
    assert exec_argv(["python", "-m", "runner", "exec"], "/p.yaml", 7, Path("/d"), Path("/r.json"),
                     {"B": "2", "A": "1"}) == [
        "python", "-m", "runner", "exec", "/p.yaml", "--json", "--run-id", "7", "--data-dir", "/d",
        "--request", "/r.json", "--var", "A=1", "--var", "B=2"]
    assert exec_argv(["x"], "/p.yaml", 8, Path("/d"), Path("/r.json"), {}, withhold_secrets=True,
                     skip_stages=("push", "deploy")) == [
        "x", "/p.yaml", "--json", "--run-id", "8", "--data-dir", "/d", "--request", "/r.json",
        "--withhold-secrets", "--skip", "push", "--skip", "deploy"]


@pytest.mark.parametrize("code,cancel,reported,status", [
    (0, False, "success", "success"), (1, False, "failed", "failed"), (2, False, "invalid", "invalid"),
    (130, False, "cancelled", "cancelled"), (130, True, None, "cancelled"), (-9, True, None, "cancelled"),
    (-9, False, None, "failed"), (3, False, None, "failed"),
])
def test_status_from_exit(code, cancel, reported, status):
    assert status_from_exit(code, cancel, reported) == status


def test_ls_remote_parsing_and_argv():
    text = ("1111111111111111111111111111111111111111\trefs/heads/main\n"
            "2222222222222222222222222222222222222222\trefs/tags/v1\n"
            "3333333333333333333333333333333333333333\trefs/tags/v1^{}\n"
            "4444444444444444444444444444444444444444\trefs/heads/zzz\";echo${IFS}hi;#\n")
    assert parse_ls_remote(text) == {"refs/heads/main": "1" * 40, "refs/tags/v1": "3" * 40}
    assert ls_remote_argv("/srv/app.git")[-3:] == ["/srv/app.git", "refs/heads/*", "refs/tags/*"]
    with pytest.raises(InvalidInput):
        ls_remote_argv("--upload-pack=touch /tmp/x")
    with pytest.raises(InvalidInput):
        ls_remote_argv("ext::sh -c touch% /tmp/pwned")


def test_poll_decisions():
    p = config_from_dict({"pipelines": [{"name": "a", "file": "f", "triggers": {
        "push": {"branches": ["main"], "tags": ["v*"]}, "poll": {"initial": "skip"}}}]}).pipelines[0]
    current = {"refs/heads/main": "2" * 40, "refs/heads/dev": "3" * 40, "refs/tags/v1": "4" * 40}
    # initial: skip: the heads are remembered, and the poll says why nothing ran.
    assert poll_decisions(p, {}, True, current) == ([], [
        "refs/heads/dev: branch 'dev' matches none of triggers.push.branches ['main']",
        "refs/heads/main: 222222222222 was there at the first poll (triggers.poll.initial: skip)",
        "refs/tags/v1: 444444444444 was there at the first poll (triggers.poll.initial: skip)"])
    assert poll_decisions(p, {"refs/heads/main": "1" * 40}, False, current) == ([
        ("refs/heads/main", "main", None, "1" * 40, "2" * 40), ("refs/tags/v1", None, "v1", None, "4" * 40)],
        ["refs/heads/dev: branch 'dev' matches none of triggers.push.branches ['main']"])
    # Refs that did not move say nothing; a deleted one and a tag the filter refuses do.
    moved = {"refs/heads/main": "2" * 40, "refs/tags/x1": "5" * 40}
    assert poll_decisions(p, {**current, "refs/heads/gone": "6" * 40}, False, moved) == ([], [
        "refs/heads/dev: branch 'dev' matches none of triggers.push.branches ['main']",  # deleted, filtered
        "refs/heads/gone: branch 'gone' matches none of triggers.push.branches ['main']",
        "refs/tags/v1: deleted (was 444444444444)",
        "refs/tags/x1: tag 'x1' matches none of triggers.push.tags ['v*']"])
    assert poll_decisions(p, current, False, current) == ([], [])


def test_poll_about_names_the_repository_and_the_refs_that_moved():
    from runner.daemon.scheduler import poll_about
    from runner.daemon.store import DeliveryAbout

    a, b = "a" * 40, "b" * 40
    assert poll_about("/srv/app.git", {}, {"refs/heads/main": a}) == \
        DeliveryAbout("/srv/app.git", "refs/heads/main", "created")
    assert poll_about("r", {"refs/heads/main": a}, {"refs/heads/main": b}) == DeliveryAbout("r", "refs/heads/main")
    assert poll_about("r", {"refs/heads/x": a}, {}) == DeliveryAbout("r", "refs/heads/x", "deleted")
    moved = {f"refs/tags/v{i}": a for i in range(5)}
    assert poll_about("r", {"refs/heads/main": a}, {"refs/heads/main": a, **moved}) == \
        DeliveryAbout("r", "refs/tags/v0, refs/tags/v1, refs/tags/v2 and 2 more")


def test_rollback_argv():
    assert rollback_argv(["python", "-m", "runner"], "/p.yaml", 7, None, {}) == [
        "python", "-m", "runner", "rollback", "/p.yaml", "--json", "--run-id", "7"]
    assert rollback_argv(["python", "-m", "runner"], "/p.yaml", 8, "sha256:" + "a" * 64, {"B": "2", "A": "1"}) == [
        "python", "-m", "runner", "rollback", "/p.yaml", "--json", "--run-id", "8", "--to", "sha256:" + "a" * 64,
        "--var", "A=1", "--var", "B=2"]


@pytest.mark.parametrize("to,expected", [
    (None, None), ("0", "0"), ("12", "12"), (" 1 ", "1"), ("abcdef0", "abcdef0"), ("ABCDEF0", "abcdef0"),
    ("sha256:" + "b" * 64, "sha256:" + "b" * 64), ("c" * 40, "c" * 40), ("d" * 64, "d" * 64),
])
def test_rollback_target_accepted(to, expected):
    assert check_rollback_target(to) == expected


@pytest.mark.parametrize("to", ["", "-1", "1000", "abc12", "sha256:abc", "sha256:" + "b" * 63, "e" * 65,
                                "--upload-pack=x", "main", "v1.2", "0 1"])
def test_rollback_target_refused(to):
    with pytest.raises(InvalidInput, match="is not a position"):
        check_rollback_target(to)


def test_config_reports_every_problem_at_once(tmp_path):
    f = tmp_path / "daemon.yaml"
    f.write_text("concurrency: -1\nlisten: {port: 99999}\npipelines:\n"
                 "  - {name: A!, file: x}\n  - {name: b, file: y, triggers: {cron: ['not cron']}}\n")
    with pytest.raises(InvalidInput) as e:
        load_config(f)
    text = str(e.value)
    for where in (f"{f}:1:14: error: concurrency: expected a whole number of at least 0, got the number -1",
                  f"{f}:2:16: error: listen.port: expected a whole number from 0 to 65535",
                  f"{f}:4:12: error: pipelines[0].name: expected a string matching",
                  f"{f}:5:42: error: pipelines[1].triggers.cron[0]: not a crontab expression"):
        assert where in text, text
    f.write_text("pipelines: [{name: a, file: x}, {name: a, file: y}]\n")
    with pytest.raises(InvalidInput, match="unique"):
        load_config(f)


def test_example_config_is_valid(monkeypatch):
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "x" * 20)
    monkeypatch.setenv("RUNNER_TOKEN", "y" * 20)
    cfg = load_config(Path(__file__).resolve().parents[2] / "daemon.example.yaml")
    assert [p.name for p in cfg.pipelines] == ["example", "from-repo"]
    assert cfg.pipelines[0].triggers.poll is not None
    assert (cfg.pipelines[1].pipeline, cfg.pipelines[1].file) == (".runner.yaml", None)


def test_status_request():
    cfg = config_from_dict({"pipelines": [{"name": "a", "file": "f", "commit_status": {
        "provider": "gitea", "api_url": "https://git.example/api/v1/", "repo": "me/app",
        "token": {"value": "t0ken-value"}, "target_url": "https://ci.example/runs/{run_id}"}}]}).pipelines[0]
    url, headers, body = status_request(cfg.commit_status, "t0ken-value", "a", 5, "a" * 40, "failed",
                                        "stage 'build' failed: exit 3\nmore")
    assert url == "https://git.example/api/v1/repos/me/app/statuses/" + "a" * 40
    assert headers["Authorization"] == "token t0ken-value"
    assert body == {"state": "failure", "context": "runner/a", "description": "failed: stage 'build' failed: exit 3",
                    "target_url": "https://ci.example/runs/5"}


def test_commit_status_and_masking_through_the_daemon(tmp_path):
    with fake_forge() as (forge_url, seen):
        pf = fake_pipeline(tmp_path, fail="build")
        cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO,
                                 "vars": {"FAKE_ECHO": f"token={TOKEN} secret={SECRET}"},
                                 "commit_status": {"api_url": forge_url,
                                                   "repo": "me/app", "token": {"value": "forge-token-123"}}}])
        with daemon_in_process(cfg) as d:
            rid = send_github(d.url, push_payload(REPO, after="c" * 40), "st-1").json()["runs"][0]
            wait_for(lambda: len(seen) >= 2, 15, "two status reports")
            run = d.store.get_run(rid)
            assert run["status"] == "failed"
            lines = [x["line"] for x in d.store.logs(rid)]
        (p1, auth, pending), (p2, _, final) = seen[:2]
        assert p1 == p2 == "/repos/me/app/statuses/" + "c" * 40
        assert auth == "Bearer forge-token-123"
        assert pending["state"] == "pending" and final["state"] == "failure"
        assert final["context"] == "runner/app"
        echoed = [x for x in lines if "echo:" in x]
        assert len(echoed) == 4  # a stage.log line and a stderr line, in two stages
        assert all(TOKEN not in x and SECRET not in x and "***" in x for x in echoed), echoed


def test_stop_orphan_leaves_a_reused_pid_alone():
    import os
    import subprocess as sp

    from runner.daemon.worker import proc_start, stop_orphan
    child = sp.Popen(["sleep", "30"], start_new_session=True)
    try:
        started = proc_start(child.pid)
        assert started and started.isdigit()
        assert stop_orphan(child.pid, str(int(started) + 1), wait=0.1) is False  # not the same process
        assert child.poll() is None
        assert stop_orphan(child.pid, started, wait=2) is True
        assert child.wait(timeout=5) != 0
    finally:
        if child.poll() is None:
            os.killpg(child.pid, 9)
            child.wait()


def _check(path: Path, env: dict | None = None):
    """`runner daemon --check`, with exactly the CHECK_* variables given."""
    import subprocess
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHECK_")}
    return subprocess.run([sys.executable, "-m", "runner", "daemon", "--config", str(path), "--check"],
                          capture_output=True, text=True, timeout=60, env={**base, **(env or {})},
                          cwd=HERE.parent.parent.parent)


def test_daemon_check_on_a_good_and_a_bad_config(tmp_path):
    root = HERE.parent.parent.parent
    good = tmp_path / "good.yaml"
    good.write_text(f"""\
name: one
data_dir: {tmp_path / 'data'}
api_token: {{env: CHECK_TOKEN}}
webhooks:
  github: {{secret: {{env: CHECK_HOOK}}}}
pipelines:
  - name: example
    file: {root / 'pipeline.example.yaml'}
    repo: https://github.com/me/app.git
    vars: {{REGISTRY: r.example:5000, DEPLOY_HOSTS: "deploy@h:22", SSH_KEY_FILE: /k, KNOWN_HOSTS_FILE: /kh}}
""")
    ok = _check(good, {"CHECK_TOKEN": "t", "CHECK_HOOK": "h"})
    assert ok.returncode == 0, ok.stderr
    assert "ok (1 pipeline(s): example)" in ok.stdout
    # What an entry without triggers: builds, said for it.
    assert "  example: push to branches *, no tags (no triggers: the default)" in ok.stdout
    assert not (tmp_path / "data").exists()  # a check starts and writes nothing

    # The same file without its secrets in the environment, then a broken one.
    unset = _check(good)
    assert unset.returncode == 2
    assert f"{good}:3:1: error: api_token: environment variable CHECK_TOKEN is not set" in unset.stderr, unset.stderr
    assert f"{good}:5:12: error: webhooks.github.secret:" in unset.stderr and "CHECK_HOOK" in unset.stderr

    bad_pipeline = tmp_path / "bad-pipeline.yaml"
    bad_pipeline.write_text("version: 1\nname: bad\nrepository: {url: .}\nstages:\n  biuld: {}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""\
name: two
pipelines:
  - name: gone
    file: {tmp_path / 'missing.yaml'}
  - name: broken
    file: {bad_pipeline}
""")
    out = _check(bad)
    assert out.returncode == 2, out.stderr
    assert f"{bad}:4:5: error: pipelines[0].file: no such pipeline file: {tmp_path / 'missing.yaml'}" in out.stderr
    # The pipeline file's own problems, every one, located in that file.
    assert f"{bad_pipeline}:5:3: error: stages.biuld: unknown key 'biuld' (did you mean 'build'?)" in out.stderr
    assert f"{bad_pipeline}:1:1: error: image: missing required field 'image'" in out.stderr
    assert "3 problem(s); the daemon would not start" in out.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: three\nconcurrencyy: 2\n")
    out = _check(typo)
    assert out.returncode == 2 and f"{typo}:2:1: error: concurrencyy:" in out.stderr, out.stderr


def test_daemon_check_reads_the_pipelines_secrets_and_their_vars(tmp_path):
    """--check reads every secret an entry's pipeline names (an unreadable one said at the
    pipeline's line, not "ok"), and refuses a vars name the file never uses, at its key."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nname: app\nrepository: {url: .}\nimage: {name: r/app}\n"
                        "secrets:\n  api: {file: missing-token}\nstages:\n  deploy:\n"
                        "    servers: ['${HOST}']\n")
    f = tmp_path / "daemon.yaml"
    f.write_text(f"pipelines:\n  - name: app\n    file: {pipeline}\n"
                 f"    vars:\n      HOST: deploy@h\n      HOTS: deploy@h2\n")
    cfg, problems = check_config(f)
    assert cfg is not None
    said = [str(p) for p in problems]
    assert said == [
        f"{f}:6:7: error: pipelines[0].vars.HOTS: vars: 'HOTS' is not used by {pipeline} (no "
        f"${{HOTS}} in it) (did you mean 'HOST'?)",
        f"{pipeline}:6:3: error: secrets.api: secret 'api': cannot read {tmp_path / 'missing-token'}: "
        f"No such file or directory"], said
    (tmp_path / "missing-token").write_text("a-long-token\n")
    f.write_text(f"pipelines:\n  - name: app\n    file: {pipeline}\n    vars: {{HOST: deploy@h}}\n")
    assert check_config(f)[1] == []


def test_daemon_config_speaks_the_pipelines_words(tmp_path):
    """Every problem of the config at once, at its line and column, in the words of the
    pipeline's loader: no "Input should be a valid tuple", "Extra inputs are not permitted"."""
    f = tmp_path / "daemon.yaml"
    f.write_text("listen: {port: 8080, hots: x}\nwebhooks:\n  githbu: {secret: x}\npipelines:\n"
                 "  - name: app\n    file: p.yaml\n    trigger: {}\n    triggers:\n"
                 "      push: {branches: main}\n      poll: 60\n")
    with pytest.raises(InvalidInput) as e:
        load_config(f)
    said = [str(p) for p in e.value.problems]
    assert said == [
        f"{f}:1:22: error: listen.hots: unknown key 'hots' (did you mean 'host'?); listen takes: "
        f"host, port, idle_timeout, read_timeout",
        f"{f}:3:11: error: webhooks.githbu: expected one of github, gitea, gitlab or generic, got "
        f"the string 'githbu' (did you mean 'github'?)",
        f"{f}:7:5: error: pipelines[0].trigger: unknown key 'trigger' (did you mean 'triggers'?); "
        f"pipelines[0] takes: name, file, pipeline, repo, servers, secrets, token, token_user, "
        f"ssh_key, triggers, concurrency, concurrency_group, cancel_in_progress, "
        f"requeue_on_interrupt, webhook_secret, commit_status, vars, destination",
        f"{f}:9:24: error: pipelines[0].triggers.push.branches: expected a list of strings, got "
        f"the string 'main' (write [main])",
        f"{f}:10:13: error: pipelines[0].triggers.poll: expected a mapping {{interval?, "
        f"initial?}}, got the number 60"], said
    f.write_text("")  # an empty file: every default
    assert load_config(f).pipelines == ()
    f.write_text("- a\n")
    with pytest.raises(InvalidInput) as e:
        load_config(f)
    assert [str(p) for p in e.value.problems] == [
        f"{f}:1:1: error: the daemon config must be a mapping (listen:, data_dir:, pipelines:, "
        f"...), got a list"]
