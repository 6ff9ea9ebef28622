"""SSH settings as users have them, without a server: ~/.ssh/config read through paramiko's
SSHConfig, the precedence of the pipeline's own settings over it, the user's known_hosts
files, and the order in which keys are offered (with a real ssh-agent)."""
from __future__ import annotations

import base64
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from deployers.spec import resolve_target, targets
from deployers.ssh_config import Hop, UserConfig, parse_hops
from deployers.host_keys import HostKeyPolicy, known_hosts_line
from deployers.ssh_errors import HostKeyError
from deployers.ssh_keys import load_private_key
from deployers.ssh_login import _Agent, _offers
from deployers.ssh_options import SSHOptions
from runner.model.deploy import DeploySettings


def start_agent(*keys: str) -> tuple[subprocess.Popen, str, str]:
    """A real ssh-agent of this test alone holding `keys`: (its process, its socket, the
    directory holding the socket). The socket lives in a short /tmp directory: a unix socket
    path is limited to about 100 bytes, which pytest's tmp_path can exceed."""
    d = tempfile.mkdtemp(prefix="ag")
    sock = os.path.join(d, "s")
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None, "ssh-agent exited at start"
            assert time.monotonic() < deadline, "ssh-agent did not make its socket"
            time.sleep(0.02)
        for key in keys:
            subprocess.run(["ssh-add", "-q", key], env={**os.environ, "SSH_AUTH_SOCK": sock},
                           check=True, capture_output=True, timeout=10)
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return proc, sock, d


@contextmanager
def ssh_agent(*keys: str):
    """start_agent as a context: yields the socket; the agent is stopped by its pid after."""
    proc, sock, d = start_agent(*keys)
    try:
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(d)


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", f"test {path.name}",
                    "-f", str(path)], check=True, timeout=30)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A user's home of the test's own: paramiko and the runner take ~ from $HOME."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return h


def write_config(home: Path, text: str) -> UserConfig:
    (home / ".ssh" / "config").write_text(text)
    return UserConfig.load()


def stage(**kw) -> DeploySettings:
    return DeploySettings.model_validate({"enabled": True, **kw})


# --------------------------------------------------------------------------- lookup

def test_alias_gives_hostname_user_port_identity_and_jump(home):
    cfg = write_config(home, """
Host web1 web2
    User first
Host web1
    HostName 10.0.0.1
    User deploy
    Port 2222
    IdentityFile ~/.ssh/web_key
    ProxyJump bastion
Host bastion
    HostName 192.0.2.10
    User jumper
Host *
    User fallback
    IdentityFile ~/.ssh/all_key
""")
    [t] = targets(stage(servers=["web1"]), cfg)
    # The first value of a setting wins (the more specific block above the general one);
    # IdentityFile values add up in order.
    assert (t.label, t.name, t.host, t.user, t.port) == ("web1", "web1", "10.0.0.1", "first",
                                                         2222)
    assert t.identity_files == (f"{home}/.ssh/web_key", f"{home}/.ssh/all_key")
    assert t.identity_default is False
    assert t.jump is not None and (t.jump.label, t.jump.host, t.jump.user, t.jump.port) == (
        "jump bastion", "192.0.2.10", "jumper", 22)
    assert [h.host for h in t.route] == ["192.0.2.10", "10.0.0.1"]
    assert t.known_hosts[0] == f"{home}/.ssh/known_hosts"
    assert "/etc/ssh/ssh_known_hosts" in t.known_hosts


def test_a_name_without_a_block_is_used_as_written_with_the_default_keys(home):
    cfg = write_config(home, "Host other\n  User x\n")
    [t] = targets(stage(servers=["10.0.0.7"]), cfg)
    assert (t.host, t.user, t.port, t.jump) == ("10.0.0.7", "root", 22, None)
    assert t.identity_default and t.identity_files == tuple(
        f"{home}/.ssh/{n}" for n in ("id_ed25519", "id_ecdsa", "id_rsa"))
    assert t.agent is None  # no SSH_AUTH_SOCK in this test's environment


def test_an_alias_with_an_underscore_is_a_server_name(home):
    cfg = write_config(home, "Host web_1\n  HostName 10.0.0.8\n")
    [t] = targets(stage(servers=["web_1"]), cfg)
    assert (t.host, t.label) == ("10.0.0.8", "web_1")


def test_no_config_file_and_no_user_setup_at_all(home):
    cfg = UserConfig.load()
    assert cfg.error is None
    [t] = targets(stage(servers=["web1"]), cfg)
    assert (t.host, t.user, t.port, t.problem) == ("web1", "root", 22, None)
    # Without a UserConfig (a pure plan), nothing of the user's own setup is used.
    [bare] = targets(stage(servers=["web1"]))
    assert bare.identity_files == () and bare.known_hosts == () and bare.agent is None


