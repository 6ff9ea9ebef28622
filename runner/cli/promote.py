"""`runner promote PIPELINE --from A --to B`: deploy to destination B exactly the release last
verified on destination A (its image by digest, deployers.promotion), with B's settings for
everything per destination (servers, env from B's variables). No checkout, build, test, scan
or push: B's servers pull that digest from the registry, as a deploy does, health-gated, into
B's own history and under B's own lock.

The deploy's hooks (`deploy.hooks`) run around it as around a deploy (deployers.hooks), in
the pipeline file's directory. `--commit SHA` (the daemon's promotion on a tag passes the tag's
commit) refuses unless the release verified on A is that commit.

Exit codes: 0 promoted, 1 the deploy or a hook failed (which server, why; put back as a deploy
does) or A's servers could not be read, 2 bad input (an unknown destination, A = B, nothing
verified on A, A's release is not --commit), 130 interrupted (Ctrl-C, SIGTERM: it stops at its
next step and puts back what it switched).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click

from runner.cli.common import open_or_exit
from runner.cli.deploy import apply_reported
from runner.errors import EXIT_FAILED, EXIT_INVALID
from runner.outputs import DeployOutputs
from runner.pipeline_file import Load, load_file

from deployers.base import DeployFailed
from deployers.hooks import HookFailed, hook_env, rollout_with_hooks
from deployers.promotion import NothingToPromote, release_to_promote, require_commit
from deployers.ssh_docker import ConfigError
from deployers.ssh_errors import TransportError
from pipelines.deploy import make_deployer

SHORT_SHA = re.compile(r"[0-9a-fA-F]{7,64}")


def make_promote(load: Load = load_file) -> click.Command:
    @click.command("promote")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--from", "source", required=True, metavar="NAME",
                  help="the destination whose last verified release to promote")
    @click.option("--to", "target", required=True, metavar="NAME",
                  help="the destination to deploy it to")
    @click.option("--commit", "commit", default=None, metavar="SHA",
                  help="refuse unless the release last verified on --from is this commit (full "
                       "or 7+ hex digits; the daemon passes a tag's)")
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
    @click.option("--run-id", "run_id", default=None, metavar="ID",
                  help="the id the servers record with the release and the deploy lock names "
                       "(the daemon passes its run's); default promote-<time>-<pid>")
    def promote(pipeline_file: str, source: str, target: str, commit: str | None,
                var: tuple[str, ...], as_json: bool, run_id: str | None) -> None:
        """Deploy to --to the release last verified on --from, by digest: nothing is built.
        The deploy's hooks run around it as around a deploy."""
        def say(line: str) -> None:
            click.echo(line, err=True)

        if source == target:
            say(f"--from and --to both name {source!r}: promote moves a release between two "
                f"destinations")
            sys.exit(EXIT_INVALID)
        if commit is not None and not SHORT_SHA.fullmatch(commit):
            say(f"--commit {commit[:80]!r}: expected a git commit (7 to 64 hex digits)")
            sys.exit(EXIT_INVALID)
        run_id = run_id or f"promote-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        image, entry = _last_verified(pipeline_file, var, load, source, run_id, commit, say)
        verified = str(entry.get("commit") or "")
        opened = open_or_exit(pipeline_file, var, load, destination=target)
        masker = opened.masker

        def log(line: str) -> None:
            say(masker.mask(line))
        deployer = make_deployer(opened.pipeline, run_id=run_id, image=image, commit=verified,
                                 secret=opened.secrets.value, log=log)
        servers = ", ".join(t.label for t in deployer.targets)
        say(masker.mask(f"promoting {image} (verified on {source}: commit "
                        f"{verified[:12] or '-'}, run {entry.get('run_id', '?')}) "
                        f"to {target}: {servers}"))
        env = hook_env(digest=image.digest or "", image=str(image),
                       hosts=tuple(t.host for t in deployer.targets),
                       pipeline=opened.pipeline.name, commit=verified, run_id=run_id,
                       base=os.environ)
        # Hooks run where the pipeline file is: a promotion has no checkout.
        cwd = Path(pipeline_file).resolve().parent

        def promotion() -> DeployOutputs:
            try:
                report = rollout_with_hooks(deployer, deployer.plan(), env, cwd=cwd, log=log,
                                            cancel=deployer.cancel)
            except DeployFailed as exc:
                again = DeployFailed(replace(exc.report, what="promote"))
                again.invalid_input = exc.invalid_input
                raise again from None
            return replace(report, what="promote")

        try:
            apply_reported(deployer, promotion, "promote", masker, as_json)
        except HookFailed as exc:
            if as_json and exc.report is not None:
                click.echo(json.dumps(replace(exc.report, what="promote").to_dict()))
            say(masker.mask(f"promote failed: {exc}"))
            sys.exit(EXIT_FAILED)

    return promote


def _last_verified(path: str, var: tuple[str, ...], load: Load, source: str, run_id: str,
                   commit: str | None, say: Callable[[str], None]):
    """(image, history entry) last verified on `source`; exits 1 naming a server whose history
    cannot be read, 2 when nothing is verified there or (with `commit`) it is another commit."""
    opened = open_or_exit(path, var, load, destination=source)
    deployer = make_deployer(opened.pipeline, run_id=run_id, secret=opened.secrets.value)
    try:
        rows = deployer.releases()
    except (ConfigError, TransportError) as exc:
        say(opened.masker.mask(f"promote failed: cannot read the history of {source}: {exc}"))
        sys.exit(EXIT_FAILED)
    finally:
        deployer.close()
    unread = [(server, error) for server, _, error in rows if error]
    if unread:
        for server, error in unread:
            say(opened.masker.mask(f"{server}: cannot read the history of {source}: {error}"))
        say(f"promote refused: the release last verified on {source} is not known (nothing "
            f"was changed)")
        sys.exit(EXIT_FAILED)
    try:
        image, entry = release_to_promote(source, [(server, h) for server, h, _ in rows])
        if commit is not None:
            require_commit(source, entry, commit)
        return image, entry
    except NothingToPromote as exc:
        say(f"promote refused: {exc}")
        sys.exit(EXIT_INVALID)


promote = make_promote()
