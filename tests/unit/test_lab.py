"""The lab's fixed layout, checked by equality (runs anywhere, no root): names and addresses,
config files, commands, the lines `env` prints. The real lab: tests/lab/test_lab.py."""

from __future__ import annotations

import json

import os


import subprocess

import sys

import time



from pathlib import Path


import pytest

from runner_lab import host, layout

from runner_lab.layout import LabServer




ROOT = Path(__file__).resolve().parents[2]



STATE = Path("/var/lib/runner-lab")



def test_server_layout_names_and_addresses():
    s = LabServer(2, STATE)
    assert (s.name, s.ip, s.netns, s.veth) == ("srv2", "10.87.53.12", "rlab-srv2", "rlab-v2")
    assert s.docker_host == "unix:///run/runner-lab/srv2/docker.sock"
    assert layout.server_net_cmds(s) == [
        ["ip", "netns", "add", "rlab-srv2"],
        ["ip", "link", "add", "rlab-v2", "type", "veth", "peer", "name", "eth0", "netns", "rlab-srv2"],
        ["ip", "-n", "rlab-srv2", "link", "set", "lo", "up"],
        ["ip", "-n", "rlab-srv2", "addr", "add", "10.87.53.12/24", "dev", "eth0"],
        ["ip", "-n", "rlab-srv2", "link", "set", "eth0", "up"],
        ["ip", "-n", "rlab-srv2", "route", "add", "default", "via", "10.87.53.1"],
        ["ip", "link", "set", "rlab-v2", "master", "rlab0"],
        ["ip", "link", "set", "rlab-v2", "up"],
        ["ip", "neigh", "flush", "to", "10.87.53.12", "dev", "rlab0"],
    ]
    argv = layout.server_dockerd_argv(s)
    assert argv[:3] == ["nsenter", "--net=/var/run/netns/rlab-srv2", "dockerd"]
    assert ["-H", "unix:///run/runner-lab/srv2/docker.sock"] == argv[argv.index("-H"):argv.index("-H") + 2]
    assert "10.87.53.1:5000" in argv



def test_every_lab_engine_treats_both_registries_as_insecure():
    for argv in (layout.build_dockerd_argv(STATE), layout.server_dockerd_argv(LabServer(3, STATE))):
        flags = [argv[i + 1] for i, a in enumerate(argv) if a == "--insecure-registry"]
        assert flags == ["10.87.53.1:5000", "10.87.53.1:5001"]



def test_running_engine_is_compared_with_what_up_would_start_now():
    s = LabServer(2, STATE)
    wanted = layout.server_dockerd_argv(s)
    # nsenter execs dockerd in place: /proc/PID/cmdline shows only dockerd's own argv
    running = wanted[2:]
    assert running[0] == "dockerd"
    assert layout.runs_as_started(running, wanted)
    assert layout.runs_as_started(["/usr/sbin/dockerd", *running[1:]], wanted)
    # a lab brought up before the second registry existed
    i = running.index("10.87.53.1:5001")
    older = running[:i - 1] + running[i + 1:]
    assert not layout.runs_as_started(older, wanted)
    assert not layout.runs_as_started(running, layout.server_dockerd_argv(LabServer(3, STATE)))
    build = layout.build_dockerd_argv(STATE)
    assert layout.runs_as_started(list(build), build)
    assert not layout.runs_as_started(build[:-2], build)
    assert not layout.runs_as_started(["containerd", *build[1:]], build)



