"""The build engine: which docker engine builds the image (`stages.build.engine`), and how the
docker CLI (the build) and the docker SDK (scan's export, push) reach it. Not runner.engine,
which runs pipelines.

One `BuildEngine` value, made from the pipeline's settings (validated once, by the model in
runner/model/engine.py), gives the same engine to every stage:
- local (unset): the runner's own engine, as DOCKER_HOST says; the CLI's environment and
  `docker.from_env()` are left exactly as they were.
- ssh://: the docker CLI's own ssh transport, which runs `ssh ... -- HOST docker system
  dial-stdio` with the first `ssh` on PATH. The CLI's PATH therefore starts with a directory
  holding one fixed wrapper script (no pipeline value in it) that runs the system's ssh with
  `-F CONFIG`. CONFIG (`ssh_config_text`, pure) comes first with StrictHostKeyChecking yes,
  BatchMode yes and the pipeline's key_file/known_hosts, then includes the user's and the
  system's files: ssh keeps the first value it reads, so those lines win and everything else
  (aliases, ProxyJump, an agent) still comes from the user's ~/.ssh setup. The SDK runs that
  same ssh with that same CONFIG and speaks HTTP over the process's stdin/stdout (a
  socketpair), as the CLI does: one ssh setup, one host-key check, for both.
- tcp://: `-H tcp://HOST:PORT --tlsverify --tlscacert ... --tlscert ... --tlskey ...` for the
  CLI, `docker.tls.TLSConfig` for the SDK (the engine's certificate must chain to `ca` and name
  the host). `tls: false` is plain TCP, only when the pipeline says so.

What cannot work raises EngineProblem here, and pipelines.engine_sdk.EngineError (a
DockerException, so the stages' existing handlers catch it) from `client()`; both messages name
the engine and say what to do. The files the ssh transport needs are written under a directory
the caller gives (the run's own directory), readable by its owner only. This module does not
import the docker SDK (pipelines/engine_sdk.py does), so a local build does not pay for it.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.model.engine import SSH, BuildEngineSettings, EngineAddress

if TYPE_CHECKING:
    import docker

    from runner.stage import StageContext
    from runner.model import Pipeline

# The variables through which a docker CLI could be pointed at another engine than this one.
ENGINE_ENV = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH",
              "DOCKER_TLS")
SSH_BINARY_ENV = "RUNNER_ENGINE_SSH"
SSH_CONFIG_ENV = "RUNNER_ENGINE_SSH_CONFIG"
WRAPPER = f"""#!/bin/sh
# The docker CLI runs `ssh` from PATH for an ssh:// engine: this runs the system's ssh with the
# build engine's settings (written by the runner, see pipelines/build_engine.py).
exec "${SSH_BINARY_ENV}" -F "${SSH_CONFIG_ENV}" "$@"
"""


class EngineProblem(Exception):
    """The build engine cannot be used. The message names it and says what to do."""


# ---------------------------------------------------------------------------------------------
# Pure parts


def _ssh_path(path: str) -> str:
    """A path as an ssh_config value: quoted (spaces), `%` doubled (ssh expands %-tokens in
    IdentityFile and UserKnownHostsFile). The model refuses quotes, backslashes, newlines."""
    return '"' + path.replace("%", "%%") + '"'


def ssh_config_text(address: EngineAddress, *, key_file: str | None, known_hosts: str | None,
                    connect_timeout: float) -> str:
    lines = [
        f"# Build engine {address.url}, written by the runner for `ssh -F`. These lines come",
        "# first so that they win; the user's and the system's files are included at the end.",
        "StrictHostKeyChecking yes",
        "BatchMode yes",
        "UpdateHostKeys no",
        f"ConnectTimeout {max(1, math.ceil(connect_timeout))}",
        # A build can be silent for minutes; a dead link is noticed within a minute.
        "ServerAliveInterval 15",
        "ServerAliveCountMax 4",
    ]
    if key_file:
        lines += [f"IdentityFile {_ssh_path(key_file)}", "IdentitiesOnly yes"]
    if known_hosts:
        lines += [f"UserKnownHostsFile {_ssh_path(known_hosts)}",
                  "GlobalKnownHostsFile /dev/null"]
    lines += ["Include ~/.ssh/config", "Include /etc/ssh/ssh_config", ""]
    return "\n".join(lines)


def ssh_argv(ssh: str, config: str, address: EngineAddress, command: list[str]) -> list[str]:
    """`command` run on the builder over ssh, with the runner's ssh config."""
    argv = [ssh, "-F", config, "-T"]
    if address.user:
        argv += ["-l", address.user]
    if address.port is not None:
        argv += ["-p", str(address.port)]
    return argv + ["--", address.host.strip("[]"), *command]


