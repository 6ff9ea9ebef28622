"""A secret read from a command (`secrets: {x: {command: [...]}}`): real commands, written by
the test as small scripts, run as the runner runs them (no shell, a timeout, its process group
killed); a failure names the secret and the program, never what it printed."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.repository_pipeline import within_limits
from runner.run_request import RepositoryPipeline
from runner.secrets import Masker, SecretStore

VALUE = "s3cr3t-from-the-vault"


def script(tmp: Path, name: str, body: str) -> Path:
    path = tmp / name
    path.write_text(f"#!{sys.executable}\nimport os, sys, time\n{body}\n")
    path.chmod(0o755)
    return path


def pipeline(secrets: dict, refs: str = "") -> str:
    text = ("name: demo\nrepository: {url: x}\nimage: {name: a}\n"
            f"secrets: {json.dumps(secrets)}\n{refs}")
    return text


def load(tmp: Path, text: str):
    return load_pipeline_text(text, str(tmp / "p.yml"), environ={})


def read(tmp: Path, secrets: dict, refs: str = "", environ: dict | None = None):
    masker = Masker()
    store = SecretStore.from_pipeline(load(tmp, pipeline(secrets, refs)),
                                      environ or dict(os.environ), masker)
    return store, masker


def test_the_value_is_what_the_command_prints_once_per_run_masked(tmp_path):
    """Stdout with one trailing newline removed, the runner's environment passed on, the
    command run once although two fields use the secret."""
    count = tmp_path / "count"
    cmd = script(tmp_path, "vault", f"open({str(count)!r}, 'a').write('x')\n"
                 f"print(os.environ['VAULT_ITEM'] + '-from-the-vault')")
    refs = ("stages:\n  test:\n    steps:\n"
            "      - {name: a, image: busybox, commands: [x], secret_env: {T: tok}}\n"
            "      - {name: b, image: busybox, commands: [x], secret_env: {T: tok}}\n")
    store, masker = read(tmp_path, {"tok": {"command": [str(cmd)]}}, refs,
                         {**os.environ, "VAULT_ITEM": "s3cr3t"})
    assert store.value("tok") == VALUE
    assert count.read_text() == "x"
    assert masker.mask(f"token={VALUE}") == "token=***"


def test_only_one_trailing_newline_is_removed(tmp_path):
    cmd = script(tmp_path, "two", "sys.stdout.write('line one\\nline two\\n\\n')")
    store, _ = read(tmp_path, {"tok": {"command": [str(cmd)]}})
    assert store.value("tok") == "line one\nline two\n"


@pytest.mark.parametrize("body, said", [
    (f"print({VALUE!r}); sys.stderr.write({VALUE!r}); sys.exit(3)", "exited with status 3"),
    ("pass", "printed nothing"),
    ("sys.stdout.buffer.write(b'\\xff\\xfe')", "not UTF-8"),
])
def test_a_failing_command_names_the_secret_and_program_never_its_output(tmp_path, body, said):
    cmd = script(tmp_path, "op", body)
    with pytest.raises(InvalidInput) as info:
        read(tmp_path, {"tok": {"command": [str(cmd), "read", "op://v/i/f"]}})
    (problem,) = info.value.problems
    assert (problem.line, problem.column, problem.path) == (4, 11, "secrets.tok")
    assert problem.message.startswith(f"secret 'tok': command '{cmd}' ")
    assert said in problem.message
    assert VALUE not in str(info.value) + problem.message


def test_a_missing_program_is_named(tmp_path):
    with pytest.raises(InvalidInput) as info:
        read(tmp_path, {"tok": {"command": ["no-such-secret-cli-here", "get"]}})
    assert info.value.problems[0].message == \
        "secret 'tok': command 'no-such-secret-cli-here' not found"


def test_a_hanging_command_is_killed_with_its_process_group_at_its_timeout(tmp_path):
    """The command starts a child that would outlive it; both are gone after the timeout."""
    pids = tmp_path / "pids"
    cmd = script(tmp_path, "hang", f"""
import subprocess
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')
print({VALUE!r}, flush=True)
time.sleep(300)""")
    t0 = time.monotonic()
    with pytest.raises(InvalidInput) as info:  # 3 s: time to start both on a loaded machine
        read(tmp_path, {"tok": {"command": [str(cmd)], "timeout": 3}})
    assert time.monotonic() - t0 < 30  # generous: 3 s, then TERM's grace
    assert info.value.problems[0].message == \
        f"secret 'tok': command '{cmd}' did not finish within 3s (killed)"
    assert VALUE not in str(info.value)
    # Signalled is not yet dead: on a loaded machine a process takes a moment to be scheduled
    # and die. One the kill missed sleeps on for 300 s; 10 s tells the two apart.
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("secrets, message", [
    ({"tok": {"command": "op read op://v/i/f"}}, "not one string: no shell runs it"),
    ({"tok": {"command": []}}, "secrets.tok.command: expected a list of strings, got an empty list"),
    ({"tok": {"env": "A", "command": ["op"]}}, "env and command given"),
    ({"tok": {"env": "A", "timeout": 5}}, "timeout is how long a secret's command may run"),
])
def test_a_badly_written_command_secret_is_refused_at_its_place(tmp_path, secrets, message):
    with pytest.raises(InvalidInput) as info:
        load(tmp_path, pipeline(secrets))
    text = "\n".join(f"{p.file}:{p.line}:{p.column}: {p.path}: {p.message}"
                     for p in info.value.problems)
    assert f"{tmp_path / 'p.yml'}:4:" in text and message in text, text


def test_a_repository_s_pipeline_may_not_run_a_command_on_the_daemon_s_host(tmp_path):
    p = load(tmp_path, pipeline({"tok": {"command": ["op", "read", "x"]}}))
    source = RepositoryPipeline(repository="https://git.example.com/a/b.git",
                                secrets={"tok": {"env": "TOK"}})
    with pytest.raises(InvalidInput) as info:
        within_limits(p, source)
    (problem,) = info.value.problems
    assert problem.path == "secrets.tok.command"
    assert "only the operator's pipeline file may set one" in problem.message
