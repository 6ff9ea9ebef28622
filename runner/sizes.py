"""Sizes of disk space as a pipeline writes them ("10GB", "512MiB", "2 GB", 1000000) and as
messages show them. Pure.

KB, MB, GB, TB are powers of 1000 (as `df -H` and docker's own size columns count), KiB, MiB,
GiB, TiB powers of 1024; a bare number is bytes. The value handed to docker is always the
whole number of bytes, so docker's own reading of units never matters."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Bytes of `value`; ValueError saying what is accepted."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10GB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    m = _SIZE_RE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size: write a number and a unit, e.g. 10GB or "
                         "512MiB (KB/MB/GB/TB count in 1000s, KiB/MiB/GiB/TiB in 1024s)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int | float) -> str:
    """e.g. 1.2 GB, 340 MB, 12 kB, 0 B (powers of 1000, as docker shows sizes)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
