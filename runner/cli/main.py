"""The `runner` group: which module holds each subcommand, and the process's entry point."""
from __future__ import annotations

import importlib
import sys

import click

from runner.errors import EXIT_INTERRUPTED, EXIT_INVALID


# Subcommands imported only when used: `runner exec` must not pay for paramiko, uvicorn and
# friends at every start (the daemon starts one per run).
LAZY_COMMANDS = {
    "validate": "runner.cli.exec:validate",
    "schema": "runner.cli.exec:schema",
    "exec": "runner.cli.exec:exec_",
    "rollback": "runner.cli.deploy:rollback",
    "status": "runner.cli.deploy:status",
    "deploy-lock": "runner.cli.deploy:deploy_lock",
    "releases": "runner.cli.deploy:releases",
    "promote": "runner.cli.promote:promote",
    "app": "runner.cli.app:app",
    "accessory": "runner.cli.accessory:accessory",
    "proxy": "runner.cli.proxy:proxy",
    "ssh-trust": "runner.cli.deploy:ssh_trust",
    "daemon": "runner.cli.daemon:daemon",
    "runs": "runner.cli.daemon:runs",
    "logs": "runner.cli.daemon:logs",
    "cancel": "runner.cli.daemon:cancel",
    "trigger": "runner.cli.daemon:trigger",
    "retry": "runner.cli.daemon:retry",
    "gc": "runner.cli.gc:gc",
}

# Subcommands of other distributions, there when those are installed: the test lab is
# runner-cd-lab (lab/ in runner's repository), never part of runner-cd itself.
PLUGIN_COMMANDS = {
    "lab": ("runner_lab.cli:lab", "the lab is not installed: it is the distribution runner-cd-lab, "
            "in lab/ of runner's repository (`pip install -e ./lab` from a checkout; "
            "scripts/install installs it)"),
}


def _not_installed(name: str, how: str) -> click.Command:
    """`runner NAME ...` of a plugin that is not installed: says how to install it, exit 2."""
    def refuse():
        click.echo(f"runner {name}: {how}", err=True)
        sys.exit(EXIT_INVALID)
    return click.Command(name, callback=refuse, help=f"(not installed) {how}", add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS, *PLUGIN_COMMANDS])

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        if name in PLUGIN_COMMANDS:
            target, how = PLUGIN_COMMANDS[name]
            module, attr = target.split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError as exc:
                if exc.name != module.split(".")[0]:
                    raise  # the plugin is there and lacks something: its own error
                return _not_installed(name, how)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runner-cd")
def cli() -> None:
    """git push -> image -> deploy, on your own servers."""


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
