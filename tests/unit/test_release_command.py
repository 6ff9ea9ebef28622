"""The release command and the deploy hooks, their pure parts: the settings (argv lists only,
problems at file:line:col), the one-off container's argv, where the plan puts it (once, on the
first server of the first batch, never in a rollback), the rollout running it before any switch
(through fake steps), and the hooks' environment and process."""
from __future__ import annotations

import sys
import textwrap
import threading

import pytest

from deployers import commands as cmd
from deployers.base import DeployFailed, StepFailed
from deployers.hooks import HookFailed, PlannedHook, hook_env, run_hook
from deployers.plan import plan_deploy, plan_rollback
from deployers.release_command import LABEL_RELEASE, command_of
from deployers.rollout import rollout
from deployers.spec import release_for
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef
from tests.unit.test_rollout import FakeSteps

D1 = "sha256:" + "a" * 64
IMG = ImageRef.parse(f"reg/demo@{D1}")
MIGRATE = ["python", "manage.py", "migrate"]


def stage(**kw) -> DeploySettings:
    base = {"enabled": True, "servers": ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            "release_command": MIGRATE}
    base.update(kw)
    return DeploySettings.model_validate(base)


# ------------------------------------------------------------------------- settings

def test_release_command_and_hooks_are_argv_lists_with_problems_at_their_place():
    with pytest.raises(InvalidInput) as info:
        load_pipeline_text(textwrap.dedent("""\
            name: demo
            repository: {url: x}
            image: {name: reg/demo}
            stages:
              deploy:
                servers: [10.0.0.1]
                release_command: python manage.py migrate
                hooks:
                  pre_deploy: ./notify start
            """), "/work/p/pipeline.yml", environ={})
    text = str(info.value)
    assert "/work/p/pipeline.yml:7:22: error: stages.deploy.release_command:" in text
    assert "/work/p/pipeline.yml:9:19: error: stages.deploy.hooks.pre_deploy:" in text
    assert "not one string: no shell runs it" in text
    s = stage(hooks={"pre_deploy": ["./notify", "start"]})
    assert s.release_command == tuple(MIGRATE) and s.release_timeout == 600
    assert s.hooks.pre_deploy == ("./notify", "start") and s.hooks.timeout == 300


# ------------------------------------------------------------------------------- plan

def test_the_plan_runs_the_release_command_once_on_the_first_server_of_the_first_batch():
    s = stage(strategy={"type": "canary"},
              container={"env": {"MODE": "prod"}, "secret_env": {"TOKEN": "tok"},
                         "volumes": ["data:/data"], "network": "backend", "memory": "256m",
                         "entrypoint": "/serve", "command": ["--port", "80"]})
    plan = plan_deploy(s, pipeline="demo", image_name="reg/demo", run_id="r 1", image=IMG)
    assert plan.release_on == "10.0.0.1" == plan.batches[0][0]
    first, *others = plan.servers
    assert not any(o.has("release") for o in others)
    run = first.argv("release", {cmd.ENV_FILE: "/r/env/demo--x.env"})
    # In the foreground, the app's env file, volumes, network and limits, the image by digest
    # and the image's own ENTRYPOINT (neither container.entrypoint nor container.command).
    assert run == ["docker", "run", "--rm", "--name", "demo_release_r-1",
                   "--label", f"{LABEL_RELEASE}=demo", "--volume", "data:/data",
                   "--env-file", "/r/env/demo--x.env", "--memory", "256m",
                   "--network", "backend", str(IMG), *MIGRATE]
    assert "tok" not in run
    assert first.argv("release_remove") == ["docker", "container", "rm", "--force",
                                            "demo_release_r-1"]
    assert first.argv("release_leftovers")[-2:] == ["--filter", f"label={LABEL_RELEASE}=demo"]
    assert command_of(first) == "python manage.py migrate"
    # --dry-run prints it: the same words, phase "release", on that server alone.
    data = plan.to_dict()
    assert data["release_command_on"] == "10.0.0.1"
    printed = [c for c in data["servers"][0]["commands"] if c["phase"] == "release"]
    assert [c["argv"][-3:] for c in printed][2] == MIGRATE and "<env file>" in printed[2]["argv"]
    assert not any(c["phase"] == "release" for c in data["servers"][1]["commands"])
    phases = [c["phase"] for c in data["servers"][0]["commands"]]
    assert "prepare" not in phases[phases.index("release"):]  # printed where it runs:
    assert phases.index("release") < phases.index("switch")  # after the pull, before the switch


def test_no_release_command_without_the_setting_and_none_in_a_rollback():
    plan = plan_deploy(stage(release_command=None), pipeline="demo", image_name="reg/demo",
                       run_id="r1", image=IMG)
    assert plan.release_on == "" and "release_command_on" not in plan.to_dict()
    assert not any(sp.has("release") for sp in plan.servers)
    s = stage()
    r = release_for(s, IMG, pipeline="demo", run_id="r0")
    back = plan_rollback(s, pipeline="demo", run_id="r2", releases={"10.0.0.1": r})
    assert back.release_on == "" and not back.servers[0].has("release") and not back.hooks


