"""Stop requests by signal (SIGINT, SIGTERM), received without taking a lock.

Python runs a signal handler in the main thread between two bytecodes of whatever that thread
was doing, and a second signal interrupts the first handler the same way. A handler that takes
a lock (threading.Event.set, logging, print) deadlocks the process when the signal lands while
that lock is held by the code it interrupted or by an earlier handler: a daemon sat for 26
minutes in three nested handlers, each waiting for its stop event's lock. So the handler here
only appends the signal to a list (one C call: no lock, and a nested handler appends its own),
and whoever must act on it is woken by the byte the interpreter's C-level handler writes to a
socket (signal.set_wakeup_fd) before any Python code runs: the main thread in `wait`, or a
thread of `watch`, which may then take locks, log, set events.
"""
from __future__ import annotations

import itertools
import select
import signal
import socket
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT and SIGTERM, counted. Either the main thread `wait`s for them or `watch` acts on
    them from a thread: both read the same wake-up socket."""

    def __init__(self) -> None:
        self.received: list[int] = []  # signal numbers, in order; appended by the handler only
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    @property
    def count(self) -> int:
        return len(self.received)

    def names(self) -> list[str]:
        return [signal.Signals(n).name for n in self.received]

    def install(self, react: Callable[[int], None] | None = None) -> None:
        """Handle SIGINT and SIGTERM from now on; call from the main thread. `react(n)` runs
        inside the handler of the n-th signal (1 for the first): it must take no lock either
        (raising KeyboardInterrupt is fine: raising takes none)."""
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        numbers = itertools.count(1)

        def on_signal(signum, frame):
            # One C call each: a handler nested in this one runs after `next` returned and
            # gets the next number, so only one handler ever reacts as the first.
            n = next(numbers)
            self.received.append(signum)
            if react is not None:
                react(n)

        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)

    def wait(self, seen: int, timeout: float | None) -> int:
        """In the main thread (where the handler runs): block until more than `seen` signals
        were received, or `timeout` seconds passed (None: no limit); returns the count."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.received) <= seen:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            # A signal while select blocks: its handler runs (the list grows), then select
            # returns for the byte. One that came before select: the byte is already there.
            select.select([self._read], [], [], left)
            self._take_bytes()
        return len(self.received)

    def watch(self, act: Callable[[], None]) -> threading.Thread:
        """Call `act()` once, from a thread of its own, as soon as a stop signal arrives (its
        byte may come before the handler has run in the main thread)."""
        def loop() -> None:
            while not any(n in STOP_SIGNALS for n in self._take_bytes()):
                select.select([self._read], [], [])
            act()

        t = threading.Thread(target=loop, name="stop-signals", daemon=True)
        t.start()
        return t

    def _take_bytes(self) -> bytes:
        got = b""
        while True:
            try:
                chunk = self._read.recv(256)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += chunk
