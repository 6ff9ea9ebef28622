"""Settings of the build engine: the docker engine that builds the image (`stages.build.engine`).

Unset, the runner's own engine builds (DOCKER_HOST, else the default socket). Set, the image is
built on another machine's engine, and the scan and push stages read it from that same engine:

    build:
      engine: ssh://builder@build.example.com          # the user's ~/.ssh setup
    build:
      engine:
        host: ssh://root@10.0.0.5:22
        key_file: ~/.ssh/builder_ed25519
        known_hosts: ~/.ssh/known_hosts.builders        # host keys are always checked strictly
    build:
      engine:
        host: tcp://build.example.com:2376
        tls: {ca: ca.pem, cert: cert.pem, key: key.pem}  # docker's --tlsverify

The address is parsed once here (`BuildEngineSettings.address`); pipelines/build_engine.py turns
the settings into docker CLI flags and a docker SDK client.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from runner.model.base import HOST_RE, Model, PathOn

SSH = "ssh"
TCP = "tcp"
TLS_PORT = 2376  # docker's own defaults for tcp://
PLAIN_PORT = 2375

_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
# Characters a path cannot hold once it is written into an ssh_config line (quoted) or handed to
# the docker CLI as one flag value.
_BAD_PATH_CHARS = ('"', "\\", "\n", "\r", "\0")


@dataclass(frozen=True)
class EngineAddress:
    scheme: str  # SSH | TCP
    host: str  # a name, an IPv4 address or a bracketed IPv6 address
    port: int | None  # None: ssh's own (22, or the ssh config's); tcp always has one
    user: str | None = None  # ssh only; None: ssh's own choice (the ssh config, else $USER)

    @property
    def url(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{user}{self.host}{port}"


def parse_engine_host(text: str, *, tls: bool = True) -> EngineAddress:
    """`ssh://[user@]host[:port]` or `tcp://host[:port]` -> EngineAddress. A tcp address
    without a port gets docker's default (2376 with TLS, 2375 without). Raises ValueError
    saying what is wrong and what is accepted."""
    accepted = ("ssh://[user@]host[:port] or tcp://host:port (leave `engine` unset to build "
                "on the runner's own engine)")
    m = _URL_RE.match(text.strip())
    if m is None:
        raise ValueError(f"engine {text!r} is not an address: use {accepted}")
    scheme, rest = m.group("scheme").lower(), m.group("rest")
    if scheme not in (SSH, TCP):
        raise ValueError(f"engine {text!r}: the scheme {scheme}:// is not supported; use "
                         f"{accepted}")
    if "/" in rest.rstrip("/") or "?" in rest or "#" in rest:
        raise ValueError(f"engine {text!r}: nothing may follow the host and port (a socket "
                         "path is not supported: the engine is the one `docker` reaches on "
                         "that machine)")
    rest = rest.rstrip("/")
    user = None
    if "@" in rest:
        if scheme == TCP:
            raise ValueError(f"engine {text!r}: a tcp:// engine has no user; authentication "
                             "is the TLS client certificate")
        user, rest = rest.rsplit("@", 1)
        if not _USER_RE.match(user):
            raise ValueError(f"engine {text!r}: not a user name: {user!r}")
    port: int | None = None
    if rest.startswith("["):
        end = rest.find("]")
        host, tail = (rest[: end + 1], rest[end + 1:]) if end > 0 else (rest, "")
    elif rest.count(":") == 1:
        host, tail = rest.split(":")
        tail = ":" + tail
    else:
        host, tail = rest, ""
    if tail:
        digits = tail[1:] if tail.startswith(":") else ""
        if not digits.isdigit() or not 1 <= int(digits) <= 65535:
            raise ValueError(f"engine {text!r}: bad port {tail[1:] or tail!r} (1 to 65535)")
        port = int(digits)
    if not host or not HOST_RE.match(host):
        raise ValueError(f"engine {text!r}: not a host name or address: {host!r}")
    if scheme == TCP and port is None:
        port = TLS_PORT if tls else PLAIN_PORT
    return EngineAddress(scheme, host, port, user)


def _check_path(field: str, value: str | None) -> None:
    if value is not None and (not value.strip() or any(c in value for c in _BAD_PATH_CHARS)):
        raise ValueError(f"{field}: {value!r} cannot be handed to ssh or docker (empty, or it "
                         "holds a quote, a backslash or a newline)")


class EngineTLS(Model):
    """The TLS files for a `tcp://` engine, as docker's `--tlsverify` takes them: the engine's
    certificate must be signed by `ca` and name the host, and the runner shows `cert` (signed by
    a CA the engine trusts, its `--tlscacert`)."""

    ca: Annotated[str, PathOn("pipeline")] = Field(examples=["/etc/runner/builder/ca.pem"])
    """The CA certificate that signed the engine's certificate (`--tlscacert`)."""
    cert: Annotated[str, PathOn("pipeline")] = Field(examples=["/etc/runner/builder/cert.pem"])
    """The runner's client certificate (`--tlscert`)."""
    key: Annotated[str, PathOn("pipeline")] = Field(examples=["/etc/runner/builder/key.pem"])
    """The client certificate's private key (`--tlskey`)."""

    @model_validator(mode="after")
    def _paths(self) -> EngineTLS:
        for name in ("ca", "cert", "key"):
            _check_path(f"tls.{name}", getattr(self, name))
        return self


