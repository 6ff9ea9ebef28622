"""SSH to a server with paramiko: strict host keys, bounded connects, one connection reused.

- Host keys: a pinned key, the pipeline's known_hosts file, or else the user's own
  (~/.ssh/known_hosts and the system's, as the Target lists them; see HostKeyPolicy). Every key
  listed for the host counts (all types, hashed and wildcard entries too); key exchange prefers
  the known types, and whatever key the server then presents must be one of them. An unknown
  key or a changed key (same type or another type) is refused with a message saying which,
  and naming the `runner ssh-trust` command that shows the key; no known_hosts file is ever
  written here. `insecure_ignore_host_key` accepts anything and says so.
- Keys, in this order until the server takes one: the pipeline's (SSHOptions.key), the
  ssh-agent's (Target.agent; with IdentitiesOnly only those of an identity file), then the
  Target's identity files (IdentityFile, or the default ~/.ssh/id_*). A refusal lists what was
  tried, by origin and fingerprint, and why any other key could not be offered.
- Route: the Target's jump hosts (Target.route, outermost first; each checked and logged into
  like a server), then the target through a direct-tcpip channel of the last one. An error of
  a jump host is raised as the server's, saying through which jump host.
- Connect: a timeout per attempt (TCP, banner, key exchange, auth) and a bounded number of
  retries with backoff, only for network failures: a refused key or host key is final.
- One SSH connection per server for the whole deploy; each command is a new channel on it.
- Commands are argv lists. SSH exec carries one string, so the words are quoted here with
  shlex.join, the only place in the project where a remote command line is made.
- stdout and stderr are read while the command runs (waiting for the exit status first
  deadlocks paramiko once the output fills the channel window).
- Nothing waits on the server without a bound: channel opens and channel requests (exec, the
  sftp subsystem) take connect_timeout at most, each SFTP read or write io_timeout, a command
  command_timeout. paramiko itself waits for the reply to a channel request forever, so a timer
  closes the channel when the reply is late (see Connection._channel_request). A stalled server
  raises RemoteTimeout (CommandTimeout for commands) naming it.
"""
from __future__ import annotations

import fnmatch
import io
import logging
import select
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from runner.errors import Cancelled

from deployers.spec import Target

_RSA_ALGS = ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")

# paramiko logs expected events (a refused health-probe connection while the app starts) as
# errors; without a handler Python would print them on stderr. Failures reach the user through
# the exceptions and the deploy report instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class TransportError(Exception):
    """Talking to a server failed. `server` names it; the message says why and what to do."""

    def __init__(self, server: str, message: str):
        self.server = server
        self.reason = message
        super().__init__(f"{server}: {message}")


class HostKeyError(TransportError):
    pass


class ConnectError(TransportError):
    pass


class AuthError(TransportError):
    pass


class RemoteTimeout(TransportError):
    """The server did not answer in time (it may be stalled, or the network path is)."""


class CommandTimeout(RemoteTimeout):
    pass


def remote_command(argv: Sequence[str]) -> str:
    """The single place where argv becomes a remote command line."""
    return shlex.join([str(a) for a in argv])


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def load_private_key(path: str | None = None, text: str | None = None,
                     passphrase: str | None = None) -> paramiko.PKey:
    """A private key from a file or from a secret's text (OpenSSH or PEM; ed25519, ecdsa, rsa)."""
    if path:
        try:
            return paramiko.PKey.from_path(Path(path).expanduser(), passphrase)
        except FileNotFoundError:
            raise ValueError(f"ssh key file not found: {path}") from None
        except (paramiko.SSHException, ValueError, TypeError) as exc:
            # TypeError: cryptography's word for an encrypted key without its passphrase
            raise ValueError(f"cannot read ssh key file {path}: {exc}") from None
    if text:
        errors = []
        for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return cls.from_private_key(io.StringIO(text.strip() + "\n"),
                                            password=passphrase)
            except (paramiko.SSHException, ValueError, TypeError) as exc:
                errors.append(f"{cls.__name__}: {exc}")
        raise ValueError("the ssh key secret is not a private key this runner can read")
    raise ValueError("no ssh key: set ssh.key_file or ssh.key (a secret name)")


