"""Which of an app's images a server may drop, and the record of the images the runner pulled
for it. Pure: the deployer lists, writes and removes.

The history (deployers.history) lists verified releases only, so the image of a release that
failed its health gate, was rolled back or was interrupted appears in no history entry. The
runner therefore keeps a record of every image it pulls for an app: one empty file per image
in `apps/<app>/pulled/` on the server, named by the image reference (base64url, so that a name
is one path component and one listing reads them all). After a commit, what the runner pulled
and what fell out of the last `keep_versions` verified releases is removed, except the kept
releases and the one now running; `runner app remove` removes every image the record, the
history or a container names.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from runner.model.image import ImageRef

from deployers.health import ContainerState
from deployers.spec import identity_of

PULLED_DIR = "pulled"  # in apps/<app>/ on the server


def marker_name(ref: str) -> str:
    """The file name that records `ref` (an image by digest) as pulled."""
    return base64.urlsafe_b64encode(ref.encode()).decode().rstrip("=")


def marker_ref(name: str) -> str | None:
    """The image reference a file name records, or None for a name that records none (a
    stray file): only `name@sha256:<64 hex>` comes back, never a word docker could read as an
    option."""
    try:
        text = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        ref = ImageRef.parse(text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return None if ref.name.startswith("-") else str(ref)


@dataclass(frozen=True)
class Prune:
    ref: str
    why: str  # for the deploy log


def images_to_prune(*, pulled: Iterable[str], dropped: Iterable[str], kept: Iterable[str],
                    running: str) -> list[Prune]:
    """The images to remove after a commit: those of releases that just fell out of the
    history (`dropped`), and those the runner pulled for the app (`pulled`) whose release is
    not among the `kept` verified ones (it failed, was rolled back or interrupted, or fell out
    earlier while a container still used it). Never a kept release's image nor the `running`
    one. In that order, each once."""
    spared = {*kept, running}
    out: dict[str, Prune] = {}
    for ref in dropped:
        if ref not in spared and ref not in out:
            out[ref] = Prune(ref, "it fell out of the kept verified releases")
    for ref in pulled:
        if ref not in spared and ref not in out:
            out[ref] = Prune(ref, "pulled for a release that is not a kept verified one")
    return list(out.values())


def every_image(*, history: Iterable[str], containers: Iterable[str],
                pulled: Iterable[str]) -> list[str]:
    """Every image of an app on a server, for `runner app remove`: those of its release
    history, of its containers (by digest: a container started from a tag by hand is not the
    runner's to untag) and those the runner pulled for it. Each once, in that order."""
    out: list[str] = []
    for ref in (*history, *containers, *pulled):
        if isinstance(ref, str) and "@sha256:" in ref and ref not in out:
            out.append(ref)
    return out


def kept_to_prune(app: str, containers: Iterable[ContainerState], wanted: set[tuple[str, str, str]]
                  ) -> list[str]:
    """The ids of the app's kept copies (`<app>_kept_<run>`, the proxy cutover's stopped
    previous releases) whose release (identity) is no longer among the `wanted` identities of
    the server's history."""
    return [c.id for c in containers
            if c.name.startswith(f"{app}_kept_") and identity_of(c.labels) not in wanted]


def holding_ports(ports: Iterable[str], containers: Iterable[ContainerState]
                 ) -> list[ContainerState]:
    """Of these kept copies, those running and publishing one of `ports`
    (docker -p syntax, "HOST:CONTAINER"): an engine restart brought them back, and the proxy
    cannot start while they hold its ports."""
    hosts = {p.split(":")[0] for p in ports}
    return [c for c in containers
            if c.running and hosts & {p.split(":")[0] for p in c.published}]
