"""`stages.build.engine`: the address parsed and checked once by the model, the docker CLI's
flags and environment, the ssh config and dial command by exact equality, and what a failed
connection says, on output captured from the lab's real CLIs (tests/data/build/engine). Real
builds on a remote engine are in test_remote_build_lab.py."""
from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.build import BuildStage
from pipelines.build_engine import (
    WRAPPER,
    BuildEngine,
    EngineProblem,
    explain_ssh_failure,
    explain_tcp_failure,
    ssh_config_text,
    ssh_dial_argv,
)
from pipelines.buildkit import (
    DOCKER_BUILDKIT,
    Builder,
    BuildSpec,
    EngineInfo,
    build_argv,
    check_secret_id,
    engine_problem,
    parse_engine_version,
)
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model import Image, Pipeline, Repository, Stages
from runner.model import BuildSettings
from runner.model.engine import BuildEngineSettings, EngineAddress, parse_engine_host

DATA = Path(__file__).resolve().parents[1] / "data" / "build" / "engine"
CLASSIC = Builder(DOCKER_BUILDKIT, "/usr/bin/docker", "20.10.24+dfsg1")


def engine(**settings) -> BuildEngine:
    return BuildEngine(BuildEngineSettings(**settings))


# --- the address ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("ssh://root@10.0.0.5", EngineAddress("ssh", "10.0.0.5", None, "root")),
    ("ssh://builder.example.com:2222", EngineAddress("ssh", "builder.example.com", 2222, None)),
    ("SSH://ci@b:22/", EngineAddress("ssh", "b", 22, "ci")),
    ("ssh://root@[fd00::5]:22", EngineAddress("ssh", "[fd00::5]", 22, "root")),
    ("tcp://build.example.com:2376", EngineAddress("tcp", "build.example.com", 2376)),
    ("tcp://build.example.com", EngineAddress("tcp", "build.example.com", 2376)),
])
def test_addresses_parse(text, expected):
    assert parse_engine_host(text) == expected


def test_plain_tcp_defaults_to_dockers_plain_port():
    assert parse_engine_host("tcp://b", tls=False).port == 2375
    assert parse_engine_host("tcp://b:2376").url == "tcp://b:2376"
    assert parse_engine_host("ssh://root@b:22").url == "ssh://root@b:22"


@pytest.mark.parametrize("text,message", [
    ("http://b:2375", "the scheme http:// is not supported; use ssh://[user@]host[:port] or "
                      "tcp://host:port"),
    ("unix:///var/run/docker.sock", "the scheme unix:// is not supported"),
    ("b:22", "is not an address"),
    ("ssh://b/run/docker.sock", "a socket path is not supported"),
    ("ssh://b:0", "bad port '0'"),
    ("ssh://b:ssh", "bad port 'ssh'"),
    ("ssh://bad user@b", "not a user name"),
    ("ssh://", "not a host name or address"),
    ("ssh://_bc", "not a host name or address: '_bc'"),  # an alias may hold _ inside only
    ("tcp://root@b:2376", "a tcp:// engine has no user"),
])
def test_bad_addresses_say_why(text, message):
    with pytest.raises(ValueError, match=None) as info:
        parse_engine_host(text)
    assert message in str(info.value)


def test_a_string_is_the_host():
    s = BuildSettings(engine="ssh://root@10.0.0.5").engine
    assert s == BuildEngineSettings(host="ssh://root@10.0.0.5")
    assert s.address == EngineAddress("ssh", "10.0.0.5", None, "root")


@pytest.mark.parametrize("settings,message", [
    ({"host": "tcp://b:2376"}, "a tcp:// engine needs `tls: {ca, cert, key}` (docker's "
                               "--tlsverify), or `tls: false` to use plain TCP"),
    ({"host": "tcp://b", "tls": {"ca": "a", "cert": "b"}}, "key"),
    ({"host": "tcp://b", "tls": True}, "tls"),
    ({"host": "tcp://b", "tls": False, "key_file": "k"}, "key_file: only for ssh:// engines"),
    ({"host": "tcp://b", "tls": False, "known_hosts": "k"}, "known_hosts: only for ssh://"),
    ({"host": "ssh://b", "tls": False}, "tls is for tcp:// engines"),
    ({"host": "ssh://b", "key_file": 'a"b'}, "key_file: 'a\"b' cannot be handed to ssh"),
    ({"host": "ssh://b", "known_hosts": "a\nb"}, "known_hosts"),
    ({"host": "ssh://b", "connect_timeout": 0}, "greater than 0"),
    ({"host": "ssh://b", "port": 22}, "Extra inputs are not permitted"),
])
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValidationError) as info:
        BuildEngineSettings(**settings)
    assert message in str(info.value)


