"""Secrets as a type, the masker every output stream passes through, and the run's secret store.

A pipeline refers to secrets by name only (`secrets:` says where each value comes from: an
environment variable, a file, or a command's output, runner.secret_command). The values are
read once per run, before any side effect (`SecretStore.from_pipeline`), registered with a
`Masker`, and handed to stages through `Secrets.value(name)`.

A run may get no secret values at all (`runner exec --withhold-secrets`, for a pull request from a
fork): `SecretStore.withheld` knows the names only, reads no environment variable and no file
and runs no command (but a daemon entry's repository credentials, which only git gets), and
`value(name)` raises `SecretWithheld`, which fails the stage that asked.
"""
from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from urllib.parse import quote, quote_plus

from runner.errors import InvalidInput, Problem, SecretWithheld
from runner.model import Pipeline
from runner.secret_command import SecretCommandFailed, run_secret_command

log = logging.getLogger(__name__)

MASK = "***"
MIN_MASK_LENGTH = 4  # shorter values would mask ordinary words in every log line


class Secret:
    """A secret value that does not show itself: str() and repr() are '***'."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        """The value itself. Call it at the last moment, where the value is used."""
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            other._value.encode(), self._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self):  # pickling would write the value out
        raise TypeError("a Secret cannot be pickled")


def _forms(value: str) -> set[str]:
    """The value as it may show up in output: itself, each of its lines, URL-quoted, base64."""
    forms = {value, json.dumps(value)[1:-1]}  # as it shows in JSON output ("\n", "\"")
    if "\n" in value or "\r" in value:
        forms.update(line.strip() for line in re.split(r"\r?\n|\r", value))
    raw = value.encode()
    b64 = base64.b64encode(raw).decode()
    forms.update({
        quote(value, safe=""), quote_plus(value), quote(value),
        b64, b64.rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("="),
    })
    return forms


class Masker:
    """Replaces every registered secret value in text by '***'. Thread-safe.

    `on_warning(message)` is called (never with the value) for values too short to mask; by
    default the message goes to the `runner.secrets` logger."""

    def __init__(self, on_warning: Callable[[str], None] | None = None):
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.on_warning = on_warning

    def add(self, value: str | Secret, name: str | None = None) -> None:
        """Register a value (and its per-line, URL-quoted and base64 forms)."""
        if isinstance(value, Secret):
            value = value.reveal()
        if not value:
            return
        label = f"secret '{name}'" if name else "a secret value"
        if len(value) < MIN_MASK_LENGTH:
            message = (f"{label} is shorter than {MIN_MASK_LENGTH} characters and is not "
                       f"masked in logs")
            if self.on_warning is not None:
                self.on_warning(message)
            else:
                log.warning(message)
            return
        forms = {f for f in _forms(value) if len(f) >= MIN_MASK_LENGTH}
        with self._lock:
            if forms <= self._values:
                return
            self._values |= forms
            ordered = sorted(self._values, key=lambda v: (-len(v), v))  # longest first
            self._pattern = re.compile("|".join(map(re.escape, ordered)))

    def mask(self, text: str) -> str:
        """`text` with every occurrence of a registered value replaced by '***'."""
        pattern = self._pattern  # one read: add() swaps the compiled pattern atomically
        if pattern is None or not text:
            return text
        return pattern.sub(MASK, text)

    def mask_all(self, value):
        """A JSON-like value (an event, a stage's outputs) with every string in it masked."""
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {k: self.mask_all(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mask_all(v) for v in value]
        return value

    def __len__(self) -> int:
        return len(self._values)


_GLOBAL: Masker | None = None
_GLOBAL_LOCK = threading.Lock()


def global_masker() -> Masker:
    """The process-wide masker (created on first use)."""
    global _GLOBAL
    with _GLOBAL_LOCK:
        if _GLOBAL is None:
            _GLOBAL = Masker()
        return _GLOBAL


def _problem(pipeline: Pipeline, name: str, message: str) -> Problem:
    from runner.loader import problem_at  # the loader sits above the model, as we do

    return problem_at(pipeline, ("secrets", name), message, key=True)


def read_secret_file(path: str) -> str:
    """A secret file's content, trailing newlines removed (`echo token > file` works).
    Raises OSError / UnicodeDecodeError."""
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\r\n")


class SecretStore:
    """The secret values of one run, by name. Implements runner.stage.Secrets."""

    def __init__(self, values: Mapping[str, str | Secret] | None = None,
                 masker: Masker | None = None, withheld: tuple[str, ...] = ()):
        self._secrets: dict[str, Secret] = {
            k: v if isinstance(v, Secret) else Secret(v) for k, v in (values or {}).items()}
        self._withheld = tuple(n for n in withheld if n not in self._secrets)
        self.masker = masker if masker is not None else global_masker()
        for name, secret in self._secrets.items():
            self.masker.add(secret, name)

    @classmethod
    def withheld(cls, pipeline: Pipeline, masker: Masker | None = None,
                 environ: Mapping[str, str] | None = None, keep: tuple[str, ...] = ()) -> SecretStore:
        """A store that knows the pipeline's secret names and holds none of their values: it
        reads no `env:` variable and no `file:` and runs no `command:`. Asking for a value
        raises SecretWithheld. `keep`: the names read all the same (a daemon entry's repository credentials, which
        only git gets)."""
        values: dict[str, Secret] = {}
        if keep:
            kept = pipeline.model_copy(update={"secrets": {n: pipeline.secrets[n] for n in keep}})
            values = cls.from_pipeline(kept, environ, masker)._secrets
        return cls(values, masker, withheld=tuple(pipeline.secrets))

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline, environ: Mapping[str, str] | None = None,
                      masker: Masker | None = None) -> SecretStore:
        """Read every `secrets:` entry of the pipeline (from `env:`, `file:` or by running its
        `command:`, each once), register each value with `masker` (default: the global one).
        Raises InvalidInput naming every secret that cannot be read."""
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        problems: list[Problem] = []
        for name, src in pipeline.secrets.items():
            if sum(x is not None for x in (src.env, src.file, src.command)) != 1:
                problems.append(_problem(pipeline, name, f"secret '{name}' needs exactly one of "
                                         "'env:', 'file:' or 'command:'"))
            elif src.command is not None:
                try:
                    values[name] = run_secret_command(src.command, src.timeout, environ)
                except SecretCommandFailed as exc:
                    problems.append(_problem(pipeline, name, f"secret '{name}': {exc}"))
            elif src.env is not None:
                value = environ.get(src.env)
                if value is None:
                    problems.append(_problem(pipeline, name, f"secret '{name}': environment "
                                             f"variable {src.env} is not set"))
                elif value == "":
                    problems.append(_problem(pipeline, name, f"secret '{name}': environment "
                                             f"variable {src.env} is empty"))
                else:
                    values[name] = value
            else:
                assert src.file is not None
                try:
                    value = read_secret_file(src.file)
                except OSError as exc:
                    problems.append(_problem(pipeline, name, f"secret '{name}': cannot read "
                                             f"{src.file}: {exc.strerror or exc}"))
                    continue
                except UnicodeDecodeError:
                    problems.append(_problem(pipeline, name, f"secret '{name}': {src.file} is "
                                             "not UTF-8 text"))
                    continue
                if not value:
                    problems.append(_problem(pipeline, name, f"secret '{name}': {src.file} is "
                                             "empty"))
                else:
                    values[name] = value
        if problems:
            where = pipeline.source_file or "pipeline"
            raise InvalidInput(f"{where}: secrets cannot be read", problems)
        return cls(values, masker)

    def value(self, name: str) -> str:
        """The value of secret `name`. KeyError (a runner bug: the loader checks references)
        when the pipeline has no such secret; SecretWithheld when the run does not get it."""
        return self.secret(name).reveal()

    def secret(self, name: str) -> Secret:
        if name in self._withheld:
            raise SecretWithheld(name)
        try:
            return self._secrets[name]
        except KeyError:
            raise KeyError(f"no secret named {name!r} in this pipeline") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._secrets) + self._withheld

    def is_withheld(self, name: str) -> bool:
        return name in self._withheld

    def __contains__(self, name: object) -> bool:
        return name in self._secrets or name in self._withheld

    def __repr__(self) -> str:
        extra = f", withheld={list(self._withheld)}" if self._withheld else ""
        return f"SecretStore(names={list(self._secrets)}{extra})"