# --------------------------------------------------------------------------- precedence

PRECEDENCE_CONFIG = """
Host web1
    HostName 10.0.0.1
    User cfguser
    Port 2200
    ProxyJump cfgjump
    UserKnownHostsFile ~/.ssh/cfg_known_hosts
Host cfgjump
    HostName 192.0.2.1
Host pipejump
    HostName 192.0.2.2
    User jumpcfguser
    Port 2022
"""


@pytest.mark.parametrize("ssh, server, want", [
    # Nothing in the pipeline: ~/.ssh/config's values.
    ({}, "web1", ("cfguser", 2200, "192.0.2.1")),
    # ssh.user / ssh.port win over User / Port; the server's own user@ and :port over both.
    ({"user": "ops", "port": 22}, "web1", ("ops", 22, "192.0.2.1")),
    ({"user": "ops", "port": 22}, "me@web1:2345", ("me", 2345, "192.0.2.1")),
    # ssh.jump wins over ProxyJump (and is itself looked up: an alias with its own HostName).
    ({"jump": "pipejump"}, "web1", ("cfguser", 2200, "192.0.2.2")),
])
def test_pipeline_settings_win_over_ssh_config(home, ssh, server, want):
    cfg = write_config(home, PRECEDENCE_CONFIG)
    [t] = targets(stage(servers=[server], ssh=ssh), cfg)
    assert (t.user, t.port, t.jump.host) == want
    assert t.host == "10.0.0.1"


def test_jump_user_and_port_rank(home):
    cfg = write_config(home, PRECEDENCE_CONFIG)
    # Written in ssh.jump, then the jump host's own User / Port, then ssh.user (or root), 22.
    [t] = targets(stage(servers=["web1"], ssh={"jump": "pipejump", "user": "ops"}), cfg)
    assert (t.jump.user, t.jump.port) == ("jumpcfguser", 2022)
    [t] = targets(stage(servers=["web1"], ssh={"jump": "x@pipejump:23", "user": "ops"}), cfg)
    assert (t.jump.user, t.jump.port, t.jump_written) == ("x", 23, "x@pipejump:23")
    [t] = targets(stage(servers=["web1"], ssh={"jump": "10.9.9.9", "user": "ops"}), cfg)
    assert (t.jump.user, t.jump.port) == ("ops", 22)
    # From ProxyJump, the jump is not the pipeline's: ssh-trust finds it again by itself.
    [t] = targets(stage(servers=["web1"]), cfg)
    assert t.jump_written is None


def test_known_hosts_rank(home):
    """Pinned key, then ssh.known_hosts, then UserKnownHostsFile / ~/.ssh/known_hosts."""
    cfg = write_config(home, PRECEDENCE_CONFIG)
    real = paramiko.ECDSAKey.generate()
    other = paramiko.ECDSAKey.generate()
    (home / ".ssh" / "cfg_known_hosts").write_text(f"10.0.0.1 {_b64(real)}\n")
    pipeline_file = home / "pipeline_known_hosts"
    pipeline_file.write_text(f"[10.0.0.1]:2200 {_b64(other)}\n")
    [t] = targets(stage(servers=["web1"]), cfg)
    assert t.known_hosts[0] == f"{home}/.ssh/cfg_known_hosts"
    # UserKnownHostsFile: looked up as HostName with the port, as OpenSSH does.
    with pytest.raises(HostKeyError, match="unknown host key"):
        HostKeyPolicy().check_target(t, real)
    (home / ".ssh" / "cfg_known_hosts").write_text(f"[10.0.0.1]:2200 {_b64(real)}\n")
    HostKeyPolicy().check_target(t, real)
    # ssh.known_hosts replaces the user's files.
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
        HostKeyPolicy(str(pipeline_file)).check_target(t, real)
    HostKeyPolicy(str(pipeline_file)).check_target(t, other)
    # A pinned key wins over both.
    [pinned] = targets(stage(servers=["web1"], ssh={"host_key": _b64(other)}), cfg)
    HostKeyPolicy().check_target(pinned, other)
    with pytest.raises(HostKeyError, match="pinned"):
        HostKeyPolicy().check_target(pinned, real)


# --------------------------------------------------------------------------- problems

def test_proxy_command_is_refused_not_ignored(home):
    cfg = write_config(home, "Host viacmd\n    ProxyCommand nc %h %p\n")
    [t] = targets(stage(servers=["viacmd"]), cfg)
    assert t.problem and "ProxyCommand" in t.problem and "ProxyJump" in t.problem
    # An explicit ssh.jump replaces ProxyCommand: nothing is refused then.
    [j] = targets(stage(servers=["viacmd"], ssh={"jump": "10.0.0.9"}), cfg)
    assert j.problem is None and j.jump.host == "10.0.0.9"


