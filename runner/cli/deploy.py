"""`runner rollback`, `runner status`, `runner releases`, `runner deploy-lock` and
`runner ssh-trust`: the deploy's own commands.

Each opens the pipeline file with its secrets (runner.cli.common.open_or_exit, with the
`load(path, vars)` passed to `make_commands`, default the file itself) and drives the deployer.
Exit codes: 0 done, 1 the deploy/rollback failed (the message says where and why), 2 bad input,
130 a rollback interrupted (SIGINT or SIGTERM: it stops at its next step and puts back what it
had switched).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import click

from runner.cli.common import destination_option, open_or_exit
from runner.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, Cancelled, InvalidInput
from runner.pipeline_file import Load, load_file
from runner.secrets import Masker
from runner.signals import STOP_SIGNALS, StopSignals

from deployers import history as hist
from deployers.accessory_plan import accessory_specs, needed_on
from deployers.base import DeployFailed, ServerStatus
from deployers.app_deployer import AppDeployer
from deployers.ssh_docker import ConfigError, SSHDockerDeployer
from deployers.ssh_errors import TransportError

def _open(path: str, var: tuple[str, ...], load: Load, run_id: str,
          echo: Callable[[str], None], defer_unreadable: bool = False):
    """(pipeline, deployer, masker) or exit 2 with the problems. `defer_unreadable`: for a
    command that looks at what runs or acts on it (logs, exec, status): a secret that cannot
    be read stops it only if it uses it (the SSH connection's are checked here, before
    anything), so an unrelated unreadable secret does not."""
    opened = open_or_exit(path, var, load, defer_unreadable=defer_unreadable)
    pipeline, masker, store = opened.pipeline, opened.masker, opened.secrets
    if not pipeline.stages.deploy.servers:
        click.echo(f"{path}: stages.deploy.servers is empty: nothing to do", err=True)
        sys.exit(EXIT_INVALID)
    ssh = pipeline.stages.deploy.ssh
    try:
        for name in (ssh.key_secret, ssh.key_passphrase_secret):
            if name:
                store.value(name)
    except InvalidInput as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_INVALID)

    def log(line: str) -> None:
        echo(masker.mask(line))
    # needs: a rollback, too, checks the accessories are running before any server switches.
    deployer = AppDeployer(pipeline.stages.deploy, pipeline=pipeline.name,
                           image_name=pipeline.image.name, run_id=run_id, secret=store.value,
                           log=log, needs=needed_on(accessory_specs(pipeline)),
                           destination=pipeline.destination)
    return pipeline, deployer, masker


def _with_routes(deployer: SSHDockerDeployer, rows: list[ServerStatus]
                 ) -> tuple[list[ServerStatus], dict[str, str]]:
    """For the proxy cutover: each row with the digest the app's route serves on its server
    (`route`), and per server what is wrong with that route ("" when it sends the traffic to
    the running container). `deployer`: the primary role's, whose containers the route serves;
    the other roles' rows pass through."""
    from deployers.ssh_proxy import route_status
    by_label = {t.label: t for t in deployer.targets}

    def one(r: ServerStatus) -> tuple[ServerStatus, str]:
        if r.error or r.server not in by_label:
            return r, ""
        conn = deployer.connection(by_label[r.server])
        route = route_status(deployer, conn)
        if route is None:
            return r, ("no route: the proxy sends it no traffic" if r.running else "")
        r = replace(r, route=route.digest, maintenance=route.maintenance)
        cur = deployer.inspect(conn, deployer.app)
        if cur is None or not cur.running:
            return r, f"route -> {route.digest[:19] or '?'}, whose container does not run"
        if route.container:
            same = cur.id.startswith(route.container) or route.container.startswith(cur.id)
        else:  # a route written without the container's id: the digest must match
            same = route.digest == r.digest
        return r, "" if same else (f"route -> {route.digest[:19] or '?'}: not the running "
                                   f"container")

    out, wrong = [], {}
    for row, got in zip(rows, deployer.each(one, list(rows))):
        if isinstance(got, BaseException):
            out.append(row)
            wrong[row.server] = f"route: cannot read it ({got})"
        else:
            out.append(got[0])
            wrong[row.server] = got[1]
    return out, wrong


