"""The model's types said in the pipeline's words, for validation messages and the reference.

`expected(field)` is what a value must be ("a list of {id, statement, ...} entries", "a whole
number from 0 to 10"); `got(value)` is what was written instead ("the string 'latest'"). The
loader puts them together, "expected X, got Y", where pydantic would say "Input should be a
valid tuple". Pure; reads annotations and `runner.model.base` markers only.
"""
from __future__ import annotations

import datetime as _dt
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo

from runner.model.base import AnyCase, OneString, PathOn

# Fields the loader sets itself; never written in a file.
HIDDEN_FIELDS = frozenset({"source_file", "destination"})


def yaml_keys(name: str, info: FieldInfo) -> list[str]:
    """The keys a field may be written as in YAML, preferred first."""
    keys: list[str] = []
    va = info.validation_alias
    if isinstance(va, AliasChoices):
        keys.extend(c for c in va.choices if isinstance(c, str))
    elif isinstance(va, str):
        keys.append(va)
    if info.alias:
        keys.insert(0, info.alias)
    keys.append(name)
    return list(dict.fromkeys(keys))


def yaml_key(name: str, info: FieldInfo) -> str:
    return yaml_keys(name, info)[0]


def fields_of(cls: type[BaseModel]) -> list[tuple[str, str, FieldInfo]]:
    """(YAML key, attribute name, FieldInfo) of each field a file may set, in order: not those
    the loader sets itself (`exclude=True`: a pipeline's HIDDEN_FIELDS, the daemon config's
    base_dir)."""
    return [(yaml_key(n, f), n, f) for n, f in cls.model_fields.items() if not f.exclude]


def alternatives(ann: Any) -> list[Any]:
    """The alternatives of a union annotation (None left out), or [ann]."""
    if typing.get_origin(ann) in (Union, types.UnionType):
        out: list[Any] = []
        for a in typing.get_args(ann):
            if a is not type(None):
                out.extend(alternatives(a))
        return out
    if typing.get_origin(ann) is typing.Annotated:
        return alternatives(typing.get_args(ann)[0])
    return [ann]


def model_class(ann: Any) -> type[BaseModel] | None:
    for alt in alternatives(ann):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return alt
    return None


def literal_values(ann: Any) -> list[Any] | None:
    """The values of a Literal (or a union of Literals); None for anything else."""
    values: list[Any] = []
    for alt in alternatives(ann):
        if typing.get_origin(alt) is not Literal:
            return None
        values.extend(typing.get_args(alt))
    return values or None


def item_type(ann: Any) -> Any | None:
    """X of tuple[X, ...] / list[X] (the first list alternative), else None."""
    for alt in alternatives(ann):
        if typing.get_origin(alt) in (tuple, list) and typing.get_args(alt):
            return typing.get_args(alt)[0]
    return None


def value_type(ann: Any) -> Any | None:
    """V of dict[str, V], else None."""
    for alt in alternatives(ann):
        if typing.get_origin(alt) is dict and len(typing.get_args(alt)) == 2:
            return typing.get_args(alt)[1]
    return None


@dataclass(frozen=True)
class FieldType:
    """A field's annotation with what `Annotated` and `Field(...)` said about it."""

    annotation: Any
    metadata: tuple[Any, ...] = ()

    @classmethod
    def of(cls, info: FieldInfo) -> FieldType:
        return cls(info.annotation, tuple(info.metadata))

    def marker(self, kind: type) -> Any:
        return next((m for m in self.metadata if isinstance(m, kind)), None)

    @property
    def one_string(self) -> OneString | None:
        return self.marker(OneString)

    @property
    def path_on(self) -> PathOn | None:
        return self.marker(PathOn)

    @property
    def any_case(self) -> bool:
        return self.marker(AnyCase) is not None


