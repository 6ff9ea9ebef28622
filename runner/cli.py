"""The `runner` command line. Thin: parses options, calls the engine, maps errors to exit codes."""
from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path

import click
import yaml

from runner.errors import EXIT_INTERRUPTED, EXIT_INVALID, InvalidInput


# Subcommands that live beside the code they drive, imported only when used: `runner exec`
# must not pay for paramiko, uvicorn and friends at every start (the daemon starts one per run).
LAZY_COMMANDS = {
    "lab": "runner.lab.cli:lab",
    "rollback": "deployers.cli:rollback",
    "status": "deployers.cli:status",
    "deploy-lock": "deployers.cli:deploy_lock",
    "releases": "deployers.cli:releases",
    "app": "deployers.app_cli:app",
    "proxy": "deployers.proxy_cli:proxy",
    "daemon": "runner.daemon.cli:daemon",
    "runs": "runner.daemon.cli:runs",
    "logs": "runner.daemon.cli:logs",
    "cancel": "runner.daemon.cli:cancel",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runner")
def cli() -> None:
    """git push -> image -> deploy, on your own servers."""


def parse_vars(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--var {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def fail_invalid(exc: InvalidInput, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"event": "run.end", "status": "invalid", "exit_code": EXIT_INVALID,
                               "error": str(exc).splitlines()[0],
                               "problems": [p.__dict__ for p in exc.problems]}))
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_INVALID)


var_option = click.option("--var", "variables", multiple=True, metavar="K=V",
                          help="Set a variable for ${K} interpolation (beats the environment).")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@var_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def validate(file: str, variables: tuple[str, ...], as_json: bool) -> None:
    """Check a pipeline file and report every problem with file, line and column."""
    from runner.loader import load_pipeline

    try:
        pipeline = load_pipeline(file, variables=parse_vars(variables))
    except InvalidInput as exc:
        if as_json:
            click.echo(json.dumps({"valid": False, "error": str(exc).splitlines()[0],
                                   "problems": [p.__dict__ for p in exc.problems]}))
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INVALID)
    enabled = [n for n in ("checkout", "build", "scan", "push", "deploy")
               if getattr(pipeline.stages, n).enabled]
    if as_json:
        click.echo(json.dumps({"valid": True, "pipeline": pipeline.name, "stages": enabled}))
    else:
        click.echo(f"{file}: ok (pipeline {pipeline.name!r}, stages: {', '.join(enabled)})")


@cli.command("exec")
@click.argument("file", type=click.Path(dir_okay=False))
@var_option
@click.option("--only", multiple=True, metavar="STAGE[,STAGE]", help="Run only these stages.")
@click.option("--skip", multiple=True, metavar="STAGE[,STAGE]", help="Skip these stages.")
@click.option("--repo", help="Override the repository (path or URL).")
@click.option("--ref", help="Override the ref (branch, tag or commit).")
@click.option("--event", "event_file", type=click.Path(dir_okay=False),
              help="Replay a stored webhook payload (GitHub, GitLab or Gitea push) as the trigger.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line on stdout.")
@click.option("--dry-run", is_flag=True, help="Print the plan and touch nothing.")
@click.option("--run-id", help="Use this run id (the daemon sets it).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where runs and caches live (default $RUNNER_DATA_DIR or ~/.local/share/runner).")
@click.option("-q", "--quiet", is_flag=True, help="Hide tool output lines in the terminal.")
def exec_(file, variables, only, skip, repo, ref, event_file, as_json, dry_run, run_id, data_dir,
          quiet) -> None:
    """Run a pipeline once, here: checkout -> build -> scan -> push -> deploy."""
    from runner import engine
    from runner.render import JsonSink, TerminalSink

    try:
        options = engine.RunOptions(
            variables=parse_vars(variables), only=only, skip=skip, repo=repo, ref=ref,
            event=engine.load_event(event_file) if event_file else None, run_id=run_id,
            data_dir=Path(data_dir) if data_dir else None)
        prep = engine.prepare(file, options)
    except InvalidInput as exc:
        fail_invalid(exc, as_json)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)

    if dry_run:
        plan = engine.plan(prep)
        text = json.dumps({"event": "plan", **plan}, default=str) if as_json else \
            yaml.safe_dump(plan, sort_keys=False, default_flow_style=False)
        click.echo(prep.masker.mask(text))
        return

    def on_term(signum, frame):  # SIGTERM (daemon, systemd) is handled like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    sinks = [JsonSink()] if as_json else [TerminalSink(verbose=not quiet)]
    try:
        result = engine.execute(prep, sinks)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if result.status == "cancelled" and not as_json:
        click.echo(f"interrupted: the running stage was stopped; logs in {result.workdir}/logs",
                   err=True)
    sys.exit(result.exit_code)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
