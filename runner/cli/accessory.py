"""`runner accessory boot|reboot|logs|exec|remove|status PIPELINE [NAME]`: the pipeline's
accessories (`accessories:`) on their servers, through deployers.accessories.

NAME omitted: every accessory of the pipeline (exec needs it). Each
accessory works on each of its servers in parallel; every line is masked and says the server and
the accessory. Exit codes: 0 done; 1 an accessory failed or a server could not be reached (named,
with why), a removal not confirmed, or (status) an accessory not running; 2 bad input (an
unknown accessory, listing those that exist; no command for exec); 130 interrupted.
"""
from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable

import click

from runner.cli.common import confirmed, destination_option, open_or_exit
from runner.cli.on_servers import each
from runner.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, Cancelled
from runner.pipeline_file import Load, load_file

from deployers import commands as cmd
from deployers.accessories import Accessories, AccessoryError
from deployers.accessory_plan import AccessoryPlan
from deployers.ssh_docker import ConfigError
from deployers.ssh_errors import TransportError


def _why(exc: BaseException) -> str:
    if isinstance(exc, (TransportError, AccessoryError)):
        return exc.reason
    if isinstance(exc, Cancelled):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Session:
    """The pipeline's accessories, the ones a command names, and a masked output."""

    def __init__(self, path: str, name: str | None, var: tuple[str, ...], load: Load):
        opened = open_or_exit(path, var, load)
        self.path, self.masker = path, opened.masker
        pipeline = opened.pipeline
        if not pipeline.accessories:
            self.exit(f"{path}: this pipeline declares no accessories (accessories: at its "
                      f"top level)", EXIT_INVALID)
        if name is not None and name not in pipeline.accessories:
            self.exit(f"unknown accessory {name!r}: {path} has "
                      f"{', '.join(pipeline.accessories)}", EXIT_INVALID)
        self.names = [name] if name is not None else list(pipeline.accessories)
        self.acc = Accessories(pipeline, secret=opened.secrets.value,
                               log=lambda line: self.say(line, err=True))
        try:
            self.acc.options()
        except ConfigError as exc:
            self.acc.close()
            self.exit(f"{path}: {exc}", EXIT_INVALID)
        self.plans = self.acc.plans(self.names)
        self._out = threading.Lock()

    def say(self, text: str, err: bool = False) -> None:
        with self._out:
            click.echo(self.masker.mask(text), err=err)

    def exit(self, text: str, code: int) -> None:
        click.echo(self.masker.mask(text), err=True)
        sys.exit(code)

    def each(self, fn: Callable[[AccessoryPlan], object],
             plans: list[AccessoryPlan] | None = None) -> list:
        """fn(plan) for every plan at once, in threads: the results or the exceptions raised.
        Ctrl-C sets the cancel event every remote command watches, waits a little for the
        threads, and exits 130."""
        results, interrupted = each(self.acc.cancel, fn,
                                    self.plans if plans is None else plans,
                                    lambda p: f"accessory-{p.spec.name}-{p.server}")
        if interrupted:
            self.acc.close()
            self.exit("interrupted", EXIT_INTERRUPTED)
        return results

    def report(self, results: list, plans: list[AccessoryPlan] | None = None) -> None:
        """One line per accessory and server (several for a list of what was done); exit 1
        naming every failure."""
        plans = self.plans if plans is None else plans
        self.acc.close()
        failed = []
        for p, r in zip(plans, results):
            head = f"{p.server}: {p.spec.name}:"
            if isinstance(r, BaseException):
                self.say(f"{head} FAILED: {_why(r)}")
                failed.append(f"{p.spec.name} on {p.server}")
            elif isinstance(r, list):
                for line in r:
                    self.say(f"{head} {line}")
            else:
                self.say(f"{head} {r}")
        if failed:
            self.exit(f"failed: {', '.join(failed)}", EXIT_FAILED)


