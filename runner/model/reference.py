"""The pipeline format's JSON Schema and reference, both generated from the model, and the
reference of what the stages output, generated from their types.

`json_schema()` is what `runner schema` prints and docs/pipeline.schema.json holds (JSON Schema
draft-07, the draft yaml-language-server implements). `reference()` is the generated part of
docs/pipeline.md: one table per section, every field with its type, default, an example and its
description (the docstring under the field). `outputs_reference()` is the generated part of
docs/stage-outputs.md: one table per stage (runner.outputs), every JSON key with its type and
description. `update_docs(dir)` rewrites the three files; `stale_docs(dir)` says which of them
no longer match the code.

The schema says what the loader accepts, not only what the model types are:
- any value may be a string holding `${...}`, interpolated before it is validated (`depth:
  "${DEPTH}"`, `fail_on: ${FAIL_ON}`): scalars other than plain strings also take such a
  string; lists and mappings do not, unless the field takes one string (`OneString`:
  `servers: ${DEPLOY_HOSTS}`);
- where a string is expected, a YAML number or boolean is taken as written (`ref: 1234`);
- booleans also take YAML 1.1's yes/no/on/off (PyYAML reads them so), for editors on YAML 1.2.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticUndefined

from runner.model import Pipeline
from runner.model.base import PATH_BASES
from runner.model.image import ImageRef
from runner.outputs import OUTPUT_TYPES, described
from runner.model.words import (
    HIDDEN_FIELDS, FieldType, alternatives, expected, fields_of, item_type, literal_values,
    model_class, value_type, yaml_keys,
)

SCHEMA_FILE = "pipeline.schema.json"
REFERENCE_FILE = "pipeline.md"
REGENERATE = "runner schema --docs docs"
BEGIN = (f"<!-- generated from runner/model by `{REGENERATE}`: edit the model's docstrings, "
         f"not this part -->")
END = "<!-- end of the generated part -->"
OUTPUTS_FILE = "stage-outputs.md"
OUTPUTS_BEGIN = (f"<!-- generated from runner/outputs.py by `{REGENERATE}`: edit the field "
                 f"descriptions there, not this part -->")

# A string with a `${` that is not a `$${` escape.
INTERPOLATED = {"type": "string", "pattern": r"(^|[^$])(\$\$)*\$\{",
                "description": "a ${...} that the loader interpolates, then validates"}
_YAML11_BOOLEANS = ["yes", "no", "on", "off", "Yes", "No", "On", "Off", "YES", "NO", "ON", "OFF"]


# --------------------------------------------------------------------------- walking the model

@dataclass(frozen=True)
class Section:
    """A mapping of the file: its path ("stages.deploy.ssh", "secrets.<name>",
    "stages.deploy.servers[]"; "" for the top level) and its model."""

    path: str
    model: type[BaseModel]

    @property
    def title(self) -> str:
        return self.path or "top level"

    @property
    def anchor(self) -> str:
        return github_anchor(f"`{self.path}`" if self.path else self.title)

    def child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lowercase, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _child_section(path: str, ann: Any) -> tuple[str, type[BaseModel]] | None:
    cls = model_class(ann)
    if cls is not None:
        return path, cls
    item = item_type(ann)
    if item is not None and model_class(item) is not None:
        return path + "[]", model_class(item)  # type: ignore[return-value]
    value = value_type(ann)
    if value is not None and model_class(value) is not None:
        return path + ".<name>", model_class(value)  # type: ignore[return-value]
    return None


def sections(root: type[BaseModel] = Pipeline) -> list[Section]:
    """Every mapping of the pipeline file, depth first in field order."""
    out: list[Section] = []
    seen: dict[type[BaseModel], str] = {}

    def visit(path: str, model: type[BaseModel]) -> None:
        if model in seen:  # one section per model: a second place links to the first
            return
        seen[model] = path
        section = Section(path, model)
        out.append(section)
        for key, _name, info in fields_of(model):
            child = _child_section(section.child(key), info.annotation)
            if child is not None:
                visit(*child)

    visit("", root)
    return out


def _home(model: type[BaseModel]) -> str:
    """The path of the one section that describes `model` (its first place in the file)."""
    return next(s.path for s in sections() if s.model is model)


def description(info: FieldInfo) -> str:
    """A field's description as one paragraph, with what its markers add."""
    text = " ".join((info.description or "").split())
    ft = FieldType.of(info)
    if ft.path_on is not None:
        text += f" A relative path is taken against {PATH_BASES[ft.path_on.base]}."
    return text.strip()


