"""`runner proxy boot|reboot|status|logs PIPELINE`: the Caddy proxy of the zero-downtime cutover
(deployers.proxy, deployers.ssh_proxy) on each server, for a pipeline with `stages.deploy.proxy`.

- boot: the runner's docker network and a running proxy (the pipeline's proxy.image and ports)
  on each server, serving every app's routes as last loaded. Idempotent: says per server what
  it did ("already running", "proxy started (...)", "network created, ...").
- reboot: replaces the proxy container (after a new proxy.image, other ports), one server at a
  time, under the server's proxy lock, as deployers.proxy_reboot does it; prints how long
  traffic was down on each.
- status: per server, the proxy container's state, image and published ports, and every app's
  route (app, hosts, path prefix, upstream, the digest it serves, whether it is in
  maintenance). Exit 1 if a server cannot be asked or its proxy does not run.
- logs: the proxy container's last lines (`docker container logs --tail N runner-proxy`).

Booting and replacing the proxy is deployers.proxy_reboot's; this module parses the arguments and
prints. Output passes the pipeline's masker.
Exit codes: 0 done; 1 a server failed (named, with why); 2 bad input (no `proxy:` section,
unknown --server, bad settings); 130 interrupted.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click

from runner.errors import EXIT_FAILED, EXIT_INTERRUPTED, Cancelled

from deployers import commands as cmd
from runner.cli.common import destination_option
from runner.cli.on_servers import SERVER_HELP, Out, choose, each, proxied, session
from deployers.base import StepFailed
from runner.pipeline_file import Load, load_file
from deployers.proxy import PROXY_CONTAINER, published
from deployers.proxy_reboot import ProxyChange, ProxyContainer, image_note
from deployers.spec import Target
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_proxy import ProxyOps
from deployers.ssh_errors import TransportError


def _why(exc: BaseException) -> str:
    if isinstance(exc, Cancelled):
        return "interrupted"
    if isinstance(exc, (StepFailed, TransportError)):
        return exc.reason
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _session(path: str, var: tuple[str, ...], load: Load, what: str
             ) -> tuple[SSHDockerDeployer, object]:
    """(deployer, masker); exit 2 for a pipeline without `proxy:` or settings that cannot
    work."""
    run_id = f"proxy-{what}-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    _, app, masker = session(path, var, load, run_id)
    d = app.primary  # the role behind the proxy
    proxied(path, d, f"runner proxy {what}", "is only for the proxy cutover")
    return d, masker


def _on(d: SSHDockerDeployer, fn: Callable[[Target], object], targets: list[Target],
        limit: int | None) -> tuple[list, bool]:
    """each() on the deployer's servers: Ctrl-C cancels every remote command of the deployer."""
    return each(d.cancel, fn, targets, lambda t: f"proxy-{t.label}", limit)


def _stopped(d: SSHDockerDeployer) -> None:
    if d.cancel.is_set():
        raise Cancelled("interrupted")


@dataclass
class _Row:
    server: str
    ok: bool = False
    error: str = ""
    change: ProxyChange = field(default_factory=ProxyChange)

    def to_dict(self, reboot: bool = False) -> dict:
        c = self.change
        out = {"server": self.server, "ok": self.ok, "did": c.did, "notes": c.notes,
               "error": self.error}
        if reboot:
            out["down_seconds"] = None if c.down is None else round(c.down, 3)
        return out


# ---------------------------------------------------------------------------------- status

def _status_on(d: SSHDockerDeployer, ops: ProxyOps, t: Target) -> dict:
    conn = d.connection(t)
    st = d.inspect(conn, PROXY_CONTAINER)
    routes = sorted(ops.routes(conn).values(), key=lambda r: r.app)
    want = list(published(d.stage.proxy))
    notes = []
    if st is not None:
        missing = [w for w in want if w not in st.published]
        if missing:
            notes.append(f"this pipeline wants {', '.join(want)} published: `runner proxy "
                         f"reboot` replaces it")
        note = image_note(d.stage.proxy.image, st.image)
        if note:
            notes.append(note)
    return {"server": t.label,
            "state": st.status if st else "absent",
            "running": bool(st and st.running),
            "image": st.image if st else "",
            "published": list(st.published) if st else [],
            "started_at": st.started_at if st else "",
            "restart_count": st.restart_count if st else 0,
            "wants": want,
            "routes": [{"app": r.app, "hosts": list(r.hosts), "path_prefix": r.path_prefix,
                        "upstream": r.upstream, "digest": r.digest, "container": r.container,
                        "tls": r.tls, "maintenance": r.maintenance, "message": r.message}
                       for r in routes],
            "notes": notes, "error": ""}


