"""`runner exec` when things around it go wrong, with real processes, pipes and signals.

- its stdout reader goes away (`| head -1`; a daemon that died): the run, its logs and run.json
  go on as if it were still read, and the exit code is the pipeline's;
- it is interrupted (SIGINT by pid; the daemon's PR_SET_PDEATHSIG when the daemon is SIGKILLed):
  the running stage is cancelled, run.json says so, exit 130;
- a bad --run-id is refused before anything is written;
- --skip and --only leave stages out and say so (`skipped`, with the reason), and a skipped
  push / deploy touches nothing;
- --withhold-secrets: no secret value at all; a stage that needs one fails, saying which;
- on the lab, a real checkout, build and scan (tests/data/output/pipeline.yaml): what the
  terminal shows (the build collapsed, Trivy's fallback as information, -v for every line), and
  that stdout at /dev/full, `--json | head -1`, stderr closed or full, a terminal closed mid-build
  and a daemon whose own output fails leave the exit code the pipeline's and the stage logs,
  events.jsonl and run.json complete and in agreement.

A checkout over a local repository is fast; to catch a run in the middle of a stage, the test
holds the mirror's lock (the same fcntl lock a concurrent run would hold), so that the checkout
waits for it, says so on stdout, and polls for cancellation meanwhile.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from pipelines.checkout import mirror_key
from runner import engine
from runner.cli.main import cli
from runner.errors import InvalidInput
from runner.model import Image, Pipeline, Repository
from tests.helpers import ROOT, events, make_repo, runner, stage_end

WAITING = "waiting for another run using the same mirror"
WITHHELD = ("is withheld from this run (--withhold-secrets: a pull request from a fork gets no "
            "secrets)")


# --- helpers ----------------------------------------------------------------------------------

def _setup(tmp_path: Path, extra: str = "", registry: str = "127.0.0.1:9",
           name: str = "t") -> tuple[Path, Path]:
    repo = make_repo(tmp_path / "repo", {"Dockerfile": "FROM local/busybox:1\n", "a.txt": "a\n"})
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"name: t\nrepository: {{url: {repo}}}\n"
                 f"image: {{name: \"{registry}/test/{name}\"}}\n{extra}")
    return repo, p


def _unique(tmp_path: Path, prefix: str) -> str:
    return f"{prefix}-{tmp_path.name[-12:].lower().replace('_', '-')}"


@contextlib.contextmanager
def _mirror_locked(data_dir: Path, url: str):
    """Hold the checkout's lock on the mirror of `url`, as a concurrent run would."""
    root = data_dir / "cache" / "git"
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f"{mirror_key(url)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _exec_argv(p: Path, data_dir: Path, run_id: str, *extra: str,
               as_json: bool = True) -> list[str]:
    return [sys.executable, "-m", "runner", "exec", str(p), *(["--json"] if as_json else []),
            "--only", "checkout", "--run-id", run_id, "--data-dir", str(data_dir), *extra]


