"""A pipeline file opened for use: loaded, checked, and its secrets read and registered with the
masker that every output passes: open_pipeline for the deploy commands (rollback, status,
releases, deploy-lock, app, proxy); its read_secrets also for `runner exec` (engine.prepare,
which checks its overrides in between) and the daemon's poll (which reads only the
repository's secrets).

Everything here happens before any side effect: a bad file or an unreadable secret raises
runner.errors.InvalidInput (exit 2) with every problem and where it is.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from runner.model import Pipeline
from runner.secrets import DeferredSecretStore, Masker, SecretStore

# How a pipeline file becomes a Pipeline: (path, variables) -> Pipeline. The deploy commands
# take another one in tests (a pipeline built in the test, not read from a file).
Load = Callable[[str, dict[str, str]], Pipeline]


@dataclass(frozen=True)
class OpenPipeline:
    pipeline: Pipeline
    masker: Masker
    secrets: SecretStore | DeferredSecretStore


def load_file(path: str, variables: dict[str, str], destination: str | None = None) -> Pipeline:
    """The default Load: the file through runner.loader, with this process's environment;
    `destination`: the one a command chose (`-d`)."""
    from runner.loader import load_pipeline

    return load_pipeline(path, variables=variables, environ=dict(os.environ),
                         destination=destination)


def open_pipeline(path: str | os.PathLike, variables: Mapping[str, str], *,
                  load: Load = load_file, destination: str | None = None,
                  defer_unreadable: bool = False) -> OpenPipeline:
    """Load the file with `variables` (and this process's environment) and read every secret
    it names, registered with a new masker. A `destination` goes to the Load as a third
    argument (load_file takes it; a test's Load, which builds its pipeline, need not).
    `defer_unreadable`: a secret that cannot be read stops the command only when it uses it
    (DeferredSecretStore; every readable one is still read and masked), for the commands that
    look at what runs or act on it (`runner app logs`, `runner status`)."""
    path = os.fspath(path)
    pipeline = (load(path, dict(variables)) if destination is None
                else load(path, dict(variables), destination))  # type: ignore[call-arg]
    masker = Masker()
    if defer_unreadable:
        return OpenPipeline(pipeline, masker, DeferredSecretStore(pipeline, dict(os.environ),
                                                                  masker))
    return OpenPipeline(pipeline, masker, read_secrets(pipeline, dict(os.environ), masker))


def read_secrets(pipeline: Pipeline, environ: Mapping[str, str], masker: Masker, *,
                 withhold: bool = False, only: Collection[str] | None = None,
                 keep: tuple[str, ...] = ()) -> SecretStore:
    """The secrets part of open_pipeline, for a caller that tells a bad file from an unreadable
    secret (the daemon's poll). `withhold`: no value is read but those `keep` names."""
    if withhold:
        return SecretStore.withheld(pipeline, masker, environ, keep)
    if only is not None:
        pipeline = pipeline.model_copy(update={"secrets": {
            n: pipeline.secrets[n] for n in only if n in pipeline.secrets}})
    return SecretStore.from_pipeline(pipeline, environ, masker)
