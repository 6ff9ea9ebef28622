"""Which host keys a server may present (see HostKeyPolicy), read from known_hosts files.

- Host keys: a pinned key, the pipeline's known_hosts file, or else the user's own
  (~/.ssh/known_hosts and the system's, as the Target lists them; see HostKeyPolicy). Every key
  listed for the host counts (all types, hashed and wildcard entries too); key exchange prefers
  the known types, and whatever key the server then presents must be one of them. An unknown
  key or a changed key (same type or another type) is refused with a message saying which,
  and naming the `runner ssh-trust` command that shows the key; no known_hosts file is ever
  written here. `insecure_ignore_host_key` accepts anything and says so.
"""
from __future__ import annotations

import fnmatch
import shlex
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from deployers.spec import Target
from deployers.ssh_errors import HostKeyError
from deployers.ssh_keys import key_fingerprint, parse_public_key


_RSA_ALGS = ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class HostKeyPolicy:
    """Which host keys are acceptable for a host. Pure apart from reading known_hosts files,
    each once.

    The first of these that applies decides: a pinned key (the target's own `host_key`, else
    `pinned`); the file `known_hosts` (ssh.known_hosts: one file for every host, which must
    exist); the target's own files (Target.known_hosts: the user's ~/.ssh/known_hosts and the
    system's, as ~/.ssh/config names them; a missing one holds no key). A key listed as
    `@revoked` is refused whatever else lists it. No key listed for the host: unknown,
    refused. Nothing here ever writes a known_hosts file."""

    def __init__(self, known_hosts: str | None = None, pinned: str | None = None,
                 insecure: bool = False):
        self.known_hosts_path = str(Path(known_hosts).expanduser()) if known_hosts else None
        self.pinned = pinned
        self.insecure = insecure
        self._files: dict[str, _KnownHosts] = {}
        self._lock = threading.Lock()
        if self.known_hosts_path:
            if not self._file(self.known_hosts_path).exists:
                raise ValueError(f"known_hosts file not found: {known_hosts}")

    def _file(self, path: str) -> _KnownHosts:
        with self._lock:
            if path not in self._files:
                self._files[path] = _KnownHosts.read(path)
            return self._files[path]

    def files(self, target_files: Sequence[str] = ()) -> list[str]:
        """The known_hosts files that count for a host with these files of its own."""
        return [self.known_hosts_path] if self.known_hosts_path else list(target_files)

    def expected(self, host: str, port: int, pinned: str | None = None,
                 files: Sequence[str] = (), alias: str | None = None) -> list[paramiko.PKey]:
        """Every key this host may present (all types)."""
        pin = pinned or self.pinned
        if pin:  # one "type base64" per line
            return [parse_public_key(line) for line in pin.splitlines() if line.strip()]
        name = alias or host_key_name(host, port)
        keys: list[paramiko.PKey] = []
        for path in self.files(files):
            for key in self._file(path).keys_for(name):
                if all(k.asbytes() != key.asbytes() for k in keys):
                    keys.append(key)
        return keys

    def expected_for(self, target: Target) -> list[paramiko.PKey]:
        return self.expected(target.host, target.port, target.host_key, target.known_hosts,
                             target.host_key_alias)

    def order_key_types(self, available: Sequence[str], expected: list[paramiko.PKey]) -> list[str]:
        """Host key algorithms to offer: those of the known keys first."""
        first: list[str] = []
        for key in expected:
            algs = _RSA_ALGS if key.get_name() == "ssh-rsa" else (key.get_name(),)
            first += [a for a in algs if a in available and a not in first]
        return first + [a for a in available if a not in first]

    def where(self, pinned: str | None = None, files: Sequence[str] = ()) -> str:
        """Where the keys of a host are looked up, for messages."""
        if pinned or self.pinned:
            return "the pinned host_key"
        paths = self.files(files)
        if not paths:
            return "no known_hosts file (none is set for it)"
        found = [p for p in paths if self._file(p).exists]
        if found:
            return f"known_hosts ({', '.join(found)})"
        return f"known_hosts ({paths[0]}, which does not exist)"

    def check(self, label: str, host: str, port: int, key: paramiko.PKey,
              pinned: str | None = None, *, files: Sequence[str] = (),
              alias: str | None = None, trust: str = "") -> None:
        """Raise HostKeyError unless `key` is one of the host's known keys. `trust`: the
        `runner ssh-trust` command that shows this host's key, for the message."""
        if self.insecure:
            return
        name = alias or host_key_name(host, port)
        pin = pinned or self.pinned
        if not pin and any(self._file(p).revoked(name, key) for p in self.files(files)):
            raise HostKeyError(label, (
                f"host key {key_fingerprint(key)} of {name} is marked @revoked in "
                f"{self.where(pinned, files)}. Refusing to connect."))
        expected = self.expected(host, port, pinned, files, alias)
        if any(k.asbytes() == key.asbytes() for k in expected):
            return
        where = self.where(pinned, files)
        if not expected:
            hint = (f" If this is the server's real key, `{trust}` shows its fingerprint and "
                    f"the line to add." if trust else "")
            raise HostKeyError(label, (
                f"unknown host key {key_fingerprint(key)}: {name} is not in {where}. Refusing "
                f"to connect; add the server's real key after checking it.{hint}"))
        known = ", ".join(key_fingerprint(k) for k in expected)
        hint = f" (`{trust}` shows the key it presents now)" if trust else ""
        raise HostKeyError(label, (
            f"HOST KEY CHANGED: the server presented {key_fingerprint(key)} but {where} has "
            f"{known}. Refusing to connect: the server was reinstalled or someone is "
            f"intercepting the connection. Check, then update the key{hint}."))

    def check_target(self, target: Target, key: paramiko.PKey) -> None:
        self.check(target.label, target.host, target.port, key, target.host_key,
                   files=target.known_hosts, alias=target.host_key_alias,
                   trust=self.trust_command(target))

    def trust_command(self, target: Target) -> str:
        """The `runner ssh-trust` command line that shows this host's key."""
        name = target.name or target.host
        words = ["runner", "ssh-trust", name if target.port == 22 else f"{name}:{target.port}"]
        if target.jump_written:
            words += ["--jump", target.jump_written]
        if self.known_hosts_path:
            words += ["--known-hosts", self.known_hosts_path]
        return shlex.join(words)


