"""Registries as users have them: the lab's registry with token auth (127.0.0.1:5002, the scheme
of Docker Hub, GHCR and GitLab, with the lab's token issuer at 127.0.0.1:5003), and its registry
with a Basic login (10.87.53.1:5001). Pushes with `stages.push.auth`, with `docker login` alone
(the docker CLI, DOCKER_CONFIG pointing at a temp dir: a config file, or a real credential
helper), a verification without read credentials, and wrong credentials.

Passwords and identity tokens must never show in the run's output or its files (run.json, logs).
Everything a test creates (local images, registry manifests) is removed at the end.
"""
from __future__ import annotations

import base64
import json
import os
import secrets as _random
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pipelines.push import Credentials, PushStage, verify_pushed
from runner.errors import StageFailed
from runner.model import Image, Pipeline, RegistryAuth, Repository, Stages
from runner.model import PushSettings
from runner.model.image import ImageName
from runner.secrets import Masker, SecretStore
from runner.stage import StageContext
from tests.doubles import ListLog, build_outputs
from tests.helpers import (MANIFEST_TYPES, commit_unique_image, exec_json, lab_env_printed,
                           make_repo, stage_end)

UID = _random.token_hex(3)
DOCKERFILE = "FROM local/busybox:1\nCOPY version.txt /version.txt\nCMD [\"cat\", \"/version.txt\"]\n"


@dataclass(frozen=True)
class Registry:
    """One of the lab's registries with a login, read and cleaned up from the test's side."""

    address: str
    username: str
    password_file: str
    realm: str | None = None  # token auth: the issuer's endpoint
    service: str | None = None

    @property
    def password(self) -> str:
        return Path(self.password_file).read_text().strip()

    def token(self, scope: str, user: str | None = None, password: str | None = None) -> str:
        resp = httpx.get(self.realm, params={"service": self.service, "scope": scope},
                         auth=(user or self.username, password or self.password),
                         trust_env=False, timeout=10)
        resp.raise_for_status()
        return resp.json()["token"]

    def _auth(self, repo: str, actions: str) -> dict:
        if self.realm is None:
            basic = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return {"Authorization": f"Basic {basic}"}
        return {"Authorization": f"Bearer {self.token(f'repository:{repo}:{actions}')}"}

    def get(self, repo: str, what: str) -> httpx.Response:
        return httpx.get(f"http://{self.address}/v2/{repo}/{what}",
                         headers={"Accept": MANIFEST_TYPES, **self._auth(repo, "pull")},
                         trust_env=False, timeout=10)

    def tags(self, repo: str) -> list[str]:
        resp = self.get(repo, "tags/list")
        if resp.status_code == 404:  # the registry has never seen this repository
            return []
        resp.raise_for_status()
        return resp.json().get("tags") or []

    def delete(self, repo: str, digest: str) -> None:
        httpx.delete(f"http://{self.address}/v2/{repo}/manifests/{digest}",
                     headers=self._auth(repo, "delete"), trust_env=False, timeout=10)


@pytest.fixture(scope="module")
def token_reg(lab) -> Registry:
    t = lab["token_registry"]
    reg = Registry(t["address"], t["username"], t["password_file"], t["realm"], t["service"])
    assert reg.address == "127.0.0.1:5002" and reg.realm == "http://127.0.0.1:5003/token"
    return reg


@pytest.fixture(scope="module")
def basic_reg(lab) -> Registry:
    return Registry(**lab["auth_registry"])


@pytest.fixture
def registries(token_reg, basic_reg):
    return {"token": token_reg, "basic": basic_reg}


@pytest.fixture
def pushed():
    """track(registry, "host/repo@sha256:...") -> that manifest is deleted at the end."""
    made: list[tuple[Registry, str]] = []
    yield lambda reg, ref: made.append((reg, ref))
    for reg, ref in made:
        parsed = ImageName.parse(ref)
        reg.delete(parsed.repository, parsed.digest)


@pytest.fixture
def fresh_image(lab):
    """make(ref) -> the id of a new one-layer image tagged `ref` on the build engine (a digest
    no registry has seen); every such image is removed at the end."""
    import docker

    client = docker.from_env()
    made: list[str] = []

    def make(ref: str) -> str:
        parsed = ImageName.parse(ref)
        image = commit_unique_image(client, parsed.name, parsed.tag)
        made.append(image.id)
        return image.id

    yield make
    for image_id in made:
        try:
            client.images.remove(image_id, force=True)
        except docker.errors.DockerException:
            pass
    client.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenapp") / "repo"
    return make_repo(path, {"Dockerfile": DOCKERFILE, "version.txt": f"tokentest {UID}\n"})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runner-data")


