"""Field paths: where a value sits in a pipeline file, as a tuple of keys and list indexes.

`('stages', 'build', 'secrets', 0, 'id')` names the same place in the raw data read from the
YAML, in the source map and, through the model's YAML keys, in the `Pipeline` model. Here:
saying a path, reading or writing the raw data at one, and the model annotation one names.
"""
from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runner.model import Pipeline
from runner.model.words import alternatives, model_class, yaml_keys

FieldPath = tuple[str | int, ...]


def format_path(path: FieldPath) -> str:
    """('stages', 'build', 'secrets', 0, 'id') -> 'stages.build.secrets[0].id'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def get_at(data: Any, path: FieldPath) -> Any:
    """The value at `path` of the raw data; raises KeyError / IndexError / TypeError."""
    for part in path:
        data = data[part]
    return data


def set_at(data: Any, path: FieldPath, value: Any) -> bool:
    """Replace the value at `path` of the raw data; False (nothing changed) when it is not
    there."""
    for part in path[:-1]:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False
    try:
        data[path[-1]] = value
        return True
    except (KeyError, IndexError, TypeError):
        return False


def field_for_key(cls: type[BaseModel], key: str) -> tuple[str, FieldInfo] | None:
    """(attribute name, FieldInfo) of the field of `cls` written as `key` in YAML, or None."""
    for name, info in cls.model_fields.items():
        if key in yaml_keys(name, info):
            return name, info
    return None


def descend(ann: Any, part: str | int) -> Any:
    """The annotation one step below `ann` along `part` (None when unknown)."""
    cls = model_class(ann)
    if cls is not None:
        if not isinstance(part, str):
            return None
        found = field_for_key(cls, part)
        return found[1].annotation if found else None
    for alt in alternatives(ann):
        origin = typing.get_origin(alt)
        args = typing.get_args(alt)
        if origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
            return args[0]
        if origin is dict and isinstance(part, str) and len(args) == 2:
            return args[1]
    return None


def model_at(path: FieldPath, root: type[BaseModel] = Pipeline) -> type[BaseModel] | None:
    """The model class of the value at `path`, or None when that is no model (or unknown)."""
    ann: Any = root
    for part in path:
        ann = descend(ann, part)
        if ann is None:
            return None
    return model_class(ann)
