"""A steady, bounded HTTP request loop against the lab's servers, for the zero-downtime tests
and benchmark: one thread per URL, a new connection per request (as most clients and load
balancers' health checks do), a fixed rate, a hard cap on time. Only ever pointed at loopback or
the lab's own namespaces.
"""
from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hit:
    url: str
    start: float  # monotonic
    seconds: float
    status: int | None  # None: no HTTP answer
    body: str  # the first line, or the error

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Load:
    """`with Load(targets, rate=40) as load: ...` then `load.report()`. targets: (host, port,
    Host header or None)."""

    targets: list[tuple[str, int, str | None]]
    rate: float = 40.0  # requests per second per target
    max_seconds: float = 180.0
    timeout: float = 2.0
    path: str = "/"
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(t,), daemon=True)
                         for t in self.targets]

    def _one(self, host: str, port: int, header: str | None) -> tuple[int | None, str]:
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.request("GET", self.path, headers={"Host": header} if header else {})
            r = conn.getresponse()
            body = r.read().decode("utf-8", "replace").strip().splitlines()
            return r.status, body[0][:60] if body else ""
        except (OSError, http.client.HTTPException) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:120]
        finally:
            conn.close()

    def _loop(self, target: tuple[str, int, str | None]) -> None:
        host, port, header = target
        url = f"http://{header or host}@{host}:{port}{self.path}"
        interval = 1.0 / self.rate
        began = time.monotonic()
        nxt = began
        while not self._stop.is_set() and time.monotonic() - began < self.max_seconds:
            t0 = time.monotonic()
            status, body = self._one(host, port, header)
            hit = Hit(url, t0, time.monotonic() - t0, status, body)
            with self._lock:
                self.hits.append(hit)
            nxt += interval
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)

    # ------------------------------------------------------------------ figures

    def failed(self) -> list[Hit]:
        return [h for h in self.hits if not h.ok]

    def bodies(self) -> set[str]:
        return {h.body for h in self.hits if h.ok}

    def longest_gap(self) -> float:
        """The longest time between two successful answers of one URL (seconds)."""
        worst = 0.0
        for url in {h.url for h in self.hits}:
            times = sorted(h.start + h.seconds for h in self.hits if h.url == url and h.ok)
            for a, b in zip(times, times[1:]):
                worst = max(worst, b - a)
        return worst

    def latency(self, q: float) -> float:
        xs = sorted(h.seconds for h in self.hits if h.ok)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def report(self) -> dict:
        fails = self.failed()
        return {"requests": len(self.hits), "failed": len(fails),
                "failures": [f"{h.url} {h.status} {h.body}" for h in fails[:10]],
                "bodies": sorted(self.bodies()), "longest_gap": round(self.longest_gap(), 4),
                "p50": round(self.latency(0.5), 5), "p99": round(self.latency(0.99), 5),
                "interval": round(1.0 / self.rate, 4)}
