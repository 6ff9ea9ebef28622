"""The release command (`deploy.release_command`, a migration say): once per deploy, in a one-off
container of the new image on one server, after that server's pull and before any server
switches. Its commands are planned here (pure, so `--dry-run` prints them) and run by
`run_release_command`, which the SSH steps call from the rollout (deployers.rollout).

The one-off container is the app's container as `docker run` would start it (env file, volumes,
network: it reaches the accessories by name), in the foreground, its output captured for the
run's log. It carries the label `runner.release_of=<app>` and is removed in every case: after it
exits, when it fails or times out, when the deploy is cancelled; and one a SIGKILLed runner left
behind is removed by the next deploy of the app before it starts its own.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deployers import commands as cmd
from deployers.base import PlannedCommand, ServerPlan, StepFailed
from deployers.spec import Release, env_file_content
from deployers.ssh_connection import Connection
from deployers.ssh_errors import CommandTimeout, TransportError

LABEL_RELEASE = "runner.release_of"  # the app whose release command the container runs
LEFTOVER = cmd.Slot("leftover release container")
PHASE = "release"


def run_argv(release: Release, argv: tuple[str, ...], name: str) -> list[cmd.Word]:
    """`docker run` of `argv` in the new image (by digest), in the foreground, with the app's
    env file, volumes, network and limits, and the image's own ENTRYPOINT."""
    spec = release.spec
    out: list[cmd.Word] = [cmd.DOCKER, "run", "--rm", "--name", name,
                           "--label", f"{LABEL_RELEASE}={spec.name}"]
    out += cmd.runtime_args(spec, cmd.ENV_FILE if spec.has_env else None)
    out.append(spec.image)
    return out + list(argv)


def leftovers_argv(app: str) -> list[str]:
    """The ids of release containers of `app` that a dead run left behind."""
    return [cmd.DOCKER, "container", "ls", "--all", "--quiet", "--no-trunc", "--filter",
            f"label={LABEL_RELEASE}={app}"]


def planned(release: Release, argv: tuple[str, ...], name: str
            ) -> tuple[PlannedCommand, ...]:
    """The release command's part of one server's plan; `name`: the one-off container's."""
    return (
        PlannedCommand("release_leftovers", PHASE, tuple(leftovers_argv(release.spec.name)),
                       "once per deploy, on this server alone, after its pull"),
        PlannedCommand("release_reap", PHASE, tuple(cmd.remove(LEFTOVER)),
                       "a SIGKILLed run left a release container behind"),
        PlannedCommand("release", PHASE, tuple(run_argv(release, argv, name)),
                       "before any server switches: a non-zero exit stops the deploy with "
                       "nothing switched on any server"),
        PlannedCommand("release_remove", PHASE, tuple(cmd.remove(name)),
                       "always, once it ended (exited, failed, timed out or cancelled)"),
    )


@dataclass(frozen=True)
class ReleaseRun:
    """What the steps give `run_release_command`: how to reach the server and what to run."""

    conn: Connection
    run: Callable  # conn.run behind the lock check and the cancel (the steps' runner)
    remove: Callable[[list[str]], None]  # runs a removal whatever happened (shielded, retried)
    plan: ServerPlan
    env_values: dict[str, str]  # the whole env (plain and secret values) for the env file
    env_path: Callable[[], str]  # a fresh private path on the server for the env file
    timeout: float
    log: Callable[[str], None]


def command_of(plan: ServerPlan) -> str:
    """The release command itself (the words after the image), as messages name it."""
    argv = [str(w) for w in plan.command("release").argv]
    return " ".join(argv[argv.index(plan.release.spec.image) + 1:])


def run_release_command(r: ReleaseRun) -> None:
    """Run the planned release command on r.plan's server; raises StepFailed (touched=False:
    nothing that serves traffic changed) naming the server, the command and the exit code."""
    plan, server = r.plan, r.plan.server
    for cid in r.run(plan.argv("release_leftovers"), check=False).stdout.split():
        r.log(f"{server}: removing a release container a dead run left ({cid[:12]})")
        r.run(plan.argv("release_reap", {LEFTOVER: cid}), check=False)
    values: dict[cmd.Slot, str] = {}
    env_path = ""
    if plan.release.spec.has_env:
        env_path = r.env_path()
        r.conn.write_private_file(env_path, env_file_content(r.env_values))
        values[cmd.ENV_FILE] = env_path
    what = command_of(plan)
    r.log(f"{server}: running the release command `{what}` "
          f"(up to {r.timeout:g}s, before any server switches)")
    try:
        try:
            result = r.run(plan.argv("release", values), check=False, timeout=r.timeout)
        except CommandTimeout:
            raise StepFailed(server, f"the release command `{what}` did not finish within "
                                     f"{r.timeout:g}s (its container was removed)",
                             touched=False) from None
    finally:
        r.remove(plan.argv("release_remove"))
        if env_path:
            try:
                r.conn.remove_file(env_path)
            except (OSError, TransportError):
                pass  # the next deploy's sweep removes it (the scratch name says whose)
    for line in result.output.splitlines():
        r.log(f"{server}: release: {line}")
    if not result.ok:
        raise StepFailed(server, f"the release command `{what}` exited with {result.status}",
                         touched=False)
    r.log(f"{server}: release command `{what}` done in {result.duration:.1f}s")
