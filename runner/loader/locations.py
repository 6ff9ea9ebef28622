"""Where each value of a pipeline file was written, and problems located there.

The YAML reader fills a `SourceMap` as it reads the file; the loader attaches it to the
`Pipeline` it returns (the model's private `_source_map`), so the map travels with that one
pipeline and with every `model_copy()` of it (pydantic copies private attributes), and with
nothing else: two loads never see each other's map, and nothing outlives the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runner.errors import Problem
from runner.loader.field_paths import FieldPath, format_path
from runner.model import Pipeline


@dataclass
class SourceMap:
    """Where each field of a pipeline file is: path -> (line, column), both 1-based.
    Filled while the file is read, never changed once the pipeline is loaded."""

    file: str
    values: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)

    def deepest(self, path: FieldPath) -> FieldPath:
        """The longest prefix of `path` that is in the file."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.values or path[:n] in self.keys:
                return path[:n]
        return ()

    def locate(self, path: FieldPath, *, key: bool = False) -> tuple[int, int]:
        """(line, column) of the value at `path` (or of its key when `key`), falling back to the
        deepest enclosing field that is in the file; (1, 1) for the document itself."""
        p = self.deepest(path)
        if key and p in self.keys:
            return self.keys[p]
        if p in self.values:
            return self.values[p]
        return self.keys.get(p, (1, 1))

    def problem(self, path: FieldPath, message: str, *, key: bool = False,
                severity: str = "error") -> Problem:
        line, column = self.locate(path, key=key)
        return Problem(self.file, line, column, format_path(path), message, severity)


def attach(pipeline: Pipeline, smap: SourceMap) -> Pipeline:
    """`pipeline`, now carrying `smap`: the loader's last step, on the pipeline it has just
    made for this one file."""
    pipeline._source_map = smap
    return pipeline


def source_map(pipeline: Pipeline) -> SourceMap | None:
    """The source map of a pipeline returned by the loader (or copied from one with
    model_copy()); None for a pipeline built otherwise."""
    return pipeline._source_map


def problem_at(pipeline: Pipeline, path: FieldPath, message: str, *, key: bool = False,
               severity: str = "error") -> Problem:
    """A Problem located at `path` of the pipeline's file (line 0, column 0 when unknown)."""
    smap = source_map(pipeline)
    if smap is not None:
        return smap.problem(path, message, key=key, severity=severity)
    return Problem(pipeline.source_file or "<pipeline>", 0, 0, format_path(path), message,
                   severity)
