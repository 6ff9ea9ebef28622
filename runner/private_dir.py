"""Directories only the runner's own user may enter: a run's directory (its checkout, logs and
reports), the caches (git mirrors, Trivy's database). What a repository holds, a private key
committed by mistake included, must not be readable by every user of the machine."""
from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """`path` as a directory of mode 0700, made with its parents when missing. An existing one
    is tightened too: a runner before this one made them 0755, and mkdir's mode is cut by the
    umask anyway."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