def model_description(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


# --------------------------------------------------------------------------- JSON Schema

def _interpolated_or(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, INTERPOLATED]}


class _Generator(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def int_schema(self, schema: Any) -> dict[str, Any]:
        return _interpolated_or(super().int_schema(schema))

    def float_schema(self, schema: Any) -> dict[str, Any]:
        return _interpolated_or(super().float_schema(schema))

    def bool_schema(self, schema: Any) -> dict[str, Any]:
        return {"anyOf": [super().bool_schema(schema), {"enum": _YAML11_BOOLEANS}, INTERPOLATED]}

    def date_schema(self, schema: Any) -> dict[str, Any]:
        return _interpolated_or(super().date_schema(schema))

    def literal_schema(self, schema: Any) -> dict[str, Any]:
        return _interpolated_or(super().literal_schema(schema))

    def str_schema(self, schema: Any) -> dict[str, Any]:
        out = super().str_schema(schema)
        if set(out) == {"type"}:
            return {"type": ["string", "number", "boolean"]}
        return {"anyOf": [out, INTERPOLATED, {"type": ["number", "boolean"]}]}


_META_KEYS = ("description", "default", "examples")


def _split_meta(prop: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = {k: prop[k] for k in _META_KEYS if k in prop}
    core = {k: v for k, v in prop.items() if k not in _META_KEYS}
    return core, meta


def _arrays(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "array":
            yield node
        for alt in node.get("anyOf", ()):
            yield from _arrays(alt)


def _any_case(node: Any) -> None:
    if isinstance(node, dict):
        if "const" in node and isinstance(node["const"], str):
            node["enum"] = [node.pop("const")]
        if isinstance(node.get("enum"), list):
            node["enum"] += [v.lower() for v in node["enum"]
                             if isinstance(v, str) and v.lower() not in node["enum"]]
        for value in node.values():
            _any_case(value)
    elif isinstance(node, list):
        for value in node:
            _any_case(value)


def other_keys(key: str, name: str, info: FieldInfo) -> list[str]:
    """The other keys a field may be written as (`reason` for `statement`)."""
    choices = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) \
        else []
    return [k for k in yaml_keys(name, info) if k != key and k in choices]


def _fix_field(schema: dict[str, Any], key: str, name: str, info: FieldInfo) -> None:
    """Put one field's property in the words and shape the loader accepts."""
    props = schema["properties"]
    if key not in props:
        raise ValueError(f"the generated schema has no property {key!r} "
                         f"(has {', '.join(props)})")
    ft = FieldType.of(info)
    core, meta = _split_meta(props[key])
    meta["description"] = description(info)
    if ft.any_case:
        _any_case(core)
    if ft.one_string is not None:
        if ft.one_string.items:
            for array in _arrays(core):
                array["items"] = {"anyOf": [array["items"], {"type": "string"}]}
        core = {"anyOf": [core, {"type": "string", "description": ft.one_string.how}]}
    props[key] = {**core, **meta}
    for other in other_keys(key, name, info):
        props[other] = {**core, "description": f"The same as `{key}`."}
        if key in schema.get("required", ()):
            schema["required"].remove(key)
            if not schema["required"]:
                del schema["required"]
            schema.setdefault("allOf", []).append(
                {"anyOf": [{"required": [key]}, {"required": [other]}]})
        schema.setdefault("allOf", []).append({"not": {"required": [key, other]}})


def _draft7(node: Any) -> Any:
    """pydantic writes draft 2020-12 `$defs`; yaml-language-server reads draft-07, where a
    `$ref` ignores its sibling keys (the description, the default)."""
    if isinstance(node, list):
        return [_draft7(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _draft7(v) for k, v in node.items()}
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace("#/$defs/", "#/definitions/")
        if len(out) > 1:
            ref = out.pop("$ref")
            out = {"allOf": [{"$ref": ref}], **out}
    return out


def json_schema() -> dict[str, Any]:
    """The pipeline file's JSON Schema (draft-07)."""
    raw = Pipeline.model_json_schema(mode="validation", schema_generator=_Generator)
    defs = raw.pop("$defs", {})
    for section in sections():
        schema = raw if section.model is Pipeline else defs.get(section.model.__name__)
        if schema is None:
            raise ValueError(f"the generated schema has no definition {section.model.__name__}")
        schema.pop("title", None)
        schema["description"] = model_description(section.model)
        for hidden in HIDDEN_FIELDS:  # set by the loader, refused in a file
            schema.get("properties", {}).pop(hidden, None)
        for key, name, info in fields_of(section.model):
            _fix_field(schema, key, name, info)
    out: dict[str, Any] = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "runner pipeline",
        **raw,
        "definitions": defs,
    }
    out["description"] = (model_description(Pipeline) + " Reference: docs/pipeline.md; "
                          f"regenerate with `{REGENERATE}`.")
    return _draft7(out)


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- Markdown

def _flow(value: Any) -> str:
    """A value as YAML writes it in flow style, on one line."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    elif isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False,
                          allow_unicode=True).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if value is None or value is PydanticUndefined:
        return "unset"
    return f"`{_flow(value)}`"


def example(key: str, info: FieldInfo) -> Any:
    """The field's example value: its own `examples`, else one its type and default suggest;
    None for a section (a mapping of its own, documented below it)."""
    if info.examples:
        return info.examples[0]
    ann = info.annotation
    if _child_section("x", ann) is not None:
        return None
    default = None if info.is_required() or info.default_factory else info.default
    if ann is bool:
        return not default
    values = literal_values(ann)
    if values is not None:
        others = [v for v in values if v != default]
        return others[0] if others else values[0]
    item_values = literal_values(item_type(ann)) if item_type(ann) is not None else None
    if item_values is not None:
        return [item_values[-1]]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return default
    if isinstance(default, str) and default:
        return default
    return None


def _type_text(path: str, info: FieldInfo) -> str:
    child = _child_section(path, info.annotation)
    ft = FieldType.of(info)
    if child is not None:
        home = _home(child[1])
        link = f"[`{home}`](#{Section(home, child[1]).anchor})"
        if child[0].endswith("[]"):
            text = f"list of mappings: {link}"
        elif child[0].endswith(".<name>"):
            text = f"mapping of names to mappings: {link}"
        else:
            text = f"mapping: {link}"
        others = [a for a in alternatives(info.annotation) if _child_section("x", a) is None]
        if others:  # `tls: false` beside `tls: {ca, cert, key}`
            text += " or " + " or ".join(expected(FieldType(a)) for a in others)
        if ft.one_string is not None:
            text += f", or {ft.one_string.how}"
        return text
    return expected(ft).removeprefix("a ").removeprefix("an ")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """The generated part of docs/pipeline.md (without the markers)."""
    lines: list[str] = []
    for section in sections():
        lines += [f"### {'`' + section.path + '`' if section.path else 'Top level'}", ""]
        text = model_description(section.model)
        if text:
            lines += [text, ""]
        lines += ["| Key | Type | Default | Example | Description |",
                  "|---|---|---|---|---|"]
        for key, name, info in fields_of(section.model):
            path = section.child(key)
            value = example(key, info)
            shown = f"`{_flow({key: value})[1:-1]}`" if value is not None else ""
            lines.append("| " + " | ".join(_cell(c) for c in (
                f"`{key}`", _type_text(path, info), _default(info), shown,
                description(info))) + " |")
            for other in other_keys(key, name, info):
                lines.append(f"| `{other}` | the same as `{key}` | | | |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- stage outputs

_OUTPUT_SCALARS = {str: "string", bool: "boolean", int: "integer", float: "number",
                   Path: "string (a path)", ImageRef: "string (`name@sha256:<64 hex>`)"}


def _plural(text: str) -> str:
    if text in ("string", "boolean", "integer", "number"):
        return text + "s"
    return "mappings" + text[len("mapping"):] if text.startswith("mapping") else text


def output_type(path: str, ann: Any) -> str:
    """The JSON type of an outputs field, in words; a nested type links to its own table,
    `path` (such as `deploy.servers[]`)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        shown = [output_type(path, a) for a in args if a is not type(None)]
        return " or ".join(shown) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return "list of " + _plural(output_type(path + "[]", args[0]))
    if origin in (dict, collections.abc.Mapping):
        return "mapping of strings to " + _plural(output_type(path, args[1]))
    if ann in _OUTPUT_SCALARS:
        return _OUTPUT_SCALARS[ann]
    if dataclasses.is_dataclass(ann):
        return f"mapping: [`{path}`](#{github_anchor(f'`{path}`')})"
    raise ValueError(f"{path}: no JSON type is known for {ann!r}")


def _nested(path: str, ann: Any) -> Iterator[tuple[str, type]]:
    """The outputs types inside a field's type, with their paths."""
    if dataclasses.is_dataclass(ann) and ann not in _OUTPUT_SCALARS:  # ImageRef is a string
        yield path, ann
        return
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is tuple:
        yield from _nested(path + "[]", args[0])
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            yield from _nested(path, a)


def output_sections() -> list[tuple[str, type]]:
    """Every outputs table: (path, type), each stage's first, then the types inside it."""
    out: list[tuple[str, type]] = []

    def visit(path: str, cls: type) -> None:
        out.append((path, cls))
        for f in described(cls):
            for child in _nested(f"{path}.{f.key}", f.type):
                visit(*child)

    for stage, cls in OUTPUT_TYPES.items():
        visit(stage, cls)
    return out


def outputs_reference() -> str:
    """The generated part of docs/stage-outputs.md (without the markers)."""
    lines: list[str] = []
    for path, cls in output_sections():
        top = path in OUTPUT_TYPES
        lines += [f"{'###' if top else '####'} `{path}`", ""]
        text = model_description(cls)
        lines += [f"`{cls.__name__}`" + (f": {text}" if text else ""), ""]
        lines += ["| Key | Type | Description |", "|---|---|---|"]
        for f in described(cls):
            lines.append("| " + " | ".join(_cell(c) for c in (
                f"`{f.key}`", output_type(f"{path}.{f.key}", f.type), f.doc)) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- the files

# The Markdown files with a generated part: file name, its opening marker, what goes between.
GENERATED: tuple[tuple[str, str, Callable[[], str]], ...] = (
    (REFERENCE_FILE, BEGIN, reference),
    (OUTPUTS_FILE, OUTPUTS_BEGIN, outputs_reference),
)


def _with_generated(markdown: str, name: str, begin: str, body: Callable[[], str]) -> str:
    """`markdown` with its generated part replaced by the current `body()`."""
    start, end = markdown.find(begin), markdown.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{name} has no generated part: it needs the lines "
                         f"{begin!r} and {END!r}")
    return markdown[:start + len(begin)] + "\n\n" + body() + "\n" + markdown[end:]


def update_docs(directory: str | Path) -> list[Path]:
    """Rewrite `directory`/pipeline.schema.json and the generated parts of
    `directory`/pipeline.md and `directory`/stage-outputs.md; return the files that changed.
    A Markdown file that is not there is left out (its hand-written frame cannot be made up):
    `stale_docs` names it."""
    directory = Path(directory)
    changed = []
    schema_path = directory / SCHEMA_FILE
    new_schema = schema_text()
    if not schema_path.is_file() or schema_path.read_text(encoding="utf-8") != new_schema:
        schema_path.write_text(new_schema, encoding="utf-8")
        changed.append(schema_path)
    for name, begin, body in GENERATED:
        path = directory / name
        if not path.is_file():
            continue
        old = path.read_text(encoding="utf-8")
        new = _with_generated(old, name, begin, body)
        if new != old:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def stale_docs(directory: str | Path) -> list[Path]:
    """The files of `directory` that do not match the code (missing ones included)."""
    directory = Path(directory)
    schema_path = directory / SCHEMA_FILE
    stale = []
    if not schema_path.is_file() or schema_path.read_text(encoding="utf-8") != schema_text():
        stale.append(schema_path)
    for name, begin, body in GENERATED:
        path = directory / name
        if not path.is_file():
            stale.append(path)
            continue
        old = path.read_text(encoding="utf-8")
        try:
            if _with_generated(old, name, begin, body) != old:
                stale.append(path)
        except ValueError:
            stale.append(path)
    return stale