def _read_until(fd: int, text: str, timeout: float = 30) -> str:
    """Read from a raw pipe until `text` shows up; return what was read."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never came; got:\n{seen.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {text!r}; got:\n{seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode()


def _record(data_dir: Path, run_id: str) -> tuple[dict, list[dict]]:
    """run.json and the events written to disk, which must agree with each other."""
    run_dir = data_dir / "runs" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    evs = [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text()
           .splitlines()]
    end = [e for e in evs if e["event"] == "run.end"]
    assert len(end) == 1 and evs[-1] is end[0], [e["event"] for e in evs]
    assert (end[0]["status"], end[0]["exit_code"]) == (record["status"], record["exit_code"])
    assert [(s["name"], s["status"]) for s in end[0]["stages"]] == \
        [(s["name"], s["status"]) for s in record["stages"]]
    ends = [(e["stage"], e["status"]) for e in evs if e["event"] == "stage.end"]
    assert ends == [(s["name"], s["status"]) for s in record["stages"]]
    return record, evs


def _stages(record: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in record["stages"]}


# --- the reader of stdout goes away -------------------------------------------------------------

def test_head_1_on_json_output_lets_the_run_complete(tmp_path):
    """`runner exec --json pipeline | head -1`: head reads run.start and exits; the run then
    writes into a pipe nobody reads, and must finish as if it were read."""
    repo, p = _setup(tmp_path)
    data = tmp_path / "data"
    with _mirror_locked(data, str(repo)):  # the run cannot finish before head has exited
        first = subprocess.Popen(_exec_argv(p, data, "head1"), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        head = subprocess.Popen(["head", "-1"], stdin=first.stdout, stdout=subprocess.PIPE)
        first.stdout.close()  # head holds the only read end now
        line, _ = head.communicate(timeout=30)
    _, err = first.communicate(timeout=60)
    assert json.loads(line)["event"] == "run.start"
    assert first.returncode == 0, err.decode()
    assert b"internal error" not in err and b"Traceback" not in err, err.decode()
    _completed(data, "head1", "the --json output (stdout)")


def test_closed_stderr_in_terminal_mode_lets_the_run_complete(tmp_path):
    """The same without --json: the terminal output goes to stderr, and `2>&1 | head -1`."""
    repo, p = _setup(tmp_path)
    data = tmp_path / "data"
    with _mirror_locked(data, str(repo)):
        first = subprocess.Popen(_exec_argv(p, data, "head2", as_json=False), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        head = subprocess.Popen(["head", "-1"], stdin=first.stderr, stdout=subprocess.PIPE)
        first.stderr.close()
        line, _ = head.communicate(timeout=30)
    first.wait(timeout=60)
    assert line.decode().startswith("run head2 pipeline t")
    assert first.returncode == 0
    _completed(data, "head2", "the terminal output (stderr)")


def _completed(data: Path, run_id: str, sink: str) -> None:
    record, evs = _record(data, run_id)
    assert record["status"] == "success" and record["exit_code"] == 0
    checkout = record["stages"][0]
    assert checkout["name"] == "checkout" and checkout["status"] == "success"
    assert checkout["outputs"]["commit"] and Path(checkout["outputs"]["path"], "a.txt").exists()
    assert any(f"{sink} failed (BrokenPipeError" in w for w in record["warnings"]), \
        record["warnings"]
    assert [e for e in evs if e["event"] == "sink.failed"]
    log = (data / "runs" / run_id / "logs" / "checkout.log").read_text()
    assert "checked out" in log  # the stage's log went on after the pipe closed


def test_closed_stdout_then_sigint_records_a_cancelled_run(tmp_path):
    repo, p = _setup(tmp_path)
    data = tmp_path / "data"
    with _mirror_locked(data, str(repo)):
        proc = subprocess.Popen(_exec_argv(p, data, "int1"), cwd=ROOT, bufsize=0,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _read_until(proc.stdout.fileno(), WAITING)
        proc.stdout.close()  # nobody reads the events any more
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err, err.decode()
    record, _ = _record(data, "int1")
    assert record["status"] == "cancelled" and record["exit_code"] == 130
    assert _stages(record)["checkout"] == "cancelled"
    assert "stage 'checkout' was" in record["error"]


def test_sigint_while_the_pipe_is_read_still_cancels(tmp_path):
    repo, p = _setup(tmp_path)
    data = tmp_path / "data"
    with _mirror_locked(data, str(repo)):
        proc = subprocess.Popen(_exec_argv(p, data, "int2"), cwd=ROOT, bufsize=0,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = _read_until(proc.stdout.fileno(), WAITING)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    evs = events(seen + out.decode())
    assert stage_end(evs, "checkout")["status"] == "cancelled"
    assert evs[-1]["event"] == "run.end" and evs[-1]["status"] == "cancelled"
    record, _ = _record(data, "int2")
    assert record["status"] == "cancelled"


# A stand-in for the daemon's worker: runs its argv as a child told to get SIGINT when this
# process dies (PR_SET_PDEATHSIG, as runner.daemon.worker does), with stdout and stderr piped
# to itself; prints the child's pid, then relays the child's stdout.
_FAKE_DAEMON = r"""
import ctypes, signal, subprocess, sys
prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, preexec_fn=lambda: prctl(1, int(signal.SIGINT)))
print(child.pid, flush=True)
for line in child.stdout:
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
"""
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper():
    """This process adopts orphaned descendants, so that the test can wait for the exit code of
    a run whose parent was killed."""
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    if prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        pytest.skip("PR_SET_CHILD_SUBREAPER is not available")
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0)


def _wait_pid(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the run (pid {pid}) did not exit within {timeout}s")


def test_daemon_killed_the_run_stops_cleanly_and_records_it(tmp_path, subreaper):
    """The daemon is SIGKILLed mid-stage: its child gets SIGINT (PR_SET_PDEATHSIG) and both of
    its pipes lose their reader. The run stops, and its record says `cancelled`."""
    repo, p = _setup(tmp_path)
    data = tmp_path / "data"
    with _mirror_locked(data, str(repo)):
        daemon = subprocess.Popen([sys.executable, "-c", _FAKE_DAEMON,
                                   *_exec_argv(p, data, "orphan")], cwd=ROOT, bufsize=0,
                                  stdout=subprocess.PIPE)
        fd = daemon.stdout.fileno()
        seen = _read_until(fd, "\n")
        pid = int(seen.split("\n", 1)[0])
        _read_until(fd, WAITING)
        daemon.kill()
        daemon.wait(timeout=10)
        daemon.stdout.close()
        code = _wait_pid(pid, 60)
    assert code == 130
    record, _ = _record(data, "orphan")
    assert record["status"] == "cancelled" and record["exit_code"] == 130
    assert _stages(record)["checkout"] == "cancelled"


# --- --run-id ---------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id", ["../../x", "..", ".", "a/b", "<absolute>", ".hidden", "a..b",
                                    "-x", "", "x" * 65, "a b", "a\nb", "ä"])
def test_bad_run_id_is_refused_before_anything_is_written(tmp_path, run_id):
    run_id = str(tmp_path / "x") if run_id == "<absolute>" else run_id  # stays in tmp_path
    _, p = _setup(tmp_path)
    data = tmp_path / "deep" / "er" / "data"
    # In this process (click's test runner), not a `runner` process per case: the refusal is
    # the command line's own, before the engine, and a process start costs most of a second.
    proc = CliRunner().invoke(cli, ["exec", str(p), "--json", "--only", "checkout",
                                    "--run-id", run_id, "--data-dir", str(data)])
    assert proc.exit_code == 2, proc.stdout + proc.stderr
    assert "Invalid value for '--run-id'" in proc.stderr
    assert "names the run's directory" in proc.stderr
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists()


def test_run_id_rules():
    for good in ("42", "20261201-120000-abcdef", "a.b_c-d", "x" * 64):
        assert engine.check_run_id(good) == good
    for bad in ("../x", "x/..", "a..b", ".x", "x\n", "x" * 65):
        with pytest.raises(InvalidInput):
            engine.check_run_id(bad)


def test_prepare_refuses_a_bad_run_id_too(tmp_path):
    _, p = _setup(tmp_path)
    with pytest.raises(InvalidInput, match="run id '../x' refused"):
        engine.prepare(p, engine.RunOptions(run_id="../x", data_dir=tmp_path / "d"))
    assert not (tmp_path / "d").exists()


# --- --skip / --only ------------------------------------------------------------------------

def _pipeline_model(**stages) -> Pipeline:
    return Pipeline.model_validate({"name": "t", "repository": Repository(url="/r"),
                                    "image": Image(name="r.example/t"), "stages": stages})


def test_skip_wins_over_only_and_every_left_out_stage_has_a_reason():
    p = _pipeline_model()  # checkout, build, push enabled
    assert engine.select_stages(p, ("checkout,build,push",), ("push",)) == ("checkout", "build")
    chosen = engine.select_stages(p, (), ("push", "deploy"))
    assert chosen == ("checkout", "build")
    assert engine.skip_reasons(p, (), ("push", "deploy"), chosen) == {
        "push": "not run: --skip push"}  # deploy is not enabled: nothing to report
    chosen = engine.select_stages(p, ("checkout",), ())
    assert engine.skip_reasons(p, ("checkout",), (), chosen) == {
        "build": "not run: not in --only checkout", "push": "not run: not in --only checkout"}


def test_skipped_stage_is_reported_skipped_with_its_reason(tmp_path):
    _, p = _setup(tmp_path, "stages:\n  push: {enabled: false}\n")
    proc = runner("exec", str(p), "--json", "--skip", "build", "--run-id", "s1",
                  "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evs = events(proc.stdout)
    build = stage_end(evs, "build")
    assert build["status"] == "skipped" and build["error"] == "not run: --skip build"
    assert not [e for e in evs if e["event"] == "stage.start" and e["stage"] == "build"]
    record, _ = _record(tmp_path / "d", "s1")
    assert _stages(record) == {"checkout": "success", "build": "skipped"}
    assert record["stages"][1]["error"] == "not run: --skip build"


def test_skip_push_and_deploy_touches_neither(lab, tmp_path):
    """What the daemon passes for a pull request: the image is built, not pushed, not deployed,
    and the run says so."""
    name = _unique(tmp_path, "skip")
    server = lab["servers"][0]
    _, p = _setup(tmp_path, registry=lab["registry"], name=name, extra=f"""