def test_cmdline_of_a_recorded_process_is_what_it_runs(tmp_path):
    argv = [sys.executable, "-c", "import sys; sys.stdin.read()", "--marker", str(tmp_path)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        rec = {"pid": proc.pid, "start": host.start_time(proc.pid)}
        deadline = time.monotonic() + 10
        while host.cmdline(rec) != argv and time.monotonic() < deadline:
            time.sleep(0.05)  # between fork and exec it still shows pytest's argv
        assert host.cmdline(rec) == argv
        assert layout.runs_as_started(host.cmdline(rec), argv)
        assert host.cmdline({**rec, "start": rec["start"] + 1}) is None  # a reused pid
    finally:
        proc.stdin.close()
        proc.wait()
    assert host.cmdline(rec) is None



def test_auth_registry_config_requires_htpasswd_login():
    state = Path("/tmp/lab")
    text = layout.auth_registry_config(state)
    assert "  addr: 10.87.53.1:5001\n" in text
    assert "    rootdirectory: /tmp/lab/auth-registry\n" in text
    assert ("auth:\n  htpasswd:\n    realm: runner-lab\n"
            "    path: /tmp/lab/auth-registry.htpasswd\n") in text
    assert "rootdirectory: /tmp/lab/registry\n" in layout.registry_config(state)  # apart
    assert layout.auth_registry_argv(state) == ["docker-registry", "serve",
                                                "/tmp/lab/auth-registry.yml"]
    assert layout.htpasswd_entry("x:1\nlab:$2b$06$abc\n", "lab") == "$2b$06$abc"
    assert layout.htpasswd_entry("labx:$2b$\n", "lab") is None



def test_auth_registry_password_is_made_once_and_kept_private(tmp_path):
    import bcrypt

    from runner_lab.registries import ensure_auth_credentials
    from runner_lab.state import State

    state = State(tmp_path, log=lambda msg: None)
    assert ensure_auth_credentials(state) is True
    pw_file = tmp_path / "auth-registry.password"
    password = pw_file.read_text().strip()
    assert len(password) == 32
    assert pw_file.stat().st_mode & 0o777 == 0o600
    htpasswd = tmp_path / "auth-registry.htpasswd"
    assert htpasswd.stat().st_mode & 0o777 == 0o600
    user, hashed = htpasswd.read_text().strip().split(":", 1)
    assert user == "lab" and hashed.startswith("$2")
    assert bcrypt.checkpw(password.encode(), hashed.encode())
    # reused, not made again; the htpasswd is left alone while it matches
    assert ensure_auth_credentials(state) is False
    assert pw_file.read_text().strip() == password
    assert htpasswd.read_text().strip() == f"lab:{hashed}"
    # an htpasswd that does not match the password file is written again
    htpasswd.write_text("lab:$2b$06$" + "x" * 53 + "\n")
    assert ensure_auth_credentials(state) is True
    assert bcrypt.checkpw(password.encode(),
                          htpasswd.read_text().strip().split(":", 1)[1].encode())
    pw_file.chmod(0o644)
    assert ensure_auth_credentials(state) is False
    assert pw_file.stat().st_mode & 0o777 == 0o600



def test_sshd_config_points_sessions_at_the_servers_engine():
    text = layout.sshd_config(LabServer(1, STATE))
    assert "ListenAddress 10.87.53.11:22" in text.splitlines()
    assert "SetEnv DOCKER_HOST=unix:///run/runner-lab/srv1/docker.sock" in text.splitlines()
    assert "PasswordAuthentication no" in text.splitlines()
    assert "PermitRootLogin prohibit-password" in text.splitlines()



def test_describe_and_env_lines_quote_values():
    state = Path("/tmp/lab dir")
    info = layout.describe(state, [LabServer(1, state), LabServer(2, state)])
    assert info["registry"] == "10.87.53.1:5000"
    assert info["auth_registry"] == {"address": "10.87.53.1:5001", "username": "lab",
                                     "password_file": "/tmp/lab dir/auth-registry.password"}
    assert info["docker_host"] == "unix:///run/runner-lab/docker.sock"
    assert info["proxy_image"] == "10.87.53.1:5000/runner/caddy:2"
    assert info["servers"][1] == {
        "name": "srv2", "host": "10.87.53.12", "port": 22, "user": "root",
        "key_file": "/tmp/lab dir/ssh/id_ed25519", "known_hosts": "/tmp/lab dir/ssh/known_hosts",
        "docker_host": "unix:///run/runner-lab/srv2/docker.sock",
    }
    lines = layout.env_lines(info)
    assert lines == [
        "export REGISTRY=10.87.53.1:5000",
        "export DOCKER_HOST=unix:///run/runner-lab/docker.sock",
        "export DEPLOY_HOSTS=root@10.87.53.11:22,root@10.87.53.12:22",
        "export SSH_KEY_FILE='/tmp/lab dir/ssh/id_ed25519'",
        "export KNOWN_HOSTS_FILE='/tmp/lab dir/ssh/known_hosts'",
        "export AUTH_REGISTRY=10.87.53.1:5001",
        "export AUTH_REGISTRY_USER=lab",
        "export AUTH_REGISTRY_PASSWORD_FILE='/tmp/lab dir/auth-registry.password'",
        "export TOKEN_REGISTRY=127.0.0.1:5002",
        "export TOKEN_REGISTRY_USER=lab",
        "export TOKEN_REGISTRY_PASSWORD_FILE='/tmp/lab dir/token-registry.password'",
        "export PROXY_IMAGE=10.87.53.1:5000/runner/caddy:2",
        "export RUNNER_DATABASE_URL=''",  # no password made yet: see test_lab_postgres.py
    ]



def test_proxy_image_is_built_from_debians_caddy_on_the_python_image():
    state = Path("/tmp/lab")
    assert layout.PROXY_IMAGE == "10.87.53.1:5000/runner/caddy:2"
    assert layout.proxy_cache(state) == Path("/tmp/lab/cache/caddy")
    assert layout.apt_download_argv() == ["apt-get", "download", "caddy"]
    assert layout.apt_update_argv() == ["apt-get", "update"]
    assert layout.dpkg_extract_argv(Path("/c/caddy_2.6.2-5_amd64.deb"), Path("/c/root")) == \
        ["dpkg-deb", "-x", "/c/caddy_2.6.2-5_amd64.deb", "/c/root"]
    assert layout.proxy_build_argv(Path("/tmp/lab/cache/caddy")) == [
        "/usr/bin/docker", "-H", "unix:///run/runner-lab/docker.sock", "build",
        "--progress=plain", "-t", "10.87.53.1:5000/runner/caddy:2", "/tmp/lab/cache/caddy"]
    assert layout.proxy_build_env() == {"DOCKER_BUILDKIT": "1"}
    assert layout.proxy_check_argv() == [
        "/usr/bin/docker", "-H", "unix:///run/runner-lab/docker.sock", "run", "--rm",
        "--network", "none", "10.87.53.1:5000/runner/caddy:2", "caddy", "version"]
    assert layout.proxy_push_argv() == [
        "/usr/bin/docker", "-H", "unix:///run/runner-lab/docker.sock", "push",
        "10.87.53.1:5000/runner/caddy:2"]
    recipe = layout.proxy_recipe()
    assert len(recipe) == 16 and recipe == layout.proxy_recipe()
    assert layout.proxy_dockerfile("2.6.2") == (
        "FROM local/python:3.11\n"
        "COPY caddy /usr/bin/caddy\n"
        "COPY init.json /etc/caddy/init.json\n"
        "RUN mkdir -p /etc/caddy /data /config /srv\n"
        "ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data\n"
        "LABEL org.opencontainers.image.title=caddy org.opencontainers.image.version=2.6.2\n"
        "EXPOSE 80 443\n"
        "WORKDIR /srv\n"
        'CMD ["caddy", "run", "--config", "/etc/caddy/init.json"]\n'
        f"LABEL runner.lab.recipe={recipe}\n")
    assert json.loads(layout.proxy_init_config()) == {"admin": {"listen": "localhost:2019"}}



@pytest.mark.parametrize("filename, version", [
    ("caddy_2.6.2-5_amd64.deb", "2.6.2"),
    ("caddy_1%3a2.7.0-1+b1_amd64.deb", "2.7.0"),
    ("caddy_2.6.2_all.deb", "2.6.2"),
    ("caddy.deb", None),
])
def test_deb_version_is_read_from_the_file_name(filename, version):
    assert layout.deb_version(filename) == version



def test_known_hosts_line_from_host_public_key():
    pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFEX srv1\n"
    assert layout.known_hosts_line(LabServer(1, STATE), pub) == "10.87.53.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFEX"



@pytest.mark.parametrize("sources, mirror", [
    ({"debian.sources": "Types: deb\n# http://snapshot.debian.org/x\nURIs: http://deb.debian.org/debian\n"
                        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
                        "Types: deb\nURIs: http://deb.debian.org/debian-security\n"
                        "Suites: bookworm-security\nComponents: main\n"},
     "http://deb.debian.org/debian"),
    ({"sources.list": "deb http://security.debian.org/debian-security bookworm-security main\n"
                      "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"},
     "http://mirror.example/debian"),
    ({"sources.list": "deb http://archive.ubuntu.com/ubuntu jammy main\n"}, None),
])
def test_apt_mirror_is_read_from_apt_sources(sources, mirror):
    assert layout.apt_mirror(sources) == mirror



def test_not_root_is_a_clear_error_with_exit_2(monkeypatch):
    from click.testing import CliRunner

    from runner_lab.cli import lab as lab_group

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for args in (["up", "--servers", "1"], ["down"], ["status", "--json"]):
        result = CliRunner().invoke(lab_group, args)
        assert result.exit_code == 2, result.output
        assert "needs root" in result.output



def test_down_deletes_only_the_build_bridges_iptables_rules():
    captured = (  # `iptables -t nat -S` after the build engine ran (plus a foreign rule)
        "-P PREROUTING ACCEPT\n"
        "-N DOCKER\n"
        "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n"
        "-A POSTROUTING -s 10.87.54.0/24 ! -o rlabb0 -j MASQUERADE\n"
        "-A DOCKER -i rlabb0 -j RETURN\n"
    )
    assert layout.build_bridge_rule_deletions("nat", captured) == [
        ["iptables", "-w", "-t", "nat", "-D", "POSTROUTING", "-s", "10.87.54.0/24", "!", "-o",
         "rlabb0", "-j", "MASQUERADE"],
        ["iptables", "-w", "-t", "nat", "-D", "DOCKER", "-i", "rlabb0", "-j", "RETURN"],
    ]

