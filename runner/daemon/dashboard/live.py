"""Wake-ups for the live parts of the dashboard (server-sent events).

The worker threads of this daemon call `changed(run_id)` after they stored log lines, a stage
event or a run's end; each event stream waiting on that run (an asyncio task on the HTTP
server's loop) wakes at once and reads the store. A run executed by another daemon sharing the
store sends no wake-up here: its streams look at the store every `POLL` seconds instead.
"""
from __future__ import annotations

import asyncio
import threading

POLL = 1.0  # seconds between looks at the store when no wake-up comes (another daemon's run)


class LiveHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int | None, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        # How many changes each run has seen: a stream takes `version()` before it reads the
        # store and waits from there, so a change between its read and its wait is not missed.
        self._versions: dict[int | None, int] = {}
        self.closed = False

    def version(self, run_id: int | None) -> int:
        with self._lock:
            return self._versions.get(run_id, 0)

    def changed(self, run_id: int | None, listed: bool = False) -> None:
        """From any thread: run `run_id` changed (its log, a stage). `listed`: and so did what
        the runs list shows of it (queued, started, ended, cancelled); run_id None: the list
        alone changed (a new run)."""
        keys = {run_id, None} if listed or run_id is None else {run_id}
        with self._lock:
            if len(self._versions) > 10_000:  # forgotten versions only cause one early wake-up
                self._versions.clear()
            for key in keys:
                self._versions[key] = self._versions.get(key, 0) + 1
            waiting = [w for key in keys for w in self._waiting.get(key, ())]
        for loop, event in waiting:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its stream is gone
                pass

    def close(self) -> None:
        """The daemon stops: every stream ends, so that the HTTP server can shut down."""
        self.closed = True
        with self._lock:
            waiting = [w for ws in self._waiting.values() for w in ws]
        for loop, event in waiting:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    async def wait(self, run_id: int | None, since: int, timeout: float = POLL) -> None:
        """Until `run_id` changed after `version()` returned `since`, the hub closed, or
        `timeout` seconds passed."""
        if self.closed:
            return
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._versions.get(run_id, 0) != since:
                return
            self._waiting.setdefault(run_id, set()).add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                ws = self._waiting.get(run_id)
                if ws is not None:
                    ws.discard(entry)
                    if not ws:
                        del self._waiting[run_id]
