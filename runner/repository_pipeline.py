"""A pipeline that lives in the repository it builds (a daemon entry's `pipeline: PATH`): read at
the run's commit, and held to the operator's limits before anything runs.

The file is read from the repository itself at the exact commit the run builds (a shallow fetch
of that commit into a scratch repository, then `git show COMMIT:PATH`): never a work tree,
never an older copy. Then the repository may widen nothing the daemon entry decides:

- it is interpolated with the entry's `vars` only, not the daemon's environment (which holds the
  daemon's own secrets: ${RUNNER_DATABASE_URL} must not reach a build argument);
- its `secrets:` may only name secrets the entry grants, and their values come from where the
  entry says (a repository naming `{file: /etc/runner/other-key}` reads nothing);
- every host its deploy reaches (each server and `ssh.jump`) must be in the entry's `servers`;
- it sets no deploy hooks (they run on the runner's own host, the daemon's);
- what is built is the entry's repository, whatever `repository.url` says, reached with the
  entry's credentials (`token` / `ssh_key`), which the file may not name: only git gets them.

A problem is InvalidInput (exit 2) with its file:line:column in the file as committed, named
`PATH@COMMIT`.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from runner.errors import InvalidInput, Problem
from runner.gitaccess import remote, repository_access
from runner.gitsafety import check_ref, is_sha
from runner.model import Pipeline, Repository
from runner.model.deploy import parse_server
from runner.run_request import RepositoryPipeline
from runner.secrets import read_secret_file


def check_path(path: str) -> str:
    """A path inside the repository: relative, no '..', not an option. Raises InvalidInput."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or path.startswith("-") or "\n" in path \
            or ":" in path:
        raise InvalidInput(f"pipeline path {path!r} refused: a relative path inside the repository, "
                           "without '..' or ':'")
    return str(p)


def repository_of(source: RepositoryPipeline) -> Repository:
    """The entry's repository and its credentials, as a pipeline's `repository:` says them."""
    return Repository.model_validate({"url": source.repository, "token": source.token,
                                      "token_user": source.token_user, "ssh_key": source.ssh_key})


def credential(source: RepositoryPipeline, name: str, environ: Mapping[str, str]) -> str:
    """The value of the entry's secret `name` (one of its credentials). InvalidInput names the
    secret and where it should come from, never a value."""
    src = source.secrets[name]
    if src.env is not None:
        value = environ.get(src.env, "")
        if not value:
            raise InvalidInput(f"the repository's credential {name!r}: environment variable "
                               f"{src.env} is not set or empty")
        return value
    assert src.file is not None
    try:
        value = read_secret_file(src.file)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the repository's credential {name!r}: cannot read {src.file}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    if not value:
        raise InvalidInput(f"the repository's credential {name!r}: {src.file} is empty")
    return value


