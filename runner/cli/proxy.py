"""`runner proxy boot|reboot|status|logs PIPELINE`: the Caddy proxy of the zero-downtime cutover
(deployers.proxy, deployers.ssh_proxy) on each server, for a pipeline with `stages.deploy.proxy`.

- boot: the runner's docker network and a running proxy (the pipeline's proxy.image and ports)
  on each server, serving every app's routes as last loaded. Idempotent: says per server what
  it did ("already running", "proxy started (...)", "network created, ...").
- reboot: replaces the proxy container (after a new proxy.image, other ports), one server at a
  time, under the server's proxy lock. The image is pulled and the network made first; then the
  old container is set aside and stopped, the new one booted with the planned argv, and the
  old one removed once the new one answers. If the new one does not come up, the old one is
  started again. The time traffic was down (from the stop of the old proxy to the first HTTP
  answer of the new one, polled from the server like ProxyOps.wait_ready) is printed.
- status: per server, the proxy container's state, image and published ports, and every app's
  route (app, hosts, path prefix, upstream, the digest it serves, whether it is in
  maintenance). Exit 1 if a server cannot be asked or its proxy does not run.
- logs: the proxy container's last lines (`docker container logs --tail N runner-proxy`).

The docker commands are argv lists (the plan's own `proxy_boot` and `network` commands, the
builders of deployers.commands); output passes the pipeline's masker.
Exit codes: 0 done; 1 a server failed (named, with why); 2 bad input (no `proxy:` section,
unknown --server, bad settings); 130 interrupted.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import paramiko

from runner.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, Cancelled

from deployers import commands as cmd
from deployers import lock as locks
from runner.cli.common import destination_option
from runner.cli.app import SERVER_HELP, _choose, _each, _Out
from runner.cli.app import _session as app_session
from deployers.base import StepFailed
from runner.pipeline_file import Load, load_file
from deployers.proxy import PROXY_CONTAINER, published
from deployers.spec import Target
from deployers.ssh_docker import SSHDockerDeployer
from deployers.ssh_proxy import PROXY_LOCK, ProxyOps
from deployers.http_over_ssh import http_get
from deployers.ssh_connection import Connection
from deployers.ssh_errors import TransportError

ASIDE = f"{PROXY_CONTAINER}-replaced"  # the old proxy during a reboot, until the new one answers
PROBE_HOST = "runner-proxy.invalid"  # any HTTP answer will do (the proxy's own 404 is one)
STOP_TIMEOUT = 5  # seconds Caddy gets to finish in-flight requests when it is replaced
LOCK_TTL, LOCK_WAIT = 30, 60


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
    _, d, masker = app_session(path, var, load, run_id)
    if d.stage.proxy is None:
        d.close()
        click.echo(f"{path}: stages.deploy has no `proxy:` section (this pipeline deploys "
                   f"stop-start, without a proxy): `runner proxy {what}` is only for the "
                   f"proxy cutover", err=True)
        sys.exit(EXIT_INVALID)
    return d, masker


def _runner(conn: Connection, cancel: threading.Event | None) -> Callable:
    """conn.run in the shape ProxyOps takes; cancel None: not cut short by Ctrl-C."""
    def run(argv, *, check: bool = False, stdin: bytes | None = None,
            timeout: float | None = None):
        return conn.run(argv, stdin=stdin, check=check, timeout=timeout, cancel=cancel)
    return run


def _lease(d: SSHDockerDeployer, conn: Connection) -> locks.Lease:
    holder = locks.holder_info(d.run_id, d.pipeline, ttl=LOCK_TTL)
    return locks.acquire(conn, f"{d.runner_dir(conn)}/locks", PROXY_LOCK, holder, ttl=LOCK_TTL,
                         wait=LOCK_WAIT, cancel=d.cancel, log=d.log)


def _planned(d: SSHDockerDeployer, conn: Connection, plan, t: Target
             ) -> tuple[list[str], list[str]]:
    """The plan's own `proxy_boot` and `network` argv for this server."""
    sp = plan.server(t.label)
    return sp.argv("proxy_boot", {cmd.PROXY_DIR: d.runner_dir(conn)}), sp.argv("network")


def _image_note(d: SSHDockerDeployer, image: str) -> str:
    want = d.stage.proxy.image
    return "" if image == want else (f"it runs {image or '?'}, this pipeline says {want}: "
                                     f"`runner proxy reboot` replaces it")


