"""The pure decisions of housekeeping (runner/disk.py) and sizes as pipelines write them
(runner/sizes.py)."""
from __future__ import annotations

import pytest

from runner.disk import Image, Volume, engine_time, image_time, images_to_remove, usage_of, \
    volumes_to_remove
from runner.sizes import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("10GB", 10 * 10**9), ("512MiB", 512 * 2**20), ("2 gb", 2 * 10**9), ("1.5KB", 1500),
    ("0", 0), (123, 123), ("7", 7)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["10 parsecs", "GB", "-1GB", "", True, -5])
def test_sizes_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (0, 999, 2_097_152, 4.8e9, 1e14)] == \
        ["0 B", "999 B", "2.1 MB", "4.8 GB", "100 TB"]


def _img(n: int) -> Image:
    return Image(f"sha256:{n}", (f"app:{n}",), float(n))


def test_images_beyond_keep_oldest_first_never_in_use_nor_just_built():
    images = [_img(n) for n in (3, 1, 5, 2, 4)]
    assert images_to_remove(images, 3, set(), None) == [_img(1), _img(2)]
    assert images_to_remove(images, 3, {"sha256:1"}, None) == [_img(2)]
    # The one just built stays even when it is not among the newest (a tag time tie, a clock).
    assert images_to_remove(images, 3, set(), "sha256:2") == [_img(1)]
    assert images_to_remove(images, 5, set(), None) == []


def test_cache_volumes_oldest_go_until_the_rest_fits():
    vols = [Volume("a", 600, "2026-01-01"), Volume("b", 300, "2026-01-02"),
            Volume("c", 300, "2026-01-03")]
    assert volumes_to_remove(vols, 1200, set()) == []
    assert volumes_to_remove(vols, 700, set()) == [vols[0]]
    assert volumes_to_remove(vols, 500, set()) == [vols[0], vols[1]]
    assert volumes_to_remove(vols, 700, {"a"}) == [vols[1], vols[2]]


def test_engine_times():
    assert engine_time("2026-12-07T23:33:47.5Z") == pytest.approx(1796686427.5)
    assert engine_time("2026-12-08T00:33:47+01:00") == pytest.approx(1796686427.0)
    assert engine_time("0001-01-01T00:00:00Z") is None
    # Never tagged here (pulled by digest): its creation time instead.
    assert image_time({"Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
                       "Created": "2026-12-07T23:33:47Z"}) == pytest.approx(1796686427.0)


def test_usage_from_system_df():
    usage = usage_of({"LayersSize": 1000, "BuildCache": [{"Size": 5}, {"Size": 7}],
                      "Volumes": [{"UsageData": {"Size": 3}}, {"UsageData": {"Size": -1}}],
                      "Containers": [{"SizeRw": 2}]})
    assert (usage.images, usage.build_cache, usage.volumes, usage.containers) == (1000, 12, 3, 2)
    assert usage.describe() == "images 1.0 kB, build cache 12 B, volumes 3 B, containers 2 B"