def _print_status(row: dict, masker) -> None:
    echo = lambda s: click.echo(masker.mask(s))  # noqa: E731
    if row["error"]:
        echo(f"{row['server']}: error: {row['error']}")
        return
    if row["state"] == "absent":
        echo(f"{row['server']}: no proxy (`runner proxy boot` starts one)")
    else:
        since = f" since {row['started_at'][:19]}" if row["running"] else ""
        restarts = f", restarted {row['restart_count']}x" if row["restart_count"] else ""
        echo(f"{row['server']}: proxy {row['state']}{since}{restarts}, image {row['image']}, "
             f"publishes {', '.join(row['published']) or 'nothing'}")
    for n in row["notes"]:
        echo(f"  note: {n}")
    if not row["routes"]:
        echo("  no app is routed")
        return
    width = max(len(r["app"]) for r in row["routes"])
    for r in row["routes"]:
        echo(f"  {r['app']:<{width}}  hosts {','.join(r['hosts']) or '*'}  path "
             f"{r['path_prefix']}  -> {r['upstream']}  {r['digest'][:19] or '-'}"
             f"{'  tls' if r['tls'] else ''}"
             f"{'  MAINTENANCE (503 page; `runner app live` ends it)' if r['maintenance'] else ''}")


# -------------------------------------------------------------------------------- commands

def _report(rows: list[_Row], chosen: list[Target], results: list, as_json: bool,
            reboot: bool, masker) -> list[str]:
    """Print one line per server (or JSON); the servers that failed."""
    failed = []
    for t, r, row in zip(chosen, results, rows):
        row.ok = not isinstance(r, BaseException)
        if not row.ok:
            row.error = _why(r)
            failed.append(t.label)
    if as_json:
        click.echo(masker.mask(json.dumps([r.to_dict(reboot) for r in rows])))
        return failed
    for row in rows:
        down = row.change.down
        if row.ok:
            line = f"{row.server}: {row.change.did}"
            if down is not None:
                line += f"; traffic was down for {down:.2f}s"
        elif row.error == "interrupted":
            line = f"{row.server}: interrupted"
        else:
            line = f"{row.server}: FAILED: {row.error}"
            if down is not None:
                line += f" (traffic was down for {down:.2f}s)"
        click.echo(masker.mask(line))
        for n in row.change.notes:
            click.echo(masker.mask(f"  note: {n}"))
    return failed


def _end(what: str, failed: list[str], interrupted: bool) -> None:
    if interrupted:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if failed:
        click.echo(f"proxy {what} failed on {', '.join(failed)}", err=True)
        sys.exit(EXIT_FAILED)


