"""Relative paths on the runner's machine, made absolute against the pipeline file's directory.

The fields marked `PathOn("pipeline")` (repository.url, a secret's `file:`, an engine's
key_file, ...) hold paths read by the runner itself: `../app` in /srv/p/pipeline.yml means
/srv/app wherever the runner was started. URLs and `host:path` stay as they are
(`runner.gitsafety.is_local_path` tells them apart), and so do strings left uninterpolated.
"""
from __future__ import annotations

import os
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from runner.gitsafety import is_local_path
from runner.loader.field_paths import FieldPath, format_path, get_at, set_at
from runner.model import Pipeline
from runner.model.words import FieldType, alternatives, fields_of, model_class, yaml_keys


def resolve_paths(data: dict[str, Any], base_dir: str, failed: set[str]) -> None:
    """Make the runner-machine paths of `data` absolute, against `base_dir` (`~` expanded);
    `failed`: the formatted paths of strings left uninterpolated."""
    for path in list(_runner_paths(Pipeline, data, ())):
        value = get_at(data, path)
        if value and is_local_path(value) and format_path(path) not in failed:
            set_at(data, path, os.path.normpath(os.path.join(base_dir, os.path.expanduser(value))))


def _runner_paths(ann: Any, data: Any, path: FieldPath) -> Iterator[FieldPath]:
    """The paths of the fields marked `PathOn("pipeline")` that `data` sets to a string."""
    cls = model_class(ann)
    if cls is not None:
        if not isinstance(data, Mapping):
            return
        for _key, name, info in fields_of(cls):
            found = next((k for k in yaml_keys(name, info) if k in data), None)
            if found is None:
                continue
            on = FieldType.of(info).path_on
            if on is not None and on.base == "pipeline":
                if isinstance(data[found], str):
                    yield path + (found,)
            else:
                yield from _runner_paths(info.annotation, data[found], path + (found,))
        return
    for alt in alternatives(ann):
        origin, args = typing.get_origin(alt), typing.get_args(alt)
        if origin in (list, tuple) and isinstance(data, list) and args:
            for i, item in enumerate(data):
                yield from _runner_paths(args[0], item, path + (i,))
            return
        if origin is dict and isinstance(data, Mapping) and len(args) == 2:
            for k, item in data.items():
                yield from _runner_paths(args[1], item, path + (k,))
            return
