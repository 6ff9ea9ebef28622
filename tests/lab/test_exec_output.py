"""What `runner exec`, `runner logs` and `runner runs` print when the text they show is hostile
(a commit message, a branch name, a build step's output with escape sequences and bare CRs), in a
pseudo-terminal and in a pipe; and `runner exec`'s memory when a build prints 150,000 lines.
The pure filter: tests/unit/test_terminal_text.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import ROOT, git, make_repo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import TOKEN, bare_repo, commit, config, daemon_in_process, wait_for  # noqa: E402

ESC = "\x1b"
# Every kind of sequence the issue names: an OSC 8 link, a screen clear, a window title, a CR
# overwrite, a colour of the text's own.
HOSTILE = (f"{ESC}]8;;javascript:alert(1){ESC}\\click{ESC}]8;;{ESC}\\ {ESC}[2J "
           f"{ESC}]0;pwned\x07 over\rwritten {ESC}[41mHOSTILE{ESC}[0m")
# In a commit message without the CR: the checkout stage keeps only what follows a CR in git's
# lines (its progress redraws), and git prints the subject on checkout ("HEAD is now at ...").
SUBJECT = "subject " + HOSTILE.replace("over\rwritten ", "") + " end"
RAW = (f"{ESC}]8;", f"{ESC}]0;", f"{ESC}[2J", "\x07", f"{ESC}[41m", "over\rwritten")
# What the runner itself sends a terminal: colours, and its spinner's cursor hiding, line
# clearing and moving up (rich's Status); a pty turns each newline into CR LF.
RUNNER_OWN = re.compile(r"\x1b\[(?:[0-9;]*m|\?25[lh]|2K|1A)|\r(?=\x1b\[)|\r(?=\n)")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
TERMINAL_ENV = {"TERM": "xterm-256color", "COLUMNS": "200"}


def _run(argv: list[str], tty: bool, env: dict | None = None, timeout: float = 300) -> str:
    """`runner ARGV`'s stdout and stderr as one text, with both in a new pseudo-terminal (tty)
    or a pipe."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    full_env.update(env or {})
    if tty:
        full_env.update(TERMINAL_ENV)
        master, slave = os.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "runner", *argv], stdin=subprocess.DEVNULL,
                                stdout=slave, stderr=slave, cwd=ROOT, env=full_env)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        proc.wait(timeout=timeout)
        return b"".join(chunks).decode("utf-8", "replace")
    proc = subprocess.run([sys.executable, "-m", "runner", *argv], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                          timeout=timeout)
    return proc.stdout.decode("utf-8", "replace")


def _assert_inert(out: str, tty: bool) -> None:
    assert not [raw for raw in RAW if raw in out], repr(out)
    leftover = RUNNER_OWN.sub("", out) if tty else out
    assert not CONTROL.search(leftover), repr(leftover)


def _hostile_repo(tmp_path: Path, nonce: str) -> Path:
    """A repository whose commit message, Dockerfile step name and build output are hostile; its
    build fails, so the stage's error and the failed step's lines quote them too."""
    # Raw escapes at the start of the RUN line, which is the step's name (and the first line of
    # the run's reason); octal ones for printf, whose output holds them raw.
    printf = "".join(f"\\{ord(c):03o}" if c in "\\\x1b\x07\r" else c for c in HOSTILE)
    repo = make_repo(tmp_path / f"repo-{nonce}", {
        "Dockerfile": f"FROM local/busybox:1\nRUN echo 'name {ESC}]0;pwned\x07{ESC}[2J {nonce}' "
                      f"&& printf '{printf}\\n' && exit 3\n"})
    git(repo, "commit", "-q", "--allow-empty", "-m", SUBJECT)
    return repo


def _pipeline(tmp_path: Path, repo: Path, registry: str) -> Path:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "version": 1, "name": "hostile", "repository": {"url": str(repo)},
        "image": {"name": f"{registry}/test/hostile"}, "stages": {"push": {"enabled": False}}}))
    return pipeline


