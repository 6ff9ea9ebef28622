"""SSH as users have it, against the lab's real sshd: a deploy to a server named only by a
~/.ssh/config alias through a ProxyJump, keys from a real ssh-agent, ~/.ssh/known_hosts by
default, `runner ssh-trust`, and the pipeline's own settings winning over ~/.ssh/config.

Every test has a home of its own ($HOME in this process, and in the runner processes it
starts), so the machine's own ~/.ssh plays no part."""
from __future__ import annotations

import shutil
from pathlib import Path

import paramiko
import pytest

from deployers.base import DeployFailed
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_keys import key_fingerprint, parse_public_key
from runner.model.deploy import DeploySettings
from tests.lab.deploy_fixtures import Log, _deployer, _get, _port
from tests.lab.test_cli import runner_here  # ssh-trust in this process: no process start
from tests.unit.test_ssh_config import keygen, ssh_agent

@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return h


def lab_known_line(lab, host: str) -> str:
    """The lab's known_hosts line for `host` (written by the lab from the server's host key)."""
    lines = [ln for ln in Path(lab["servers"][0]["known_hosts"]).read_text().splitlines()
             if ln.split()[0] == host]
    assert len(lines) == 1, lines
    return lines[0]


def lab_fingerprint(lab, host: str) -> str:
    return key_fingerprint(parse_public_key(" ".join(lab_known_line(lab, host).split()[1:])))


def stage_for(servers, app: str, app_port: int, **ssh) -> DeploySettings:
    """Deploy settings with nothing about SSH but what the test passes."""
    return DeploySettings.model_validate({
        "enabled": True, "servers": servers,
        "ssh": {"connect_timeout": 5, "retries": 0, **ssh},
        "container": {"name": app, "ports": [f"{app_port}:8080"], "stop_timeout": 2},
        "healthcheck": {"http": {"port": 8080, "path": "/health"}, "timeout": 10,
                        "probe_interval": 0.2},
        "lock": {"ttl": 10, "wait": 60}})


def client_address(conn) -> str:
    """Where the server saw this SSH connection come from (sshd's SSH_CONNECTION)."""
    return conn.run(["sh", "-c", "echo $SSH_CONNECTION"], check=True).stdout.split()[0]


def test_deploy_to_an_alias_through_proxyjump_with_default_known_hosts(lab, images, app, home):
    name, _ = app
    jump, server = lab["servers"][0], lab["servers"][1]
    key = jump["key_file"]
    (home / ".ssh" / "config").write_text(
        f"Host web\n    HostName {server['host']}\n    ProxyJump bastion\n"
        f"    IdentityFile {key}\n"
        f"Host bastion\n    HostName {jump['host']}\n    User root\n    IdentityFile {key}\n")
    (home / ".ssh" / "known_hosts").write_text(
        lab_known_line(lab, jump["host"]) + "\n" + lab_known_line(lab, server["host"]) + "\n")
    port = _port()
    # The pipeline names the server only by its alias: no address, key, known_hosts or jump.
    stage = stage_for(["web"], name, port)
    d = _deployer(stage, images, "v1", name, Log())
    try:
        [planned] = d.plan().servers
        assert planned.to_dict()["address"] == f"root@{server['host']}:22"
        report = d.apply()
        assert report.ok, report.summary()
        conn = d.connection(d.targets[0])
        assert conn.jump is not None and conn.jump.target.host == jump["host"]
        # The target saw the jump server as its client: the connection went through the
        # jump host, not straight from the runner's machine (whose address a direct one has).
        assert client_address(conn) == jump["host"]
        assert client_address(conn.jump) == lab["registry"].split(":")[0]
        assert conn.run(["sh", "-c", "echo $DOCKER_HOST"]).stdout.strip().endswith(
            f"{server['name']}/docker.sock")
        assert conn.auth.startswith(f"{key} (ssh-ed25519 SHA256:")
    finally:
        d.close()
    assert _get(server["host"], port) == "v1"


def test_agent_key_alone_and_what_an_auth_failure_lists(lab, images, app, home, monkeypatch):
    name, _ = app
    server = lab["servers"][2]
    shutil.copy(lab["servers"][0]["known_hosts"], home / ".ssh" / "known_hosts")
    port = _port()
    stage = stage_for([server["host"]], name, port)  # no key_file, no key: the agent's only
    with ssh_agent(server["key_file"]) as sock:
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        d = _deployer(stage, images, "v1", name, Log())
        try:
            report = d.apply()
            assert report.ok, report.summary()
            assert d.connection(d.targets[0]).auth.startswith("ssh-agent key ssh-ed25519 SHA256:")
        finally:
            d.close()
    assert _get(server["host"], port) == "v1"

    # The agent is gone, and the keys left are not the server's: the failure lists what was
    # tried, by origin and fingerprint, and what could not be offered.
    stranger = keygen(home / "stranger")
    keygen(home / ".ssh" / "id_ed25519")  # a default key the server does not know
    refused = stage_for([server["host"]], name, port, key_file=str(stranger))
    d = _deployer(refused, images, "v2", name, Log())
    with pytest.raises(DeployFailed) as err:
        d.apply()
    d.close()
    msg = str(err.value)
    assert "refused the SSH key for user 'root'" in msg
    assert f"ssh.key_file {stranger} (ssh-ed25519 SHA256:" in msg
    assert f"{home}/.ssh/id_ed25519 (default) (ssh-ed25519 SHA256:" in msg
    assert f"ssh-agent at {sock}: cannot use it" in msg
    for path in (stranger, home / ".ssh" / "id_ed25519"):
        assert Path(f"{path}.pub").read_text().split()[1] not in msg
        assert Path(path).read_text().splitlines()[1][:30] not in msg
    assert _get(server["host"], port) == "v1"


