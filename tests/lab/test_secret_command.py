"""A secret read from a command, used by a real run: `runner exec` runs the command once, before
anything else, and the value reaches two test steps on the lab's build engine, masked in every
line the run writes."""
from __future__ import annotations

import json
import sys

import pytest

from runner_lab import layout
from tests.helpers import lab_env, make_repo, runner

pytestmark = pytest.mark.usefixtures("lab")
VALUE = "vault-value-7f3a9c"


def test_a_run_uses_a_command_s_secret_once_masked(lab, tmp_path):
    repo = make_repo(tmp_path / "repo", {"README": "x\n"})
    calls = tmp_path / "calls"
    cli = tmp_path / "vault-cli"
    cli.write_text(f"#!{sys.executable}\nimport sys\nopen({str(calls)!r}, 'a').write('x')\n"
                   f"print(sys.argv[2])\n")
    cli.chmod(0o755)
    step = {"image": layout.BUSYBOX_IMAGE, "secret_env": {"API_TOKEN": "api_token"},
            "commands": ['echo "token=$API_TOKEN"', 'test "$API_TOKEN" = ' + VALUE]}
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "name": "secret-command", "repository": {"url": str(repo)},
        "image": {"name": "lab-test/secret-command"},
        "secrets": {"api_token": {"command": [str(cli), "get", VALUE], "timeout": 20}},
        "stages": {"test": {"steps": [{"name": "one", **step}, {"name": "two", **step}]}}}))
    data = tmp_path / "data"
    proc = runner("exec", str(pipeline), "--only", "checkout,test", "--data-dir", str(data),
                  "--run-id", "secret-command", env=lab_env(lab))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert calls.read_text() == "x"  # once for the run, though two steps use it
    log = (data / "runs" / "secret-command" / "logs" / "test.log").read_text()
    assert log.count("token=***") == 2, log[-3000:]
    for path in data.rglob("*"):
        if path.is_file():
            assert VALUE.encode() not in path.read_bytes(), path
    assert VALUE not in proc.stdout + proc.stderr