def _stopped(d: SSHDockerDeployer) -> None:
    if d.cancel.is_set():
        raise Cancelled("interrupted")


@dataclass
class _Row:
    server: str
    ok: bool = False
    did: str = ""
    error: str = ""
    down: float | None = None  # reboot: seconds without an answer; None when not measured
    notes: list[str] = field(default_factory=list)

    def to_dict(self, reboot: bool = False) -> dict:
        out = {"server": self.server, "ok": self.ok, "did": self.did, "notes": self.notes,
               "error": self.error}
        if reboot:
            out["down_seconds"] = None if self.down is None else round(self.down, 3)
        return out


# ------------------------------------------------------------------------------------ boot

def _boot_on(d: SSHDockerDeployer, ops: ProxyOps, plan, t: Target, row: _Row) -> None:
    _stopped(d)
    conn = d.connection(t)
    boot, network = _planned(d, conn, plan, t)
    run = _runner(conn, d.cancel)
    lease = _lease(d, conn)
    try:
        if d.inspect(conn, ASIDE, run) is not None:  # what an interrupted reboot left
            run(cmd.remove(ASIDE), check=True)
            row.notes.append(f"removed {ASIDE}, the old proxy an interrupted reboot left")
        did = ops.ensure(conn, run, boot, network)
    finally:
        lease.release()
    st = d.inspect(conn, PROXY_CONTAINER, run)
    n = len(ops.routes(conn))
    row.did = f"{did or 'already running'}; serving {n} route{'' if n == 1 else 's'}"
    note = _image_note(d, st.image if st else "")
    if note:
        row.notes.append(note)
    row.ok = True


# ---------------------------------------------------------------------------------- reboot

class _FirstAnswer(threading.Thread):
    """Polls the proxy's HTTP port from the server until it answers; `at` is when."""

    def __init__(self, conn: Connection, port: int):
        super().__init__(daemon=True, name=f"proxy-answer-{conn.label}")
        self.conn, self.port = conn, port
        self.at: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                raw = http_get(self.conn, "127.0.0.1", self.port, "/", 2,
                               host_header=PROBE_HOST)
                if raw.startswith(b"HTTP/"):
                    self.at = time.monotonic()
                    return
            except (OSError, EOFError, paramiko.SSHException, TransportError):
                if not self.conn.alive:
                    return
            self.halt.wait(0.02)


def _no_restart(name: str, policy: str = "no") -> list[str]:
    return [cmd.DOCKER, "container", "update", "--restart", policy, name]


def _reboot_on(d: SSHDockerDeployer, ops: ProxyOps, plan, t: Target, row: _Row) -> None:
    _stopped(d)
    p = d.stage.proxy
    conn = d.connection(t)
    boot, network = _planned(d, conn, plan, t)
    run = _runner(conn, d.cancel)
    lease = _lease(d, conn)
    try:
        # Everything that can be done while the old proxy still serves: the network, the new
        # image, no leftover of an interrupted reboot.
        if not run(cmd.network_inspect()).ok:
            r = run(network)
            if not r.ok and "already exists" not in r.output:
                raise StepFailed(t.label, f"cannot create the runner's network: "
                                          f"{r.output[-300:]}")
        if not run(cmd.image_present(p.image)).ok:
            d.log(f"{t.label}: pulling {p.image}")
            r = run(cmd.pull(p.image), timeout=600)
            if not r.ok:
                raise StepFailed(t.label, f"cannot pull the proxy image {p.image}: "
                                          f"{' '.join(r.output.splitlines()[-3:])}; the old "
                                          f"proxy was not touched")
        if d.inspect(conn, ASIDE, run) is not None:
            run(cmd.remove(ASIDE), check=True)
        old = d.inspect(conn, PROXY_CONTAINER, run)
        if old is None:
            did = ops.ensure(conn, run, boot, network)
            row.did = f"no proxy was there: {did}"
            row.ok = True
            return
        _stopped(d)
        # From here on Ctrl-C does not cut it short: a server is never left without a proxy.
        safe = _runner(conn, None)
        safe(cmd.rename(PROXY_CONTAINER, ASIDE), check=True)
        poll = _FirstAnswer(conn, p.http_port)
        t0, stopped = time.monotonic(), False
        try:
            safe(_no_restart(ASIDE), check=True)
            t0 = time.monotonic()
            if old.running:
                safe(cmd.stop(ASIDE, STOP_TIMEOUT), check=True, timeout=STOP_TIMEOUT + 60)
                stopped = True
                d.log(f"{t.label}: the old proxy stopped ({time.monotonic() - t0:.2f}s)")
                poll.start()
            ops.ensure(conn, safe, boot, network)
        except (StepFailed, TransportError, OSError, EOFError, paramiko.SSHException) as exc:
            poll.halt.set()
            back = _put_back(d, ops, conn, old.running)
            if stopped:
                row.down = time.monotonic() - t0
            raise StepFailed(t.label, f"{_why(exc)}; {back}") from None
        ready = time.monotonic()
        if old.running:
            poll.join(5)
            poll.halt.set()
            row.down = (poll.at or ready) - t0
        safe(cmd.remove(ASIDE), check=False)
        st = d.inspect(conn, PROXY_CONTAINER, safe)
        n = len(ops.routes(conn))
        row.did = (f"replaced the proxy ({old.image} -> {st.image if st else p.image}, "
                   f"publishes {', '.join(st.published if st else published(p))}); serving "
                   f"{n} route{'' if n == 1 else 's'}")
        if not old.running:
            row.notes.append(f"the old proxy was not running ({old.status}): traffic was "
                             f"down before")
        row.ok = True
    finally:
        lease.release()


