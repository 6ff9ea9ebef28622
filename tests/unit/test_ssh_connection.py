"""deployers.ssh_connection without a server: the bounds on waiting (issue 9), with fake
channels."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from deployers.spec import Target
from deployers.host_keys import HostKeyPolicy
from deployers.ssh_connection import Connection, _SFTP
from deployers.ssh_errors import CommandTimeout, RemoteTimeout, TransportError
from deployers.ssh_options import SSHOptions


class FakeTransport:
    def is_active(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _conn(io_timeout: float = 0.3, connect_timeout: float = 0.3) -> Connection:
    opts = SSHOptions(key=None, host_keys=HostKeyPolicy(insecure=True),  # type: ignore[arg-type]
                      io_timeout=io_timeout, connect_timeout=connect_timeout)
    return Connection(Target("srv-x", "192.0.2.1", 22, "root"), FakeTransport(), opts)  # type: ignore[arg-type]


class FakeChan:
    """A channel whose server never answers: requests wait until close(); reads time out."""

    def __init__(self) -> None:
        self.closed = False
        self._closed = threading.Event()

    def close(self) -> None:
        self.closed = True
        self._closed.set()

    def exec_command(self, command: str) -> None:  # paramiko waits for the reply unbounded
        self._closed.wait()
        import paramiko
        raise paramiko.SSHException("Channel closed.")

    def send(self, data: bytes) -> int:
        return len(data)

    def recv(self, n: int) -> bytes:
        raise socket.timeout("timed out")


class FakeSFTP:
    def __init__(self) -> None:
        self.timed_out = False
        self.sock = FakeChan()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_waiting_for_a_busy_sftp_session_is_bounded():
    conn = _conn(io_timeout=0.3)
    conn._sftp = FakeSFTP()  # type: ignore[assignment]
    assert conn._sftp_lock.acquire()  # another thread's operation that never ends
    try:
        start = time.monotonic()
        with pytest.raises(RemoteTimeout) as err:
            conn.sftp_do(lambda s: s)
        assert time.monotonic() - start < 2
        assert err.value.server == "srv-x" and "busy" in str(err.value)
        with pytest.raises(RemoteTimeout):
            conn.remove_file("/x")
    finally:
        conn._sftp_lock.release()


def test_a_timeout_the_operation_swallowed_still_fails_and_drops_the_session():
    conn = _conn()
    fake = FakeSFTP()
    conn._sftp = fake  # type: ignore[assignment]

    def op(sftp):  # like `except OSError: pass` around a request that timed out
        sftp.timed_out = True
        return "garbage"

    with pytest.raises(RemoteTimeout) as err:
        conn.sftp_do(op)
    assert "SFTP request did not answer within 0.3s" in str(err.value)
    assert conn._sftp is None and fake.closed
    assert conn._sftp_lock.acquire(blocking=False)  # released
    conn._sftp_lock.release()


def test_errors_the_server_reports_pass_through_and_keep_the_session():
    conn = _conn()
    fake = FakeSFTP()
    conn._sftp = fake  # type: ignore[assignment]

    def missing(sftp):
        raise FileNotFoundError("no such file")

    with pytest.raises(FileNotFoundError):
        conn.sftp_do(missing)
    assert conn._sftp is fake and not fake.closed


def test_a_lost_session_becomes_a_transport_error_and_is_dropped():
    conn = _conn()
    fake = FakeSFTP()
    conn._sftp = fake  # type: ignore[assignment]

    def op(sftp):
        raise EOFError()

    with pytest.raises(TransportError) as err:
        conn.sftp_do(op)
    assert not isinstance(err.value, RemoteTimeout)
    assert err.value.server == "srv-x" and "SFTP request failed" in str(err.value)
    assert conn._sftp is None


def test_a_channel_request_without_a_reply_is_bounded():
    conn = _conn(connect_timeout=0.3)
    chan = FakeChan()
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as err:
        conn._channel_request(chan, lambda: chan.exec_command("sh"), "starting a remote shell",
                              CommandTimeout)
    assert time.monotonic() - start < 2
    assert chan.closed
    assert str(err.value) == ("srv-x: starting a remote shell: the server did not answer "
                              "within 0.3s")


def test_the_first_sftp_timeout_closes_the_channel():
    chan = FakeChan()
    with pytest.raises(TimeoutError):
        _SFTP(chan)  # the version exchange gets no reply
    assert chan.closed
