"""state.json: what `up` started and made, so that `down` stops and removes exactly that.

{"version": 1, "servers": ["srv1", ...], "procs": {KEY: {"pid", "start", "argv", "log"}},
 "created": {"bridges": [...], "netns": [...], "veths": [...], "firewall": true}}

Each record names its process by pid and start time (runner.proc.Recorded), so a pid reused by
an unrelated process is never taken for it. The parts of the lab record into one State from
several threads during `up`; every change is written at once (atomically), so an interrupted
`up` leaves a file that names everything it started.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from runner_lab import host, layout
from runner_lab.errors import LabError
from runner_lab.layout import LabServer

STATE_VERSION = 1


def empty() -> dict:
    return {"version": STATE_VERSION, "servers": [], "procs": {}, "created": {}}


class State:
    """The lab's state dir, its state.json (`data`, after load()) and the progress log that
    every part of the lab writes to."""

    def __init__(self, directory: Path, log: host.Log):
        self.dir = directory
        self.log = log
        self.file = directory / "state.json"
        self._mutex = threading.Lock()
        self.data = empty()

    def load(self) -> dict:
        """Read state.json (an empty state when there is none); keys a file of an older version
        lacks are added."""
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            data = empty()
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {self.file}: {exc}") from exc
        for key, value in empty().items():
            data.setdefault(key, value)
        self.data = data
        return data

    def save(self) -> None:
        with self._mutex:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.file)

    def reset(self) -> None:
        """Nothing started, nothing made: after `down`."""
        self.data = empty()
        self.save()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One `up` or `down` at a time: every test session calls `up`, and several may run at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- processes -------------------------------------------------------------------------

    def recorded(self, key: str) -> dict | None:
        """The record of process `key` (alive or not), None if there is none."""
        return self.data["procs"].get(key)

    def record(self, key: str, rec: dict | None) -> None:
        """Record process `key` (None: forget it), written at once."""
        with self._mutex:
            if rec is None:
                self.data["procs"].pop(key, None)
            else:
                self.data["procs"][key] = rec
        self.save()

    def adopt(self, key: str, marker: str, exe: str) -> dict | None:
        """The recorded process if it is alive; else a process of ours that lost its record
        (found by its own config/pidfile path in argv, never by name alone), recorded now; else
        None."""
        rec = self.recorded(key)
        if host.alive(rec):
            return rec
        for found in host.pids_with_arg(marker, exe):
            self.log(f"adopting {key} (pid {found['pid']}) left without a record")
            self.record(key, found)
            return found
        return None

    # ---- what `up` made --------------------------------------------------------------------

    def created(self, key: str, value) -> None:
        """Note a network piece `up` made: a name is added to the list under `key`, any other
        value replaces it."""
        with self._mutex:
            created = self.data["created"]
            if isinstance(value, str):
                items = created.setdefault(key, [])
                if value not in items:
                    items.append(value)
            else:
                created[key] = value
        self.save()

    def add_servers(self, names: list[str]) -> None:
        """Servers that are up now, beside those already recorded (none is removed)."""
        with self._mutex:
            self.data["servers"] = sorted(set(self.data["servers"]) | set(names),
                                          key=lambda n: int(n[3:]))
        self.save()

    def servers(self) -> list[LabServer]:
        return sorted((layout.server_from_name(n, self.dir) for n in self.data["servers"]),
                      key=lambda s: s.index)
