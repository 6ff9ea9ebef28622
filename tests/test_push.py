"""The push stage: stream reading, error classes and registry addressing are pure; pushes run
against the lab's engine and registry (the `lab` fixture sets DOCKER_HOST). Tags a test creates
are removed from the engine at the end."""
from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from pipelines.base import StageContext
from pipelines.push import (
    MANIFEST_TYPES,
    Credentials,
    PushStage,
    backoff,
    credentials_from_entry,
    docker_config_file,
    is_auth_error,
    is_transient,
    parse_challenge,
    read_push_stream,
    registry_is_insecure,
    registry_key,
    split_name,
    split_ref,
)
from runner.errors import Cancelled, StageFailed
from runner.model import Image, Pipeline, RegistryAuth, Repository, Stages
from runner.model import PushSettings
from runner.secrets import Masker, SecretStore
from tests.doubles import ListLog, DictSecrets
from tests.helpers import commit_unique_image

DIGEST = "sha256:" + "ab" * 32


def make_ctx(tmp_path: Path, image: str, tags: list[str], log: ListLog | None = None,
             secret_values: dict[str, str] | None = None, **push: object) -> StageContext:
    pipeline = Pipeline(name="t", repository=Repository(url="https://example.invalid/t.git"),
                        image=Image(name=image), stages=Stages(push=PushSettings(**push)))
    ctx = StageContext(run_id="r1", pipeline=pipeline, workdir=tmp_path, cache_dir=tmp_path,
                       log=log or ListLog(), secrets=DictSecrets(secret_values or {}),
                       cancel=threading.Event())
    ctx.results["build"] = {"tags": tags}
    return ctx


# --- pure ---------------------------------------------------------------------------------

# Items as the docker SDK decodes them from a real push (engine 20.10, distribution 2.8).
OK_STREAM = [
    {"status": "The push refers to repository [10.87.53.1:5000/test/a]"},
    {"status": "Preparing", "progressDetail": {}, "id": "5f70bf18a086"},
    {"status": "Pushing", "progressDetail": {"current": 512, "total": 1024},
     "progress": "[=====>     ]", "id": "5f70bf18a086"},
    {"status": "Pushed", "progressDetail": {}, "id": "5f70bf18a086"},
    {"status": f"main: digest: {DIGEST} size: 527"},
    {"progressDetail": {}, "aux": {"Tag": "main", "Digest": DIGEST, "Size": 527}},
]


def test_read_push_stream_takes_digest_from_aux_and_skips_progress_bars():
    lines: list[str] = []
    out = read_push_stream(OK_STREAM, lines.append)
    assert out.digest == DIGEST and out.error is None
    assert lines == ["The push refers to repository [10.87.53.1:5000/test/a]",
                     "5f70bf18a086: Preparing", "5f70bf18a086: Pushed",
                     f"main: digest: {DIGEST} size: 527"]


def test_read_push_stream_error_item_is_a_failure_even_after_progress():
    items = OK_STREAM[:2] + [{"errorDetail": {"message": "denied: requested access"},
                              "error": "denied: requested access"}]
    out = read_push_stream(items)
    assert out.digest is None and out.error == "denied: requested access"
    assert read_push_stream(OK_STREAM[:4]).error == "the engine reported no digest for the push"


@pytest.mark.parametrize("msg,transient,auth", [
    ('Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused',
     True, False),
    ("read tcp 1.2.3.4:5->6.7.8.9:443: read: connection reset by peer", True, False),
    ("net/http: TLS handshake timeout", True, False),
    ("dial tcp: i/o timeout", True, False),
    ("received unexpected HTTP status: 503 Service Unavailable", True, False),
    ("received unexpected HTTP status: 500 Internal Server Error", True, False),
    ("unauthorized: authentication required", False, True),
    ("denied: requested access to the resource is denied", False, True),
    ("An image does not exist locally with the tag: x/y", False, False),
])
def test_error_classes(msg, transient, auth):
    assert is_transient(msg) is transient
    assert is_auth_error(msg) is auth


