"""The user's own OpenSSH client settings (~/.ssh/config), read through paramiko's SSHConfig.

`UserConfig.load()` reads ~/.ssh/config once (its only I/O, with the files it Includes) and
notes $SSH_AUTH_SOCK; `lookup(name)` then says, purely, what OpenSSH would use for a host
written as `name`: HostName, User, Port, IdentityFile (+ IdentitiesOnly), IdentityAgent,
ProxyJump, UserKnownHostsFile / GlobalKnownHostsFile and HostKeyAlias. Matching is paramiko's
(Host patterns with `!` and wildcards, Match host/user/originalhost/final, the first value of
a setting wins, IdentityFile values add up, %h %p %r ~ are expanded).

- `Include` is followed: paramiko's parser would keep it as an unknown setting and silently
  read nothing more. An Include at the top level (the usual `Include ~/.ssh/config.d/*`) is
  exact; one inside a Host or Match block is exact only when the included files hold settings
  alone, so included Host or Match lines there are refused rather than read another way.
- Things the runner will not do are refused with the reason, never ignored: ProxyCommand (no
  command from the config is run; ProxyJump does the same job), Match exec (same reason).
  A refusal is carried as `HostEntry.problem`: a server whose settings cannot be read fails,
  naming the server and the line, and no other server is affected.
- Only ~/.ssh/config is read, not /etc/ssh/ssh_config: the deploy's settings should not change
  with the machine's system-wide defaults. Known host keys, though, come from both the user's
  and the system's known_hosts files, as OpenSSH reads them.

How these values rank against the pipeline's own settings is deployers.spec.resolve_target.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import paramiko

from runner.model.deploy import parse_server

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")  # in ~/.ssh, tried in this order
USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_MAX_INCLUDE_DEPTH = 16  # OpenSSH's own limit
_BLOCK_RE = re.compile(r"^\s*(host|match)(\s*=\s*|\s+)", re.I)
_INCLUDE_RE = re.compile(r"^\s*include(\s*=\s*|\s+)(.*)$", re.I)


@dataclass(frozen=True)
class Hop:
    """One jump host of a ProxyJump list, as written (`[user@]host[:port]`)."""

    host: str
    user: str | None = None
    port: int | None = None


def parse_hops(text: str) -> tuple[Hop, ...]:
    """'bastion,deploy@10.0.0.5:2222' (ssh:// allowed) -> hops, first to connect to first.
    'none' -> (). Raises ValueError."""
    if text.strip().lower() == "none":
        return ()
    hops = []
    for part in text.split(","):
        part = part.strip()
        if part.lower().startswith("ssh://"):
            part = part[len("ssh://"):].rstrip("/")
        if not part:
            raise ValueError(f"ProxyJump {text!r}: an empty jump host")
        try:
            d = parse_server(part)
        except ValueError as exc:
            raise ValueError(f"ProxyJump {text!r}: {exc}") from None
        hops.append(Hop(host=d["host"], user=d.get("user"), port=d.get("port")))
    return tuple(hops)


@dataclass(frozen=True)
class HostEntry:
    """What ~/.ssh/config says for one host name. `problem`: why it cannot be used."""

    name: str
    hostname: str
    user: str | None = None
    port: int | None = None
    identity_files: tuple[str, ...] = ()
    identity_default: bool = True  # no IdentityFile: the default ~/.ssh/id_* files
    identities_only: bool = False
    agent: str | None = None  # the ssh-agent socket; None: no agent
    proxy_jump: tuple[Hop, ...] | None = None  # None: not set; (): `ProxyJump none`
    proxy_command: str | None = None
    known_hosts: tuple[str, ...] = ()  # user files, then the system's
    host_key_alias: str | None = None
    problem: str | None = None


class _MatchExec(Exception):
    pass


class _NoExecConfig(paramiko.SSHConfig):
    """paramiko's SSHConfig, except that a `Match exec` it would run is refused instead
    (paramiko runs it through invoke, when that is installed, as a shell command). The
    criteria before `exec` are still checked first: a block that does not apply by them
    refuses nothing, as OpenSSH would not run its command either."""

    def _does_match(self, match_list, target_hostname, canonical, final, options):
        for i, candidate in enumerate(match_list):
            if candidate["type"] == "exec":
                before = match_list[:i]
                if before and not super()._does_match(before, target_hostname, canonical,
                                                      final, options):
                    return False
                raise _MatchExec(candidate["param"])
        return super()._does_match(match_list, target_hostname, canonical, final, options)


class UserConfig:
    """~/.ssh/config as loaded (or text given directly, for tests), plus $SSH_AUTH_SOCK."""

    def __init__(self, text: str = "", *, home: str | None = None,
                 agent_socket: str | None = None, path: str | None = None,
                 environ: dict[str, str] | None = None, error: str | None = None):
        self.home = home or os.path.expanduser("~")
        self.path = path or str(Path(self.home) / ".ssh" / "config")
        self.agent_socket = agent_socket
        self.environ = dict(environ) if environ is not None else {}
        self.error = error
        self._config: paramiko.SSHConfig = _NoExecConfig()
        if text and error is None:
            try:
                self._config = _NoExecConfig.from_text(text)
            except (paramiko.SSHException, ValueError) as exc:
                self.error = f"{self.path}: {exc}"

    @classmethod
    def load(cls, environ: dict[str, str] | None = None) -> UserConfig:
        """The running user's ~/.ssh/config (none there: no settings) and ssh-agent socket."""
        env = dict(os.environ if environ is None else environ)
        home = os.path.expanduser("~")
        path = Path(home) / ".ssh" / "config"
        sock = env.get("SSH_AUTH_SOCK") or None
        try:
            text = _read_with_includes(path, Path(home) / ".ssh", 0, None)
        except FileNotFoundError:
            return cls("", home=home, agent_socket=sock, path=str(path), environ=env)
        except (OSError, ValueError) as exc:
            return cls("", home=home, agent_socket=sock, path=str(path), environ=env,
                       error=str(exc))
        return cls(text, home=home, agent_socket=sock, path=str(path), environ=env)

    def lookup(self, name: str) -> HostEntry:
        if self.error:
            return HostEntry(name=name, hostname=name, problem=f"cannot read ~/.ssh/config: "
                                                               f"{self.error}")
        try:
            o = self._config.lookup(name)
        except _MatchExec as exc:
            return HostEntry(name=name, hostname=name, problem=(
                f"{self.path}: `Match exec {exc}` would decide settings for {name}; the "
                f"runner runs no command from ~/.ssh/config (use Host or Match host instead)"))
        except (paramiko.SSHException, ValueError, OSError) as exc:
            return HostEntry(name=name, hostname=name, problem=f"{self.path}: {exc}")
        problem = None
        port = None
        if "port" in o:
            try:
                port = int(o["port"])
                if not 1 <= port <= 65535:
                    raise ValueError
            except ValueError:
                problem = f"{self.path}: Port {o['port']!r} for {name} is not a port number"
                port = None
        jump = None
        if "proxyjump" in o:
            try:
                jump = parse_hops(o["proxyjump"])
            except ValueError as exc:
                problem = f"{self.path}: {exc}"
        command = o.get("proxycommand") or None
        user = o.get("user")
        hostname = o.get("hostname", name)
        port_s = str(port or 22)

        def expand(value: str) -> str:
            return self._expand(value, name, hostname, port_s, user)
        files = tuple(expand(p) for p in o.get("identityfile", ()) if p.lower() != "none")
        return HostEntry(
            name=name, hostname=hostname, user=user, port=port,
            identity_files=files or self._defaults(),
            identity_default=not files,
            identities_only=o.get("identitiesonly", "no").lower() == "yes",
            agent=self._agent(o.get("identityagent"), expand),
            proxy_jump=jump, proxy_command=command,
            known_hosts=self._known_hosts(o.get("userknownhostsfile"),
                                          o.get("globalknownhostsfile"), expand),
            host_key_alias=o.get("hostkeyalias") or None,
            problem=problem)

    # ------------------------------------------------------------------ values

    def _defaults(self) -> tuple[str, ...]:
        return tuple(str(Path(self.home) / ".ssh" / n) for n in DEFAULT_IDENTITIES)

    def _expand(self, value: str, name: str, hostname: str, port: str,
                user: str | None) -> str:
        """~ and the %-tokens OpenSSH allows in file settings (paramiko expands only some)."""
        tokens = {"%": "%", "d": self.home, "u": _local_user(), "h": hostname, "n": name,
                  "p": port, "r": user or _local_user()}
        text = re.sub(r"%(.)", lambda m: tokens.get(m.group(1), m.group(0)), value)
        if text == "~" or text.startswith("~/"):
            text = self.home + text[1:]
        return text

    def _agent(self, value: str | None, expand) -> str | None:
        if value is None or value == "SSH_AUTH_SOCK":
            return self.agent_socket
        if value.lower() == "none":
            return None
        if value.startswith("$"):
            return self.environ.get(value[1:].strip("{}")) or None
        return expand(value)

    def _known_hosts(self, user_files: str | None, global_files: str | None,
                     expand) -> tuple[str, ...]:
        out: list[str] = []
        for spec, default in ((user_files, USER_KNOWN_HOSTS),
                              (global_files, GLOBAL_KNOWN_HOSTS)):
            for word in (spec.split() if spec else default):
                path = expand(word)
                if word.lower() != "none" and path not in out:
                    out.append(path)
        return tuple(out)


def _local_user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root"


def _read_with_includes(path: Path, base: Path, depth: int, header: str | None) -> str:
    """The config text with every Include replaced by the files it names (sorted glob
    matches; a relative name is taken in ~/.ssh). `header`: the Host or Match line the file
    is included under (None: the top level).

    OpenSSH reads an included file in the block its Include is in, and afterwards goes on in
    that same block: here the block's line is written again after the included text (`Host *`
    at the top level, which is what paramiko makes of the top level too). Raises
    FileNotFoundError for a missing top file, ValueError for an Include this inlining would
    read differently from OpenSSH."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise ValueError(f"{path}: Include nested more than {_MAX_INCLUDE_DEPTH} deep")
    out: list[str] = []
    current = header
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if _BLOCK_RE.match(line):
            if header is not None:
                # OpenSSH would skip such a Host block wholesale when the outer block does
                # not match; inlined, it would apply on its own.
                raise ValueError(f"{path}:{n}: a Host or Match line in a file included from "
                                 f"inside a Host or Match block is not supported (move that "
                                 f"Include to the top level of ~/.ssh/config)")
            current = line.strip()
        m = _INCLUDE_RE.match(line)
        if not m:
            out.append(line)
            continue
        try:
            words = shlex.split(m.group(2))
        except ValueError:
            raise ValueError(f"{path}:{n}: cannot read this Include line") from None
        for word in words:
            pattern = os.path.expanduser(word)
            if not os.path.isabs(pattern):
                pattern = str(base / pattern)
            for found in sorted(glob.glob(pattern)):
                if os.path.isfile(found):
                    out.append(f"# {path}:{n}: Include {found}")
                    out.append(_read_with_includes(Path(found), base, depth + 1, current))
        out.append(current or "Host *")
    return "\n".join(out) + "\n"
