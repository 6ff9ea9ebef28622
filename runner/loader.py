"""Pipeline file -> validated `Pipeline`, with every problem located at file:line:column.

Steps, each collecting problems instead of stopping at the first:
1. compose the YAML into nodes (PyYAML's SafeLoader), turn them into plain Python data and a
   source map: field path tuple -> (line, column) of the value, and of the key (1-based).
   Duplicate keys are refused; `<<` merge keys are honoured.
2. interpolate every string scalar (`runner.interpolate`; keys are never interpolated).
3. resolve relative paths on the runner's machine (the fields marked `PathOn("pipeline")`:
   repository.url, secrets' `file:`, ssh.key_file, ...) against the file's directory.
4. validate with the pydantic model; each pydantic error is put back on the line it came from,
   and said in the pipeline's words (`runner.model.words`): "expected a list of strings, got
   the string 'latest'", never pydantic's "Input should be a valid tuple".
5. cross checks the model cannot do alone: secret sources, secret references, image name, tag
   templates, a top-level `env:` with no deploy to reach.
All problems are raised together as `InvalidInput("<file>: pipeline is invalid", problems)`.
"""
from __future__ import annotations

import difflib
import os
import re
import typing
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from runner import tags as _tags
from runner.errors import InvalidInput, Problem
from runner.gitsafety import check_ref, check_repo_url
from runner.interpolate import NAME_RE, BrokenVariable, InterpolationError, Resolver
from runner.model import Pipeline
from runner.model.base import OneString
from runner.model.words import (
    HIDDEN_FIELDS, FieldType, alternatives, expected, fields_of, got, item_type, literal_values,
    model_class, yaml_keys,
)

FieldPath = tuple[str | int, ...]

SUPPORTED_VERSIONS = (1,)
_MAX_NODES = 100_000  # a guard against alias bombs ("billion laughs")
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


# --------------------------------------------------------------------------- source map

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


@dataclass
class SourceMap:
    """Where each field of a pipeline file is: path -> (line, column), both 1-based."""

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


_MAPS: dict[int, SourceMap] = {}
_MAPS_BY_FILE: dict[str, SourceMap] = {}


def _remember(pipeline: Pipeline, smap: SourceMap) -> None:
    # Pipelines are frozen and unhashable (dict fields): keep the map beside them, by identity,
    # for as long as the pipeline lives; and by file, for copies made with model_copy().
    _MAPS[id(pipeline)] = smap
    weakref.finalize(pipeline, _MAPS.pop, id(pipeline), None)
    _MAPS_BY_FILE[pipeline.source_file] = smap


def source_map(pipeline: Pipeline) -> SourceMap | None:
    """The source map of a pipeline returned by the loader, or of the last file loaded from
    the same path (for copies); None for a pipeline built otherwise."""
    found = _MAPS.get(id(pipeline))
    if found is None and pipeline.source_file:
        found = _MAPS_BY_FILE.get(pipeline.source_file)
    return found


def problem_at(pipeline: Pipeline, path: FieldPath, message: str, *, key: bool = False,
               severity: str = "error") -> Problem:
    """A Problem located at `path` of the pipeline's file (line 0, column 0 when unknown)."""
    smap = source_map(pipeline)
    if smap is not None:
        return smap.problem(path, message, key=key, severity=severity)
    return Problem(pipeline.source_file or "<pipeline>", 0, 0, format_path(path), message,
                   severity)


# --------------------------------------------------------------------------- YAML -> data