def _at_release(path: str, var: tuple[str, ...], request_file: str, to: str | None,
                run_id: str) -> tuple[Load, str]:
    """A rollback of a repository's pipeline (a daemon `pipeline:` entry, the request's
    `pipeline_from`): the release `to` names is chosen with the pipeline at the head of the
    request's ref (which servers, whose histories), and rolled back with the pipeline as
    committed at that release's commit, with the entry's vars and limits. Returns (the Load of
    that pipeline, the release's digest as `to`); exits 2 when the servers' releases are not one
    commit or the release recorded none, 1 when the servers cannot be read."""
    from runner.errors import InvalidInput
    from runner.gitsafety import is_sha
    from runner.repository_pipeline import load_at_commit
    from runner.run_request import read_request

    def say(line: str) -> None:
        click.echo(line, err=True)

    try:
        request = read_request(request_file)
    except InvalidInput as exc:
        say(str(exc))
        sys.exit(EXIT_INVALID)
    source = request.pipeline_from
    if source is None or not request.ref:
        say(f"--request {request_file}: no pipeline_from and ref: PIPELINE_FILE is a file here, "
            "roll back without --request")
        sys.exit(EXIT_INVALID)

    def at(commit: str | None) -> Load:
        # A third argument: the daemon entry's destination (-d), as open_pipeline passes it.
        return lambda p, variables, destination=None: load_at_commit(
            source, p, commit, None if commit else request.ref, variables,
            destination=destination)[0]

    _, deployer, masker = _open(path, var, at(None), run_id, say)
    try:
        chosen = deployer.rollback_releases(to)
    except DeployFailed as exc:
        say(masker.mask(f"rollback failed: {exc}"))
        sys.exit(EXIT_INVALID if exc.invalid_input else EXIT_FAILED)
    except (ConfigError, TransportError) as exc:
        say(masker.mask(f"rollback failed: {exc}"))
        sys.exit(EXIT_FAILED)
    finally:
        deployer.close()
    pairs = {(r.commit, r.digest) for r in chosen.values()}
    if len(pairs) != 1:
        say("rollback refused: the servers would go back to different releases ("
            + ", ".join(f"{server}: {r.digest[:19]} commit {r.commit[:12] or '-'}"
                        for server, r in sorted(chosen.items()))
            + "); name one with --to")
        sys.exit(EXIT_INVALID)
    ((commit, digest),) = pairs
    if not is_sha(commit):
        say(f"rollback refused: release {digest[:19]} recorded no commit, so {path} cannot be read "
            "as it was committed then")
        sys.exit(EXIT_INVALID)
    say(f"rolling back to {digest[:19]} with {path} as committed at {commit[:12]} (that release's "
        "commit)")
    return at(commit), digest