@dataclass(frozen=True)
class _KnownHosts:
    """One known_hosts file as read: its entries and its @revoked entries."""

    path: str
    exists: bool
    entries: tuple[paramiko.hostkeys.HostKeyEntry, ...] = ()
    revoked_entries: tuple[paramiko.hostkeys.HostKeyEntry, ...] = ()

    @classmethod
    def read(cls, path: str) -> _KnownHosts:
        try:
            text = Path(path).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return cls(path, False)
        except OSError:
            return cls(path, False)  # unreadable: holds no key the runner may rely on
        entries, revoked = [], []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            into = entries
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                if marker != "@revoked":
                    continue  # @cert-authority: host certificates are not supported
                into = revoked
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            except Exception:  # a key type paramiko cannot read (it raises several types)
                continue
            if entry is not None and entry.key is not None:
                into.append(entry)
        return cls(path, True, tuple(entries), tuple(revoked))

    def keys_for(self, name: str) -> list[paramiko.PKey]:
        return [e.key for e in self.entries if _entry_matches(name, e.hostnames)]

    def revoked(self, name: str, key: paramiko.PKey) -> bool:
        return any(e.key.asbytes() == key.asbytes() and _entry_matches(name, e.hostnames)
                   for e in self.revoked_entries)


def _entry_matches(name: str, patterns: Sequence[str]) -> bool:
    """A known_hosts host field: names, hashed names, wildcards, `!negations`."""
    hit = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _matches(name, pattern[1:] if negated else pattern):
            if negated:
                return False
            hit = True
    return hit


def _matches(name: str, pattern: str) -> bool:
    """One pattern: plain name, hashed |1|salt|hash, or a wildcard (* ?). OpenSSH compares
    host names in lower case."""
    name = name.lower()
    if pattern.startswith("|1|"):
        return paramiko.HostKeys.hash_host(name, pattern) == pattern
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(name, pattern.lower())
    return pattern.lower() == name


def known_hosts_line(target: Target, key: paramiko.PKey) -> str:
    """The known_hosts line listing `key` for this host, as HostKeyPolicy looks it up."""
    name = target.host_key_alias or host_key_name(target.host, target.port)
    return f"{name} {key.get_name()} {key.get_base64()}"