class BuildEngineSettings(Model):
    """A docker engine on another machine that builds the image, reached through the docker
    CLI's own transports; the scan and push stages then read the image from that engine, and
    the push goes from that engine to the registry. A string is the same as `{host: ...}`."""

    host: str = Field(examples=["tcp://build.example.com:2376", "ssh://root@10.0.0.5"])
    """`ssh://[user@]host[:port]`: the system `ssh` runs `docker system dial-stdio` there, so
    that user must be able to run `docker` (root, or in the `docker` group). `tcp://host:port`:
    the engine's own TCP socket, with `tls` (port 2376 if none is given)."""
    key_file: Annotated[str | None, PathOn("pipeline")] = Field(
        default=None, examples=["~/.ssh/builder_ed25519"])
    """ssh only: the private key to log in with (no passphrase, or one held by ssh-agent).
    Unset: the keys of the user's ~/.ssh setup (its config, its agent, its default keys)."""
    known_hosts: Annotated[str | None, PathOn("pipeline")] = Field(
        default=None, examples=["~/.ssh/known_hosts.builders"])
    """ssh only: the known_hosts file that holds the builder's host key; then only this file
    counts. Unset: the user's ~/.ssh/known_hosts. Either way an unknown or changed host key
    is refused (StrictHostKeyChecking yes), never accepted."""
    tls: EngineTLS | Literal[False] | None = Field(default=None,
                                                   examples=[{"ca": "ca.pem", "cert": "cert.pem",
                                                              "key": "key.pem"}])
    """tcp only, and required there: the TLS files (`ca`, `cert`, `key`), or `false` for plain
    TCP (port 2375 if none is given), which lets anyone who reaches that port run anything as
    root on the builder: only on a network of your own."""
    connect_timeout: float = Field(default=10, gt=0, le=300)
    """Seconds to wait for the builder to answer a new connection."""

    _address: EngineAddress = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"host": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self) -> BuildEngineSettings:
        address = parse_engine_host(self.host, tls=self.tls is not False)
        if address.scheme == SSH:
            if self.tls is not None:
                raise ValueError("tls is for tcp:// engines; an ssh:// engine is encrypted and "
                                 "authenticated by ssh itself (key_file, known_hosts)")
            _check_path("key_file", self.key_file)
            _check_path("known_hosts", self.known_hosts)
        else:
            extra = [f for f in ("key_file", "known_hosts") if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"{' and '.join(extra)}: only for ssh:// engines; a tcp:// "
                                 "engine authenticates with `tls` (ca, cert, key)")
            if self.tls is None:
                raise ValueError(
                    f"engine {self.host!r}: a tcp:// engine needs `tls: {{ca, cert, key}}` "
                    "(docker's --tlsverify), or `tls: false` to use plain TCP, which lets "
                    "anyone who reaches the port run anything as root on the builder")
        self._address = address
        return self

    @property
    def address(self) -> EngineAddress:
        return self._address