def parse_public_key(line: str) -> paramiko.PKey:
    """'ssh-ed25519 AAAA... [comment]' -> key."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError(f"not a public key line: {line!r}")
    import base64
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as exc:  # paramiko raises several types here
        raise ValueError(f"not a public key ({parts[0]}): {exc}") from None


def key_fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


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


@dataclass(frozen=True)
class SSHOptions:
    # The pipeline's own key (ssh.key_file / ssh.key), offered before any other; None: only
    # the user's keys (agent, IdentityFile, ~/.ssh/id_*) that each Target names.
    key: paramiko.PKey | None = None
    host_keys: HostKeyPolicy = field(default_factory=HostKeyPolicy)
    connect_timeout: float = 10
    command_timeout: float = 600
    retries: int = 2
    jump: Target | None = None  # for a target without its own Target.jump
    key_label: str = "ssh.key_file"  # how messages name `key`
    keepalive: int = 15
    reuse_shell: bool = True  # run commands through a kept remote `sh` (see _Shell)
    # Seconds a single SFTP operation (each read or write of its channel) or a wait for the
    # SFTP session may take; also bounds writing a command's input.
    io_timeout: float = 30


@dataclass(frozen=True)
class RemoteResult:
    argv: tuple[str, ...]
    status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def output(self) -> str:
        return (self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr).strip()


class CommandFailed(TransportError):
    def __init__(self, server: str, result: RemoteResult):
        self.result = result
        tail = "\n".join(result.output.splitlines()[-15:])
        super().__init__(server, f"`{' '.join(result.argv[:3])} ...` exited with "
                                 f"{result.status}: {tail}")


@dataclass
class Connection:
    """One SSH connection to one server. Thread-safe: commands may run from several threads."""

    target: Target
    transport: paramiko.Transport
    options: SSHOptions
    jump: Connection | None = None
    auth: str = ""  # which key the server took, as `_authenticate` names it (no key material)
    _sftp: paramiko.SFTPClient | None = field(default=None, repr=False)
    _sftp_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _shells: list = field(default_factory=list, repr=False)
    _shells_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def alive(self) -> bool:
        return self.transport.is_active()

    def _lost(self, message: str) -> TransportError:
        """The connection failed: through jump hosts, say which hop's connection broke (a dead
        jump host shows on the server's connection only as a closed socket)."""
        hops: list[Connection] = []
        hop = self.jump
        while hop is not None:
            hops.insert(0, hop)  # outermost first
            hop = hop.jump
        if not hops:
            return TransportError(self.label, message)
        # The jump host's transport sees its end a moment after the channel carrying this
        # connection closed: give it that moment when this connection is gone.
        deadline = time.monotonic() + (0 if self.transport.is_active() else 1.0)
        while True:
            dead = next((h for h in hops if not h.transport.is_active()), None)
            if dead is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if dead is not None:
            return TransportError(self.label, (
                f"the route through {_hop_name(dead.target)} broke (the SSH connection to "
                f"that jump host is gone): {message}"))
        return TransportError(self.label, f"{message} (through {_hop_name(hops[-1].target)})")

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            timeout: float | None = None, cancel: threading.Event | None = None,
            check: bool = False) -> RemoteResult:
        """Run argv on the server; return its exit status and output.
        Raises CommandTimeout, TransportError (connection lost), Cancelled; with check=True
        also CommandFailed for a non-zero exit.

        Commands without stdin go through a reused remote `sh` (see _Shell): a new SSH session
        costs the server a login (shell startup files, environment) of 50-300 ms each time."""
        argv = tuple(str(a) for a in argv)
        timeout = timeout or self.options.command_timeout
        start = time.monotonic()
        if stdin is None and self.options.reuse_shell:
            status, out, err = self._run_in_shell(argv, timeout, cancel)
        else:
            status, out, err = self._run_exec(argv, stdin, timeout, cancel)
        result = RemoteResult(argv, status, out.decode("utf-8", "replace"),
                              err.decode("utf-8", "replace"), time.monotonic() - start)
        if check and not result.ok:
            raise CommandFailed(self.label, result)
        return result

    def _wait_io(self, chan: paramiko.Channel, argv: tuple[str, ...], start: float,
                 timeout: float, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled while running {argv[0]} on {self.label}")
        if time.monotonic() - start > timeout:
            raise CommandTimeout(self.label, f"`{' '.join(argv[:3])}` did not finish "
                                             f"within {timeout:g}s")
        if not self.transport.is_active():
            raise self._lost("the SSH connection dropped")
        select.select([chan], [], [], 0.05)

    def _run_exec(self, argv: tuple[str, ...], stdin: bytes | None, timeout: float,
                  cancel: threading.Event | None) -> tuple[int, bytes, bytes]:
        """One SSH session (exec channel) for one command."""
        start = time.monotonic()
        what = f"`{' '.join(argv[:3])}`"
        chan = self._open_session(what, CommandTimeout)
        out, err = bytearray(), bytearray()
        try:
            chan.settimeout(self.options.io_timeout)  # bounds sendall on a full window
            self._channel_request(chan, lambda: chan.exec_command(remote_command(argv)),
                                  f"starting {what}", CommandTimeout)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            while True:
                got = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    got = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    got = True
                drained = not chan.recv_ready() and not chan.recv_stderr_ready()
                # sshd may send the exit status before the last output: wait for EOF too.
                if drained and (chan.closed or (chan.eof_received and chan.exit_status_ready())):
                    break
                if not got:
                    self._wait_io(chan, argv, start, timeout, cancel)
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
        except TimeoutError:
            raise CommandTimeout(self.label, f"{what}: the server did not take its input "
                                             f"within {self.options.io_timeout:g}s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost(f"the SSH connection failed: {exc}") from None
        finally:
            chan.close()
        return status, bytes(out), bytes(err)

    def stream(self, argv: Sequence[str], on_line: Callable[[str, bool], None], *,
               timeout: float | None = None, cancel: threading.Event | None = None,
               pty: bool = False) -> int:
        """Run argv on an exec channel of its own and hand each line of its output to
        on_line(line, is_stderr) as it arrives (without the line end; a last line without one
        too, at the end). Returns the exit status (-1 if the server sent none).

        For output without an end (`docker logs --follow`): no time limit unless `timeout`
        (then CommandTimeout). `cancel` set closes the channel and raises Cancelled. With
        `pty` the command gets a terminal (its stderr then comes as stdout), so that closing
        the channel hangs it up at once; without, it ends only when it next writes. Raises
        TransportError when the connection drops; what on_line raises passes through."""
        argv = tuple(str(a) for a in argv)
        what = f"`{' '.join(argv[:3])}`"
        limit = float("inf") if timeout is None else timeout
        bufs = {False: bytearray(), True: bytearray()}
        in_callback = False

        def deliver(err: bool, final: bool) -> None:
            nonlocal in_callback
            buf = bufs[err]
            while buf:
                i = buf.find(b"\n")
                if i < 0 and not final:
                    return
                line = bytes(buf[:i] if i >= 0 else buf)
                del buf[:i + 1 if i >= 0 else len(buf)]
                in_callback = True
                on_line(line.rstrip(b"\r").decode("utf-8", "replace"), err)
                in_callback = False

        start = time.monotonic()
        chan = self._open_session(what, CommandTimeout)
        try:
            chan.settimeout(self.options.io_timeout)
            if pty:
                self._channel_request(chan, chan.get_pty, f"a terminal for {what}",
                                      CommandTimeout)
            self._channel_request(chan, lambda: chan.exec_command(remote_command(argv)),
                                  f"starting {what}", CommandTimeout)
            if not pty:  # a terminal's end of input would be a ^D, not an EOF
                chan.shutdown_write()
            while True:
                got = False
                while chan.recv_ready():
                    bufs[False] += chan.recv(65536)
                    got = True
                while chan.recv_stderr_ready():
                    bufs[True] += chan.recv_stderr(65536)
                    got = True
                deliver(False, False)
                deliver(True, False)
                drained = not chan.recv_ready() and not chan.recv_stderr_ready()
                if drained and (chan.closed or (chan.eof_received and chan.exit_status_ready())):
                    break
                if not got:
                    self._wait_io(chan, argv, start, limit, cancel)
            deliver(False, True)
            deliver(True, True)
            return chan.recv_exit_status() if chan.exit_status_ready() else -1
        except TimeoutError:
            if in_callback:
                raise
            raise CommandTimeout(self.label, f"{what}: the server did not answer within "
                                             f"{self.options.io_timeout:g}s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if in_callback:
                raise
            raise self._lost(f"the SSH connection failed: {exc}") from None
        finally:
            chan.close()

    def _open_session(self, what: str,
                      timeout_cls: type[TransportError] = RemoteTimeout) -> paramiko.Channel:
        """A new session channel, or timeout_cls after connect_timeout."""
        limit = self.options.connect_timeout
        start = time.monotonic()
        try:
            return self.transport.open_session(timeout=limit)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if self.transport.is_active() and time.monotonic() - start >= limit:
                raise timeout_cls(self.label, f"the server did not open a channel for {what} "
                                              f"within {limit:g}s") from None
            raise self._lost(f"the SSH connection was lost: {exc}") from None

    def _channel_request(self, chan: paramiko.Channel, request: Callable[[], None], what: str,
                         timeout_cls: type[TransportError] = RemoteTimeout) -> None:
        """Run a channel request (exec_command, invoke_subsystem) with a bound.

        paramiko waits for the server's reply to a channel request without a timeout. A timer
        closes the channel when the reply is late; closing wakes that wait (SSHException)."""
        limit = self.options.connect_timeout
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            try:
                chan.close()
            except Exception:
                pass

        timer = threading.Timer(limit, expire)
        timer.daemon = True
        timer.start()
        try:
            request()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if fired.is_set():
                raise timeout_cls(self.label, f"{what}: the server did not answer within "
                                              f"{limit:g}s") from None
            raise self._lost(f"{what} failed: {exc}") from None
        finally:
            timer.cancel()
        if fired.is_set():  # the reply came just as the timer closed the channel
            raise timeout_cls(self.label, f"{what}: the server did not answer within {limit:g}s")

    def _run_in_shell(self, argv: tuple[str, ...], timeout: float,
                      cancel: threading.Event | None) -> tuple[int, bytes, bytes]:
        with self._shells_lock:
            sh = self._shells.pop() if self._shells else None
        try:
            if sh is None:
                sh = _Shell.open(self)
            result = sh.run(argv, timeout, cancel)
        except BaseException:
            if sh is not None:
                sh.close()  # a shell interrupted mid-command is never reused
            raise
        with self._shells_lock:
            self._shells.append(sh)
        return result

    # ---- SFTP: one session per connection, used by one thread at a time ------------------

    def _open_sftp(self) -> _SFTP:
        chan = self._open_session("SFTP")
        try:
            chan.settimeout(self.options.io_timeout)  # each read and write of the session
            self._channel_request(chan, lambda: chan.invoke_subsystem("sftp"),
                                  "starting SFTP")
            try:
                return _SFTP(chan)
            except TimeoutError:
                raise RemoteTimeout(self.label, f"SFTP did not answer within "
                                                f"{self.options.io_timeout:g}s") from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise self._lost(f"cannot open SFTP: {exc}") from None
        except BaseException:
            chan.close()
            raise

    def _drop_sftp(self, sftp: paramiko.SFTPClient) -> None:
        """Forget a broken SFTP session: the next use opens a new one."""
        if self._sftp is sftp:
            self._sftp = None
        try:
            sftp.close()
        except Exception:
            pass

    @contextmanager
    def _sftp_session(self, what: str) -> Iterator[paramiko.SFTPClient]:
        """The SFTP session, held by this thread for the `with` block.

        Waiting for it takes io_timeout at most. A read or write of the session that takes
        longer raises RemoteTimeout and drops the session, as does a lost connection
        (TransportError); errors the server reports (FileNotFoundError, PermissionError, ...)
        pass through unchanged and keep the session."""
        limit = self.options.io_timeout
        if not self._sftp_lock.acquire(timeout=limit):
            raise RemoteTimeout(self.label, f"SFTP {what}: the SFTP session stayed busy with "
                                            f"another operation for {limit:g}s")
        try:
            if self._sftp is None:
                self._sftp = self._open_sftp()
            sftp = self._sftp
            try:
                yield sftp
            except Exception as exc:
                if getattr(sftp, "timed_out", False):
                    self._drop_sftp(sftp)
                    raise RemoteTimeout(self.label, f"SFTP {what} did not answer within "
                                                    f"{limit:g}s") from None
                broken = (isinstance(exc, (paramiko.SSHException, EOFError, TimeoutError))
                          or sftp.sock.closed or not self.transport.is_active())
                if broken:
                    self._drop_sftp(sftp)
                    raise self._lost(f"SFTP {what} failed: "
                                                     f"{exc or type(exc).__name__}") from None
                raise
            if getattr(sftp, "timed_out", False):  # fn caught the timeout (an `except OSError`)
                self._drop_sftp(sftp)
                raise RemoteTimeout(self.label, f"SFTP {what} did not answer within "
                                                f"{limit:g}s")
        finally:
            self._sftp_lock.release()

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """The SFTP session (opened if need be). Use it through sftp_do: that holds the lock."""
        with self._sftp_session("open") as sftp:
            return sftp

    def warm_sftp(self) -> None:
        try:
            self.sftp
        except Exception:
            pass

    def sftp_do(self, fn: Callable[[paramiko.SFTPClient], object]):
        """Run fn(sftp) holding the SFTP lock (one SFTP session per connection, many threads).
        Raises RemoteTimeout / TransportError as _sftp_session says."""
        with self._sftp_session("request") as sftp:
            return fn(sftp)

    def write_private_file(self, path: str, data: bytes) -> None:
        """Create `path` (must not exist), mode 0600 before any byte is written."""
        with self._sftp_session(f"write of {path}") as sftp:
            f = sftp.open(path, "wx")
            try:
                sftp.chmod(path, 0o600)
                f.write(data)
            except BaseException:
                if not getattr(sftp, "timed_out", False):  # a dead session cannot close it
                    f.close()
                raise
            f.close()

    def ensure_private_dir(self, path: str) -> None:
        with self._sftp_session(f"mkdir of {path}") as sftp:
            parts = [p for p in path.split("/") if p]
            cur = "/" if path.startswith("/") else ""
            for p in parts:
                cur = f"{cur}{p}" if cur in ("", "/") else f"{cur}/{p}"
                try:
                    sftp.stat(cur)
                except FileNotFoundError:
                    sftp.mkdir(cur, 0o700)

    def remove_file(self, path: str) -> None:
        with self._sftp_session(f"remove of {path}") as sftp:
            try:
                sftp.remove(path)
            except FileNotFoundError:
                pass

    def open_tcp(self, host: str, port: int, timeout: float) -> paramiko.Channel:
        """A TCP connection made by the server to host:port (SSH direct-tcpip)."""
        return self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                           timeout=timeout)

    def close(self) -> None:
        with self._shells_lock:
            shells, self._shells = self._shells, []
        for sh in shells:
            sh.close()
        try:
            if self._sftp is not None:
                self._sftp.close()
        except Exception:
            pass
        self.transport.close()
        if self.jump is not None:
            self.jump.close()


class _Shell:
    """A remote `sh` kept open on one channel; commands are written to its stdin one at a time.

    Each command line is `remote_command(argv)` (the same quoting as an exec channel) followed
    by fixed marker lines that carry its exit status, on stdout and stderr, with a fresh random
    token each time. Its stdin is /dev/null so it cannot eat the next command. A command that
    times out or is cancelled closes the whole shell; it is never reused."""

    def __init__(self, conn: Connection, chan: paramiko.Channel):
        self.conn = conn
        self.chan = chan
        self.out = bytearray()
        self.err = bytearray()

    @classmethod
    def open(cls, conn: Connection) -> _Shell:
        chan = conn._open_session("a remote shell", CommandTimeout)
        try:
            chan.settimeout(conn.options.io_timeout)  # bounds sendall on a full window
            conn._channel_request(chan, lambda: chan.exec_command("sh"),
                                  "starting a remote shell", CommandTimeout)
        except BaseException:
            chan.close()
            raise
        sh = cls(conn, chan)
        # Whatever the login prints before `sh` reads its first line is not ours to return.
        sh.run(("true",), conn.options.connect_timeout + 10, None)
        return sh

    def run(self, argv: tuple[str, ...], timeout: float,
            cancel: threading.Event | None) -> tuple[int, bytes, bytes]:
        token = uuid.uuid4().hex
        end = f"RUNNER_END_{token}"
        line = (f"{remote_command(argv)} </dev/null; s=$?; printf '\\n%s %d\\n' {end} \"$s\"; "
                f"printf '\\n%s\\n' {end} >&2\n")
        out_mark = f"\n{end} ".encode()
        err_mark = f"\n{end}\n".encode()
        start = time.monotonic()
        chan = self.chan
        try:
            chan.sendall(line.encode())
            status = None
            out = err = None
            while out is None or err is None:
                got = False
                while chan.recv_ready():
                    self.out += chan.recv(65536)
                    got = True
                while chan.recv_stderr_ready():
                    self.err += chan.recv_stderr(65536)
                    got = True
                if out is None:
                    i = self.out.find(out_mark)
                    j = self.out.find(b"\n", i + len(out_mark)) if i >= 0 else -1
                    if j >= 0:
                        out = bytes(self.out[:i])
                        status = int(self.out[i + len(out_mark):j])
                        del self.out[:j + 1]
                if err is None:
                    i = self.err.find(err_mark)
                    if i >= 0:
                        err = bytes(self.err[:i])
                        del self.err[:i + len(err_mark)]
                if out is not None and err is not None:
                    break
                if chan.closed or chan.exit_status_ready():
                    if not self.conn.transport.is_active():
                        raise self.conn._lost("the SSH connection dropped")
                    raise self.conn._lost("the remote shell ended unexpectedly")
                if not got:
                    self.conn._wait_io(chan, argv, start, timeout, cancel)
        except TimeoutError:
            raise CommandTimeout(self.conn.label, f"`{' '.join(argv[:3])}`: the server did not "
                                                  f"take the command within "
                                                  f"{self.conn.options.io_timeout:g}s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self.conn._lost(f"the SSH connection failed: {exc}") from None
        return int(status if status is not None else -1), out, err

    def close(self) -> None:
        try:
            self.chan.close()
        except Exception:
            pass


class _SFTP(paramiko.SFTPClient):
    """An SFTP client on a channel with a timeout (Channel.settimeout): a read or write that
    takes longer raises TimeoutError. The first timeout closes the channel: requests and
    replies are then out of step, and every later call on this client (the close() of a file
    in a `with` block, say) fails at once instead of waiting once more."""

    timed_out = False

    def _give_up(self) -> None:
        self.timed_out = True
        try:
            self.sock.close()
        except Exception:
            pass

    def _read_all(self, n):
        try:
            return super()._read_all(n)
        except TimeoutError:
            self._give_up()
            raise

    def _write_all(self, out):
        try:
            return super()._write_all(out)
        except TimeoutError:
            self._give_up()
            raise


def http_get(conn: Connection, host: str, port: int, path: str, timeout: float,
             host_header: str | None = None) -> bytes:
    """GET http://host:port/path from the server; the raw response head and start of body.
    `host_header`: the Host to send (default host:port), as a proxy route would."""
    chan = conn.open_tcp(host, port, timeout)
    try:
        chan.settimeout(timeout)
        chan.sendall(f"GET {path} HTTP/1.0\r\nHost: {host_header or f'{host}:{port}'}\r\n"
                     f"User-Agent: runner-health\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while len(data) < 65536:
            chunk = chan.recv(8192)
            if not chunk:
                break
            data += chunk
        return bytes(data)
    finally:
        chan.close()


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


def _authenticate(t: paramiko.Transport, target: Target, opts: SSHOptions,
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


def _handshake(target: Target, sock, opts: SSHOptions,
               log: Callable[[str], None] | None = None) -> tuple[paramiko.Transport, str]:
    t = _start(target, sock, opts)
    try:
        auth = _authenticate(t, target, opts, log)
        t.set_keepalive(opts.keepalive)
        return t, auth
    except BaseException:
        t.close()
        raise


def _start(target: Target, sock, opts: SSHOptions, check: bool = True) -> paramiko.Transport:
    """Key exchange, the host key checked (unless check=False: ssh-trust only looks)."""
    t = paramiko.Transport(sock)
    t.banner_timeout = opts.connect_timeout
    t.handshake_timeout = opts.connect_timeout
    t.auth_timeout = opts.connect_timeout
    sec = t.get_security_options()
    if not opts.host_keys.insecure:
        expected = opts.host_keys.expected_for(target)
        sec.key_types = opts.host_keys.order_key_types(list(sec.key_types), expected)
    try:
        t.start_client(timeout=opts.connect_timeout)
        if check:
            opts.host_keys.check_target(target, t.get_remote_server_key())
        return t
    except BaseException:
        t.close()
        raise


def _socket(target: Target, opts: SSHOptions, via: Connection | None):
    try:
        if via is not None:
            return via.open_tcp(target.host, target.port, opts.connect_timeout)
        return socket.create_connection((target.host, target.port),
                                        timeout=opts.connect_timeout)
    except (OSError, paramiko.SSHException) as exc:
        hop = f" via {via.label}" if via else ""
        raise ConnectError(target.label, f"cannot reach {target.host}:{target.port}{hop}: "
                                         f"{exc or type(exc).__name__}") from None


def _open(target: Target, opts: SSHOptions, via: Connection | None,
          log: Callable[[str], None] | None = None) -> tuple[paramiko.Transport, str]:
    sock = _socket(target, opts, via)
    try:
        return _handshake(target, sock, opts, log)
    except (HostKeyError, AuthError):
        raise
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise ConnectError(target.label, f"SSH handshake with {target.host}:{target.port} "
                                         f"failed: {exc or type(exc).__name__}") from None


class SSHConfigError(TransportError):
    """The host's SSH settings cannot be used (a ~/.ssh/config problem); retrying won't help."""


def _route(target: Target, opts: SSHOptions) -> tuple[Target, ...]:
    """The hosts to connect to in order, the target last."""
    if target.jump is None and opts.jump is not None:
        return (*opts.jump.route, target)
    return target.route


def _as_server(exc: TransportError, target: Target, hop: Target) -> TransportError:
    """An error of a jump host, as the server's: which server, through which jump host."""
    if hop is target:
        return exc
    return type(exc)(target.label, f"through {_hop_name(hop)}: {exc.reason}")


def _hop_name(hop: Target) -> str:
    """A jump host as messages name it: its name, and its address when the name is an alias."""
    return f"{hop.label} ({hop.host}:{hop.port})" if hop.name != hop.host else hop.label


def _connect_route(target: Target, opts: SSHOptions, log: Callable[[str], None] | None,
                   last: Callable[[Target, Connection | None], Connection]) -> Connection:
    """Open every jump host of the route, then `last(target, via)`. Closes what it opened
    if anything fails."""
    route = _route(target, opts)
    for hop in route:
        if hop.problem:
            raise _as_server(SSHConfigError(hop.label, hop.problem), target, hop)
    via = None
    try:
        for hop in route[:-1]:
            try:
                t, auth = _open(hop, opts, via, log)
            except TransportError as exc:
                raise _as_server(exc, target, hop) from None
            via = Connection(hop, t, opts, jump=via, auth=auth)
        return last(target, via)
    except BaseException:
        if via is not None:
            via.close()
        raise


def connect(target: Target, opts: SSHOptions, *, cancel: threading.Event | None = None,
            log: Callable[[str], None] | None = None,
            sleep: Callable[[float], None] = time.sleep) -> Connection:
    """Open the connection (through its jump hosts if any) with bounded retries.
    Raises HostKeyError / AuthError / SSHConfigError at once, ConnectError after the last
    attempt."""
    def last(t: Target, via: Connection | None) -> Connection:
        transport, auth = _open(t, opts, via, log)
        return Connection(t, transport, opts, jump=via, auth=auth)

    attempts = opts.retries + 1
    for attempt in range(1, attempts + 1):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled while connecting to {target.label}")
        try:
            return _connect_route(target, opts, log, last)
        except ConnectError as exc:
            if attempt == attempts:
                if attempts > 1:
                    raise ConnectError(exc.server, f"{exc.reason} (after {attempts} attempts)") \
                        from None
                raise
            delay = min(0.5 * 2 ** (attempt - 1), 4.0)
            if log:
                log(f"{target.label}: {exc.reason}; retrying in {delay:g}s "
                    f"({attempt}/{attempts - 1})")
            sleep(delay)
    raise AssertionError("unreachable")


def scan_host_key(target: Target, opts: SSHOptions) -> paramiko.PKey:
    """The host key `target` presents, through its jump hosts (which must be trusted and
    take a key), with no login on the target itself and no check of its key: for
    `runner ssh-trust`, which shows it. Raises TransportError (ConnectError, HostKeyError or
    AuthError of a jump host, SSHConfigError)."""
    def last(t: Target, via: Connection | None) -> Connection:
        sock = _socket(t, opts, via)
        try:
            transport = _start(t, sock, opts, check=False)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectError(t.label, f"SSH handshake with {t.host}:{t.port} failed: "
                                        f"{exc or type(exc).__name__}") from None
        return Connection(t, transport, opts, jump=via)

    conn = _connect_route(target, opts, None, last)
    try:
        return conn.transport.get_remote_server_key()
    finally:
        conn.close()


def known_hosts_line(target: Target, key: paramiko.PKey) -> str:
    """The known_hosts line listing `key` for this host, as HostKeyPolicy looks it up."""
    name = target.host_key_alias or host_key_name(target.host, target.port)
    return f"{name} {key.get_name()} {key.get_base64()}"
