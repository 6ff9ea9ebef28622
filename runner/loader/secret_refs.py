"""Which fields name a `secrets:` entry, and every place a pipeline refers to one.

A field is a secret reference when its name is `secret` or `secret_env`, ends in `_secret` /
`_secrets`, is declared with `Field(json_schema_extra={"secret_ref": True})`, or was declared
with `register_secret_reference`. The loader checks each reference names a defined secret; the
engine uses them to give each stage only the secrets it refers to.
"""
from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runner.loader.field_paths import FieldPath
from runner.model import Pipeline
from runner.model.words import HIDDEN_FIELDS, alternatives, model_class, yaml_keys

_HIDDEN_FIELDS = set(HIDDEN_FIELDS)
# Declarations about model classes, process-wide like the classes themselves; loading a file
# only reads them.
_SECRET_REF_FIELDS: set[tuple[type, str]] = set()


def register_secret_reference(model: type[BaseModel], field_name: str) -> None:
    """Declare that `model.field_name` holds the name(s) of `secrets:` entries.

    Usually not needed: a field is already taken as a secret reference when its name is `secret`
    or `secret_env`, ends in `_secret` / `_secrets`, or it is declared with
    `Field(json_schema_extra={"secret_ref": True})`. The value may be a name, a list of names,
    or a mapping whose values are names (`secret_env: {VAR: name}`)."""
    if field_name not in model.model_fields:
        raise ValueError(f"{model.__name__} has no field {field_name!r}")
    _SECRET_REF_FIELDS.add((model, field_name))


def secret_references(pipeline: Pipeline | Mapping[str, Any]) -> list[tuple[FieldPath, str]]:
    """Every place a secret is referred to by name: [(field path, secret name)], paths written
    with YAML keys (aliases), e.g. (('repository', 'token'), 'git_token').

    Works on a Pipeline or on the raw data of a pipeline file (invalid parts are skipped).
    Which fields count: see `register_secret_reference`."""
    if isinstance(pipeline, BaseModel):
        data = pipeline.model_dump(by_alias=True, exclude=_HIDDEN_FIELDS)
        return list(refs_in(type(pipeline), data, ()))
    return list(refs_in(Pipeline, pipeline, ()))


def refs_in(ann: Any, data: Any, path: FieldPath) -> Iterator[tuple[FieldPath, str]]:
    """(path, secret name) of each reference in `data`, the raw data of a value of type `ann`
    found at `path`."""
    cls = model_class(ann)
    if cls is not None:
        if not isinstance(data, Mapping):
            return
        for name, info in cls.model_fields.items():
            if name in _HIDDEN_FIELDS:
                continue
            key = next((k for k in yaml_keys(name, info) if k in data), None)
            if key is None:
                continue
            value, here = data[key], path + (key,)
            if _is_secret_ref(cls, name, info):
                if isinstance(value, str):
                    yield here, value
                elif isinstance(value, (list, tuple)):
                    yield from ((here + (i,), v) for i, v in enumerate(value)
                                if isinstance(v, str))
                elif isinstance(value, Mapping):
                    yield from ((here + (k,), v) for k, v in value.items() if isinstance(v, str))
            else:
                yield from refs_in(info.annotation, value, here)
        return
    for alt in alternatives(ann):
        origin, args = typing.get_origin(alt), typing.get_args(alt)
        if origin in (list, tuple) and isinstance(data, (list, tuple)) and args:
            for i, item in enumerate(data):
                yield from refs_in(args[0], item, path + (i,))
            return
        if origin is dict and isinstance(data, Mapping) and len(args) == 2:
            for k, item in data.items():
                yield from refs_in(args[1], item, path + (k,))
            return


def _is_secret_ref(model: type[BaseModel], name: str, info: FieldInfo) -> bool:
    if (model, name) in _SECRET_REF_FIELDS:
        return True
    extra = info.json_schema_extra
    if isinstance(extra, dict) and extra.get("secret_ref"):
        return True
    return name in ("secret", "secret_env") or name.endswith(("_secret", "_secrets"))
