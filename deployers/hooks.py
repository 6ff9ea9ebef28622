"""The deploy's hooks (`deploy.hooks`): commands on the runner's own host, before the deploy
(`pre_deploy`: a failure stops it before any server is reached) and after it succeeded
(`post_deploy`: a failure is a failed hook; the release stays deployed): rollout_with_hooks,
for the deploy stage and `runner promote` alike.

Each hook is an argv (no shell) with the release described in its environment (`hook_env`,
pure) and nothing else of the runner's environment but PATH, HOME and LANG: the runner's own
variables (a daemon's database URL, a registry token) are not the hook's business. Its output
goes line by line to the run's log (masked there like everything else); at its timeout its
process group is killed.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.proc import run_command

PASSED_ON = ("PATH", "HOME", "LANG")  # of the runner's environment, to every hook


@dataclass(frozen=True)
class PlannedHook:
    phase: str  # pre_deploy | post_deploy
    argv: tuple[str, ...]
    timeout: float

    def to_dict(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "timeout": self.timeout,
                "when": ("before any server is reached; a failure stops the deploy"
                         if self.phase == "pre_deploy" else
                         "once every server runs the release, verified; a failure fails the "
                         "run, the release stays"),
                "env": sorted(ENV_NAMES)}


ENV_NAMES = ("RUNNER_DIGEST", "RUNNER_IMAGE", "RUNNER_SERVERS", "RUNNER_PIPELINE",
             "RUNNER_COMMIT", "RUNNER_RUN_ID")


def hook_env(*, digest: str, image: str, hosts: tuple[str, ...], pipeline: str, commit: str,
             run_id: str, base: Mapping[str, str]) -> dict[str, str]:
    """A hook's whole environment: PASSED_ON from `base` (the runner's) and the release.
    `commit` may be "" (a run without a checkout): then RUNNER_COMMIT is not set."""
    env = {k: base[k] for k in PASSED_ON if k in base}
    env.update(RUNNER_DIGEST=digest, RUNNER_IMAGE=image, RUNNER_SERVERS=",".join(hosts),
               RUNNER_PIPELINE=pipeline, RUNNER_RUN_ID=run_id)
    if commit:
        env["RUNNER_COMMIT"] = commit
    return env


class HookFailed(Exception):
    """A hook failed; `report` is the rollout's when it had happened (post_deploy)."""

    def __init__(self, hook: PlannedHook, reason: str, report: Any = None):
        self.hook = hook
        self.reason = reason
        self.report = report
        super().__init__(f"{hook.phase} hook `{' '.join(hook.argv)}` {reason}")


def rollout_with_hooks(deployer: Any, plan: Any, env: dict[str, str], *, cwd: Path,
                       log: Callable[[str], None], cancel: threading.Event | None) -> Any:
    """pre_deploy, `deployer.apply(plan)`, post_deploy: a deploy as the deploy stage and `runner
    promote` both make it, returning the rollout's report (each server's line logged). Raises
    the rollout's own errors, or HookFailed saying what was left: a failed pre_deploy changed
    nothing on any server; after a failed post_deploy the release stays (its `report`)."""
    hooks = {h.phase: h for h in plan.hooks}
    if "pre_deploy" in hooks:
        try:
            run_hook(hooks["pre_deploy"], env, cwd=cwd, log=log, cancel=cancel)
        except HookFailed as exc:
            raise HookFailed(exc.hook, f"{exc.reason}: the deploy did not start, nothing was "
                                       f"changed on any server") from None
    report = deployer.apply(plan)
    for s in report.servers:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in s.phases.items())
        log(f"{s.server}: {s.status} {s.digest} in {s.duration:.1f}s ({phases})")
    if "post_deploy" in hooks:
        try:
            run_hook(hooks["post_deploy"], env, cwd=cwd, log=log, cancel=cancel)
        except HookFailed as exc:
            servers = ", ".join(s.server for s in report.servers)
            raise HookFailed(exc.hook, f"{exc.reason}: the deploy itself succeeded and the release "
                                       f"{env.get('RUNNER_DIGEST', '')[:19]} stays on {servers}",
                             report) from None
    return report


def run_hook(hook: PlannedHook, env: dict[str, str], *, cwd: Path,
             log: Callable[[str], None], cancel: threading.Event | None) -> None:
    """Run `hook`; raises HookFailed (exit status, timeout or a missing program) or Cancelled
    (the hook is stopped first)."""
    log(f"{hook.phase} hook: `{' '.join(hook.argv)}` (up to {hook.timeout:g}s)")
    try:
        r = run_command(hook.argv, on_line=lambda line: log(f"{hook.phase}: {line}"),
                        cancel=cancel, env=env, cwd=cwd, timeout=hook.timeout)
    except OSError as exc:
        raise HookFailed(hook, f"could not start: {exc.strerror or exc}") from None
    if r.returncode == -1 and r.duration > hook.timeout:  # run_command's "timed out"
        raise HookFailed(hook, f"was killed at its timeout ({hook.timeout:g}s)")
    if r.returncode < 0:
        raise HookFailed(hook, f"was killed by signal {-r.returncode}")
    if r.returncode != 0:
        raise HookFailed(hook, f"exited with {r.returncode}")
