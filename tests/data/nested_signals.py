#!/usr/bin/env python3
"""TEST FIXTURE: `python -m runner ARGS...` in which a signal lands inside the signal handler,
deterministically: every line that the SIGINT/SIGTERM handler (and what it calls) runs sends
this process that same signal again, up to NESTED times in all, so that handlers nest at every
point of the handler, also while it holds whatever lock it takes. A handler that takes a lock
(threading.Event.set) deadlocks here every time; one that takes none returns.

    python tests/data/nested_signals.py NESTED daemon --config daemon.yaml

Only the main thread is traced (where Python runs signal handlers).
"""
import os
import signal
import sys
from pathlib import Path

budget = int(sys.argv.pop(1))
inside = 0  # handler frames (and their callees) now running


def is_handler(code) -> bool:
    return any(code is getattr(signal.getsignal(sig), "__code__", None)
               for sig in (signal.SIGINT, signal.SIGTERM))


def again() -> None:
    """The handler runs when this returns (os.kill delivers to this thread before it returns):
    nested in the traced line, before that line runs."""
    global budget
    if budget > 0:
        budget -= 1
        os.kill(os.getpid(), signal.SIGTERM)


def trace(frame, event, arg):  # each call in the main thread
    global inside
    if is_handler(frame.f_code):
        inside += 1
        return trace_handler
    return trace_callee if inside else None


def trace_handler(frame, event, arg):
    global inside
    if event == "line":
        again()
    elif event == "return":  # also when it raises
        inside -= 1
    return trace_handler


def trace_callee(frame, event, arg):
    if event == "line":
        again()
    return trace_callee


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the runner of this tree
# Imported before the tracing starts, which slows every call down.
import runner.cli.daemon  # noqa: E402,F401
import runner.cli.exec  # noqa: E402,F401
import runner.daemon.service  # noqa: E402,F401
from runner.cli import main  # noqa: E402

sys.settrace(trace)

sys.argv[0] = "runner"
main()
