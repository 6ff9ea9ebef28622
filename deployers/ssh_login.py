"""Logging in to a server with a key.

- Keys, in this order until the server takes one: the pipeline's (SSHOptions.key), the
  ssh-agent's (Target.agent; with IdentitiesOnly only those of an identity file), then the
  Target's identity files (IdentityFile, or the default ~/.ssh/id_*). A refusal lists what was
  tried, by origin and fingerprint, and why any other key could not be offered.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from deployers.spec import Target
from deployers.ssh_errors import AuthError
from deployers.ssh_keys import key_fingerprint, parse_public_key
from deployers.ssh_options import SSHOptions


class _Agent(paramiko.agent.AgentSSH):
    """The keys of the ssh-agent at `path` (paramiko's own Agent reads only $SSH_AUTH_SOCK,
    and waits on a stalled agent forever): one connection per SSH login, closed after it, as
    the agent protocol allows one request at a time."""

    def __init__(self, path: str, timeout: float):
        super().__init__()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            self._connect(sock)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._close()


@dataclass
class _Offer:
    what: str  # how messages name it: where it came from and its fingerprint
    key: paramiko.PKey


def _identity(path: str, default: bool) -> tuple[_Offer | None, bytes | None, str | None]:
    """A key file: (what to offer, its public blob, a note on why it cannot be used)."""
    where = path if not default else f"{path} (default)"
    pub = None
    try:
        pub = parse_public_key(Path(path + ".pub").read_text().strip()).asbytes()
    except (OSError, ValueError):
        pass
    try:
        key = paramiko.PKey.from_path(path)
    except FileNotFoundError:
        return None, pub, None if default else f"IdentityFile {path}: not found"
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        # paramiko passes on cryptography's TypeError for an encrypted OpenSSH-format key
        if isinstance(exc, TypeError) and "password" not in str(exc).lower():
            return None, pub, f"{where}: cannot be read ({exc})"
        return None, pub, (f"{where}: encrypted, and the runner asks for no passphrase "
                           f"(add it to ssh-agent)")
    except (paramiko.SSHException, ValueError, OSError) as exc:
        return None, pub, f"{where}: cannot be read ({exc})"
    return _Offer(f"{where} ({key_fingerprint(key)})", key), key.asbytes(), None


def _offers(target: Target, opts: SSHOptions, agent: _Agent | None
            ) -> tuple[list[_Offer], list[str]]:
    """The keys to offer, in order, and notes on what could not be offered. Order: the
    pipeline's key; the agent's keys (with IdentitiesOnly, only those of an identity file);
    the identity files (IdentityFile, or the default ~/.ssh/id_* files)."""
    offers: list[_Offer] = []
    notes: list[str] = []
    if opts.key is not None:
        offers.append(_Offer(f"{opts.key_label} ({key_fingerprint(opts.key)})", opts.key))
    files = [(p, *_identity(p, target.identity_default)) for p in target.identity_files]
    if agent is not None:
        allowed = {pub for _, _, pub, _ in files if pub}
        keys = list(agent.get_keys())
        picked = [k for k in keys if not target.identities_only or k.asbytes() in allowed]
        if not keys:
            notes.append(f"the ssh-agent ({target.agent}) holds no key")
        elif not picked:
            notes.append(f"IdentitiesOnly: none of the ssh-agent's {len(keys)} keys is an "
                         f"IdentityFile's")
        for k in picked:
            comment = f" {k.comment}" if getattr(k, "comment", "") else ""
            offers.append(_Offer(f"ssh-agent key {key_fingerprint(k)}{comment}", k))
    found = False
    for path, offer, _pub, note in files:
        if offer is not None:
            offers.append(offer)
            found = True
        elif note:
            notes.append(note)
    if target.identity_files and target.identity_default and not found and not any(
            Path(p).exists() for p in target.identity_files):
        notes.append(f"no default key file ({', '.join(target.identity_files)})")
    return offers, notes


def authenticate(t: paramiko.Transport, target: Target, opts: SSHOptions,
                 log: Callable[[str], None] | None) -> str:
    """Offer the keys in order until the server takes one; return what it took. Raises
    AuthError naming every key tried (by origin and fingerprint, never its content)."""
    notes: list[str] = []
    agent = None
    if target.agent:
        try:
            agent = _Agent(target.agent, opts.connect_timeout)
        except OSError as exc:  # no socket there, or no agent behind it (it died)
            notes.append(f"ssh-agent at {target.agent}: cannot use it: the agent cannot be "
                         f"reached ({exc.strerror or exc}; is it still running?)")
        except paramiko.SSHException as exc:
            notes.append(f"ssh-agent at {target.agent}: cannot use it ({exc})")
    else:
        notes.append("no ssh-agent (SSH_AUTH_SOCK is not set, or IdentityAgent none)")
    try:
        offers, more = _offers(target, opts, agent)
        notes += more
        tried: list[str] = []
        seen: set[bytes] = set()
        for offer in offers:
            blob = offer.key.asbytes()
            if blob in seen:
                continue
            seen.add(blob)
            try:
                rest = t.auth_publickey(target.user, offer.key)
            except paramiko.BadAuthenticationType as exc:
                raise AuthError(target.label, (
                    f"the server takes no SSH key for user {target.user!r} (it allows: "
                    f"{', '.join(exc.allowed_types) or 'nothing'})")) from None
            except paramiko.AuthenticationException:
                tried.append(offer.what)
                continue
            except (paramiko.SSHException, EOFError, OSError) as exc:
                tried.append(f"{offer.what} (failed: {exc or type(exc).__name__})")
                if not t.is_active():
                    notes.append(f"the server closed the connection after {len(tried)} "
                                 f"refused keys (its MaxAuthTries)")
                    break
                continue
            if rest:
                raise AuthError(target.label, (
                    f"the server took {offer.what} for user {target.user!r} but wants more "
                    f"({', '.join(rest)}), which the runner does not do")) from None
            if tried and opts.key is not None and log:
                log(f"{target.label}: the server refused {opts.key_label}; signed in with "
                    f"{offer.what}")
            return offer.what
    finally:
        if agent is not None:
            agent.close()
    if not seen:
        head = f"no SSH key to offer for user {target.user!r}"
        if opts.key is None:
            head += " (no ssh.key_file or ssh.key)"
        raise AuthError(target.label, "; ".join([head, *notes]))
    raise AuthError(target.label, "; ".join([
        f"the server refused the SSH key for user {target.user!r}: tried "
        f"{', '.join(tried)}", *notes]))
