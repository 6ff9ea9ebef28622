"""Connection: one open SSH connection to a server, which runs commands and SFTP on it.

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

import logging
import select
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import paramiko

from runner.errors import Cancelled

from deployers.spec import Target
from deployers.ssh_errors import CommandTimeout, RemoteTimeout, TransportError
from deployers.ssh_options import SSHOptions


# paramiko logs expected events (a refused health-probe connection while the app starts) as
# errors; without a handler Python would print them on stderr. Failures reach the user through
# the exceptions and the deploy report instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


def remote_command(argv: Sequence[str]) -> str:
    """The single place where argv becomes a remote command line."""
    return shlex.join([str(a) for a in argv])


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
    # which key the server took, as `ssh_login.authenticate` names it (no key material)
    auth: str = ""
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
                f"the route through {hop_name(dead.target)} broke (the SSH connection to "
                f"that jump host is gone): {message}"))
        return TransportError(self.label, f"{message} (through {hop_name(hops[-1].target)})")

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


def hop_name(hop: Target) -> str:
    """A jump host as messages name it: its name, and its address when the name is an alias."""
    return f"{hop.label} ({hop.host}:{hop.port})" if hop.name != hop.host else hop.label
