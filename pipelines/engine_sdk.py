"""A docker SDK client of the build engine (pipelines/build_engine.py): what scan's image export
and push use, so that they read the image from the engine that built it.

- local: `docker.from_env()`, as the stages always did.
- ssh://: HTTP over `ssh -F CONFIG ... -- HOST docker system dial-stdio`, the same command the
  docker CLI's ssh transport runs, with the same config (strict host keys, the pipeline's key
  and known_hosts). Each HTTP connection is one ssh process whose stdin/stdout are the other
  end of a socketpair: urllib3 reads and writes a real socket, timeouts included. The docker
  SDK's own ssh transports do not fit: paramiko's reads only ~/.ssh/known_hosts, and the
  shell-out one runs the `ssh` of the process's own PATH without options.
- tcp://: the SDK's own TLS (docker.tls.TLSConfig): the engine's certificate must chain to the
  pipeline's CA and name the host; the runner shows its client certificate.

The API version is asked once with environment proxies off (the builder is reached directly,
never through HTTPS_PROXY), then the client is made for that version. Failing to reach the
engine raises EngineError, a DockerException, whose message names the engine and, for ssh,
says what ssh said and what to do.
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
from docker.constants import MINIMUM_DOCKER_API_VERSION
from docker.errors import DockerException

from pipelines.build_engine import SSH, ENGINE_ENV, BuildEngine, EngineProblem, ssh_dial_argv

# A name that never resolves: requests for it only ever go through the ssh adapter below.
SSH_BASE_URL = "http://runner-build-engine.invalid:2375"


class EngineError(DockerException):
    """The build engine cannot be reached or used. The message names it."""


def sdk_client(engine: BuildEngine, state_dir: Path, timeout: int = 60) -> docker.DockerClient:
    if engine.settings is None:
        return docker.from_env(timeout=timeout)
    try:
        engine.check_files()
        address = engine.settings.address
        if address.scheme == SSH:
            ssh, _, config = engine.ssh_files(state_dir)
    except EngineProblem as exc:
        raise EngineError(str(exc)) from None
    if address.scheme == SSH:
        env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV}
        adapter = DialAdapter(ssh_dial_argv(ssh, str(config), address), env, timeout)
        return _connected(engine, SSH_BASE_URL, False, adapter, timeout)
    files = engine.tls_files()
    tls: Any = False
    if files:
        ca, cert, key = files
        tls = docker.tls.TLSConfig(client_cert=(cert, key), ca_cert=ca, verify=ca)
    return _connected(engine, f"tcp://{address.host}:{address.port}", tls, None, timeout)


def _connected(engine: BuildEngine, base_url: str, tls: Any, adapter: DialAdapter | None,
               timeout: int) -> docker.DockerClient:
    def prepare(api: Any) -> None:
        api.trust_env = False
        if adapter is not None:
            api.mount(api.base_url, adapter)

    probe = docker.APIClient(base_url=base_url, version=MINIMUM_DOCKER_API_VERSION, tls=tls,
                             timeout=timeout)
    prepare(probe)
    try:
        version = probe.version(api_version=False)["ApiVersion"]
    except Exception as exc:  # noqa: BLE001 - every way of failing gets the same message
        said = adapter.ssh_said() if adapter is not None else ""
        if adapter is not None:
            adapter.close()
        raise EngineError(f"build engine {engine.label} cannot be reached: "
                          f"{engine.explain(said if said.strip() else _short(exc))}") from None
    finally:
        if adapter is not None:
            probe.adapters.pop(probe.base_url, None)  # the client below goes on using it
        probe.close()
    client = docker.DockerClient(base_url=base_url, version=version, tls=tls, timeout=timeout)
    prepare(client.api)
    return client


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 400 else text[:400] + "..."


class DialConnection(urllib3.connection.HTTPConnection):
    """One HTTP connection: one `ssh ... docker system dial-stdio` process."""

    def __init__(self, argv: list[str], env: dict[str, str], io_timeout: float,
                 on_open: Callable[[DialConnection], None]) -> None:
        super().__init__("localhost", timeout=io_timeout)
        self._argv, self._env, self._io_timeout = argv, env, io_timeout
        self._on_open = on_open
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._said = ""

    def connect(self) -> None:
        ours, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()
        try:
            # A session of its own: a Ctrl-C for the runner cancels the run, and the stage's
            # cleanup closes this connection, instead of the signal cutting it mid-request.
            self._proc = subprocess.Popen(self._argv, stdin=theirs, stdout=theirs,
                                          stderr=self._stderr, env=self._env,
                                          start_new_session=True)
        except OSError as exc:
            ours.close()
            raise EngineError(f"cannot run {self._argv[0]}: {exc}") from None
        finally:
            theirs.close()
        ours.settimeout(self._io_timeout)
        self.sock = ours
        self._on_open(self)

    def close(self) -> None:
        super().close()
        proc, self._proc = self._proc, None
        if proc is not None:
            # The closed socket is EOF on ssh's stdin: the remote dial-stdio ends, ssh exits.
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._keep_stderr()

    def _keep_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.seek(0)
            self._said += self._stderr.read().decode("utf-8", "replace")
            self._stderr.close()
            self._stderr = None

    def said(self) -> str:
        """What ssh wrote on its stderr (asked after a failure, when it has exited)."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                return self._said
        self._keep_stderr()
        return self._said


class DialPool(urllib3.connectionpool.HTTPConnectionPool):
    def __init__(self, argv: list[str], env: dict[str, str], timeout: float,
                 maxsize: int = 10) -> None:
        super().__init__("localhost", timeout=timeout, maxsize=maxsize)
        self._argv, self._env, self._io_timeout = argv, env, timeout
        self.last: DialConnection | None = None

    def _remember(self, conn: DialConnection) -> None:
        self.last = conn

    def _new_conn(self) -> DialConnection:
        return DialConnection(self._argv, self._env, self._io_timeout, self._remember)


class DialAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter for every URL of one engine: all go to one DialPool."""

    def __init__(self, argv: list[str], env: dict[str, str], timeout: float) -> None:
        self.pool = DialPool(argv, env, timeout)
        super().__init__()

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self.pool

    def get_connection(self, url, proxies=None):  # requests before 2.32.2
        return self.pool

    def request_url(self, request, proxies):
        return request.path_url

    def ssh_said(self) -> str:
        return self.pool.last.said() if self.pool.last is not None else ""

    def close(self) -> None:
        super().close()
        self.pool.close()
