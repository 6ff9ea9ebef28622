"""A pipeline file opened for use: loaded, checked, and its secrets read and registered with the
masker that every output passes. The one way `runner exec`, the deploy commands (rollback,
status, releases, deploy-lock, app, proxy) and the daemon's poll get a pipeline with its secrets.

Everything here happens before any side effect: a bad file or an unreadable secret raises
runner.errors.InvalidInput (exit 2) with every problem and where it is.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from runner.model import Pipeline
from runner.secrets import Masker, SecretStore

# How a pipeline file becomes a Pipeline: (path, variables) -> Pipeline. The deploy commands
# take another one in tests (a pipeline built in the test, not read from a file).
Load = Callable[[str, dict[str, str]], Pipeline]


@dataclass(frozen=True)
class OpenPipeline:
    pipeline: Pipeline
    masker: Masker
    secrets: SecretStore


def load_file(path: str, variables: dict[str, str]) -> Pipeline:
    """The default Load: the file through runner.loader, with this process's environment."""
    from runner.loader import load_pipeline

    return load_pipeline(path, variables=variables, environ=dict(os.environ))


def open_pipeline(path: str | os.PathLike, variables: Mapping[str, str] | None = None, *,
                  environ: Mapping[str, str] | None = None, load: Load | None = None,
                  masker: Masker | None = None, withhold_secrets: bool = False,
                  only_secrets: Collection[str] | None = None) -> OpenPipeline:
    """Load the file (with `variables` and `environ`, default this process's environment) and
    read its secrets.

    withhold_secrets: no secret value is read at all (a pull request from a fork); the store
    knows the names only, and a stage that asks for one fails saying which.
    only_secrets: read just these names (the poll needs only the repository's credentials, and
    must not fail on a deploy secret it never uses)."""
    from runner.loader import load_pipeline

    environ = dict(os.environ if environ is None else environ)
    if load is None:
        pipeline = load_pipeline(path, variables=dict(variables or {}), environ=environ)
    else:
        pipeline = load(os.fspath(path), dict(variables or {}))
    masker = masker or Masker()
    store = read_secrets(pipeline, environ, masker, withhold=withhold_secrets, only=only_secrets)
    return OpenPipeline(pipeline, masker, store)


def read_secrets(pipeline: Pipeline, environ: Mapping[str, str], masker: Masker, *,
                 withhold: bool = False, only: Collection[str] | None = None) -> SecretStore:
    """The secrets part of open_pipeline, for a caller that tells a bad file from an unreadable
    secret (the daemon's poll)."""
    if withhold:
        return SecretStore.withheld(pipeline, masker)  # no value is read at all
    if only is not None:
        pipeline = pipeline.model_copy(update={"secrets": {
            n: pipeline.secrets[n] for n in only if n in pipeline.secrets}})
    return SecretStore.from_pipeline(pipeline, environ, masker)
