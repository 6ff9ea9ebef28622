"""Removing the runner's own files on a server, through SFTP (callers pass the SFTP client, as
inside `Connection.sftp_do`)."""
from __future__ import annotations

import re
import stat
import time


def remove_tree(sftp, path: str) -> bool:
    """Remove `path` and all it holds; False if it was not there. Entries that vanish meanwhile
    (another run sweeping too) are not an error."""
    try:
        entries = sftp.listdir_attr(path)
    except FileNotFoundError:
        return False
    for e in entries:
        p = f"{path}/{e.filename}"
        if stat.S_ISDIR(e.st_mode or 0):
            remove_tree(sftp, p)
        else:
            try:
                sftp.remove(p)
            except FileNotFoundError:
                pass
    try:
        sftp.rmdir(path)
    except FileNotFoundError:
        return False
    return True


def sweep(sftp, directory: str, pattern: str, min_age: float = 0.0) -> list[str]:
    """Remove the entries of `directory` whose whole name matches `pattern` and that are at
    least `min_age` seconds old (by their mtime); the paths removed."""
    try:
        entries = sftp.listdir_attr(directory)
    except FileNotFoundError:
        return []
    gone = []
    for e in entries:
        if re.fullmatch(pattern, e.filename) and time.time() - (e.st_mtime or 0) >= min_age:
            p = f"{directory}/{e.filename}"
            if stat.S_ISDIR(e.st_mode or 0):
                remove_tree(sftp, p)
            else:
                try:
                    sftp.remove(p)
                except FileNotFoundError:
                    continue
            gone.append(p)
    return gone
