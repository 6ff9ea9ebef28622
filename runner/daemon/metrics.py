"""Prometheus metrics of one daemon, served on GET /metrics (under the read API's token rule).

Each `Metrics` owns its own CollectorRegistry: several daemons live in one test process, and a
global registry would mix their counters (and refuse the second daemon's metric names).

The worker pool and the service call the `run_*`, `stage_*`, `deploy_*`, `lease_*` and
`leader_*` methods as things happen; api.py calls `delivery()` for every webhook answered. Queue
depth is not pushed: it is read from the store at scrape time, so that it counts the runs of
every daemon sharing the store, and a scrape whose store read fails still answers (without those
gauges; runner_metrics_errors_total says it happened).

Every method is safe to call from any thread.
"""
from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from runner.daemon.store import ACTIVE, FINAL

log = logging.getLogger("runner.daemon.metrics")

# A claim normally follows its webhook within milliseconds; a run waiting for its concurrency
# group or a free worker can wait for minutes behind a long deploy.
QUEUE_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A checkout takes a second, a cold image build or a rolling deploy tens of minutes.
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 7200)
DEPLOY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800)

RUN_STATUSES = (*ACTIVE, *FINAL)


class _QueueCollector:
    """runner_store_runs{status} and runner_queue_oldest_age_seconds, read from the store per scrape.

    Not "runner_runs": that family is the runner_runs_total counter, and one name cannot be both
    (OpenMetrics refuses it, and so does the registry)."""

    def __init__(self, core):
        self._core = core
        self._errors = 0
        self._lock = threading.Lock()

    def describe(self):
        # Names only: registering must not read the store (it may not be open yet).
        yield GaugeMetricFamily("runner_store_runs", "Runs in the store by status (every daemon sharing it).",
                                labels=["status"])
        yield GaugeMetricFamily("runner_queue_oldest_age_seconds", "Age of the oldest queued run.")
        yield CounterMetricFamily("runner_metrics_errors", "Scrapes whose store read failed.")

    def collect(self):
        try:
            stats = self._core.store.queue_stats()
            by_status = dict(stats.get("by_status") or {})
            oldest = stats.get("oldest_queued_age")
        except Exception as exc:  # noqa: BLE001 - a broken store must not break the scrape too
            with self._lock:
                self._errors += 1
            log.warning("metrics: cannot read queue stats from the store", extra={"error": str(exc)})
        else:
            runs = GaugeMetricFamily("runner_store_runs", "Runs in the store by status (every daemon sharing it).",
                                     labels=["status"])
            # Every known status, 0 when absent: a gauge that vanishes reads as "no data", not as 0.
            for status in (*RUN_STATUSES, *sorted(set(by_status) - set(RUN_STATUSES))):
                runs.add_metric([status], float(by_status.get(status, 0)))
            yield runs
            age = GaugeMetricFamily("runner_queue_oldest_age_seconds",
                                    "Age of the oldest queued run (0 when nothing is queued).")
            age.add_metric([], max(0.0, float(oldest)) if oldest is not None else 0.0)
            yield age
        with self._lock:
            errors = self._errors
        failures = CounterMetricFamily("runner_metrics_errors", "Scrapes whose store read failed.")
        failures.add_metric([], errors)
        yield failures


class _EngineCollector:
    """runner_engine_disk_free_bytes{engine} and runner_engine_build_cache_bytes{engine}: what
    each build engine reported at its last housekeeping (pipelines/housekeeping.py writes it
    under the runs' data dir after a run, at most every DF_INTERVAL), read per scrape: a
    scrape never waits for an engine."""

    def __init__(self, core):
        self._core = core

    def describe(self):
        return ()  # no fixed names: the families exist once an engine has reported

    def collect(self):
        from pipelines.housekeeping import recorded

        records = recorded(self._core.work_dir / "cache")
        free = GaugeMetricFamily("runner_engine_disk_free_bytes",
                                 "Free disk of a build engine's data, at its last housekeeping.",
                                 labels=["engine"])
        cache = GaugeMetricFamily("runner_engine_build_cache_bytes",
                                  "BuildKit's cache on a build engine, at its last housekeeping.",
                                  labels=["engine"])
        for r in records:
            if r.get("disk_free_bytes") is not None:
                free.add_metric([str(r.get("engine"))], float(r["disk_free_bytes"]))
            cache.add_metric([str(r.get("engine"))], float(r.get("build_cache_bytes") or 0))
        if records:
            yield free
            yield cache


