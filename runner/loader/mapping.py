"""Validation with the model, and pydantic's errors said in the pipeline's own words.

Each pydantic error is put back on the line it came from (the `SourceMap`) and said as the
reference says it (`runner.model.words`): "expected a list of strings, got the string
'latest'", never pydantic's "Input should be a valid tuple"; an unknown key gets the keys that
place takes and a "did you mean"; the alternatives of a union that all failed are said once.
"""
from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError

from runner.errors import Problem
from runner.loader.field_paths import (
    FieldPath, descend, field_for_key, format_path, model_at, set_at,
)
from runner.loader.locations import SourceMap
from runner.loader.yaml_reader import Scalars
from runner.model import Pipeline
from runner.model.base import OneString
from runner.model.words import (
    FieldType, alternatives, expected, fields_of, got, item_type, literal_values, model_class,
)

# pydantic error types that say "this is not the kind of value the field takes": said as
# "expected <what the field takes>, got <what was written>".
_KIND_ERRORS = frozenset({
    "dict_type", "model_type", "model_attributes_type", "tuple_type", "list_type", "set_type",
    "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type",
    "bool_parsing", "string_type", "literal_error", "enum", "date_type", "date_parsing",
    "date_from_datetime_parsing", "date_from_datetime_inexact", "none_required",
    "is_instance_of", "string_too_short", "string_too_long", "string_pattern_mismatch",
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
    "too_short", "too_long", "multiple_of",
})


def validate(data: dict[str, Any], smap: SourceMap, scalars: Scalars,
             root: type[BaseModel] = Pipeline) -> tuple[Any, list[Problem]]:
    """(the `root` model, []) when `data` is valid, else (None, its problems). `data` may be
    changed: a string field given a YAML number, boolean or date gets the text as written.
    `root`: the file's model (a pipeline; the daemon's config gets the same words)."""
    fixed: set[FieldPath] = set()
    for _ in range(3):
        try:
            return root.model_validate(data), []
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        # A string field given a YAML number, boolean or date (`ref: 1234`, `tags: [1.0]`,
        # `target: on`): take the text as written rather than refuse it.
        retry = False
        for err in errors:
            loc = tuple(err["loc"])
            scalar = scalars.get(loc)
            if (err["type"] == "string_type" and scalar is not None and scalar.typed_by_yaml
                    and loc not in fixed):
                if set_at(data, loc, scalar.text):
                    fixed.add(loc)
                    retry = True
        if not retry:
            break
    return None, merge_union_problems(_error_problems(errors, smap, scalars, root))


