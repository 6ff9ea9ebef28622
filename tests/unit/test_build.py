"""The build stage, pure parts: paths kept inside the checkout, a missing Dockerfile, failure
messages, the plan. Real builds: tests/lab/test_build.py."""

from __future__ import annotations

import shutil


import threading


import uuid

from pathlib import Path

import pytest

from runner.stage import StageContext

from pipelines.build import BuildStage, failure_message, resolve_inside

from pipelines.buildkit import parse_progress

from runner.errors import StageFailed

from runner.model import BuildSecret, Image, Pipeline, Repository, Stages

from runner.model import BuildSettings

from tests.doubles import DictSecrets, ListLog, checkout_outputs



DATA = Path(__file__).resolve().parents[1] / "data" / "build"



SHA = "0123456789abcdef0123456789abcdef01234567"



def make_ctx(tmp_path: Path, src: Path, image: str, secret_values: dict[str, str] | None = None,
             **build: object) -> StageContext:
    pipeline = Pipeline(
        name="t", repository=Repository(url="https://example.invalid/t.git"),
        image=Image(name=image, tags=("{short_sha}", "{branch}", "{run_id}")),
        stages=Stages(build=BuildSettings(**build)))
    ctx = StageContext(
        run_id="r" + uuid.uuid4().hex[:8], pipeline=pipeline, workdir=tmp_path,
        cache_dir=tmp_path / "cache", log=ListLog(), secrets=DictSecrets(secret_values or {}),
        cancel=threading.Event())
    # No commit time: the build dates the image now.
    ctx.outputs.checkout = checkout_outputs(src, SHA, committed_at="")
    return ctx



def test_resolve_inside(tmp_path):
    (tmp_path / "a").mkdir()
    assert resolve_inside(tmp_path, "a", "ctx") == (tmp_path / "a").resolve()
    assert resolve_inside(tmp_path, ".", "ctx") == tmp_path.resolve()
    assert resolve_inside(tmp_path, "a/../a", "ctx") == (tmp_path / "a").resolve()
    for bad in ("..", "../x", "a/../../x", "/etc"):
        with pytest.raises(ValueError):
            resolve_inside(tmp_path, bad, "ctx")
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(ValueError, match="leaves the checked-out repository"):
        resolve_inside(tmp_path, "link", "ctx")



@pytest.mark.parametrize("field,value", [("context", "../outside"),
                                         ("dockerfile", "../../etc/passwd"),
                                         ("context", "/etc")])
def test_paths_escaping_the_checkout_fail_the_stage(tmp_path, field, value):
    src = tmp_path / "src"
    shutil.copytree(DATA / "app", src)
    ctx = make_ctx(tmp_path, src, "127.0.0.1:5000/test/x", **{field: value})
    with pytest.raises(StageFailed) as err:
        BuildStage().run(ctx)
    assert err.value.stage == "build"
    assert value in str(err.value)



def test_missing_dockerfile_fails_clearly(tmp_path):
    ctx = make_ctx(tmp_path, tmp_path, "127.0.0.1:5000/test/x")
    with pytest.raises(StageFailed, match="no Dockerfile"):
        BuildStage().run(ctx)



def test_failure_message_falls_back_to_output_tail():
    out = "ERROR: something odd\nmore"
    msg = failure_message(parse_progress([]), out, 1)
    assert "exited with code 1" in msg and "something odd" in msg



def test_plan_is_plain_data(tmp_path):
    ctx = make_ctx(tmp_path, tmp_path, "127.0.0.1:5000/test/x", args={"A": "1"},
                   secrets=(BuildSecret(id="tok", secret="token"),))
    plan = BuildStage().plan(ctx.pipeline)
    assert plan["image"] == "127.0.0.1:5000/test/x"
    assert plan["args"] == {"A": "1"} and plan["secrets"] == ["tok"]