def apply_reported(deployer: SSHDockerDeployer, work: Callable[[], Any], verb: str,
                   masker: Masker, as_json: bool) -> None:
    """Run `work` (a rollback, a promotion: a rollout of `deployer`) and print its report, or
    exit 1 or 2 naming what failed (`verb` failed: ...), 130 when interrupted.

    Ctrl-C, SIGTERM, or the daemon cancelling the run: the rollout stops at its next step and
    puts back what it had switched (an exception raised in the handler instead would leave the
    main thread without undoing anything). The event is set by a thread the signal wakes, not in
    the handler: its lock could deadlock the process."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signals = StopSignals()
    signals.install()
    signals.watch(deployer.cancel.set)
    try:
        report = work()
    except (Cancelled, KeyboardInterrupt):
        click.echo(f"{verb} interrupted: the servers it had switched were put back", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except DeployFailed as exc:
        if as_json:
            click.echo(json.dumps(exc.report.to_dict()))
        if deployer.cancel.is_set():
            click.echo(masker.mask(f"{verb} interrupted: {exc}"), err=True)
            sys.exit(EXIT_INTERRUPTED)
        click.echo(masker.mask(f"{verb} failed: {exc}"), err=True)
        sys.exit(EXIT_INVALID if exc.invalid_input else EXIT_FAILED)
    except (ConfigError, TransportError) as exc:
        click.echo(masker.mask(f"{verb} failed: {exc}"), err=True)
        sys.exit(EXIT_FAILED)
    finally:
        deployer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.summary())


def make_commands(load: Load = load_file) -> tuple[click.Command, click.Command,
                                                        click.Group]:
    @click.command("rollback")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--to", "to", metavar="RELEASE",
                  help="a position in `runner releases` (0 newest, 1 the one before, ...), a "
                       "digest (sha256:...) or a git commit (full or short); default: the "
                       "newest verified release other than what runs now")
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
    @click.option("--run-id", "run_id", default=None, metavar="ID",
                  help="the id the servers record with the release and the deploy lock names "
                       "(the daemon passes its run's); default rollback-<time>-<pid>")
    @click.option("--request", "request_file", type=click.Path(dir_okay=False), default=None,
                  metavar="FILE", help="the daemon's run request; with `pipeline_from`, "
                  "PIPELINE_FILE is a path in that repository, read at the release's commit")
    def rollback(pipeline_file: str, to: str | None, var: tuple[str, ...],
                 as_json: bool, run_id: str | None, request_file: str | None) -> None:
        """Return every server to an earlier verified release, exactly as it ran then (its
        recorded command, env, ports, ...: not the file's current settings), health-gated."""
        run_id = run_id or f"rollback-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        opens = load
        if request_file:
            opens, to = _at_release(pipeline_file, var, request_file, to, run_id)
        pipeline, deployer, masker = _open(pipeline_file, var, opens, run_id,
                                           lambda s: click.echo(s, err=True))
        why: list[str] = []  # what failed, for the notifications

        def work():
            try:
                return deployer.rollback(to)
            except (DeployFailed, ConfigError, TransportError) as exc:
                why.append(masker.mask(str(exc)))
                raise

        from runner.cli.notify_run import notify_rollback
        from runner.run_request import read_request

        request = read_request(request_file) if request_file else None
        try:
            apply_reported(deployer, work, "rollback", masker, as_json)
        except SystemExit as exc:
            if exc.code != EXIT_INTERRUPTED:  # an interrupted rollback is no outcome to tell
                notify_rollback(pipeline, deployer.secret_value, masker, False,
                                why[-1] if why else None, request)
            raise
        notify_rollback(pipeline, deployer.secret_value, masker, True, None, request)

    @click.command("releases")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    def releases(pipeline_file: str, var: tuple[str, ...], as_json: bool) -> None:
        """The verified releases recorded on each server, newest first, with the positions
        `runner rollback --to` takes, and each one's env: a short hash of its plain env and
        of its secrets' names (never a value), and what changed since the release before it
        (names only)."""
        _, deployer, masker = _open(pipeline_file, var, load, "releases",
                                    lambda s: click.echo(s, err=True), defer_unreadable=True)
        try:
            rows = deployer.releases()
        finally:
            deployer.close()

        def changes(hs: list[dict], i: int) -> list[str]:  # hs oldest first
            return hist.env_changes(hs[i - 1], hs[i]) if i > 0 else []
        if as_json:
            click.echo(json.dumps([{"server": s, "error": e,
                                    "releases": [{**{k: hs[i].get(k) for k in
                                                     ("digest", "commit", "run_id", "time")},
                                                  "env": hist.env_fingerprint(hs[i]),
                                                  "env_changes": changes(hs, i)}
                                                 for i in reversed(range(len(hs)))]}
                                   for s, hs, e in rows]))
        else:
            for server, hs, error in rows:
                click.echo(f"{server}:" + (f" error: {masker.mask(error)}" if error else
                                           "" if hs else " no verified release recorded"))
                for pos, i in enumerate(reversed(range(len(hs)))):
                    h = hs[i]
                    when = time.strftime("%Y-%m-%d %H:%M:%S",
                                         time.localtime(float(h.get("time") or 0)))
                    changed = changes(hs, i)
                    click.echo(f"  {pos:>3}  {h['digest'][:19]}  "
                               f"{str(h.get('commit') or '-')[:12]:<12}  {when}  "
                               f"env {hist.env_fingerprint(h)}  run {h.get('run_id', '?')}"
                               + (f"  env changed: {', '.join(changed)}" if changed else ""))
        if any(e for _, _, e in rows):
            sys.exit(EXIT_FAILED)

    @click.command("status")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    def status(pipeline_file: str, var: tuple[str, ...], as_json: bool) -> None:
        """Per server: which digest/commit runs, its health and since when."""
        _, deployer, masker = _open(pipeline_file, var, load, "status",
                                    lambda s: click.echo(s, err=True), defer_unreadable=True)
        proxied = deployer.stage.proxy is not None
        wrong: dict[str, str] = {}
        try:
            rows = deployer.verify()
            if proxied:
                rows, wrong = _with_routes(deployer.primary, rows)
        except ConfigError as exc:
            click.echo(str(exc), err=True)
            sys.exit(EXIT_INVALID)
        finally:
            deployer.close()
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in rows]))
        else:
            click.echo(f"{'SERVER':<22} {'STATE':<10} {'HEALTH':<10} {'DIGEST':<19} "
                       f"{'COMMIT':<12} " + (f"{'SINCE':<19} ROUTE" if proxied else "SINCE"))
            for r in rows:
                if r.error:
                    click.echo(f"{r.server:<22} {'error':<10} {masker.mask(r.error)}")
                    continue
                line = (f"{r.server:<22} {r.status:<10} {r.health or '-':<10} "
                        f"{r.digest[:19] or '-':<19} {r.commit[:12] or '-':<12} "
                        f"{r.started_at[:19] or '-':<19}")
                if proxied:
                    line += f" {r.route[:19] or '-'}"
                    if r.maintenance:
                        line += " MAINTENANCE (503 page; `runner app live` ends it)"
                line = line.rstrip()
                if r.digest and not r.verified:
                    line += (f"  unverified: {r.digest[:19]}; previous verified: "
                             f"{r.previous_verified[:19] or 'none'}")
                if wrong.get(r.server):
                    line += f"  {masker.mask(wrong[r.server])}"
                click.echo(line)
        if any(r.error or not r.running or not r.verified or wrong.get(r.server)
               for r in rows):
            sys.exit(EXIT_FAILED)

    @click.group("deploy-lock")
    def deploy_lock() -> None:
        """Inspect or break the per-app deploy lock on the servers.

        Every deploy, rollback and `runner app remove` of an app holds its lock on each server
        while it changes that server; a lock whose holder stopped renewing it for its ttl is
        stale, and the next deploy breaks it by itself. Exit codes: 0 done, 1 a server could
        not be asked (its row says why), 2 bad input."""

    def _lock_error(server: str, error: str, masker) -> str:
        prefix = f"{server}: "  # the transport's messages start with the server already
        return masker.mask(error[len(prefix):] if error.startswith(prefix) else error)

    @deploy_lock.command("show")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    @click.option("--json", "as_json", is_flag=True, help="print JSON: one object per server")
    def show(pipeline_file: str, var: tuple[str, ...], as_json: bool) -> None:
        """Who holds the app's deploy lock on each server: free, or the holder's run, pipeline,
        commit, user@host and pid, with its last heartbeat and whether it is stale. Exits 1 when
        a server could not be asked."""
        _, deployer, masker = _open(pipeline_file, var, load, "lock-show",
                                    lambda s: click.echo(s, err=True))
        try:
            rows = deployer.lock_status()
        finally:
            deployer.close()
        out = []
        for server, info, error in rows:
            if error:
                out.append({"server": server, "state": "error", "holder": None,
                            "error": _lock_error(server, error, masker)})
            elif info is None:
                out.append({"server": server, "state": "free", "holder": None, "error": ""})
            else:
                holder = {k: v for k, v in info.holder.items() if k != "token"}
                out.append({"server": server, "state": "stale" if info.stale else "held",
                            "holder": holder, "age": round(info.age, 1), "ttl": info.ttl,
                            "description": info.describe(), "error": ""})
        if as_json:
            click.echo(masker.mask(json.dumps(out)))
        else:
            for row in out:
                text = (f"error: {row['error']}" if row["state"] == "error" else
                        row.get("description") or "free")
                click.echo(masker.mask(f"{row['server']}: {text}"))
        if any(row["state"] == "error" for row in out):
            sys.exit(EXIT_FAILED)

    @deploy_lock.command("break")
    @click.argument("pipeline_file", type=click.Path(dir_okay=False))
    @click.option("--server", default=None, help="only this server (name or host)")
    @click.option("--var", multiple=True, metavar="K=V", help="pipeline variable")
    @destination_option
    @click.option("--json", "as_json", is_flag=True, help="print JSON: one object per server")
    def break_(pipeline_file: str, server: str | None, var: tuple[str, ...],
               as_json: bool) -> None:
        """Remove the app's deploy lock on every server (or one), whoever holds it. Only for a
        holder that is gone: a deploy still running loses its lock and stops on that server.
        Exits 1 when a server could not be asked, 2 for an unknown --server."""
        _, deployer, masker = _open(pipeline_file, var, load, "lock-break",
                                    lambda s: click.echo(s, err=True))
        if server is not None and not any(server in (t.label, t.host)
                                          for t in deployer.targets):
            deployer.close()
            click.echo(f"unknown server {server!r}: this pipeline deploys to "
                       f"{', '.join(t.label for t in deployer.targets)}", err=True)
            sys.exit(EXIT_INVALID)
        try:
            rows = deployer.break_lock(server)
        finally:
            deployer.close()
        out = [{"server": label, "broken": bool(broken),
                "error": _lock_error(label, error, masker) if error else ""}
               for label, broken, error in rows]
        if as_json:
            click.echo(json.dumps(out))
        else:
            for row in out:
                text = (f"error: {row['error']}" if row["error"] else
                        "lock broken" if row["broken"] else "was free")
                click.echo(f"{row['server']}: {text}")
        if any(row["error"] for row in out):
            sys.exit(EXIT_FAILED)

    return rollback, status, deploy_lock, releases


