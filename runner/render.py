"""Showing a run to a person (rich, live) or to a machine (one JSON object per line).

The person's view is a digest: the stages' own messages and each build step once, as it
finishes; every line of tool output is in the run's stage logs, and `verbose` shows it here
too. The machine's (--json, which the daemon stores) is every event, whole.

Both are sinks of already-masked events (see runner.runlog); neither sees raw secret values.
The person's view shows every string of an event through runner.terminal_text.inert: a commit
message or a build's output cannot drive the terminal (links, titles, clearing, overwrites).
A sink whose stream fails (its reader went away) silences that stream and raises: runner.runlog
then drops it, and the run goes on.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipelines.buildkit import Progress, Step
from runner.terminal_text import inert_all

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


def guard_std_fds() -> None:
    """Open /dev/null on each of descriptors 0, 1 and 2 that the process started without
    (`runner exec 2>&-`). Else the next file the run opens (its events.jsonl, a stage log, a
    lock) takes that number, and whatever writes to descriptor 2 (a C library's message,
    faulthandler, Python's fatal error) writes into the run's record; and the tools the run
    starts get no stderr at all. Python has already set sys.stderr (or stdin, stdout) to None
    for it, which rich and click take as "write nowhere"; that stays so."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            new = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if new == fd:
                os.set_inheritable(fd, True)  # as a standard stream is: the tools get it too
            else:
                os.dup2(new, fd)
                os.close(new)


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


class BuildSteps:
    """The collapsed view of one stage's BuildKit `--progress=plain` output: each Dockerfile
    step once, when it finishes (cached, ran, or failed). Lines that are not BuildKit progress
    (git's, a push's) give nothing.

    The parsing is pipelines.buildkit's Progress, the one the build stage reports from, so the
    counts here are the stage's own; only the step times ("DONE 3.8s", which Progress does not
    keep) are read here."""

    def __init__(self) -> None:
        self.progress = Progress()
        self.seconds: dict[int, str] = {}  # vertex -> "3.8s"
        self._shown: set[int] = set()

    def feed(self, line: str) -> tuple[Step | None, list[tuple[str, Step]]]:
        """Take one output line. Returns the step it started (else None), and the steps it
        finished as ("cached" | "ran" | "failed", step)."""
        m = _VERTEX.match(line)
        if m is None:
            self.progress.feed(line)
            return None, []
        vertex = int(m.group(1))
        new = vertex not in self.progress.steps
        self.progress.feed(line)
        step = self.progress.steps.get(vertex)
        if step is None:  # "[internal] ...", "exporting to image": not a step
            return None, []
        done = _DONE.match(line)
        if done:
            self.seconds[vertex] = done.group(1)
        finished: list[tuple[str, Step]] = []
        if vertex not in self._shown and (step.cached or step.done or step.error is not None):
            self._shown.add(vertex)
            how = "failed" if step.error is not None else "cached" if step.cached else "ran"
            finished.append((how, step))
        return (step if new else None), finished

    def shown(self, name: str) -> bool:
        """Whether the step called `name` (as BuildKit prints it) was reported finished."""
        return any(s.name == name for v, s in self.progress.steps.items() if v in self._shown)

    def counts(self) -> str | None:
        """"7 steps: 1 cached, 5 ran, 1 failed", or None when the output had no step."""
        steps = list(self.progress.steps.values())
        if not steps:
            return None
        failed = sum(1 for s in steps if s.error is not None)
        cached = sum(1 for s in steps if s.cached and s.error is None)
        ran = sum(1 for s in steps if s.done and not s.cached and s.error is None)
        parts = [f"{cached} cached", f"{ran} ran"]
        if failed:
            parts.append(f"{failed} failed")
        if len(steps) - cached - ran - failed:
            parts.append(f"{len(steps) - cached - ran - failed} not finished")
        return f"{len(steps)} step{'s' if len(steps) != 1 else ''}: {', '.join(parts)}"


_VERTEX = re.compile(r"^#(\d+) ")
_DONE = re.compile(r"^#\d+ DONE (\d+(?:\.\d+)?s)\b")
# The build stage's own recap of each step once the build is done (pipelines/build.py): the
# collapsed view has shown those steps already.
_RECAP = re.compile(r"^(?:CACHED|ran   ) (.*)$")


class TerminalSink:
    """Live progress for a person: a spinner naming the running stage (and build step), the
    stages' own messages, each BuildKit step collapsed to one line, a line per finished stage
    with its duration, and a summary table with where the full logs are.

    Tool output (git, BuildKit, Trivy, a push) is in the stage's log file whatever is shown;
    `verbose` shows every line of it here too, `quiet` not even the build's step lines."""

    name = "the terminal output (stderr)"

    def __init__(self, console: Console | None = None, verbose: bool = False,
                 quiet: bool = False):
        self.console = console or _Console(stderr=True, highlight=False, soft_wrap=True)
        self.verbose = verbose
        self.quiet = quiet and not verbose
        self._status = None
        self._builds: dict[str, BuildSteps] = {}
        self._run_dir: Path | None = None

    def __call__(self, ev: dict[str, Any]) -> None:
        try:
            # Inert before the view adds its own colours: none of the text's own survives.
            self._show(inert_all(ev, multiline_keys=("error",)))
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

    def _line(self, stage: str, text: str, style: str | None = None) -> None:
        self.console.print(f"  [{stage}] {text}", style=style, markup=False)

    def _step_name(self, stage: str, name: str) -> str:
        """A step's name as one line: BuildKit keeps a RUN's continued lines as runs of spaces,
        which say nothing here; on a terminal, cut to its width."""
        text = " ".join(name.split())
        if not self.console.is_terminal:  # a file or a pipe keeps it whole
            return text
        room = max(30, self.console.width - len(stage) - 20)
        return text if len(text) <= room else text[:room - 1] + "\u2026"

    def _output(self, stage: str, line: str) -> None:
        steps = self._builds.setdefault(stage, BuildSteps())
        started, finished = steps.feed(line)
        if self.verbose:
            self._line(stage, line)
            return
        if started is not None and self._status is not None:
            # Text, not markup: "[deps 2/4]" would be taken for a style.
            self._status.update(Text(f"{stage}: {self._step_name(stage, started.name)}"))
        if self.quiet:
            return
        for how, step in finished:
            name = self._step_name(stage, step.name)
            if how == "cached":
                self._line(stage, f"CACHED {name}", "dim")
            elif how == "ran":
                took = steps.seconds.get(step.vertex)
                self._line(stage, f"ran    {name}" + (f" ({took})" if took else ""))
            else:
                # Its last STEP_LOG_TAIL lines, not only the few quoted in the stage's error,
                # which may not be the ones that tell what went wrong.
                self._line(stage, f"FAILED {name}", "bold red")
                if step.lines > len(step.log):
                    self._line(stage, f"  ({step.lines - len(step.log)} earlier lines of this "
                                      "step in the full log)", "dim")
                for text in step.log:
                    self._line(stage, f"  {text}")
                self._line(stage, f"  ERROR: {step.error}", "red")

    def _show(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        c = self.console
        if kind == "run.start":
            if ev.get("workdir"):
                self._run_dir = Path(ev["workdir"])
            # Markup around escaped values: a name like "[link=...]" is text, not a style.
            c.print(f"[bold]run {escape(ev['run_id'])}[/] pipeline "
                    f"[bold]{escape(ev['pipeline'])}[/] "
                    f"stages: {escape(' -> '.join(ev['stages'])) or '(none)'}", markup=True)
        elif kind == "stage.start":
            c.print(f"[bold cyan]>> {ev['stage']}[/]", markup=True)
            self._spin(f"{ev['stage']} running")
        elif kind == "stage.log":
            stage, line, what = ev["stage"], ev["line"], ev.get("kind", "")
            if what == "output":
                self._output(stage, line)
                return
            steps = self._builds.get(stage)
            recap = _RECAP.match(line) if what == "info" and steps is not None else None
            if recap and not self.verbose and steps.shown(recap.group(1)):
                return  # its step's line is above already
            style = {"warning": "yellow", "info": "cyan"}.get(what)
            self._line(stage, line, style)
        elif kind == "stage.end":
            self._spin(None)
            st = ev["status"]
            steps = self._builds.get(ev["stage"])
            counts = steps.counts() if steps is not None else None
            line = (f"<< {ev['stage']}: [{STATUS_STYLE.get(st, '')}]{st}[/] "
                    f"({ev.get('duration', 0):.1f}s{f'; {counts}' if counts else ''})")
            c.print(line, markup=True)
            if ev.get("error"):
                c.print(f"   {ev['error']}", style="dim" if st == "skipped" else "red",
                        markup=False)
            if st in ("failed", "cancelled") and self._run_dir is not None:
                c.print(f"   full log: {self._run_dir / 'logs' / (ev['stage'] + '.log')}"
                        f"{'' if self.verbose else ' (or runner exec -v to see it here)'}",
                        style="dim", markup=False)
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
        if self._run_dir is not None:
            self.console.print(f"record: {self._run_dir / 'run.json'}; every line of every stage: "
                               f"{self._run_dir / 'logs'}/<stage>.log", style="dim", markup=False)