def test_backoff_doubles_and_caps():
    assert [backoff(n, 1.0) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    assert backoff(2, 0.1) == pytest.approx(0.2)


def test_names():
    assert split_ref("10.87.53.1:5000/a/b:main") == ("10.87.53.1:5000/a/b", "main")
    assert split_ref("10.87.53.1:5000/a/b") == ("10.87.53.1:5000/a/b", "latest")
    assert split_name("10.87.53.1:5000/a/b") == ("10.87.53.1:5000", "a/b")
    assert split_name("localhost/a") == ("localhost", "a")
    assert split_name("busybox") == ("registry-1.docker.io", "library/busybox")
    assert split_name("me/app") == ("registry-1.docker.io", "me/app")


def test_registry_is_insecure_follows_the_engine():
    cfg = {"InsecureRegistryCIDRs": ["127.0.0.0/8"],
           "IndexConfigs": {"10.87.53.1:5000": {"Name": "10.87.53.1:5000", "Secure": False},
                            "docker.io": {"Secure": True}}}
    assert registry_is_insecure("10.87.53.1:5000", cfg)
    assert registry_is_insecure("127.0.0.1:5999", cfg)
    assert registry_is_insecure("localhost:5000", cfg)
    assert not registry_is_insecure("10.87.53.2:5000", cfg)
    assert not registry_is_insecure("registry.example.com", cfg)
    assert not registry_is_insecure("127.0.0.1:5000", None)


# Challenges as these registries send them to an anonymous GET of a manifest.
@pytest.mark.parametrize("header,scheme,params", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/busybox:pull"', "bearer",
     {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
      "scope": "repository:library/busybox:pull"}),
    ('Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:me/app:pull"',
     "bearer", {"realm": "https://ghcr.io/token", "service": "ghcr.io",
                "scope": "repository:me/app:pull"}),
    ('Bearer realm="https://gitlab.com/jwt/auth",service="container_registry",'
     'scope="repository:me/app:pull",error="insufficient_scope"', "bearer",
     {"realm": "https://gitlab.com/jwt/auth", "service": "container_registry",
      "scope": "repository:me/app:pull", "error": "insufficient_scope"}),
    ('Basic realm="runner-lab"', "basic", {"realm": "runner-lab"}),
    ('Bearer realm="https://r.example/token?a=b",error=invalid_token', "bearer",
     {"realm": "https://r.example/token?a=b", "error": "invalid_token"}),
    ("", "", {}),
])
def test_parse_challenge(header, scheme, params):
    assert parse_challenge(header) == (scheme, params)


def test_registry_key_is_how_docker_keys_its_logins():
    assert registry_key("10.87.53.1:5001/a/b") == "10.87.53.1:5001"
    assert registry_key("127.0.0.1:5002/a") == "127.0.0.1:5002"
    assert registry_key("ghcr.io/me/app") == "ghcr.io"
    assert registry_key("me/app") == "docker.io"
    assert registry_key("busybox") == "docker.io"


def test_docker_config_file_follows_docker_config_as_the_cli_does():
    assert docker_config_file({"DOCKER_CONFIG": "/tmp/dc"}, home="/home/u") == \
        Path("/tmp/dc/config.json")
    assert docker_config_file({}, home="/home/u") == Path("/home/u/.docker/config.json")
    assert docker_config_file({"DOCKER_CONFIG": ""}, home="/home/u") == \
        Path("/home/u/.docker/config.json")


def test_credentials_from_the_sdks_entries():
    # an `auths` entry (lower case), a credential helper's answer (capitalised), an identity
    # token, and the empty entry docker leaves beside a credsStore
    c = credentials_from_entry("r:1", {"username": "u", "password": "p", "email": None,
                                       "serveraddress": "r:1"}, "docker's config F")
    assert (c.username, c.password, c.identity_token) == ("u", "p", None)
    c = credentials_from_entry("r:1", {"ServerAddress": "r:1", "Username": "u",
                                       "Password": "p"}, "helper")
    assert (c.username, c.password) == ("u", "p")
    c = credentials_from_entry("r:1", {"IdentityToken": "tok"}, "docker's config F")
    assert c.identity_token == "tok" and not c.anonymous
    assert credentials_from_entry("r:1", {}, "F") is None
    assert credentials_from_entry("r:1", None, "F") is None


def test_credentials_never_show_their_secrets():
    pw = Credentials("r:1", "stages.push.auth", username="ci", password="pw-secret-value")
    tok = Credentials("r:1", "docker's config /x/config.json", identity_token="tok-secret-value")
    none = Credentials("r:1", "stages.push.auth is not set, and /x/config.json does not exist")
    for c in (pw, tok, none):
        for text in (repr(c), str(c), c.describe()):
            assert "secret-value" not in text
    assert pw.describe() == "user 'ci' from stages.push.auth"
    assert tok.describe() == "an identity token from docker's config /x/config.json"
    assert none.anonymous and none.describe().startswith("no credentials (stages.push.auth")
    assert pw.engine_auth() == {"username": "ci", "password": "pw-secret-value",
                                "serveraddress": "r:1"}
    assert tok.engine_auth() == {"identitytoken": "tok-secret-value", "serveraddress": "r:1"}
    assert none.engine_auth() == {}


