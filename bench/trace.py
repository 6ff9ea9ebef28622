"""A timeline of what the deploy stage does on the servers, for `bench.rundeploy`.

cProfile sees only the main thread, which just waits for the per-server threads; what costs
time in a deploy is the remote work. This wraps the transport's entry points (connect, run,
SFTP) in place, without changing what they do, and records for each call: server, what, when it
started (seconds from `start()`), how long it took.
"""
from __future__ import annotations

import functools
import threading
import time

_records: list[dict] = []
_lock = threading.Lock()
_t0 = time.monotonic()


def _note(server: str, what: str, started: float) -> None:
    with _lock:
        _records.append({"server": server, "what": what, "at": round(started - _t0, 4),
                         "took": round(time.monotonic() - started, 4)})


def _describe(argv) -> str:
    words = [str(a) for a in argv]
    if words[:1] == ["docker"]:
        words = words[1:]
        if words[:1] == ["container"]:
            words = words[1:]
        head = words[0] if words else ""
        if head == "exec":
            return "exec " + " ".join(w for w in words[2:3])[:40]
        return head
    return " ".join(words)[:40]


def install() -> None:
    global _t0
    _t0 = time.monotonic()
    import deployers.health_probe as hp
    import deployers.ssh_connection as sc
    import deployers.ssh_docker as sd

    def timed(real, where, what):
        """`real`, noting how long each call took under (where(args), what(args))."""
        @functools.wraps(real)
        def call(*a, **kw):
            t = time.monotonic()
            try:
                return real(*a, **kw)
            finally:
                _note(where(a), what(a), t)
        return call

    first_label = lambda a: a[0].label  # noqa: E731  (a target, a connection, or self)
    sd.connect = timed(sd.connect, first_label, lambda a: "ssh connect")
    hp.http_get = timed(hp.http_get, first_label, lambda a: "http probe")

    def wrap(name: str, what):
        setattr(sc.Connection, name,
                timed(getattr(sc.Connection, name), first_label, lambda a: what(a[1:])))

    wrap("run", lambda a: _describe(a[0]) if a else "run")
    for name in ("sftp_do", "write_private_file", "ensure_private_dir", "remove_file"):
        if hasattr(sc.Connection, name):
            wrap(name, lambda a, n=name: f"sftp {n}")


def records() -> list[dict]:
    with _lock:
        return sorted(_records, key=lambda r: r["at"])
