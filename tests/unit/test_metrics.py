"""runner/daemon/metrics.py: what each method puts in the exposition (parsed back with
prometheus_client's own parser), the scrape-time queue gauges and a store that fails under them;
then GET /metrics through a daemon: it needs the token, and webhook deliveries show by outcome."""
from __future__ import annotations

import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import AUTH, config, daemon_in_process, fake_pipeline, push_payload, send_github  # noqa: E402

from runner.daemon.metrics import QUEUE_WAIT_BUCKETS, STAGE_BUCKETS, Metrics  # noqa: E402

REPO = "https://git.example.com/me/app.git"


class _Store:
    def __init__(self, stats=None, error: Exception | None = None):
        self.stats = stats or {"by_status": {}, "oldest_queued_age": None}
        self.error = error

    def queue_stats(self):
        if self.error:
            raise self.error
        return self.stats


class _Core:
    def __init__(self, store=None, owner="a@host:/data", work_dir=Path("/nonexistent")):
        self.store = store or _Store()
        self.owner = owner
        self.work_dir = work_dir


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def scrape(m: Metrics) -> dict[tuple, float]:
    body, content_type = m.exposition()
    assert content_type.startswith("text/plain")
    return samples(body.decode())


def test_each_method_and_its_series():
    m = Metrics(_Core())
    m.run_claimed("app", 0.02)
    m.run_claimed("app", -3)  # clock skew between hosts: counted as no wait, not as negative time
    m.run_finished("app", "success", 42.0)
    m.run_finished("app", "failed", None)  # counted, no duration
    m.stage_finished("app", "build", "success", 600.0)
    m.stage_finished("app", "scan", "skipped", None)
    m.deploy_server("app", "web-1", "success", 7.5)
    m.lease_recovered("interrupted")
    m.lease_recovered("queued")
    m.lease_recovered("queued")
    m.delivery("github", "queued")
    m.delivery("github", "rejected")
    m.delivery("github", "queued")
    got = scrape(m)
    assert got[("runner_queue_wait_seconds_count", ("pipeline", "app"))] == 2
    assert got[("runner_queue_wait_seconds_sum", ("pipeline", "app"))] == 0.02
    assert got[("runner_queue_wait_seconds_bucket", ("le", "0.01"), ("pipeline", "app"))] == 1  # the skewed one
    assert got[("runner_queue_wait_seconds_bucket", ("le", "0.025"), ("pipeline", "app"))] == 2
    assert got[("runner_runs_total", ("pipeline", "app"), ("status", "success"))] == 1
    assert got[("runner_runs_total", ("pipeline", "app"), ("status", "failed"))] == 1
    assert got[("runner_run_duration_seconds_sum", ("pipeline", "app"), ("status", "success"))] == 42
    assert ("runner_run_duration_seconds_count", ("pipeline", "app"), ("status", "failed")) not in got
    stage = ("pipeline", "app"), ("stage", "build"), ("status", "success")
    assert got[("runner_stage_duration_seconds_bucket", ("le", "300.0"), *stage)] == 0
    assert got[("runner_stage_duration_seconds_bucket", ("le", "600.0"), *stage)] == 1
    assert not any(k[0].startswith("runner_stage_duration") and ("stage", "scan") in k for k in got)
    assert got[("runner_deploy_duration_seconds_sum", ("pipeline", "app"), ("server", "web-1"),
                ("status", "success"))] == 7.5
    assert got[("runner_lease_recoveries_total", ("status", "queued"))] == 2
    assert got[("runner_lease_recoveries_total", ("status", "interrupted"))] == 1
    assert got[("runner_deliveries_total", ("outcome", "queued"), ("provider", "github"))] == 2
    assert got[("runner_deliveries_total", ("outcome", "rejected"), ("provider", "github"))] == 1


def test_buckets_suit_ci():
    assert QUEUE_WAIT_BUCKETS[0] == 0.01 and QUEUE_WAIT_BUCKETS[-1] >= 1800
    assert STAGE_BUCKETS[0] <= 0.1 and 1800 in STAGE_BUCKETS
    got = scrape(_observed_stage(1799.0))
    labels = ("pipeline", "p"), ("stage", "build"), ("status", "success")
    assert got[("runner_stage_duration_seconds_bucket", ("le", "1200.0"), *labels)] == 0
    assert got[("runner_stage_duration_seconds_bucket", ("le", "1800.0"), *labels)] == 1


def _observed_stage(seconds: float) -> Metrics:
    m = Metrics(_Core())
    m.stage_finished("p", "build", "success", seconds)
    return m