class DeferredSecretStore:
    """The secrets of a command that must not be stopped by one it never uses (`runner app
    logs` uses the SSH key, not the app's database password). Every secret is read at once, as
    SecretStore.from_pipeline reads it, and registered with the masker (what the servers print
    is masked as in a run); one that cannot be read is an InvalidInput naming it at its line,
    raised only when a command asks for it."""

    def __init__(self, pipeline: Pipeline, environ: Mapping[str, str], masker: Masker):
        self.masker = masker
        self._names = tuple(pipeline.secrets)
        self._read: dict[str, Secret] = {}
        self._unreadable: dict[str, InvalidInput] = {}
        for name, source in pipeline.secrets.items():
            one = pipeline.model_copy(update={"secrets": {name: source}})
            try:
                self._read[name] = SecretStore.from_pipeline(one, environ, masker).secret(name)
            except InvalidInput as exc:
                self._unreadable[name] = exc

    def value(self, name: str) -> str:
        return self.secret(name).reveal()

    def secret(self, name: str) -> Secret:
        if name in self._unreadable:
            raise self._unreadable[name]
        try:
            return self._read[name]
        except KeyError:
            raise KeyError(f"no secret named {name!r} in this pipeline") from None

    def names(self) -> tuple[str, ...]:
        return self._names

    def is_withheld(self, name: str) -> bool:
        return False

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __repr__(self) -> str:
        return (f"DeferredSecretStore(names={list(self._names)}, "
                f"unreadable={list(self._unreadable)})")
