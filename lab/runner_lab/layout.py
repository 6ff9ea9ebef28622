"""The lab's fixed layout: names, addresses, paths, and the exact commands and config files that
make each part. Pure: nothing here touches the machine, so all of it is checked by equality.

The tests, the bench and `runner lab env` depend on these names and paths: they are a contract.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SUBNET = "10.87.53.0/24"
BRIDGE = "rlab0"
BRIDGE_IP = "10.87.53.1"
PREFIX = 24
REGISTRY_PORT = 5000
REGISTRY = f"{BRIDGE_IP}:{REGISTRY_PORT}"
# A second registry that requires a login (htpasswd), for the push and deploy paths with
# credentials. Its password is made once per state dir and kept in a 0600 file.
AUTH_REGISTRY_PORT = 5001
AUTH_REGISTRY = f"{BRIDGE_IP}:{AUTH_REGISTRY_PORT}"
AUTH_REGISTRY_USER = "lab"
# Every lab engine talks plain HTTP to these.
INSECURE_REGISTRIES = (REGISTRY, AUTH_REGISTRY)
# A registry with token auth, as Docker Hub, GHCR and GitLab answer (a Bearer challenge naming a
# token endpoint), and the lab's own token issuer (runner_lab/token_issuer.py) as that endpoint.
# Both on loopback: every engine treats 127.0.0.0/8 as insecure already, so no engine needs a new
# flag (nor a restart); only the host's build engine pushes there, the servers cannot reach it.
TOKEN_REGISTRY_PORT = 5002
TOKEN_REGISTRY = f"127.0.0.1:{TOKEN_REGISTRY_PORT}"
TOKEN_ISSUER_PORT = 5003
TOKEN_ISSUER_LISTEN = f"127.0.0.1:{TOKEN_ISSUER_PORT}"
TOKEN_REALM = f"http://{TOKEN_ISSUER_LISTEN}/token"
TOKEN_SERVICE = "runner-lab-registry"  # the registry's `auth.token.service`: the tokens' aud
TOKEN_ISSUER = "runner-lab-token-issuer"  # `auth.token.issuer`: the tokens' iss
TOKEN_REGISTRY_USER = "lab"
# May push but not read (the issuer grants it pull only together with push), with the same
# password: a push whose verification is refused for lack of read rights.
TOKEN_REGISTRY_PUSH_ONLY_USER = "lab-pushonly"
RUN_DIR = Path("/run/runner-lab")
BUILD_SOCK = RUN_DIR / "docker.sock"
BUILD_DOCKER_HOST = f"unix://{BUILD_SOCK}"
# The build engine's own container bridge (RUN steps of builds go through it, NAT to the outside
# for package registries). Kept apart from rlab0 so the servers' network only holds servers.
BUILD_BRIDGE = "rlabb0"
BUILD_BRIDGE_CIDR = "10.87.54.1/24"
# The chain holding the lab's forwarding rules; one jump from FORWARD, removed by `down`.
FW_CHAIN = "RLAB-FORWARD"
MAX_SERVERS = 200
SSH_USER = "root"
SSH_PORT = 22
BUSYBOX_IMAGE = "local/busybox:1"
PYTHON_IMAGE = "local/python:3.11"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The reverse proxy the servers run (issue 10): Debian's caddy binary (glibc, so on the python
# base image) in an image pushed to the lab registry, pulled by the servers like any image.
PROXY_PACKAGE = "caddy"
PROXY_IMAGE_REPO = "runner/caddy"
PROXY_IMAGE_TAG = "2"
PROXY_IMAGE = f"{REGISTRY}/{PROXY_IMAGE_REPO}:{PROXY_IMAGE_TAG}"
PROXY_INIT_CONFIG = "/etc/caddy/init.json"
PROXY_RECIPE_LABEL = "runner.lab.recipe"  # a label of images already made: kept when the lab moved to runner_lab
# Debian's 20.10 CLI: its built-in BuildKit works with DOCKER_BUILDKIT=1 (the newer CLI in
# /usr/local/bin has no buildx plugin).
BUILDKIT_DOCKER_CLI = "/usr/bin/docker"
# PostgreSQL (issue 11): a cluster of the lab's own (initdb under the state dir), not Debian's
# packaged "15 main" on 5432, which the lab neither uses nor touches. initdb and postgres refuse
# to run as root: they run as the packaged OS user.
POSTGRES_PACKAGE = "postgresql"
POSTGRES_VERSION = "15"
POSTGRES_BIN = Path(f"/usr/lib/postgresql/{POSTGRES_VERSION}/bin")
POSTGRES_OS_USER = "postgres"
POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 55432
POSTGRES_USER = "runner"
POSTGRES_DB = "runner"
POSTGRES_SOCKET_DIR = RUN_DIR / "postgres"
SYSTEM_PACKAGES = ("docker.io", "docker-registry", "openssh-server", "busybox-static",
                   "debootstrap", "iproute2", "git", "ca-certificates", POSTGRES_PACKAGE)


def state_dir() -> Path:
    return Path(os.environ.get("RUNNER_LAB_DIR") or "/var/lib/runner-lab").absolute()


@dataclass(frozen=True)
class LabServer:
    """Server number `index` (1-based) of the lab, and every name and path that belongs to it."""

    index: int
    state: Path  # the lab's state dir

    @property
    def name(self) -> str:
        return f"srv{self.index}"

    @property
    def ip(self) -> str:
        return f"10.87.53.{10 + self.index}"

    @property
    def netns(self) -> str:
        return f"rlab-{self.name}"

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def veth(self) -> str:
        return f"rlab-v{self.index}"

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / self.name

    @property
    def sock(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.sock}"

    @property
    def dir(self) -> Path:
        return self.state / self.name

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def sshd_config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def daemon_json(self) -> Path:
        return self.dir / "daemon.json"


def server_from_name(name: str, state: Path) -> LabServer:
    if not name.startswith("srv") or not name[3:].isdigit():
        raise ValueError(f"not a lab server name: {name!r}")
    return LabServer(int(name[3:]), state)


def client_key(state: Path) -> Path:
    return state / "ssh" / "id_ed25519"


def known_hosts(state: Path) -> Path:
    return state / "ssh" / "known_hosts"


def auth_registry_password_file(state: Path) -> Path:
    return state / "auth-registry.password"


def auth_registry_htpasswd(state: Path) -> Path:
    return state / "auth-registry.htpasswd"


def token_registry_password_file(state: Path) -> Path:
    return state / "token-registry.password"


def token_registry_htpasswd(state: Path) -> Path:
    """The token issuer's users (bcrypt), read by the issuer at every request."""
    return state / "token-registry.htpasswd"


