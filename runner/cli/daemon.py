"""`runner daemon`, `runner runs`, `runner logs`, `runner cancel`, `runner trigger`, `runner retry`.

All but the first talk to a running daemon's HTTP API (--server, or $RUNNER_SERVER, default
http://127.0.0.1:8080) with the API token from --token or $RUNNER_TOKEN: reading needs it unless
the daemon has read_requires_token off; cancel, trigger and retry always do.

What the API answers holds text from repositories, forges and builds (branch names, a webhook's
event name, reasons quoting build output, log lines): the tables and lines printed here pass it
through runner.terminal_text first, so it cannot drive the terminal. --json prints it as JSON,
whose escapes carry every control character as text.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.parse

import click
import httpx

from runner.errors import EXIT_FAILED, EXIT_INVALID, InvalidInput
from runner.terminal_text import inert, inert_all

server_option = click.option("--server", envvar="RUNNER_SERVER", default="http://127.0.0.1:8080",
                             show_default=True, help="The daemon's URL ($RUNNER_SERVER).")
token_option = click.option("--token", envvar="RUNNER_TOKEN", default=None,
                            help="API token ($RUNNER_TOKEN).")


def _get(server: str, path: str, token: str | None = None, **params) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(server.rstrip("/") + path, params={k: v for k, v in params.items() if v is not None},
                      headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the daemon at {server}: {exc}") from None
    if r.status_code >= 400:
        raise click.ClickException(_answer_error(r))
    return r.json()


def _is_json(r: httpx.Response) -> bool:
    return r.headers.get("content-type", "").startswith("application/json")


def _answer_error(r: httpx.Response) -> str:
    """An error answer as a message (it may quote a name the request or a forge gave)."""
    said = r.json().get("error", r.text) if _is_json(r) else r.text
    return f"{r.status_code}: {inert(str(said), multiline=True)}"


def _post(server: str, path: str, token: str | None, what: str, body: dict | None = None) -> httpx.Response:
    """POST with the token; a ClickException for a daemon out of reach or an error answer."""
    if not token:
        raise click.UsageError(f"{what} needs the API token: --token or $RUNNER_TOKEN")
    try:
        r = httpx.post(server.rstrip("/") + path, json=body, headers={"Authorization": f"Bearer {token}"},
                       timeout=10)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the daemon at {server}: {exc}") from None
    if r.status_code >= 400:
        raise click.ClickException(_answer_error(r))
    return r


def _daemon_name(owner: str | None) -> str:
    """The configured name of the daemon that claimed a run: "a" of "a@host:/data"."""
    return (owner or "").partition("@")[0] or "-"


@click.command("daemon")
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False),
              help="The daemon's YAML config.")
@click.option("--check", is_flag=True,
              help="Only check the config, its pipeline files and its secrets; start nothing. "
                   "Every problem as file:line:column; exit 0 or 2.")
def daemon(config_file: str, check: bool) -> None:
    """Serve webhooks, polls and schedules; run pipelines; keep their history.

    A commented example config: daemon.example.yaml; the guide: docs/daemon.md.
    SIGTERM stops it gracefully (running stages get grace_period seconds, then are cancelled;
    a second SIGTERM cancels them at once)."""
    from runner.daemon.config import check_config, describe_triggers, load_config
    from runner.daemon.service import Daemon, setup_logging

    if check:
        cfg, problems = check_config(config_file)
        for p in problems:
            click.echo(str(p), err=True)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            click.echo(f"{config_file}: {len(errors)} problem(s); the daemon would not start", err=True)
            sys.exit(EXIT_INVALID)
        names = ", ".join(p.name for p in cfg.pipelines) or "none"
        click.echo(f"{config_file}: ok ({len(cfg.pipelines)} pipeline(s): {names})")
        for p in cfg.pipelines:
            click.echo(f"  {p.name}: {describe_triggers(p)}")
        return
    setup_logging()
    try:
        d = Daemon(load_config(config_file))
        d.serve()
    except InvalidInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INVALID)


@click.command("runs")
@server_option
@token_option
@click.option("--pipeline", help="Only this pipeline.")
@click.option("--status", help="Only runs in this status (queued, running, success, failed, ...).")
@click.option("--branch", help="Only runs of this branch.")
@click.option("--limit", default=20, show_default=True)
@click.option("--deliveries", is_flag=True,
              help="List webhook deliveries instead, with what each one did and why.")
@click.option("--daemons", "daemons_", is_flag=True,
              help="List the daemons sharing the store instead: what each serves, when it was last seen.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def runs(server, token, pipeline, status, branch, limit, deliveries, daemons_, as_json) -> None:
    """List runs, newest first (or, with --deliveries, the webhook deliveries; with --daemons,
    the daemons sharing the queue)."""
    if daemons_:
        data = _get(server, "/api/daemons", token)
        if as_json:
            click.echo(json.dumps(data, indent=2))
            return
        data = inert_all(data)
        click.echo(f"{'DAEMON':<40} {'SLOTS':>5}  {'SEEN':<24} PIPELINES")
        for d in data["daemons"]:
            mark = " (this one)" if d["owner"] == data["this"] else ""
            click.echo(f"{d['owner'][:40]:<40} {d['concurrency']:>5}  {d['seen_at']:<24} "
                       f"{', '.join(d['pipelines'])}{mark}")
        return
    if deliveries:
        data = _get(server, "/api/deliveries", token, limit=limit)
        if as_json:
            click.echo(json.dumps(data, indent=2))
            return
        data = inert_all(data)
        click.echo(f"{'#':>6}  {'PROVIDER':<8} {'EVENT':<14} {'HTTP':<4} {'OUTCOME':<9} {'RUNS':<10} REASON")
        for d in data["deliveries"]:
            runs_ = ",".join(map(str, d["run_ids"]))
            click.echo(f"{d['id']:>6}  {d['provider']:<8} {(d['event'] or '')[:14]:<14} {d['status_code']:<4} "
                       f"{d['outcome']:<9} {runs_[:10]:<10} {d['reason'][:100]}")
        return
    data = _get(server, "/api/runs", token, pipeline=pipeline, status=status, branch=branch, limit=limit)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    data = inert_all(data, multiline_keys=("reason",))  # its first line is shown
    click.echo(f"{'ID':>6}  {'PIPELINE':<16} {'STATUS':<12} {'DAEMON':<12} {'TRIGGER':<8} {'REF':<24} "
               f"{'COMMIT':<10} CREATED")
    for r in data["runs"]:
        ref = r.get("branch") or r.get("tag") or r.get("ref") or ""
        note = f"  retry of #{r['retry_of']}" if r.get("retry_of") else ""
        click.echo(f"{r['id']:>6}  {r['pipeline']:<16} {r['status']:<12} {_daemon_name(r.get('daemon'))[:12]:<12} "
                   f"{r['trigger']:<8} {ref[:24]:<24} {(r.get('commit') or '')[:10]:<10} {r['created_at']}{note}")
        if r["status"] in ("failed", "invalid", "cancelled", "interrupted") and r.get("reason"):
            click.echo(f"        {r['reason'].splitlines()[0][:110]}")


@click.command("logs")
@click.argument("run_id", type=int)
@server_option
@token_option
@click.option("--stage", help="Only this stage's lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing lines until the run ends.")
def logs(run_id, server, token, stage, follow) -> None:
    """Print a run's log lines (masked as the run masked them)."""
    after = 0
    while True:
        data = _get(server, f"/api/runs/{run_id}/logs", token, stage=stage, after=after, limit=5000)
        for line in data["lines"]:
            click.echo(f"[{inert(line['stage'])}] {inert(line['line'])}")
        after = data["next"]
        if data["lines"]:
            continue
        if not follow or data["status"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    if follow:
        run = inert_all(_get(server, f"/api/runs/{run_id}", token), multiline_keys=("reason",))
        click.echo(f"run {run_id}: {run['status']}" + (f" ({run['reason']})" if run.get("reason") else ""),
                   err=True)
        if run["status"] != "success":
            sys.exit(EXIT_FAILED)


@click.command("cancel")
@click.argument("run_id", type=int)
@server_option
@token_option
def cancel(run_id, server, token) -> None:
    """Cancel a queued or running run."""
    body = _post(server, f"/api/runs/{run_id}/cancel", token, "cancelling").json()
    if body.get("cancelled"):
        click.echo(f"run {run_id}: cancel requested (was {body['was']})")
    else:
        click.echo(f"run {run_id} already ended ({body['was']}); nothing to cancel")


def _queued(run: dict, as_json: bool, data: dict) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    run = inert_all(run)
    ref = run.get("branch") or run.get("tag") or run.get("ref") or ""
    commit = f" at {run['commit'][:12]}" if run.get("commit") else ""
    again = f", retry of #{run['retry_of']}" if run.get("retry_of") else ""
    click.echo(f"queued run {run['id']} ({run['pipeline']} {ref}{commit}{again})")


@click.command("trigger")
@click.argument("pipeline")
@server_option
@token_option
@click.option("--ref", help="Branch (a short name or refs/heads/X) or tag (refs/tags/X). "
                            "Default: the pipeline's first literal push branch, else main.")
@click.option("--commit", help="The full commit sha to build (default: the ref's head, looked up as the run "
                               "is queued).")
@click.option("--var", "variables", multiple=True, metavar="K=V", help="A variable for the run (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def trigger(pipeline, server, token, ref, commit, variables, as_json) -> None:
    """Queue a run of PIPELINE by hand; prints the new run's id."""
    from runner.cli.common import parse_vars

    try:
        vars_ = parse_vars(variables)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="--var") from None
    body = {"ref": ref, "commit": commit, "vars": vars_ or None}
    # Quoted whole: a name with '/' or '?' must not reach another endpoint.
    data = _post(server, f"/api/pipelines/{urllib.parse.quote(pipeline, safe='')}/trigger", token, "triggering",
                 {k: v for k, v in body.items() if v is not None}).json()
    _queued(data["run"], as_json, data)


@click.command("retry")
@click.argument("run_id", type=int)
@server_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def retry(run_id, server, token, as_json) -> None:
    """Queue a run that ended again (same pipeline, ref, commit and vars); prints the new run's id."""
    data = _post(server, f"/api/runs/{run_id}/retry", token, "retrying").json()
    _queued(data["run"], as_json, data)