def _helper(dir_: Path, name: str, store: dict[str, tuple[str, str]] | None,
            fail: str | None = None) -> Path:
    """A real credential helper `docker-credential-NAME` (docker's helper protocol: `get` reads
    the server on stdin, prints {"ServerURL", "Username", "Secret"}), answering from `store`."""
    import json
    import sys

    script = dir_ / f"docker-credential-{name}"
    script.write_text(f"""#!{sys.executable}
import json, sys
STORE = {json.dumps({k: list(v) for k, v in (store or {}).items()})}
FAIL = {fail!r}
if sys.argv[1] != "get":
    sys.exit(0)
if FAIL:
    print(FAIL)
    sys.exit(1)
server = sys.stdin.read().strip()
if server not in STORE:
    print("credentials not found in native keychain")
    sys.exit(1)
user, secret = STORE[server]
print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
""")
    script.chmod(0o755)
    return script


def test_logins_from_docker_config_auths_helpers_and_none(tmp_path, monkeypatch):
    """The SDK's own resolution, on real files and a real helper process."""
    import base64
    import json

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _helper(bin_dir, "rtest", {"10.0.0.1:5000": ("helper-user", "helper-pw"),
                               "10.0.0.2:5000": ("<token>", "helper-identity-token")})
    _helper(bin_dir, "broken", None, fail="the keychain is locked")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg_dir = tmp_path / "dc"
    cfg_dir.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg_dir))
    config = cfg_dir / "config.json"
    config.write_text(json.dumps({
        "auths": {"10.0.0.3:5000": {"auth": base64.b64encode(b"file-user:file-pw").decode()},
                  "10.0.0.4:5000": {"auth": base64.b64encode(b"u:").decode(),
                                    "identitytoken": "file-identity-token"},
                  "10.0.0.1:5000": {}},
        "credHelpers": {"10.0.0.1:5000": "rtest", "10.0.0.2:5000": "rtest",
                        "10.0.0.9:5000": "broken"}}))
    masker = Masker()
    ctx = make_ctx(tmp_path, "x/y", ["x/y:1"])
    ctx = StageContext(**{**ctx.__dict__, "secrets": SecretStore({}, masker)})
    stage = PushStage()

    c = stage._credentials(ctx, "10.0.0.1:5000")
    assert (c.username, c.password) == ("helper-user", "helper-pw")
    assert c.source == f"credential helper docker-credential-rtest (named in {config})"
    c = stage._credentials(ctx, "10.0.0.2:5000")
    assert c.identity_token == "helper-identity-token" and c.username is None
    c = stage._credentials(ctx, "10.0.0.3:5000")
    assert (c.username, c.password, c.source) == ("file-user", "file-pw",
                                                  f"docker's config {config}")
    c = stage._credentials(ctx, "10.0.0.4:5000")
    assert c.identity_token == "file-identity-token"
    c = stage._credentials(ctx, "10.0.0.5:5000")
    assert c.anonymous
    assert c.source == f"stages.push.auth is not set, and {config} has no login for 10.0.0.5:5000"
    with pytest.raises(StageFailed) as err:
        stage._credentials(ctx, "10.0.0.9:5000")
    assert "docker-credential-broken" in str(err.value) and "10.0.0.9:5000" in str(err.value)
    # what came from docker's config is masked from now on, in every form
    for value in ("helper-pw", "helper-identity-token", "file-pw", "file-identity-token"):
        assert masker.mask(f"x {value} y") == "x *** y"

    # DOCKER_CONFIG without a config.json: no login, and no fallback to ~/.docker
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    c = stage._credentials(ctx, "10.0.0.3:5000")
    assert c.anonymous and "empty/config.json does not exist" in c.source

    # stages.push.auth comes first, whatever docker's config holds
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg_dir))
    ctx = make_ctx(tmp_path, "x/y", ["x/y:1"], secret_values={"regpw": "pipeline-pw"},
                   auth=RegistryAuth(username="ci", password_secret="regpw"))
    c = stage._credentials(ctx, "10.0.0.3:5000")
    assert (c.username, c.password, c.source) == ("ci", "pipeline-pw", "stages.push.auth")