stages:
  deploy:
    enabled: true
    servers: ["{server['user']}@{server['host']}:{server['port']}"]
    ssh: {{key_file: {server['key_file']}, known_hosts: {server['known_hosts']}}}
    container: {{name: {name}}}
""")
    proc = runner("exec", str(p), "--json", "--skip", "push", "--skip", "deploy", "--run-id",
                  "skip1", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evs = events(proc.stdout)
    for stage in ("push", "deploy"):
        end = stage_end(evs, stage)
        assert (end["status"], end["error"]) == ("skipped", f"not run: --skip {stage}")
        assert not [e for e in evs if e.get("stage") == stage and e["event"] != "stage.end"]
    record, _ = _record(tmp_path / "d", "skip1")
    assert _stages(record) == {"checkout": "success", "build": "success", "push": "skipped",
                               "deploy": "skipped"}
    r = httpx.get(f"http://{lab['registry']}/v2/test/{name}/tags/list", timeout=10)
    assert r.status_code == 404  # nothing was pushed
    ps = subprocess.run(["docker", "-H", server["docker_host"], "ps", "-a", "--filter",
                         f"name={name}", "--format", "{{.Names}}"],
                        capture_output=True, text=True, check=True)
    assert ps.stdout.strip() == ""  # nothing was deployed


# --- --withhold-secrets -----------------------------------------------------------------------

VALUE = "s3cr3t-value-7d1e9a-never-anywhere"


def _everything(tmp_path: Path, proc) -> str:
    """What the run printed and every file it wrote (run.json, logs, caches)."""
    texts = [proc.stdout, proc.stderr]
    for f in (tmp_path / "d").rglob("*"):
        if f.is_file():
            texts.append(f.read_bytes().decode("latin-1"))
    return "\n".join(texts)


PUSH_SECRET = """
secrets:
  registry_password: {env: TEST_REGISTRY_PASSWORD}
