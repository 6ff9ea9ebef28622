"""`runner rollback`, `runner status` and `runner deploy-lock`: the deploy's own commands.

The lead registers them in runner/cli.py (`cli.add_command(rollback)`, `status`, `deploy_lock`).
Each loads the pipeline with runner.loader.load_pipeline (or a `load(path, vars)` passed to
`make_commands`), reads its secrets like `runner exec` does, and drives the deployer.
Exit codes: 0 done, 1 the deploy/rollback failed (the message says where and why), 2 bad input.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from runner.errors import EXIT_FAILED, EXIT_INVALID, RunnerError

from deployers.base import DeployFailed
from deployers.ssh_docker import ConfigError, SSHDockerDeployer
from deployers.transport import TransportError

Loader = Callable[[str, dict[str, str]], Any]


def _default_load(path: str, variables: dict[str, str]):
    from runner.loader import load_pipeline
    return load_pipeline(path, variables=variables, environ=dict(os.environ))


def _vars(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"expected K=V, got {p!r}", param_hint="--var")
        k, v = p.split("=", 1)
        out[k] = v
    return out


def _open(path: str, var: tuple[str, ...], load: Loader, run_id: str,
          echo: Callable[[str], None]):
    """(pipeline, deployer, masker) or exit 2 with the problems."""
    from runner.secrets import Masker, SecretStore
    try:
        pipeline = load(path, _vars(var))
        masker = Masker()
        store = SecretStore.from_pipeline(pipeline, dict(os.environ), masker)
    except RunnerError as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
    if not pipeline.stages.deploy.servers:
        click.echo(f"{path}: stages.deploy.servers is empty: nothing to do", err=True)
        sys.exit(EXIT_INVALID)

    def log(line: str) -> None:
        echo(masker.mask(line))
    deployer = SSHDockerDeployer(pipeline.stages.deploy, pipeline=pipeline.name,
                                 image_name=pipeline.image.name, run_id=run_id,
                                 secret=store.value, log=log)
    return pipeline, deployer, masker


def make_commands(load: Loader = _default_load) -> tuple[click.Command, click.Command,
                                                        click.Group]:
    @click.command("rollback")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--to", "to", metavar="DIGEST",
                  help="sha256:... to return to (default: the version before the current one)")
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
    def rollback(pipeline_file: str, to: str | None, var: tuple[str, ...],
                 as_json: bool) -> None:
        """Return every server to the previous version (or to --to DIGEST), health-gated."""
        run_id = f"rollback-{time.strftime('%Y%m%d%H%M%S')}"
        _, deployer, masker = _open(pipeline_file, var, load, run_id,
                                    lambda s: click.echo(s, err=True))
        try:
            report = deployer.rollback(to)
        except DeployFailed as exc:
            if as_json:
                click.echo(json.dumps(exc.report.to_dict()))
            click.echo(masker.mask(f"rollback failed: {exc}"), err=True)
            sys.exit(EXIT_FAILED)
        except (ConfigError, TransportError) as exc:
            click.echo(masker.mask(f"rollback failed: {exc}"), err=True)
            sys.exit(EXIT_FAILED)
        finally:
            deployer.close()
        if as_json:
            click.echo(json.dumps(report.to_dict()))
        else:
            click.echo(report.summary())

    @click.command("status")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    def status(pipeline_file: str, var: tuple[str, ...], as_json: bool) -> None:
        """Per server: which digest/commit runs, its health and since when."""
        _, deployer, masker = _open(pipeline_file, var, load, "status",
                                    lambda s: click.echo(s, err=True))
        try:
            rows = deployer.verify()
        except ConfigError as exc:
            click.echo(str(exc), err=True)
            sys.exit(EXIT_INVALID)
        finally:
            deployer.close()
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in rows]))
        else:
            click.echo(f"{'SERVER':<22} {'STATE':<10} {'HEALTH':<10} {'DIGEST':<19} "
                       f"{'COMMIT':<12} SINCE")
            for r in rows:
                if r.error:
                    click.echo(f"{r.server:<22} {'error':<10} {masker.mask(r.error)}")
                    continue
                click.echo(f"{r.server:<22} {r.status:<10} {r.health or '-':<10} "
                           f"{r.digest[:19] or '-':<19} {r.commit[:12] or '-':<12} "
                           f"{r.started_at[:19] or '-'}")
        if any(r.error or not r.running for r in rows):
            sys.exit(EXIT_FAILED)

    @click.group("deploy-lock")
    def deploy_lock() -> None:
        """Inspect or break the per-app deploy lock on the servers."""

    @deploy_lock.command("show")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--var", multiple=True, metavar="K=V")
    def show(pipeline_file: str, var: tuple[str, ...]) -> None:
        _, deployer, _ = _open(pipeline_file, var, load, "lock-show",
                               lambda s: click.echo(s, err=True))
        try:
            for server, info, error in deployer.lock_status():
                text = error or (info.describe() if info else "free")
                click.echo(f"{server}: {text}")
        finally:
            deployer.close()

    @deploy_lock.command("break")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--server", default=None, help="only this server (name or host)")
    @click.option("--var", multiple=True, metavar="K=V")
    def break_(pipeline_file: str, server: str | None, var: tuple[str, ...]) -> None:
        _, deployer, _ = _open(pipeline_file, var, load, "lock-break",
                               lambda s: click.echo(s, err=True))
        try:
            for label, broken, error in deployer.break_lock(server):
                click.echo(f"{label}: {error or ('lock broken' if broken else 'was free')}")
        finally:
            deployer.close()

    return rollback, status, deploy_lock


rollback, status, deploy_lock = make_commands()
