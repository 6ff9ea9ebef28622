"""The soak at a small size (issue 24): one daemon on SQLite runs 10 real pipelines back to back
(checkout and a tiny build on the lab's engine, as bench/soak.py does for 500): the pipeline's
images on the build engine never exceed build.keep_images, the daemon's RSS after the last run
is within 20 % of its RSS after the third (the first runs load what the daemon imports lazily:
the runs' API, the store's statements), and every run's record is complete."""
from __future__ import annotations

import pytest

from bench.soak import KEEP_IMAGES, soak

pytestmark = pytest.mark.soak
RUNS = 10


def test_a_daemon_running_runs_back_to_back_keeps_images_and_memory_flat(lab, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("RUNNER_SOAK_REGISTRY", lab["registry"])
    images = []
    result = soak("sqlite", RUNS, 0, 0, tmp_path, None,
                  check_each=lambda n, sample: images.append(sample["images"]))
    assert result["incomplete_records"] == {}
    assert len(images) == RUNS and max(images) <= KEEP_IMAGES, images
    assert images[-1] == KEEP_IMAGES  # before housekeeping: one image per run, 10
    rss = result["rss_mb"]
    assert rss[f"after_run_{RUNS}"] / rss["after_run_3"] <= 1.2, rss
