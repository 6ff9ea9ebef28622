"""Shared fixtures. The lab (build engine, registry, SSH servers) is brought up once per session.

If the lab was already up when the session started, it is left up; otherwise it is stopped at the
end. Tests that need it take the `lab` fixture; pure unit tests don't, and run anywhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Shared fixtures: the deploy tests' (`images`, `app`) and a fresh PostgreSQL database per test (`pg_url`).
pytest_plugins = ["tests.deploy_fixtures", "tests.db_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
LAB_SERVERS = int(os.environ.get("RUNNER_TEST_SERVERS", "3"))


def _lab(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", "lab", *args],
                          capture_output=True, text=True, check=check, cwd=ROOT)


@pytest.fixture(scope="session")
def lab():
    """The lab as `runner lab up --json` describes it, plus the build engine's DOCKER_HOST
    exported into this process so that the docker SDK and CLI in tests use the lab's engine."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, dockerd); run the suite as root")
    was_up = _lab("status", "--json", check=False)
    already = was_up.returncode == 0 and json.loads(was_up.stdout or "{}").get("up", False)
    proc = _lab("up", "--servers", str(LAB_SERVERS), "--json", check=False)
    if proc.returncode != 0:
        pytest.fail(f"runner lab up failed:\n{proc.stdout}\n{proc.stderr}")
    info = json.loads(proc.stdout)
    os.environ["DOCKER_HOST"] = info["docker_host"]
    yield info
    if not already and not os.environ.get("RUNNER_KEEP_LAB"):
        _lab("down", check=False)