def make_proxy(load: Load = load_file) -> click.Group:
    @click.group("proxy")
    def proxy() -> None:
        """The proxy of the zero-downtime cutover on each server (pipelines with
        stages.deploy.proxy): boot it, replace it, see what it routes, read its logs.

        Exit codes: 0 done, 1 a server failed (named, with why), 2 bad input (no `proxy:`
        section, unknown --server), 130 interrupted."""

    server_opt = click.option("--server", default=None, metavar="S", help=SERVER_HELP)
    def var_opt(fn):  # --var, and -d for a pipeline with destinations
        return destination_option(click.option("--var", multiple=True, metavar="K=V",
                                               help="pipeline variable")(fn))
    json_opt = click.option("--json", "as_json", is_flag=True, help="print JSON: one object "
                                                                     "per server")

    @proxy.command("boot")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @server_opt
    @var_opt
    @json_opt
    def boot(pipeline_file: str, server: str | None, var: tuple[str, ...],
             as_json: bool) -> None:
        """Make sure the runner's network exists and the proxy runs (proxy.image, publishing
        proxy.http_port) on every server, serving every app's routes. Idempotent: a running
        proxy is left alone ("already running")."""
        d, masker = _session(pipeline_file, var, load, "boot")
        chosen = choose(d, server)
        proxies = ProxyContainer(d)
        rows = [_Row(t.label) for t in chosen]
        results, interrupted = _on(d, lambda t: proxies.boot(t, rows[chosen.index(t)].change),
                                   chosen, d.stage.parallel)
        d.close()
        _end("boot", _report(rows, chosen, results, as_json, False, masker), interrupted)

    @proxy.command("reboot")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @server_opt
    @var_opt
    @json_opt
    def reboot(pipeline_file: str, server: str | None, var: tuple[str, ...],
               as_json: bool) -> None:
        """Replace the proxy container (after a new proxy.image or other ports), one server
        at a time, under the server's proxy lock: the image is pulled first, the old proxy
        stops, the new one boots with every app's routes, and the old one is removed once the
        new one answers (started again if the new one does not come up). Traffic stops for a
        moment: how long is printed per server."""
        d, masker = _session(pipeline_file, var, load, "reboot")
        chosen = choose(d, server)
        proxies = ProxyContainer(d)
        rows = [_Row(t.label) for t in chosen]
        results, interrupted = _on(d, lambda t: proxies.reboot(t, rows[chosen.index(t)].change),
                                   chosen, 1)
        d.close()
        _end("reboot", _report(rows, chosen, results, as_json, True, masker), interrupted)

    @proxy.command("status")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @server_opt
    @var_opt
    @json_opt
    def status(pipeline_file: str, server: str | None, var: tuple[str, ...],
               as_json: bool) -> None:
        """Per server: the proxy container's state, image and published ports, and every
        app's route (hosts, path prefix, upstream, the digest it serves). Exits 1 when a
        server cannot be asked or its proxy does not run."""
        d, masker = _session(pipeline_file, var, load, "status")
        chosen = choose(d, server)
        ops = ProxyOps(d)
        results, interrupted = _on(d, lambda t: _status_on(d, ops, t), chosen,
                                   d.stage.parallel)
        d.close()
        if interrupted:
            _end("status", [], True)
        rows = [r if isinstance(r, dict) else
                {"server": t.label, "state": "error", "running": False, "image": "",
                 "published": [], "started_at": "", "restart_count": 0, "wants": [],
                 "routes": [], "notes": [], "error": _why(r)}
                for t, r in zip(chosen, results)]
        if as_json:
            click.echo(masker.mask(json.dumps(rows)))
        else:
            for row in rows:
                _print_status(row, masker)
        bad = [r["server"] for r in rows if r["error"] or not r["running"]]
        if bad:
            click.echo(f"the proxy does not run or cannot be asked on {', '.join(bad)}",
                       err=True)
            sys.exit(EXIT_FAILED)

    @proxy.command("logs")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @server_opt
    @click.option("--lines", "-n", type=click.IntRange(min=0), default=100, show_default=True,
                  help="how many of the last lines to show, per server")
    @var_opt
    @click.option("--json", "as_json", is_flag=True,
                  help="print JSON: one object per server, with its lines")
    def logs(pipeline_file: str, server: str | None, lines: int, var: tuple[str, ...],
             as_json: bool) -> None:
        """The proxy container's own output (Caddy's log lines, which it writes to stderr,
        shown on stdout), from each server or one, prefixed with the server when there are
        several; secret values show as ***."""
        d, masker = _session(pipeline_file, var, load, "logs")
        chosen = choose(d, server)
        argv = cmd.logs(PROXY_CONTAINER, lines)

        def one(t: Target) -> tuple[int, list[tuple[str, bool]]]:
            _stopped(d)
            got: list[tuple[str, bool]] = []
            status = d.connection(t).stream(argv, lambda text, err: got.append((text, err)),
                                            cancel=d.cancel, timeout=d.stage.ssh.command_timeout)
            return status, got

        results, interrupted = _on(d, one, chosen, d.stage.parallel)
        d.close()
        if interrupted:
            _end("logs", [], True)
        out = Out(masker, len(chosen) > 1, max(len(t.label) for t in chosen))
        failed, rows = [], []
        for t, r in zip(chosen, results):
            error, got = "", []
            if isinstance(r, BaseException):
                error = _why(r)
            else:
                status, got = r
                if status != 0:
                    text = " ".join(line for line, _ in got[-3:])
                    error = (f"`docker container logs {PROXY_CONTAINER}` exited with {status}"
                             + (f": {text}" if text else ""))
                    got = []
            if error:
                failed.append(t.label)
            rows.append({"server": t.label, "lines": [masker.mask(s) for s, _ in got],
                         "error": masker.mask(error)})
            if not as_json:
                for text, _ in got:  # Caddy logs to stderr: all of it is the output here
                    out.line(t.label, text)
                if error:
                    click.echo(masker.mask(f"{t.label}: FAILED: {error}"), err=True)
        if as_json:
            click.echo(json.dumps(rows))
        _end("logs", failed, False)

    return proxy


proxy = make_proxy()
