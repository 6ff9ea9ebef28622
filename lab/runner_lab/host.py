"""What the lab does to this machine: checks, packages, commands, long-lived processes, probes.

Every process is started from an argv list, recorded as (pid, start time) and stopped by that pid
only; the start time guards against a pid reused by an unrelated process. Starting and stopping
themselves are runner.proc's (start_detached, stop); here are the lab's records of them.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

from runner_lab import layout
from runner_lab.errors import LabError, Unsupported
from runner.proc import Recorded, reap_child, start_detached, start_time
from runner.proc import stop as stop_process

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


# ---- machine checks and packages -----------------------------------------------------------

def require_supported() -> None:
    if not sys.platform.startswith("linux"):
        raise Unsupported(f"the lab needs Linux (network namespaces, dockerd); this is {sys.platform}")
    if os.geteuid() != 0:
        raise Unsupported("the lab needs root (network namespaces, bridges, dockerd): "
                          "run it as root, e.g. `sudo python -m runner lab up`")
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        raise Unsupported("the lab installs its parts with apt-get: it needs Debian 12 (bookworm) "
                          "or a compatible system")


def missing_packages(packages: Sequence[str] = layout.SYSTEM_PACKAGES) -> list[str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
        capture_output=True, text=True,
    )
    installed = {line.split()[0] for line in proc.stdout.splitlines()
                 if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def ensure_packages(log: Log) -> None:
    """Install the Debian packages the lab runs (same list as scripts/install-system)."""
    missing = missing_packages()
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n"
                           f"{_tail(proc.stdout + proc.stderr)}")


# ---- commands ------------------------------------------------------------------------------

def run(argv: Sequence[str], *, check: bool = True, timeout: float = 120,
        stdin: bytes | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run argv to its end; `env` is added to this process's environment."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                              cwd=cwd, env=dict(os.environ, **env) if env else None)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        raise LabError(f"{' '.join(argv)} failed (exit {proc.returncode}): {_tail(out)}")
    return proc


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no log)"


# ---- processes -----------------------------------------------------------------------------

def alive(rec: dict | None) -> bool:
    """The recorded process (a state.json record: pid, start) still runs."""
    return bool(rec) and Recorded(rec["pid"], rec["start"]).running()


def spawn(argv: Sequence[str], log_path: Path, user: str | None = None) -> dict:
    """Start a long-lived process in its own session (it outlives this command), output to
    log_path. Returns its record for state.json: pid, start, argv, log.

    With `user`, the process runs as that user, so the record is the program's own pid (see
    runner.proc.start_detached). The log file is opened here, as root."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        rec = start_detached(argv, out, user=user)
    return {"pid": rec.pid, "start": rec.start, "argv": list(argv), "log": str(log_path)}


def stop(rec: dict | None, timeout: float = 20.0, first: int = signal.SIGTERM) -> None:
    """`first` (SIGTERM), wait `timeout`, then SIGKILL and 5 s more: only the recorded process,
    only if it is still that one. Reaped when it is a child of this process (spawn let its Popen
    go)."""
    if rec:
        stop_process(Recorded(rec["pid"], rec["start"]),
                     ((first, timeout), (signal.SIGKILL, 5.0)), reap=True)


def _read_cmdline(pid: int | str) -> list[str] | None:
    """/proc/PID/cmdline as argv ([] for a kernel thread or zombie), None if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0") if raw else []


def _cmdlines() -> Iterator[tuple[int, list[str]]]:
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        argv = _read_cmdline(entry.name)
        if argv:
            yield int(entry.name), argv


def cmdline(rec: dict | None) -> list[str] | None:
    """The argv the recorded process runs now (after any exec), or None if it is gone."""
    return _read_cmdline(rec["pid"]) if alive(rec) else None


def outdated(rec: dict | None, wanted: list[str]) -> bool:
    """A live process that runs another command line than `up` would start now (a lab
    brought up by an older version, e.g. without a registry that is insecure now)."""
    running = cmdline(rec)
    return running is not None and not layout.runs_as_started(running, wanted)


def _record_of(pid: int, argv: list[str]) -> dict | None:
    st = start_time(pid)
    return None if st is None else {"pid": pid, "start": st, "argv": argv}


def pids_using(prefixes: Sequence[str]) -> list[dict]:
    """Processes with an argument naming a path under one of `prefixes` (the lab's own exec-root
    dirs): containerd and shims left behind by a dockerd that was killed."""
    found = []
    for pid, argv in _cmdlines():
        args = [a.split("=", 1)[1] if a.startswith("-") and "=" in a else a for a in argv]
        if any(a.startswith(p) for a in args for p in prefixes):
            rec = _record_of(pid, argv)
            if rec:
                found.append(rec)
    return found


def pids_with_arg(marker: str, exe: str) -> list[dict]:
    """Processes of program `exe` with the lab's own path `marker` as an argument: one of ours
    whose record was lost."""
    found = []
    for pid, argv in _cmdlines():
        if len(argv) == 1:
            # a process title such as "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ..."
            argv = argv[0].split()
        if os.path.basename(argv[0]).rstrip(":") != exe:
            continue
        if marker in argv or any(a.endswith(f"={marker}") for a in argv):
            rec = _record_of(pid, argv)
            if rec:
                found.append(rec)
    return found


def pids_in_dir(directory: Path) -> list[dict]:
    """Processes whose working directory is `directory`: every process of a PostgreSQL cluster
    works in its data dir, so these are the backends a killed postmaster left behind (they end by
    themselves once they notice, but hold the cluster until then)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == str(directory):
            rec = _record_of(int(entry.name), _read_cmdline(entry.name) or [])
            if rec:
                found.append(rec)
    return found


