"""Stop signals received without a lock (runner/signals.py): `runner exec`'s handler while the
cancel event's lock is held, and the count a nested signal leaves. Each in a python of its own
(signals go to its main thread), with a timeout that turns a deadlock into a failure."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def _python(script: str) -> str:
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                              timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("deadlocked in the signal handler") from None
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_execs_handler_needs_no_lock_the_interrupted_code_may_hold():
    out = _python("""
import signal, threading
from runner import engine
cancel = threading.Event()
engine.stop_on_signals(cancel)
# The signal lands while cancel.set() or cancel.wait() holds the event's lock (CPython's Event
# keeps it in _cond): the handler must not need it.
with cancel._cond:
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        print("interrupted")
    signal.raise_signal(signal.SIGTERM)  # the second one raises nothing
print("cancelled" if cancel.wait(10) else "not cancelled")
""")
    assert out.split() == ["interrupted", "cancelled"]


def test_a_signal_inside_the_handler_is_counted_and_numbered_after_the_first():
    out = _python("""
import signal
from runner.signals import StopSignals
signals = StopSignals()
reacted = []
def react(n):
    reacted.append(n)
    if n == 1:
        signal.raise_signal(signal.SIGTERM)  # lands inside the first handler
signals.install(react)
signal.raise_signal(signal.SIGINT)
print(signals.wait(1, 5), reacted, signals.names())
""")
    assert out.strip() == "2 [1, 2] ['SIGINT', 'SIGTERM']"
