"""Showing a run to a person (rich, live) or to a machine (one JSON object per line).

Both are sinks of already-masked events (see runner.runlog); neither sees raw secret values.
A sink whose stream fails (its reader went away) silences that stream and raises: runner.runlog
then drops it, and the run goes on.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

STATUS_STYLE = {"success": "green", "failed": "bold red", "skipped": "dim", "cancelled": "yellow",
                "invalid": "bold red"}


def silence(stream: Any) -> None:
    """Point `stream`'s file descriptor at /dev/null, after a write to it failed (EPIPE: nobody
    reads it any more). What is left in its buffer, and whatever is written later, then goes
    nowhere instead of failing again; at exit Python flushes stdout and stderr, and a failing
    flush would turn the exit code into 120. A stream without a descriptor is left alone."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class JsonSink:
    name = "the --json output (stdout)"

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self.out.write(json.dumps(event, default=str) + "\n")
            self.out.flush()
        except (OSError, ValueError):  # a closed pipe, a closed file
            silence(self.out)
            raise


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own points stdout (not this console's stream) at /dev/null and raises
        # SystemExit(1), which would end the run; here the sink fails and is dropped instead.
        self.quiet = True
        silence(self.file)
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


class TerminalSink:
    """Live progress: a spinner naming the running stage, its output lines above it, a line per
    finished stage with its duration, and a summary table at the end."""

    name = "the terminal output (stderr)"

    def __init__(self, console: Console | None = None, verbose: bool = True):
        self.console = console or _Console(stderr=True, highlight=False, soft_wrap=True)
        self.verbose = verbose
        self._status = None

    def __call__(self, ev: dict[str, Any]) -> None:
        try:
            self._show(ev)
        except (OSError, ValueError):
            silence(self.console.file)
            if self._status is not None:  # its refresh thread would write on
                with contextlib.suppress(Exception):
                    self._status.stop()
                self._status = None
            raise

    def _spin(self, text: str | None) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if text and self.console.is_terminal:
            self._status = self.console.status(text)
            self._status.start()

    def _show(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        c = self.console
        if kind == "run.start":
            c.print(f"[bold]run {ev['run_id']}[/] pipeline [bold]{ev['pipeline']}[/] "
                    f"stages: {' -> '.join(ev['stages']) or '(none)'}", markup=True)
        elif kind == "stage.start":
            c.print(f"[bold cyan]>> {ev['stage']}[/]", markup=True)
            self._spin(f"{ev['stage']} running")
        elif kind == "stage.log":
            style = {"warning": "yellow", "info": "cyan"}.get(ev.get("kind", ""), "")
            if self.verbose or ev.get("kind") != "output":
                c.print(f"  [{ev['stage']}] {ev['line']}", style=style or None, markup=False)
        elif kind == "stage.end":
            self._spin(None)
            st = ev["status"]
            line = f"<< {ev['stage']}: [{STATUS_STYLE.get(st, '')}]{st}[/] ({ev.get('duration', 0):.1f}s)"
            c.print(line, markup=True)
            if ev.get("error"):
                c.print(f"   {ev['error']}", style="dim" if st == "skipped" else "red",
                        markup=False)
        elif kind == "run.end":
            self._spin(None)
            self.summary(ev)

    def summary(self, ev: dict[str, Any]) -> None:
        table = Table(title=f"run {ev['run_id']}: {ev['status']}", title_justify="left")
        table.add_column("stage")
        table.add_column("status")
        table.add_column("time", justify="right")
        for s in ev.get("stages", []):
            table.add_row(s["name"], f"[{STATUS_STYLE.get(s['status'], '')}]{s['status']}[/]",
                          f"{s['duration']:.1f}s")
        self.console.print(table)
        for w in ev.get("warnings") or []:
            self.console.print(f"warning: {w}", style="yellow", markup=False)
        if ev.get("error"):
            self.console.print(ev["error"], style="bold red", markup=False)