def _put_back(d: SSHDockerDeployer, ops: ProxyOps, conn: Connection, was_running: bool
              ) -> str:
    """The new proxy did not come up: the old one back in its place."""
    safe = _runner(conn, None)
    try:
        safe(cmd.remove(PROXY_CONTAINER), check=False)
        safe(cmd.rename(ASIDE, PROXY_CONTAINER), check=True)
        safe(_no_restart(PROXY_CONTAINER, "always"), check=True)
        if not was_running:
            return "the old proxy is back in place (stopped, as it was)"
        safe(cmd.start(PROXY_CONTAINER), check=True)
        ops.wait_ready(conn)
        return "the old proxy runs again"
    except (StepFailed, TransportError, OSError, EOFError, paramiko.SSHException) as exc:
        return (f"the old proxy could not be put back ({_why(exc)}): it is kept as {ASIDE}; "
                f"`runner proxy boot` starts a new one")


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
        note = _image_note(d, st.image)
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
        if isinstance(r, BaseException):
            row.ok, row.error = False, _why(r)
        if not row.ok:
            failed.append(t.label)
    if as_json:
        click.echo(masker.mask(json.dumps([r.to_dict(reboot) for r in rows])))
        return failed
    for row in rows:
        if row.ok:
            line = f"{row.server}: {row.did}"
            if row.down is not None:
                line += f"; traffic was down for {row.down:.2f}s"
        elif row.error == "interrupted":
            line = f"{row.server}: interrupted"
        else:
            line = f"{row.server}: FAILED: {row.error}"
            if row.down is not None:
                line += f" (traffic was down for {row.down:.2f}s)"
        click.echo(masker.mask(line))
        for n in row.notes:
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
        chosen = _choose(d, server)
        plan, ops = d.plan(), ProxyOps(d)
        rows = [_Row(t.label) for t in chosen]
        results, interrupted = _each(d, lambda t: _boot_on(d, ops, plan, t,
                                                           rows[chosen.index(t)]),
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
        chosen = _choose(d, server)
        plan, ops = d.plan(), ProxyOps(d)
        rows = [_Row(t.label) for t in chosen]
        results, interrupted = _each(d, lambda t: _reboot_on(d, ops, plan, t,
                                                             rows[chosen.index(t)]),
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
        chosen = _choose(d, server)
        ops = ProxyOps(d)
        results, interrupted = _each(d, lambda t: _status_on(d, ops, t), chosen,
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
        chosen = _choose(d, server)
        argv = cmd.logs(PROXY_CONTAINER, lines)

        def one(t: Target) -> tuple[int, list[tuple[str, bool]]]:
            _stopped(d)
            got: list[tuple[str, bool]] = []
            status = d.connection(t).stream(argv, lambda text, err: got.append((text, err)),
                                       cancel=d.cancel, timeout=d.stage.ssh.command_timeout)
            return status, got

        results, interrupted = _each(d, one, chosen, d.stage.parallel)
        d.close()
        if interrupted:
            _end("logs", [], True)
        out = _Out(masker, len(chosen) > 1, max(len(t.label) for t in chosen))
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