def test_plan_says_where_credentials_come_from():
    def plan(**push):
        return PushStage().plan(Pipeline(
            name="t", repository=Repository(url="https://example.invalid/t.git"),
            image=Image(name="ghcr.io/me/app"), stages=Stages(push=PushSettings(**push))))
    assert plan()["credentials"].startswith("docker's config (DOCKER_CONFIG or ~/.docker")
    assert plan()["registry"] == "ghcr.io"
    explicit = plan(auth=RegistryAuth(username="ci", password_secret="p"))
    assert explicit["credentials"] == "stages.push.auth"


def test_nothing_to_push(tmp_path):
    with pytest.raises(StageFailed, match="no tags"):
        PushStage().run(make_ctx(tmp_path, "x/y", []))


def test_password_without_username_is_refused(tmp_path):
    # by the settings themselves, so a pipeline file with only one of them is invalid
    with pytest.raises(ValueError, match="username and password"):
        RegistryAuth(password_secret="p")


# --- on the lab ---------------------------------------------------------------------------

@pytest.fixture
def tagged(lab):
    """tag(ref) tags `source` (the lab's busybox base by default) as `ref`; with unique=True it
    commits a fresh one-layer image instead. Every ref is removed afterwards."""
    import docker
    client = docker.from_env()
    made: list[str] = []

    def tag(ref: str, unique: bool = False, source: str = "local/busybox:1") -> str:
        repo, t = split_ref(ref)
        if unique:
            # A fresh image (one tiny layer) so that the registry has not seen this digest.
            commit_unique_image(client, repo, t)
        else:
            client.images.get(source).tag(repo, t)
        made.append(ref)
        return ref

    yield tag
    for ref in made:
        try:
            client.images.remove(ref)
        except docker.errors.DockerException:
            pass
    client.close()


@pytest.fixture
def registry_cleanup(lab):
    """track(ref) -> the manifest that ref points at is deleted from the registry afterwards
    (the lab's registry has deletes enabled)."""
    refs: list[str] = []
    yield refs.append
    for ref in refs:
        name, tag = split_ref(ref)
        host, path = split_name(name)
        base = f"http://{host}/v2/{path}/manifests"
        try:
            head = httpx.head(f"{base}/{tag}", headers={"Accept": ", ".join(MANIFEST_TYPES)},
                              trust_env=False)
            digest = head.headers.get("docker-content-digest")
            if head.status_code == 200 and digest:
                httpx.delete(f"{base}/{digest}", trust_env=False)
        except httpx.HTTPError:
            pass