def token_issuer_dir(state: Path) -> Path:
    """The issuer's signing key (key.pem, 0600) and its self-signed certificate (cert.pem, the
    registry's rootcertbundle); made once, kept across down/up."""
    return state / "token-issuer"


def token_issuer_config_file(state: Path) -> Path:
    return state / "token-issuer.json"


def postgres_dir(state: Path) -> Path:
    """The lab's own files of its cluster (pg_hba.conf, pg_ident.conf; root's, world-readable)."""
    return state / "postgres"


def postgres_data(state: Path) -> Path:
    """The cluster's data dir (the postgres user's, 0700)."""
    return postgres_dir(state) / "data"


def postgres_password_file(state: Path) -> Path:
    return state / "postgres.password"


def database_url(password: str) -> str:
    return (f"postgresql://{POSTGRES_USER}:{quote(password, safe='')}@{POSTGRES_HOST}:"
            f"{POSTGRES_PORT}/{POSTGRES_DB}")


def masked_database_url() -> str:
    """The URL for a human line: the password never printed."""
    return f"postgresql://{POSTGRES_USER}:****@{POSTGRES_HOST}:{POSTGRES_PORT}/{POSTGRES_DB}"


def python_rootfs_cache(state: Path) -> Path:
    return state / "cache" / f"python-{DEBIAN_SUITE}-rootfs.tar"


def proxy_cache(state: Path) -> Path:
    """Where the caddy .deb is downloaded and its binary kept (the image's build context)."""
    return state / "cache" / "caddy"


