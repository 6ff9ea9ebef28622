"""Pure tests of the deploy: model, spec, commands (exact argv), inspect parsing, poller,
host key policy, plan. No SSH, no docker."""
from __future__ import annotations

import base64
import json
import threading

import paramiko
import pytest
from pydantic import ValidationError

from deployers import commands as cmd
from deployers.health import (ContainerState, ProbeResult, parse_http_status, parse_inspect,
                              parse_state, wait_healthy)
from deployers.spec import (HealthSpec, batches, container_spec, env_file_content,
                            fingerprint, targets)
from deployers.host_keys import HostKeyPolicy
from deployers.ssh_connection import remote_command
from deployers.ssh_errors import HostKeyError
from runner.errors import Cancelled
from runner.model.deploy import DeploySettings, parse_server
from runner.model.image import ImageRef

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
REF = f"10.87.53.1:5000/demo/app@{D1}"
IMG = ImageRef.parse(REF)


def stage(**kw) -> DeploySettings:
    base = {"enabled": True, "servers": "root@10.0.0.1:22,deploy@10.0.0.2:2222,10.0.0.3"}
    base.update(kw)
    return DeploySettings.model_validate(base)


# --------------------------------------------------------------------------- model

def test_servers_from_comma_string_and_list():
    s = stage()
    assert [(t.user, t.host, t.port, t.label) for t in targets(s)] == [
        ("root", "10.0.0.1", 22, "10.0.0.1"),
        ("deploy", "10.0.0.2", 2222, "10.0.0.2:2222"),
        ("root", "10.0.0.3", 22, "10.0.0.3"),
    ]
    s2 = stage(servers=["a.example", {"host": "b.example", "name": "web-b", "port": 2200}],
               ssh={"user": "ops", "port": 2022})
    assert [(t.user, t.host, t.port, t.label) for t in targets(s2)] == [
        ("ops", "a.example", 2022, "a.example"), ("ops", "b.example", 2200, "web-b")]
    assert parse_server("[fe80::1]:2200") == {"host": "[fe80::1]", "port": 2200}


@pytest.mark.parametrize("bad", [
    {"servers": "root@bad host"},
    {"servers": "root@host:notaport"},
    {"servers": ""},  # enabled without servers
    {"servers": "a,a"},
    {"ssh": {"key_file": "/k", "key": "sshkey"}},
    {"ssh": {"jump": "root@bad host:22"}},
    {"container": {"ports": ["80:99999"]}},
    {"container": {"env": {"1BAD": "x"}}},
    {"container": {"env": {"OK": "line1\nline2"}}},
    {"container": {"restart": "sometimes"}},
    {"healthcheck": {"cmd": "true", "http": {"port": 80}}},
    {"healthcheck": {"http": {"port": 80, "path": "/a b"}}},
    {"strategy": "random"},
    {"unknown_key": 1},
])
def test_model_refuses_bad_settings(bad):
    with pytest.raises(ValidationError):
        stage(**bad)


def test_model_defaults_and_shorthands():
    s = stage(strategy="canary", container={"command": "httpd -f -p 8080"})
    assert s.strategy.type == "canary" and s.strategy.on_failure == "rollback_all"
    assert s.container.command == ("httpd", "-f", "-p", "8080")
    assert s.container.restart == "always" and s.container.init is True
    assert s.ssh.insecure_ignore_host_key is False
    # A deploy section runs unless it says otherwise, so one without servers is refused; the
    # stage a pipeline without a deploy section gets is off and needs none.
    with pytest.raises(ValidationError, match="at least one server"):
        DeploySettings()
    assert DeploySettings(enabled=False).servers == ()


# --------------------------------------------------------------------------- spec

def test_image_ref_only_accepts_digests():
    assert (IMG.name, IMG.digest, IMG.registry) == ("10.87.53.1:5000/demo/app", D1,
                                                    "10.87.53.1:5000")
    assert str(IMG) == REF
    for bad in ("10.87.53.1:5000/demo/app:v1", "app@sha256:abc", f"app:v1@{D1} x"):
        with pytest.raises(ValueError):
            ImageRef.parse(bad)
    with pytest.raises(ValueError):
        ImageRef("app", "sha256:short")


