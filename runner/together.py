"""Running a few jobs of one stage at the same time (each usually waiting on a child process of
its own), as one: their results in the order they were given, whichever finishes first; when one
fails or the run is cancelled, the others are stopped rather than left to run for nothing.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from runner.errors import Cancelled

T = TypeVar("T")

_POLL = 0.1  # seconds between two looks at the run's cancel event while the jobs run


def together(jobs: Sequence[Callable[[threading.Event], T]], cancel: threading.Event) -> list[T]:
    """Run every job at once, each in a thread, and return their results in the jobs' order.

    Each job is given `halt`, which it honours as it would the run's cancel event (it passes it
    to run_command, which then stops its child and raises Cancelled): halt is set once `cancel`
    is, or once a job has raised, and `together` returns or raises only when every job has
    ended. What it raises: Cancelled if the run was cancelled; else the error of the first job,
    in the jobs' order, that failed by itself (not the Cancelled that halt caused in the
    others). An interrupt while waiting halts every job, and is raised as Cancelled once they
    have ended."""
    halt = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = [pool.submit(job, halt) for job in jobs]
        try:
            pending: set[Future[T]] = set(futures)
            while pending:
                done, pending = wait(pending, timeout=_POLL, return_when=FIRST_EXCEPTION)
                if cancel.is_set() or any(f.exception() is not None for f in done):
                    halt.set()
        except KeyboardInterrupt as exc:
            halt.set()
            wait(futures)  # each job stops its own child
            raise Cancelled("interrupted") from exc
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if not errors:
        return [f.result() for f in futures]
    if cancel.is_set():
        raise next((e for e in errors if isinstance(e, Cancelled)), Cancelled("cancelled"))
    raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
