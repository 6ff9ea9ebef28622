"""What housekeeping removes from a build engine, and what the disk reserve check says: pure
decisions over what the engine reported (pipelines/housekeeping.py asks it and carries them out).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runner.sizes import format_size


@dataclass(frozen=True)
class Image:
    id: str
    refs: tuple[str, ...]  # the pipeline's own tags of it (name:tag), the ones removed
    created: float  # when the engine got it (see engine_time), seconds since the epoch


@dataclass(frozen=True)
class Volume:
    name: str
    size: int  # bytes; -1 when the engine did not measure it
    created: str


@dataclass(frozen=True)
class Usage:
    """What uses a build engine's disk, from its /system/df (`docker system df`)."""

    images: int
    build_cache: int
    volumes: int
    containers: int

    def describe(self) -> str:
        return (f"images {format_size(self.images)}, build cache {format_size(self.build_cache)}, "
                f"volumes {format_size(self.volumes)}, containers {format_size(self.containers)}")


_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def engine_time(text: str | None) -> float | None:
    """An engine's RFC 3339 time (nanoseconds and all) -> epoch seconds; None for docker's
    zero time (`0001-01-01T00:00:00Z`: never tagged) or anything unreadable."""
    from datetime import datetime, timezone

    m = _TIME_RE.match(text or "")
    if m is None or m.group(1).startswith("0001-"):
        return None
    zone = m.group(3) or "Z"
    stamp = datetime.fromisoformat(m.group(1) + ("+00:00" if zone == "Z" else zone))
    return stamp.astimezone(timezone.utc).timestamp() + float("0." + (m.group(2) or "0"))


def image_time(inspected: Mapping[str, Any]) -> float:
    """When the engine got an image: when it was last tagged (built, pulled or tagged here).
    Not `Created`: the build dates an image by its commit, so a rebuild of an old commit
    would count as old while its run is still pushing it."""
    return engine_time((inspected.get("Metadata") or {}).get("LastTagTime")) or \
        engine_time(inspected.get("Created")) or 0.0


def usage_of(df: Mapping[str, Any]) -> Usage:
    """The engine's /system/df answer -> Usage. Shared layers count once (LayersSize)."""
    def total(items: Iterable[Mapping[str, Any]] | None, *path: str) -> int:
        out = 0
        for item in items or ():
            value: Any = item
            for key in path:
                value = (value or {}).get(key)
            out += max(0, int(value or 0))
        return out

    return Usage(images=max(0, int(df.get("LayersSize") or 0)),
                 build_cache=total(df.get("BuildCache"), "Size"),
                 volumes=total(df.get("Volumes"), "UsageData", "Size"),
                 containers=total(df.get("Containers"), "SizeRw"))


def images_to_remove(images: Iterable[Image], keep: int, in_use: set[str],
                     just_built: str | None) -> list[Image]:
    """The pipeline's images beyond the newest `keep` (by image_time), less those a container
    uses and the one the run just built (kept whatever its time). Oldest first."""
    newest_first = sorted(images, key=lambda i: (i.created, i.id), reverse=True)
    beyond = newest_first[keep:]
    return [i for i in reversed(beyond) if i.id not in in_use and i.id != just_built]


def volumes_to_remove(volumes: Iterable[Volume], limit: int, in_use: set[str]) -> list[Volume]:
    """The oldest cache volumes that must go for the rest to fit in `limit` bytes; a volume a
    container uses stays (and still counts)."""
    ordered = sorted(volumes, key=lambda v: (v.created, v.name))
    total = sum(max(0, v.size) for v in ordered)
    out: list[Volume] = []
    for v in ordered:
        if total <= limit:
            break
        if v.name in in_use:
            continue
        out.append(v)
        total -= max(0, v.size)
    return out


def below_reserve(where: str, free: int, reserve: int, usage: Usage | None) -> str:
    """The run's failure when a disk has less than the reserve free."""
    uses = f"; on the build engine: {usage.describe()}" if usage is not None else ""
    return (f"not enough disk space to start the run: {where} has {format_size(free)} free, "
            f"less than build.disk_reserve ({format_size(reserve)}){uses}. Free space (e.g. "
            "`runner gc PIPELINE`, `docker builder prune`), or lower build.keep_images, "
            "build.cache_limit or build.test_cache_limit")