rollback, status, deploy_lock, releases = make_commands()


_KEY_FILES = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}  # else ecdsa-sha2-* -> ecdsa


@click.command("ssh-trust")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@click.option("--jump", metavar="JUMP",
              help="reach HOST through these jump hosts (`user@host:port`, commas for several), "
                   "as ssh.jump does; default: ~/.ssh/config's ProxyJump")
@click.option("--known-hosts", "known_hosts", metavar="FILE",
              help="compare with this known_hosts file (a pipeline's ssh.known_hosts) instead "
                   "of ~/.ssh/known_hosts")
@click.option("--key-file", "key_file", metavar="FILE",
              help="a key for the jump hosts, tried before the ssh-agent's and ~/.ssh's")
@click.option("--timeout", default=10.0, show_default=True, help="seconds per connection")
def ssh_trust(hosts: tuple[str, ...], jump: str | None, known_hosts: str | None,
              key_file: str | None, timeout: float) -> None:
    """Show the host key each HOST ([user@]host[:port] or a ~/.ssh/config alias) presents,
    with its fingerprint, and print the known_hosts line that makes the runner trust it.

    Nothing is written: check the fingerprint against the server's own, then add the line
    yourself. Exit codes: 0 shown, 1 a host could not be reached, 2 bad input."""
    from pydantic import ValidationError

    from runner.model.deploy import Server, parse_server

    from deployers.spec import resolve_target
    from deployers.ssh_config import UserConfig, parse_hops
    from deployers.host_keys import HostKeyPolicy, known_hosts_line
    from deployers.ssh_connect import scan_host_key
    from deployers.ssh_keys import key_fingerprint, load_private_key
    from deployers.ssh_options import SSHOptions
    config = UserConfig.load()
    try:
        policy = HostKeyPolicy(known_hosts)
        hops = parse_hops(jump) if jump else None
        key = load_private_key(path=key_file) if key_file else None
        written = [parse_server(h) for h in hosts]
        for w in written:
            Server.model_validate(w)  # the same rules as a pipeline's server
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        click.echo(f"ssh-trust: {problems}", err=True)
        sys.exit(EXIT_INVALID)
    except ValueError as exc:
        click.echo(f"ssh-trust: {exc}", err=True)
        sys.exit(EXIT_INVALID)
    opts = SSHOptions(key=key, host_keys=policy, key_label=f"--key-file {key_file}",
                      connect_timeout=timeout, retries=0)
    failed = False
    for w in written:
        target = resolve_target(w["host"], user=w.get("user"), port=w.get("port"), jump=hops,
                                jump_written=jump, config=config)
        try:
            found = scan_host_key(target, opts)
        except TransportError as exc:
            click.echo(f"ssh-trust: {exc}", err=True)
            failed = True
            continue
        via = " -> ".join(f"{h.name or h.host}" for h in target.route[:-1])
        name = target.name if target.name == target.host else f"{target.name} ({target.host})"
        files = policy.files(target.known_hosts)
        into = files[0] if files else "a known_hosts file the runner reads (see ssh.known_hosts)"
        expected = policy.expected_for(target)
        kind = _KEY_FILES.get(found.get_name(), "ecdsa")
        click.echo(f"{name}, port {target.port}{f', through {via}' if via else ''}, presents "
                   f"this host key:\n  {key_fingerprint(found)}", err=True)
        if any(k.asbytes() == found.asbytes() for k in expected):
            click.echo(f"It is already trusted: {policy.where(None, target.known_hosts)} "
                       f"lists it. Nothing to add.", err=True)
            continue
        if expected:
            listed = known_hosts_line(target, found).split()[0]
            click.echo(f"WARNING: this is NOT the key {policy.where(None, target.known_hosts)} "
                       f"has ({', '.join(key_fingerprint(k) for k in expected)}). If the server "
                       f"was reinstalled, remove the old line "
                       f"({shlex.join(['ssh-keygen', '-R', listed, '-f', into])}) before "
                       f"adding this one; if it was not, someone may be intercepting the "
                       f"connection.", err=True)
        click.echo(f"Compare it with the fingerprint the server itself shows, on its console "
                   f"or another trusted way in (ssh-keygen -lf "
                   f"/etc/ssh/ssh_host_{kind}_key.pub). Only if they match, add this line to "
                   f"{into} (ssh-trust writes nothing; a pipeline can also pin it as "
                   f"ssh.host_key: \"{found.get_name()} {found.get_base64()}\"):", err=True)
        click.echo(known_hosts_line(target, found))
    if failed:
        sys.exit(EXIT_FAILED)
