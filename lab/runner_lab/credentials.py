"""The lab's password files: made once at random, 0600 from their first byte on, kept across
`down`/`up` (so that the registries' htpasswd entries and the PostgreSQL role's password stay
valid)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from runner_lab import host


def read_password(path: Path) -> str | None:
    """The password in `path`, None if there is no such file or it is empty."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ensure_password(pw_file: Path, whose: str, log: host.Log) -> str:
    """The password kept in `pw_file` (0600), made once at random and kept across down/up; a
    file someone made readable to others is made private again."""
    password = read_password(pw_file)
    if password is None:
        password = secrets.token_hex(16)
        write_private(pw_file, password + "\n")
        log(f"made the password of {whose}: {pw_file}")
    elif pw_file.stat().st_mode & 0o077:
        pw_file.chmod(0o600)
    return password


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, from its first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
