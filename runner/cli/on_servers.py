"""What the commands that work on the deployed servers share (`runner app`, `runner proxy`,
`runner accessory`): the deployer of a pipeline file, the servers a command names, a function run
on each of them in threads under Ctrl-C, whole masked lines from several threads, and the refusal
of a proxy command for a pipeline without the proxy cutover."""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import click

from runner.cli.deploy import _open
from runner.errors import EXIT_INVALID, Cancelled
from runner.pipeline_file import Load

from deployers.spec import Target
from deployers.app_deployer import AppDeployer
from deployers.ssh_docker import ConfigError, SSHDockerDeployer

SERVER_HELP = "only this server (its name or host)"

Item = TypeVar("Item")


class Out:
    """Whole lines to the terminal from several threads, masked, with an optional prefix."""

    def __init__(self, masker, prefixed: bool, width: int):
        self.masker = masker
        self.prefixed = prefixed
        self.width = width
        self._lock = threading.Lock()

    def line(self, server: str, text: str, err: bool = False) -> None:
        text = self.masker.mask(text)
        if self.prefixed:
            text = f"{server:<{self.width}} | {text}"
        with self._lock:
            click.echo(text, err=err)


def session(path: str, var: tuple[str, ...], load: Load, run_id: str
            ) -> tuple[object, AppDeployer, object]:
    """(pipeline, the app's deployer, masker); exit 2 when the settings cannot work (no key,
    ...). A command on one role's containers takes `role(app, name)` of it; the proxy's
    commands the primary role's (`app.primary`), whose containers the route serves."""
    pipeline, d, masker = _open(path, var, load, run_id, lambda s: click.echo(s, err=True),
                                defer_unreadable=True)
    try:
        d.options()
    except ConfigError as exc:
        d.close()
        click.echo(masker.mask(f"{path}: {exc}"), err=True)
        sys.exit(EXIT_INVALID)
    return pipeline, d, masker


def role(app: AppDeployer, name: str | None) -> tuple[SSHDockerDeployer, str]:
    """The deployer of role `name` (None: the primary role) and what its servers' names carry
    (`/worker`); exit 2 listing the roles when the pipeline has no such role."""
    if name is None:
        return app.primary, ""
    for r in app.roles:
        if r.name == name:
            return app.by_role[name], r.unit_suffix
    app.close()
    click.echo(f"unknown role {name!r}: this pipeline's roles are "
               f"{', '.join(r.name for r in app.roles)}", err=True)
    sys.exit(EXIT_INVALID)


def choose(d: SSHDockerDeployer, server: str | None, suffix: str = "") -> list[Target]:
    """The servers a command runs on: all, or those named `server` (label or host; a role's
    server by the server's own name too, without `suffix`); exit 2 naming the servers it runs
    on when none is."""
    if server is None:
        return list(d.targets)
    chosen = [t for t in d.targets if server in (t.label, t.host, t.label.removesuffix(suffix))]
    if not chosen:
        d.close()
        known = ", ".join(t.label.removesuffix(suffix) for t in d.targets)
        what = f"the role {suffix[1:]} runs on" if suffix else "this pipeline deploys to"
        click.echo(f"unknown server {server!r}: {what} {known}", err=True)
        sys.exit(EXIT_INVALID)
    return chosen


def proxied(path: str, d: SSHDockerDeployer, command: str, why: str) -> None:
    """Exit 2 saying `command` `why` when the pipeline deploys without the proxy cutover."""
    if d.stage.proxy is None:
        d.close()
        click.echo(f"{path}: stages.deploy has no `proxy:` section (this pipeline deploys "
                   f"stop-start, without a proxy): `{command}` {why}", err=True)
        sys.exit(EXIT_INVALID)


def each(cancel: threading.Event, fn: Callable[[Item], object], items: list[Item],
         label: Callable[[Item], str], limit: int | None = None) -> tuple[list, bool]:
    """fn(item) for each item in threads named label(item), at most `limit` at once (None: all
    at once): the results or the exceptions raised, in the items' order, and whether Ctrl-C was
    pressed. Ctrl-C sets `cancel` (every remote command of the callers watches it) and waits a
    little for the threads; one still running then counts as Cancelled."""
    results: list = [Cancelled("interrupted")] * len(items)
    gate = threading.Semaphore(limit or len(items) or 1)
    # Events, not Thread.join: on Python 3.11 a join that Ctrl-C interrupts leaves the thread
    # looking finished while it still runs.
    done = [threading.Event() for _ in items]

    def work(i: int, item: Item) -> None:
        try:
            with gate:
                results[i] = fn(item)
        except BaseException as exc:  # handed to the caller
            results[i] = exc
        finally:
            done[i].set()
    for i, item in enumerate(items):
        threading.Thread(target=work, args=(i, item), daemon=True, name=label(item)).start()
    try:
        for ev in done:
            while not ev.wait(0.2):
                pass
    except KeyboardInterrupt:
        cancel.set()
        end = time.monotonic() + 10
        for ev in done:
            ev.wait(max(0.0, end - time.monotonic()))
        return list(results), True
    return results, False