def _mark(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _TooLarge(Exception):
    pass


@dataclass
class _Scalar:
    text: str
    tag: str
    plain: bool


class _Converter:
    """Nodes -> plain data (dict / list / scalars), recording marks and problems."""

    def __init__(self, smap: SourceMap):
        self.smap = smap
        self.problems: list[Problem] = []
        self.scalars: dict[FieldPath, _Scalar] = {}
        self._constructor = SafeConstructor()
        self._active: set[int] = set()
        self._count = 0

    def convert(self, node: Node, path: FieldPath) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise _TooLarge
        self.smap.values[path] = _mark(node)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._active:
            self.problems.append(self.smap.problem(path, "an alias refers to itself"))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.convert(child, path + (i,)) for i, child in enumerate(node.value)]
            if isinstance(node, MappingNode):
                out: dict[str, Any] = {}
                self._mapping(node, path, out)
                return out
        finally:
            self._active.discard(id(node))
        return None  # pragma: no cover - PyYAML has no other node kind

    def _scalar(self, node: ScalarNode, path: FieldPath) -> Any:
        self.scalars[path] = _Scalar(node.value, node.tag, node.style is None)
        try:
            return self._constructor.construct_object(node)
        except (ConstructorError, ValueError) as exc:
            detail = getattr(exc, "problem", None) or str(exc)
            self.problems.append(self.smap.problem(path, f"cannot read this value: {detail}"))
            return None

    def _mapping(self, node: MappingNode, path: FieldPath, out: dict[str, Any]) -> None:
        merges = [v for k, v in node.value if k.tag == _MERGE_TAG]
        # Merged mappings first, the earliest winning; explicit keys then override them.
        sources: list[Node] = []
        for m in merges:
            sources.extend(m.value if isinstance(m, SequenceNode) else [m])
        for src in reversed(sources):
            if not isinstance(src, MappingNode):
                self.problems.append(Problem(self.smap.file, *_mark(src), format_path(path),
                                             "'<<' needs a mapping or a list of mappings"))
                continue
            if id(src) in self._active:
                self.problems.append(self.smap.problem(path, "an alias refers to itself"))
                continue
            self._active.add(id(src))
            try:
                self._mapping(src, path, out)
            finally:
                self._active.discard(id(src))
        seen: dict[str, tuple[int, int]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode):
                self.problems.append(Problem(self.smap.file, *_mark(key_node), format_path(path),
                                             "a key must be a plain string, not a list or "
                                             "mapping"))
                continue
            key = key_node.value
            child = path + (key,)
            if key in seen:
                line, col = _mark(key_node)
                self.problems.append(Problem(
                    self.smap.file, line, col, format_path(child),
                    f"duplicate key '{key}' (first given at line {seen[key][0]}, column "
                    f"{seen[key][1]})"))
                continue
            seen[key] = _mark(key_node)
            self.smap.keys[child] = _mark(key_node)
            out[key] = self.convert(value_node, child)


def _flow_interpolation(text: str, exc: yaml.MarkedYAMLError) -> Problem | None:
    """`{servers: ${HOSTS}}`: in a flow mapping or list, YAML reads the `{` of `${` as a nested
    mapping, and PyYAML says only "expected ',' or '}', but got '{'". Say what it is."""
    mark = exc.problem_mark
    if mark is None or exc.context not in ("while parsing a flow mapping",
                                            "while parsing a flow sequence"):
        return None
    lines = text.splitlines()
    if mark.line >= len(lines):
        return None
    line = lines[mark.line]
    col = mark.column
    if not (line[col:col + 1] == "{" and col > 0 and line[col - 1] == "$"):
        return None
    start = col - 1
    while start > 0 and line[start - 1] not in " \t,[{":
        start -= 1
    end = col + 1
    depth = 1
    while end < len(line) and depth:
        depth += {"{": 1, "}": -1}.get(line[end], 0)
        end += 1
    while end < len(line) and line[end] not in ",]}" and not line[end].isspace():
        end += 1
    value = line[start:end]
    kind = "mapping {...}" if exc.context.endswith("mapping") else "list [...]"
    return Problem("", mark.line + 1, start + 1, "",
                   f"{value} inside a flow {kind} needs quotes: YAML reads the '{{' of '${{' "
                   f"there as the start of a nested mapping; write \"{value}\"")


