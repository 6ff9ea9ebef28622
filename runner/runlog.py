"""Where a run's events and logs go: masked, to disk (per stage), and to the live sinks.

Every line that leaves a run passes `RunLog.emit`, which masks secret values first: one masker,
one place, so a secret cannot reach a log file, the terminal or --json output by another path.

The files are the run's record; the sinks only show it. A sink that raises (a closed pipe:
`runner exec --json | head -1`, a daemon that died) is dropped with a warning, and the run and
its files go on as if it were still watching.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = dict[str, Any]
Sink = Callable[[Event], None]


class RunLog:
    def __init__(self, run_id: str, masker, sinks: list[Sink], log_dir: Path | None):
        self.run_id = run_id
        self._masker = masker
        self._sinks = list(sinks)
        self._log_dir = log_dir
        self._files: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.warnings: list[str] = []
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._events = open(log_dir / "events.jsonl", "a", encoding="utf-8")
        else:
            self._events = None

    def emit(self, event: str, **fields: Any) -> None:
        record = self._masker.mask_all({"event": event, "run_id": self.run_id, "time": time.time(), **fields})
        with self._lock:
            if self._events is not None:
                self._events.write(json.dumps(record, default=str) + "\n")
                self._events.flush()
                stage = record.get("stage")
                if event == "stage.log" and stage:
                    self._stage_file(stage).write(record["line"] + "\n")
                    self._stage_file(stage).flush()
            self._deliver(record)

    def _deliver(self, record: Event) -> None:
        """Give `record` to every sink (lock held), then say which failed, in the order the
        record on disk has: the other sinks see the event before the failure it caused."""
        failed = []
        for sink in list(self._sinks):
            try:
                sink(record)
            except Exception as exc:  # noqa: BLE001 - output only: never the run's outcome
                self._sinks.remove(sink)
                failed.append((sink, exc))
        for sink, exc in failed:
            self._sink_failed(sink, exc)

    def _sink_failed(self, sink: Sink, exc: Exception) -> None:
        """Record (lock held) that `sink` failed and gets no more events."""
        name = getattr(sink, "name", None) or type(sink).__name__
        where = f"; the run's record goes on in {self._log_dir}" if self._log_dir else ""
        message = self._masker.mask(f"{name} failed ({type(exc).__name__}: {exc}) and gets no "
                                    f"more events{where}")
        self.warnings.append(message)
        record = {"event": "sink.failed", "run_id": self.run_id, "time": time.time(),
                  "sink": name, "error": message}
        if self._events is not None:
            self._events.write(json.dumps(record, default=str) + "\n")
            self._events.flush()
        self._deliver(record)

    def _stage_file(self, stage: str):
        f = self._files.get(stage)
        if f is None:
            assert self._log_dir is not None
            f = self._files[stage] = open(self._log_dir / f"{stage}.log", "a", encoding="utf-8")
        return f

    def for_stage(self, stage: str) -> "StageLogger":
        return StageLogger(self, stage)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            if self._events is not None:
                self._events.close()
                self._events = None


class StageLogger:
    """The `StageLog` a stage receives (see runner.stage)."""

    def __init__(self, runlog: RunLog, stage: str):
        self._runlog = runlog
        self.stage = stage

    def line(self, text: str) -> None:
        self._runlog.emit("stage.log", stage=self.stage, line=text, kind="output")

    def info(self, text: str) -> None:
        self._runlog.emit("stage.log", stage=self.stage, line=text, kind="info")

    def warn(self, text: str) -> None:
        self._runlog.warnings.append(f"{self.stage}: {self._runlog._masker.mask(text)}")
        self._runlog.emit("stage.log", stage=self.stage, line=f"warning: {text}", kind="warning")
