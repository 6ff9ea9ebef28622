"""The destination a command chose (`-d NAME`), applied to a pipeline file's data before
interpolation: its `variables` replace the top-level `variables:` of the same name, each
keeping its own place in the file (a broken value is reported where the destination wrote it).

With `destinations:` in the file, a command must name one (Kamal's choice: a deploy never goes
to a default place by mistake); naming one that the file lacks is an error listing those it has.
"""
from __future__ import annotations

from typing import Any

from runner.errors import InvalidInput, Problem
from runner.loader.locations import SourceMap
from runner.loader.yaml_reader import Scalars
from runner.model.destinations import DESTINATION_NAME


class DestinationChoice(InvalidInput):
    """The destination chosen is missing, unknown, or named for a file without destinations:
    `known` holds the file's destination names, so that a daemon's `--check` can say so at its
    own entry's line."""

    def __init__(self, message: str, problems: list[Problem], known: tuple[str, ...]):
        super().__init__(message, problems)
        self.known = known


def declared(data: dict[str, Any]) -> tuple[str, ...]:
    """The destination names a pipeline file's data declares."""
    raw = data.get("destinations")
    return tuple(str(n) for n in raw) if isinstance(raw, dict) else ()


def select_destination(data: dict[str, Any], smap: SourceMap, scalars: Scalars,
                       name: str | None) -> list[Problem]:
    """Merge destination `name`'s variables into data["variables"] (in place); the problems
    with the choice or with the destinations' names."""
    raw = data.get("destinations")
    if raw is None or raw == {}:
        if name is None:
            return []
        return [Problem(smap.file, 1, 1, "", f"--destination {name}: this pipeline has no "
                                             f"destinations: section")]
    if not isinstance(raw, dict):
        return []  # the model says what is wrong with it
    problems = [smap.problem(("destinations", n), f"destination name {n!r} is not a DNS label "
                             f"(1 to 32 of a-z 0-9 '-', not starting or ending with '-')",
                             key=True)
                for n in raw if not (isinstance(n, str) and DESTINATION_NAME.fullmatch(n))]
    known = ", ".join(str(n) for n in raw)
    if name is None:
        return problems + [smap.problem(("destinations",), f"this pipeline has destinations "
                                        f"({known}): choose one with --destination NAME (-d)",
                                        key=True)]
    if name not in raw:
        return problems + [smap.problem(("destinations",), f"unknown destination {name!r}: "
                                        f"this pipeline's destinations are {known}", key=True)]
    chosen = raw[name]
    values = chosen.get("variables") if isinstance(chosen, dict) else None
    if not isinstance(values, dict):
        return problems
    own = data.get("variables")
    if own is None:
        own = data["variables"] = {}
    if not isinstance(own, dict):
        return problems
    for key, value in values.items():
        own[key] = value
        where = ("destinations", name, "variables", key)
        for table in (smap.values, smap.keys):
            if where in table:
                table[("variables", key)] = table[where]
        if where in scalars:
            scalars[("variables", key)] = scalars[where]
    return problems