def test_match_exec_is_refused_and_never_run(home):
    marker = home / "ran"
    cfg = write_config(home, f'Match host web* exec "touch {marker}"\n    User never\n'
                             f'Host *\n    User u\n')
    [t, other] = targets(stage(servers=["web1", "db1"]), cfg)
    assert t.problem and "Match exec" in t.problem
    # The criteria before `exec` do not apply to db1: nothing to refuse there.
    assert other.problem is None and other.user == "u"
    assert not marker.exists()


def test_unreadable_config_is_each_servers_problem(home):
    cfg = write_config(home, "Host web1\n  HostName\n")
    assert cfg.error
    ts = targets(stage(servers=["web1", "web2"]), cfg)
    assert all(t.problem and "~/.ssh/config" in t.problem for t in ts)


def test_proxy_jump_chains_and_loops(home):
    cfg = write_config(home, """
Host web
    ProxyJump a,deploy@b:2200
Host a
    HostName 192.0.2.1
    ProxyJump outer
Host outer
    HostName 192.0.2.100
Host loop1
    ProxyJump loop2
Host loop2
    ProxyJump loop1
""")
    [t] = targets(stage(servers=["web"]), cfg)
    # ProxyJump a,b: a first (with a's own ProxyJump before it), then b, then the target.
    assert [(h.name, h.host, h.port) for h in t.route] == [
        ("outer", "192.0.2.100", 22), ("a", "192.0.2.1", 22), ("b", "b", 2200),
        ("web", "web", 22)]
    assert t.jump.user == "deploy"
    [loop] = targets(stage(servers=["loop1"]), cfg)
    problems = [h.problem for h in loop.route if h.problem]
    assert problems and "loop" in problems[0]
    assert parse_hops("ssh://u@h:1,[::1]:2") == (Hop("h", "u", 1), Hop("[::1]", None, 2))
    assert parse_hops("none") == ()


def test_include_is_followed(home):
    d = home / ".ssh" / "config.d"
    d.mkdir()
    (d / "10-web.conf").write_text("Host web1\n    HostName 10.0.0.1\n    User inc\n")
    (d / "20-settings").write_text("    Port 2201\n")
    cfg = write_config(home, "Include config.d/*.conf\n"
                             "Host web1\n    Include ~/.ssh/config.d/20-settings\n"
                             "    IdentityFile ~/.ssh/after_include\n"
                             "Host *\n    User later\n")
    [t] = targets(stage(servers=["web1"]), cfg)
    assert (t.host, t.user, t.port) == ("10.0.0.1", "inc", 2201)
    # A setting after an Include inside a block still belongs to that block.
    assert t.identity_files == (f"{home}/.ssh/after_include",)
    [other] = targets(stage(servers=["web9"]), cfg)
    assert (other.user, other.port) == ("later", 22)
    # A file included inside a block may hold no Host line: inlined, it would apply on its own.
    (d / "20-settings").write_text("Host sneaky\n    User x\n")
    cfg = UserConfig.load()
    assert cfg.error and "not supported" in cfg.error


# --------------------------------------------------------------------------- host keys

