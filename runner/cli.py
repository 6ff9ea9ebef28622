"""The `runner` command line. Thin: parses options, calls the engine, maps errors to exit codes."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runner")
def cli() -> None:
    """git push -> image -> deploy, on your own servers."""


def _attach_optional() -> None:
    # Subcommands live beside the code they drive; each registers here.
    try:
        from runner.lab.cli import lab
        cli.add_command(lab)
    except ImportError:
        pass


_attach_optional()


def main() -> None:
    cli()