def describe(state: Path, servers: list[LabServer], db_password: str | None = None) -> dict:
    """The JSON `runner lab up --json` prints: everything a client needs to use the lab.
    `database_url` carries the password (None until `up` made it); `database` names its file."""
    return {
        "registry": REGISTRY,
        "auth_registry": {
            "address": AUTH_REGISTRY,
            "username": AUTH_REGISTRY_USER,
            "password_file": str(auth_registry_password_file(state)),
        },
        "token_registry": {
            "address": TOKEN_REGISTRY,
            "username": TOKEN_REGISTRY_USER,
            "push_only_username": TOKEN_REGISTRY_PUSH_ONLY_USER,
            "password_file": str(token_registry_password_file(state)),
            "realm": TOKEN_REALM,
            "service": TOKEN_SERVICE,
        },
        "docker_host": BUILD_DOCKER_HOST,
        "proxy_image": PROXY_IMAGE,
        "database_url": database_url(db_password) if db_password else None,
        "database": {
            "host": POSTGRES_HOST,
            "port": POSTGRES_PORT,
            "user": POSTGRES_USER,
            "name": POSTGRES_DB,
            "password_file": str(postgres_password_file(state)),
        },
        "servers": [
            {
                "name": s.name,
                "host": s.ip,
                "port": SSH_PORT,
                "user": SSH_USER,
                "key_file": str(client_key(state)),
                "known_hosts": str(known_hosts(state)),
                "docker_host": s.docker_host,
            }
            for s in servers
        ],
    }


def env_lines(info: dict) -> list[str]:
    """`export NAME=value` lines for a shell, every value quoted in this one place."""
    return [f"export {k}={shlex.quote(v)}" for k, v in env_vars(info).items()]


def env_vars(info: dict) -> dict[str, str]:
    """What `runner lab env` exports, from the lab's description (`lab up --json`)."""
    servers = info["servers"]
    hosts = ",".join(f"{s['user']}@{s['host']}:{s['port']}" for s in servers)
    values = {
        "REGISTRY": info["registry"],
        "DOCKER_HOST": info["docker_host"],
        "DEPLOY_HOSTS": hosts,
        "SSH_KEY_FILE": servers[0]["key_file"] if servers else "",
        "KNOWN_HOSTS_FILE": servers[0]["known_hosts"] if servers else "",
        "AUTH_REGISTRY": info["auth_registry"]["address"],
        "AUTH_REGISTRY_USER": info["auth_registry"]["username"],
        "AUTH_REGISTRY_PASSWORD_FILE": info["auth_registry"]["password_file"],
        "TOKEN_REGISTRY": info["token_registry"]["address"],
        "TOKEN_REGISTRY_USER": info["token_registry"]["username"],
        "TOKEN_REGISTRY_PASSWORD_FILE": info["token_registry"]["password_file"],
        "PROXY_IMAGE": info["proxy_image"],
        "RUNNER_DATABASE_URL": info["database_url"] or "",
    }
    return values


# ---- commands (argv lists) ------------------------------------------------------------------