def ssh_dial_argv(ssh: str, config: str, address: EngineAddress) -> list[str]:
    """What the docker CLI's ssh transport runs, with the runner's ssh config: `docker system
    dial-stdio` on the builder joins this process's stdin/stdout to the builder's engine."""
    return ssh_argv(ssh, config, address, ["docker", "system", "dial-stdio"])


_SSH_HINTS = (
    ("REMOTE HOST IDENTIFICATION HAS CHANGED",
     "the builder's host key is not the one in {known_hosts}: refused. If the builder was "
     "really reinstalled, replace its line there with its new key, checked out of band"),
    ("host key verification failed",
     "the builder's host key is not in {known_hosts}: add the builder's line (from its "
     "/etc/ssh/ssh_host_*_key.pub, checked out of band); an unknown host key is never accepted"),
    ("permission denied (publickey",
     "the builder refused the login: check the user in the address and {key}"),
    ("connection refused", "nothing accepts ssh connections at that address and port"),
    ("connection timed out", "the builder did not answer (down, or a firewall drops the "
                             "connection)"),
    ("operation timed out", "the builder did not answer (down, or a firewall drops the "
                            "connection)"),
    ("no route to host", "no network route to the builder"),
    ("could not resolve hostname", "the builder's host name does not resolve"),
    ("not accessible: no such file", "the key file does not exist"),
    ("docker: command not found", "docker is not installed on the builder, or not on PATH "
                                  "for that user's ssh sessions"),
    ("docker: not found", "docker is not installed on the builder, or not on PATH for that "
                          "user's ssh sessions"),
    ("unknown command \"dial-stdio\"", "the builder's docker CLI is too old for `docker "
                                       "system dial-stdio` (needs 18.09 or later)"),
    ("permission denied while trying to connect to the docker daemon",
     "that user may not use the builder's engine: use root or a user in its `docker` group"),
    ("cannot connect to the docker daemon", "no docker engine is running on the builder (for "
                                            "that user's DOCKER_HOST)"),
)


def ssh_stderr(output: str) -> str:
    """What ssh itself said, out of a docker CLI's "error during connect: ... stderr=..." line
    (the whole output when there is no such part)."""
    marker = "stderr="
    at = output.find(marker)
    text = output[at + len(marker):] if at >= 0 else output
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def explain_ssh_failure(output: str, *, key_file: str | None,
                        known_hosts: str | None) -> str:
    """One sentence for a failed ssh connection to the builder: what ssh said, then what to
    do (the first known cause in `output`)."""
    said = ssh_stderr(output)
    low = said.lower()
    for needle, hint in _SSH_HINTS:
        if needle.lower() in low:
            hint = hint.format(known_hosts=known_hosts or "~/.ssh/known_hosts",
                               key=f"key_file {key_file}" if key_file else
                               "the keys of your ~/.ssh setup (or set key_file)")
            last = said.splitlines()[-1] if said else ""
            return f"{hint} (ssh said: {last})" if last else hint
    return said.splitlines()[-1] if said else "no answer"


