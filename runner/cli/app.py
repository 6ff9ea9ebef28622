"""`runner app logs|exec|remove|maintenance|live PIPELINE`: the deployed app itself, on its
servers.

- logs: `docker container logs --tail N [--follow] <app>` on each server (or one), every line
  masked, prefixed with the server when there are several; `--role NAME` for another role's
  containers (`<app>-<role>`, on the servers that role runs on) than the primary one.
- exec: `docker exec <app> CMD...` on one server (or --all), its output as it comes, the
  command's exit status as ours; `--role` as for logs.
- remove: first says which named volumes and host directories of container.volumes stay;
  then for every role on every server it runs on, under the app's deploy lock (so never in the middle of a deploy): its
  proxy route (the proxy reloaded without it, so its hosts get the proxy's 404, not a 502),
  every container labelled runner.app=<app> (kept previous versions too, with their anonymous
  volumes; the named volumes and host directories they mount are said kept), every image of the
  app (of its release history, of those containers, and every one the runner pulled for it:
  failed and rolled-back releases too, deployers.pruning), the history dir (apps/<app>:
  history, the record of pulls, fingerprint key), a dead run's leftover env files and logins,
  and then the lock itself.
- maintenance / live (the proxy cutover only): on every server, under the proxy lock, the app's
  route switched to a 503 page with the message (deployers.proxy.maintenance_page), or back to
  the release it leads to; the containers are not touched. A deploy keeps maintenance on.

The pipeline is loaded, and its secrets read, as `runner exec` does; output passes the masker.
Commands are argv lists (deployers.commands), never shell lines.
Exit codes: 0 done; 1 a server failed or could not be reached (the message names it and says
why), or the removal was not confirmed; 2 bad input (unknown --server, no command, bad settings);
130 interrupted.
"""
from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click

from runner.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, Cancelled

from deployers import commands as cmd
from deployers import lock as locks
from deployers import pruning
from runner.cli.common import confirmed, destination_option
from runner.cli.on_servers import SERVER_HELP, Out, choose, each, proxied, role, session
from runner.pipeline_file import Load, load_file
from deployers.remote_files import remove_tree, sweep
from deployers.spec import Target
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_proxy import ProxyOps
from deployers.ssh_errors import TransportError

_SCRATCH = "--[0-9a-f]{32}"  # after the app name: a deploy's env file or login dir
_NEEDS_PROXY = ("needs the proxy cutover, whose route answers the 503 page while the containers "
                "run on")
_OLD_LOGIN = 3600.0  # seconds; a younger login dir may belong to a pull running right now
ROLE_HELP = "the role's containers (stages.deploy.roles); default: the primary role's"


