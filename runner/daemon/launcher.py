"""A `runner` process started before it is needed (a warm spare): it imports the CLI, the engine
and the stages, then waits for one line on stdin, the JSON list of arguments of the command to
run (["exec", PIPELINE, "--json", ...]), and runs it exactly as `python -m runner ...` would.

Why: importing the runner takes most of a second (pydantic models, the docker SDK, paramiko); a
spare has paid that before the webhook arrives, so the run's first stage starts sooner. EOF on
stdin (the daemon no longer needs it) exits quietly.
"""
from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> int:
    from runner.cli import cli
    from runner import engine

    for target in engine.STAGE_CLASSES.values():  # what `exec` would import lazily
        try:
            importlib.import_module(target.split(":")[0])
        except ImportError:
            pass  # the run itself reports a missing stage, as a cold start would
    for name in ("runner.loader", "runner.secrets", "runner.render", "runner.trigger", "runner.gitsafety"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    args = json.loads(line)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the run gets no stdin, as a cold start gets DEVNULL
    os.close(devnull)
    sys.argv = ["runner", *args]
    cli.main(args=args, prog_name="runner")  # exits with the command's code
    return 0


if __name__ == "__main__":
    sys.exit(main())