def test_plain_tcp_only_when_the_pipeline_says_so():
    s = BuildEngineSettings(host="tcp://b", tls=False)
    assert s.address.port == 2375
    assert BuildEngine(s).describe() == \
        "tcp://b:2375 over plain TCP (tls: false: unauthenticated, unencrypted)"


def _pipeline_text(engine_yaml: str) -> str:
    return textwrap.dedent("""\
        name: x
        repository: {url: https://git.example.com/a.git}
        image: {name: registry.example.com/a}
        stages:
          build:
        """) + textwrap.indent(textwrap.dedent(engine_yaml), "    ")


def test_the_loader_locates_a_bad_engine_and_resolves_its_paths():
    with pytest.raises(InvalidInput) as info:
        load_pipeline_text(_pipeline_text("engine: tcp://builder:2376\n"), "/w/p/pipeline.yml",
                           environ={})
    [p] = info.value.problems
    assert (p.line, p.column, p.path) == (6, 13, "stages.build.engine")
    assert "a tcp:// engine needs `tls: {ca, cert, key}`" in p.message
    pipeline = load_pipeline_text(_pipeline_text("""\
        engine:
          host: ssh://root@${BUILDER}
          key_file: keys/builder
          known_hosts: ~/kh
        """), "/w/p/pipeline.yml", environ={"BUILDER": "10.0.0.5"})
    s = pipeline.stages.build.engine
    assert s.address.url == "ssh://root@10.0.0.5"
    assert s.key_file == "/w/p/keys/builder"
    assert s.known_hosts == os.path.expanduser("~/kh")


# --- the docker CLI's flags and environment ---------------------------------------------------

def test_cli_args():
    assert BuildEngine().cli_args() == []
    assert engine(host="ssh://root@10.0.0.5:22").cli_args() == ["-H", "ssh://root@10.0.0.5:22"]
    assert engine(host="tcp://b", tls={"ca": "/t/ca.pem", "cert": "/t/c.pem",
                                       "key": "/t/k.pem"}).cli_args() == [
        "-H", "tcp://b:2376", "--tlsverify", "--tlscacert", "/t/ca.pem", "--tlscert",
        "/t/c.pem", "--tlskey", "/t/k.pem"]
    assert engine(host="tcp://b:12375", tls=False).cli_args() == ["-H", "tcp://b:12375"]


def test_build_argv_puts_the_engine_flags_before_the_command():
    spec = BuildSpec(context="/w/src", tags=("r/a:1",))
    assert build_argv(CLASSIC, spec, ["-H", "ssh://root@b"]) == [
        "/usr/bin/docker", "-H", "ssh://root@b", "build", "--progress=plain", "-t", "r/a:1",
        "/w/src"]
    bx = Builder("buildx", "/usr/bin/docker", "v0.12.0")
    assert build_argv(bx, spec, ["-H", "ssh://root@b"])[:6] == [
        "/usr/bin/docker", "-H", "ssh://root@b", "buildx", "build", "--load"]


def test_ssh_config_pins_strict_host_keys_and_the_pipelines_files():
    address = parse_engine_host("ssh://root@10.0.0.5")
    assert ssh_config_text(address, key_file="/k/my key", known_hosts="/k/100%.hosts",
                           connect_timeout=7.5) == textwrap.dedent("""\
        # Build engine ssh://root@10.0.0.5, written by the runner for `ssh -F`. These lines come
        # first so that they win; the user's and the system's files are included at the end.
        StrictHostKeyChecking yes
        BatchMode yes
        UpdateHostKeys no
        ConnectTimeout 8
        ServerAliveInterval 15
        ServerAliveCountMax 4
        IdentityFile "/k/my key"
        IdentitiesOnly yes
        UserKnownHostsFile "/k/100%%.hosts"
        GlobalKnownHostsFile /dev/null
        Include ~/.ssh/config
        Include /etc/ssh/ssh_config
        """)
    # Without them: the user's keys and known_hosts, still strictly checked.
    text = ssh_config_text(address, key_file=None, known_hosts=None, connect_timeout=10)
    assert "StrictHostKeyChecking yes" in text and "IdentityFile" not in text
    assert "UserKnownHostsFile" not in text and "StrictHostKeyChecking no" not in text