@pytest.fixture
def built():
    """track(evs): the images `runner exec` built are removed at the end."""
    ids: list[str] = []

    def track(evs: list[dict]) -> None:
        for e in evs:
            if e["event"] == "stage.end" and e["stage"] == "build" and e["status"] == "success":
                ids.append(e["outputs"]["image_id"])
    yield track
    if ids:
        subprocess.run(["docker", "rmi", "--force", *ids], capture_output=True)


def _ctx(tmp_path: Path, ref: str, image_id: str, masker: Masker | None = None,
         secret_values: dict[str, str] | None = None, **push) -> StageContext:
    """The push stage's context for one built image, as the engine makes it."""
    name = ImageName.parse(ref).name
    pipeline = Pipeline(name="t", repository=Repository(url="https://example.invalid/t.git"),
                        image=Image(name=name), stages=Stages(push=PushSettings(**push)))
    ctx = StageContext(run_id="r1", pipeline=pipeline, workdir=tmp_path, cache_dir=tmp_path,
                       log=ListLog(), secrets=SecretStore(secret_values or {},
                                           masker if masker is not None else Masker()),
                       cancel=threading.Event())
    ctx.outputs.build = build_outputs([ref], image_id)
    return ctx


def _docker_login(config_dir: Path, registry: str, user: str, password: str,
                  env: dict | None = None) -> None:
    """`docker login` as a user runs it (the docker CLI, password on stdin), into config_dir."""
    proc = subprocess.run(["docker", "login", registry, "-u", user, "--password-stdin"],
                          input=password, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DOCKER_CONFIG": str(config_dir), **(env or {})})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pipeline(tmp_path: Path, repo: Path, image: str, secrets: str = "{}",
              push_auth: str = "{}") -> Path:
    p = tmp_path / f"pipeline-{_random.token_hex(3)}.yaml"
    p.write_text(f"""
name: tokentest
repository: {{url: "{repo}"}}
image: {{name: "{image}", tags: ["{{short_sha}}"]}}
secrets: {secrets}
stages:
  push:
    retries: 1
    auth: {push_auth}
""")
    return p


def _assert_never_shown(values: list[str], proc: subprocess.CompletedProcess, data_dir: Path,
                        run_id: str) -> None:
    files = [f for f in (data_dir / "runs" / run_id).rglob("*") if f.is_file()]
    assert {"events.jsonl", "run.json"} <= {f.name for f in files}, files  # the record is there
    for value in values:
        assert value not in proc.stdout and value not in proc.stderr
        for f in files:
            assert value.encode() not in f.read_bytes(), f


def _run_json(data_dir: Path, run_id: str) -> dict:
    return json.loads((data_dir / "runs" / run_id / "run.json").read_text())


def _push_outputs(record: dict) -> dict:
    return [s for s in record["stages"] if s["name"] == "push"][0]["outputs"]


# ---- the lab's part ------------------------------------------------------------------------

def test_the_token_registry_sends_clients_to_the_labs_issuer(lab, token_reg):
    resp = httpx.get(f"http://{token_reg.address}/v2/", trust_env=False, timeout=10)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == (
        'Bearer realm="http://127.0.0.1:5003/token",service="runner-lab-registry"')
    # a wrong password gets no token at all
    wrong = httpx.get(token_reg.realm, params={"service": token_reg.service},
                      auth=(token_reg.username, "wrong-" + token_reg.password), trust_env=False,
                      timeout=10)
    assert wrong.status_code == 401 and "token" not in wrong.text
    # the lab's user: a token the registry accepts, with the access it asked for
    token = token_reg.token("repository:tokentest/x:pull,push")
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                      for part in token.split(".")[:2])
    assert header["alg"] == "ES256" and len(header["kid"].split(":")) == 12
    assert claims["iss"] == "runner-lab-token-issuer" and claims["aud"] == token_reg.service
    assert claims["access"] == [{"type": "repository", "name": "tokentest/x",
                                 "actions": ["pull", "push"]}]
    ok = httpx.get(f"http://{token_reg.address}/v2/", headers={"Authorization": f"Bearer {token}"},
                   trust_env=False, timeout=10)
    assert ok.status_code == 200
    # anonymous: a token that grants nothing, so a read is refused as Docker Hub refuses one of
    # a private repository
    anon = httpx.get(token_reg.realm, params={"service": token_reg.service,
                                              "scope": "repository:tokentest/x:pull"},
                     trust_env=False, timeout=10).json()["token"]
    refused = httpx.get(f"http://{token_reg.address}/v2/tokentest/x/tags/list",
                        headers={"Authorization": f"Bearer {anon}"}, trust_env=False, timeout=10)
    assert refused.status_code == 401
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    # the password is handed out as a file only
    assert os.stat(token_reg.password_file).st_mode & 0o777 == 0o600
    assert token_reg.password not in json.dumps(lab)
    env = lab_env_printed()
    assert env["TOKEN_REGISTRY"] == token_reg.address
    assert env["TOKEN_REGISTRY_USER"] == token_reg.username
    assert env["TOKEN_REGISTRY_PASSWORD_FILE"] == token_reg.password_file
    assert token_reg.password not in json.dumps(env)


