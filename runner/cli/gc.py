"""`runner gc PIPELINE [--dry-run]`: the housekeeping every run does afterwards
(pipelines/housekeeping.py), by hand and always whole: the pipeline's images beyond
build.keep_images, BuildKit's cache above build.cache_limit, test caches above
build.test_cache_limit, on the pipeline's build engine."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runner.cli.common import chosen_destination, destination_option, parse_vars, var_option
from runner.errors import EXIT_FAILED, EXIT_INVALID, InvalidInput


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@var_option
@destination_option
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="The runner's data directory (default: RUNNER_DATA_DIR, else "
                   "~/.local/share/runner).")
def gc(file: str, variables: tuple[str, ...], dry_run: bool, data_dir: str | None) -> None:
    """Remove what the pipeline's build engine holds beyond its limits, printing each removal."""
    from pipelines.housekeeping import housekeep
    from runner.engine import default_data_dir
    from runner.loader import load_pipeline
    from runner.sizes import format_size

    try:
        pipeline = load_pipeline(file, variables=parse_vars(variables),
                                 destination=chosen_destination())
    except InvalidInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INVALID)
    root = Path(data_dir) if data_dir else default_data_dir()
    report = housekeep(pipeline, root / "cache", dry_run=dry_run)
    for line in report.done:
        click.echo(line)
    if not report.done:
        click.echo(f"nothing to remove on build engine {report.engine}")
    if report.usage is not None:
        free = "" if report.disk_free is None else f"; {format_size(report.disk_free)} free"
        click.echo(f"build engine {report.engine}: {report.usage.describe()}{free}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if report.warnings:
        sys.exit(EXIT_FAILED)
