"""An HTTP GET made from the server, over a direct-tcpip channel of its SSH connection."""
from __future__ import annotations

from deployers.ssh_connection import Connection


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