def test_ssh_dial_argv():
    assert ssh_dial_argv("/usr/bin/ssh", "/r/engine/ssh_config",
                         parse_engine_host("ssh://root@[fd00::5]:2222")) == [
        "/usr/bin/ssh", "-F", "/r/engine/ssh_config", "-T", "-l", "root", "-p", "2222", "--",
        "fd00::5", "docker", "system", "dial-stdio"]
    assert ssh_dial_argv("/usr/bin/ssh", "/c", parse_engine_host("ssh://b")) == [
        "/usr/bin/ssh", "-F", "/c", "-T", "--", "b", "docker", "system", "dial-stdio"]


def test_cli_env_points_only_at_the_engine(tmp_path):
    key, kh = tmp_path / "key", tmp_path / "known_hosts"
    key.write_text("k")
    kh.write_text("h")
    e = engine(host="ssh://root@10.0.0.5", key_file=str(key), known_hosts=str(kh))
    base = {"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///elsewhere.sock",
            "DOCKER_CONTEXT": "other", "DOCKER_TLS_VERIFY": "1", "HOME": "/root"}
    env = e.cli_env(tmp_path / "engine", base)
    assert not {"DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY"} & set(env)
    assert env["PATH"] == f"{tmp_path / 'engine' / 'bin'}:/usr/bin:/bin"
    assert env["HOME"] == "/root" and os.path.isabs(env["RUNNER_ENGINE_SSH"])
    wrapper = tmp_path / "engine" / "bin" / "ssh"
    assert wrapper.read_text() == WRAPPER and "exec \"$RUNNER_ENGINE_SSH\" -F " in WRAPPER
    config = Path(env["RUNNER_ENGINE_SSH_CONFIG"])
    assert f'IdentityFile "{key}"' in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o700
    # The runner's own engine: the environment is the caller's, untouched.
    assert BuildEngine().cli_env(tmp_path / "x", base) == base
    assert not (tmp_path / "x").exists()


def test_missing_files_are_named_all_at_once(tmp_path):
    e = engine(host="ssh://root@b", key_file=str(tmp_path / "nokey"),
               known_hosts=str(tmp_path / "nohosts"))
    with pytest.raises(EngineProblem) as info:
        e.cli_env(tmp_path / "engine")
    assert str(info.value) == (
        f"build engine ssh://root@b: stages.build.engine.key_file {tmp_path}/nokey: no "
        f"readable file there; stages.build.engine.known_hosts {tmp_path}/nohosts: no "
        "readable file there")
    t = engine(host="tcp://b", tls={"ca": str(tmp_path / "ca"), "cert": str(tmp_path / "c"),
                                    "key": str(tmp_path / "k")})
    assert len(t.problems()) == 3


def test_plan_shows_the_engine_and_touches_nothing():
    pipeline = Pipeline(name="t", repository=Repository(url="https://example.invalid/t.git"),
                        image=Image(name="r.example/t"),
                        stages=Stages(build=BuildSettings(engine={
                            "host": "ssh://root@10.0.0.5", "known_hosts": "/etc/kh"})))
    assert BuildStage().plan(pipeline)["engine"] == {
        "host": "ssh://root@10.0.0.5", "key_file": "the user's ~/.ssh setup",
        "known_hosts": "/etc/kh", "host_keys": "strict (unknown or changed keys are refused)",
        "used_by": "build, scan (image export) and push (from that engine to the registry)"}
    local = pipeline.model_copy(update={"stages": Stages()})
    assert BuildStage().plan(local)["engine"]["host"] == "local"


def test_a_build_secret_cannot_take_the_engines_variables():
    assert "clashes" in check_secret_id(CLASSIC, "RUNNER_ENGINE_SSH_CONFIG")


# --- what the engine and ssh said (captured from the lab's CLIs) ------------------------------