def _git(argv: list[str], env: dict[str, str], timeout: float, what: str,
         mask: Callable[[str], str] = str) -> str:
    try:
        proc = subprocess.run(["git", *argv], capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidInput(f"{what}: git took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise InvalidInput(mask(f"{what}: {proc.stderr.strip()[-300:] or f'git exited {proc.returncode}'}"))
    return proc.stdout


def read_at_commit(source: RepositoryPipeline, path: str, commit: str | None, ref: str | None,
                   timeout: float = 120.0, environ: Mapping[str, str] | None = None,
                   warn: Callable[[str], None] = lambda message: None) -> tuple[str, str]:
    """(the file's text, the commit it was read at). Without `commit`, `ref`'s head now (and that
    commit is the one to build). The repository is reached with the entry's credentials, their
    values read from `environ` (default: this process's) or their files. Raises InvalidInput
    when the commit or the file is not there, or a credential cannot be read."""
    path = check_path(path)
    want = commit or (check_ref(ref) if ref else None)
    if want is None:
        raise InvalidInput("the repository's pipeline needs a commit or a ref to read it at")
    where = remote(source.repository)
    environ = os.environ if environ is None else environ
    # TemporaryDirectory is 0700: the askpass script and the key file are this process's alone.
    with tempfile.TemporaryDirectory(prefix="runner-pipeline-") as private:
        scratch = os.path.join(private, "repo.git")
        access = repository_access(repository_of(source), where,
                                   lambda name, field_name: credential(source, name, environ),
                                   Path(private), warn)
        try:
            env = access.env
            _git(["init", "-q", "--bare", scratch], access.local_env, timeout,
                 "preparing to read the pipeline")
            _git(["-C", scratch, "fetch", "-q", "--depth=1", "--no-tags", "--", where.fetch_url, want],
                 env, timeout, f"fetching {want[:40]} of {where.redacted} to read {path}", access.mask)
            got = _git(["-C", scratch, "rev-parse", "--verify", "FETCH_HEAD^{commit}"], env, timeout,
                       "reading the fetched commit").strip()
            if commit is not None and got != commit:
                raise InvalidInput(f"fetched {got[:12]} of {where.redacted}, not the run's commit "
                                   f"{commit[:12]}")
            try:
                text = _git(["-C", scratch, "show", f"{got}:{path}"], env, timeout,
                            "reading the pipeline")
            except InvalidInput:
                raise InvalidInput(f"{path}: no such file in {where.redacted} at commit {got[:12]} "
                                   "(the daemon entry's `pipeline:` names it)") from None
        finally:
            access.cleanup()
    assert is_sha(got)
    return text, got


def load_at_commit(source: RepositoryPipeline, path: str, commit: str | None, ref: str | None,
                   variables: dict[str, str], environ: Mapping[str, str] | None = None,
                   warn: Callable[[str], None] = lambda message: None,
                   timeout: float = 120.0, destination: str | None = None) -> tuple[Pipeline, str]:
    """The repository's pipeline at the run's commit, within the operator's limits, and that
    commit; `destination`: the daemon entry's. Raises InvalidInput with every problem at
    PATH@COMMIT:line:column."""
    from runner.loader import load_pipeline_text

    text, got = read_at_commit(source, path, commit, ref, timeout, environ, warn)
    with tempfile.TemporaryDirectory(prefix="runner-pipeline-base-") as nowhere:
        # Relative paths in the file point into an empty directory: the repository names no file
        # of the daemon's machine by a path relative to where the daemon keeps its files.
        pipeline = load_pipeline_text(text, f"{path}@{got[:12]}", variables=variables, environ={},
                                      base_dir=nowhere, destination=destination)
    return within_limits(pipeline, source), got


def within_limits(pipeline: Pipeline, source: RepositoryPipeline) -> Pipeline:
    """`pipeline` with the entry's repository, credentials and secret sources; InvalidInput (every
    problem at its place) if it names a secret the entry does not grant (its credentials are not
    granted) or a host outside `servers`."""
    from runner.loader import problem_at

    problems: list[Problem] = []
    credentials = source.credentials
    granted = ", ".join(sorted(set(source.secrets) - set(credentials))) or "none"
    for name in pipeline.secrets:
        if name in credentials:
            problems.append(problem_at(pipeline, ("secrets", name), f"secret {name!r} is the daemon's "
                                       "credential for reading the repository: only git gets it "
                                       f"(granted: {granted})", key=True))
        elif name not in source.secrets:
            problems.append(problem_at(pipeline, ("secrets", name), f"secret {name!r} is not granted to "
                                       f"this pipeline by the daemon (granted: {granted})", key=True))
        elif pipeline.secrets[name].command is not None:  # it would run on the daemon's host
            problems.append(problem_at(pipeline, ("secrets", name, "command"), "a secret's command "
                                       "runs on the runner's own host: only the operator's "
                                       "pipeline file may set one (the daemon says where granted "
                                       "secrets come from)"))
    deploy = pipeline.stages.deploy
    if deploy.enabled:
        allowed = set(source.servers)
        listed = ", ".join(source.servers) or "none"
        for i, server in enumerate(deploy.servers):
            if server.host not in allowed:
                problems.append(problem_at(pipeline, ("stages", "deploy", "servers", i),
                                           f"server {server.host!r} is not one this pipeline may deploy "
                                           f"to (the daemon's servers: {listed})"))
        for phase in ("pre_deploy", "post_deploy"):
            if getattr(deploy.hooks, phase):  # they would run on the daemon's own host
                problems.append(problem_at(pipeline, ("stages", "deploy", "hooks", phase),
                                           "deploy hooks run on the runner's own host: only the "
                                           "operator's pipeline file may set them"))
        if deploy.ssh.jump and parse_server(deploy.ssh.jump)["host"] not in allowed:
            problems.append(problem_at(pipeline, ("stages", "deploy", "ssh", "jump"),
                                       f"jump host {deploy.ssh.jump!r} is not one this pipeline may reach "
                                       f"(the daemon's servers: {listed})"))
    if problems:
        problems.sort(key=lambda p: (p.line, p.column))
        raise InvalidInput("the repository's pipeline asks for more than the daemon allows", problems)
    # The repository is reached as the entry says, whatever the file's repository: says.
    repository = pipeline.repository.model_copy(update={
        "url": source.repository, "token_secret": source.token, "token_user": source.token_user,
        "ssh_key_secret": source.ssh_key})
    return pipeline.model_copy(update={
        "secrets": {name: source.secrets[name] for name in (*pipeline.secrets, *credentials)},
        "repository": repository})

