"""Faults of a registry with token auth, injected for real into a private pair of the lab's
token issuer and token registry (their configs from the lab's own builders, on free loopback
ports, with the lab's signing key and users), so the lab's shared pair is never touched:

- the token issuer stopped (SIGSTOP: its port still accepts, it never answers) during a push
  and during a verification: bounded failures naming the registry and its token endpoint, and
  nothing claimed that did not happen;
- the registry killed (SIGKILL) mid-push of a large layer: the stage fails naming it, after the
  retries of stages.push, and the registry, restarted, has no half-pushed tag.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipelines.push import Credentials, verify_pushed
from runner.errors import StageFailed
from runner_lab import layout
from runner.model.image import ImageName
from tests.helpers import ROOT, events, make_repo, stage_end
from tests.lab.test_registry_token import (UID, Registry, _assert_never_shown, _run_json,
                                           built, data_dir, fresh_image)  # noqa: F401

EXEC_TIMEOUT = 900  # generous: a hang shows as a timeout of this test, not as a pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pair:
    """A private token issuer + token registry: the lab's configs on other ports and storage."""

    dir: Path
    registry: Registry
    issuer: subprocess.Popen | None = None
    server: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return self.registry.address

    @property
    def realm(self) -> str:
        return self.registry.realm

    def start_issuer(self) -> None:
        self.issuer = subprocess.Popen(
            [sys.executable, "-m", "runner_lab.token_issuer", str(self.dir / "issuer.json")],
            stdout=open(self.dir / "issuer.log", "ab"), stderr=subprocess.STDOUT, cwd=ROOT)

    def start_registry(self) -> None:
        self.server = subprocess.Popen(
            ["docker-registry", "serve", str(self.dir / "registry.yml")],
            stdout=open(self.dir / "registry.log", "ab"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                token = self.registry.token("registry:catalog:*")
                ok = httpx.get(f"http://{self.address}/v2/", trust_env=False, timeout=2,
                               headers={"Authorization": f"Bearer {token}"})
                if ok.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "the private token registry did not come up"
            time.sleep(0.2)

    def registry_log(self) -> str:
        return (self.dir / "registry.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in (self.issuer, self.server):
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process would never see the SIGKILL
            proc.kill()
            proc.wait(10)


@pytest.fixture
def pair(lab, tmp_path_factory):
    state = layout.state_dir()
    d = tmp_path_factory.mktemp("token-pair")
    listen, reg_addr = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    realm = f"http://{listen}/token"
    issuer = json.loads(layout.token_issuer_config(state))
    issuer["listen"] = listen
    (d / "issuer.json").write_text(json.dumps(issuer))
    config = layout.token_registry_config(state)
    for old, new in ((layout.TOKEN_REALM, realm),
                     (f"addr: {layout.TOKEN_REGISTRY}", f"addr: {reg_addr}"),
                     (str(state / "token-registry"), str(d / "storage"))):
        assert old in config
        config = config.replace(old, new)
    (d / "registry.yml").write_text(config)
    t = lab["token_registry"]
    p = Pair(d, Registry(reg_addr, t["username"], t["password_file"], realm, t["service"]))
    try:
        p.start_issuer()
        p.start_registry()
        p.wait_ready()
        yield p
    finally:
        p.stop()
        shutil.rmtree(d / "storage", ignore_errors=True)


def _exec_argv(pipeline: Path, data_dir: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "runner", "exec", str(pipeline), "--json", "--run-id", run_id,
            "--data-dir", str(data_dir)]


def _pipeline(tmp_path: Path, repo: Path, image: str, password_file: str, user: str,
              retries: int, timeout: float = 900) -> Path:
    p = tmp_path / f"pipeline-{UID}.yaml"
    p.write_text(f"""
name: tokenfaults
repository: {{url: "{repo}"}}
image: {{name: "{image}", tags: ["{{short_sha}}"]}}
secrets: {{registry_password: {{file: "{password_file}"}}}}
stages:
  push:
    retries: {retries}
    timeout: {timeout}
    auth: {{username: {user}, password: registry_password}}
""")
    return p


def _assert_no_push_claimed(evs: list[dict], record: dict, registry: Registry, path: str) -> None:
    """The run says the push failed, and nothing claims a push, a digest or a verification."""
    end = stage_end(evs, "push")
    assert end["status"] == "failed" and not end.get("outputs"), end
    push = [s for s in record["stages"] if s["name"] == "push"][0]
    assert push["status"] == "failed" and not push.get("outputs"), push
    lines = [e.get("line", "") for e in evs if e["event"] == "stage.log" and e["stage"] == "push"]
    assert not any(line.startswith(("pushed ", "verified")) for line in lines), lines
    assert "sha256:" not in end["error"]
    assert registry.tags(path) == []


# ---- the token issuer stopped ----------------------------------------------------------------

def test_a_push_while_the_token_issuer_hangs_fails_in_bounded_time_naming_it(
        pair, tmp_path, data_dir, built):
    """The issuer accepts connections but never answers: the engine would retry each layer's
    token request itself for about 3 minutes; stages.push.timeout (5 s here) stops the attempt,
    the stage fails naming the registry and its token endpoint, exit 1, and nothing claims a
    push."""
    repo = make_repo(tmp_path / "repo", {
        "Dockerfile": "FROM local/busybox:1\nCOPY v.txt /v.txt\n", "v.txt": f"hang {UID}\n"})
    path = f"faults-{UID}/issuer-hangs"
    p = _pipeline(tmp_path, repo, f"{pair.address}/{path}", pair.registry.password_file,
                  pair.registry.username, retries=0, timeout=5)
    run_id = f"faults-issuer-hangs-{UID}"
    os.kill(pair.issuer.pid, signal.SIGSTOP)
    try:
        proc = subprocess.run(_exec_argv(p, data_dir, run_id), capture_output=True, text=True,
                              cwd=ROOT, timeout=EXEC_TIMEOUT)
    finally:
        os.kill(pair.issuer.pid, signal.SIGCONT)
    evs = events(proc.stdout)
    built(evs)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_end(evs, "build")["status"] == "success"
    error = stage_end(evs, "push")["error"]
    assert f"pushing {pair.address}/{path}:" in error, error
    assert "after 1 attempt (retries: 0)" in error, error  # a timeout is transient
    assert "the push did not end within 5s (stages.push.timeout) and was stopped" in error, error
    # stopped: its backlog still takes connections (ReadTimeout) until it is full (ConnectTimeout)
    assert re.search(re.escape(f"registry {pair.address} answers, but its token endpoint "
                               f"{pair.realm} does not (") + r"(Read|Connect)Timeout after 3s\)",
                     error), error
    _assert_no_push_claimed(evs, _run_json(data_dir, run_id), pair.registry, path)
    _assert_never_shown([pair.registry.password], proc, data_dir, run_id)


def test_a_run_cancelled_during_a_hanging_push_stops_it_and_exits_130(
        pair, tmp_path, data_dir, built):
    """SIGINT while the engine waits on a stopped token issuer: the run ends at once (the push
    stream is closed, so the engine stops pushing) with exit 130, not after the engine's own
    minutes of retries, and nothing claims a push."""
    repo = make_repo(tmp_path / "repo", {
        "Dockerfile": "FROM local/busybox:1\nCOPY v.txt /v.txt\n", "v.txt": f"cancel {UID}\n"})
    path = f"faults-{UID}/cancelled"
    p = _pipeline(tmp_path, repo, f"{pair.address}/{path}", pair.registry.password_file,
                  pair.registry.username, retries=3)
    run_id = f"faults-cancelled-{UID}"
    os.kill(pair.issuer.pid, signal.SIGSTOP)
    proc = subprocess.Popen(_exec_argv(p, data_dir, run_id), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            e = json.loads(line) if line.startswith("{") else {}
            if e.get("event") == "stage.log" and e.get("stage") == "push" \
                    and "The push refers to repository" in e.get("line", ""):
                proc.send_signal(signal.SIGINT)
                break
        lines.extend(proc.stdout)
        proc.wait(EXEC_TIMEOUT)
    finally:
        os.kill(pair.issuer.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    evs = events("".join(lines))
    built(evs)
    assert proc.returncode == 130, "".join(lines)[-3000:] + "".join(stderr)[-3000:]
    end = stage_end(evs, "push")
    assert end["status"] == "cancelled" and not end.get("outputs"), end
    # Ended by the cancel, not by the engine giving up minutes later: that would have logged a
    # failed first attempt before the cancel was noticed in the wait between attempts.
    assert not [e for e in evs if "(attempt 1/4)" in json.dumps(e)], evs
    assert pair.registry.tags(path) == []


def test_a_verification_while_the_token_issuer_hangs_fails_naming_it_never_verified(
        pair, tmp_path, fresh_image):
    """The push succeeded; then the issuer stops answering. verify_pushed, and the stage's
    verification path, fail within their timeout naming the token endpoint; never 'verified'."""
    ref = f"{pair.address}/faults-{UID}/verify-hangs:t1"
    name = ImageName.parse(f"{pair.address}/faults-{UID}/verify-hangs")
    image_id = fresh_image(ref)
    creds = Credentials(pair.address, "the test", username=pair.registry.username,
                        password=pair.registry.password)
    import docker
    client = docker.from_env()
    try:
        for item in client.api.push(name.name, tag="t1", stream=True, decode=True,
                                    auth_config=creds.engine_auth()):
            assert "error" not in item, item
        registry_config = client.info()["RegistryConfig"]
    finally:
        client.close()
    digest = pair.registry.get(name.repository, "manifests/t1") \
        .headers["docker-content-digest"]
    assert verify_pushed(name, digest, image_id, creds, registry_config, 5).verified is True
    os.kill(pair.issuer.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StageFailed) as err:
            verify_pushed(name, digest, image_id, creds, registry_config, 2)
        assert time.monotonic() - started < 60  # bounded by its timeout, not hanging
        msg = str(err.value)
        assert msg.startswith(f"stage 'push' failed: pushed {digest}, but its verification "
                              f"failed: registry {pair.address} wants a token (Bearer) to read "
                              f"{name}, and its token endpoint {pair.realm} did not answer "
                              "(ReadTimeout"), msg
        assert "verified" not in msg.replace("verification", "")
        assert pair.registry.password not in msg
    finally:
        os.kill(pair.issuer.pid, signal.SIGCONT)


# ---- the registry killed mid-push -------------------------------------------------------------

BIG_MB = 64
# The lab's engine (20.10) retries a layer upload that lost its registry itself, 4 times, 5, 10,
# 15 and 20 s apart: with the default stages.push.timeout the first attempt took 50 s of the
# test's 54. 5 s (stages.push.timeout; it was 10) ends that attempt long after the kill (the
# upload starts within 0.1 s of the push's first line, measured at load 20); the second attempt
# finds nothing listening at once: the same failed stage, 2 attempts and connection-refused
# error as before.
KILLED_PUSH_TIMEOUT = 5


def test_the_registry_killed_mid_push_fails_after_the_retries_and_leaves_no_half_pushed_tag(
        pair, tmp_path, data_dir, built):
    repo = make_repo(tmp_path / "repo", {
        "Dockerfile": ("FROM local/busybox:1\n"
                       f"RUN head -c {BIG_MB * 1024 * 1024} /dev/urandom > /big.bin\n"
                       "COPY v.txt /v.txt\n"),
        "v.txt": f"big {UID}\n"})
    path = f"faults-{UID}/killed"
    p = _pipeline(tmp_path, repo, f"{pair.address}/{path}", pair.registry.password_file,
                  pair.registry.username, retries=1, timeout=KILLED_PUSH_TIMEOUT)
    run_id = f"faults-registry-killed-{UID}"
    proc = subprocess.Popen(_exec_argv(p, data_dir, run_id), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    killed_at_upload = False
    try:
        pushing = False
        for line in proc.stdout:
            lines.append(line)
            if not pushing and line.startswith("{"):
                e = json.loads(line)
                pushing = (e["event"] == "stage.log" and e["stage"] == "push"
                           and "The push refers to repository" in e.get("line", ""))
            if pushing:
                # the first upload the registry has started (its access log): the push stream's
                # progress bars are not in the stage log, the registry's own record is
                deadline = time.monotonic() + 120
                while "blobs/uploads/" not in pair.registry_log():
                    assert time.monotonic() < deadline, "no upload reached the registry"
                    time.sleep(0.01)
                pair.server.kill()
                pair.server.wait(10)
                killed_at_upload = True
                break
        lines.extend(proc.stdout)
        proc.wait(EXEC_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at_upload, "".join(lines)[-3000:]
    evs = events("".join(lines))
    built(evs)
    out = "".join(lines)[-3000:] + "".join(stderr)[-3000:]
    assert proc.returncode == 1, out
    end = stage_end(evs, "push")
    assert end["status"] == "failed", out
    error = end["error"]
    assert f"pushing {pair.address}/{path}:" in error and "after 2 attempts" in error, error
    assert f"is a registry listening at {pair.address}?" in error, error
    warns = [e for e in evs if e["event"] in ("stage.log", "stage.warn", "run.warning")
             and "(attempt 1/2)" in json.dumps(e)]
    assert warns, [e for e in evs if e.get("stage") == "push"]
    assert "retrying in 1s" in json.dumps(warns[0])
    record = _run_json(data_dir, run_id)
    push = [s for s in record["stages"] if s["name"] == "push"][0]
    assert push["status"] == "failed" and not push.get("outputs"), push
    # the registry back (same storage): no tag, or a tag whose manifest and blobs all exist
    pair.start_registry()
    pair.wait_ready()
    tags = pair.registry.tags(path)
    for tag in tags:
        resp = pair.registry.get(path, f"manifests/{tag}")
        assert resp.status_code == 200, resp.text
        manifest = resp.json()
        for blob in [manifest["config"], *manifest["layers"]]:
            assert pair.registry.get(path, f"blobs/{blob['digest']}").status_code == 200
    assert tags == [], tags  # the manifest is the push's last step: it never got there
    _assert_never_shown([pair.registry.password], subprocess.CompletedProcess(
        [], 1, "".join(lines), "".join(stderr)), data_dir, run_id)
