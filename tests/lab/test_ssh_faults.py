"""The ~/.ssh/config paths under real faults: the jump host's sshd of a ProxyJump route dies
(SIGKILL, by pid) while a deploy is under way on the server behind it, and the ssh-agent that
holds the only key dies (SIGKILL, by pid) between two deploys.

The deploys run in a process of their own (tests/data/deploy/child.py: exit status, report as
JSON on stdout, log on stderr), as a run would. The jump sshd and the agent are processes this
test starts and stops itself; the lab's own sshd and dockerd are left alone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


from deployers import lock as locks
from deployers.ssh_docker import SSHDockerDeployer
from runner_lab import layout
from tests.lab.deploy_fixtures import Log, _deployer, _get, _port, _stage
from tests.helpers import ROOT
from tests.lab.test_deploy_faults import _descendants
from tests.unit.test_ssh_config import keygen, start_agent
from tests.lab.test_ssh_config import home, lab_known_line, stage_for  # noqa: F401

CHILD = ROOT / "tests/data/deploy/child.py"


# ------------------------------------------------------------------------------ helpers

def _in_netns(server: dict, argv: list[str], **kw) -> subprocess.Popen:
    s = layout.server_from_name(server["name"], layout.state_dir())
    return subprocess.Popen(["nsenter", f"--net={s.netns_path}", *argv], **kw)


def _free_port(server: dict) -> int:
    """A port nothing listens on at the server's address, asked inside its netns."""
    p = _in_netns(server, [sys.executable, "-c",
                           "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); "
                           "print(s.getsockname()[1])", server["host"]],
                  stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0
    return int(out)


def _banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


class JumpSSHD:
    """An sshd of this test's own in `server`'s netns on a free port, taking the lab's key,
    with a host key of its own. `kill()` SIGKILLs it and every session it serves, by pid."""

    def __init__(self, server: dict, tmp: Path):
        self.server = server
        self.host = server["host"]
        self.port = _free_port(server)
        tmp.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(tmp / "jump_host_key")
        s = layout.server_from_name(server["name"], layout.state_dir())
        config = tmp / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {self.host}:{self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {tmp / 'sshd.pid'}",
            f"AuthorizedKeysFile {s.authorized_keys}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "AllowTcpForwarding yes", "MaxSessions 100", ""]))
        self.log = open(tmp / "sshd.log", "w")
        # nsenter execs sshd (no fork for a net namespace): the Popen pid is sshd's listener.
        self.proc = _in_netns(server, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                              stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not _banner(self.host, self.port):
            assert self.proc.poll() is None, (tmp / "sshd.log").read_text()
            assert time.monotonic() < deadline, "the jump sshd did not answer"
            time.sleep(0.05)
        cmdline = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes()
        assert str(config).encode() in cmdline, cmdline

    def known_hosts_line(self) -> str:
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[{self.host}]:{self.port} {kind} {key}"

    def sessions(self) -> list[int]:
        return _descendants(self.proc.pid)

    def kill(self) -> list[int]:
        pids = [self.proc.pid, *self.sessions()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        return pids

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log.close()


class Child:
    """tests/data/deploy/child.py running one deploy; its log lines collected as they come."""

    def __init__(self, stage, app: str, images, version: str, run_id: str):
        cfg = {"stage": stage.model_dump(by_alias=True), "app": app, "repo": images["repo"],
               "ref": images[version], "run_id": run_id, "commit": version * 10}
        self.proc = subprocess.Popen([sys.executable, str(CHILD), json.dumps(cfg)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            assert self.proc.poll() is None, f"exited before {needle!r}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"never logged {needle!r}:\n{self.stderr}"
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> tuple[int, dict | None]:
        out = self.proc.stdout.read()  # type: ignore[union-attr]
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        try:
            report = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            report = None
        return self.proc.returncode, report

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _engine_containers(server: dict, app: str) -> list[dict]:
    """The app's containers as the server's own docker engine lists them (its socket, not
    SSH): name, state and the release digest label."""
    s = layout.server_from_name(server["name"], layout.state_dir())
    p = subprocess.run(["docker", "-H", s.docker_host, "container", "ls", "--all",
                        "--filter", f"label=runner.app={app}", "--format", "{{json .}}"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    rows = []
    for line in p.stdout.splitlines():
        c = json.loads(line)
        labels = dict(kv.split("=", 1) for kv in c["Labels"].split(",") if "=" in kv)
        rows.append({"name": c["Names"], "state": c["State"],
                     "digest": labels.get("runner.digest", "")})
    return rows


def _digest(images, version: str) -> str:
    return images[version].split("@")[1]


# ------------------------------------------------------------------------------ tests

def test_jump_sshd_killed_mid_deploy_names_the_route_and_keeps_the_release(
        lab, images, app, home, tmp_path):
    """srv2 is reached only as `web` through `bastion`, an sshd this test runs in srv1's netns;
    srv3 directly. Release v1 goes out. The v2 deploy waits for web's deploy lock (held by this
    test over a direct connection; every lock comes before any pull), which is when the
    bastion sshd and all its sessions are SIGKILLed. The run must fail (exit 1) naming web and
    the broken route through bastion; web still runs v1 (its engine says so), and the report
    does not claim v2 there."""
    name, _ = app
    jump_srv, behind, direct = lab["servers"][0], lab["servers"][1], lab["servers"][2]
    key = jump_srv["key_file"]
    jump = JumpSSHD(jump_srv, tmp_path / "jump")
    child = None
    lease = None
    holder = None
    try:
        (home / ".ssh" / "config").write_text(
            f"Host web\n    HostName {behind['host']}\n    User root\n    ProxyJump bastion\n"
            f"    IdentityFile {key}\n"
            f"Host bastion\n    HostName {jump.host}\n    Port {jump.port}\n    User root\n"
            f"    IdentityFile {key}\n"
            f"Host {direct['host']}\n    User root\n    IdentityFile {key}\n")
        (home / ".ssh" / "known_hosts").write_text("\n".join([
            jump.known_hosts_line(), lab_known_line(lab, behind["host"]),
            lab_known_line(lab, direct["host"]), ""]))
        port = _port()
        stage = stage_for(["web", direct["host"]], name, port)
        stage = stage.model_copy(update={"lock": stage.lock.model_copy(update={"wait": 60})})

        d = _deployer(stage, images, "v1", name, Log())
        try:
            report = d.apply()
            assert report.ok, report.summary()
            assert d.connection(d.targets[0]).jump is not None  # web really is behind bastion
        finally:
            d.close()
        assert [_get(behind["host"], port), _get(direct["host"], port)] == ["v1", "v1"]

        # Hold web's deploy lock over a direct connection (not through bastion), so that the
        # v2 deploy is certainly in progress on web, waiting for that lock, when the route
        # breaks.
        holder = SSHDockerDeployer(_stage(lab, [behind], name, port), pipeline=name,
                                   image_name="x", run_id="holder")
        hconn = holder.connection(holder.targets[0])
        lease = locks.acquire(hconn, f"{holder.runner_dir(hconn)}/locks", name,
                              locks.holder_info("holder", name, "h" * 40, 60), ttl=60, wait=5)

        child = Child(stage, name, images, "v2", run_id="through-bastion")
        child.wait_for("web: waiting up to")
        assert jump.sessions(), "the deploy's route to web does not go through bastion"
        jump.kill()
        code, report = child.finish()
    finally:
        if child is not None:
            child.kill()
        if lease is not None:
            lease.release()
        if holder is not None:
            holder.close()
        jump.close()

    err = child.stderr
    assert code == 1, err
    assert "Traceback" not in err, err
    assert report is not None and not report["ok"], report
    rows = {r["name"]: r for r in report["servers"]}
    web = rows["web"]
    assert web["status"] == "failed", web
    # The reason names the jump host and says the route through it broke.
    assert "lock" in web["phases"], web  # it was waiting for web's lock when cut off
    assert f"the route through jump bastion ({jump.host}:{jump.port}) broke" in web["reason"], web
    assert "nothing was changed on this server" in web["reason"], web
    assert web["digest"] != _digest(images, "v2") and not web.get("rolled_back"), web
    assert "failed on web" in report["headline"], report
    assert "kept the new release" not in report["headline"], report
    assert rows[direct["host"]]["status"] in ("skipped", "failed", "rolled_back"), rows
    assert rows[direct["host"]]["digest"] != _digest(images, "v2") or \
        rows[direct["host"]]["rolled_back"], rows

    # What web's own engine runs: v1, running; no v2 container, nothing set aside.
    on_web = _engine_containers(behind, name)
    assert [(c["name"], c["state"], c["digest"]) for c in on_web] == [
        (name, "running", _digest(images, "v1"))], on_web
    assert _get(behind["host"], port) == "v1"
    assert _get(direct["host"], port) == "v1"
    [last] = _history_of(lab, behind, name, port)[-1:]
    assert last["digest"] == _digest(images, "v1")


def _history_of(lab, server: dict, app: str, port: int) -> list[dict]:
    d = SSHDockerDeployer(_stage(lab, [server], app, port), pipeline=app, image_name="x",
                          run_id="read")
    try:
        return d.history(d.connection(d.targets[0]))
    finally:
        d.close()


def test_agent_killed_between_deploys_fails_before_changing_anything(
        lab, images, app, home, monkeypatch):
    """The pipeline has no key_file: the only key is in an ssh-agent. v1 deploys with it; the
    agent is SIGKILLed (its socket file stays behind, as after a crash); the v2 deploy must
    fail before touching the server, exit 1, naming the server and saying the agent could not
    be reached, with no traceback; the server keeps v1."""
    name, _ = app
    server = lab["servers"][2]
    (home / ".ssh" / "known_hosts").write_text(lab_known_line(lab, server["host"]) + "\n")
    port = _port()
    stage = stage_for([server["host"]], name, port)  # no key_file, no key
    agent, sock, sockdir = start_agent(server["key_file"])
    try:
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        child = Child(stage, name, images, "v1", run_id="with-agent")
        code, report = child.finish()
        assert code == 0, child.stderr
        assert [r["status"] for r in report["servers"]] == ["deployed"], report
        assert _get(server["host"], port) == "v1"

        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        assert os.path.exists(sock)  # a dead agent's socket: connect() is refused

        child = Child(stage, name, images, "v2", run_id="agent-gone")
        code, report = child.finish()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(sockdir)

    err = child.stderr
    assert code == 1, err
    assert "Traceback" not in err, err
    assert report is not None and not report["ok"], report
    [row] = report["servers"]
    assert row["name"] == server["host"] and row["status"] == "failed", row
    assert f"ssh-agent at {sock}" in row["reason"], row
    assert "the agent cannot be reached (Connection refused" in row["reason"], row
    assert "nothing was changed on this server" in row["reason"], row
    assert "pull" not in row.get("phases", {}), row  # it failed at connect
    assert server["host"] in report["headline"], report
    assert [(c["name"], c["state"], c["digest"]) for c in _engine_containers(server, name)] \
        == [(name, "running", _digest(images, "v1"))]
    assert _get(server["host"], port) == "v1"