def _b64(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {base64.b64encode(key.asbytes()).decode()}"


def test_known_hosts_patterns_revoked_and_alias(tmp_path):
    real = paramiko.ECDSAKey.generate()
    bad = paramiko.ECDSAKey.generate()
    kh = tmp_path / "kh"
    kh.write_text(f"*.example.com,!evil.example.com {_b64(real)}\n"
                  f"10.0.0.? {_b64(real)}\n"
                  f"@revoked * {_b64(bad)}\n"
                  f"* {_b64(bad)}\n"
                  f"myalias {_b64(real)}\n")
    p = HostKeyPolicy(str(kh))
    p.check("s", "web.example.com", 22, real)
    p.check("s", "WEB.Example.com", 22, real)  # host names compare in lower case
    p.check("s", "10.0.0.5", 22, real)
    with pytest.raises(HostKeyError, match="CHANGED"):
        p.check("s", "evil.example.com", 22, real)  # negated: only the `*` entry applies
    with pytest.raises(HostKeyError, match="revoked"):
        p.check("s", "anything", 22, bad)  # listed by `*` too, but revoked wins
    # HostKeyAlias: the key is looked up under the alias, without the port.
    p.check("s", "10.9.9.9", 2222, real, alias="myalias")


def test_unknown_key_with_default_files_points_at_ssh_trust(home):
    cfg = UserConfig.load()
    [t] = targets(stage(servers=["deploy@web1:2222"]), cfg)
    key = paramiko.ECDSAKey.generate()
    with pytest.raises(HostKeyError) as err:
        HostKeyPolicy().check_target(t, key)
    msg = str(err.value)
    assert f"{home}/.ssh/known_hosts, which does not exist" in msg
    assert "`runner ssh-trust web1:2222`" in msg
    # The line ssh-trust prints is the one the check looks for.
    (home / ".ssh" / "known_hosts").write_text(known_hosts_line(t, key) + "\n")
    HostKeyPolicy().check_target(t, key)
    # A jump written in the pipeline goes into the hint: ssh-trust could not find it alone.
    [j] = targets(stage(servers=["web1"], ssh={"jump": "root@10.0.0.9"}), cfg)
    with pytest.raises(HostKeyError, match=r"runner ssh-trust web1 --jump root@10.0.0.9`"):
        HostKeyPolicy().check_target(j, paramiko.ECDSAKey.generate())


# --------------------------------------------------------------------------- keys

def test_keys_are_offered_pipeline_first_then_agent_then_identity_files(home):
    ssh = home / ".ssh"
    pipeline_key = keygen(home / "pipeline_key")
    agent_key = keygen(home / "agent_key")
    id_file = keygen(ssh / "id_ed25519")
    locked = keygen(ssh / "locked", passphrase="secret phrase")
    cfg = write_config(home, f"Host web1\n    IdentityFile ~/.ssh/id_ed25519\n"
                             f"    IdentityFile ~/.ssh/locked\n"
                             f"    IdentityFile ~/.ssh/missing\n")
    opts = SSHOptions(key=load_private_key(path=str(pipeline_key)), key_label="ssh.key_file K")
    with ssh_agent(str(agent_key), str(id_file)) as sock:
        cfg.agent_socket = sock
        [t] = targets(stage(servers=["web1"]), cfg)
        assert t.agent == sock
        agent = _Agent(sock, 5)
        try:
            offers, notes = _offers(t, opts, agent)
        finally:
            agent.close()
        whats = [o.what for o in offers]
        assert whats[0].startswith("ssh.key_file K (ssh-ed25519 SHA256:")
        assert [w.split(" ")[0] for w in whats[1:3]] == ["ssh-agent", "ssh-agent"]
        assert "test agent_key" in whats[1]  # the agent's comment helps tell keys apart
        assert whats[3].startswith(f"{ssh}/id_ed25519 (")
        assert any("locked: encrypted" in n and "ssh-agent" in n for n in notes)
        assert any("missing: not found" in n for n in notes)
        # Nothing of a key's content is in any description.
        for path in (pipeline_key, agent_key, id_file):
            body = "".join(Path(path).read_text().splitlines()[1:-1])
            pub = Path(f"{path}.pub").read_text().split()[1]
            assert all(body[:40] not in w and pub not in w for w in whats + notes)

        # IdentitiesOnly: of the agent's keys, only those of an identity file.
        cfg = write_config(home, "Host web1\n    IdentityFile ~/.ssh/id_ed25519\n"
                                 "    IdentitiesOnly yes\n")
        cfg.agent_socket = sock
        [t] = targets(stage(servers=["web1"]), cfg)
        agent = _Agent(sock, 5)
        try:
            offers, _ = _offers(t, SSHOptions(), agent)
        finally:
            agent.close()
        assert [o.what.split(" ")[0] for o in offers] == ["ssh-agent", f"{ssh}/id_ed25519"]
        assert offers[0].key.asbytes() == offers[1].key.asbytes()  # offered once (dedup at auth)

        # IdentityAgent none: no agent for that host.
        cfg = write_config(home, "Host web1\n    IdentityAgent none\n")
        cfg.agent_socket = sock
        [t] = targets(stage(servers=["web1"]), cfg)
        assert t.agent is None


def test_agent_socket_from_environment(home, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/some/agent.sock")
    monkeypatch.setenv("OTHER_SOCK", "/run/other.sock")
    cfg = write_config(home, "Host viaenv\n    IdentityAgent $OTHER_SOCK\n"
                             "Host viapath\n    IdentityAgent ~/agent.%u\n")
    ts = {t.name: t for t in targets(stage(servers=["web", "viaenv", "viapath"]), cfg)}
    assert ts["web"].agent == "/run/some/agent.sock"
    assert ts["viaenv"].agent == "/run/other.sock"
    assert ts["viapath"].agent.startswith(f"{home}/agent.")


def test_resolve_target_for_a_bare_name(home):
    cfg = write_config(home, "Host b\n    HostName 192.0.2.7\n    Port 2022\n")
    t = resolve_target("b", config=cfg, jump=parse_hops("u@j1,j2"), jump_written="u@j1,j2")
    assert (t.host, t.port, t.label) == ("192.0.2.7", 2022, "b")
    assert [(h.name, h.user) for h in t.route] == [("j1", "u"), ("j2", "root"), ("b", "root")]