def children(pid: int) -> list[dict]:
    """Records of pid's direct children (an sshd listener's per-connection processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            rec = _record_of(int(entry.name), [])
            if rec:
                found.append(rec)
    return found


def stop_all(recs: Sequence[dict], timeout: float = 10.0) -> None:
    threads = [threading.Thread(target=stop, args=(r, timeout)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def remove_stale_pidfiles(pidfile: Path, exec_root: Path) -> None:
    """dockerd refuses to start while its pid file names an existing pid, and waits for "still
    running" containerd named in exec-root; a killed one stays a zombie until init reaps it (slow
    here). Called once no process of ours is left (checked by the caller): both files are stale."""
    pidfile.unlink(missing_ok=True)
    (exec_root / "containerd" / "containerd.pid").unlink(missing_ok=True)


def unmount_under(prefixes: Sequence[Path]) -> None:
    """Lazily unmount whatever a killed dockerd left mounted under the lab's own dirs."""
    points = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if any(point.startswith(str(p) + "/") for p in prefixes):
                points.append(point)
    except OSError:
        return
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


# ---- probes --------------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def docker_api(sock: Path, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET path from the engine at unix socket `sock`; (0, b"") if it does not answer."""
    conn = _UnixHTTPConnection(str(sock), timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def docker_ready(sock: Path) -> bool:
    status, body = docker_api(sock, "/_ping", timeout=2.0)
    return status == 200 and body.strip() == b"OK"


def image_exists(sock: Path, ref: str) -> bool:
    status, _ = docker_api(sock, f"/images/{quote(ref, safe='')}/json")
    return status == 200


def docker_info(sock: Path) -> dict:
    status, body = docker_api(sock, "/info", timeout=5.0)
    return json.loads(body) if status == 200 else {}


def registry_ready(port: int = layout.REGISTRY_PORT, auth: tuple[str, str] | None = None,
                   timeout: float = 2.0) -> bool:
    """The registry on the bridge address answers /v2/ with 200 (with `auth`: accepts that
    login, which also proves its htpasswd matches the password file)."""
    headers = _basic_auth(auth)
    conn = http.client.HTTPConnection(layout.BRIDGE_IP, port, timeout=timeout)
    try:
        conn.request("GET", "/v2/", headers=headers)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _basic_auth(auth: tuple[str, str] | None) -> dict[str, str]:
    """The Authorization header of a Basic login (user, password); {} for None."""
    if auth is None:
        return {}
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _http_get(host: str, port: int, path: str, headers: dict[str, str],
              timeout: float) -> tuple[int, bytes]:
    """GET http://host:port/path: (status, body), or (0, b"") if it does not answer."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def token_issuer_token(auth: tuple[str, str] | None = None, timeout: float = 2.0) -> str | None:
    """A token from the lab's issuer (with `auth`: for that login, else anonymous), or None when
    it does not answer or refuses the login."""
    headers = _basic_auth(auth)
    status, body = _http_get("127.0.0.1", layout.TOKEN_ISSUER_PORT,
                             f"/token?service={quote(layout.TOKEN_SERVICE)}", headers, timeout)
    if status != 200:
        return None
    try:
        return json.loads(body).get("token") or None
    except (ValueError, AttributeError):
        return None


def token_registry_ready(auth: tuple[str, str], timeout: float = 2.0) -> bool:
    """The token registry accepts a token the issuer gave `auth` (GET /v2/ with it: 200), which
    proves both answer, the issuer accepts the login, and the registry trusts the issuer's key."""
    token = token_issuer_token(auth, timeout)
    if token is None:
        return False
    status, _ = _http_get("127.0.0.1", layout.TOKEN_REGISTRY_PORT, "/v2/",
                          {"Authorization": f"Bearer {token}"}, timeout)
    return status == 200


MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


def _registry_get(path: str, port: int, timeout: float) -> tuple[int, bytes]:
    return _http_get(layout.BRIDGE_IP, port, path, {"Accept": MANIFEST_TYPES}, timeout)


def registry_image_labels(repo: str, tag: str, port: int = layout.REGISTRY_PORT,
                          timeout: float = 3.0) -> dict | None:
    """The labels of image repo:tag in the registry on the bridge address (its manifest, then its
    config blob); None when the registry does not have it. A multi-platform index has no labels
    of its own: {}."""
    status, body = _registry_get(f"/v2/{repo}/manifests/{quote(tag, safe='')}", port, timeout)
    if status != 200:
        return None
    try:
        digest = json.loads(body)["config"]["digest"]
    except (ValueError, KeyError, TypeError):
        return {}
    status, body = _registry_get(f"/v2/{repo}/blobs/{digest}", port, timeout)
    if status != 200:
        return None
    try:
        return (json.loads(body).get("config") or {}).get("Labels") or {}
    except (ValueError, AttributeError):
        return {}


def image_labels(sock: Path, ref: str) -> dict | None:
    """The labels of image `ref` on the engine at `sock`; None when it does not have it."""
    status, body = docker_api(sock, f"/images/{quote(ref, safe='')}/json")
    if status != 200:
        return None
    try:
        return (json.loads(body).get("Config") or {}).get("Labels") or {}
    except (ValueError, AttributeError):
        return {}


def psycopg():
    """psycopg 3, imported only where the lab talks to its PostgreSQL."""
    try:
        import psycopg as module
    except ImportError as exc:
        raise LabError("the lab's PostgreSQL is checked and set up with psycopg 3, which is not "
                       "installed in this Python: pip install 'psycopg[binary]'") from exc
    return module


def postgres_login(password: str | None, timeout: float = 2.0) -> bool:
    """The lab's role logs in to its database over 127.0.0.1 with `password` (which proves
    the server answers, its pg_hba.conf lets the role in over TCP, and the role's stored password
    matches the password file) and runs a query."""
    if not password:
        return False
    pg = psycopg()
    try:
        with pg.connect(host=layout.POSTGRES_HOST, port=layout.POSTGRES_PORT,
                        user=layout.POSTGRES_USER, password=password, dbname=layout.POSTGRES_DB,
                        connect_timeout=max(2, int(timeout)), application_name="runner-lab") as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except (pg.Error, OSError):
        return False


def postgres_superuser(timeout: int = 5):
    """A connection as the cluster's superuser over the lab's own socket (peer login; pg_ident.conf
    maps root to postgres), autocommit: for CREATE ROLE and CREATE DATABASE."""
    pg = psycopg()
    try:
        return pg.connect(host=str(layout.POSTGRES_SOCKET_DIR), port=layout.POSTGRES_PORT,
                          user=layout.POSTGRES_OS_USER, dbname="postgres",
                          connect_timeout=max(2, timeout), autocommit=True,
                          application_name="runner-lab")
    except (pg.Error, OSError) as exc:
        raise LabError(f"cannot log in to the lab's PostgreSQL as {layout.POSTGRES_OS_USER} over "
                       f"{layout.POSTGRES_SOCKET_DIR}: {exc}") from exc


def postgres_answers() -> bool:
    """The postmaster accepts a session and runs a query (also before the lab's role exists)."""
    pg = psycopg()
    try:
        with postgres_superuser(timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except (LabError, pg.Error, OSError):
        return False


def ssh_banner(host: str, port: int = 22, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_for(probe: Callable[[], bool], what: str, timeout: float, rec: dict | None = None,
             log_path: Path | None = None) -> None:
    """Poll probe until it passes; fail early if the process that should answer has died."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if rec is not None and not alive(rec):
            reap_child(rec["pid"])
            raise LabError(f"{what} exited while starting; its log ({log_path}):\n"
                           f"{log_tail(log_path) if log_path else ''}")
        if time.monotonic() > deadline:
            raise LabError(f"{what} not ready after {timeout:.0f}s; its log ({log_path}):\n"
                           f"{log_tail(log_path) if log_path else ''}")
        time.sleep(0.2)


def answers(probe: Callable[[], bool], timeout: float) -> bool:
    """Poll probe until it passes (True) or `timeout` seconds have gone by (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


# ---- network state -------------------------------------------------------------------------

def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def link_master(name: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{name}/master"))
    except OSError:
        return None


def link_up(name: str) -> bool:
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
    except OSError:
        return False
    return bool(flags & 0x1)


def link_has_addr(name: str, cidr: str) -> bool:
    proc = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", name],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return False
    ip, prefix = cidr.split("/")
    for link in json.loads(proc.stdout or "[]"):
        for a in link.get("addr_info", []):
            if a.get("local") == ip and str(a.get("prefixlen")) == prefix:
                return True
    return False


def netns_exists(name: str) -> bool:
    return Path(f"/var/run/netns/{name}").exists()


def fw_chain_present() -> bool:
    proc = subprocess.run(["iptables", "-w", "-C", "FORWARD", "-j", layout.FW_CHAIN],
                          capture_output=True)
    return proc.returncode == 0


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` (atomically) unless it already holds exactly that. True when it
    was written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True
