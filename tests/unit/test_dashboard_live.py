"""The dashboard's wake-ups (runner/daemon/dashboard/live.py): a stream waiting on a run wakes
when a worker thread says that run changed, a change made between a stream's read and its wait is
not missed, and the runs list wakes only for what it shows."""
from __future__ import annotations

import asyncio
import threading
import time

from runner.daemon.dashboard.live import LiveHub


def _woke(hub: LiveHub, key, since: int, timeout: float = 2.0) -> float:
    async def wait() -> float:
        t0 = time.monotonic()
        await hub.wait(key, since, timeout=timeout)
        return time.monotonic() - t0
    return asyncio.run(wait())


def test_a_change_from_another_thread_wakes_the_stream_at_once():
    hub = LiveHub()
    since = hub.version(7)
    threading.Timer(0.05, hub.changed, args=(7,)).start()
    assert _woke(hub, 7, since) < 1.0  # woken, not timed out (2 s)


def test_a_change_before_the_wait_is_not_missed():
    hub = LiveHub()
    since = hub.version(7)
    hub.changed(7)  # between the stream's read of the store and its wait
    assert _woke(hub, 7, since) < 0.1


def test_log_lines_do_not_wake_the_runs_list_but_an_ended_run_does():
    hub = LiveHub()
    since = hub.version(None)
    hub.changed(7)  # a batch of log lines
    assert hub.version(None) == since
    hub.changed(7, listed=True)  # the run ended
    assert hub.version(None) == since + 1
    hub.changed(None)  # a new run queued
    assert hub.version(None) == since + 2 and hub.version(7) == 2


def test_closing_ends_every_wait():
    hub = LiveHub()
    since = hub.version(3)
    threading.Timer(0.05, hub.close).start()
    assert _woke(hub, 3, since) < 1.0
    assert _woke(hub, 3, hub.version(3)) < 0.05  # closed: no waiting at all