def bridge_cmds() -> list[list[str]]:
    return [
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", f"{BRIDGE_IP}/{PREFIX}", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ]


def build_bridge_cmds() -> list[list[str]]:
    return [
        ["ip", "link", "add", BUILD_BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", BUILD_BRIDGE_CIDR, "dev", BUILD_BRIDGE],
        ["ip", "link", "set", BUILD_BRIDGE, "up"],
    ]


def server_net_cmds(s: LabServer) -> list[list[str]]:
    ns = ["ip", "-n", s.netns]
    return [
        ["ip", "netns", "add", s.netns],
        ["ip", "link", "add", s.veth, "type", "veth", "peer", "name", "eth0", "netns", s.netns],
        ns + ["link", "set", "lo", "up"],
        ns + ["addr", "add", f"{s.ip}/{PREFIX}", "dev", "eth0"],
        ns + ["link", "set", "eth0", "up"],
        ns + ["route", "add", "default", "via", BRIDGE_IP],
        ["ip", "link", "set", s.veth, "master", BRIDGE],
        ["ip", "link", "set", s.veth, "up"],
        # a server made again gets a new MAC: forget the old one, or the host waits for ARP
        ["ip", "neigh", "flush", "to", s.ip, "dev", BRIDGE],
    ]


def firewall_cmds() -> list[list[str]]:
    """Traffic between the servers and the host's rlab0 address is allowed even when a dockerd
    has set the FORWARD policy to DROP (bridged frames pass FORWARD with br_netfilter); traffic
    from the servers to anywhere else is dropped, so the lab stays inside its own subnet."""
    return [
        ["iptables", "-w", "-N", FW_CHAIN],
        ["iptables", "-w", "-A", FW_CHAIN, "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"],
        ["iptables", "-w", "-A", FW_CHAIN, "-i", BRIDGE, "-j", "DROP"],
        ["iptables", "-w", "-I", "FORWARD", "1", "-j", FW_CHAIN],
    ]


def firewall_down_cmds() -> list[list[str]]:
    return [
        ["iptables", "-w", "-D", "FORWARD", "-j", FW_CHAIN],
        ["iptables", "-w", "-F", FW_CHAIN],
        ["iptables", "-w", "-X", FW_CHAIN],
    ]


def build_bridge_rule_deletions(table: str, rules_text: str) -> list[list[str]]:
    """`iptables -D` commands for the rules the build engine's dockerd added for its bridge
    (dockerd leaves them behind when it stops). Pure: `iptables -t TABLE -S` output in."""
    subnet = BUILD_BRIDGE_CIDR.rsplit(".", 1)[0] + ".0/" + BUILD_BRIDGE_CIDR.split("/")[1]
    cmds = []
    for line in rules_text.splitlines():
        words = shlex.split(line)
        if not words or words[0] != "-A":
            continue
        if BUILD_BRIDGE in words or subnet in words:
            cmds.append(["iptables", "-w", "-t", table, "-D", *words[1:]])
    return cmds


def _insecure_registry_args() -> list[str]:
    return [arg for reg in INSECURE_REGISTRIES for arg in ("--insecure-registry", reg)]


def build_dockerd_argv(state: Path) -> list[str]:
    return [
        "dockerd",
        "--config-file", str(state / "daemon.json"),
        "-H", BUILD_DOCKER_HOST,
        "--data-root", str(state / "docker"),
        "--exec-root", str(RUN_DIR / "exec"),
        "--pidfile", str(RUN_DIR / "docker.pid"),
        *_insecure_registry_args(),
        "--bridge", BUILD_BRIDGE,
        "--mtu", "1400",
        "--containerd-namespace", "rlab-build",
        "--containerd-plugins-namespace", "rlab-build-plugins",
    ]


def server_dockerd_argv(s: LabServer) -> list[str]:
    return [
        "nsenter", f"--net={s.netns_path}",
        "dockerd",
        "--config-file", str(s.daemon_json),
        "-H", s.docker_host,
        "--data-root", str(s.dir / "docker"),
        "--exec-root", str(s.run_dir / "exec"),
        "--pidfile", str(s.run_dir / "docker.pid"),
        *_insecure_registry_args(),
        "--bip", "172.30.0.1/24",
        "--containerd-namespace", f"rlab-{s.name}",
        "--containerd-plugins-namespace", f"rlab-{s.name}-plugins",
    ]


def runs_as_started(running: list[str], wanted: list[str]) -> bool:
    """Whether a running process (its /proc/PID/cmdline) is the command `wanted` would start now.
    `nsenter ... PROG ARGS` execs PROG in place, so the process shows only `PROG ARGS`; PROG may
    show as a full path."""
    if wanted and os.path.basename(wanted[0]) == "nsenter":
        progs = [i for i, a in enumerate(wanted) if i > 0 and not a.startswith("-")]
        wanted = wanted[progs[0]:] if progs else wanted
    if not running or not wanted:
        return running == wanted
    return (os.path.basename(running[0]) == os.path.basename(wanted[0])
            and running[1:] == wanted[1:])


def server_sshd_argv(s: LabServer) -> list[str]:
    return ["nsenter", f"--net={s.netns_path}", "/usr/sbin/sshd", "-D", "-e", "-f", str(s.sshd_config)]


def registry_argv(state: Path) -> list[str]:
    return ["docker-registry", "serve", str(state / "registry.yml")]


def registry_config(state: Path) -> str:
    return (
        "version: 0.1\n"
        "log:\n  level: info\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {state / 'registry'}\n"
        "  delete:\n    enabled: true\n"
        "http:\n"
        f"  addr: {REGISTRY}\n"
    )


def auth_registry_argv(state: Path) -> list[str]:
    return ["docker-registry", "serve", str(state / "auth-registry.yml")]


def auth_registry_config(state: Path) -> str:
    """Like registry_config, with its own storage and port, and a login required: htpasswd
    (distribution reads only bcrypt entries)."""
    return (
        "version: 0.1\n"
        "log:\n  level: info\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {state / 'auth-registry'}\n"
        "  delete:\n    enabled: true\n"
        "auth:\n"
        f"  htpasswd:\n    realm: runner-lab\n    path: {auth_registry_htpasswd(state)}\n"
        "http:\n"
        f"  addr: {AUTH_REGISTRY}\n"
    )


def token_registry_argv(state: Path) -> list[str]:
    return ["docker-registry", "serve", str(state / "token-registry.yml")]


def token_registry_config(state: Path) -> str:
    """Like registry_config, with its own storage, on loopback, and token auth: a client without
    a token the issuer signed is sent to TOKEN_REALM (distribution 2.8 reads the certificates of
    `rootcertbundle` when it starts, and trusts the keys in them)."""
    return (
        "version: 0.1\n"
        "log:\n  level: info\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {state / 'token-registry'}\n"
        "  delete:\n    enabled: true\n"
        "auth:\n"
        "  token:\n"
        f"    realm: {TOKEN_REALM}\n"
        f"    service: {TOKEN_SERVICE}\n"
        f"    issuer: {TOKEN_ISSUER}\n"
        f"    rootcertbundle: {token_issuer_dir(state) / 'cert.pem'}\n"
        "http:\n"
        f"  addr: {TOKEN_REGISTRY}\n"
    )


def token_issuer_argv(state: Path, python: str) -> list[str]:
    """`python` is the interpreter that runs the runner itself (it has `cryptography`)."""
    return [python, "-m", "runner_lab.token_issuer", str(token_issuer_config_file(state))]


def token_issuer_config(state: Path) -> str:
    return json.dumps({
        "listen": TOKEN_ISSUER_LISTEN,
        "issuer": TOKEN_ISSUER,
        "service": TOKEN_SERVICE,
        "key": str(token_issuer_dir(state) / "key.pem"),
        "users": str(token_registry_htpasswd(state)),
        "push_only": [TOKEN_REGISTRY_PUSH_ONLY_USER],
    }, indent=2, sort_keys=True) + "\n"


def htpasswd_entry(text: str, user: str) -> str | None:
    """The password hash of `user` in htpasswd file text, or None."""
    for line in text.splitlines():
        name, sep, hashed = line.strip().partition(":")
        if sep and name == user and hashed:
            return hashed
    return None


def sshd_config(s: LabServer) -> str:
    return "\n".join([
        f"ListenAddress {s.ip}:{SSH_PORT}",
        f"HostKey {s.host_key}",
        f"PidFile {s.run_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {s.authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # the state dir may live under a world-writable parent (tests use a tmp dir)
        "StrictModes no",
        "PrintMotd no",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        f"SetEnv DOCKER_HOST={s.docker_host}",
        "Subsystem sftp /usr/lib/openssh/sftp-server",
        "",
    ])


def known_hosts_line(s: LabServer, host_pub: str) -> str:
    """A known_hosts line from the server's host public key file ("type base64 comment")."""
    kind, key = host_pub.split()[:2]
    host = s.ip if SSH_PORT == 22 else f"[{s.ip}]:{SSH_PORT}"
    return f"{host} {kind} {key}"


def initdb_argv(data: Path) -> list[str]:
    """Run as POSTGRES_OS_USER (runuser_argv). Peer login on the socket, SCRAM over TCP; the lab
    replaces both with its own pg_hba.conf. --no-locale: C collation whatever this host's LANG."""
    return [str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", POSTGRES_OS_USER,
            "--auth-local=peer", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-locale",
            "--no-instructions"]


def runuser_argv(argv: list[str]) -> list[str]:
    return ["runuser", "-u", POSTGRES_OS_USER, "--", *argv]


def postgres_settings(state: Path) -> dict[str, str]:
    """Given on the postmaster's command line, so that `up` sees a cluster started with other
    settings (its /proc/PID/cmdline) and restarts it, as it does for the engines. Sized for tests
    on 2 cores: several daemons with a few connections each; fsync stays on (the default)."""
    return {
        "port": str(POSTGRES_PORT),
        "listen_addresses": POSTGRES_HOST,
        "unix_socket_directories": str(POSTGRES_SOCKET_DIR),
        "hba_file": str(postgres_dir(state) / "pg_hba.conf"),
        "ident_file": str(postgres_dir(state) / "pg_ident.conf"),
        "cluster_name": "runner-lab",  # in every backend's process title
        "max_connections": "200",
        "shared_buffers": "32MB",
        "password_encryption": "scram-sha-256",
        "logging_collector": "off",  # stderr: the log file `up` opened for it
    }


def postgres_socket_files() -> tuple[str, str]:
    """The socket and its lock file the postmaster makes in POSTGRES_SOCKET_DIR."""
    return f".s.PGSQL.{POSTGRES_PORT}", f".s.PGSQL.{POSTGRES_PORT}.lock"


def postgres_argv(state: Path) -> list[str]:
    argv = [str(POSTGRES_BIN / "postgres"), "-D", str(postgres_data(state))]
    for name, value in postgres_settings(state).items():
        argv += ["-c", f"{name}={value}"]
    return argv


def pg_hba_conf() -> str:
    """Only two ways in: the superuser over the lab's own socket, for root (`up`, mapped in
    pg_ident.conf) and the postgres user; every role over 127.0.0.1 with its SCRAM password
    (postgres has none, so not it)."""
    return ("# the lab's own (runner lab up writes it)\n"
            "# TYPE  DATABASE  USER      ADDRESS       METHOD\n"
            f"local   all       {POSTGRES_OS_USER}  peer map=lab\n"
            f"host    all       all       {POSTGRES_HOST}/32  scram-sha-256\n")


def pg_ident_conf() -> str:
    return ("# the lab's own (runner lab up writes it)\n"
            "# MAPNAME  SYSTEM-USER  PG-USER\n"
            f"lab        root         {POSTGRES_OS_USER}\n"
            f"lab        {POSTGRES_OS_USER}     {POSTGRES_OS_USER}\n")


def scram_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677, its
    `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` form). `up` sends this instead of the password,
    so the password itself never reaches the server, not even a logged statement of a failed
    CREATE ROLE. The lab's passwords are hex: SASLprep leaves them as they are."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    salt64, stored64, server64 = (base64.b64encode(raw).decode()
                                  for raw in (salt, stored_key, server_key))
    return f"SCRAM-SHA-256${iterations}:{salt64}${stored64}:{server64}"


