"""The lab, brought up once per session for every test in this folder.

If the lab was already up when the session started, it is left up (and with RUNNER_KEEP_LAB
set, also when it was not); otherwise it is stopped at the end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
# The deploy tests' fixtures (`images`, `app`) and a fresh PostgreSQL database per test (`pg_url`).
from tests.lab.db_fixtures import lab_database_url, pg_module_url, pg_url  # noqa: F401
from tests.lab.deploy_fixtures import app, images  # noqa: F401

from tests.lab.browser import browser_available, start_browser

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


@pytest.fixture(scope="session")
def browser():
    """One headless chromium for the session (tests/lab/browser.py), quit at the end."""
    missing = browser_available()
    if missing:
        pytest.skip(f"no browser for the dashboard tests: {missing}")
    driver = start_browser()
    yield driver
    driver.quit()
