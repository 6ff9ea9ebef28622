"""`runner promote PIPELINE --from A --to B`: deploy to destination B exactly the release last
verified on destination A (its image by digest, deployers.promotion), with B's settings for
everything per destination (servers, env from B's variables). No checkout, build, test, scan
or push: B's servers pull that digest from the registry, as a deploy does, health-gated, into
B's own history and under B's own lock.

Exit codes: 0 promoted, 1 the deploy failed (which server, why; put back as a deploy does) or
A's servers could not be read, 2 bad input (an unknown destination, A = B, nothing verified on
A), 130 interrupted (Ctrl-C, SIGTERM: it stops at its next step and puts back what it switched).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import click

from runner.cli.common import open_or_exit
from runner.cli.deploy import apply_reported
from runner.errors import EXIT_FAILED, EXIT_INVALID
from runner.pipeline_file import Load, load_file

from deployers.promotion import NothingToPromote, release_to_promote
from deployers.ssh_docker import ConfigError
from deployers.ssh_errors import TransportError
from pipelines.deploy import make_deployer


def make_promote(load: Load = load_file) -> click.Command:
    @click.command("promote")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--from", "source", required=True, metavar="NAME",
                  help="the destination whose last verified release to promote")
    @click.option("--to", "target", required=True, metavar="NAME",
                  help="the destination to deploy it to")
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
    def promote(pipeline_file: str, source: str, target: str, var: tuple[str, ...],
                as_json: bool) -> None:
        """Deploy to --to the release last verified on --from, by digest: nothing is built."""
        def say(line: str) -> None:
            click.echo(line, err=True)

        if source == target:
            say(f"--from and --to both name {source!r}: promote moves a release between two "
                f"destinations")
            sys.exit(EXIT_INVALID)
        run_id = f"promote-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        image, entry = _last_verified(pipeline_file, var, load, source, run_id, say)
        opened = open_or_exit(pipeline_file, var, load, destination=target)
        masker = opened.masker
        deployer = make_deployer(opened.pipeline, run_id=run_id, image=image,
                                 commit=str(entry.get("commit") or ""),
                                 secret=opened.secrets.value,
                                 log=lambda line: say(masker.mask(line)))
        servers = ", ".join(t.label for t in deployer.targets)
        say(masker.mask(f"promoting {image} (verified on {source}: commit "
                        f"{str(entry.get('commit') or '-')[:12]}, run {entry.get('run_id', '?')}) "
                        f"to {target}: {servers}"))
        apply_reported(deployer, lambda: deployer.apply(deployer.plan()), "promote", masker, as_json)

    return promote


def _last_verified(path: str, var: tuple[str, ...], load: Load, source: str, run_id: str,
                   say: Callable[[str], None]):
    """(image, history entry) last verified on `source`; exits 1 naming a server whose history
    cannot be read, 2 when nothing is verified there."""
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
        return release_to_promote(source, [(server, h) for server, h, _ in rows])
    except NothingToPromote as exc:
        say(f"promote refused: {exc}")
        sys.exit(EXIT_INVALID)


promote = make_promote()
