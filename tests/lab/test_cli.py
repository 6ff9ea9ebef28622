"""The CLI's contract on bad input: exit 2, file:line:column, nothing executed."""
from __future__ import annotations

import subprocess
import traceback
from pathlib import Path

from click.testing import CliRunner

from runner.cli.main import cli
from tests.helpers import ROOT, events, make_repo, runner, stage_end


def runner_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line run in this process by click's test runner, answered like `runner`'s:
    these refusals (and the dry run) come before a run starts, and a `runner` process per case
    costs most of a second. The runs that check out stay real processes, and so does the
    refused shell-like ref: what a shell it reached would print goes to the process's stdout."""
    r = CliRunner().invoke(cli, list(args), env=env)
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, err)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


def test_validate_accepts_the_example_pipeline():
    proc = runner_here("validate", str(ROOT / "pipeline.example.yaml"), env={
        "REGISTRY": "127.0.0.1:5000", "DEPLOY_HOSTS": "root@10.0.0.1:22,deploy@10.0.0.2",
        "SSH_KEY_FILE": "/nonexistent/key", "KNOWN_HOSTS_FILE": "/nonexistent/known_hosts"})
    assert proc.returncode == 0, proc.stderr
    # Every stage the example runs, in the order it runs them (the test stage was left out).
    assert "stages: checkout, build, test, scan, push, deploy" in proc.stdout, proc.stdout


def test_bad_yaml_names_file_line_and_column(tmp_path):
    p = _write(tmp_path, "name: x\nrepository:\n  url: .\n  ref: [unclosed\n")
    proc = runner_here("exec", str(p))
    assert proc.returncode == 2
    assert f"{p}:4:" in proc.stderr or f"{p}:5:" in proc.stderr, proc.stderr


def test_unknown_key_and_undefined_variable_are_both_reported(tmp_path):
    p = _write(tmp_path, "name: x\nrepository: {url: .}\nimage:\n  name: ${NOPE_NOT_SET}/a\n"
                         "stages:\n  build:\n    contxt: .\n")
    proc = runner_here("validate", str(p))
    assert proc.returncode == 2
    assert f"{p}:4:" in proc.stderr and "NOPE_NOT_SET" in proc.stderr
    assert f"{p}:7:5" in proc.stderr and "contxt" in proc.stderr


def test_option_like_repository_url_is_invalid_input_for_validate_and_exec(tmp_path):
    """Not a relative path to resolve: git would read it as an option."""
    p = _write(tmp_path, 'name: x\nrepository:\n  url: "-oProxyCommand=x"\n'
                         "image: {name: 127.0.0.1:5000/x}\n")
    for argv in (("validate", str(p)), ("exec", str(p), "--dry-run")):
        proc = runner_here(*argv)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"{p}:3:8: error: repository.url:" in proc.stderr
        assert "git would read as an option" in proc.stderr


def test_json_output_reports_invalid_input(tmp_path):
    p = _write(tmp_path, "name: x\n")
    proc = runner_here("exec", str(p), "--json")
    assert proc.returncode == 2
    (end,) = events(proc.stdout)
    assert end["status"] == "invalid" and end["problems"]