def test_container_spec_labels_and_fingerprint():
    s = stage(container={"name": "web", "ports": ["8080:80"], "labels": {"runner.digest": "lie",
                                                                          "team": "a"}})
    spec = container_spec(s, IMG, pipeline="demo", run_id="r1", commit="c" * 40)
    labels = dict(spec.labels)
    assert labels["runner.digest"] == D1  # a user label cannot disguise the version
    assert labels["runner.app"] == "web" and labels["runner.commit"] == "c" * 40
    assert labels["runner.run_id"] == "r1" and labels["team"] == "a"
    # Run metadata does not change the fingerprint; settings do.
    spec2 = container_spec(s, IMG, pipeline="demo", run_id="r2", commit="d" * 40)
    assert labels["runner.spec"] == dict(spec2.labels)["runner.spec"]
    s3 = stage(container={"name": "web", "ports": ["8081:80"]})
    assert fingerprint(container_spec(s3, IMG, pipeline="demo", run_id="r1")) != fingerprint(spec)


def test_batches():
    xs = (1, 2, 3, 4, 5)
    assert batches(xs, "all") == [xs]
    assert batches(xs, "canary") == [(1,), (2, 3, 4, 5)]
    assert batches((1,), "canary") == [(1,)]
    assert batches(xs, "rolling", 2) == [(1, 2), (3, 4), (5,)]
    assert batches((), "all") == []


def test_env_file_content():
    assert env_file_content({"A": "1", "B": "x y=z 'q'"}) == b"A=1\nB=x y=z 'q'\n"
    with pytest.raises(ValueError):
        env_file_content({"A": "1\n2"})


# --------------------------------------------------------------------------- commands

def test_run_argv_exact():
    s = stage(container={
        "name": "web", "ports": ["8080:80"], "volumes": ["/data:/data:ro"],
        "env": {"A": "1"}, "memory": "256m", "cpus": 0.5, "command": ["httpd", "-f"],
        "labels": {"team": "a"}},
        healthcheck={"cmd": "wget -q -O- http://127.0.0.1:80/ || exit 1", "interval": 0.5,
                     "probe_timeout": 2, "retries": 2})
    spec = container_spec(s, IMG, pipeline="demo", run_id="r1", commit="abc")
    fp = dict(spec.labels)["runner.spec"]
    assert cmd.run(spec, env_file="/root/.runner/env/web-1.env") == [
        "docker", "run", "--detach", "--name", "web", "--restart", "always", "--init",
        "--label", "runner.app=web", "--label", "runner.commit=abc",
        "--label", f"runner.digest={D1}", "--label", "runner.image=10.87.53.1:5000/demo/app",
        "--label", "runner.pipeline=demo", "--label", "runner.run_id=r1",
        "--label", f"runner.spec={fp}", "--label", "team=a",
        "--publish", "8080:80", "--volume", "/data:/data:ro",
        "--env-file", "/root/.runner/env/web-1.env",
        "--memory", "256m", "--cpus", "0.5", "--stop-timeout", "10",
        "--health-cmd", "wget -q -O- http://127.0.0.1:80/ || exit 1",
        "--health-interval", "500ms", "--health-timeout", "2s", "--health-retries", "2",
        "--health-start-period", "0s",
        REF, "httpd", "-f",
    ]


def test_run_argv_entrypoint_is_one_word():
    s = stage(container={"entrypoint": "/bin/sh", "command": ["-c", "echo hi"]})
    argv = cmd.run(container_spec(s, IMG, pipeline="demo", run_id="r1"))
    assert argv.index("--entrypoint=/bin/sh") < argv.index(REF)
    assert argv[-3:] == [REF, "-c", "echo hi"]
    cleared = cmd.run(container_spec(stage(container={"entrypoint": ""}), IMG, pipeline="demo",
                                     run_id="r1"))
    assert "--entrypoint=" in cleared


def test_run_argv_minimal_no_init_other_name():
    s = stage(container={"init": False, "restart": "unless-stopped"})
    spec = container_spec(s, IMG, pipeline="demo", run_id="r1")
    argv = cmd.run(spec, name="demo_new")
    assert argv[:7] == ["docker", "run", "--detach", "--name", "demo_new", "--restart",
                        "unless-stopped"]
    assert "--init" not in argv and "--env-file" not in argv and "--health-cmd" not in argv
    assert argv[-1] == REF