def test_hooks_are_in_the_plan_of_a_deploy():
    s = stage(hooks={"pre_deploy": ["./a"], "post_deploy": ["./b", "x"], "timeout": 5})
    plan = plan_deploy(s, pipeline="demo", image_name="reg/demo", run_id="r1", image=IMG)
    assert plan.hooks == (PlannedHook("pre_deploy", ("./a",), 5),
                          PlannedHook("post_deploy", ("./b", "x"), 5))
    printed = plan.to_dict()["hooks"]
    assert printed["post_deploy"]["argv"] == ["./b", "x"] and "RUNNER_DIGEST" in \
        printed["pre_deploy"]["env"]


# ---------------------------------------------------------------------------- rollout

class ReleasingSteps(FakeSteps):
    def __init__(self, release_fails: bool = False, **kw):
        super().__init__(**kw)
        self.release_fails = release_fails

    def release(self, sw):
        self._ev("release", sw.server)
        if self.release_fails:
            raise StepFailed(sw.server, "the release command `python manage.py migrate` "
                                        "exited with 1", touched=False)


def _plan(strategy):
    s = stage(strategy=strategy)
    return plan_deploy(s, pipeline="demo", image_name="reg/demo", run_id="r1", image=IMG)


def test_the_rollout_runs_the_release_command_once_after_the_pull_before_any_switch():
    steps = ReleasingSteps()
    assert rollout(_plan({"type": "rolling", "batch_size": 2}), steps).ok
    kinds = [k for k, _ in steps.events]
    assert steps.of("release") == ["10.0.0.1"]
    assert kinds.index("release") > kinds.index("prepare") and \
        kinds.index("release") < kinds.index("switch")
    assert kinds[:3] == ["prepare", "prepare", "release"]


def test_a_failing_release_command_stops_the_deploy_with_nothing_switched():
    steps = ReleasingSteps(release_fails=True)
    with pytest.raises(DeployFailed) as err:
        rollout(_plan({"type": "all"}), steps)
    assert steps.of("switch") == [] and steps.of("restore") == []
    report = err.value.report
    one = report.servers[0]
    assert one.status == "failed" and "exited with 1" in one.reason
    assert "nothing was changed on this server" in one.reason
    assert [s.status for s in report.servers[1:]] == ["skipped", "skipped"]
    assert "nothing was changed on any server" in report.headline
    assert steps.finished == 1


# ------------------------------------------------------------------------------ hooks

def test_hook_env_describes_the_release_and_passes_on_nothing_else():
    env = hook_env(digest=D1, image=str(IMG), hosts=("10.0.0.1", "web-2"), pipeline="demo",
                   commit="c" * 40, run_id="r1",
                   base={"PATH": "/bin", "HOME": "/root", "RUNNER_DATABASE_URL": "postgres://s"})
    assert env == {"PATH": "/bin", "HOME": "/root", "RUNNER_DIGEST": D1,
                   "RUNNER_IMAGE": str(IMG), "RUNNER_SERVERS": "10.0.0.1,web-2",
                   "RUNNER_PIPELINE": "demo", "RUNNER_COMMIT": "c" * 40, "RUNNER_RUN_ID": "r1"}
    assert "RUNNER_COMMIT" not in hook_env(digest=D1, image="", hosts=(), pipeline="p",
                                           commit="", run_id="r", base={})


def test_run_hook_logs_its_output_and_says_how_it_failed(tmp_path):
    lines: list[str] = []
    ok = PlannedHook("pre_deploy", (sys.executable, "-c",
                                    "import os; print(os.environ['RUNNER_DIGEST'])"), 30)
    run_hook(ok, {"RUNNER_DIGEST": D1}, cwd=tmp_path, log=lines.append, cancel=None)
    assert f"pre_deploy: {D1}" in lines
    bad = PlannedHook("post_deploy", (sys.executable, "-c", "raise SystemExit(3)"), 30)
    with pytest.raises(HookFailed, match=r"post_deploy hook .* exited with 3"):
        run_hook(bad, {}, cwd=tmp_path, log=lines.append, cancel=None)
    slow = PlannedHook("pre_deploy", (sys.executable, "-c", "import time; time.sleep(30)"), 0.5)
    with pytest.raises(HookFailed, match=r"killed at its timeout \(0.5s\)"):
        run_hook(slow, {}, cwd=tmp_path, log=lines.append, cancel=threading.Event())
    with pytest.raises(HookFailed, match="could not start"):
        run_hook(PlannedHook("pre_deploy", (str(tmp_path / "nope"),), 5), {}, cwd=tmp_path,
                 log=lines.append, cancel=None)


def test_a_repository_s_pipeline_may_not_set_hooks():
    from runner.model import SecretSource
    from runner.repository_pipeline import within_limits
    from runner.run_request import RepositoryPipeline
    text = textwrap.dedent("""\
        name: app
        repository: {url: x}
        image: {name: localhost/app}
        stages:
          deploy:
            servers: [10.0.0.1]
            release_command: [migrate]
            hooks: {post_deploy: [./notify]}
        """)
    source = RepositoryPipeline(repository="https://git.example.com/me/app.git",
                                servers=("10.0.0.1",),
                                secrets={"git": SecretSource(env="T")}, token="git")
    with pytest.raises(InvalidInput) as caught:
        within_limits(load_pipeline_text(text, ".runner.yaml@0123", environ={}), source)
    (problem,) = caught.value.problems
    assert (problem.line, problem.column) == (8, 26)
    assert "only the operator's pipeline file may set them" in problem.message
