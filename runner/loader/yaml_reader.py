"""YAML text -> plain data (dicts, lists, scalars), filling the source map as it goes.

PyYAML's SafeLoader composes the nodes; each node's mark gives the (line, column) of its value,
and of its key, in the `SourceMap`. Duplicate keys are refused, `<<` merge keys are honoured
(explicit keys win, then the earliest merged mapping), an alias that contains itself or a
document that expands past `MAX_NODES` values is refused. Every scalar is also kept as written
(`Scalar`), for messages that quote the file and for strings YAML read as something else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from runner.errors import Problem
from runner.loader.field_paths import FieldPath, format_path
from runner.loader.locations import SourceMap

MAX_NODES = 100_000  # a guard against alias bombs ("billion laughs")
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass
class Scalar:
    """A scalar as the file wrote it."""

    text: str
    tag: str
    plain: bool  # unquoted

    @property
    def typed_by_yaml(self) -> bool:
        """Unquoted and read by YAML as a number, boolean or date (`ref: 1234`, `on`): the
        text as written is what a string field means."""
        return self.plain and self.tag not in (_STR_TAG, _NULL_TAG)


Scalars = dict[FieldPath, Scalar]


_PIPELINE_SHAPE = "a pipeline must be a mapping (name:, repository:, image:, ...)"


def read_yaml(text: str, smap: SourceMap, *, empty_ok: bool = False,
              shape: str = _PIPELINE_SHAPE) -> tuple[dict[str, Any] | None, Scalars,
                                                     list[Problem]]:
    """(data, scalars as written, problems) of a pipeline file's text; `smap` is filled with
    where each value and key is. data is None when there is no mapping to go on with.
    Another kind of file (the daemon's config) says whether an empty file is an empty mapping
    (`empty_ok`) and what its top level must be (`shape`)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        found = _flow_interpolation(text, exc)
        if found is not None:
            return None, {}, [Problem(smap.file, found.line, found.column, "", found.message)]
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "invalid YAML"
        if exc.context:
            what = f"{exc.context}: {what}"
        return None, {}, [Problem(smap.file, line, col, "", f"YAML syntax error: {what}")]
    except yaml.YAMLError as exc:
        return None, {}, [Problem(smap.file, 1, 1, "", f"YAML error: {exc}")]
    if root is None:
        if empty_ok:
            return {}, {}, []
        return None, {}, [Problem(smap.file, 1, 1, "", "the file is empty; a pipeline is a "
                                  "mapping with at least name:, repository: and image:")]
    conv = _Converter(smap)
    try:
        data = conv.convert(root, ())
    except _TooLarge:
        return None, {}, [Problem(smap.file, *_mark(root), "",
                                  f"the document expands to more than {MAX_NODES} values "
                                  f"(aliases nested too deep?)")]
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {data!r}"
        return None, conv.scalars, conv.problems + [
            Problem(smap.file, *_mark(root), "",
                    f"{shape}, got {kind}")]
    return data, conv.scalars, conv.problems


def _mark(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _TooLarge(Exception):
    pass


class _Converter:
    """Nodes -> plain data (dict / list / scalars), recording marks and problems."""

    def __init__(self, smap: SourceMap):
        self.smap = smap
        self.problems: list[Problem] = []
        self.scalars: Scalars = {}
        self._constructor = SafeConstructor()
        self._active: set[int] = set()
        self._count = 0

    def convert(self, node: Node, path: FieldPath) -> Any:
        self._count += 1
        if self._count > MAX_NODES:
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
        self.scalars[path] = Scalar(node.value, node.tag, node.style is None)
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
