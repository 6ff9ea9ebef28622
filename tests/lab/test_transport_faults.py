"""A server that stops answering mid-connection (issue 9): every remote operation fails in
bounded time, naming the server, and the connection recovers once the server answers again.

The stall is real: the sshd processes that serve this test's connections (the per-connection
sshd and everything under it: sftp-server, the remote shell) are stopped with SIGSTOP, so the
TCP connection stays up but nothing answers. The listener is left running: the lab is shared
(another test session's `runner lab up` health check would find a stopped listener dead and
restart sshd, killing our stopped sessions and refusing everyone's connections meanwhile).
The stopped processes are always continued again: in a `finally`, and by a detached dead man's
switch in case this process dies before it gets there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


from deployers.spec import Target
from deployers.host_keys import HostKeyPolicy
from deployers.ssh_connect import connect
from deployers.ssh_errors import CommandTimeout, RemoteTimeout, TransportError
from deployers.ssh_keys import load_private_key
from deployers.ssh_options import SSHOptions
from runner_lab import layout

# The same bounds serve the connections before the stall and after it (a fresh connect, a new
# SFTP session, a new shell), so they are not lowered to save time: at load 15 a fresh SFTP
# session once took more than 2 s to open.
IO_TIMEOUT = 2.0
COMMAND_TIMEOUT = 3.0
CONNECT_TIMEOUT = 3.0
MARGIN = 3.0  # scheduling, the close of a dropped channel; not a tight timing bound


def _opts(server: dict) -> SSHOptions:
    return SSHOptions(key=load_private_key(path=server["key_file"]),
                      host_keys=HostKeyPolicy(known_hosts=server["known_hosts"]),
                      io_timeout=IO_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
                      connect_timeout=CONNECT_TIMEOUT, retries=0)


def _connect(server: dict):
    return connect(Target(server["name"], server["host"], server["port"], server["user"]),
                   _opts(server))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _sshd_listener(server: dict) -> int:
    """The pid of the server's sshd listener (from its pid file, checked against its command
    line so that a stale pid file cannot make us stop another process)."""
    s = layout.server_from_name(server["name"], layout.state_dir())
    listener = int((s.run_dir / "sshd.pid").read_text().split()[0])
    # sshd rewrites its title: "sshd: /usr/sbin/sshd -D -e -f <config> [listener] ..."
    cmdline = Path(f"/proc/{listener}/cmdline").read_bytes().replace(b"\0", b" ").split()
    assert b"/usr/sbin/sshd" in cmdline, cmdline
    assert str(s.sshd_config).encode() in cmdline, f"pid {listener} is not {s.name}'s sshd"
    return listener


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[len("socket:["):-1])
    return out


def _serving(server: dict, conns) -> list[int]:
    """The per-connection sshd processes (children of the listener) serving `conns`: found by
    the server side of each TCP connection, read in the server's network namespace."""
    listener = _sshd_listener(server)
    ours = {c.transport.sock.getsockname()[1] for c in conns}
    inodes = set()
    for line in Path(f"/proc/{listener}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == server["port"] and remote_port in ours:
            inodes.add(fields[9])
    assert len(inodes) == len(conns), (ours, inodes)
    found = [pid for pid in _children(listener) if _socket_inodes(pid) & inodes]
    assert len(found) == len(conns), found
    return found


@contextmanager
def _stalled(server: dict, conns):
    """The server side of `conns` stopped (SIGSTOP) for the `with` block."""
    stopped: list[int] = []
    guard = None
    try:
        todo = _serving(server, conns)
        # From the top down (a stopped process forks no more); a second sweep catches a child
        # forked while the first ran.
        for _ in range(2):
            while todo:
                pid = todo.pop()
                if pid not in stopped:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
                todo += [c for c in _children(pid) if c not in stopped]
            todo = [c for p in stopped for c in _children(p) if c not in stopped]
        # Continues them even if this process is killed before the finally below runs.
        guard = subprocess.Popen(
            ["sh", "-c", f"sleep 120; kill -CONT {' '.join(map(str, stopped))}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid in stopped:  # wait until each one really is stopped
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state in ("T", "t"):
                    break
                time.sleep(0.01)
        yield stopped
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if guard is not None:
            guard.kill()  # our own child, by its pid
            guard.wait()


def _timed(fn):
    start = time.monotonic()
    try:
        fn()
    except TransportError as exc:
        return exc, time.monotonic() - start
    raise AssertionError(f"{fn} did not fail on a stalled server")


def test_stalled_server_fails_in_bounded_time_naming_it(lab):
    server = dict(lab["servers"][-1])
    name = server["name"]
    scratch = f"/tmp/runner-fault-{uuid.uuid4().hex}"
    conn = _connect(server)
    other = _connect(server)  # a second connection whose SFTP session is open at the stall
    fresh = None
    times: dict[str, float] = {}
    try:
        assert isinstance(conn.sftp_do(lambda s: s.listdir(".")), list)
        conn.run(["true"], check=True)  # leaves a remote shell open for the next command
        other.sftp_do(lambda s: s.normalize("."))

        with _stalled(server, [conn, other]) as pids:
            # per connection its sshd and sftp-server, and conn's remote shell
            names = [Path(f"/proc/{p}/comm").read_text().strip() for p in pids]
            assert names.count("sftp-server") == 2 and "sh" in names, names

            # `other`'s operations wait their bounds out in a thread of their own, beside
            # conn's below (two connections, nothing shared): the test waits for the longer
            # of the two sequences, not for both.
            on_other: dict[str, tuple[Exception, float]] = {}

            def other_ops():
                for what, op in [
                        ("write_private_file",
                         lambda: other.write_private_file(scratch, b"secret")),
                        ("ensure_private_dir", lambda: other.ensure_private_dir(scratch)),
                        ("remove_file", lambda: other.remove_file(scratch))]:
                    try:
                        on_other[what] = _timed(op)
                    except AssertionError as exc:  # it did not fail: said where asserted
                        on_other[what] = (exc, 0.0)
            beside = threading.Thread(target=other_ops, daemon=True)
            beside.start()

            # A request on the open SFTP session: its read gives up after io_timeout.
            exc, times["sftp_do"] = _timed(lambda: conn.sftp_do(lambda s: s.listdir(".")))
            assert isinstance(exc, RemoteTimeout), exc
            assert exc.server == name and str(exc).startswith(f"{name}: ")
            assert f"did not answer within {IO_TIMEOUT:g}s" in str(exc)
            assert times["sftp_do"] < IO_TIMEOUT + MARGIN
            assert conn._sftp is None  # dropped: the next use opens a new session

            # After the drop: a new SFTP session cannot even open its channel.
            exc, times["write_private_file (new session)"] = _timed(
                lambda: conn.write_private_file(scratch, b"secret"))
            assert isinstance(exc, RemoteTimeout) and exc.server == name, exc
            assert times["write_private_file (new session)"] < CONNECT_TIMEOUT + MARGIN

            # A command through the kept shell: command_timeout.
            exc, times["run (shell)"] = _timed(lambda: conn.run(["echo", "hi"]))
            assert isinstance(exc, CommandTimeout) and exc.server == name, exc
            assert f"did not finish within {COMMAND_TIMEOUT:g}s" in str(exc)
            assert times["run (shell)"] < COMMAND_TIMEOUT + MARGIN

            # A command on its own exec channel (stdin given): the channel open is bounded.
            exc, times["run (exec)"] = _timed(lambda: conn.run(["cat"], stdin=b"hi"))
            assert isinstance(exc, CommandTimeout) and exc.server == name, exc
            assert times["run (exec)"] < COMMAND_TIMEOUT + MARGIN

            beside.join(timeout=60)
            assert not beside.is_alive(), f"an operation of `other` never returned: {on_other}"
            # write_private_file on an open session: `open` gets no reply.
            exc, times["write_private_file"] = on_other["write_private_file"]
            assert isinstance(exc, RemoteTimeout) and exc.server == name, exc
            assert f"write of {scratch}" in str(exc)
            assert times["write_private_file"] < IO_TIMEOUT + MARGIN
            for what in ("ensure_private_dir", "remove_file"):
                exc, times[what] = on_other[what]
                assert isinstance(exc, RemoteTimeout) and exc.server == name, (what, exc)
                assert times[what] < max(IO_TIMEOUT, CONNECT_TIMEOUT) + MARGIN

        print("elapsed on the stalled server:",
              ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))

        # The server answers again: a fresh connection works, and so does the stalled one (a
        # new SFTP session, a new shell).
        fresh = _connect(server)
        assert fresh.run(["echo", "ok"], check=True).stdout.strip() == "ok"
        assert isinstance(fresh.sftp_do(lambda s: s.listdir(".")), list)
        assert isinstance(conn.sftp_do(lambda s: s.listdir(".")), list)
        assert conn.run(["echo", "again"], check=True).stdout.strip() == "again"
    finally:
        cleanup = fresh
        try:
            cleanup = cleanup or _connect(server)
            # the stalled `open` of write_private_file may have reached sftp-server late
            cleanup.run(["rm", "-rf", scratch])
        finally:
            for c in (conn, other, fresh, cleanup):
                if c is not None:
                    c.close()