def test_small_commands_exact():
    assert cmd.pull(REF) == ["docker", "pull", "--quiet", REF]
    assert cmd.engine_id() == ["docker", "network", "inspect", "--format", "{{.Id}}", "host"]
    assert cmd.image_present(REF) == ["docker", "image", "inspect", "--format", "{{.Id}}", REF]
    assert cmd.login("10.87.53.1:5000", "bob") == [
        "docker", "login", "--username", "bob", "--password-stdin", "10.87.53.1:5000"]
    assert cmd.login("10.87.53.1:5000", "bob", config="/r/auth/web--1") == [
        "docker", "--config", "/r/auth/web--1", "login", "--username", "bob",
        "--password-stdin", "10.87.53.1:5000"]
    assert cmd.pull(REF, config="/r/auth/web--1") == [
        "docker", "--config", "/r/auth/web--1", "pull", "--quiet", REF]
    assert cmd.rename("web", "web_prev_r1") == ["docker", "container", "rename", "web",
                                                "web_prev_r1"]
    assert cmd.stop("web_prev_r1", 5) == ["docker", "container", "stop", "--time", "5",
                                          "web_prev_r1"]
    assert cmd.start("web") == ["docker", "container", "start", "web"]
    assert cmd.remove("web") == ["docker", "container", "rm", "--force", "web"]
    assert cmd.logs("web", 10) == ["docker", "container", "logs", "--tail", "10", "web"]
    assert cmd.probe("web", ["CMD-SHELL", "curl -f localhost || exit 1"]) == [
        "docker", "exec", "web", "/bin/sh", "-c", "curl -f localhost || exit 1"]
    assert cmd.probe("web", ["CMD", "/bin/check", "--fast"]) == [
        "docker", "exec", "web", "/bin/check", "--fast"]
    with pytest.raises(ValueError):
        cmd.probe("web", ["NONE"])
    assert cmd.http_probe("web", 8080, "/health", 2) == [
        "docker", "exec", "web", "wget", "-q", "-O", "-", "-T", "2",
        "http://127.0.0.1:8080/health"]
    assert cmd.list_app_ids("web") == [
        "docker", "container", "ls", "--all", "--quiet", "--no-trunc", "--filter",
        "label=runner.app=web"]
    assert cmd.inspect_container("a", "b") == ["docker", "container", "inspect", "a", "b"]


def test_remote_command_quotes_every_word():
    evil = "x; rm -rf / #"
    line = remote_command(["docker", "run", "--label", f"a={evil}", "$(id)"])
    assert line == "docker run --label 'a=x; rm -rf / #' '$(id)'"


# --------------------------------------------------------------------------- inspect parsing

# Captured from a lab server (`docker container inspect cap1 cap2`), trimmed.
CAPTURED = json.loads(r"""
[{"Id": "2fd980aaf9f5", "Name": "/cap1", "Image": "sha256:279c1db5b541", "RestartCount": 0,
  "State": {"Status": "running", "Running": true, "Paused": false, "Restarting": false,
   "OOMKilled": false, "Dead": false, "Pid": 395, "ExitCode": 0, "Error": "",
   "StartedAt": "2026-11-25T08:21:10.899104713Z", "FinishedAt": "0001-01-01T00:00:00Z",
   "Health": {"Status": "healthy", "FailingStreak": 0, "Log": [{"Start":
    "2026-11-25T08:21:15.107725437Z", "End": "2026-11-25T08:21:15.177803043Z", "ExitCode": 0,
    "Output": ""}]}},
  "HostConfig": {"RestartPolicy": {"Name": "no", "MaximumRetryCount": 0}},
  "Config": {"Image": "10.87.53.1:5000/deploytest/app@sha256:3f435bd0f8d79bce42e6f7b81cb776858e09277fc13ea92f51fdb9edc8af0499",
   "Labels": {"runner.digest": "sha256:3f435bd0f8d79bce42e6f7b81cb776858e09277fc13ea92f51fdb9edc8af0499"},
   "Healthcheck": {"Test": ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1"],
    "Interval": 1000000000}},
  "NetworkSettings": {"IPAddress": "172.30.0.2", "Networks": {"bridge": {"IPAddress": "172.30.0.2"}}}},
 {"Id": "2c32c0d3cd75", "Name": "/cap2", "Image": "sha256:279c1db5b541", "RestartCount": 3,
  "State": {"Status": "exited", "Running": false, "Paused": false, "Restarting": false,
   "OOMKilled": false, "Dead": false, "Pid": 0, "ExitCode": 7, "Error": "",
   "StartedAt": "2026-11-25T08:21:13.263426936Z", "FinishedAt": "2026-11-25T08:21:13.262898666Z"},
  "HostConfig": {"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3}},
  "Config": {"Image": "10.87.53.1:5000/deploytest/app@sha256:3f43", "Labels": {},
   "Healthcheck": null},
  "NetworkSettings": {"IPAddress": "", "Networks": {"bridge": {"IPAddress": ""}}}}]
""")