def suggest(word: str, candidates: list[str]) -> str:
    """" (did you mean 'x'?)" for the candidate close to `word`, or ""."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def merge_union_problems(problems: list[Problem]) -> list[Problem]:
    """A value that matches no alternative of a union gives one error per alternative, at the
    same place: say it once, listing the alternatives."""
    merged: dict[tuple[int, int, str], Problem] = {}
    for p in problems:
        key = (p.line, p.column, p.path)
        first = merged.get(key)
        if first is None:
            merged[key] = p
            continue
        got = re.search(r" \(got .*\)$", first.message)
        head = first.message[:got.start()] if got else first.message
        tail = re.sub(r" \(got .*\)$", "", p.message)
        if tail in head:
            continue
        tail = tail[:1].lower() + tail[1:]
        merged[key] = Problem(p.file, p.line, p.column, p.path,
                              f"{head}; or {tail}{got.group(0) if got else ''}", p.severity)
    return list(merged.values())


def _error_problems(errors: list[Mapping[str, Any]], smap: SourceMap,
                    scalars: Scalars, root: type[BaseModel]) -> list[Problem]:
    """pydantic's errors as problems in the pipeline's words, one per place in the file."""
    problems: list[Problem] = []
    said: set[FieldPath] = set()
    for err in errors:
        where, ft = _field_at(tuple(err["loc"]), root)
        if err["type"] in _KIND_ERRORS and ft is not None:
            # One message for a place, however many union alternatives pydantic tried.
            if where not in said:
                said.add(where)
                problems.append(_kind_problem(where, ft, err, smap, scalars))
            continue
        problems.append(_error_problem(err, smap, root))
    return problems


def _field_at(loc: FieldPath, root: type[BaseModel]) -> tuple[FieldPath, FieldType | None]:
    """The part of a pydantic error location that is a place in the file, and the type of the
    value there. What is left out names a union member ("literal['NONE']")."""
    ann: Any = root
    ann_before: Any = root
    ft: FieldType | None = None
    for i, part in enumerate(loc):
        if part == "[key]":  # pydantic's place for a mapping's key that is wrong: its type
            keys = [typing.get_args(a)[0] for a in alternatives(ann_before)
                    if typing.get_origin(a) is dict and typing.get_args(a)]
            return loc[:i], FieldType(keys[0]) if keys else ft
        ann_before = ann
        owner = model_class(ann)
        if owner is not None:
            found = field_for_key(owner, part) if isinstance(part, str) else None
            if found is None:
                return loc[:i], ft
            ft, ann = FieldType.of(found[1]), found[1].annotation
            continue
        nxt = descend(ann, part)
        if nxt is None:
            return loc[:i], ft
        # An item of a list whose items may be strings (servers: ["user@host"]) says so.
        items = ft.one_string.items if ft is not None and ft.one_string is not None else None
        ft = FieldType(nxt, (OneString(items),) if items and isinstance(part, int) else ())
        ann = nxt
    return loc, ft


def _kind_problem(where: FieldPath, ft: FieldType, err: Mapping[str, Any],
                  smap: SourceMap, scalars: Scalars) -> Problem:
    value = err.get("input")
    scalar = scalars.get(where)
    if isinstance(value, str) and scalar is not None and "$" not in scalar.text:
        value = scalar.text  # as written, before a validator changed it (`fail_on: hihg`)
    hint = ""
    item = item_type(ft.annotation)
    if item is not None and ft.one_string is None and (
            (isinstance(value, str) and (item is str or literal_values(item)))
            or (isinstance(value, dict) and model_class(item) is not None)):
        written = _flow([value])  # the one item given, as a list of one
        if len(written) <= 70:
            hint = f" (write {written})"
    elif model_class(ft.annotation) is not None and value is None \
            and not any(f.is_required() for _k, _n, f in fields_of(model_class(ft.annotation))):
        hint = f" (write {where[-1]}: {{}} for the defaults)" if where else ""
    elif isinstance(value, str) and literal_values(ft.annotation):
        names = [str(v) for v in literal_values(ft.annotation) or ()]
        hint = suggest(value, names) or suggest(value.upper(), names)
    return smap.problem(where, f"expected {expected(ft)}, got {got(value)}{hint}")


def _error_problem(err: Mapping[str, Any], smap: SourceMap, root: type[BaseModel]) -> Problem:
    loc: FieldPath = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and loc:
        key = str(loc[-1])
        model = model_at(loc[:-1], root)
        if model is None:
            return smap.problem(loc, f"unknown key '{key}'", key=True)
        names = _yaml_names(model)
        here = format_path(loc[:-1]) or "the top level"
        return smap.problem(loc, f"unknown key '{key}'{suggest(key, names)}; {here} takes: "
                            f"{', '.join(names)}", key=True)
    if kind == "missing" and loc:
        line, col = smap.locate(loc[:-1], key=True)
        model = model_at(loc[:-1], root)
        found = field_for_key(model, str(loc[-1])) if model is not None else None
        choices = found[1].validation_alias if found is not None else None
        others = [c for c in choices.choices if isinstance(c, str) and c != loc[-1]] \
            if isinstance(choices, AliasChoices) else []
        also = f" (or '{others[0]}', the same)" if others else ""
        return Problem(smap.file, line, col, format_path(loc),
                       f"missing required field '{loc[-1]}'{also}")
    where = smap.deepest(loc)
    message = str(err["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    elif message.startswith("Assertion failed, "):
        message = message[len("Assertion failed, "):]
    value = err.get("input")
    if (isinstance(value, (str, int, float, bool)) or value is None) \
            and repr(value) not in message and ", got " not in message:
        message += f" (got {_short(value)})"
    return smap.problem(where, message)


def _yaml_names(cls: type[BaseModel]) -> list[str]:
    return [key for key, _name, _info in fields_of(cls)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000,
                          allow_unicode=True).strip().removesuffix("...").strip()
