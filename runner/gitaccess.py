"""How git reaches a pipeline's repository: the environment, and the repository's credentials.

Shared by the checkout stage and the daemon's poll, so that both reach a repository the same way
and neither needs the other. Credentials never reach argv, a stored URL or a log line: an HTTPS
token is answered to git's prompt by a 0700 askpass script that reads it from the environment
and only for the repository's own host; an SSH key goes to a 0600 file. Both files live in a
directory the caller chooses and are removed by `Access.cleanup()`.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets as _random
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner.gitsafety import redact_url, split_credentials, url_kind
from runner.model.source import Repository

# Answers git's "Username for 'https://host': " / "Password for 'https://user@host': " prompts
# from the environment, and only when the prompt names the expected host: a redirect or a
# submodule on another host gets nothing. It holds no secret itself.
ASKPASS = """#!/bin/sh
case "$1" in
  *"://$RUNNER_GIT_HOST'"*|*"@$RUNNER_GIT_HOST'"*) ;;
  *) exit 1 ;;
esac
case "$1" in
  Username*) printf '%s\\n' "$RUNNER_GIT_USERNAME" ;;
  *) printf '%s\\n' "$RUNNER_GIT_PASSWORD" ;;
esac
"""


def git_env(base: dict[str, str], *, allow_file: bool,
            config: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """The environment of every git process here: inherited GIT_* variables dropped (they could
    point git at another repository or config), transports restricted, no prompt, no stored
    credential; extra config through GIT_CONFIG_* (environment, not argv)."""
    env = {k: v for k, v in base.items() if not k.startswith("GIT_") and k != "SSH_ASKPASS"}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_ASKPASS"] = ""
    env["LC_ALL"] = "C"
    env["GIT_ALLOW_PROTOCOL"] = "https:http:ssh:git" + (":file" if allow_file else "")
    pairs = [("credential.helper", ""), ("gc.autoDetach", "false"), *(config or [])]
    env["GIT_CONFIG_COUNT"] = str(len(pairs))
    for i, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


@dataclass(frozen=True)
class Remote:
    """A repository URL taken apart. Build it with `remote()` from a URL that passed
    runner.gitsafety.check_repo_url."""

    url: str  # as written
    redacted: str
    kind: str  # runner.gitsafety.url_kind
    fetch_url: str  # what git is given: no credentials, local paths absolute
    host: str  # host[:port] as git's credential prompt names it ("" when not http/https)
    user: str | None  # from the URL
    password: str | None  # from the URL


def remote(url: str) -> Remote:
    kind = url_kind(url)
    stripped, user, password = split_credentials(url)
    if kind == "local":
        fetch_url = os.path.normpath(os.path.abspath(url))
    elif kind in ("http", "https"):
        fetch_url = stripped
    else:
        fetch_url = redact_url(url)
    host = ""
    if kind in ("http", "https"):
        host = re.split(r"[/?#]", fetch_url.split("://", 1)[1], maxsplit=1)[0]
    return Remote(url=url, redacted=redact_url(url), kind=kind, fetch_url=fetch_url, host=host,
                  user=user, password=password)


@dataclass
class Access:
    allow_file: bool  # the repository itself is local: its submodules may be too
    extra: dict[str, str] = field(default_factory=dict)  # askpass / ssh variables
    masked: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """For commands that reach the repository (fetch, ls-remote, submodule update)."""
        return {**git_env(dict(os.environ), allow_file=self.allow_file), **self.extra}

    @property
    def local_env(self) -> dict[str, str]:
        """For commands on the cache and the work tree only (no credentials)."""
        return git_env(dict(os.environ), allow_file=True)

    def mask(self, text: str) -> str:
        for value in self.masked:
            text = text.replace(value, "***")
        return text

    def cleanup(self) -> None:
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def repository_access(repo: Repository, where: Remote, secret: Callable[[str, str], str],
                      directory: Path, warn: Callable[[str], None]) -> Access:
    """The credentials `repo` names, ready for git: askpass variables for a token (or a password
    in the URL) over http(s), GIT_SSH_COMMAND with the key for ssh. `secret(name, field)` returns
    the value of secret `name` (`field` is "repository.token" or "repository.ssh_key", for its
    error) or raises; `directory` must be private to this process's user; `warn` gets messages
    that never hold a value. The caller calls `cleanup()` on the result when git is done."""
    access = Access(allow_file=where.kind in ("local", "file"))
    network = access.extra
    try:
        username = where.user or repo.token_user
        password = where.password
        if repo.token_secret:
            # A secret read from a file often ends with a newline; a token never does.
            password = secret(repo.token_secret, "repository.token").strip()
            if where.kind not in ("http", "https"):
                warn("repository.token is only used with http(s) URLs; "
                     f"{where.redacted} does not use it")
        if password and where.kind in ("http", "https"):
            access.masked.append(password)
            if where.kind == "http":
                warn(f"sending a token over plain http to {where.redacted}")
            script = private_file(directory, ".git-askpass", ASKPASS, 0o700)
            access.files.append(script)
            network.update(GIT_ASKPASS=str(script), RUNNER_GIT_HOST=where.host,
                           RUNNER_GIT_USERNAME=username, RUNNER_GIT_PASSWORD=password)
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if repo.ssh_key_secret:
            key = secret(repo.ssh_key_secret, "repository.ssh_key")
            access.masked.extend(line for line in key.splitlines() if len(line) >= 16)
            path = private_file(directory, ".git-ssh-key",
                                key if key.endswith("\n") else key + "\n", 0o600)
            access.files.append(path)
            ssh += ["-i", str(path), "-o", "IdentitiesOnly=yes"]
        # git runs GIT_SSH_COMMAND through a shell: every word is quoted.
        network["GIT_SSH_COMMAND"] = " ".join(shlex.quote(a) for a in ssh)
    except BaseException:
        access.cleanup()
        raise
    return access


def private_file(directory: Path, prefix: str, content: str, mode: int) -> Path:
    path = directory / f"{prefix}-{_random.token_hex(6)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    os.chmod(path, mode)  # the umask may have removed bits from the open() mode
    return path