def _compose(text: str, smap: SourceMap) -> tuple[Any, _Converter | None, list[Problem]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        found = _flow_interpolation(text, exc)
        if found is not None:
            return None, None, [Problem(smap.file, found.line, found.column, "", found.message)]
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "invalid YAML"
        if exc.context:
            what = f"{exc.context}: {what}"
        return None, None, [Problem(smap.file, line, col, "", f"YAML syntax error: {what}")]
    except yaml.YAMLError as exc:
        return None, None, [Problem(smap.file, 1, 1, "", f"YAML error: {exc}")]
    if root is None:
        return None, None, [Problem(smap.file, 1, 1, "", "the file is empty; a pipeline is a "
                                    "mapping with at least name:, repository: and image:")]
    conv = _Converter(smap)
    try:
        data = conv.convert(root, ())
    except _TooLarge:
        return None, None, [Problem(smap.file, *_mark(root), "",
                                    f"the document expands to more than {_MAX_NODES} values "
                                    f"(aliases nested too deep?)")]
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {data!r}"
        return None, None, conv.problems + [
            Problem(smap.file, *_mark(root), "",
                    f"a pipeline must be a mapping (name:, repository:, image:, ...), got {kind}")]
    return data, conv, conv.problems


# --------------------------------------------------------------------------- model walking

_unwrap = alternatives
_model_class = model_class
_yaml_keys = yaml_keys


def _field_for_key(cls: type[BaseModel], key: str) -> tuple[str, Any] | None:
    for name, info in cls.model_fields.items():
        if key in _yaml_keys(name, info):
            return name, info
    return None


def _descend(ann: Any, part: str | int) -> Any:
    """The annotation one step below `ann` along `part` (None when unknown)."""
    cls = _model_class(ann)
    if cls is not None:
        if not isinstance(part, str):
            return None
        found = _field_for_key(cls, part)
        return found[1].annotation if found else None
    for alt in _unwrap(ann):
        origin = typing.get_origin(alt)
        args = typing.get_args(alt)
        if origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
            return args[0]
        if origin is dict and isinstance(part, str) and len(args) == 2:
            return args[1]
    return None


def _model_at(path: FieldPath, root: type[BaseModel] = Pipeline) -> type[BaseModel] | None:
    ann: Any = root
    for part in path:
        ann = _descend(ann, part)
        if ann is None:
            return None
    return _model_class(ann)


_HIDDEN_FIELDS = set(HIDDEN_FIELDS)
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


def _is_secret_ref(model: type[BaseModel], name: str, info: Any) -> bool:
    if (model, name) in _SECRET_REF_FIELDS:
        return True
    extra = info.json_schema_extra
    if isinstance(extra, dict) and extra.get("secret_ref"):
        return True
    return name in ("secret", "secret_env") or name.endswith(("_secret", "_secrets"))


def _refs_in(ann: Any, data: Any, path: FieldPath) -> Iterator[tuple[FieldPath, str]]:
    cls = _model_class(ann)
    if cls is not None:
        if not isinstance(data, Mapping):
            return
        for name, info in cls.model_fields.items():
            if name in _HIDDEN_FIELDS:
                continue
            key = next((k for k in _yaml_keys(name, info) if k in data), None)
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
                yield from _refs_in(info.annotation, value, here)
        return
    for alt in _unwrap(ann):
        origin, args = typing.get_origin(alt), typing.get_args(alt)
        if origin in (list, tuple) and isinstance(data, (list, tuple)) and args:
            for i, item in enumerate(data):
                yield from _refs_in(args[0], item, path + (i,))
            return
        if origin is dict and isinstance(data, Mapping) and len(args) == 2:
            for k, item in data.items():
                yield from _refs_in(args[1], item, path + (k,))
            return


def secret_references(pipeline: Pipeline | Mapping[str, Any]) -> list[tuple[FieldPath, str]]:
    """Every place a secret is referred to by name: [(field path, secret name)], paths written
    with YAML keys (aliases), e.g. (('repository', 'token'), 'git_token').

    Works on a Pipeline or on the raw data of a pipeline file (invalid parts are skipped).
    Which fields count: see `register_secret_reference`."""
    if isinstance(pipeline, BaseModel):
        data = pipeline.model_dump(by_alias=True, exclude=_HIDDEN_FIELDS)
        return list(_refs_in(type(pipeline), data, ()))
    return list(_refs_in(Pipeline, pipeline, ()))


# --------------------------------------------------------------------------- interpolation

def _protected_env(data: dict[str, Any]) -> dict[str, str]:
    """Environment variable name -> secret name, for secrets read from the environment."""
    out: dict[str, str] = {}
    secrets = data.get("secrets")
    if isinstance(secrets, dict):
        for name, src in secrets.items():
            if isinstance(src, dict) and isinstance(src.get("env"), str) and "$" not in src["env"]:
                out[src["env"]] = name
    return out


def _interpolate(data: dict[str, Any], smap: SourceMap, conv: _Converter,
                 overrides: Mapping[str, str], environ: Mapping[str, str],
                 failed: set[str]) -> list[Problem]:
    """Interpolate every string of `data` in place; `failed` gets the paths left as they were."""
    problems: list[Problem] = []
    raw_vars = data.get("variables")
    definitions: dict[str, str] = {}
    if isinstance(raw_vars, dict):
        for k, v in raw_vars.items():
            if isinstance(v, str):
                definitions[k] = v
            elif v is not None and not isinstance(v, (dict, list)):
                definitions[k] = conv.scalars[("variables", k)].text  # 8080, true: as written
    for name in definitions:
        if not NAME_RE.fullmatch(name):
            problems.append(smap.problem(("variables", name), f"variable name '{name}' cannot be "
                                         f"used as ${{...}}: use letters, digits and '_', not "
                                         f"starting with a digit", key=True))
    resolver = Resolver(overrides=overrides, environ=environ, variables=definitions,
                        protected=_protected_env(data))
    values, errors = resolver.effective_variables()
    for name, exc in errors.items():
        problems.append(smap.problem(("variables", name), str(exc)))
    if isinstance(raw_vars, dict):
        data["variables"] = {k: values.get(k, v) if k in definitions else v
                             for k, v in raw_vars.items()}

    def walk(value: Any, path: FieldPath) -> Any:
        if isinstance(value, str):
            if "$" not in value:
                return value
            try:
                return resolver.interpolate(value)
            except BrokenVariable:
                failed.add(format_path(path))
                return value  # reported where the variable is defined
            except InterpolationError as exc:
                failed.add(format_path(path))
                problems.append(smap.problem(path, str(exc)))
                return value
        if isinstance(value, dict):
            return {k: walk(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        return value

    for key in list(data):
        if key != "variables":
            data[key] = walk(data[key], (key,))
    return problems


# --------------------------------------------------------------------------- paths

def is_local_path(url: str) -> bool:
    """True for a local path; False for a URL (scheme://...) or scp-like `[user@]host:path`."""
    if "://" in url:
        return False
    colon, slash = url.find(":"), url.find("/")
    return not (colon > 0 and (slash < 0 or colon < slash))


def _runner_paths(ann: Any, data: Any, path: FieldPath) -> Iterator[FieldPath]:
    """The paths of the fields marked `PathOn("pipeline")` that `data` sets to a string."""
    cls = model_class(ann)
    if cls is not None:
        if not isinstance(data, Mapping):
            return
        for key, name, info in fields_of(cls):
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


def _get(data: Any, path: FieldPath) -> Any:
    for part in path:
        data = data[part]
    return data


def _resolve_paths(data: dict[str, Any], base_dir: str, failed: set[str]) -> None:
    """Make the runner-machine paths of `data` absolute, against `base_dir` (`~` expanded);
    URLs and `host:path` stay as they are, and so do strings left uninterpolated."""
    for path in list(_runner_paths(Pipeline, data, ())):
        value = _get(data, path)
        if value and is_local_path(value) and format_path(path) not in failed:
            _set(data, path, os.path.normpath(os.path.join(base_dir, os.path.expanduser(value))))


# --------------------------------------------------------------------------- validation

def _set(data: Any, path: FieldPath, value: Any) -> bool:
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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _yaml_names(cls: type[BaseModel]) -> list[str]:
    return [key for key, _name, _info in fields_of(cls)]


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


def _field_at(loc: FieldPath) -> tuple[FieldPath, FieldType | None]:
    """The part of a pydantic error location that is a place in the file, and the type of the
    value there. What is left out names a union member ("literal['NONE']")."""
    ann: Any = Pipeline
    ft: FieldType | None = None
    for i, part in enumerate(loc):
        owner = model_class(ann)
        if owner is not None:
            found = _field_for_key(owner, part) if isinstance(part, str) else None
            if found is None:
                return loc[:i], ft
            ft, ann = FieldType.of(found[1]), found[1].annotation
            continue
        nxt = _descend(ann, part)
        if nxt is None:
            return loc[:i], ft
        # An item of a list whose items may be strings (servers: ["user@host"]) says so.
        items = ft.one_string.items if ft is not None and ft.one_string is not None else None
        ft = FieldType(nxt, (OneString(items),) if items and isinstance(part, int) else ())
        ann = nxt
    return loc, ft


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000,
                          allow_unicode=True).strip().removesuffix("...").strip()


def _kind_problem(where: FieldPath, ft: FieldType, err: Mapping[str, Any],
                  smap: SourceMap, conv: _Converter) -> Problem:
    value = err.get("input")
    scalar = conv.scalars.get(where)
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
        hint = _suggest(value, names) or _suggest(value.upper(), names)
    return smap.problem(where, f"expected {expected(ft)}, got {got(value)}{hint}")


def _error_problems(errors: list[Mapping[str, Any]], smap: SourceMap,
                    conv: _Converter) -> list[Problem]:
    """pydantic's errors as problems in the pipeline's words, one per place in the file."""
    problems: list[Problem] = []
    said: set[FieldPath] = set()
    for err in errors:
        where, ft = _field_at(tuple(err["loc"]))
        if err["type"] in _KIND_ERRORS and ft is not None:
            # One message for a place, however many union alternatives pydantic tried.
            if where not in said:
                said.add(where)
                problems.append(_kind_problem(where, ft, err, smap, conv))
            continue
        problems.append(_error_problem(err, smap))
    return problems


def _error_problem(err: Mapping[str, Any], smap: SourceMap) -> Problem:
    loc: FieldPath = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and loc:
        key = str(loc[-1])
        model = _model_at(loc[:-1])
        if model is None:
            return smap.problem(loc, f"unknown key '{key}'", key=True)
        names = _yaml_names(model)
        here = format_path(loc[:-1]) or "the top level"
        return smap.problem(loc, f"unknown key '{key}'{_suggest(key, names)}; {here} takes: "
                            f"{', '.join(names)}", key=True)
    if kind == "missing" and loc:
        line, col = smap.locate(loc[:-1], key=True)
        model = _model_at(loc[:-1])
        found = _field_for_key(model, str(loc[-1])) if model is not None else None
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


def _merge_union_problems(problems: list[Problem]) -> list[Problem]:
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


def _validate(data: dict[str, Any], smap: SourceMap,
              conv: _Converter) -> tuple[Pipeline | None, list[Problem]]:
    fixed: set[FieldPath] = set()
    for _ in range(3):
        try:
            return Pipeline.model_validate(data), []
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        # A string field given a YAML number, boolean or date (`ref: 1234`, `tags: [1.0]`,
        # `target: on`): take the text as written rather than refuse it.
        retry = False
        for err in errors:
            loc = tuple(err["loc"])
            scalar = conv.scalars.get(loc)
            if (err["type"] == "string_type" and scalar is not None and scalar.plain
                    and scalar.tag not in (_STR_TAG, _NULL_TAG) and loc not in fixed):
                if _set(data, loc, scalar.text):
                    fixed.add(loc)
                    retry = True
        if not retry:
            break
    return None, _merge_union_problems(_error_problems(errors, smap, conv))


def _cross_checks(data: dict[str, Any], smap: SourceMap) -> list[Problem]:
    problems: list[Problem] = []
    version = data.get("version", 1)
    if isinstance(version, int) and not isinstance(version, bool) \
            and version not in SUPPORTED_VERSIONS:
        problems.append(smap.problem(("version",), f"unsupported version {version} (this runner "
                                     f"reads version {', '.join(map(str, SUPPORTED_VERSIONS))})"))
    secrets = data.get("secrets")
    names: set[str] = set()
    if isinstance(secrets, dict):
        names = set(secrets)
        for name, src in secrets.items():
            if not isinstance(src, dict):
                continue
            given = [k for k in ("env", "file") if src.get(k) is not None]
            if len(given) != 1:
                what = "both" if given else "neither"
                problems.append(smap.problem(
                    ("secrets", name), f"secret '{name}' needs exactly one of 'env:' (an "
                    f"environment variable) or 'file:' (a path), {what} given", key=True))
    for path, name in secret_references(data):
        if name not in names:
            hint = _suggest(name, sorted(names))
            known = f"; defined: {', '.join(sorted(names))}" if names and not hint else ""
            problems.append(smap.problem(path, f"unknown secret '{name}'{hint} (add it under "
                                         f"secrets:{known})"))
    stages = data.get("stages")
    if data.get("env") and not (isinstance(stages, dict) and "deploy" in stages):
        problems.append(smap.problem(
            ("env",), "the top-level env is the environment of the deployed container, and "
            "this pipeline has no stages.deploy section, so it would reach nothing: remove it, "
            "or add the deploy (a Dockerfile gets its values as stages.build.args)", key=True))
    repo = data.get("repository")
    if isinstance(repo, dict):
        for key, check in (("url", check_repo_url), ("ref", check_ref)):
            if isinstance(repo.get(key), str):
                try:
                    check(repo[key])
                except InvalidInput as exc:
                    problems.append(smap.problem(("repository", key), str(exc)))
    image = data.get("image")
    if isinstance(image, dict):
        if isinstance(image.get("name"), str):
            message = _tags.validate_image_name(image["name"])
            if message:
                problems.append(smap.problem(("image", "name"), message))
        if isinstance(image.get("tags"), list):
            for i, template in enumerate(image["tags"]):
                if isinstance(template, str):
                    message = _tags.validate_template(template)
                    if message:
                        problems.append(smap.problem(("image", "tags", i), message))
    return problems


# --------------------------------------------------------------------------- entry points

def load_pipeline_text(
    text: str,
    filename: str = "<pipeline>",
    *,
    variables: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Pipeline:
    """Parse, interpolate and validate a pipeline given as text.

    `variables`: `--var K=V` values (highest precedence); `environ`: the process environment
    (default: os.environ); `base_dir`: where relative paths start (default: the directory of
    `filename`). Raises InvalidInput carrying every problem found."""
    environ = os.environ if environ is None else environ
    smap = SourceMap(filename)
    data, conv, problems = _compose(text, smap)
    if data is None or conv is None:
        raise InvalidInput(f"{filename}: pipeline is invalid", problems)
    for hidden in _HIDDEN_FIELDS & set(data):
        problems.append(smap.problem((hidden,), f"unknown key '{hidden}' (it is set by the "
                                     f"runner, not in the file)", key=True))
        del data[hidden]
    failed: set[str] = set()
    problems += _interpolate(data, smap, conv, variables or {}, environ, failed)
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(filename))
    _resolve_paths(data, os.fspath(base_dir), failed)
    pipeline, invalid = _validate(data, smap, conv)
    # A string left uninterpolated is reported once, not again as an invalid value.
    problems += [p for p in invalid + _cross_checks(data, smap) if p.path not in failed]
    if problems or pipeline is None:
        problems.sort(key=lambda p: (p.line, p.column))
        raise InvalidInput(f"{filename}: pipeline is invalid", _unique(problems))
    source = filename if filename.startswith("<") else os.path.abspath(filename)
    pipeline = pipeline.model_copy(update={"source_file": source})
    _remember(pipeline, smap)
    return pipeline


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    variables: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Pipeline:
    """Read, parse, interpolate and validate the pipeline file at `path`.

    Raises InvalidInput for a missing or unreadable file and for every problem in it."""
    filename = os.fspath(path)
    try:
        raw = Path(filename).read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{filename}: no such pipeline file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{filename}: is a directory, not a pipeline file") from None
    except OSError as exc:
        raise InvalidInput(f"{filename}: cannot read the pipeline file: "
                           f"{exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InvalidInput(f"{filename}: pipeline is invalid", [
            Problem(filename, line, column, "", "the file is not UTF-8 text")]) from None
    return load_pipeline_text(text, filename, variables=variables, environ=environ)
