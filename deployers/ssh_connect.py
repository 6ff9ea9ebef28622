"""connect(): a server's Connection, opened through its jump hosts, with bounded retries;
scan_host_key() for `runner ssh-trust`.

- Route: the Target's jump hosts (Target.route, outermost first; each checked and logged into
  like a server), then the target through a direct-tcpip channel of the last one. An error of
  a jump host is raised as the server's, saying through which jump host.
- Connect: a timeout per attempt (TCP, banner, key exchange, auth) and a bounded number of
  retries with backoff, only for network failures: a refused key or host key is final.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import paramiko

from runner.errors import Cancelled

from deployers.spec import Target
from deployers.ssh_connection import Connection, hop_name
from deployers.ssh_errors import (AuthError, ConnectError, HostKeyError, SSHConfigError,
                                  TransportError)
from deployers.ssh_login import authenticate
from deployers.ssh_options import SSHOptions


def _handshake(target: Target, sock, opts: SSHOptions,
               log: Callable[[str], None] | None = None) -> tuple[paramiko.Transport, str]:
    t = _start(target, sock, opts)
    try:
        auth = authenticate(t, target, opts, log)
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


def _route(target: Target, opts: SSHOptions) -> tuple[Target, ...]:
    """The hosts to connect to in order, the target last."""
    if target.jump is None and opts.jump is not None:
        return (*opts.jump.route, target)
    return target.route


def _as_server(exc: TransportError, target: Target, hop: Target) -> TransportError:
    """An error of a jump host, as the server's: which server, through which jump host."""
    if hop is target:
        return exc
    return type(exc)(target.label, f"through {hop_name(hop)}: {exc.reason}")


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
