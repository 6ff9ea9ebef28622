"""The release command and the pre_deploy hook against two lab servers, for real: the session's
busybox httpd images (tests.lab.deploy_fixtures), a release command that appends a line to a
file in the app's named volume (so a count of lines on both servers is how often it ran)."""
from __future__ import annotations

import threading
import time

import pytest

from deployers.base import DeployFailed
from deployers.release_command import LABEL_RELEASE
from pipelines.deploy import DeployStage
from runner.errors import StageFailed
from runner.model import Pipeline
from runner.model.deploy import Hooks
from runner.outputs import Outputs
from runner.stage import StageContext
from tests.doubles import checkout_outputs, push_outputs
from tests.lab.deploy_fixtures import UID, Log, NoSecrets, _deployer, _get, _port, _servers, \
    _stage

# Appends to the volume, then says how many lines there are now, with the app's env and secret.
COUNT = ["sh", "-c", 'echo run >> /data/count && echo "migrated $(wc -l < /data/count) '
                     '$MODE token-length=${#TOKEN}"']


@pytest.fixture
def two(lab, app):
    """An app on two servers with a volume `<app>-data`; the volume goes at the end."""
    name, _ = app
    servers = _servers(lab, 2)
    volume = f"{name}-data"
    yield name, servers, volume
    d = _deployer(_stage(lab, servers, name, 1), {"repo": "x", "v1": f"x@sha256:{'0' * 64}"},
                  "v1", name)
    d.each(lambda t: d.connection(t).run(["docker", "volume", "rm", "--force", volume]),
                list(d.targets))
    d.close()


def _on_servers(d, argv) -> list[str]:
    return [d.connection(t).run(argv).stdout for t in d.targets]


def _state(d, name) -> list[str]:
    """Per server: the app's container id and the newest verified digest of its history."""
    return [f"{d.connection(t).run(['docker', 'inspect', '--format', '{{.Id}}', name]).stdout.strip()}"
            f" {(d.history(d.connection(t)) or [{'digest': ''}])[-1]['digest']}" for t in d.targets]


def test_release_command_runs_once_per_deploy_and_a_failing_one_switches_nothing(lab, images,
                                                                                   two):
    name, servers, volume = two
    port = _port()
    hosts = [s["host"] for s in servers]
    stage = _stage(lab, servers, name, port, release_command=COUNT,
                   container={"volumes": [f"{volume}:/data"], "env": {"MODE": "prod"},
                              "secret_env": {"TOKEN": "tok"}})
    secret = {"tok": "s3cret"}.__getitem__
    d = _deployer(stage, images, "v1", name, Log(), secret=secret)
    # A release container a SIGKILLed runner left behind: the deploy removes it first.
    d.connection(d.targets[0]).run(["docker", "create", "--label", f"{LABEL_RELEASE}={name}",
                               "--name", f"{name}_release_dead", images["v1"], "true"],
                              check=True)
    log = Log()
    d._log = log
    assert d.apply(d.plan()).ok
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]
    counts = _on_servers(d, ["docker", "run", "--rm", "-v", f"{volume}:/data", images["v1"],
                             "sh", "-c", "cat /data/count 2>/dev/null | wc -l"])
    assert [int(c) for c in counts] == [1, 0], log.text  # once, on the first server
    assert f"{servers[0]['host']}" in log.text and "release: migrated 1 prod token-length=6" \
        in log.text
    assert "removing a release container a dead run left" in log.text
    left = _on_servers(d, ["docker", "container", "ls", "--all", "--quiet", "--filter",
                           f"label={LABEL_RELEASE}={name}"])
    assert left == ["", ""]
    before = _state(d, name)
    d.close()

    # v2 whose release command prints, then exits 1: the deploy fails naming the server, the
    # command and the exit code; v1 still serves on both (the very same containers), the
    # histories are unchanged, the output is in the log, the one-off container is gone.
    failing = stage.model_copy(update={"release_command": ("sh", "-c", "echo boom; exit 1")})
    log = Log()
    d = _deployer(failing, images, "v2", name, log, secret=secret)
    with pytest.raises(DeployFailed) as err:
        d.apply(d.plan())
    first = err.value.report.servers[0]
    assert first.server == d.targets[0].label and first.status == "failed"
    assert "the release command `sh -c echo boom; exit 1` exited with 1" in first.reason
    assert "nothing was changed on any server" in err.value.report.headline
    assert f"{d.targets[0].label}: release: boom" in log.text
    assert [_get(h, port) for h in hosts] == ["v1", "v1"]
    assert _state(d, name) == before
    assert _on_servers(d, ["docker", "container", "ls", "--all", "--quiet", "--filter",
                           f"label={LABEL_RELEASE}={name}"]) == ["", ""]
    d.close()

    # One that outlives release_timeout is killed (its container removed) and fails the same.
    slow = stage.model_copy(update={"release_command": ("sleep", "60"), "release_timeout": 1})
    d = _deployer(slow, images, "v2", name, Log(), secret=secret)
    t0 = time.monotonic()
    with pytest.raises(DeployFailed) as err:
        d.apply(d.plan())
    assert time.monotonic() - t0 < 30  # not the 60 s of the command
    assert "did not finish within 1s" in err.value.report.servers[0].reason
    assert [_get(h, port) for h in hosts] == ["v1", "v1"] and _state(d, name) == before
    assert _on_servers(d, ["docker", "container", "ls", "--all", "--quiet", "--filter",
                           f"label={LABEL_RELEASE}={name}"]) == ["", ""]
    d.close()


