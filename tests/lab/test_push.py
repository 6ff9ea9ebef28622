"""The push stage against the lab's engine and registry (the `lab` fixture sets DOCKER_HOST):
every tag one digest, bounded retries, cancel between tags, credentials. Tags a test creates
are removed from the engine at the end. The pure parts: tests/unit/test_push.py."""

from __future__ import annotations

import dataclasses
import hashlib



import time

import uuid

from pathlib import Path

import httpx

import pytest

from runner.stage import StageContext

from pipelines.push import (
    MANIFEST_TYPES,
    PushStage,
)

from runner.errors import Cancelled, StageFailed

from runner.model import RegistryAuth, Stages
from runner.model.image import ImageName



from tests.doubles import ListLog, checkout_outputs

from tests.helpers import commit_unique_image

from tests.unit.test_push import make_ctx


@pytest.fixture
def tagged(lab):
    """tag(ref) tags `source` (the lab's busybox base by default) as `ref`; with unique=True it
    commits a fresh one-layer image instead. Every ref is removed afterwards."""
    import docker
    client = docker.from_env()
    made: list[str] = []

    def tag(ref: str, unique: bool = False, source: str = "local/busybox:1") -> str:
        parsed = ImageName.parse(ref)
        repo, t = parsed.name, parsed.tag
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
        parsed = ImageName.parse(ref)
        host, path, tag = parsed.api_host, parsed.repository, parsed.tag
        base = f"http://{host}/v2/{path}/manifests"
        try:
            head = httpx.head(f"{base}/{tag}", headers={"Accept": ", ".join(MANIFEST_TYPES)},
                              trust_env=False)
            digest = head.headers.get("docker-content-digest")
            if head.status_code == 200 and digest:
                httpx.delete(f"{base}/{digest}", trust_env=False)
        except httpx.HTTPError:
            pass



def test_push_all_tags_one_digest_and_registry_serves_it(lab, tmp_path, tagged,
                                                         registry_cleanup, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    image = f"{lab['registry']}/test/push-{uuid.uuid4().hex[:8]}"
    first = tagged(f"{image}:one", unique=True)
    refs = [first, tagged(f"{image}:two", source=first)]
    registry_cleanup(first)
    ctx = make_ctx(tmp_path, image, refs)
    out = PushStage().run(ctx).to_dict()
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
    host, path = ImageName.parse(image).api_host, ImageName.parse(image).repository
    resp = httpx.get(f"http://{host}/v2/{path}/manifests/{out['digest']}",
                     headers={"Accept": ", ".join(MANIFEST_TYPES)}, trust_env=False)
    assert resp.status_code == 200
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == out["digest"]



def test_push_to_a_closed_port_fails_after_bounded_retries(lab, tmp_path, tagged):
    ref = tagged(f"127.0.0.1:5999/test/closed-{uuid.uuid4().hex[:8]}:t1")
    ctx = make_ctx(tmp_path, ImageName.parse(ref).name, [ref], retries=2)
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



def test_push_with_credentials_and_verify_with_them(lab, tmp_path, tagged, auth_registry):
    addr, user, password = auth_registry
    image = f"{addr}/test/auth"
    ref = tagged(f"{image}:b", unique=True)
    log = ListLog()
    ctx = make_ctx(tmp_path, image, [ref], log=log, secret_values={"regpw": password},
                   auth=RegistryAuth(username=user, password_secret="regpw"))
    out = PushStage().run(ctx).to_dict()
    assert out["ref"] == f"{image}@{out['digest']}"
    assert any(i.startswith("verified:") for i in log.infos)
    assert password not in "\n".join(log.lines + log.infos + log.warns)
    # Without credentials the registry refuses to serve it: the verification really used them.
    resp = httpx.get(f"http://{addr}/v2/test/auth/manifests/{out['digest']}", trust_env=False)
    assert resp.status_code == 401



def test_built_image_pushed_and_served_by_digest(lab, tmp_path, registry_cleanup):
    """The two stages together, as the engine runs them: build from a context, then push."""
    import shutil

    import docker

    from pipelines.build import BuildStage

    src = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "build" / "app", src)
    (src / "app.sh").write_text(f"echo {uuid.uuid4().hex}\n")
    image = f"{lab['registry']}/test/build-push"
    ctx = make_ctx(tmp_path, image, [])
    ctx.outputs.checkout = checkout_outputs(src, "f" * 40, committed_at="")
    ctx.outputs.build = BuildStage().run(ctx)
    built = ctx.outputs.build.to_dict()
    try:
        registry_cleanup(built["tags"][0])
        out = PushStage().run(ctx).to_dict()
        assert out["tags"] == built["tags"]
        host, path = ImageName.parse(image).api_host, ImageName.parse(image).repository
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



