"""The push stage, pure parts: reading the push stream, error classes, registry addressing,
challenges and where credentials come from. Pushes to the lab's registries:
tests/lab/test_push.py."""

from __future__ import annotations


import os

import threading



from pathlib import Path


import pytest

from runner.stage import StageContext

from pipelines.push import (
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
)

from runner.errors import StageFailed

from runner.model import Image, Pipeline, RegistryAuth, Repository, Stages

from runner.model import PushSettings

from runner.secrets import Masker, SecretStore

from tests.doubles import DictSecrets, ListLog, build_outputs




DIGEST = "sha256:" + "ab" * 32



def make_ctx(tmp_path: Path, image: str, tags: list[str], log: ListLog | None = None,
             secret_values: dict[str, str] | None = None, **push: object) -> StageContext:
    pipeline = Pipeline(name="t", repository=Repository(url="https://example.invalid/t.git"),
                        image=Image(name=image), stages=Stages(push=PushSettings(**push)))
    ctx = StageContext(run_id="r1", pipeline=pipeline, workdir=tmp_path, cache_dir=tmp_path,
                       log=log or ListLog(), secrets=DictSecrets(secret_values or {}),
                       cancel=threading.Event())
    ctx.outputs.build = build_outputs(tags)
    return ctx



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