def test_a_failing_pre_deploy_hook_changes_nothing_on_the_servers(lab, images, two, tmp_path):
    name, servers, volume = two
    port = _port()
    hosts = [s["host"] for s in servers]
    stage = _stage(lab, servers, name, port)
    d = _deployer(stage, images, "v1", name, Log())
    assert d.apply(d.plan()).ok
    before = _state(d, name)
    d.close()

    hooked = stage.model_copy(update={"release_command": tuple(COUNT), "hooks": Hooks(
        pre_deploy=("sh", "-c", 'echo "pre $RUNNER_SERVERS $RUNNER_DIGEST"; exit 4'))})
    pipeline = Pipeline.model_validate({
        "name": name, "repository": {"url": "."}, "image": {"name": images["repo"]},
        "stages": {"deploy": hooked.model_dump(by_alias=True)}})
    log = Log()
    ctx = StageContext(run_id=f"r{UID}pre", pipeline=pipeline, workdir=tmp_path,
                       cache_dir=tmp_path, log=log, secrets=NoSecrets(), cancel=threading.Event(),
                       outputs=Outputs(push=push_outputs(images["v2"]),
                                       checkout=checkout_outputs(tmp_path, commit="2" * 40)))
    with pytest.raises(StageFailed) as err:
        DeployStage().run(ctx)
    assert "pre_deploy hook `sh -c" in str(err.value) and "exited with 4" in str(err.value)
    assert f"pre_deploy: pre {','.join(hosts)} {images['v2'].split('@')[1]}" in log.text
    assert "deploy lock taken" not in log.text and "release" not in log.text.replace(
        "pre_deploy", "")
    d = _deployer(stage, images, "v1", name, Log())
    assert [_get(h, port) for h in hosts] == ["v1", "v1"] and _state(d, name) == before
    d.close()

    # A post_deploy hook that fails: the run fails as a failed hook, saying the release stays,
    # and it does (v2 on both); the hook saw the release in its environment.
    after = stage.model_copy(update={"hooks": Hooks(
        post_deploy=("sh", "-c", 'echo "post $RUNNER_PIPELINE $RUNNER_COMMIT"; exit 5'))})
    pipeline = pipeline.model_copy(update={"stages": pipeline.stages.model_copy(
        update={"deploy": after})})
    ctx.pipeline, ctx.run_id, log.lines[:] = pipeline, f"r{UID}post", []
    with pytest.raises(StageFailed) as err:
        DeployStage().run(ctx)
    assert "post_deploy hook `sh -c" in str(err.value) and "exited with 5" in str(err.value)
    assert "the deploy itself succeeded" in str(err.value) and "stays on" in str(err.value)
    assert [s.status for s in err.value.outputs.servers] == ["deployed", "deployed"]
    assert f"post_deploy: post {name} {'2' * 40}" in log.text
    assert [_get(h, port) for h in hosts] == ["v2", "v2"]
