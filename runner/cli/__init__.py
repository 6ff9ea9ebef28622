"""The command line, one module per family of subcommands:

- main: the `runner` group, which module holds each subcommand (`runner lab` is the lab's own,
  runner_lab.cli, there when runner-cd-lab is installed), and the entry point;
- exec: validate, schema and exec (a pipeline file checked, described, run once here);
- deploy: rollback, status, releases, deploy-lock and ssh-trust; app: app logs|exec|remove;
  proxy: proxy boot|reboot|status|logs (the deployed app and its proxy, on its servers);
- daemon: daemon, and runs, logs, cancel, trigger, retry (a running daemon's API);
- common: what they share (--var, opening a pipeline file with its secrets).
"""
from runner.cli.main import cli, main

__all__ = ["cli", "main"]