def _keys(cls: type[BaseModel]) -> str:
    """"{id, statement, expired_at?}": the keys, `?` on the optional ones; a long list ends in
    "..." after the required ones and the first few (the reference has them all)."""
    parts = [k if f.is_required() else f"{k}?" for k, _, f in fields_of(cls)]
    if len(parts) > 7:
        required = [k for k, _, f in fields_of(cls) if f.is_required()]
        parts = list(dict.fromkeys(required + parts[:4])) + ["..."]
    return "{" + ", ".join(parts) + "}"


def _bounds(metadata: Iterable[Any], whole: bool) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
    if lo is not None and hi is not None and not lo_open and not hi_open:
        return f" from {lo} to {hi}"
    out = []
    if lo is not None:
        out.append(f"above {lo}" if lo_open else f"at least {lo}")
    if hi is not None:
        out.append(f"below {hi}" if hi_open else f"at most {hi}")
    if len(out) == 1 and not out[0].startswith(("above", "below")):
        return f" of {out[0]}"  # "a whole number of at least 1"
    return (" " + " and ".join(out)) if out else ""


def _pattern(metadata: Iterable[Any]) -> str | None:
    for m in metadata:
        if getattr(m, "pattern", None):
            return str(m.pattern)
    return None


def _min_length(metadata: Iterable[Any]) -> int | None:
    for m in metadata:
        if isinstance(m, at.MinLen):
            return m.min_length
    return None


def _one(alt: Any, metadata: tuple[Any, ...], any_case: bool) -> str:
    cls = model_class(alt)
    if cls is not None:
        return f"a mapping {_keys(cls)}"
    values = literal_values(alt)
    if values is not None:
        if len(values) == 1:
            value = values[0]
            return str(value).lower() if isinstance(value, bool) else str(value)
        case = " (in any case)" if any_case else ""
        return "one of " + _or(values) + case
    item = item_type(alt)
    if item is not None:
        return "a list of " + _plural(item)
    value = value_type(alt)
    if value is not None:
        return "a mapping of names to " + _plural(value)
    if alt is bool:
        return "true or false"
    if alt is int:
        return "a whole number" + _bounds(metadata, True)
    if alt is float:
        return "a number" + _bounds(metadata, False)
    if alt is _dt.date:
        return "a date (YYYY-MM-DD)"
    if alt is str:
        pattern = _pattern(metadata)
        if pattern:
            return f"a string matching {pattern}"
        if _min_length(metadata):
            return "a non-empty string"
        return "a string"
    return getattr(alt, "__name__", str(alt))


def _or(values: Iterable[Any]) -> str:
    """"a, b or c"."""
    names = [str(v) for v in values]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _plural(ann: Any) -> str:
    cls = model_class(ann)
    if cls is not None:
        return f"{_keys(cls)} entries"
    values = literal_values(ann)
    if values is not None:
        return "names from " + _or(values)
    if ann is str:
        return "strings"
    if ann is int:
        return "whole numbers"
    if ann is float:
        return "numbers"
    return _one(ann, (), False)


def expected(ft: FieldType) -> str:
    """What a value of this field must be, e.g. "a list of strings, or one string: ..."."""
    if literal_values(ft.annotation) is not None:  # Severity | Literal["NONE"]: one choice
        text = _one(ft.annotation, ft.metadata, ft.any_case)
    else:
        text = " or ".join(_one(a, ft.metadata, ft.any_case) for a in alternatives(ft.annotation))
    if ft.one_string is not None:
        text += f", or {ft.one_string.how}"
    return text


def got(value: Any) -> str:
    """What was written, e.g. "the string 'latest'", "a mapping", "nothing (an empty value)"."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {text!r}" if value else "an empty string"
    if isinstance(value, (_dt.date, _dt.datetime)):
        return f"the date {value.isoformat()}"
    if isinstance(value, dict):
        keys = ", ".join(str(k) for k in list(value)[:6])
        return f"a mapping {{{keys}{', ...' if len(value) > 6 else ''}}}" if value else \
            "an empty mapping"
    if isinstance(value, (list, tuple)):
        return "a list" if value else "an empty list"
    return type(value).__name__
