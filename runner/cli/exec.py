"""`runner validate`, `runner schema` and `runner exec`: a pipeline file checked, described,
and run once here. Thin: parses options, calls the engine, maps errors to exit codes."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click
import yaml

from runner.cli.common import chosen_destination, destination_option, parse_vars, say, var_option
from runner.errors import EXIT_INTERRUPTED, EXIT_INVALID, InvalidInput
from runner.model import STAGE_ORDER


def fail_invalid(exc: InvalidInput, as_json: bool) -> None:
    if as_json:
        say(json.dumps({"event": "run.end", "status": "invalid", "exit_code": EXIT_INVALID,
                         "error": str(exc).splitlines()[0],
                         "problems": [p.__dict__ for p in exc.problems]}), err=False)
    say(f"error: {exc}")
    sys.exit(EXIT_INVALID)


class RunId(click.ParamType):
    """--run-id: names the run's directory under the data directory (runner.engine.check_run_id)."""

    name = "RUN_ID"

    def convert(self, value, param, ctx):
        from runner.engine import check_run_id

        try:
            return check_run_id(value)
        except InvalidInput as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@var_option
@destination_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def validate(file: str, variables: tuple[str, ...], as_json: bool) -> None:
    """Check a pipeline file and report every problem with file, line and column."""
    from runner.loader import load_pipeline

    try:
        pipeline = load_pipeline(file, variables=parse_vars(variables),
                                 destination=chosen_destination())
    except InvalidInput as exc:
        if as_json:
            click.echo(json.dumps({"valid": False, "error": str(exc).splitlines()[0],
                                   "problems": [p.__dict__ for p in exc.problems]}))
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INVALID)
    enabled = [n for n in STAGE_ORDER if getattr(pipeline.stages, n).enabled]
    if as_json:
        click.echo(json.dumps({"valid": True, "pipeline": pipeline.name, "stages": enabled}))
    else:
        click.echo(f"{file}: ok (pipeline {pipeline.name!r}, stages: {', '.join(enabled)})")


@click.command()
@click.option("--reference", is_flag=True,
              help="Print the generated reference (Markdown) instead of the JSON Schema.")
@click.option("--docs", "docs_dir", metavar="DIR", type=click.Path(file_okay=False, exists=True),
              help="Rewrite DIR/pipeline.schema.json and the generated parts of DIR/pipeline.md "
                   "(from the model), DIR/stage-outputs.md (from the stages' output types) and "
                   "DIR/daemon-config.md (from the daemon config's model).")
@click.option("--check", "check_dir", metavar="DIR", type=click.Path(file_okay=False),
              help="Exit 1 if DIR/pipeline.schema.json, DIR/pipeline.md, DIR/stage-outputs.md "
                   "or DIR/daemon-config.md does not match the code.")
def schema(reference: bool, docs_dir: str | None, check_dir: str | None) -> None:
    """Print the pipeline file's JSON Schema (draft-07), generated from the model."""
    from runner.daemon.reference import DOCS
    from runner.model import reference as ref

    if docs_dir:
        for path in ref.update_docs(docs_dir, DOCS):
            click.echo(f"wrote {path}", err=True)
    elif check_dir:
        stale = ref.stale_docs(check_dir, DOCS)
        for path in stale:
            click.echo(f"{path}: does not match the model; run `{ref.REGENERATE}`", err=True)
        sys.exit(1 if stale else 0)
    elif reference:
        click.echo(ref.reference(), nl=False)
    else:
        click.echo(ref.schema_text(), nl=False)


@click.command("exec")
@click.argument("file", type=click.Path(dir_okay=False))
@var_option
@destination_option
@click.option("--only", multiple=True, metavar="STAGE[,STAGE]", help="Run only these stages.")
@click.option("--skip", multiple=True, metavar="STAGE[,STAGE]", help="Skip these stages.")
@click.option("--repo", help="Override the repository (path or URL).")
@click.option("--ref", help="Override the ref (branch, tag or commit).")
@click.option("--event", "event_file", type=click.Path(dir_okay=False),
              help="Replay a stored webhook payload (GitHub, GitLab or Gitea push) as the trigger.")