_TLS_HINTS = (
    # The engine (or what terminates its TLS) refused the runner's certificate: Go says so, and
    # Python's ssl only sees the handshake cut.
    (("remote error: tls", "bad certificate", "unknown certificate authority",
      "sslv3 alert", "eof occurred in violation of protocol"),
     "the engine refused the runner's client certificate ({cert}): it must be signed by the "
     "CA the engine trusts (its --tlscacert)"),
    (("not valid for", "hostname mismatch", "doesn't match"),
     "the engine's certificate does not name {host}: use a name or address it holds"),
    (("signed by unknown authority", "certificate_verify_failed", "certificate verify failed"),
     "the engine's certificate is not signed by tls.ca {ca}"),
    (("connection refused",), "nothing listens at {host}:{port}"),
    (("timed out", "timeout"), "the engine did not answer (down, or a firewall drops the "
                               "connection)"),
    (("no route to host",), "no network route to the engine"),
    (("name or service not known", "no such host", "name resolution"),
     "the engine's host name does not resolve"),
)


def explain_tcp_failure(output: str, *, host: str, port: int | None, ca: str | None,
                        cert: str | None) -> str:
    """One sentence for a failed connection to a tcp:// engine (the CLI's output or the SDK's
    exception text): what to do, then the last line said."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    low = output.lower()
    for needles, hint in _TLS_HINTS:
        if any(n in low for n in needles) and (ca is not None or "{ca}" not in hint):
            hint = hint.format(host=host, port=port, ca=ca, cert=cert)
            return f"{hint} ({last})" if last else hint
    return last or "no answer"


# ---------------------------------------------------------------------------------------------
# The value


@dataclass(frozen=True)
class BuildEngine:
    """The engine of one pipeline; `settings` None is the runner's own engine."""

    settings: BuildEngineSettings | None = None

    @classmethod
    def of(cls, pipeline: Pipeline) -> BuildEngine:
        return cls(pipeline.stages.build.engine)

    @property
    def local(self) -> bool:
        return self.settings is None

    @property
    def label(self) -> str:
        """How messages name the engine."""
        if self.settings is None:
            return "the runner's own engine"
        return self.settings.address.url

    def _path(self, value: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(value)) if value else None

    @property
    def key_file(self) -> str | None:
        return self._path(self.settings.key_file) if self.settings else None

    @property
    def known_hosts(self) -> str | None:
        return self._path(self.settings.known_hosts) if self.settings else None

    def tls_files(self) -> tuple[str, str, str] | None:
        """(ca, cert, key) as absolute paths, or None without TLS."""
        tls = self.settings.tls if self.settings else None
        if not tls:
            return None
        return (self._path(tls.ca), self._path(tls.cert), self._path(tls.key))  # type: ignore

    def plan(self) -> dict[str, Any]:
        """For --dry-run: plain data, no I/O."""
        s = self.settings
        if s is None:
            return {"host": "local", "note": "the runner's own engine (DOCKER_HOST, else the "
                                             "default socket)"}
        out: dict[str, Any] = {"host": s.address.url}
        if s.address.scheme == SSH:
            out["key_file"] = s.key_file or "the user's ~/.ssh setup"
            out["known_hosts"] = s.known_hosts or "~/.ssh/known_hosts"
            out["host_keys"] = "strict (unknown or changed keys are refused)"
        elif s.tls:
            out["tls"] = {"ca": s.tls.ca, "cert": s.tls.cert, "key": s.tls.key}
        else:
            out["tls"] = False
        out["used_by"] = "build, scan (image export) and push (from that engine to the registry)"
        return out

    def describe(self) -> str:
        s = self.settings
        if s is None:
            host = os.environ.get("DOCKER_HOST")
            where = f"DOCKER_HOST={host}" if host else "the default socket"
            return f"the runner's own engine ({where})"
        if s.address.scheme == SSH:
            return (f"{s.address.url} over ssh (key {self.key_file or 'from ~/.ssh'}, host keys "
                    f"from {self.known_hosts or '~/.ssh/known_hosts'}, strictly checked)")
        if s.tls:
            return f"{s.address.url} over TLS (CA {self.tls_files()[0]})"  # type: ignore[index]
        return f"{s.address.url} over plain TCP (tls: false: unauthenticated, unencrypted)"

    def cli_args(self) -> list[str]:
        """The docker CLI's global flags (before the command) that choose this engine."""
        s = self.settings
        if s is None:
            return []
        argv = ["-H", s.address.url]
        files = self.tls_files()
        if files:
            ca, cert, key = files
            argv += ["--tlsverify", "--tlscacert", ca, "--tlscert", cert, "--tlskey", key]
        return argv

    def problems(self) -> list[str]:
        """Local files this engine needs that are missing or unreadable."""
        out: list[str] = []
        wanted = [("key_file", self.key_file), ("known_hosts", self.known_hosts)]
        files = self.tls_files()
        if files:
            wanted += list(zip(("tls.ca", "tls.cert", "tls.key"), files))
        for field, path in wanted:
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                out.append(f"stages.build.engine.{field} {path}: no readable file there")
        return out

    # -- what talks to the engine --------------------------------------------------------------

    def check_files(self) -> None:
        problems = self.problems()
        if problems:
            raise EngineProblem(f"build engine {self.label}: " + "; ".join(problems))

    def ssh_files(self, state_dir: Path) -> tuple[str, Path, Path]:
        """(ssh binary, wrapper directory, ssh config), written under `state_dir`."""
        assert self.settings is not None
        ssh = _system_ssh()
        if ssh is None:
            raise EngineProblem(f"build engine {self.label}: no `ssh` client on PATH (install "
                                "openssh-client)")
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        bindir = state_dir / "bin"
        bindir.mkdir(exist_ok=True, mode=0o700)
        config = state_dir / "ssh_config"
        _write(config, ssh_config_text(self.settings.address, key_file=self.key_file,
                                       known_hosts=self.known_hosts,
                                       connect_timeout=self.settings.connect_timeout), 0o600)
        _write(bindir / "ssh", WRAPPER, 0o700)
        return ssh, bindir, config

    def cli_env(self, state_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The whole environment for a docker CLI child that talks to this engine (with
        `cli_args()`): the caller's, without the variables that could point it elsewhere, plus
        for ssh the wrapper first on PATH."""
        env = dict(os.environ if base is None else base)
        if self.settings is None:
            return env
        self.check_files()
        for name in ENGINE_ENV:
            env.pop(name, None)
        if self.settings.address.scheme == SSH:
            ssh, bindir, config = self.ssh_files(state_dir)
            env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", os.defpath)
            env[SSH_BINARY_ENV] = ssh
            env[SSH_CONFIG_ENV] = str(config)
        return env

    def explain(self, output: str) -> str:
        """A failed connection's output (the CLI's or ssh's) as one actionable sentence."""
        s = self.settings
        if s is not None and s.address.scheme == SSH:
            return explain_ssh_failure(output, key_file=self.key_file,
                                       known_hosts=self.known_hosts)
        if s is not None:
            files = self.tls_files()
            return explain_tcp_failure(output, host=s.address.host, port=s.address.port,
                                       ca=files[0] if files else None,
                                       cert=files[1] if files else None)
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        return lines[-1] if lines else "no answer"

    def client(self, state_dir: Path, timeout: int = 60) -> docker.DockerClient:
        """A docker SDK client of this engine, already connected (its API version asked).
        Raises pipelines.engine_sdk.EngineError (a DockerException) naming the engine when it
        cannot be reached."""
        from pipelines.engine_sdk import sdk_client  # the SDK only where a stage needs it

        return sdk_client(self, state_dir, timeout)


def engine_client(ctx: StageContext, timeout: int = 60) -> docker.DockerClient:
    """The docker SDK client of the engine that built this run's image (scan, push)."""
    return BuildEngine.of(ctx.pipeline).client(Path(ctx.workdir) / "engine", timeout=timeout)


def _system_ssh() -> str | None:
    """The first `ssh` on PATH that is not a wrapper of this module (a PATH inherited from a
    docker CLI child would otherwise make the wrapper run itself)."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which("ssh", path=d) if d else None
        if found is None:
            continue
        try:
            with open(found, "rb") as f:
                if f.read(len(WRAPPER)) == WRAPPER.encode():
                    continue
        except OSError:
            continue
        return found
    return None


def _write(path: Path, text: str, mode: int) -> None:
    """Write atomically (a concurrent reader sees the old file or the new one) with `mode`."""
    try:
        if path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
