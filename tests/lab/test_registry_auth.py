"""Push and deploy against the lab's registry that requires a login (10.87.53.1:5001, htpasswd),
through `runner exec` as a user runs it: checkout -> build -> push (-> deploy to one server).

The password is the lab's own (`runner lab env`: AUTH_REGISTRY_PASSWORD_FILE), handed to the
pipeline as a `secrets:` entry; it must never show in the run's output or its log files.
Everything a test creates (local tags, registry manifests, containers, the server's login) is
removed at the end.
"""
from __future__ import annotations

import json
import os
import secrets as _random
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deployers.ssh_docker import SSHDockerDeployer
from runner.model.deploy import DeploySettings
from tests.helpers import (MANIFEST_TYPES, exec_json, make_repo, remove_app_on_server,
                           runner, stage_end)

UID = _random.token_hex(3)

DOCKERFILE = """FROM local/busybox:1
COPY version.txt /www/index.html
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


@dataclass(frozen=True)
class AuthRegistry:
    address: str
    username: str
    password_file: str

    @property
    def password(self) -> str:
        return Path(self.password_file).read_text().strip()

    def get(self, path: str, login: bool = True) -> httpx.Response:
        return httpx.get(f"http://{self.address}/v2/{path}", headers={"Accept": MANIFEST_TYPES},
                         auth=(self.username, self.password) if login else None,
                         trust_env=False, timeout=10)

    def tags(self, repo: str) -> list[str]:
        resp = self.get(f"{repo}/tags/list")
        if resp.status_code == 404:  # the registry has never seen this repository
            return []
        resp.raise_for_status()
        return resp.json().get("tags") or []

    def delete(self, ref: str) -> None:
        """Delete the manifest `ref` ("host/repo@sha256:...") points at."""
        name, digest = ref.split("@")
        repo = name.split("/", 1)[1]
        httpx.delete(f"http://{self.address}/v2/{repo}/manifests/{digest}",
                     auth=(self.username, self.password), trust_env=False, timeout=10)


@pytest.fixture(scope="module")
def auth(lab) -> AuthRegistry:
    reg = AuthRegistry(**lab["auth_registry"])
    assert reg.address == "10.87.53.1:5001"
    return reg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runner-data")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A busybox httpd app whose content (hence digest) no earlier run has pushed."""
    path = tmp_path_factory.mktemp("authapp") / "repo"
    return make_repo(path, {"Dockerfile": DOCKERFILE, "version.txt": f"authtest {UID}\n"})


@pytest.fixture
def cleanup(auth):
    """track(evs) after each run: the manifest it pushed and the image it built are removed at
    the end."""
    pushed: list[str] = []
    built: list[str] = []

    def track(evs: list[dict]) -> None:
        for e in evs:
            if e["event"] == "stage.end" and e["status"] == "success":
                if e["stage"] == "build":
                    built.append(e["outputs"]["image_id"])
                elif e["stage"] == "push":
                    pushed.append(e["outputs"]["ref"])
    yield track
    for ref in pushed:
        auth.delete(ref)
    if built:
        # by id, with its tags and pushed digests: each run built its own image (the build
        # labels it with its time), and a later run took over the tag
        subprocess.run(["docker", "rmi", "--force", *built], capture_output=True)


def _pipeline(tmp_path: Path, repo: Path, image: str, secrets: str, push_auth: str,
              deploy: str = "") -> Path:
    p = tmp_path / f"pipeline-{_random.token_hex(3)}.yaml"
    p.write_text(f"""
name: authtest
repository: {{url: "{repo}"}}
image: {{name: "{image}", tags: ["{{short_sha}}"]}}
secrets:
{secrets}
stages:
  push:
    retries: 2
    auth: {push_auth}
{deploy}""")
    return p


def _assert_never_shown(value: str, proc: subprocess.CompletedProcess, data_dir: Path,
                        run_id: str) -> None:
    assert value not in proc.stdout and value not in proc.stderr
    files = [f for f in (data_dir / "runs" / run_id).rglob("*") if f.is_file()]
    assert any(f.name == "events.jsonl" for f in files), files  # the logs are really there
    for f in files:
        assert value.encode() not in f.read_bytes(), f


# ---- the lab's part ------------------------------------------------------------------------

def test_the_auth_registry_wants_the_labs_login(lab, auth):
    assert os.stat(auth.password_file).st_mode & 0o777 == 0o600
    assert len(auth.password) >= 16
    assert auth.get("", login=False).status_code == 401
    assert auth.get("").status_code == 200
    wrong = httpx.get(f"http://{auth.address}/v2/", auth=(auth.username, "wrong-" + auth.password),
                      trust_env=False, timeout=10)
    assert wrong.status_code == 401
    # `lab up --json` and `lab env` hand out the file, never the password itself
    assert auth.password not in json.dumps(lab)
    env = runner("lab", "env")
    assert env.returncode == 0, env.stderr
    assert f"export AUTH_REGISTRY_PASSWORD_FILE={auth.password_file}" in env.stdout.splitlines()
    assert auth.password not in env.stdout