def test_inline_cache_is_pushed_for_fresh_machines(lab, tmp_path, registry_cleanup):
    """cache_to: [type=inline] puts BuildKit's cache metadata into the pushed image, which a
    machine without local cache reads back through cache_from (the fallback documented in
    pipelines/buildkit.py); a build with that cache_from is accepted by the real CLI."""
    import shutil

    import docker

    from pipelines.build import BuildStage
    from runner.model import BuildSettings

    src = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "build" / "app", src)
    (src / "app.sh").write_text(f"echo {uuid.uuid4().hex}\n")
    image = f"{lab['registry']}/test/inline-cache"
    checkout = checkout_outputs(src, "e" * 40, branch="cache", committed_at="")
    made: list[str] = []
    try:
        ctx = make_ctx(tmp_path, image, [])
        ctx = StageContext(**{**ctx.__dict__, "pipeline": ctx.pipeline.model_copy(update={
            "stages": Stages(build=BuildSettings(
                cache_to=("type=inline", "type=registry,ref=x/y:cache")))})})
        ctx.outputs.checkout = checkout
        ctx.outputs.build = BuildStage().run(ctx)
        built = ctx.outputs.build.to_dict()
        made += built["tags"] + [built["image_id"]]
        if built["builder"] == "docker-buildkit":
            assert any("type=registry,ref=x/y:cache" in w and "ignored" in w
                       for w in ctx.log.warns)
        registry_cleanup(built["tags"][0])
        out = PushStage().run(ctx).to_dict()
        host, path = ImageName.parse(image).api_host, ImageName.parse(image).repository
        manifest = httpx.get(f"http://{host}/v2/{path}/manifests/{out['digest']}",
                             headers={"Accept": ", ".join(MANIFEST_TYPES)},
                             trust_env=False).json()
        config = httpx.get(f"http://{host}/v2/{path}/blobs/{manifest['config']['digest']}",
                           trust_env=False).json()
        assert "moby.buildkit.cache.v0" in config

        ctx2 = make_ctx(tmp_path, image, [])
        ctx2 = StageContext(**{**ctx2.__dict__, "pipeline": ctx2.pipeline.model_copy(update={
            "stages": Stages(build=BuildSettings(cache_from=(built["tags"][0],)))})})
        ctx2.outputs.checkout = checkout
        again = BuildStage().run(ctx2).to_dict()
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



def test_a_tag_moved_by_another_build_is_not_pushed(lab, tmp_path, tagged):
    image = f"{lab['registry']}/test/push-moved-{uuid.uuid4().hex[:8]}"
    ref = tagged(f"{image}:main")
    ctx = make_ctx(tmp_path, image, [ref])
    # What "this run" built.
    ctx.outputs.build = dataclasses.replace(ctx.outputs.build, image_id="sha256:" + "0" * 64)
    with pytest.raises(StageFailed, match="no longer points at the image this run built"):
        PushStage().run(ctx)
    host, path = ImageName.parse(image).api_host, ImageName.parse(image).repository
    assert httpx.get(f"http://{host}/v2/{path}/tags/list", trust_env=False).status_code == 404



def test_image_name_accepts_what_docker_tag_accepts(lab):
    """ImageName's grammar against the engine's own: `docker tag` (CLI and engine) takes or
    refuses each name as ImageName.parse does, `Team/app` included (not a registry host: the
    engine refuses it as not lowercase)."""
    import subprocess

    nonce = uuid.uuid4().hex[:8]
    names = [f"imgname-{nonce}", f"docker.io/library/imgname-{nonce}:v1",
             f"imgname-{nonce}/app", f"localhost:5000/imgname-{nonce}/b:tag",
             f"Imgname-{nonce}/app", f"imgname-{nonce}/App", f"host_x:5000/imgname-{nonce}",
             f"imgname-{nonce}:.bad", f"imgname-{nonce}/-b"]
    disagree = []
    for name in names:
        try:
            ImageName.parse(name)
            ours = True
        except ValueError:
            ours = False
        r = subprocess.run(["docker", "tag", "local/busybox:1", name], capture_output=True,
                           text=True)
        if r.returncode == 0:
            subprocess.run(["docker", "rmi", name], capture_output=True, check=True)
        if ours != (r.returncode == 0):
            disagree.append((name, ours, r.stderr.strip()))
    assert not disagree
