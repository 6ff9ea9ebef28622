"""The deploy stage: the exact digest pushed in this run -> every server, health-gated.

Around the rollout, the deploy's hooks (deployers.hooks) run on the runner's host: pre_deploy
before any server is reached, post_deploy once every server runs the release.

Reads ctx.outputs.push.ref (an ImageRef, "name@sha256:...", what the registry acknowledged in
this run), never a tag, so what runs on the servers is what was built, scanned and pushed.
Outputs (also when it fails): runner.outputs.DeployOutputs, the deployer's report: app, ok,
headline, servers: [{name, status, digest, previous_digest, rolled_back, verified, kept, reason,
duration, phases: {connect, pull, switch, start, health, commit}}].
"""
from __future__ import annotations

import os
from typing import Any

from runner.errors import StageFailed
from runner.model import Pipeline
from runner.model.image import ImageRef
from runner.outputs import DeployOutputs
from runner.stage import Stage, StageContext

from deployers.accessory_plan import accessory_specs, needed_on
from deployers.base import DeployFailed
from deployers.hooks import HookFailed, hook_env, rollout_with_hooks
from deployers.app_deployer import AppDeployer
from deployers.plan_summary import plan_summary
from deployers.ssh_docker import ConfigError
from deployers.ssh_errors import TransportError


def make_deployer(pipeline: Pipeline, *, run_id: str, image: ImageRef | None = None,
                  commit: str = "", secret=None, log=None, cancel=None) -> AppDeployer:
    # deploy_settings(): the top-level `env:` reaches the container, under its own env.
    # needs: the accessories each server must run before any server switches.
    return AppDeployer(pipeline.deploy_settings(), pipeline=pipeline.name,
                       image_name=pipeline.image.name, run_id=run_id, image=image,
                       commit=commit, secret=secret, log=log, cancel=cancel,
                       needs=needed_on(accessory_specs(pipeline)),
                       destination=pipeline.destination)


class DeployStage(Stage):
    name = "deploy"

    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        """The plan, opened by its summary (what a person checks: servers, image, env and
        secret names, proxy hosts, health probe, strategy, roles), then every command."""
        deployer = make_deployer(pipeline, run_id="<run id>")
        plan = deployer.plan()
        return {"summary": plan_summary(pipeline.deploy_settings(), deployer.roles, plan),
                **plan.to_dict()}

    def run(self, ctx: StageContext) -> DeployOutputs:
        push = ctx.outputs.push
        if push is None:
            raise StageFailed(self.name, "no pushed image in this run: the deploy needs the "
                                         "push stage's digest (enable stages.push)")
        image = push.ref
        commit = ctx.outputs.checkout.commit if ctx.outputs.checkout else ""
        deployer = make_deployer(ctx.pipeline, run_id=ctx.run_id, image=image, commit=commit,
                                 secret=ctx.secrets.value, log=ctx.log.info, cancel=ctx.cancel)
        servers = ", ".join(t.label for t in deployer.targets)
        roles = "" if len(deployer.roles) == 1 else \
            f" (roles: {', '.join(r.name for r in deployer.roles)})"
        ctx.log.info(f"deploying {image} as {deployer.app}{roles} to {servers} "
                     f"(strategy {ctx.pipeline.stages.deploy.strategy.type})")
        plan = deployer.plan()
        env = hook_env(digest=image.digest, image=str(image),
                       hosts=tuple(t.host for t in deployer.targets), pipeline=ctx.pipeline.name,
                       commit=commit, run_id=ctx.run_id, base=os.environ)
        cwd = ctx.outputs.checkout.path if ctx.outputs.checkout else ctx.workdir
        try:
            return rollout_with_hooks(deployer, plan, env, cwd=cwd, log=ctx.log.info,
                                      cancel=ctx.cancel)
        except HookFailed as exc:
            raise StageFailed(self.name, str(exc), exc.report) from None
        except (DeployFailed, ConfigError, TransportError) as exc:
            # The reason (which server, why, what was rolled back) is the stage's error: shown
            # once at the stage's end and in the summary, not repeated as warnings. The
            # per-server report goes into run.json as the stage's outputs all the same.
            raise StageFailed(self.name, str(exc),
                              exc.report if isinstance(exc, DeployFailed) else None) from None
        finally:
            deployer.close()