stages:
  push:
    auth: {username: ci, password: registry_password}
"""


def test_withheld_secrets_are_not_even_read(tmp_path):
    """Without the flag an unset secret variable is an error before the run; with it, nothing
    is read, so nothing is missing, and a stage that needs no secret runs."""
    _, p = _setup(tmp_path, PUSH_SECRET)
    env = {k: v for k, v in os.environ.items() if k != "TEST_REGISTRY_PASSWORD"}
    plain = subprocess.run([sys.executable, "-m", "runner", "exec", str(p), "--json", "--only",
                            "checkout", "--data-dir", str(tmp_path / "d")], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert plain.returncode == 2 and "TEST_REGISTRY_PASSWORD is not set" in plain.stderr
    proc = subprocess.run([sys.executable, "-m", "runner", "exec", str(p), "--json", "--only",
                           "checkout", "--withhold-secrets", "--run-id", "w0", "--data-dir",
                           str(tmp_path / "d")], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record, evs = _record(tmp_path / "d", "w0")
    assert record["secrets_withheld"] is True and evs[0]["secrets_withheld"] is True


def test_withheld_repository_token_fails_the_checkout_naming_it(tmp_path):
    _, p = _setup(tmp_path, "secrets:\n  git_token: {env: TEST_GIT_TOKEN}\n")
    p.write_text(p.read_text().replace("repository: {url: ", "repository: {token: git_token, "
                                                             "url: "))
    proc = runner("exec", str(p), "--json", "--only", "checkout", "--withhold-secrets",
                  "--run-id", "w1", "--data-dir", str(tmp_path / "d"),
                  env={"TEST_GIT_TOKEN": VALUE})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    end = stage_end(events(proc.stdout), "checkout")
    assert end["status"] == "failed"
    assert end["error"] == f"repository.token: secret 'git_token' {WITHHELD}"
    assert not (tmp_path / "d" / "cache" / "git").exists() or \
        not [f for f in (tmp_path / "d" / "cache" / "git").iterdir()]  # nothing was fetched
    assert VALUE not in _everything(tmp_path, proc)


def test_secret_reference_in_interpolation_is_refused_with_or_without_withholding(tmp_path):
    """A pipeline names secrets; it never interpolates them: `${VAR}` of a variable that holds
    a secret, and a `${secrets.X}` form, are refused before the run, and resolve to nothing."""
    for image in ("127.0.0.1:5000/${TEST_GIT_TOKEN}", "127.0.0.1:5000/${secrets.git_token}"):
        p = tmp_path / "p.yaml"
        p.write_text(f"name: t\nrepository: {{url: {tmp_path}}}\nimage: {{name: \"{image}\"}}\n"
                     "secrets:\n  git_token: {env: TEST_GIT_TOKEN}\n")
        for extra in ((), ("--withhold-secrets",)):
            proc = runner("exec", str(p), "--json", "--only", "checkout", *extra,
                          "--data-dir", str(tmp_path / "d"), env={"TEST_GIT_TOKEN": VALUE})
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert VALUE not in proc.stdout + proc.stderr
            assert not (tmp_path / "d").exists()


def test_withheld_push_secret_only_fails_the_push(lab, tmp_path):
    """The push stage's registry password is withheld: checkout and build run; with push
    selected, push fails naming the secret, touches no registry, and the value is nowhere."""
    name = _unique(tmp_path, "withheld")
    _, p = _setup(tmp_path, PUSH_SECRET, registry=lab["auth_registry"]["address"], name=name)
    env = {"TEST_REGISTRY_PASSWORD": VALUE}
    ok = runner("exec", str(p), "--json", "--only", "checkout,build", "--withhold-secrets",
                "--run-id", "w2", "--data-dir", str(tmp_path / "d"), env=env)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    record, _ = _record(tmp_path / "d", "w2")
    assert _stages(record) == {"checkout": "success", "build": "success", "push": "skipped"}

    proc = runner("exec", str(p), "--json", "--withhold-secrets", "--run-id", "w3",
                  "--data-dir", str(tmp_path / "d"), env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    evs = events(proc.stdout)
    push = stage_end(evs, "push")
    assert push["status"] == "failed"
    assert push["error"] == f"stages.push.auth.password: secret 'registry_password' {WITHHELD}"
    assert stage_end(evs, "build")["status"] == "success"
    push_logs = [e for e in evs if e["event"] == "stage.log" and e["stage"] == "push"]
    assert push_logs == []  # it failed before doing anything
    record, _ = _record(tmp_path / "d", "w3")
    assert record["status"] == "failed" and _stages(record)["push"] == "failed"
    assert VALUE not in _everything(tmp_path, proc) + _everything(tmp_path, ok)


# --- what the terminal shows, and output that fails, on a real build and scan (lab) ------------

OUTPUT_PIPELINE = ROOT / "tests" / "data" / "output" / "pipeline.yaml"
APP = ROOT / "tests" / "data" / "build" / "app"
FALLBACK_INFO = "trivy: misconfiguration checks: the ones built into Trivy (expected offline"


def _app_repo(tmp_path: Path, extra_step: str = "") -> Path:
    """tests/data/build/app as a repository, with a line only this test has in app.sh: the
    build's last step runs instead of coming from the engine's cache."""
    files = {p.name: p.read_text() for p in APP.iterdir()}
    files["app.sh"] += f"# {tmp_path.name}\n"
    files["Dockerfile"] += extra_step
    return make_repo(tmp_path / "repo", files)


def _output_argv(repo: Path, data: Path, run_id: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runner", "exec", str(OUTPUT_PIPELINE), "--var",
            f"REPO_URL={repo}", "--run-id", run_id, "--data-dir", str(data), *extra]


def _lab_env(lab) -> dict[str, str]:
    from tests.helpers import lab_env

    return {**os.environ, **lab_env(lab)}


def _logs_agree(data: Path, run_id: str) -> tuple[dict, list[dict]]:
    """run.json and events.jsonl agree (see _record), and each stage's log file holds exactly
    the lines the stage logged, in order: nothing lost, nothing written into it from elsewhere."""
    record, evs = _record(data, run_id)
    logs = data / "runs" / run_id / "logs"
    for stage in record["stages"]:
        lines = [e["line"] for e in evs if e["event"] == "stage.log"
                 and e["stage"] == stage["name"]]
        path = logs / f"{stage['name']}.log"
        assert (path.read_text() if path.exists() else "") == "".join(f"{x}\n" for x in lines), \
            stage["name"]
    return record, evs


def _build_output(evs: list[dict]) -> list[str]:
    return [e["line"] for e in evs if e["event"] == "stage.log" and e["stage"] == "build"
            and e["kind"] == "output"]


def test_terminal_shows_the_build_collapsed_and_trivy_without_errors(lab, tmp_path):
    from pipelines.buildkit import parse_progress

    repo, data = _app_repo(tmp_path), tmp_path / "data"
    proc = subprocess.run(_output_argv(repo, data, "view1"), cwd=ROOT, env=_lab_env(lab),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record, evs = _logs_agree(data, "view1")
    assert _stages(record) == {"checkout": "success", "build": "success", "scan": "success"}
    shown = proc.stderr.splitlines()
    steps = parse_progress(_build_output(evs)).steps.values()
    for step in steps:  # each step once, on its own line, as it finished
        name = " ".join(step.name.split())
        assert len([x for x in shown if x.startswith("  [build] ") and x.endswith(
            name if step.cached else ")") and name in x]) == 1, (name, proc.stderr)
    assert not [x for x in shown if x.startswith("  [build] #")], proc.stderr  # BuildKit's own
    build = next(s for s in record["stages"] if s["name"] == "build")["outputs"]
    total, cached = build["total_steps"], build["cached_steps"]
    assert cached < total  # app.sh changed: its COPY ran
    assert [x for x in shown if x.startswith("<< build: success (")
            and x.endswith(f"; {total} steps: {cached} cached, {total - cached} ran)")]
    # Trivy's offline fallback is said as information, once; none of its lines says ERROR.
    assert len([x for x in shown if x.startswith(f"  [scan] {FALLBACK_INFO}")]) == 1
    assert "ERROR" not in proc.stderr and not record["warnings"], proc.stderr
    scan_log = (data / "runs" / "view1" / "logs" / "scan.log").read_text()
    assert "ERROR\t[misconfig] Falling back to embedded checks" in scan_log  # kept as it was
    assert shown[-1] == (f"record: {data}/runs/view1/run.json; every line of every stage: "
                         f"{data}/runs/view1/logs/<stage>.log")

    # -v: every line the build printed, in order, as the stage's log file has it.
    verbose = subprocess.run(_output_argv(repo, data, "view2", "-v", "--only", "checkout,build"),
                             cwd=ROOT, env=_lab_env(lab), capture_output=True, text=True,
                             timeout=600)
    assert verbose.returncode == 0, verbose.stderr[-4000:]
    _, evs2 = _logs_agree(data, "view2")
    raw = [x[len("  [build] "):] for x in verbose.stderr.splitlines()
           if x.startswith("  [build] ")]
    lines = _build_output(evs2)
    assert lines and all(x in raw for x in lines)
    assert [x for x in raw if x in set(lines)] == [x for x in lines]


def test_failed_build_shows_its_failing_step_and_exits_1_whatever_the_output(lab, tmp_path):
    repo = make_repo(tmp_path / "repo", {
        "Dockerfile": (ROOT / "tests/data/build/failing/Dockerfile").read_text()})
    data = tmp_path / "data"
    proc = subprocess.run(_output_argv(repo, data, "fail1"), cwd=ROOT, env=_lab_env(lab),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-4000:]
    shown = proc.stderr.splitlines()
    at = shown.index("  [build] FAILED [3/3] RUN echo about to fail && exit 3")
    assert shown[at + 1] == "  [build]   about to fail"
    assert shown[at + 2].startswith("  [build]   ERROR: ") and "exit code: 3" in shown[at + 2]
    assert f"   full log: {data}/runs/fail1/logs/build.log (or runner exec -v to see it here)" \
        in shown
    # The same run with nowhere to write: the exit code is the pipeline's, not the output's.
    with open("/dev/full", "w") as full:
        quiet = subprocess.run(_output_argv(repo, data, "fail2", "--json"), cwd=ROOT,
                               env=_lab_env(lab), stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=600)
    assert quiet.returncode == 1, quiet.stderr[-4000:]
    record, _ = _logs_agree(data, "fail2")
    assert record["status"] == "failed" and record["exit_code"] == 1
    assert _stages(record)["build"] == "failed" and _stages(record)["scan"] == "skipped"


def test_json_to_dev_full_lets_build_and_scan_complete(lab, tmp_path):
    repo, data = _app_repo(tmp_path), tmp_path / "data"
    with open("/dev/full", "w") as full:  # every write: No space left on device
        proc = subprocess.run(_output_argv(repo, data, "full1", "--json"), cwd=ROOT,
                              env=_lab_env(lab), stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    record, evs = _logs_agree(data, "full1")
    assert _stages(record) == {"checkout": "success", "build": "success", "scan": "success"}
    assert [w for w in record["warnings"] if w.startswith(
        "the --json output (stdout) failed (OSError: [Errno 28] No space left on device)")]
    assert _build_output(evs) and record["stages"][2]["outputs"]["passed"] is True


def test_json_head_1_lets_build_and_scan_complete(lab, tmp_path):
    repo, data = _app_repo(tmp_path), tmp_path / "data"
    first = subprocess.Popen(_output_argv(repo, data, "head3", "--json"), cwd=ROOT,
                             env=_lab_env(lab), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=first.stdout, stdout=subprocess.PIPE)
    first.stdout.close()  # head holds the only read end now
    line, _ = head.communicate(timeout=60)
    _, err = first.communicate(timeout=600)
    assert json.loads(line)["event"] == "run.start"
    assert first.returncode == 0, err.decode()[-4000:]
    assert b"internal error" not in err and b"Traceback" not in err, err.decode()
    record, evs = _logs_agree(data, "head3")
    assert _stages(record)["scan"] == "success"
    assert [w for w in record["warnings"] if "the --json output (stdout) failed (BrokenPipeError"
            in w]
    assert len([e for e in evs if e["event"] == "sink.failed"]) == 1


def test_stderr_closed_or_full_lets_build_and_scan_complete(lab, tmp_path):
    """`runner exec ... 2>&-`: the terminal view has nowhere to go, and no file the run opens
    may take the place of stderr; with --json, stdout still gets every event. `2>/dev/full`:
    the terminal view fails and is dropped."""
    repo, data = _app_repo(tmp_path), tmp_path / "data"
    closed = ["sh", "-c", 'exec "$@" 2>&-', "sh"]
    proc = subprocess.run([*closed, *_output_argv(repo, data, "noerr1")], cwd=ROOT,
                          env=_lab_env(lab), stdout=subprocess.PIPE, timeout=600)
    assert proc.returncode == 0 and proc.stdout == b""
    record, _ = _logs_agree(data, "noerr1")
    assert _stages(record)["scan"] == "success" and record["status"] == "success"

    proc = subprocess.run([*closed, *_output_argv(repo, data, "noerr2", "--json")], cwd=ROOT,
                          env=_lab_env(lab), stdout=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0
    record, evs = _logs_agree(data, "noerr2")
    assert events(proc.stdout) == evs and not record["warnings"]

    with open("/dev/full", "w") as full:  # the terminal view's writes fail instead
        proc = subprocess.run(_output_argv(repo, data, "noerr3"), cwd=ROOT, env=_lab_env(lab),
                              stdout=subprocess.DEVNULL, stderr=full, timeout=600)
    assert proc.returncode == 0
    record, _ = _logs_agree(data, "noerr3")
    assert record["status"] == "success" and [w for w in record["warnings"] if w.startswith(
        "the terminal output (stderr) failed (OSError: [Errno 28] No space left on device)")]


def test_terminal_closed_mid_build_lets_the_run_complete(lab, tmp_path):
    """The reader of the terminal view goes away while the build streams: the view is dropped
    there, and the build, the scan and the record go on."""
    repo = _app_repo(tmp_path, extra_step="RUN sleep 3\n")  # still building once it is closed
    data = tmp_path / "data"
    proc = subprocess.Popen(_output_argv(repo, data, "mid1"), cwd=ROOT, env=_lab_env(lab),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0)
    _read_until(proc.stderr.fileno(), "  [build] running: ", timeout=120)
    proc.stderr.close()
    assert proc.wait(timeout=600) == 0
    record, evs = _logs_agree(data, "mid1")
    assert _stages(record)["build"] == "success" and _stages(record)["scan"] == "success"
    kinds = [(e["event"], e.get("stage")) for e in evs]
    failed = kinds.index(("sink.failed", None))
    assert kinds.index(("stage.start", "build")) < failed < kinds.index(("stage.end", "build"))
    assert any("RUN sleep 3" in x for x in _build_output(evs[failed:]))  # logged after it


def test_daemon_keeps_every_line_with_its_own_output_on_a_full_disk(lab, tmp_path):
    """The daemon's runs are `runner exec --json`: the terminal view's collapsing never reaches
    the lines it stores, and the daemon's own output failing (stdout at /dev/full, stderr
    closed) loses none of them."""
    import yaml

    from runner.daemon.spawn import free_port, healthy, stop_daemon

    sys.path.insert(0, str(ROOT / "tests" / "data" / "daemon"))
    from harness import AUTH, config

    repo = _app_repo(tmp_path)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(OUTPUT_PIPELINE.read_text().replace("${REPO_URL}", str(repo)))
    cfg = config(tmp_path, [{"name": "app", "file": str(pipeline), "repo": str(repo)}])
    cfg.pop("exec_command")  # the real `runner exec`
    port = free_port()
    cfg["listen"] = {"host": "127.0.0.1", "port": port}
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{port}"
    with open("/dev/full", "w") as full:
        daemon = subprocess.Popen([sys.executable, "-m", "runner", "daemon", "--config",
                                   str(tmp_path / "daemon.yaml")], cwd=ROOT, env=_lab_env(lab),
                                  stdout=full, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not healthy(url):
            assert daemon.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)
        r = httpx.post(f"{url}/api/pipelines/app/trigger", json={"branch": "main"}, headers=AUTH,
                       timeout=10)
        assert r.status_code == 201, r.text
        run_id = r.json()["run"]["id"]
        deadline = time.monotonic() + 600
        while (run := httpx.get(f"{url}/api/runs/{run_id}", headers=AUTH,
                                timeout=10).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, run
            time.sleep(0.2)
        assert run["status"] == "success", run
        stored = httpx.get(f"{url}/api/runs/{run_id}/logs", params={"limit": 10000},
                           headers=AUTH, timeout=10).json()["lines"]
    finally:
        stop_daemon(daemon)
    run_dir = tmp_path / "data" / "work" / "runs" / str(run_id)
    for stage in ("checkout", "build", "scan"):
        on_disk = (run_dir / "logs" / f"{stage}.log").read_text().splitlines()
        assert [x["line"] for x in stored if x["stage"] == stage] == on_disk, stage
    assert any(x["line"].startswith("#") for x in stored if x["stage"] == "build")