# ---- a) push ---------------------------------------------------------------------------------

def test_push_with_the_right_password_lands_in_the_auth_registry(auth, repo, tmp_path, data_dir,
                                                                 cleanup):
    path = f"authtest-{UID}/push-ok"
    p = _pipeline(tmp_path, repo, f"{auth.address}/{path}",
                  f"  registry_password: {{file: \"{auth.password_file}\"}}",
                  f"{{username: {auth.username}, password: registry_password}}")
    run_id = f"authpush-ok-{UID}"
    proc, evs = exec_json(p, data_dir, run_id)
    cleanup(evs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    push = stage_end(evs, "push")["outputs"]
    assert push["ref"] == f"{auth.address}/{path}@{push['digest']}"
    # the registry itself: the manifest is there by digest, and only for a login
    resp = auth.get(f"{path}/manifests/{push['digest']}")
    assert resp.status_code == 200
    assert resp.headers["docker-content-digest"] == push["digest"]
    assert auth.get(f"{path}/manifests/{push['digest']}", login=False).status_code == 401
    assert auth.tags(path) == [stage_end(evs, "checkout")["outputs"]["short_sha"]]
    _assert_never_shown(auth.password, proc, data_dir, run_id)


def test_push_with_a_wrong_password_fails_clearly_and_pushes_nothing(auth, repo, tmp_path,
                                                                      data_dir, cleanup):
    path = f"authtest-{UID}/push-wrong"
    wrong = "wrong-" + _random.token_hex(12)
    p = _pipeline(tmp_path, repo, f"{auth.address}/{path}",
                  "  registry_password: {env: AUTHTEST_REGISTRY_PASSWORD}",
                  f"{{username: {auth.username}, password: registry_password}}")
    run_id = f"authpush-wrong-{UID}"
    proc, evs = exec_json(p, data_dir, run_id, env={"AUTHTEST_REGISTRY_PASSWORD": wrong})
    cleanup(evs)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    end = stage_end(evs, "push")
    assert end["status"] == "failed"
    error = end["error"]
    assert "authentication failed" in error and auth.address in error, error
    assert f"{auth.username!r}" in error
    assert "not retried" in error  # a refusal is not worth a retry
    run_end = [e for e in evs if e["event"] == "run.end"][-1]
    assert run_end["exit_code"] == 1 and "stage 'push' failed" in run_end["error"]
    assert auth.tags(path) == []
    _assert_never_shown(wrong, proc, data_dir, run_id)
    _assert_never_shown(auth.password, proc, data_dir, run_id)


# ---- b) deploy -------------------------------------------------------------------------------

def _deploy_yaml(lab, server: dict, app: str, port: int, registry_login: str = "") -> str:
    s0 = lab["servers"][0]
    return f"""  deploy:
    enabled: true
    servers: ["{server['user']}@{server['host']}:{server['port']}"]
    ssh: {{key_file: "{s0['key_file']}", known_hosts: "{s0['known_hosts']}",
           connect_timeout: 5, retries: 1}}
    container: {{name: {app}, ports: ["{port}:8080"], stop_timeout: 2}}
    healthcheck: {{http: {{port: 8080, path: /}}, timeout: 20, probe_interval: 0.2}}
    lock: {{ttl: 10, wait: 60}}
{registry_login}"""


def _server_docker(server: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "-H", server["docker_host"], *args], capture_output=True,
                          text=True, timeout=60)


def _on_server(lab, server: dict, fn) -> None:
    """fn(connection) over SSH, as the deployer reaches the server."""
    s0 = lab["servers"][0]
    stage = DeploySettings.model_validate({
        "enabled": True, "servers": [f"{server['user']}@{server['host']}:{server['port']}"],
        "ssh": {"key_file": s0["key_file"], "known_hosts": s0["known_hosts"]}})
    d = SSHDockerDeployer(stage, pipeline="authtest", image_name="x", run_id="authtest")
    try:
        fn(d, d.connection(d.targets[0]))
    finally:
        d.close()


def _logout(lab, server: dict, registry: str) -> None:
    # On the lab every server (and the host) share /root: a login stored by anything else
    # would let every later pull through.
    _on_server(lab, server, lambda d, conn: conn.run(["docker", "logout", registry], check=True))


def _stored_logins(lab, server: dict) -> list[str]:
    """The registries in the server's own docker config (~/.docker/config.json of the SSH
    user; the SFTP session starts in its home)."""
    found: list[str] = []

    def read(d, conn):
        def load(sftp):
            try:
                with sftp.open(".docker/config.json") as f:
                    return json.loads(f.read() or b"{}")
            except FileNotFoundError:
                return {}
        found.extend(conn.sftp_do(load).get("auths", {}))
    _on_server(lab, server, read)
    return found


def _logins_left(lab, server: dict, app: str) -> list[str]:
    found: list[str] = []

    def look(d, conn):
        auth_dir = f"{d.runner_dir(conn)}/auth"  # outside sftp_do: runner_dir takes the SFTP lock too

        def ls(sftp):
            try:
                return sftp.listdir(auth_dir)
            except FileNotFoundError:
                return []
        found.extend(n for n in conn.sftp_do(ls) if n.startswith(f"{app}--"))
    _on_server(lab, server, look)
    return found


