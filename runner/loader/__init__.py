"""Pipeline file -> validated `Pipeline`, with every problem located at file:line:column.

Steps, each collecting problems instead of stopping at the first (one module each):
1. `yaml_reader`: compose the YAML into nodes (PyYAML's SafeLoader), turn them into plain Python
   data and a source map (`locations.SourceMap`): field path tuple -> (line, column) of the
   value, and of the key (1-based). Duplicate keys are refused; `<<` merge keys are honoured.
2. `destinations`: the chosen destination's variables over the top-level ones.
   `interpolation`: interpolate every string scalar (`runner.interpolate`; keys never are).
3. `local_paths`: resolve relative paths on the runner's machine (the fields marked
   `PathOn("pipeline")`: repository.url, secrets' `file:`, ssh.key_file, ...) against the
   file's directory.
4. `mapping`: validate with the pydantic model; each pydantic error is put back on the line it
   came from, and said in the pipeline's words (`runner.model.words`): "expected a list of
   strings, got the string 'latest'", never pydantic's "Input should be a valid tuple".
5. `checks`: what the model cannot check alone: secret sources, secret references
   (`secret_refs`), image name, tag templates, a top-level `env:` with no deploy to reach; the
   repository URL and ref, as written (before step 3 makes a relative path absolute);
   `accessory_checks`: accessory names, and their servers among the deploy's; `role_checks`:
   role names, their servers, the one role behind the proxy.
All problems are raised together as `InvalidInput("<file>: pipeline is invalid", problems)`.

The source map travels with the returned pipeline and its copies (see `locations`):
`problem_at(pipeline, path, message)` locates a later problem, such as an unreadable secret,
in the file that pipeline came from. `field_paths` says paths and walks data and model by them.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from runner.errors import InvalidInput, Problem
from runner.gitsafety import is_local_path
from runner.loader.accessory_checks import accessory_checks
from runner.loader.checks import SUPPORTED_VERSIONS, cross_checks, repository_checks
from runner.loader.destinations import DestinationChoice, declared, select_destination
from runner.loader.field_paths import FieldPath, format_path
from runner.loader.interpolation import interpolate
from runner.loader.local_paths import resolve_paths
from runner.loader.locations import SourceMap, attach, problem_at, source_map
from runner.loader.mapping import validate
from runner.loader.role_checks import role_checks
from runner.loader.secret_refs import register_secret_reference, secret_references
from runner.loader.yaml_reader import read_yaml
from runner.model import Pipeline
from runner.model.words import HIDDEN_FIELDS

__all__ = [
    "SUPPORTED_VERSIONS", "FieldPath", "SourceMap", "format_path", "is_local_path",
    "load_pipeline", "load_pipeline_text", "problem_at", "register_secret_reference",
    "secret_references", "source_map",
]


def load_pipeline_text(
    text: str,
    filename: str = "<pipeline>",
    *,
    variables: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    destination: str | None = None,
) -> Pipeline:
    """Parse, interpolate and validate a pipeline given as text.

    `variables`: `--var K=V` values (highest precedence); `environ`: the process environment
    (default: os.environ); `base_dir`: where relative paths start (default: the directory of
    `filename`). Raises InvalidInput carrying every problem found. The pipeline returned
    carries its own source map (`source_map`, `problem_at`). `destination`: the one chosen
    (`-d`), whose variables replace the top-level ones (runner.loader.destinations)."""
    environ = os.environ if environ is None else environ
    smap = SourceMap(filename)
    data, scalars, problems = read_yaml(text, smap)
    if data is None:
        raise InvalidInput(f"{filename}: pipeline is invalid", problems)
    for hidden in set(HIDDEN_FIELDS) & set(data):
        problems.append(smap.problem((hidden,), f"unknown key '{hidden}' (it is set by the "
                                     f"runner, not in the file)", key=True))
        del data[hidden]
    failed: set[str] = set()
    chosen = select_destination(data, smap, scalars, destination)
    if chosen:
        # Without the destination's values the rest cannot be judged (every ${...} it would
        # define is undefined): the choice first, alone.
        raise DestinationChoice(f"{filename}: pipeline is invalid", problems + chosen,
                                declared(data))
    problems += interpolate(data, smap, scalars, variables or {}, environ, failed)
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(filename))
    as_written = repository_checks(data, smap)
    resolve_paths(data, os.fspath(base_dir), failed)
    pipeline, invalid = validate(data, smap, scalars)
    # A string left uninterpolated is reported once, not again as an invalid value.
    problems += [p for p in invalid + as_written + cross_checks(data, smap)
                 + accessory_checks(data, pipeline, smap) + role_checks(data, pipeline, smap)
                 if p.path not in failed]
    if problems or pipeline is None:
        problems.sort(key=lambda p: (p.line, p.column))
        raise InvalidInput(f"{filename}: pipeline is invalid", _unique(problems))
    source = filename if filename.startswith("<") else os.path.abspath(filename)
    return attach(pipeline.model_copy(update={"source_file": source,
                                              "destination": destination or ""}), smap)


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    variables: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    destination: str | None = None,
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
    return load_pipeline_text(text, filename, variables=variables, environ=environ,
                              destination=destination)


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))
