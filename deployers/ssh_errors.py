"""What talking to a server over SSH raises: TransportError, naming the server, and its kinds."""
from __future__ import annotations


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


class SSHConfigError(TransportError):
    """The host's SSH settings cannot be used (a ~/.ssh/config problem); retrying won't help."""