def test_leadership_counts_transitions_only():
    m = Metrics(_Core(owner="b@h:/d"))
    got = scrape(m)
    assert got[("runner_leader", ("daemon", "b@h:/d"))] == 0
    assert got[("runner_leader_changes_total",)] == 0
    m.leader_changed(False)  # it was not the leader: nothing changed
    m.leader_changed(True)
    m.leader_changed(True)
    got = scrape(m)
    assert got[("runner_leader", ("daemon", "b@h:/d"))] == 1
    assert got[("runner_leader_changes_total",)] == 1
    m.leader_changed(False)
    got = scrape(m)
    assert got[("runner_leader", ("daemon", "b@h:/d"))] == 0
    assert got[("runner_leader_changes_total",)] == 2


def test_queue_gauges_are_read_at_scrape_time():
    store = _Store({"by_status": {"queued": 3, "running": 1, "success": 10}, "oldest_queued_age": 12.5})
    m = Metrics(_Core(store))
    got = scrape(m)
    assert got[("runner_store_runs", ("status", "queued"))] == 3
    assert got[("runner_store_runs", ("status", "running"))] == 1
    assert got[("runner_store_runs", ("status", "success"))] == 10
    assert got[("runner_store_runs", ("status", "interrupted"))] == 0  # present at 0, not missing
    assert got[("runner_queue_oldest_age_seconds",)] == 12.5
    store.stats = {"by_status": {}, "oldest_queued_age": None}
    got = scrape(m)
    assert got[("runner_store_runs", ("status", "queued"))] == 0
    assert got[("runner_queue_oldest_age_seconds",)] == 0
    assert got[("runner_metrics_errors_total",)] == 0


def test_a_failing_store_does_not_fail_the_scrape():
    store = _Store(error=RuntimeError("database is locked"))
    m = Metrics(_Core(store))
    m.delivery("gitea", "ping")
    for expected in (1, 2):
        got = scrape(m)
        assert not any(k[0] in ("runner_store_runs", "runner_queue_oldest_age_seconds") for k in got)
        assert got[("runner_metrics_errors_total",)] == expected
        assert got[("runner_deliveries_total", ("outcome", "ping"), ("provider", "gitea"))] == 1
    store.error = None
    got = scrape(m)
    assert ("runner_queue_oldest_age_seconds",) in got and got[("runner_metrics_errors_total",)] == 2


def test_each_daemon_has_its_own_registry():
    a, b = Metrics(_Core(owner="a")), Metrics(_Core(owner="b"))
    a.delivery("github", "queued")
    assert ("runner_deliveries_total", ("outcome", "queued"), ("provider", "github")) not in scrape(b)
    assert scrape(a)[("runner_deliveries_total", ("outcome", "queued"), ("provider", "github"))] == 1


def test_openmetrics_when_asked():
    m = Metrics(_Core())
    body, content_type = m.exposition("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_metrics_over_http_need_the_token_and_count_deliveries(tmp_path):
    pf = fake_pipeline(tmp_path)
    cfg = config(tmp_path, [{"name": "app", "file": str(pf), "repo": REPO}], concurrency=0)
    with daemon_in_process(cfg) as d:
        assert httpx.get(f"{d.url}/metrics").status_code == 401
        assert httpx.get(f"{d.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert send_github(d.url, push_payload(REPO), "m-1").status_code == 202
        assert send_github(d.url, push_payload(REPO), "m-1").json()["outcome"] == "duplicate"
        assert send_github(d.url, push_payload(REPO), "m-2", secret="wrong").status_code == 401
        r = httpx.get(f"{d.url}/metrics", headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = samples(r.text)
        for outcome, n in (("queued", 1), ("duplicate", 1), ("rejected", 1)):
            assert got[("runner_deliveries_total", ("outcome", outcome), ("provider", "github"))] == n, outcome
        assert got[("runner_store_runs", ("status", "queued"))] == 1  # concurrency 0: it waits
        assert got[("runner_queue_oldest_age_seconds",)] >= 0
        assert got[("runner_metrics_errors_total",)] == 0


def test_engine_figures_from_the_last_housekeeping(tmp_path):
    m = Metrics(_Core(work_dir=tmp_path))
    assert not [k for k in scrape(m) if k[0].startswith("runner_engine_")]  # none reported yet
    engines = tmp_path / "cache" / "engines"
    engines.mkdir(parents=True)
    (engines / "a.json").write_text('{"engine": "local", "disk_free_bytes": 5000, '
                                    '"build_cache_bytes": 700}')
    (engines / "b.json").write_text('{"engine": "ssh://root@build", "disk_free_bytes": null, '
                                    '"build_cache_bytes": 9}')
    (engines / "c.json").write_text("{not json")
    got = scrape(m)
    assert got[("runner_engine_disk_free_bytes", ("engine", "local"))] == 5000
    assert got[("runner_engine_build_cache_bytes", ("engine", "local"))] == 700
    assert got[("runner_engine_build_cache_bytes", ("engine", "ssh://root@build"))] == 9
    # An engine whose free disk is not known (tcp://): no sample rather than a made-up one.
    assert ("runner_engine_disk_free_bytes", ("engine", "ssh://root@build")) not in got
