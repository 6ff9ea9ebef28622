"""What the subcommands share: --var, writing to a reader that may be gone, and opening the
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


def confirmed(question: str) -> bool:
    """The user's yes to `question` (no by default); no answer (end of input, Ctrl-C) is a no."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        click.echo()
        return False


def open_or_exit(path: str, variables: tuple[str, ...], load: Load = load_file) -> OpenPipeline:
    """open_pipeline for a command: the pipeline with its secrets read, or every problem on
    stderr and the error's exit code (2 for a bad file or an unreadable secret)."""
    try:
        return open_pipeline(path, parse_vars(variables), load=load)
    except RunnerError as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