@pytest.mark.parametrize("tty", [True, False], ids=["pty", "pipe"])
def test_exec_shows_hostile_commit_and_build_output_inert(lab, tmp_path, tty):
    nonce = f"{time.time_ns()}-{tty}"  # the step must run, not come from the cache
    pipeline = _pipeline(tmp_path, _hostile_repo(tmp_path, nonce), lab["registry"])
    for verbose in (["-v"], []):
        out = _run(["exec", str(pipeline), *verbose, "--data-dir", str(tmp_path / "data")], tty)
        assert re.search(r"<< build: (\x1b\[[0-9;]*m)?failed", out), out
        _assert_inert(out, tty)
        # The step's output is shown (in the failed step's lines, and with -v), its CR visible.
        assert "click   over\\rwritten HOSTILE" in out, out
        if verbose:
            assert "subject click   HOSTILE end" in out, out  # git's line with the subject
        if tty:  # the runner's own colours are there
            assert re.search(r"<< build: \x1b\[[0-9;]*mfailed", out), repr(out)


def test_logs_and_runs_show_a_hostile_run_inert(lab, tmp_path):
    """Read back from the daemon: the lines of a run whose commit message and build are
    hostile, and the list of runs with its reason (the failed step's name)."""
    repo = _hostile_repo(tmp_path, str(time.time_ns()))
    pipeline = _pipeline(tmp_path, repo, lab["registry"])
    cfg = config(tmp_path, [{"name": "hostile", "file": str(pipeline), "repo": str(repo)}])
    cfg.pop("exec_command")  # the real runner exec
    with daemon_in_process(cfg) as d:
        r = httpx.post(f"{d.url}/api/pipelines/hostile/trigger", json={"ref": "main"},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code in (200, 201, 202), r.text
        run_id = r.json()["run"]["id"]
        run = wait_for(lambda: (x := d.store.get_run(run_id)) and x["status"] not in
                       ("queued", "running") and x, 120, "the run to end", every=0.1)
        assert run["status"] == "failed" and f"{ESC}]0;" in run["reason"], run
        server = ["--server", d.url, "--token", TOKEN]
        for tty in (True, False):
            logs = _run(["logs", str(run_id), *server], tty)
            assert "subject click   HOSTILE end" in logs, logs
            assert "click   over\\rwritten HOSTILE" in logs, logs
            _assert_inert(logs, tty)
            runs = _run(["runs", *server], tty)
            assert "RUN echo 'name  " in runs, runs
            _assert_inert(runs, tty)


# --- memory ---------------------------------------------------------------------------------

def _peak_rss_mb(lines: int, tmp_path: Path, registry: str) -> tuple[float, str]:
    """`runner exec`'s peak resident memory (VmHWM, read from /proc until it exits: its own,
    not the docker CLI's) for a build whose steps print `lines` lines in all.

    The lab's engine clips a step's output at 200 KiB/s (BUILDKIT_STEP_LOG_MAX_SPEED), so the
    lines come from 5 steps of "y" lines, each under that, built in parallel."""
    nonce = time.time_ns()
    per = lines // 5
    dockerfile = "".join(f"FROM local/busybox:1 AS s{i}\nRUN echo {nonce}-{i} > /n && "
                         f"yes | head -n {per}\n" for i in range(5))
    dockerfile += "FROM local/busybox:1\n" + "".join(f"COPY --from=s{i} /n /n{i}\n"
                                                      for i in range(5))
    repo = make_repo(tmp_path / f"repo-{lines}", {"Dockerfile": dockerfile})
    pipeline = tmp_path / f"pipeline-{lines}.yaml"
    pipeline.write_text(f"name: loud\nrepository: {{url: {repo}}}\n"
                        f"image: {{name: \"{registry}/test/loud\"}}\n")
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "exec", str(pipeline), "--only",
                             "checkout,build", "--data-dir", str(data), "--run-id", f"r{lines}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while True:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-3000:]
    log = (data / "runs" / f"r{lines}" / "logs" / "build.log").read_text()
    printed = sum(1 for line in log.splitlines() if line.endswith(" y"))
    assert printed == lines, f"the engine clipped the build's output: {printed} lines"
    return peak / 1024, err


# 150,000 lines, not 400,000 (the test 30 s instead of 52 at load 10): the code that kept every
# line (d831358^) peaked at 43.5 MB for 1,000 lines and 76.3 MB for 150,000, 33 MB of growth where
# the bound allows 9 (it fails); the bounded tails peak at 45 MB for either count.
LARGE = 150_000


def test_exec_memory_stays_flat_whatever_the_build_prints(lab, tmp_path):
    small, _ = _peak_rss_mb(1_000, tmp_path, lab["registry"])
    large, _ = _peak_rss_mb(LARGE, tmp_path, lab["registry"])
    print(f"runner exec peak RSS: {small:.0f} MB for 1,000 lines, {large:.0f} MB for {LARGE:,}")
    assert large <= small * 1.2, (small, large)
