"""`${...}` in a pipeline file's data: every string value interpolated in place (keys never
are), with `runner.interpolate`, from `--var` values, the environment and `variables:`.

An environment variable that backs a secret (`secrets: {x: {env: VAR}}`) is protected: using it
as `${VAR}` is an error, so that a secret's value never lands in the model.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runner.errors import Problem
from runner.interpolate import NAME_RE, BrokenVariable, InterpolationError, Resolver
from runner.loader.field_paths import FieldPath, format_path
from runner.loader.locations import SourceMap
from runner.loader.yaml_reader import Scalars


def interpolate(data: dict[str, Any], smap: SourceMap, scalars: Scalars,
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
                definitions[k] = scalars[("variables", k)].text  # 8080, true: as written
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
        # destinations: the chosen one's variables are in `variables` now; the others are
        # values for another run, whose ${...} need not resolve in this one.
        if key not in ("variables", "destinations"):
            data[key] = walk(data[key], (key,))
    return problems


def _protected_env(data: dict[str, Any]) -> dict[str, str]:
    """Environment variable name -> secret name, for secrets read from the environment."""
    out: dict[str, str] = {}
    secrets = data.get("secrets")
    if isinstance(secrets, dict):
        for name, src in secrets.items():
            if isinstance(src, dict) and isinstance(src.get("env"), str) and "$" not in src["env"]:
                out[src["env"]] = name
    return out