def test_ext_transport_url_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    p = _write(tmp_path, "name: x\nrepository: {url: .}\nimage: {name: 127.0.0.1:5000/x}\n")
    proc = runner_here("exec", str(p), "--repo", f"ext::sh -c touch% {target}",
                       "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2, proc.stderr
    assert not target.exists()
    assert not (tmp_path / "d").exists()  # refused before any side effect


def test_shell_metacharacter_ref_is_refused(tmp_path):
    repo = make_repo(tmp_path / "r", {"a": "b"})
    p = _write(tmp_path, f"name: x\nrepository: {{url: {repo}}}\nimage: {{name: 127.0.0.1:5000/x}}\n")
    proc = runner("exec", str(p), "--ref", 'zzz";echo${IFS}"hello";#', "--data-dir",
                  str(tmp_path / "d"))
    assert proc.returncode == 2
    assert "hello\n" not in proc.stdout
    assert not (tmp_path / "d").exists()


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    repo = make_repo(tmp_path / "r", {"Dockerfile": "FROM scratch\n"})
    p = _write(tmp_path, f"name: x\nrepository: {{url: {repo}}}\nimage: {{name: 127.0.0.1:5000/x}}\n")
    proc = runner_here("exec", str(p), "--dry-run", "--json", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    (plan,) = events(proc.stdout)
    assert [s["name"] for s in plan["stages"]] == ["checkout", "build", "push"]
    assert not (tmp_path / "d").exists()


def test_only_a_stage_without_its_input_is_invalid(tmp_path):
    p = _write(tmp_path, "name: x\nrepository: {url: .}\nimage: {name: 127.0.0.1:5000/x}\n")
    proc = runner_here("exec", str(p), "--only", "push")
    assert proc.returncode == 2
    assert "needs the output of 'build'" in proc.stderr


def test_event_replay_checks_out_the_pushed_commit(tmp_path):
    """A stored GitHub push payload drives the same engine: the exact commit pushed is built,
    even when the branch has moved on since."""
    import json

    from tests.helpers import commit_files

    repo = make_repo(tmp_path / "r", {"a": "1"}, branch="feature")
    pushed = commit_files(repo, {"a": "2"}, "pushed")
    commit_files(repo, {"a": "3"}, "later")
    event = json.loads((Path(__file__).resolve().parents[1] / "data/events/github_push.json").read_text())
    event.update(ref="refs/heads/feature", after=pushed)
    (tmp_path / "event.json").write_text(json.dumps(event))
    p = _write(tmp_path, f"name: x\nrepository: {{url: {repo}}}\nimage: {{name: 127.0.0.1:5000/x}}\n")
    proc = runner("exec", str(p), "--only", "checkout", "--json", "--event",
                  str(tmp_path / "event.json"), "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evs = events(proc.stdout)
    assert evs[0]["trigger"]["provider"] == "github"
    out = stage_end(evs, "checkout")["outputs"]
    assert (out["commit"], out["branch"]) == (pushed, "feature")
    assert (Path(out["path"]) / "a").read_text() == "2"


def test_event_that_deletes_a_branch_is_invalid(tmp_path):
    p = _write(tmp_path, "name: x\nrepository: {url: .}\nimage: {name: 127.0.0.1:5000/x}\n")
    proc = runner_here("exec", str(p), "--event",
                       str(Path(__file__).resolve().parents[1] / "data/events/github_delete.json"))
    assert proc.returncode == 2
    assert "nothing to build" in proc.stderr


def test_verbose_and_quiet_exclude_each_other(tmp_path):
    p = _write(tmp_path, "name: x\nrepository: {url: .}\nimage: {name: 127.0.0.1:5000/x}\n")
    proc = runner_here("exec", str(p), "-v", "-q", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2
    assert "-v/--verbose and -q/--quiet exclude each other" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_tool_output_is_in_the_log_and_shown_with_verbose(tmp_path):
    """git's own lines are the checkout's log file's; the terminal shows them with -v only."""
    repo = make_repo(tmp_path / "r", {"a": "b"})
    p = _write(tmp_path, f"name: x\nrepository: {{url: {repo}}}\nimage: {{name: 127.0.0.1:5000/x}}\n")
    for run_id, flags in (("plain", ()), ("verbose", ("-v",))):
        proc = runner("exec", str(p), "--only", "checkout", "--run-id", run_id, *flags,
                      "--data-dir", str(tmp_path / "d"))
        assert proc.returncode == 0, proc.stderr
        log = (tmp_path / "d" / "runs" / run_id / "logs" / "checkout.log").read_text()
        assert "HEAD is now at" in log and "checked out" in log
        assert "  [checkout] checked out " in proc.stderr
        assert ("HEAD is now at" in proc.stderr) == bool(flags), proc.stderr
