"""The lab's SSH servers srvI: each a network namespace rlab-srvI on bridge rlab0 (veth rlab-vI,
10.87.53.(10+I)) with its own dockerd (`srvI-dockerd`) and an sshd (`srvI-sshd`, root by key
only); the client key they all accept and the known_hosts file with their host keys."""
from __future__ import annotations

import os

from runner_lab import host, layout
from runner_lab.layout import LabServer
from runner_lab.state import State


def problems(state: State, s: LabServer) -> list[str]:
    if not _net_ok(s):
        return [f"{s.name}: network namespace {s.netns} or veth {s.veth} is missing"]
    found = []
    drec = state.recorded(f"{s.name}-dockerd")
    if not host.alive(drec) or not host.docker_ready(s.sock):
        found.append(f"{s.name}: engine {s.docker_host} does not answer")
    elif host.outdated(drec, layout.server_dockerd_argv(s)):
        found.append(f"{s.name}: engine {s.docker_host} runs with other flags than "
                     "`runner lab up` starts it with now: `up` restarts it")
    if not host.alive(state.recorded(f"{s.name}-sshd")) or not host.ssh_banner(s.ip):
        found.append(f"{s.name}: sshd {s.ip}:{layout.SSH_PORT} does not answer")
    return found


def markers(state: State, names: set[str]) -> list[tuple[str, str, str]]:
    """(key, marker, program) of the processes of servers `names`: each runs with its own pid
    file or config path."""
    found = []
    for name in names:
        s = layout.server_from_name(name, state.dir)
        found += [(f"{name}-dockerd", str(s.run_dir / "docker.pid"), "dockerd"),
                  (f"{name}-sshd", str(s.sshd_config), "sshd")]
    return found


def exec_root_prefixes(state: State, names: set[str]) -> list[str]:
    """The servers' exec-root dirs: containerd and shims a killed dockerd left name them."""
    return [f"{layout.server_from_name(n, state.dir).run_dir / 'exec'}/" for n in names]


def ensure_client_key(state: State) -> None:
    """The key every server accepts (made once)."""
    key = layout.client_key(state.dir)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        host.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "runner-lab",
                  "-f", str(key)])


def ensure(state: State, s: LabServer) -> None:
    """Server `s`: its namespace and veth (made again, its processes stopped first, when one is
    missing), host key, sshd config, then its dockerd and sshd, each left alone while it runs as
    `up` would start it now and answers. Both are started before either is waited for."""
    if not _net_ok(s):
        state.log(f"{s.name}: creating network namespace {s.netns} ({s.ip})")
        for key in (f"{s.name}-sshd", f"{s.name}-dockerd"):
            host.stop(state.recorded(key))
        host.stop_all(host.pids_using([f"{s.run_dir / 'exec'}/"]))
        remove_net(s)
        for argv in layout.server_net_cmds(s):
            host.run(argv)
        state.created("netns", s.netns)
        state.created("veths", s.veth)
    s.dir.mkdir(parents=True, exist_ok=True)
    s.run_dir.mkdir(parents=True, exist_ok=True)
    if not s.host_key.exists():
        host.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", s.name,
                  "-f", str(s.host_key)])
    client_pub = layout.client_key(state.dir).with_suffix(".pub").read_text()
    host.write_if_changed(s.authorized_keys, client_pub)
    host.write_if_changed(s.sshd_config, layout.sshd_config(s))
    host.write_if_changed(s.daemon_json, "{}\n")

    waits = []
    dkey = f"{s.name}-dockerd"
    drec = state.adopt(dkey, str(s.run_dir / "docker.pid"), "dockerd")
    if drec and host.outdated(drec, layout.server_dockerd_argv(s)):
        state.log(f"{s.name}: engine (pid {drec['pid']}) runs with other flags than this "
                  "version starts it with; restarting it: its containers stop (those with a "
                  "restart policy start again with the new engine)")
        host.stop(drec)
        drec = None
    if drec and not host.answers(lambda: host.docker_ready(s.sock), 10):
        state.log(f"{s.name}: engine alive but not answering; restarting it")
        host.stop(drec)
        drec = None
    if not drec:
        host.stop_all(host.pids_using([f"{s.run_dir / 'exec'}/"]))
        host.remove_stale_pidfiles(s.run_dir / "docker.pid", s.run_dir / "exec")
        state.log(f"{s.name}: starting dockerd ({s.docker_host})")
        log_path = s.dir / "dockerd.log"
        drec = host.spawn(layout.server_dockerd_argv(s), log_path)
        state.record(dkey, drec)
        waits.append((lambda: host.docker_ready(s.sock), f"{s.name} dockerd", 60, drec,
                      log_path))

    skey = f"{s.name}-sshd"
    srec = state.adopt(skey, str(s.sshd_config), "sshd")
    if srec and not host.answers(lambda: host.ssh_banner(s.ip), 5):
        host.stop(srec)
        srec = None
    if not srec:
        log_path = s.dir / "sshd.log"
        state.log(f"{s.name}: starting sshd ({s.ip}:{layout.SSH_PORT})")
        srec = host.spawn(layout.server_sshd_argv(s), log_path)
        state.record(skey, srec)
        waits.append((lambda: host.ssh_banner(s.ip), f"{s.name} sshd", 15, srec, log_path))
    for probe, what, timeout, rec, log_path in waits:
        host.wait_for(probe, what, timeout, rec, log_path)


def write_known_hosts(state: State) -> None:
    """One line per recorded server, from its host key."""
    lines = []
    for s in state.servers():
        pub = s.host_key.with_name(s.host_key.name + ".pub")
        if pub.exists():
            lines.append(layout.known_hosts_line(s, pub.read_text()))
    host.write_if_changed(layout.known_hosts(state.dir), "".join(f"{ln}\n" for ln in lines))


def netns_indexes() -> list[int]:
    """The indexes of the rlab-srvI namespaces there are now (also those state.json lost)."""
    try:
        names = os.listdir("/var/run/netns")
    except OSError:
        return []
    return [int(n[len("rlab-srv"):]) for n in names
            if n.startswith("rlab-srv") and n[len("rlab-srv"):].isdigit()]


def remove_net(s: LabServer) -> None:
    if host.link_exists(s.veth):
        host.run(["ip", "link", "del", s.veth], check=False)
    if host.netns_exists(s.netns):
        host.run(["ip", "netns", "del", s.netns], check=False)


def _net_ok(s: LabServer) -> bool:
    return (host.netns_exists(s.netns) and host.link_exists(s.veth)
            and host.link_master(s.veth) == layout.BRIDGE and host.link_up(s.veth))