def test_engine_version_parsed_from_the_cli():
    info = parse_engine_version((DATA / "version-20.10-ok.txt").read_text())
    assert info == EngineInfo("20.10.24+dfsg1", "1.41", "linux", "amd64")
    assert info.describe() == "Docker Engine 20.10.24+dfsg1, API 1.41, linux/amd64"
    assert engine_problem(info) is None
    assert parse_engine_version((DATA / "version-20.10-refused.txt").read_text()) is None


def test_engines_that_cannot_run_buildkit():
    assert "BuildKit needs 18.09 or later" in engine_problem(
        EngineInfo("18.06.3-ce", "1.38", "linux", "amd64"))
    assert "need a Linux engine" in engine_problem(EngineInfo("24.0.7", "1.43", "windows",
                                                              "amd64"))
    assert engine_problem(EngineInfo("28.2.2", "1.50", "linux", "arm64")) is None


def test_unknown_host_key_is_explained():
    out = (DATA / "version-20.10-hostkey-unknown.txt").read_text()
    assert explain_ssh_failure(out, key_file="/k", known_hosts="/etc/kh") == (
        "the builder's host key is not in /etc/kh: add the builder's line (from its "
        "/etc/ssh/ssh_host_*_key.pub, checked out of band); an unknown host key is never "
        "accepted (ssh said: Host key verification failed.)")
    assert "~/.ssh/known_hosts" in explain_ssh_failure(out, key_file=None, known_hosts=None)


def test_changed_host_key_is_explained():
    out = (DATA / "version-28-hostkey-changed.txt").read_text()
    assert explain_ssh_failure(out, key_file=None, known_hosts="/etc/kh").startswith(
        "the builder's host key is not the one in /etc/kh: refused.")


def test_refused_connection_is_explained():
    out = (DATA / "version-20.10-refused.txt").read_text()
    assert explain_ssh_failure(out, key_file=None, known_hosts=None) == (
        "nothing accepts ssh connections at that address and port (ssh said: ssh: connect to "
        "host 10.87.53.14 port 2222: Connection refused)")


def test_unknown_failures_quote_the_last_line():
    assert explain_ssh_failure("stderr=foo\nbar baz\n", key_file=None, known_hosts=None) == \
        "bar baz"
    assert explain_ssh_failure("", key_file=None, known_hosts=None) == "no answer"


def _tcp(name: str) -> str:
    return explain_tcp_failure((DATA / f"version-20.10-tls-{name}.txt").read_text(),
                               host="127.0.0.1", port=2376, ca="/t/ca.pem", cert="/t/cert.pem")


def test_tls_failures_are_explained():
    assert _tcp("client-refused") == (
        "the engine refused the runner's client certificate (/t/cert.pem): it must be signed "
        "by the CA the engine trusts (its --tlscacert) (error during connect: Get "
        "\"https://127.0.0.1:2376/v1.24/version\": remote error: tls: unknown certificate "
        "authority)")
    assert _tcp("unknown-ca").startswith(
        "the engine's certificate is not signed by tls.ca /t/ca.pem (error during connect:")
    assert _tcp("wrong-name").startswith(
        "the engine's certificate does not name 127.0.0.1: use a name or address it holds")
    # What the SDK (Python's ssl) says for the same three.
    sdk = {
        "HTTPSConnectionPool(host='b', port=2376): Max retries exceeded with url: /version "
        "(Caused by SSLError(SSLEOFError(8, 'EOF occurred in violation of protocol "
        "(_ssl.c:2427)')))": "the engine refused the runner's client certificate",
        "(Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] "
        "certificate verify failed: self-signed certificate in certificate chain "
        "(_ssl.c:1006)')))": "the engine's certificate is not signed by tls.ca",
        "(Caused by SSLError(SSLCertVerificationError(1, \"[SSL: CERTIFICATE_VERIFY_FAILED] "
        "certificate verify failed: Hostname mismatch, certificate is not valid for "
        "'localhost'. (_ssl.c:1006)\")))": "the engine's certificate does not name b",
    }
    for said, hint in sdk.items():
        assert explain_tcp_failure(said, host="b", port=2376, ca="/ca", cert="/c") \
            .startswith(hint), said
    assert explain_tcp_failure("dial tcp 10.0.0.5:2375: connect: connection refused",
                               host="10.0.0.5", port=2375, ca=None, cert=None) == (
        "nothing listens at 10.0.0.5:2375 (dial tcp 10.0.0.5:2375: connect: connection "
        "refused)")
