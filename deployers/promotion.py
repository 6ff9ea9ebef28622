"""Which release `runner promote --from A --to B` moves: the one last verified on A. Pure.

A's servers each keep their verified releases (deployers.history); the release to promote is
the newest entry among them (by the time its deploy committed it), so a server that missed A's
last deploy (it was added since) does not hold the promotion back to an older one. The entry
carries the image by digest (`ref`, `name@sha256:...`): that exact image goes to B, nothing is
rebuilt; B's own settings (servers, env from B's variables) make its container. A promotion
on a tag (the daemon's triggers.tag) moves the tag's commit only (require_commit).
"""
from __future__ import annotations

from runner.model.image import ImageRef


class NothingToPromote(ValueError):
    """The source destination has no verified release (or none a promotion can use)."""


def release_to_promote(source: str, histories: list[tuple[str, list[dict]]]
                       ) -> tuple[ImageRef, dict]:
    """(the image by digest, its history entry) last verified on destination `source`, from
    (server, history oldest first) of each of its servers. Raises NothingToPromote saying why."""
    newest = [(server, h[-1]) for server, h in histories if h]
    if not newest:
        servers = ", ".join(s for s, _ in histories)
        raise NothingToPromote(f"nothing is verified on {source}: no release is recorded in the "
                               f"history of {source} on {servers} (deploy there first: "
                               f"runner exec -d {source})")
    server, entry = max(newest, key=lambda se: _time(se[1]))
    try:
        image = ImageRef.parse(str(entry.get("ref", "")))
    except ValueError as exc:
        raise NothingToPromote(f"the release last verified on {source} ({server}) names no "
                               f"image by digest: {exc}") from None
    if not image.digest or image.digest != entry.get("digest"):
        raise NothingToPromote(f"the release last verified on {source} ({server}) records "
                               f"{entry.get('ref')!r}, not its digest {entry.get('digest')!r}")
    return image, entry


def require_commit(source: str, entry: dict, commit: str) -> None:
    """Raises NothingToPromote, naming both commits, unless `entry` (the release last verified
    on `source`) is `commit` (full, or its first 7 or more hex digits): a promotion on a tag
    moves the tag's commit or nothing."""
    verified = str(entry.get("commit") or "")
    if not commit or not verified.startswith(commit.lower()):
        raise NothingToPromote(f"the release last verified on {source} is commit "
                               f"{verified[:12] or '(none recorded)'} (run "
                               f"{entry.get('run_id', '?')}), not {commit[:12]}: deploy "
                               f"{commit[:12]} to {source} first (nothing was changed)")


def _time(entry: dict) -> float:
    t = entry.get("time")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else 0.0
