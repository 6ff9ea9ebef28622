"""What the subcommands share: --var, -d, writing to a reader that may be gone, and opening the
pipeline file a deploy command names (runner.pipeline_file.open_pipeline) or exiting 2."""
from __future__ import annotations

import sys

import click

from runner.errors import InvalidInput, RunnerError
from runner.pipeline_file import Load, OpenPipeline, load_file, open_pipeline


def parse_vars(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--var {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def say(text: str, err: bool = True) -> None:
    """click.echo for `exec`, whose reader may be gone (a daemon that died, `| head -1`): the
    exit code tells the run's outcome, never a closed pipe."""
    from runner.render import silence

    try:
        click.echo(text, err=err)
    except (OSError, ValueError):
        silence(sys.stderr if err else sys.stdout)


var_option = click.option("--var", "variables", multiple=True, metavar="K=V",
                          help="Set a variable for ${K} interpolation (beats the environment).")


def _keep_destination(ctx: click.Context, _param, value: str | None) -> None:
    ctx.meta["runner.destination"] = value


# Not passed to the command: open_or_exit reads it from the command's context, so that every
# deploy-touching command takes -d by a decorator alone.
destination_option = click.option(
    "-d", "--destination", default=None, metavar="NAME", expose_value=False,
    callback=_keep_destination,
    help="The destination (a name under `destinations:`) whose variables, servers, history and "
         "lock to use; required when the pipeline has destinations.")


def confirmed(question: str) -> bool:
    """The user's yes to `question` (no by default); no answer (end of input, Ctrl-C) is a no."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        click.echo()
        return False


def chosen_destination() -> str | None:
    """The running command's `-d NAME` (destination_option), None without one."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("runner.destination") if ctx is not None else None


def open_or_exit(path: str, variables: tuple[str, ...], load: Load = load_file,
                 destination: str | None = None,
                 defer_unreadable: bool = False) -> OpenPipeline:
    """open_pipeline for a command: the pipeline with its secrets read, or every problem on
    stderr and the error's exit code (2 for a bad file, an unknown or missing destination, or
    an unreadable secret). `destination`: given, or the command's `-d` (destination_option);
    `defer_unreadable`: an unreadable secret stops only what uses it (open_pipeline)."""
    if destination is None:
        destination = chosen_destination()
    try:
        return open_pipeline(path, parse_vars(variables), load=load, destination=destination,
                             defer_unreadable=defer_unreadable)
    except RunnerError as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
