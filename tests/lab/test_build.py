"""The build stage on the lab's engine (the `lab` fixture sets DOCKER_HOST): cache mounts and
cached steps, failing RUNs, build secrets, cancellation and the timeout. Every image a test
creates is removed at the end. The pure parts: tests/unit/test_build.py."""

from __future__ import annotations

import shutil

import subprocess

import threading

import time

import uuid

from pathlib import Path

import pytest

from runner.stage import StageContext

from pipelines.build import BuildStage

from pipelines.buildkit import detect_builder

from runner.errors import Cancelled, StageFailed

from runner.model import BuildSecret



from tests.unit.test_build import DATA, SHA, make_ctx


@pytest.fixture
def images(lab):
    """Refs and ids the test created; removed afterwards."""
    import docker
    created: list[str] = []
    yield created
    client = docker.from_env()
    for ref in reversed(created):
        try:
            client.images.remove(ref, force=True)
        except docker.errors.DockerException:
            pass
    client.close()



def _src(tmp_path: Path, name: str) -> Path:
    src = tmp_path / "src"
    shutil.copytree(DATA / name, src)
    return src



def test_build_with_cache_mount_then_code_only_change_is_cached(lab, tmp_path, images):
    src = _src(tmp_path, "app")
    # A unique dependency list, so that the first build really runs the dependency step.
    (src / "deps.txt").write_text(f"dep-a==1\nnonce=={uuid.uuid4().hex}\n")
    image = f"{lab['registry']}/test/build-app"
    ctx = make_ctx(tmp_path, src, image)
    first = BuildStage().run(ctx).to_dict()
    images.extend(first["tags"])
    assert first["builder"] in ("buildx", "docker-buildkit")
    assert first["image_id"].startswith("sha256:")
    # The id is the one the build wrote, not a later lookup of a tag another build could move.
    assert (tmp_path / "build" / "image-id").read_text().strip() == first["image_id"]
    assert first["tags"] == [f"{image}:{SHA[:7]}", f"{image}:main", f"{image}:{ctx.run_id}"]
    assert first["total_steps"] == 5
    assert any(i.startswith("builder: ") for i in ctx.log.infos)
    assert any("RUN --mount=type=cache" in line for line in ctx.log.lines)

    (src / "app.sh").write_text("echo changed code\n")
    ctx2 = make_ctx(tmp_path, src, image)
    second = BuildStage().run(ctx2).to_dict()
    images.extend(second["tags"])
    assert second["image_id"] != first["image_id"]
    assert second["total_steps"] == 5
    # The dependency COPY and the RUN with the cache mount ran the first time and come from
    # the cache now (BuildKit reports FROM as CACHED or not from one build to the next, so the
    # counts are compared loosely and the steps exactly). The per-step summary says which.
    assert second["cached_steps"] >= 3 and second["cached_steps"] > first["cached_steps"]
    assert any(line.endswith("CACHED") for line in ctx2.log.lines)

    def summary(c: StageContext) -> dict[str, str]:
        out = {}
        for i in c.log.infos:
            if i.startswith(("CACHED ", "ran ")):
                status, name = i.split(None, 1)
                out[name.split("] ", 1)[1]] = status
        return out

    before, after = summary(ctx), summary(ctx2)
    assert len(after) == 5
    dep_steps = [n for n in after if n.startswith(("COPY deps.txt", "RUN --mount=type=cache"))]
    assert len(dep_steps) == 2
    assert all(before[n] == "ran" and after[n] == "CACHED" for n in dep_steps)
    assert after["COPY app.sh ./"] == "ran"



def test_failing_run_names_the_step_and_exit_code(lab, tmp_path, images):
    src = _src(tmp_path, "failing")
    ctx = make_ctx(tmp_path, src, f"{lab['registry']}/test/build-failing")
    with pytest.raises(StageFailed) as err:
        BuildStage().run(ctx)
    msg = str(err.value)
    assert err.value.stage == "build"
    assert "RUN echo about to fail && exit 3" in msg
    assert "exit code: 3" in msg
    assert "about to fail" in msg  # the step's own last output



def test_build_secret_is_used_and_appears_nowhere(lab, tmp_path, images):
    value = "s3cr3t-" + uuid.uuid4().hex
    src = _src(tmp_path, "secret")
    ctx = make_ctx(tmp_path, src, f"{lab['registry']}/test/build-secret",
                   secret_values={"token": value}, args={"NONCE": uuid.uuid4().hex},
                   secrets=(BuildSecret(id="tok", secret="token"),))
    out = BuildStage().run(ctx).to_dict()
    images.extend(out["tags"])
    assert value not in ctx.log.everything()
    cli = detect_builder().docker_cli
    for argv in ([cli, "history", "--no-trunc", out["image_id"]],
                 [cli, "inspect", out["image_id"]]):
        proc = subprocess.run(argv, capture_output=True, text=True, check=True)
        assert value not in proc.stdout + proc.stderr



def test_missing_build_secret_fails_the_run_step(lab, tmp_path, images):
    # The Dockerfile checks the secret is non-empty: an empty value must fail, proving the
    # mount is really fed from the stage's secret.
    src = _src(tmp_path, "secret")
    ctx = make_ctx(tmp_path, src, f"{lab['registry']}/test/build-secret",
                   secret_values={"token": ""}, args={"NONCE": uuid.uuid4().hex},
                   secrets=(BuildSecret(id="tok", secret="token"),))
    with pytest.raises(StageFailed, match="test -s /run/secrets/tok"):
        BuildStage().run(ctx)



def test_cancel_stops_the_build(lab, tmp_path, images):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Dockerfile").write_text(
        f"FROM local/busybox:1\nRUN echo {uuid.uuid4().hex} && sleep 60\n")
    ctx = make_ctx(tmp_path, src, f"{lab['registry']}/test/build-cancel")
    threading.Timer(3.0, ctx.cancel.set).start()
    start = time.monotonic()
    with pytest.raises(Cancelled):
        BuildStage().run(ctx)
    assert time.monotonic() - start < 20



def test_timeout_stops_the_build(lab, tmp_path, images):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Dockerfile").write_text(
        f"FROM local/busybox:1\nRUN echo {uuid.uuid4().hex} && sleep 60\n")
    ctx = make_ctx(tmp_path, src, f"{lab['registry']}/test/build-timeout", timeout=2)
    start = time.monotonic()
    with pytest.raises(StageFailed, match="timed out after 2s"):
        BuildStage().run(ctx)
    assert time.monotonic() - start < 20

