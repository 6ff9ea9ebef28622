"""Common base for every pipeline model class: immutable, unknown keys refused.

Every field is documented by the docstring written under it (pydantic's
`use_attribute_docstrings`). That text is the field's description in `runner schema` and in
docs/pipeline.md, so it speaks of the pipeline file, in its words. A field whose default makes a
poor example (a required string, an empty list, a None) also gives `examples=[...]`; after adding
or changing a field, regenerate the reference: `runner schema --docs docs`.

Markers for `Annotated[...]` metadata, read by the loader, the schema and the reference alike:
- `OneString(how, items=None)`: the field also takes a single string, which its validator
  turns into the value (`servers: "a,b"`); `how` says how, in the pipeline's words. `items`,
  when given, says how each item of the list may be a string too.
- `PathOn(base)`: the field is a path, and a relative one is taken against `base` (one of
  `PATH_BASES`). Paths on the runner's machine (`pipeline`) are made absolute by the loader,
  against the pipeline file's directory, with `~` expanded.
- `AnyCase()`: a choice among names that may be written in any case (`fail_on: high`).
"""
from __future__ import annotations

import re
import shlex
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo,
                      field_validator)

# What a relative path is taken against, in the reference's words.
PATH_BASES = {
    "pipeline": "the pipeline file's directory (`~` is expanded)",
    "repository": "the root of the checked-out repository",
    "context": "the build context (`stages.build.context`)",
    "cache": "the runner's cache directory (`<data dir>/cache`; `~` is expanded)",
}

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A host name, an address, `[v6]`, or a `Host` alias of ~/.ssh/config (which may hold `_`).
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")


@dataclass(frozen=True)
class OneString:
    how: str  # how the single string is read, e.g. "one string of comma-separated ..."
    items: str | None = None  # set when each item of the list may be a string too: how


@dataclass(frozen=True)
class PathOn:
    base: str

    def __post_init__(self) -> None:
        if self.base not in PATH_BASES:
            raise ValueError(f"PathOn: unknown base {self.base!r} (known: {', '.join(PATH_BASES)})")


@dataclass(frozen=True)
class AnyCase:
    pass


def check_env(value: dict[str, str]) -> dict[str, str]:
    """Environment variables for a container: names as a shell takes them, one-line values."""
    for k, val in value.items():
        if not ENV_NAME_RE.match(k):
            raise ValueError(f"not an environment variable name: {k!r} (use letters, digits and "
                             f"'_', not starting with a digit)")
        if "\n" in val or "\r" in val or "\0" in val:
            raise ValueError(f"{k}: values cannot hold newlines")
    return value


def split_words(value: Any) -> Any:
    """A command written as one string: its words, split the way a shell splits them (no
    shell ever runs it)."""
    return tuple(shlex.split(value)) if isinstance(value, str) else value


# The arguments after a container's image (`docker run IMAGE ARG...`): a list of words, or one
# string split into words. Container, a role and an accessory take it alike.
ContainerCommand = Annotated[tuple[str, ...] | None, OneString(
    "one string, split into arguments the way a shell splits words (no shell runs it)"),
    BeforeValidator(split_words)]
def one_or_many(value: Any) -> Any:
    """A list written as its one item."""
    return (value,) if isinstance(value, str) else value


# Servers of `stages.deploy.servers` by their names (or hosts), where a role or an accessory
# runs: a list, or one name.
ServerNames = Annotated[tuple[str, ...], OneString("one server's name"),
                        BeforeValidator(one_or_many)]
# A container's environment (`env`, `secret_env`): names as a shell takes them, one-line values.
EnvVars = Annotated[dict[str, str], AfterValidator(check_env)]


_PORT_RE = re.compile(r"^(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(?:(\d{1,5}):)?(\d{1,5})(/(?:tcp|udp))?$")


def check_ports(value: tuple[str, ...]) -> tuple[str, ...]:
    """Port mappings as `docker run --publish` takes them: [IP:][HOST:]CONTAINER[/tcp|udp]."""
    for p in value:
        m = _PORT_RE.match(p)
        if not m or any(int(x) > 65535 for x in (m.group(2), m.group(3)) if x):
            raise ValueError(f"not a port mapping: {p!r} (use HOST:CONTAINER)")
    return value


def check_login(username: str | None, password_secret: str | None) -> None:
    """A registry login (a user name and the name of its password's secret): both or neither."""
    if bool(username) != bool(password_secret):
        raise ValueError("give both username and password (a secret name), or neither")


def _alternatives(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _numbers_only(annotation: Any) -> bool:
    """Whether a field's annotation is int or float (optional or not), nothing else."""
    alts = _alternatives(annotation)
    return bool(alts) and all(a in (int, float) for a in alts)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1; in a pipeline `retries: true` is a mistake, not a count.
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _numbers_only(field.annotation):
                what = "a whole number" if int in _alternatives(field.annotation) else "a number"
                raise ValueError(f"expected {what}, got {str(value).lower()}")
        return value