def import_changes(image: str) -> list[str]:
    if image == BUSYBOX_IMAGE:
        return [f"ENV PATH={CONTAINER_PATH}", 'CMD ["sh"]']
    return [
        f"ENV PATH={CONTAINER_PATH}",
        "ENV LANG=C.UTF-8",
        f"ENV PIP_CERT={HOST_CA_BUNDLE}",
        'CMD ["python3"]',
    ]


def docker_import_argv(docker: str, image: str, source: str) -> list[str]:
    argv = [docker, "-H", BUILD_DOCKER_HOST, "import"]
    for change in import_changes(image):
        argv += ["--change", change]
    return argv + [source, image]


def apt_download_argv(package: str = PROXY_PACKAGE) -> list[str]:
    """Download a package's .deb into the current directory without installing it (installing
    caddy would start its service)."""
    return ["apt-get", "download", package]


def apt_update_argv() -> list[str]:
    return ["apt-get", "update"]


def dpkg_extract_argv(deb: Path, target: Path) -> list[str]:
    return ["dpkg-deb", "-x", str(deb), str(target)]


def proxy_init_config() -> str:
    """The config the image starts with: the admin API on the container's own loopback only, no
    site yet. The deployer loads whole configs through it (`docker exec -i C caddy reload
    --config /dev/stdin`), or mounts its own file at PROXY_INIT_CONFIG."""
    return '{"admin": {"listen": "localhost:2019"}}\n'