# ---- pushes --------------------------------------------------------------------------------

def test_push_to_the_token_registry_with_stages_push_auth_is_verified(token_reg, repo, tmp_path,
                                                                      data_dir, built, pushed):
    path = f"tokentest-{UID}/auth"
    p = _pipeline(tmp_path, repo, f"{token_reg.address}/{path}",
                  f'{{registry_password: {{file: "{token_reg.password_file}"}}}}',
                  f"{{username: {token_reg.username}, password: registry_password}}")
    run_id = f"tokenpush-auth-{UID}"
    proc, evs = exec_json(p, data_dir, run_id)
    built(evs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = stage_end(evs, "push")["outputs"]
    pushed(token_reg, out["ref"])
    assert out["ref"] == f"{token_reg.address}/{path}@{out['digest']}"
    assert out["verified"] is True and out["credentials"] == "stages.push.auth"
    assert "with a token from http://127.0.0.1:5003/token for user 'lab'" in out["verification"]
    assert _push_outputs(_run_json(data_dir, run_id))["verified"] is True
    # the registry itself, with a token of the test's own
    resp = token_reg.get(path, f"manifests/{out['digest']}")
    assert resp.status_code == 200 and resp.headers["docker-content-digest"] == out["digest"]
    assert token_reg.tags(path) == [stage_end(evs, "checkout")["outputs"]["short_sha"]]
    _assert_never_shown([token_reg.password], proc, data_dir, run_id)


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_push_relies_on_docker_login_alone(kind, registries, repo, tmp_path, data_dir, built,
                                           pushed):
    """No stages.push.auth: `docker login` into a DOCKER_CONFIG of the test's own is all the
    runner has. Against the token registry docker stores an identity token (the issuer's refresh
    token) instead of the password, which the push and the verification then use."""
    reg = registries[kind]
    config_dir = tmp_path / "docker-config"
    _docker_login(config_dir, reg.address, reg.username, reg.password)
    stored = json.loads((config_dir / "config.json").read_text())["auths"][reg.address]
    identity_token = stored.get("identitytoken")
    assert (identity_token is not None) == (kind == "token"), sorted(stored)
    path = f"tokentest-{UID}/login-{kind}"
    p = _pipeline(tmp_path, repo, f"{reg.address}/{path}")
    run_id = f"tokenpush-login-{kind}-{UID}"
    proc, evs = exec_json(p, data_dir, run_id, env={"DOCKER_CONFIG": str(config_dir)})
    built(evs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = stage_end(evs, "push")["outputs"]
    pushed(reg, out["ref"])
    assert out["credentials"] == f"docker's config {config_dir / 'config.json'}"
    assert out["verified"] is True, out["verification"]
    if kind == "token":
        assert "with a token from http://127.0.0.1:5003/token for an identity token" \
            in out["verification"]
    else:
        assert f"with user {reg.username!r}" in out["verification"]
    assert reg.get(path, f"manifests/{out['digest']}").status_code == 200
    _assert_never_shown([reg.password] + ([identity_token] if identity_token else []),
                        proc, data_dir, run_id)


CREDENTIAL_HELPER = """#!{python}
# docker's credential helper protocol, kept in a JSON file beside this script
import json, os, sys
store = os.path.join(os.path.dirname(os.path.abspath(__file__)), "store.json")
data = json.load(open(store)) if os.path.exists(store) else {{}}
cmd = sys.argv[1]
if cmd == "store":
    entry = json.load(sys.stdin)
    data[entry["ServerURL"]] = [entry["Username"], entry["Secret"]]
    fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, json.dumps(data).encode()); os.close(fd)
elif cmd == "get":
    server = sys.stdin.read().strip()
    if server not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps({{"ServerURL": server, "Username": data[server][0],
                      "Secret": data[server][1]}}))
elif cmd == "erase":
    data.pop(sys.stdin.read().strip(), None)
    json.dump(data, open(store, "w"))
elif cmd == "list":
    print(json.dumps({{k: v[0] for k, v in data.items()}}))
"""


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_push_with_a_login_in_a_credential_helper(kind, registries, tmp_path, fresh_image,
                                                  pushed, monkeypatch):
    """`credsStore` in docker's config: `docker login` hands the login to the helper, and the
    stage gets it back through the SDK (`docker-credential-NAME get`)."""
    reg = registries[kind]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-rlabtest"
    helper.write_text(CREDENTIAL_HELPER.format(python=sys.executable))
    helper.chmod(0o755)
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text('{"credsStore": "rlabtest"}\n')
    path_env = f"{bin_dir}:{os.environ['PATH']}"
    _docker_login(config_dir, reg.address, reg.username, reg.password, env={"PATH": path_env})
    held = json.loads((bin_dir / "store.json").read_text())[reg.address]
    assert held[0] == ("<token>" if kind == "token" else reg.username)  # docker's convention
    # the config file itself holds no login, only the helper's name
    assert json.loads((config_dir / "config.json").read_text())["auths"] == {reg.address: {}}

    monkeypatch.setenv("PATH", path_env)
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    ref = f"{reg.address}/tokentest-{UID}/helper-{kind}:t1"
    image_id = fresh_image(ref)
    masker = Masker()
    ctx = _ctx(tmp_path, ref, image_id, masker)
    out = PushStage().run(ctx).to_dict()
    pushed(reg, out["ref"])
    assert out["credentials"] == (f"credential helper docker-credential-rlabtest (named in "
                                  f"{config_dir / 'config.json'})")
    assert out["verified"] is True, out["verification"]
    assert f"its config is the image this run built ({image_id})" in out["verification"]
    text = "\n".join(ctx.log.lines + ctx.log.infos + ctx.log.warns + [json.dumps(out)])
    assert held[1] not in text
    assert masker.mask(held[1]) == "***"  # the helper's secret is masked from then on


# ---- verification without read credentials ----------------------------------------------

@pytest.mark.parametrize("kind", ["basic", "token"])
def test_a_verify_with_no_read_credentials_says_so_and_is_no_verification(
        kind, registries, tmp_path, fresh_image, pushed):
    reg = registries[kind]
    ref = f"{reg.address}/tokentest-{UID}/noread-{kind}:t1"
    image_id = fresh_image(ref)
    ctx = _ctx(tmp_path, ref, image_id, secret_values={"pw": reg.password},
               auth=RegistryAuth(username=reg.username, password_secret="pw"))
    out = PushStage().run(ctx).to_dict()
    pushed(reg, out["ref"])
    assert out["verified"] is True  # with the login: read back
    name = ImageName.parse(f"{reg.address}/tokentest-{UID}/noread-{kind}")

    import docker
    client = docker.from_env()
    registry_config = client.info()["RegistryConfig"]
    client.close()
    nobody = Credentials(reg.address, "no login in this test")
    check = verify_pushed(name, out["digest"], image_id, nobody, registry_config)
    assert check.verified is False
    if kind == "token":
        assert check.detail == (
            f"registry {reg.address} refused to serve {name}@{out['digest']} with a token from "
            f"http://127.0.0.1:5003/token for no credentials (no login in this test) (401): "
            "reading it needs another login")
    else:
        assert check.detail == (f"registry {reg.address} wants a login (Basic) to read {name}, "
                                "and there is none: no login in this test")
    if kind == "token":  # a login the token endpoint refuses: no verification either
        wrong = Credentials(reg.address, "a test", username=reg.username, password="wrong")
        check = verify_pushed(name, out["digest"], image_id, wrong, registry_config)
        assert check.verified is False
        assert "its token endpoint http://127.0.0.1:5003/token refused user 'lab'" in check.detail


def test_a_push_only_login_pushes_and_the_run_says_it_was_not_verified(token_reg, repo, tmp_path,
                                                                       data_dir, built, lab):
    """A CI account that may push but not read (the lab's push-only user): the push succeeds
    with the engine's digest, the stage warns that the verification was skipped and why, and
    the run's record says verified: false; nothing claims a verification."""
    user = lab["token_registry"]["push_only_username"]
    path = f"tokentest-{UID}/pushonly"
    p = _pipeline(tmp_path, repo, f"{token_reg.address}/{path}",
                  f'{{registry_password: {{file: "{token_reg.password_file}"}}}}',
                  f"{{username: {user}, password: registry_password}}")
    run_id = f"tokenpush-pushonly-{UID}"
    proc, evs = exec_json(p, data_dir, run_id)
    built(evs)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = stage_end(evs, "push")["outputs"]
        assert out["digest"].startswith("sha256:") and out["verified"] is False
        assert out["verification"] == (
            f"registry {token_reg.address} refused to serve {out['ref']} with a token from "
            f"http://127.0.0.1:5003/token for user {user!r} from stages.push.auth (401): "
            "reading it needs another login")
        record = _run_json(data_dir, run_id)
        assert _push_outputs(record)["verified"] is False
        assert [w for w in record["warnings"] if w.startswith("push: ")] == [
            f"push: pushed {out['ref']} (the digest the engine reported), but its verification "
            f"was skipped: {out['verification']}"]
        lines = [e.get("line", "") for e in evs if e["event"] == "stage.log"
                 and e["stage"] == "push"]
        assert not any(line.startswith("verified") for line in lines), lines
        # it is there all the same (read with the full login)
        assert token_reg.get(path, f"manifests/{out['digest']}").status_code == 200
        _assert_never_shown([token_reg.password], proc, data_dir, run_id)
    finally:
        for e in evs:
            if e["event"] == "stage.end" and e["stage"] == "push" and e["status"] == "success":
                token_reg.delete(path, e["outputs"]["digest"])


# ---- wrong credentials -----------------------------------------------------------------------

def test_a_wrong_password_for_the_token_registry_fails_at_the_push_naming_it(
        token_reg, tmp_path, fresh_image):
    wrong = "wrong-" + _random.token_hex(12)
    path = f"tokentest-{UID}/wrong"
    ref = f"{token_reg.address}/{path}:t1"
    ctx = _ctx(tmp_path, ref, fresh_image(ref), secret_values={"pw": wrong},
               auth=RegistryAuth(username=token_reg.username, password_secret="pw"), retries=2)
    with pytest.raises(StageFailed) as err:
        PushStage(backoff_base=0.1).run(ctx)
    msg = str(err.value)
    assert "not retried" in msg and ctx.log.warns == []
    assert (f"authentication failed: registry {token_reg.address} refused user "
            f"{token_reg.username!r}") in msg and "check stages.push.auth" in msg
    assert wrong not in msg and token_reg.password not in msg
    assert token_reg.tags(path) == []


def test_a_stale_docker_login_fails_naming_the_registry_and_the_file(token_reg, tmp_path,
                                                                     fresh_image, monkeypatch):
    """A login in docker's config that the registry no longer accepts (the password changed
    since `docker login`)."""
    wrong = "stale-" + _random.token_hex(12)
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    auth = base64.b64encode(f"{token_reg.username}:{wrong}".encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {token_reg.address:
                                                                  {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    path = f"tokentest-{UID}/stale"
    ref = f"{token_reg.address}/{path}:t1"
    masker = Masker()
    ctx = _ctx(tmp_path, ref, fresh_image(ref), masker)
    with pytest.raises(StageFailed) as err:
        PushStage().run(ctx)
    msg = str(err.value)
    assert (f"authentication failed: registry {token_reg.address} refused user "
            f"{token_reg.username!r} from docker's config {config_dir / 'config.json'}") in msg
    assert f"run `docker login {token_reg.address}` again" in msg
    assert wrong not in msg and auth not in msg
    assert masker.mask(f"{wrong} {auth}") == "*** ***"
    assert token_reg.tags(path) == []


def test_no_login_at_all_fails_saying_where_one_was_looked_for(token_reg, tmp_path, fresh_image,
                                                                monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nothing-here"))
    path = f"tokentest-{UID}/anonymous"
    ref = f"{token_reg.address}/{path}:t1"
    ctx = _ctx(tmp_path, ref, fresh_image(ref))
    with pytest.raises(StageFailed) as err:
        PushStage().run(ctx)
    msg = str(err.value)
    assert (f"authentication failed: registry {token_reg.address} wants a login, and none was "
            f"found (stages.push.auth is not set, and {tmp_path / 'nothing-here' / 'config.json'} "
            "does not exist)") in msg
    assert token_reg.tags(path) == []