def _why(exc: BaseException) -> str:
    if isinstance(exc, TransportError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _on(d: SSHDockerDeployer, fn: Callable[[Target], object], targets: list[Target],
        limit: int | None = None) -> tuple[list, bool]:
    """each() on the deployer's servers: Ctrl-C cancels every remote command of the deployer."""
    return each(d.cancel, fn, targets, lambda t: f"app-{t.label}", limit)


def _interrupted(d: SSHDockerDeployer) -> None:
    d.close()
    click.echo("interrupted", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _fail(server: str, exc: BaseException, masker) -> None:
    click.echo(masker.mask(f"{server}: FAILED: {_why(exc)}"), err=True)


def _logs_failed(server: str, app: str, status: int) -> None:
    click.echo(f"{server}: FAILED: `docker container logs {app}` exited with {status}",
               err=True)


# -------------------------------------------------------------------------------- remove

@dataclass
class _Removal:
    server: str
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    error: str = ""


def lasting_volumes(volumes: tuple[str, ...] | list[str]) -> list[str]:
    """Which of `container.volumes` (docker -v syntax) outlive the app's containers: named
    volumes and host directories (an anonymous volume, a container path alone, goes with its
    container). Pure."""
    out = []
    for v in volumes:
        source, sep, _ = v.partition(":")
        if not sep:
            continue
        what = (f"host directory {source}" if source.startswith(("/", ".", "~"))
                else f"volume {source}")
        if what not in out:
            out.append(what)
    return out


def _remove_on(d: SSHDockerDeployer, t: Target, res: _Removal, run_id: str) -> None:
    conn = d.connection(t)
    root = d.runner_dir(conn)
    app = d.app
    lock_root = d.lock_dir(conn)
    # d.key: the destination's own lock and history dir (deployers.spec.release_key).
    before = locks.inspect(conn, lock_root, d.key)
    ttl = d.stage.lock.ttl
    lease = locks.acquire(conn, lock_root, d.key, locks.holder_info(run_id, d.pipeline, ttl=ttl),
                          ttl=ttl, wait=d.stage.lock.wait, cancel=d.cancel, log=d.log)
    if before is not None and before.stale:
        res.removed.append(f"stale deploy lock of {locks.describe_holder(before.holder)}")
    try:  # lease.check(): stop at once if the lock was lost (another run may deploy now)
        history = d.history(conn)
        pulled = d.pulled_images(conn)
        containers = d.app_containers(conn)
        lease.check()
        # The route first: the proxy then answers its own 404 for the app's hosts, instead of
        # sending requests to containers that are going (a hang, then 502).
        route = ProxyOps(d).drop(conn, lambda argv, **kw: conn.run(argv, cancel=d.cancel, **kw),
                                 app)
        if route is not None:
            res.removed.append(f"proxy route (hosts {', '.join(route.hosts) or 'every host'}, "
                               f"path {route.path_prefix})")
        lease.check()
        if containers:
            # --volumes: their anonymous volumes too; named volumes and host directories stay.
            conn.run([cmd.DOCKER, "container", "rm", "--force", "--volumes",
                      *[c.id for c in containers]], check=True, cancel=d.cancel)
            res.removed += [f"container {c.name} ({c.id[:12]}, {c.status})" for c in containers]
            for what in dict.fromkeys(m for c in containers for m in c.lasting):
                res.kept.append(f"{what}: its data stays")
        refs = pruning.every_image(history=[h.get("ref") for h in history],
                                   containers=[c.image for c in containers], pulled=pulled)
        for ref in refs:
            lease.check()
            r = conn.run(cmd.remove_image(ref), check=False, cancel=d.cancel)
            if r.ok:
                res.removed.append(f"image {ref}")
            elif "no such image" not in r.output.lower():  # errors ignored, but said
                first = (r.output.splitlines() or ["?"])[0]
                res.kept.append(f"image {ref}: {first}")
        app_dir = f"{root}/apps/{d.key}"
        lease.check()
        if conn.sftp_do(lambda sftp: remove_tree(sftp, app_dir)):
            res.removed.append(f"release history and fingerprint key ({app_dir})")
        own = re.escape(app) + _SCRATCH
        for p in conn.sftp_do(lambda sftp: sweep(sftp, f"{root}/env", own + r"\.env")):
            res.removed.append(f"env file a dead run left ({p})")
        for p in conn.sftp_do(lambda sftp: sweep(sftp, f"{root}/auth", own, _OLD_LOGIN)):
            res.removed.append(f"registry login a dead run left ({p})")
    finally:
        lease.release()
    if locks.inspect(conn, lock_root, d.key) is not None:
        raise TransportError(t.label, f"the deploy lock {lock_root}/{d.key} could not be "
                                      f"removed; see `runner deploy-lock show`")


# ---------------------------------------------------------------------------- maintenance

def _switch_on(d: SSHDockerDeployer, t: Target, message: str | None) -> str:
    """Maintenance on (message) or off (None) on one server; what it did."""
    conn = d.connection(t)
    route, running = ProxyOps(d).set_maintenance(
        conn, lambda argv, **kw: conn.run(argv, cancel=d.cancel, **kw), d.app, message)
    if route is None:
        raise TransportError(t.label, f"{d.app} has no proxy route on {t.label} (not deployed "
                                      f"there through the proxy): nothing to switch")
    did = ("in maintenance: its hosts get the 503 page, its containers run on"
           if message is not None else
           f"live: the route leads to {route.digest[:19] or route.upstream} again")
    if not running:
        did += " (no proxy runs here now: it serves this once it starts; `runner proxy boot`)"
    return did


def _switch(d: SSHDockerDeployer, message: str | None, masker) -> None:
    """On every server; one line each; exit 1 naming the servers that failed and saying which
    are in maintenance now."""
    results, interrupted = _on(d, lambda t: _switch_on(d, t, message), list(d.targets),
                               d.stage.parallel)
    d.close()
    done, failed = [], []
    for t, r in zip(d.targets, results):
        if isinstance(r, BaseException):
            why = "interrupted" if isinstance(r, Cancelled) else _why(r)
            click.echo(masker.mask(f"{t.label}: FAILED: {why}"))
            failed.append(t.label)
        else:
            click.echo(masker.mask(f"{t.label}: {r}"))
            done.append(t.label)
    if interrupted:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if failed:
        state = "in maintenance" if message is not None else "live again"
        click.echo(f"{'maintenance' if message is not None else 'live'} of {d.app} failed on "
                   f"{', '.join(failed)}; {state} on {', '.join(done) or 'no server'}", err=True)
        sys.exit(EXIT_FAILED)


# -------------------------------------------------------------------------------- commands

def make_app(load: Load = load_file) -> click.Group:
    @click.group("app")
    def app() -> None:
        """The deployed app on its servers: its logs, a command inside it, removing it.

        Exit codes: 0 done, 1 a server failed or could not be reached (named, with why),
        2 bad input, 130 interrupted."""

    @app.command("logs")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--server", default=None, metavar="S", help=SERVER_HELP)
    @click.option("--lines", "-n", type=click.IntRange(min=0), default=100, show_default=True,
                  help="how many of the last lines to show, per server")
    @click.option("--follow", "-f", is_flag=True,
                  help="keep streaming new lines until Ctrl-C")
    @click.option("--role", "role_name", default=None, metavar="ROLE", help=ROLE_HELP)
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    def logs(pipeline_file: str, server: str | None, lines: int, follow: bool,
             role_name: str | None, var: tuple[str, ...]) -> None:
        """The app container's own output (stdout and stderr), from each server or one.

        Lines are prefixed with the server when there are several; secret values show as ***.
        With --follow, new lines show as they come (stderr's on stdout too) until Ctrl-C.
        """
        _, a, masker = session(pipeline_file, var, load, "app-logs")
        d, suffix = role(a, role_name)
        chosen = choose(d, server, suffix)
        out = Out(masker, len(chosen) > 1, max(len(t.label) for t in chosen))
        argv = [cmd.DOCKER, "container", "logs", "--tail", str(lines),
                *(["--follow"] if follow else []), d.app]

        limit = None if follow else d.stage.ssh.command_timeout
        said: set[str] = set()  # failures already shown (while following)

        def one(t: Target) -> tuple[int, list[tuple[str, bool]]]:
            got: list[tuple[str, bool]] = []

            def on_line(text: str, err: bool) -> None:
                if follow:  # live, as it comes; otherwise in server order at the end
                    out.line(t.label, text, err)
                else:
                    got.append((text, err))
            try:
                status = d.connection(t).stream(argv, on_line, cancel=d.cancel,
                                                timeout=limit,
                                                pty=follow)  # follow: hung up on Ctrl-C
            except Exception as exc:
                if follow and not d.cancel.is_set():  # at once: the others go on streaming
                    _fail(t.label, exc, masker)
                    said.add(t.label)
                raise
            if follow and status != 0:
                _logs_failed(t.label, d.app, status)
                said.add(t.label)
            return status, got

        results, interrupted = _on(d, one, chosen, None if follow else d.stage.parallel)
        if interrupted:
            _interrupted(d)
        d.close()
        failed = False
        for t, r in zip(chosen, results):
            if isinstance(r, BaseException):
                failed = True
                if t.label not in said:
                    _fail(t.label, r, masker)
                continue
            status, got = r
            for text, err in got:
                out.line(t.label, text, err)
            if status != 0:
                failed = True
                if t.label not in said:
                    _logs_failed(t.label, d.app, status)
        if failed:
            sys.exit(EXIT_FAILED)

    @app.command("exec")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.argument("command", nargs=-1, type=click.UNPROCESSED)
    @click.option("--server", default=None, metavar="S", help=SERVER_HELP)
    @click.option("--all", "all_", is_flag=True, help="on every server, each line prefixed "
                  "with the server's name")
    @click.option("--role", "role_name", default=None, metavar="ROLE", help=ROLE_HELP)
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    def exec_(pipeline_file: str, command: tuple[str, ...], server: str | None, all_: bool,
              role_name: str | None, var: tuple[str, ...]) -> None:
        """Run a command in the app's running container: `docker exec <app> CMD...`.

        Give the command after `--`: runner app exec pipeline.yaml --server web1 -- ls -la /app.
        With several servers, say which (--server) or --all. Its output shows as it comes
        (secret values as ***); the exit status is the command's (with --all, the first
        server's that failed), 1 if a server could not be reached."""
        if not command:
            click.echo("no command: give it after `--`, e.g. runner app exec PIPELINE -- ls",
                       err=True)
            sys.exit(EXIT_INVALID)
        if all_ and server is not None:
            click.echo("give --server or --all, not both", err=True)
            sys.exit(EXIT_INVALID)
        _, a, masker = session(pipeline_file, var, load, "app-exec")
        d, suffix = role(a, role_name)
        chosen = choose(d, server, suffix)
        if len(chosen) > 1 and not all_:
            d.close()
            click.echo(f"this pipeline deploys to {len(chosen)} servers "
                       f"({', '.join(t.label for t in chosen)}): say which with --server, "
                       f"or --all", err=True)
            sys.exit(EXIT_INVALID)
        out = Out(masker, len(chosen) > 1, max(len(t.label) for t in chosen))
        argv = cmd.exec_(d.app, list(command))

        def one(t: Target) -> int:
            return d.connection(t).stream(argv, lambda text, err: out.line(t.label, text, err),
                                          cancel=d.cancel, timeout=d.stage.ssh.command_timeout)

        results, interrupted = _on(d, one, chosen, d.stage.parallel)
        if interrupted:
            _interrupted(d)
        d.close()
        code = 0
        unreachable = False
        for t, r in zip(chosen, results):
            if isinstance(r, BaseException):
                _fail(t.label, r, masker)
                unreachable = True
            elif r != 0:
                if len(chosen) > 1:
                    click.echo(f"{t.label}: exited with {r}", err=True)
                code = code or (r if 0 < r < 256 else EXIT_FAILED)
        sys.exit(EXIT_FAILED if unreachable else code)

    @app.command("remove")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    def remove(pipeline_file: str, yes: bool, var: tuple[str, ...]) -> None:
        """Remove the app from every server: its proxy route, all its containers (every
        role's, kept previous versions too, with their anonymous volumes), every image the runner pulled
        for it (failed releases too), its release history, its record of pulls and its deploy
        lock. Named volumes and host directories stay, and are named before anything is done.

        Asks first unless --yes (an answer other than yes removes nothing and exits 1). Waits
        for a deploy in progress to end (stages.deploy.lock.wait). Says what it removed (and
        kept) on each server; exits 1 naming every server it could not reach or finish on."""
        _, a, masker = session(pipeline_file, var, load, "app-remove")
        servers = ", ".join(t.label for t in a.targets)
        lasting = lasting_volumes([v for r in a.roles for v in r.stage.container.volumes])
        roles = "" if len(a.roles) == 1 else \
            f" (roles {', '.join(r.name for r in a.roles)}: containers " \
            f"{', '.join(r.container for r in a.roles)})"
        click.echo(masker.mask(f"{a.app} keeps its data in {', '.join(lasting)}: these stay"
                               if lasting else f"{a.app} mounts no named volume or host "
                                               f"directory (this pipeline's container.volumes)"))
        if not yes:
            if not confirmed(f"Remove {a.app}{roles} from {servers}: its proxy route, "
                             f"containers, images, release history and deploy lock?"):
                a.close()
                click.echo("nothing removed", err=True)
                sys.exit(EXIT_FAILED)
        run_id = f"app-remove-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        # Every role on every server it runs on, each under its own lock (as its deploys).
        units = [(a.by_role[r.name], t) for r in a.roles for t in a.by_role[r.name].targets]
        rows = {t.label: _Removal(t.label) for _, t in units}
        results, interrupted = each(
            a.cancel, lambda u: _remove_on(u[0], u[1], rows[u[1].label], run_id), units,
            lambda u: f"app-{u[1].label}", a.stage.parallel)
        a.close()
        failed = []
        for (d, t), r in zip(units, results):
            row = rows[t.label]
            if isinstance(r, BaseException):
                row.error = _why(r)
                if isinstance(r, Cancelled):
                    row.error = "interrupted"
            head = f"{t.label}:"
            if not row.removed and not row.kept and not row.error:
                head += f" nothing of {d.app} was there"
            click.echo(masker.mask(head))
            for what in row.removed:
                click.echo(masker.mask(f"  removed {what}"))
            for what in row.kept:
                click.echo(masker.mask(f"  kept {what}"))
            if row.error:
                click.echo(masker.mask(f"  FAILED: {row.error}"))
                failed.append(t.label)
        if interrupted:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if failed:
            click.echo(f"remove of {a.app} failed on {', '.join(failed)}", err=True)
            sys.exit(EXIT_FAILED)

    @app.command("maintenance")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--message", "-m", default="", metavar="M",
                  help="the text of the 503 page (HTML-escaped); a default one if not given")
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    def maintenance(pipeline_file: str, message: str, var: tuple[str, ...]) -> None:
        """Put the app in maintenance (the proxy cutover only): on every server its route
        answers 503 with a small page holding the message, and Retry-After, without stopping
        or touching its containers. Lasts through deploys and rollbacks until `runner app
        live`. Exits 1 naming the servers it could not switch (the others are switched, and
        said so)."""
        _, a, masker = session(pipeline_file, var, load, "app-maintenance")
        d = a.primary  # the role behind the proxy
        proxied(pipeline_file, d, "runner app maintenance", _NEEDS_PROXY)
        _switch(d, message, masker)

    @app.command("live")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    def live(pipeline_file: str, var: tuple[str, ...]) -> None:
        """End maintenance: on every server the app's route leads to its running release again.
        Exits 1 naming the servers it could not switch."""
        _, a, masker = session(pipeline_file, var, load, "app-live")
        d = a.primary
        proxied(pipeline_file, d, "runner app live", _NEEDS_PROXY)
        _switch(d, None, masker)

    return app


app = make_app()