def test_explicit_key_refused_then_agent_key_taken_and_logged(lab, home, monkeypatch):
    server = lab["servers"][2]
    shutil.copy(server["known_hosts"], home / ".ssh" / "known_hosts")
    stranger = keygen(home / "stranger")
    with ssh_agent(server["key_file"]) as sock:
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        log = Log()
        d = SSHDockerDeployer(stage_for([server["host"]], "x", 1, key_file=str(stranger)),
                              pipeline="x", image_name="x", run_id="k", log=log)
        try:
            conn = d.connection(d.targets[0])
            assert conn.auth.startswith("ssh-agent key")
        finally:
            d.close()
    assert f"the server refused ssh.key_file {stranger}; signed in with ssh-agent key" in log.text


def test_unknown_host_key_is_refused_then_ssh_trust_shows_the_line(lab, home):
    server = lab["servers"][2]
    (home / ".ssh" / "config").write_text(
        f"Host db\n    HostName {server['host']}\n    IdentityFile {server['key_file']}\n")
    known = home / ".ssh" / "known_hosts"
    stage = stage_for(["db"], "x", 1)
    [row] = SSHDockerDeployer(stage, pipeline="x", image_name="x", run_id="u").verify()
    assert "unknown host key" in row.error and f"{known}, which does not exist" in row.error
    assert "`runner ssh-trust db`" in row.error
    assert not known.exists()

    env = {"HOME": str(home)}
    proc = runner_here("ssh-trust", "db", env=env)
    assert proc.returncode == 0, proc.stderr
    # The fingerprint shown is the server's (as the lab wrote it down from its host key), and
    # it is shown before the line, which alone is on stdout.
    want = lab_fingerprint(lab, server["host"])
    assert want in proc.stderr and "ssh-keygen -lf" in proc.stderr
    [line] = proc.stdout.splitlines()
    assert line == lab_known_line(lab, server["host"])
    assert not known.exists()  # ssh-trust writes nothing

    known.write_text(line + "\n")
    [row] = SSHDockerDeployer(stage, pipeline="x", image_name="x", run_id="u").verify()
    assert row.error == "" and row.status == "absent"
    proc = runner_here("ssh-trust", "db", env=env)
    assert proc.returncode == 0 and proc.stdout == "" and "already trusted" in proc.stderr

    # A changed key: refused, and ssh-trust says it is not the key known_hosts has.
    other = paramiko.ECDSAKey.generate()
    known.write_text(f"{server['host']} {other.get_name()} {other.get_base64()}\n")
    [row] = SSHDockerDeployer(stage, pipeline="x", image_name="x", run_id="u").verify()
    assert "HOST KEY CHANGED" in row.error and "runner ssh-trust db" in row.error
    proc = runner_here("ssh-trust", "db", env=env)
    assert proc.returncode == 0 and "NOT the key" in proc.stderr
    assert known.read_text().startswith(f"{server['host']} {other.get_name()}")


def test_ssh_trust_through_a_jump_and_its_failures(lab, home):
    jump, server = lab["servers"][0], lab["servers"][1]
    (home / ".ssh" / "config").write_text(
        f"Host behind\n    HostName {server['host']}\n    ProxyJump {jump['host']}\n"
        f"    IdentityFile {jump['key_file']}\n"
        f"Host {jump['host']}\n    IdentityFile {jump['key_file']}\n")
    env = {"HOME": str(home)}
    # The jump host's own key is unknown: refused, naming the jump and what to run.
    proc = runner_here("ssh-trust", "behind", env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "unknown host key" in proc.stderr and f"runner ssh-trust {jump['host']}" in \
        proc.stderr
    (home / ".ssh" / "known_hosts").write_text(lab_known_line(lab, jump["host"]) + "\n")
    proc = runner_here("ssh-trust", "behind", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == lab_known_line(lab, server["host"])
    assert f"through {jump['host']}" in proc.stderr
    # Bad input and an unreachable host.
    assert runner_here("ssh-trust", "root@bad host", env=env).returncode == 2
    proc = runner_here("ssh-trust", "10.87.53.99", "--timeout", "1", env=env)
    assert proc.returncode == 1 and "10.87.53.99" in proc.stderr


def test_pipeline_settings_win_over_ssh_config(lab, home):
    jump, server = lab["servers"][0], lab["servers"][2]
    stranger = keygen(home / ".ssh" / "stranger")
    # Everything ~/.ssh/config says for this server would fail: wrong user, port, key,
    # known_hosts and an unreachable jump host.
    (home / ".ssh" / "config").write_text(
        f"Host {server['host']}\n    User nobody\n    Port 2222\n"
        f"    IdentityFile {stranger}\n    IdentitiesOnly yes\n"
        f"    ProxyJump root@10.87.53.99\n    UserKnownHostsFile /dev/null\n")
    stage = stage_for([server["host"]], "x", 1, user="root", port=22,
                      key_file=server["key_file"], known_hosts=server["known_hosts"],
                      jump=f"root@{jump['host']}:22")
    d = SSHDockerDeployer(stage, pipeline="x", image_name="x", run_id="w")
    try:
        [t] = d.targets
        assert (t.user, t.port, t.jump.host) == ("root", 22, jump["host"])
        conn = d.connection(t)
        assert conn.auth.startswith(f"ssh.key_file {server['key_file']}")
        assert client_address(conn) == jump["host"]
    finally:
        d.close()
    # Without them, ~/.ssh/config's settings are used, and fail saying so.
    bare = stage_for([server["host"]], "x", 1)
    [row] = SSHDockerDeployer(bare, pipeline="x", image_name="x", run_id="w").verify()
    assert "10.87.53.99" in row.error
