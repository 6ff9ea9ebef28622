"""A server's release history, and choosing the release a rollback returns to. Pure.

The history (kept on each server, newest last) lists only verified releases: an entry is
written when a deploy committed it, after its health gate passed. Each entry is a
`Release.record` (digest, ref, commit, run id, the whole container spec, secret fingerprint).

Positions count back from the newest verified release: 0 is the newest, 1 the one before, ...
"""
from __future__ import annotations

import hashlib
import json
import re

from deployers.spec import record_identity

_POSITION = re.compile(r"^\d{1,3}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{4,64})$")
_HEX = re.compile(r"^[0-9a-f]{4,64}$")


class NoSuchRelease(ValueError):
    """`--to` names nothing this server's history holds (or names more than one)."""


def describe(entry: dict) -> str:
    commit = str(entry.get("commit") or "")[:12] or "no commit"
    return f"{str(entry.get('digest', ''))[:19]} ({commit}, run {entry.get('run_id', '?')})"


def _env(entry: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(plain env: name -> value, secret env: name -> the secret's name) of an entry."""
    spec = entry.get("spec") if isinstance(entry.get("spec"), dict) else {}

    def pairs(key: str) -> dict[str, str]:
        return {str(kv[0]): str(kv[1]) for kv in spec.get(key) or ()
                if isinstance(kv, (list, tuple)) and len(kv) == 2}
    return pairs("env"), pairs("secret_env")


def env_fingerprint(entry: dict) -> str:
    """A short hash of a release's plain env (names and values) and of its secret env's names
    (each variable and the secret it comes from; never a value): releases that differ only in
    env differ here. The same on every server for the same settings."""
    plain, secret = _env(entry)
    data = json.dumps([sorted(plain.items()), sorted(secret.items())]).encode()
    return hashlib.sha256(data).hexdigest()[:8]


def env_changes(older: dict, newer: dict) -> list[str]:
    """What changed in the env from `older` to `newer` (entries of one server's history), by
    name only: `+NAME` added, `-NAME` removed, `NAME` another value (or another secret), and
    `secret values` when only the values of its secrets changed (their keyed fingerprint)."""
    (p0, s0), (p1, s1) = _env(older), _env(newer)
    before, after = {**p0, **s0}, {**p1, **s1}
    out = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            out.append(f"+{name}")
        elif name not in after:
            out.append(f"-{name}")
        elif before[name] != after[name] or (name in s0) != (name in s1):
            out.append(name)
    if s0 and s0 == s1 and older.get("secrets") != newer.get("secrets"):
        out.append("secret values")
    return out


def listing(history: list[dict]) -> str:
    return "; ".join(f"{pos}: {describe(e)}" for pos, e in enumerate(reversed(history)))


def choose(history: list[dict], current: tuple[str, str, str] | None,
           to: str | None = None) -> dict:
    """The history entry a rollback returns to.

    to=None: the newest verified release other than what runs now (so a server left on an
    unverified release goes back to its last verified one, and a server on its newest verified
    release goes one further back). Otherwise `to` is a position (0-999), a digest
    (`sha256:` + 4 to 64 hex), or a git commit (4 to 40 hex, or 64); one entry must match.
    Raises NoSuchRelease with what the history holds."""
    if not history:
        raise NoSuchRelease("no verified release is recorded on this server")
    newest_first = list(reversed(history))
    if to is None:
        older = [e for e in newest_first if record_identity(e) != current]
        if not older:
            raise NoSuchRelease("no previous version is recorded on this server "
                                f"(history: {listing(history)})")
        return older[0]
    to = to.strip()
    if _POSITION.match(to):
        pos = int(to)
        if pos >= len(newest_first):
            raise NoSuchRelease(f"position {pos} is beyond the {len(history)} recorded "
                                f"release(s) ({listing(history)})")
        return newest_first[pos]
    m = _DIGEST.match(to)
    if m:
        matches = [e for e in newest_first if str(e.get("digest", "")).startswith(to)]
        kind = "digest"
    elif _HEX.match(to.lower()):
        h = to.lower()
        matches = [e for e in newest_first if str(e.get("commit") or "").lower().startswith(h)]
        kind = "commit"
    else:
        raise NoSuchRelease(f"{to!r} is not a position (0, 1, ...), a digest (sha256:...) or a "
                            f"git commit (hex)")
    if not matches:
        raise NoSuchRelease(f"no recorded release has {kind} {to} ({listing(history)})")
    if len({str(e.get(kind)) for e in matches}) > 1:
        raise NoSuchRelease(f"{kind} {to} is ambiguous: "
                            f"{', '.join(describe(e) for e in matches)}")
    return matches[0]