@pytest.mark.lab
def test_push_all_tags_one_digest_and_registry_serves_it(lab, tmp_path, tagged,
                                                         registry_cleanup, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    image = f"{lab['registry']}/test/push-{uuid.uuid4().hex[:8]}"
    first = tagged(f"{image}:one", unique=True)
    refs = [first, tagged(f"{image}:two", source=first)]
    registry_cleanup(first)
    ctx = make_ctx(tmp_path, image, refs)
    out = PushStage().run(ctx)
    assert out["tags"] == refs
    assert out["digest"].startswith("sha256:")
    assert out["ref"] == f"{image}@{out['digest']}"
    assert any(i.startswith("verified:") for i in ctx.log.infos)
    # a registry without auth: read back without credentials, and none were used to push
    assert out["verified"] is True and "when read without credentials" in out["verification"]
    assert out["credentials"] == (f"none (stages.push.auth is not set, and "
                                  f"{tmp_path / 'no-docker-config' / 'config.json'} does not "
                                  "exist)")
    # And independently of the stage: the registry serves that manifest by digest.
    host, path = split_name(image)
    resp = httpx.get(f"http://{host}/v2/{path}/manifests/{out['digest']}",
                     headers={"Accept": ", ".join(MANIFEST_TYPES)}, trust_env=False)
    assert resp.status_code == 200
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == out["digest"]


@pytest.mark.lab
def test_push_to_a_closed_port_fails_after_bounded_retries(lab, tmp_path, tagged):
    ref = tagged(f"127.0.0.1:5999/test/closed-{uuid.uuid4().hex[:8]}:t1")
    ctx = make_ctx(tmp_path, split_ref(ref)[0], [ref], retries=2)
    start = time.monotonic()
    with pytest.raises(StageFailed) as err:
        PushStage(backoff_base=0.2).run(ctx)
    took = time.monotonic() - start
    msg = str(err.value)
    assert err.value.stage == "push"
    assert "connection refused" in msg and "after 3 attempts" in msg
    assert "127.0.0.1:5999" in msg
    assert len(ctx.log.warns) == 2  # one per retry
    assert took < 60


@pytest.mark.lab
def test_cancel_between_tags_reports_what_was_pushed(lab, tmp_path, tagged, registry_cleanup):
    image = f"{lab['registry']}/test/push-cancel-{uuid.uuid4().hex[:8]}"
    refs = [tagged(f"{image}:a"), tagged(f"{image}:b")]
    registry_cleanup(refs[0])
    cancel_after_first = lambda text: ctx.cancel.set() if text.startswith("pushed ") else None
    ctx = make_ctx(tmp_path, image, refs, log=ListLog(on_info=cancel_after_first))
    with pytest.raises(Cancelled) as err:
        PushStage().run(ctx)
    msg = str(err.value)
    assert f"pushed (these stay in the registry): {refs[0]}" in msg
    assert f"not pushed: {refs[1]}" in msg


@pytest.mark.lab
def test_credentials_never_logged(lab, tmp_path, tagged, registry_cleanup):
    # The lab registry needs no auth; credentials are still sent per push and must not leak.
    password = "pw-" + uuid.uuid4().hex
    image = f"{lab['registry']}/test/push-auth-{uuid.uuid4().hex[:8]}"
    refs = [tagged(f"{image}:a")]
    registry_cleanup(refs[0])
    log = ListLog()
    ctx = make_ctx(tmp_path, image, refs, log=log, secret_values={"regpw": password},
                   auth=RegistryAuth(username="ci", password_secret="regpw"))
    PushStage().run(ctx)
    assert password not in "\n".join(log.lines + log.infos + log.warns)


@pytest.fixture
def auth_registry(lab, tmp_path_factory):
    """A second, throw-away registry on loopback that requires a password (htpasswd), started
    and stopped by this fixture (by pid). Yields (host:port, username, password)."""
    import socket
    import subprocess

    import bcrypt

    root = tmp_path_factory.mktemp("authreg")
    password = "pw-" + uuid.uuid4().hex
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    (root / "htpasswd").write_text(f"ci:{hashed}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    (root / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'data'}\n"
        f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
        f"http:\n  addr: {addr}\n")
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://{addr}/v2/", trust_env=False).status_code == 401:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the test registry did not start:\n"
                            + (root / "registry.log").read_text())
            time.sleep(0.1)
        yield addr, "ci", password
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.lab
def test_wrong_password_is_refused_without_retry(lab, tmp_path, tagged, auth_registry):
    addr, user, password = auth_registry
    image = f"{addr}/test/auth"
    ref = tagged(f"{image}:a")
    ctx = make_ctx(tmp_path, image, [ref], secret_values={"regpw": "wrong-" + password},
                   retries=3, auth=RegistryAuth(username=user, password_secret="regpw"))
    with pytest.raises(StageFailed) as err:
        PushStage(backoff_base=0.2).run(ctx)
    msg = str(err.value)
    assert "not retried" in msg and "check stages.push.auth" in msg
    assert ctx.log.warns == []
    assert password not in msg


@pytest.mark.lab
def test_push_with_credentials_and_verify_with_them(lab, tmp_path, tagged, auth_registry):
    addr, user, password = auth_registry
    image = f"{addr}/test/auth"
    ref = tagged(f"{image}:b", unique=True)
    log = ListLog()
    ctx = make_ctx(tmp_path, image, [ref], log=log, secret_values={"regpw": password},
                   auth=RegistryAuth(username=user, password_secret="regpw"))
    out = PushStage().run(ctx)
    assert out["ref"] == f"{image}@{out['digest']}"
    assert any(i.startswith("verified:") for i in log.infos)
    assert password not in "\n".join(log.lines + log.infos + log.warns)
    # Without credentials the registry refuses to serve it: the verification really used them.
    resp = httpx.get(f"http://{addr}/v2/test/auth/manifests/{out['digest']}", trust_env=False)
    assert resp.status_code == 401