@click.option("--request", "request_file", type=click.Path(dir_okay=False),
              help="Build what this run request (JSON, as the daemon writes it) asks for.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line on stdout.")
@click.option("--dry-run", is_flag=True, help="Print the plan and touch nothing.")
@click.option("--run-id", type=RunId(),
              help="Use this run id (the daemon sets it): 1-64 of A-Z a-z 0-9 . _ -, no '..'.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where runs and caches live (default $RUNNER_DATA_DIR or ~/.local/share/runner).")
@click.option("-v", "--verbose", is_flag=True,
              help="Show every line of tool output (the whole BuildKit log, Trivy's messages) in "
                   "the terminal, not only the build's steps; the stage logs have them anyway.")
@click.option("-q", "--quiet", is_flag=True,
              help="Show only the runner's messages in the terminal, not even the build's steps.")
@click.option("--withhold-secrets", is_flag=True,
              help="Give the run no secret values at all (the daemon sets it for a pull request "
                   "from a fork): a stage that needs one fails, saying which.")
def exec_(file, variables, only, skip, repo, ref, event_file, request_file, as_json, dry_run, run_id, data_dir,
          verbose, quiet, withhold_secrets) -> None:
    """Run a pipeline once, here: checkout -> build -> scan -> push -> deploy.

    Every line of every stage goes to <data dir>/runs/<run id>/logs/<stage>.log, and the outcome
    to run.json beside it, whatever the terminal shows (see -v, -q, --json)."""
    from runner import engine
    from runner.render import JsonSink, TerminalSink, guard_std_fds
    from runner.run_request import read_request, request_from_event

    if verbose and quiet:
        raise click.UsageError("-v/--verbose and -q/--quiet exclude each other")
    if event_file and request_file:
        raise click.UsageError("--event and --request exclude each other")
    guard_std_fds()

    try:
        request = read_request(request_file) if request_file else \
            request_from_event(engine.load_event(event_file)) if event_file else None
        options = engine.RunOptions(
            variables=parse_vars(variables), destination=chosen_destination(), only=only, skip=skip, repo=repo, ref=ref,
            request=request, run_id=run_id,
            data_dir=Path(data_dir) if data_dir else None, withhold_secrets=withhold_secrets)
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

    if withhold_secrets:
        # Nor do the tools the stages run (git, buildx, trivy) inherit the variables that hold
        # the pipeline's secrets.
        for src in prep.pipeline.secrets.values():
            if src.env:
                os.environ.pop(src.env, None)
    cancel = threading.Event()
    engine.stop_on_signals(cancel)  # SIGINT and SIGTERM (daemon, systemd) cancel the run
    sinks = [JsonSink()] if as_json else [TerminalSink(verbose=verbose, quiet=quiet)]
    try:
        result = engine.execute(prep, sinks, cancel)
    except KeyboardInterrupt:
        say("interrupted")
        _exit(EXIT_INTERRUPTED, interrupted=True)
    finally:
        # The run is over and recorded: a signal now must not make the exit code a signal's
        # (Python puts its default handlers back while it shuts down; an ignored one stays).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if result.status == "cancelled" and not as_json:
        say(f"interrupted: the running stage was stopped; logs in {result.workdir}/logs")
    from runner.cli.notify_run import notify_run

    notify_run(prep, result)  # bounded; a notifier that fails is a warning, not the run's outcome
    _exit(result.exit_code, interrupted=cancel.is_set())


def _exit(code: int, interrupted: bool) -> None:
    """Exit `exec` with the run's code. Once a KeyboardInterrupt has passed through code that
    exec() or eval() ran from a string (dataclasses and namedtuple build classes that way, at
    import), CPython ends the process by SIGINT at exit whatever sys.exit said, even though the
    interrupt was caught and recorded: an interrupted run leaves at once, its record written."""
    if not interrupted:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
