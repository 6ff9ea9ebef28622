"""The real lab (the session `lab` fixture runs `runner lab up --json`): SSH with pinned host
keys to each server's own engine, a registry round trip to a server that serves HTTP to the
host, `env`, and `up` again as a no-op. Whatever a test creates on the servers it removes.
The layout by equality: tests/unit/test_lab.py."""

from __future__ import annotations

import json

import os

import shlex

import subprocess


import time

import urllib.request

import uuid

from pathlib import Path

import paramiko


from runner_lab import host, layout


from tests.helpers import lab_cli, lab_env_printed



_runner = lab_cli



def _ssh(server: dict) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(server["known_hosts"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(server["host"], port=server["port"], username=server["user"],
                   key_filename=server["key_file"], look_for_keys=False, allow_agent=False,
                   timeout=10)
    return client



def _run(client: paramiko.SSHClient, argv: list[str], timeout: float = 60) -> tuple[int, str]:
    # the one place a remote shell line is made: every argument quoted
    _in, out, err = client.exec_command(shlex.join(argv), timeout=timeout)
    code = out.channel.recv_exit_status()
    return code, out.read().decode() + err.read().decode()



def test_up_json_describes_three_servers(lab):
    assert lab["registry"] == "10.87.53.1:5000"
    assert lab["auth_registry"]["address"] == "10.87.53.1:5001"
    assert lab["auth_registry"]["username"] == "lab"
    assert Path(lab["auth_registry"]["password_file"]).is_file()
    assert lab["docker_host"] == "unix:///run/runner-lab/docker.sock"
    assert lab["proxy_image"] == "10.87.53.1:5000/runner/caddy:2"
    names = [s["name"] for s in lab["servers"]]
    assert names[:3] == ["srv1", "srv2", "srv3"]
    for s in lab["servers"]:
        assert Path(s["key_file"]).is_file() and Path(s["known_hosts"]).is_file()



def test_ssh_reaches_each_servers_own_engine(lab):
    ids = set()
    for server in lab["servers"]:
        own_id = host.docker_info(Path(server["docker_host"][len("unix://"):]))["DockerRootDir"]
        with _ssh(server) as client:
            code, out = _run(client, ["docker", "info", "--format", "{{.DockerRootDir}}"])
        assert code == 0, out
        assert out.strip() == own_id, f"{server['name']} ssh session used another engine"
        ids.add(own_id)
    assert len(ids) == len(lab["servers"])



def test_a_server_pulls_from_the_registry_and_serves_the_host(lab):
    docker = [os.environ.get("RUNNER_TEST_DOCKER", "docker"), "-H", lab["docker_host"]]
    ref = f"{lab['registry']}/labtest/busybox:{uuid.uuid4().hex[:10]}"
    subprocess.run(docker + ["tag", layout.BUSYBOX_IMAGE, ref], check=True, capture_output=True)
    try:
        push = subprocess.run(docker + ["push", ref], capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stdout + push.stderr
    finally:
        subprocess.run(docker + ["rmi", ref], capture_output=True)
    server = lab["servers"][-1]
    name = f"labtest-{uuid.uuid4().hex[:8]}"
    with _ssh(server) as client:
        try:
            code, out = _run(client, ["docker", "pull", ref])
            assert code == 0, out
            # a random host port: other sessions (the bench) publish fixed ones on the servers
            code, out = _run(client, ["docker", "run", "-d", "--name", name, "-p", "8080",
                                      ref, "sh", "-c",
                                      "echo lab-ok > /tmp/index.html && exec httpd -f -p 8080 -h /tmp"])
            assert code == 0, out
            code, out = _run(client, ["docker", "port", name, "8080/tcp"])
            assert code == 0, out
            port = out.splitlines()[0].rsplit(":", 1)[1]
            body, deadline = "", time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://{server['host']}:{port}/index.html",
                                                timeout=2) as resp:
                        body = resp.read().decode()
                    break
                except OSError:
                    time.sleep(0.2)
            assert body.strip() == "lab-ok"
        finally:
            _run(client, ["docker", "rm", "-f", name])
            _run(client, ["docker", "rmi", ref])



def test_env_output_is_shell_parseable(lab):
    values = lab_env_printed()
    assert values["REGISTRY"] == lab["registry"]
    assert values["DOCKER_HOST"] == lab["docker_host"]
    hosts = values["DEPLOY_HOSTS"].split(",")
    assert hosts[:3] == ["root@10.87.53.11:22", "root@10.87.53.12:22", "root@10.87.53.13:22"]
    assert values["SSH_KEY_FILE"] == lab["servers"][0]["key_file"]
    assert values["KNOWN_HOSTS_FILE"] == lab["servers"][0]["known_hosts"]
    assert values["AUTH_REGISTRY"] == lab["auth_registry"]["address"]
    assert values["AUTH_REGISTRY_USER"] == lab["auth_registry"]["username"]
    assert values["AUTH_REGISTRY_PASSWORD_FILE"] == lab["auth_registry"]["password_file"]
    assert values["PROXY_IMAGE"] == lab["proxy_image"] == "10.87.53.1:5000/runner/caddy:2"



def test_up_again_is_a_no_op(lab):
    state_file = Path(lab["servers"][0]["key_file"]).parent.parent / "state.json"
    before = json.loads(state_file.read_text())["procs"]
    started = time.monotonic()
    proc = _runner("up", "--servers", str(len(lab["servers"])), "--json")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    # Other tests (the bench smoke test) may have added servers; `up` never removes any.
    again = json.loads(proc.stdout)
    assert {k: v for k, v in again.items() if k != "servers"} == \
        {k: v for k, v in lab.items() if k != "servers"}
    assert again["servers"][:len(lab["servers"])] == lab["servers"]
    print(f"up on a running lab took {elapsed:.1f}s")
    after = json.loads(state_file.read_text())["procs"]
    assert {k: v["pid"] for k, v in after.items()} == {k: v["pid"] for k, v in before.items()}
    status = _runner("status", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["up"] is True