def _remove_app(lab, server: dict, app: str) -> None:
    _on_server(lab, server, lambda d, conn: remove_app_on_server(d, conn, app))


def test_deploy_from_the_auth_registry_logs_each_server_in(lab, auth, repo, tmp_path, data_dir,
                                                           cleanup):
    server = lab["servers"][0]
    app = f"authtest{UID}"
    port = 20000 + int.from_bytes(os.urandom(2), "big") % 9000
    path = f"authtest-{UID}/deploy"
    image = f"{auth.address}/{path}"
    secrets = f"  registry_password: {{file: \"{auth.password_file}\"}}"
    push_auth = f"{{username: {auth.username}, password: registry_password}}"
    pulled: list[str] = []
    _logout(lab, server, auth.address)
    try:
        # 1. No `registry.username`: the server cannot pull; the run fails on that server,
        #    before anything on it changed.
        p = _pipeline(tmp_path, repo, image, secrets, push_auth,
                      _deploy_yaml(lab, server, app, port))
        run_id = f"authdeploy-nologin-{UID}"
        proc, evs = exec_json(p, data_dir, run_id)
        cleanup(evs)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        ref = stage_end(evs, "push")["outputs"]["ref"]
        end = stage_end(evs, "deploy")
        assert end["status"] == "failed"
        error = end["error"]
        release = ref.split("@", 1)[1][:len("sha256:") + 12]  # the failing release, shortened
        assert f"{server['host']}: failed ({release}): pulling {ref} failed" in error, error
        assert "nothing was changed on this server" in error
        assert "stages.deploy.registry" in error  # says what is missing
        assert "nothing was changed on any server" in error  # not "rolled back"
        assert _server_docker(server, "container", "inspect", app).returncode != 0
        assert _server_docker(server, "image", "inspect", ref).returncode != 0
        _assert_never_shown(auth.password, proc, data_dir, run_id)

        # 2. A wrong password: `docker login` on the server fails, named as such.
        wrong = "wrong-" + _random.token_hex(12)
        p = _pipeline(tmp_path, repo, image,
                      secrets + "\n  server_password: {env: AUTHTEST_SERVER_PASSWORD}",
                      push_auth, _deploy_yaml(lab, server, app, port, (
                          f"    registry: {{username: {auth.username}, "
                          "password: server_password}\n")))
        run_id = f"authdeploy-wrong-{UID}"
        proc, evs = exec_json(p, data_dir, run_id, env={"AUTHTEST_SERVER_PASSWORD": wrong})
        cleanup(evs)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        ref = stage_end(evs, "push")["outputs"]["ref"]
        release = ref.split("@", 1)[1][:len("sha256:") + 12]
        error = stage_end(evs, "deploy")["error"]
        assert (f"{server['host']}: failed ({release}): docker login to {auth.address} as "
                f"{auth.username!r} failed") in error, error
        assert "nothing was changed on this server" in error
        assert _server_docker(server, "container", "inspect", app).returncode != 0
        _assert_never_shown(wrong, proc, data_dir, run_id)
        _assert_never_shown(auth.password, proc, data_dir, run_id)

        # 3. With the login: each server logs in (password on stdin), pulls, runs the digest.
        login = f"    registry: {{username: {auth.username}, password: registry_password}}\n"
        p = _pipeline(tmp_path, repo, image, secrets, push_auth,
                      _deploy_yaml(lab, server, app, port, login))
        run_id = f"authdeploy-login-{UID}"
        proc, evs = exec_json(p, data_dir, run_id)
        cleanup(evs)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        push = stage_end(evs, "push")["outputs"]
        assert push["ref"] == ref  # the same commit builds the same image as in 1.
        pulled.append(ref)
        deployed = stage_end(evs, "deploy")["outputs"]["servers"]
        assert [(s["status"], s["digest"]) for s in deployed] == [("deployed", push["digest"])]
        running = _server_docker(server, "container", "inspect", app, "--format",
                                 "{{.State.Running}} {{.Config.Image}} "
                                 "{{index .Config.Labels \"runner.digest\"}}")
        assert running.stdout.split() == ["true", ref, push["digest"]], running.stderr
        repo_digests = _server_docker(server, "image", "inspect", ref, "--format",
                                      "{{json .RepoDigests}}").stdout
        assert ref in repo_digests
        with urllib.request.urlopen(f"http://{server['host']}:{port}/", timeout=10) as resp:
            assert resp.read().decode().strip() == f"authtest {UID}"
        _assert_never_shown(auth.password, proc, data_dir, run_id)
        # The login lived in a docker config dir of that deploy's own, removed after the pull:
        # nothing is left in the server's own config, nor in the runner's dir.
        assert auth.address not in _stored_logins(lab, server)
        assert _logins_left(lab, server, app) == []
    finally:
        _remove_app(lab, server, app)
        for ref in pulled:
            _server_docker(server, "image", "rm", ref)
        _logout(lab, server, auth.address)