def make_accessory(load: Load = load_file) -> click.Group:
    @click.group("accessory")
    def accessory() -> None:
        """The pipeline's accessories (a database, a cache beside the app): long-lived
        containers that deploys never touch, reached by the app as `<app>-<NAME>` on the
        runner's network.

        Exit codes: 0 done, 1 an accessory failed or a server could not be reached (named,
        with why), 2 bad input, 130 interrupted."""

    pipeline_arg = click.argument("pipeline_file", type=click.Path(dir_okay=False))
    name_arg = click.argument("name", required=False)
    def var_opt(fn):  # --var, and -d for a pipeline with destinations
        return destination_option(click.option("--var", multiple=True, metavar="K=V",
                                               help="pipeline variable")(fn))

    @accessory.command("boot")
    @pipeline_arg
    @name_arg
    @var_opt
    def boot(pipeline_file: str, name: str | None, var: tuple[str, ...]) -> None:
        """Start the accessory on its servers and wait for its health. One already running
        with the same settings is left alone (and said so); one with other settings is not
        touched (`reboot` replaces it). NAME omitted: every accessory of the pipeline."""
        s = _Session(pipeline_file, name, var, load)
        s.report(s.each(s.acc.boot))

    @accessory.command("reboot")
    @pipeline_arg
    @name_arg
    @var_opt
    def reboot(pipeline_file: str, name: str | None, var: tuple[str, ...]) -> None:
        """Replace the accessory's container (stopped cleanly, removed, started again with the
        pipeline's settings and secrets); its named volumes, and so its data, stay. NAME
        omitted: every accessory of the pipeline."""
        s = _Session(pipeline_file, name, var, load)
        s.report(s.each(s.acc.reboot))

    @accessory.command("remove")
    @pipeline_arg
    @name_arg
    @click.option("--volumes", is_flag=True, help="also delete its named volumes: its data")
    @click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
    @var_opt
    def remove(pipeline_file: str, name: str | None, volumes: bool, yes: bool,
               var: tuple[str, ...]) -> None:
        """Stop and remove the accessory's container. Its named volumes stay unless --volumes
        (said before anything is done). Asks first unless --yes (an answer other than yes
        removes nothing and exits 1). NAME omitted: every accessory of the pipeline."""
        s = _Session(pipeline_file, name, var, load)
        for n in s.names:
            spec = s.acc.specs[n]
            where = ", ".join(spec.servers)
            vols = ", ".join(spec.volume_names)
            if not vols:
                s.say(f"{n}: has no named volume")
            elif volumes:
                s.say(f"{n}: --volumes: deletes volumes {vols} on {where}: its data is lost")
            else:
                s.say(f"{n}: keeps volumes {vols} on {where}: its data stays")
        if not yes:
            if not confirmed(f"Remove {', '.join(s.names)}{' and its data' if volumes else ''}?"):
                s.acc.close()
                s.exit("nothing removed", EXIT_FAILED)
        s.report(s.each(lambda p: s.acc.remove(p, volumes)))

    @accessory.command("status")
    @pipeline_arg
    @name_arg
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    @var_opt
    def status(pipeline_file: str, name: str | None, as_json: bool,
               var: tuple[str, ...]) -> None:
        """Each accessory on each of its servers: its container's state and health, whether
        it runs with the pipeline's current settings, its volumes. Exits 1 when one is not
        running or a server could not be asked. NAME omitted: every accessory of the
        pipeline."""
        s = _Session(pipeline_file, name, var, load)
        rows = s.each(s.acc.status)
        s.acc.close()
        if as_json:
            s.say(json.dumps([r.__dict__ for r in rows]))
        for r in ([] if as_json else rows):
            if r.error:
                s.say(f"{r.server}: {r.accessory}: FAILED: {r.error}")
                continue
            health = f" ({r.health})" if r.health else ""
            spec = "" if r.state == "absent" else (
                ", current settings" if r.same_spec else
                ", other settings than the pipeline's (`reboot` applies them)")
            vols = f", volumes {', '.join(r.volumes)}" if r.volumes else ""
            s.say(f"{r.server}: {r.accessory}: {r.container} {r.state}{health}{spec}{vols}")
        if any(r.error or r.state != "running" for r in rows):
            sys.exit(EXIT_FAILED)

    @accessory.command("logs")
    @pipeline_arg
    @name_arg
    @click.option("--lines", "-n", type=click.IntRange(min=0), default=100, show_default=True,
                  help="how many of the last lines to show, per accessory and server")
    @click.option("--follow", "-f", is_flag=True, help="keep streaming new lines until Ctrl-C")
    @var_opt
    def logs(pipeline_file: str, name: str | None, lines: int, follow: bool,
             var: tuple[str, ...]) -> None:
        """The accessory's own output (stdout and stderr), each line prefixed with the server
        and the accessory; secret values show as ***. NAME omitted: every accessory of the
        pipeline."""
        s = _Session(pipeline_file, name, var, load)

        def one(p: AccessoryPlan) -> int:
            argv = [cmd.DOCKER, "container", "logs", "--tail", str(lines),
                    *(["--follow"] if follow else []), p.spec.container]
            return s.acc.conn(p.target).stream(
                argv, lambda text, err: s.say(f"{p.server} {p.spec.name} | {text}", err),
                cancel=s.acc.cancel, pty=follow,
                timeout=None if follow else s.acc.command_timeout)
        s.report([r if isinstance(r, BaseException) else
                  AccessoryError(p.server, f"`docker container logs` exited with {r}") if r
                  else [] for p, r in zip(s.plans, s.each(one))])

    @accessory.command("exec", context_settings={"ignore_unknown_options": True})
    @pipeline_arg
    @click.argument("name")
    @click.argument("command", nargs=-1, type=click.UNPROCESSED)
    @click.option("--server", default=None, metavar="S",
                  help="the server (its name), when the accessory runs on several")
    @var_opt
    def exec_(pipeline_file: str, name: str, command: tuple[str, ...], server: str | None,
              var: tuple[str, ...]) -> None:
        """Run a command in the accessory's container: `docker exec <app>-<NAME> CMD...`.

        runner accessory exec PIPELINE NAME -- psql -U postgres -c 'select 1'. Its output
        shows as it comes (secret values as ***); the exit status is the command's, 1 if the
        server could not be reached."""
        s = _Session(pipeline_file, name, var, load)
        if not command:
            s.acc.close()
            s.exit("no command: give it after `--`, e.g. runner accessory exec PIPELINE NAME "
                   "-- ls", EXIT_INVALID)
        plans = [p for p in s.plans if server in (None, p.server)]
        if len(plans) != 1:
            where = ", ".join(p.server for p in s.plans)
            s.acc.close()
            s.exit((f"unknown server {server!r}: " if server is not None else
                    "say which server with --server: ") + f"{name} runs on {where}",
                   EXIT_INVALID)
        p = plans[0]

        def one(p: AccessoryPlan) -> int:
            return s.acc.conn(p.target).stream(
                [str(w) for w in cmd.exec_(p.spec.container, list(command))],
                lambda text, err: s.say(text, err), cancel=s.acc.cancel,
                timeout=s.acc.command_timeout)
        [r] = s.each(one, [p])
        s.acc.close()
        if isinstance(r, BaseException):
            s.exit(f"{p.server}: {name}: FAILED: {_why(r)}", EXIT_FAILED)
        sys.exit(r if 0 <= r < 256 else EXIT_FAILED)

    return accessory


accessory = make_accessory()