def test_parse_captured_inspect():
    healthy = parse_state(CAPTURED[0])
    assert healthy.name == "cap1" and healthy.status == "running" and healthy.running
    assert healthy.health == "healthy" and healthy.restart_count == 0
    assert healthy.healthcheck_test == ("CMD-SHELL",
                                        "wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1")
    assert healthy.ip == "172.30.0.2" and healthy.restart_policy == "no"
    assert healthy.labels["runner.digest"].startswith("sha256:3f43")
    crashed = parse_state(CAPTURED[1])
    assert (crashed.status, crashed.exit_code, crashed.restart_count) == ("exited", 7, 3)
    assert crashed.health is None and crashed.healthcheck_test == () and crashed.ip == ""
    assert parse_inspect(json.dumps(CAPTURED[:1])).name == "cap1"
    assert parse_inspect("[]\n") is None and parse_inspect("") is None


def test_parse_http_status():
    assert parse_http_status(b"HTTP/1.1 404 Not Found\r\nServer: x\r\n\r\nbody") == 404
    assert parse_http_status(b"HTTP/1.0 200 OK\n\n") == 200
    assert parse_http_status(b"") is None and parse_http_status(b"SSH-2.0-x\r\n") is None


# --------------------------------------------------------------------------- poller

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def st(status="running", health=None, restarts=0, exit_code=0, test=()) -> ContainerState:
    return ContainerState(id="x", name="app", status=status, running=status == "running",
                          exit_code=exit_code, oom_killed=False, error="", started_at="",
                          restart_count=restarts, health=health, healthcheck_test=test)


H = HealthSpec(kind="cmd", cmd="true", timeout=5, probe_interval=0.25, min_uptime=2)


def poll(states, probes=None, health=H, cancel=None):
    clock = FakeClock()
    seq = list(states)
    outs = list(probes) if probes is not None else None

    def inspect():
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def probe(_state):
        return outs.pop(0) if len(outs) > 1 else outs[0]
    v = wait_healthy(inspect=inspect, probe=probe if outs is not None else None, health=health,
                     clock=clock, sleep=clock.sleep, cancel=cancel)
    return v, clock.now


def test_poller_accepts_first_passing_probe_while_docker_says_starting():
    v, t = poll([st(health="starting")], [ProbeResult(False, "refused"), ProbeResult(False, "x"),
                                          ProbeResult(True, "ok")])
    assert v.healthy and v.last_probe == "ok" and t == pytest.approx(0.5)


def test_poller_fails_at_once_when_docker_says_unhealthy():
    v, t = poll([st(health="starting"), st(health="unhealthy")], [ProbeResult(False, "HTTP 500")])
    assert not v.healthy and "unhealthy" in v.reason and t == pytest.approx(0.25)


def test_poller_fails_on_exit_and_on_restart():
    v, _ = poll([st(status="exited", exit_code=3)], [ProbeResult(True)])
    assert not v.healthy and "exited with code 3" in v.reason
    v, _ = poll([st(restarts=1)], [ProbeResult(True)])
    assert not v.healthy and "restarted it" in v.reason
    v, _ = poll([st(status="restarting")], [ProbeResult(True)])
    assert not v.healthy and "restarted it" in v.reason


def test_poller_times_out_with_last_probe_output():
    v, t = poll([st(health="starting")], [ProbeResult(False, "HTTP/1.1 404 Not Found")])
    assert not v.healthy and "not healthy after 5s" in v.reason
    assert v.last_probe == "HTTP/1.1 404 Not Found" and 5 <= t <= 5.25


def test_poller_docker_healthy_without_probe_and_min_uptime_without_healthcheck():
    v, _ = poll([st(health="starting"), st(health="healthy")], None)
    assert v.healthy and "docker" in v.reason
    v, t = poll([st(health=None)], None)
    assert v.healthy and t == pytest.approx(2.0)


