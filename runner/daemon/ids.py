"""Run ids and log positions as they arrive in a URL. The store keeps them as signed 64-bit
integers (SQLite's INTEGER, PostgreSQL's BIGINT): a bigger number names no run, and must be
refused where it arrives (a path: 404; a query: 400), not reach a query that overflows (500)."""
from __future__ import annotations

MAX = 2**63 - 1


def whole(text: str | None, lowest: int = 0) -> int | None:
    """`text` as a whole number from `lowest` to MAX (ASCII digits only, no sign), or None."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    try:
        n = int(text)
    except ValueError:  # more digits than int() reads
        return None
    return n if lowest <= n <= MAX else None


def run_id(text: str | None) -> int | None:
    """A run id (1 to MAX), or None."""
    return whole(text, 1)