def _proxy_dockerfile_lines(version: str) -> list[str]:
    return [
        f"FROM {PYTHON_IMAGE}",
        "COPY caddy /usr/bin/caddy",
        f"COPY init.json {PROXY_INIT_CONFIG}",
        "RUN mkdir -p /etc/caddy /data /config /srv",
        "ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data",
        f"LABEL org.opencontainers.image.title=caddy org.opencontainers.image.version={version}",
        "EXPOSE 80 443",
        "WORKDIR /srv",
        f'CMD ["caddy", "run", "--config", "{PROXY_INIT_CONFIG}"]',
    ]


def proxy_recipe() -> str:
    """A digest of how the proxy image is made (Dockerfile and init config, whatever caddy
    version): the image carries it as label PROXY_RECIPE_LABEL, so an image made another way
    (by hand, or by an older version of this code) is made again by `up`."""
    text = "\n".join(_proxy_dockerfile_lines("")) + "\n" + proxy_init_config()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def proxy_dockerfile(version: str) -> str:
    """The proxy image: Debian's caddy binary (linked against glibc) on the lab's python image.
    XDG dirs as in the official caddy image (certificates in /data, autosave in /config: the
    volumes a deployer mounts there are used)."""
    return "\n".join([*_proxy_dockerfile_lines(version),
                      f"LABEL {PROXY_RECIPE_LABEL}={proxy_recipe()}", ""])


