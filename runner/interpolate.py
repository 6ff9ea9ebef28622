"""`${VAR}` interpolation of the strings of a pipeline. Pure: the caller passes every source.

Syntax (as in docker compose, braces required):
  ${VAR}            the value of VAR; an error when VAR is undefined
  ${VAR:-default}   default when VAR is undefined or empty (`${VAR-default}`: undefined only)
  ${VAR:?message}   an error saying `message` when VAR is undefined or empty (`?`: undefined only)
  $$                a literal `$`
A `$` followed by anything else is kept as it is. Defaults and messages may themselves contain
`${...}`.

Where a name is looked up, highest first (see `Resolver`): `--var K=V` values, the process
environment, then the pipeline's own `variables:` section, whose values are interpolated the
same way (they may refer to the environment and to each other).

Secrets never pass through here: an environment variable that backs a pipeline secret cannot be
interpolated (its value would end up in the model, in plans and in logs); the pipeline refers to
the secret by name instead.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Lookup = Callable[[str], "str | None"]


class InterpolationError(ValueError):
    """A problem with one string; the message is written for the user."""


class UndefinedVariable(InterpolationError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(
            f"undefined variable '{name}' (set it in the environment, with --var {name}=..., "
            f"or under variables:)")


class BrokenVariable(InterpolationError):
    """A reference to a `variables:` entry whose own definition failed (reported there)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"variable '{name}' is itself invalid")


def interpolate(text: str, lookup: Lookup) -> str:
    """Replace every `${...}` and `$$` of `text`. `lookup(name)` returns None when undefined.

    Raises InterpolationError (or UndefinedVariable) for the first problem found."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        nxt = text[j + 1:j + 2]
        if nxt == "$":
            out.append("$")
            i = j + 2
        elif nxt != "{":
            out.append("$")
            i = j + 1
        else:
            value, i = _braced(text, j, lookup)
            out.append(value)
    return "".join(out)


def _closing(text: str, start: int) -> int:
    """Index of the `}` closing a `${` whose body starts at `start`, honouring nesting and `$$`."""
    depth = 0
    k = start
    while k < len(text):
        c = text[k]
        if c == "$" and text[k + 1:k + 2] == "$":
            k += 2
            continue
        if c == "$" and text[k + 1:k + 2] == "{":
            depth += 1
            k += 2
            continue
        if c == "}":
            if depth == 0:
                return k
            depth -= 1
        k += 1
    return -1


def _braced(text: str, j: int, lookup: Lookup) -> tuple[str, int]:
    """Evaluate the `${...}` starting at text[j] ('$'); return (value, index after it)."""
    end = _closing(text, j + 2)
    if end < 0:
        raise InterpolationError(f"unterminated '${{' at offset {j} (missing '}}'): {text!r}")
    m = NAME_RE.match(text, j + 2)
    if m is None:
        body = text[j:end + 1]
        raise InterpolationError(
            f"malformed {body!r}: expected a variable name such as ${{NAME}} (write $$ for a "
            f"literal '$')")
    name = m.group(0)
    k = m.end()
    if k == end:
        value = lookup(name)
        if value is None:
            raise UndefinedVariable(name)
        return value, end + 1
    for op in (":-", ":?", "-", "?"):
        if text.startswith(op, k):
            arg = text[k + len(op):end]
            break
    else:
        raise InterpolationError(
            f"malformed {text[j:end + 1]!r}: expected ${{{name}}}, ${{{name}:-default}} or "
            f"${{{name}:?message}}")
    value = lookup(name)
    missing = value is None or (op.startswith(":") and value == "")
    if not missing:
        assert value is not None
        return value, end + 1
    if op.endswith("-"):
        return interpolate(arg, lookup), end + 1
    message = interpolate(arg, lookup).strip() or "it is required"
    raise InterpolationError(f"variable '{name}' is not set: {message}")


class Resolver:
    """Looks names up in `--var` overrides, then `environ`, then the pipeline's `variables:`.

    `protected` maps environment variable names that back pipeline secrets to the secret's name:
    looking one up is an error, so that no secret value is ever copied into the model."""

    def __init__(
        self,
        *,
        overrides: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
        variables: Mapping[str, str] | None = None,
        protected: Mapping[str, str] | None = None,
    ):
        self.overrides = dict(overrides or {})
        self.environ = environ if environ is not None else {}
        self.variables = dict(variables or {})
        self.protected = dict(protected or {})
        self._done: dict[str, str] = {}
        self._errors: dict[str, InterpolationError] = {}
        self._stack: list[str] = []

    def lookup(self, name: str) -> str | None:
        if name in self.protected:
            raise InterpolationError(
                f"'${{{name}}}' would copy the value of secret '{self.protected[name]}' into the "
                f"pipeline; refer to the secret by its name instead (secrets are never "
                f"interpolated)")
        if name in self.overrides:
            return self.overrides[name]
        if name in self.environ:
            return self.environ[name]
        if name in self.variables:
            if self._stack and self._stack[-1] == name:
                return None  # `X: ${X:-default}`: X is not defined anywhere else
            return self._pipeline_variable(name)
        return None

    def _pipeline_variable(self, name: str) -> str:
        if name in self._done:
            return self._done[name]
        if name in self._errors:
            raise BrokenVariable(name)
        if name in self._stack:
            cycle = " -> ".join(self._stack[self._stack.index(name):] + [name])
            raise InterpolationError(f"variables refer to each other in a cycle: {cycle}")
        self._stack.append(name)
        try:
            value = interpolate(self.variables[name], self.lookup)
        except BrokenVariable:
            self._errors[name] = BrokenVariable(name)
            raise
        except InterpolationError as exc:
            self._errors[name] = exc
            raise BrokenVariable(name) from exc
        finally:
            self._stack.pop()
        self._done[name] = value
        return value

    def effective_variables(self) -> tuple[dict[str, str], dict[str, InterpolationError]]:
        """The value each `variables:` entry ends up with (an override or the environment wins
        over the pipeline's own value), and the errors of the definitions that failed (keyed by
        name; a failure caused only by another broken variable is left out)."""
        values: dict[str, str] = {}
        for name in self.variables:
            try:
                value = self.lookup(name)
            except InterpolationError:
                continue
            if value is not None:
                values[name] = value
        errors = {k: e for k, e in self._errors.items() if not isinstance(e, BrokenVariable)}
        return values, errors

    def interpolate(self, text: str) -> str:
        return interpolate(text, self.lookup)