@pytest.mark.lab
def test_built_image_pushed_and_served_by_digest(lab, tmp_path, registry_cleanup):
    """The two stages together, as the engine runs them: build from a context, then push."""
    import shutil

    import docker

    from pipelines.build import BuildStage

    src = tmp_path / "src"
    shutil.copytree(Path(__file__).parent / "data" / "build" / "app", src)
    (src / "app.sh").write_text(f"echo {uuid.uuid4().hex}\n")
    image = f"{lab['registry']}/test/build-push"
    ctx = make_ctx(tmp_path, image, [])
    ctx.results["checkout"] = {"commit": "f" * 40, "branch": "main", "tag": None,
                               "path": str(src), "url": "https://example.invalid/t.git"}
    built = BuildStage().run(ctx)
    try:
        ctx.results["build"] = built
        registry_cleanup(built["tags"][0])
        out = PushStage().run(ctx)
        assert out["tags"] == built["tags"]
        host, path = split_name(image)
        resp = httpx.get(f"http://{host}/v2/{path}/manifests/{out['digest']}",
                         headers={"Accept": ", ".join(MANIFEST_TYPES)}, trust_env=False)
        assert resp.status_code == 200
        # The registry's manifest points at the image the build produced.
        config = resp.json()["config"]["digest"]
        assert config == built["image_id"]
    finally:
        client = docker.from_env()
        for ref in built["tags"]:
            try:
                client.images.remove(ref)
            except docker.errors.DockerException:
                pass
        client.close()


@pytest.mark.lab
def test_inline_cache_is_pushed_for_fresh_machines(lab, tmp_path, registry_cleanup):
    """cache_to: [type=inline] puts BuildKit's cache metadata into the pushed image, which a
    machine without local cache reads back through cache_from (the fallback documented in
    pipelines/buildkit.py); a build with that cache_from is accepted by the real CLI."""
    import shutil

    import docker

    from pipelines.build import BuildStage
    from runner.model import BuildSettings

    src = tmp_path / "src"
    shutil.copytree(Path(__file__).parent / "data" / "build" / "app", src)
    (src / "app.sh").write_text(f"echo {uuid.uuid4().hex}\n")
    image = f"{lab['registry']}/test/inline-cache"
    checkout = {"commit": "e" * 40, "branch": "cache", "tag": None, "path": str(src),
                "url": "https://example.invalid/t.git"}
    made: list[str] = []
    try:
        ctx = make_ctx(tmp_path, image, [])
        ctx = StageContext(**{**ctx.__dict__, "pipeline": ctx.pipeline.model_copy(update={
            "stages": Stages(build=BuildSettings(
                cache_to=("type=inline", "type=registry,ref=x/y:cache")))})})
        ctx.results["checkout"] = checkout
        built = BuildStage().run(ctx)
        made += built["tags"] + [built["image_id"]]
        if built["builder"] == "docker-buildkit":
            assert any("type=registry,ref=x/y:cache" in w and "ignored" in w
                       for w in ctx.log.warns)
        ctx.results["build"] = built
        registry_cleanup(built["tags"][0])
        out = PushStage().run(ctx)
        host, path = split_name(image)
        manifest = httpx.get(f"http://{host}/v2/{path}/manifests/{out['digest']}",
                             headers={"Accept": ", ".join(MANIFEST_TYPES)},
                             trust_env=False).json()
        config = httpx.get(f"http://{host}/v2/{path}/blobs/{manifest['config']['digest']}",
                           trust_env=False).json()
        assert "moby.buildkit.cache.v0" in config

        ctx2 = make_ctx(tmp_path, image, [])
        ctx2 = StageContext(**{**ctx2.__dict__, "pipeline": ctx2.pipeline.model_copy(update={
            "stages": Stages(build=BuildSettings(cache_from=(built["tags"][0],)))})})
        ctx2.results["checkout"] = checkout
        again = BuildStage().run(ctx2)
        made[:0] = again["tags"]
        assert again["cached_steps"] >= 3
    finally:
        client = docker.from_env()
        for ref in made:
            try:
                client.images.remove(ref)
            except docker.errors.DockerException:
                pass
        client.close()


@pytest.mark.lab
def test_a_tag_moved_by_another_build_is_not_pushed(lab, tmp_path, tagged):
    image = f"{lab['registry']}/test/push-moved-{uuid.uuid4().hex[:8]}"
    ref = tagged(f"{image}:main")
    ctx = make_ctx(tmp_path, image, [ref])
    ctx.results["build"]["image_id"] = "sha256:" + "0" * 64  # what "this run" built
    with pytest.raises(StageFailed, match="no longer points at the image this run built"):
        PushStage().run(ctx)
    host, path = split_name(image)
    assert httpx.get(f"http://{host}/v2/{path}/tags/list", trust_env=False).status_code == 404