def test_poller_honours_cancel():
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        poll([st()], [ProbeResult(False)], cancel=ev)


# --------------------------------------------------------------------------- host keys

def _line(host: str, key: paramiko.PKey) -> str:
    return f"{host} {key.get_name()} {base64.b64encode(key.asbytes()).decode()}\n"


def test_host_key_policy(tmp_path):
    real = paramiko.ECDSAKey.generate()
    other_same_type = paramiko.ECDSAKey.generate()
    other_type = paramiko.RSAKey.generate(1024)
    kh = tmp_path / "known_hosts"
    hashed = paramiko.HostKeys.hash_host("10.0.0.9")
    kh.write_text(_line("10.0.0.1", real) + _line("[10.0.0.2]:2222", real)
                  + _line("10.0.0.3", other_type) + _line("10.0.0.3", real)
                  + _line(hashed, real) + "# comment\n@revoked * ssh-rsa AAAA\n")
    p = HostKeyPolicy(str(kh))
    p.check("s1", "10.0.0.1", 22, real)
    p.check("s2", "10.0.0.2", 2222, real)
    p.check("s9", "10.0.0.9", 22, real)  # hashed entry
    p.check("s3", "10.0.0.3", 22, real)  # every key of the host counts, not only the first
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
        p.check("s1", "10.0.0.1", 22, other_same_type)
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
        p.check("s1", "10.0.0.1", 22, other_type)  # a changed key of another type
    with pytest.raises(HostKeyError, match="unknown host key"):
        p.check("s2", "10.0.0.2", 22, real)  # known on port 2222 only
    # Negotiation offers the known key types first.
    order = p.order_key_types(["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512",
                               "rsa-sha2-256", "ssh-rsa"], p.expected("10.0.0.3", 22))
    assert order[:4] == ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa", "ecdsa-sha2-nistp256"]
    pinned = HostKeyPolicy(pinned=f"{real.get_name()} {base64.b64encode(real.asbytes()).decode()}")
    pinned.check("s", "anything", 22, real)
    with pytest.raises(HostKeyError, match="pinned"):
        pinned.check("s", "anything", 22, other_same_type)
    HostKeyPolicy(insecure=True).check("s", "x", 22, other_type)
    # No file and no pin of its own: only the target's own known_hosts files count, and a
    # host listed in none of them is unknown.
    with pytest.raises(HostKeyError, match="unknown host key"):
        HostKeyPolicy().check("s", "10.0.0.1", 22, real)


# Captured from a lab server (`docker run -v capvol:/data -v /tmp:/hostdir:ro -v /anon ...`,
# `docker inspect --format '{{json .Mounts}}'`).
MOUNTS = json.loads(r"""
[{"Type":"volume","Name":"capvol-mnt14160","Source":"/var/lib/runner-lab/srv1/docker/volumes/capvol-mnt14160/_data","Destination":"/data","Driver":"local","Mode":"z","RW":true,"Propagation":""},
 {"Type":"bind","Source":"/tmp","Destination":"/hostdir","Mode":"ro","RW":false,"Propagation":"rprivate"},
 {"Type":"volume","Name":"e2891041ff4506d5838b5c03e54e23de2a07984fe9efb1d490bedeea6ecaa8e8","Source":"/var/lib/runner-lab/srv1/docker/volumes/e2891041ff4506d5838b5c03e54e23de2a07984fe9efb1d490bedeea6ecaa8e8/_data","Destination":"/anon","Driver":"local","Mode":"","RW":true,"Propagation":""}]
""")


def test_what_a_container_mounts_that_outlives_it():
    """`runner app remove` keeps named volumes and host directories (and says so); an
    anonymous volume goes with its container."""
    from runner.cli.app import lasting_volumes
    st = parse_state({**CAPTURED[0], "Mounts": MOUNTS})
    assert st.lasting == ("volume capvol-mnt14160", "host directory /tmp")
    assert parse_state(CAPTURED[0]).lasting == ()
    assert lasting_volumes(["data:/var/lib/data", "/srv/x:/x:ro", "/anon", "./rel:/r",
                            "data:/other"]) == ["volume data", "host directory /srv/x",
                                                "host directory ./rel"]
    assert lasting_volumes([]) == []