def proxy_build_argv(context: Path, docker: str = BUILDKIT_DOCKER_CLI) -> list[str]:
    """Run with DOCKER_BUILDKIT=1 (proxy_build_env)."""
    return [docker, "-H", BUILD_DOCKER_HOST, "build", "--progress=plain", "-t", PROXY_IMAGE,
            str(context)]


def proxy_build_env() -> dict[str, str]:
    return {"DOCKER_BUILDKIT": "1"}


def proxy_check_argv(docker: str = BUILDKIT_DOCKER_CLI) -> list[str]:
    return [docker, "-H", BUILD_DOCKER_HOST, "run", "--rm", "--network", "none", PROXY_IMAGE,
            "caddy", "version"]


def proxy_push_argv(docker: str = BUILDKIT_DOCKER_CLI) -> list[str]:
    return [docker, "-H", BUILD_DOCKER_HOST, "push", PROXY_IMAGE]


def deb_version(filename: str) -> str | None:
    """The upstream version in a .deb's file name: caddy_2.6.2-5_amd64.deb -> 2.6.2."""
    parts = filename.removesuffix(".deb").split("_")
    if len(parts) != 3 or not parts[1]:
        return None
    version = parts[1].replace("%3a", ":").split(":", 1)[-1]  # without an epoch
    return version.rsplit("-", 1)[0]  # without the Debian revision


def debootstrap_argv(target: Path, mirror: str) -> list[str]:
    return ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
            DEBIAN_SUITE, str(target), mirror]


def apt_mirror(sources: dict[str, str]) -> str | None:
    """The Debian mirror apt on this host uses, from the text of its sources files
    (both deb822 `URIs:` and one-line `deb URI suite` forms). Pure: file name -> text in."""
    for _name, text in sorted(sources.items()):
        lines = [ln.strip() for ln in text.splitlines()]
        stanza_suites: list[str] = []
        uris: list[str] = []
        for ln in lines + [""]:
            if not ln:
                if uris and any(s.split("-")[0] == DEBIAN_SUITE for s in stanza_suites):
                    for uri in uris:
                        if "security" not in uri:
                            return uri
                uris, stanza_suites = [], []
                continue
            if ln.startswith("#"):
                continue
            if ln.startswith("URIs:"):
                uris = ln.split(":", 1)[1].split()
            elif ln.startswith("Suites:"):
                stanza_suites = ln.split(":", 1)[1].split()
            elif ln.startswith("deb "):
                parts = re.sub(r"\[[^\]]*\]", " ", ln).split()
                # deb [opts] URI suite components
                if len(parts) >= 3 and "security" not in parts[1]:
                    if parts[2].split("-")[0] == DEBIAN_SUITE or parts[2] in ("stable",):
                        return parts[1]
    return None