class Metrics:
    def __init__(self, core):
        self.core = core
        self.registry = CollectorRegistry()
        r = self.registry
        self._queue_wait = Histogram("runner_queue_wait_seconds", "From queued to claimed by a worker.",
                                     ["pipeline"], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self._runs = Counter("runner_runs", "Runs finished, by final status.", ["pipeline", "status"],
                             registry=r)
        self._run_duration = Histogram("runner_run_duration_seconds", "From claimed to finished.",
                                       ["pipeline", "status"], buckets=RUN_BUCKETS, registry=r)
        self._stage_duration = Histogram("runner_stage_duration_seconds", "One stage of a run.",
                                         ["pipeline", "stage", "status"], buckets=STAGE_BUCKETS, registry=r)
        self._deploy_duration = Histogram("runner_deploy_duration_seconds", "The deploy to one server.",
                                          ["pipeline", "server", "status"], buckets=DEPLOY_BUCKETS, registry=r)
        self._lease_recoveries = Counter("runner_lease_recoveries", "Runs left by a dead worker, by what became of them.",
                                         ["status"], registry=r)
        self._leader_changes = Counter("runner_leader_changes", "Times this daemon became or stopped being the leader.",
                                       registry=r)
        self._leader = Gauge("runner_leader", "1 while this daemon is the leader (runs poll and cron).",
                             ["daemon"], registry=r)
        self._deliveries = Counter("runner_deliveries", "Webhook deliveries answered, by outcome.",
                                   ["provider", "outcome"], registry=r)
        r.register(_QueueCollector(core))
        r.register(_EngineCollector(core))
        self._is_leader = False
        self._leader_lock = threading.Lock()
        self._leader.labels(self._daemon()).set(0)

    def _daemon(self) -> str:
        return str(getattr(self.core, "owner", "") or "")

    # -- what the worker pool and the service call ---------------------------------------------

    def run_claimed(self, pipeline: str, wait_seconds: float) -> None:
        # Clocks of daemons on different hosts may disagree: a negative wait is a skew, not a time.
        self._observe(self._queue_wait.labels(pipeline), wait_seconds)

    def run_finished(self, pipeline: str, status: str, duration: float | None) -> None:
        self._runs.labels(pipeline, status).inc()
        if duration is not None:
            self._observe(self._run_duration.labels(pipeline, status), duration)

    def stage_finished(self, pipeline: str, stage: str, status: str, duration: float | None) -> None:
        if duration is not None:
            self._observe(self._stage_duration.labels(pipeline, stage, status), duration)

    def deploy_server(self, pipeline: str, server: str, status: str, duration: float | None) -> None:
        if duration is not None:
            self._observe(self._deploy_duration.labels(pipeline, server, status), duration)

    def lease_recovered(self, status: str) -> None:
        self._lease_recoveries.labels(status).inc()

    def leader_changed(self, is_leader: bool) -> None:
        """Counts transitions only (a daemon starts as not the leader): a caller repeating the
        current state changes nothing."""
        with self._leader_lock:
            if bool(is_leader) != self._is_leader:
                self._is_leader = bool(is_leader)
                self._leader_changes.inc()
            self._leader.labels(self._daemon()).set(1 if self._is_leader else 0)

    def delivery(self, provider: str, outcome: str) -> None:
        self._deliveries.labels(provider, outcome or "unknown").inc()

    # -- the scrape ----------------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): OpenMetrics when the scraper asks for it, else the text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    @staticmethod
    def _observe(histogram, seconds: float) -> None:
        histogram.observe(max(0.0, float(seconds)))
