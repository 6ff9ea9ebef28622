"""The lab's base network: bridge rlab0 (the registries' address; the servers' veths join it),
bridge rlabb0 (the build engine's containers, NAT out) and chain RLAB-FORWARD, which keeps the
servers to the host and each other. The servers' own namespaces and veths are runner_lab.servers'.
"""
from __future__ import annotations

from runner_lab import host, layout
from runner_lab.state import State


def problems() -> list[str]:
    found = []
    if not host.link_exists(layout.BRIDGE) or not host.link_up(layout.BRIDGE):
        found.append(f"bridge {layout.BRIDGE} is missing or down")
    if not host.fw_chain_present():
        found.append(f"iptables chain {layout.FW_CHAIN} is not linked from FORWARD")
    return found


def ensure(state: State) -> None:
    """Both bridges with their address, up, and the firewall chain linked from FORWARD; only
    what is missing is made (and noted in state.json's `created`)."""
    for name, cidr, cmds in ((layout.BRIDGE, f"{layout.BRIDGE_IP}/{layout.PREFIX}",
                              layout.bridge_cmds()),
                             (layout.BUILD_BRIDGE, layout.BUILD_BRIDGE_CIDR,
                              layout.build_bridge_cmds())):
        if not host.link_exists(name):
            state.log(f"creating bridge {name} {cidr}")
            host.run(cmds[0])
            state.created("bridges", name)
        if not host.link_has_addr(name, cidr):
            host.run(cmds[1])
        if not host.link_up(name):
            host.run(cmds[2])
    if not host.fw_chain_present():
        for argv in layout.firewall_down_cmds():  # a chain left without its jump
            host.run(argv, check=False)
        for argv in layout.firewall_cmds():
            host.run(argv)
        state.created("firewall", True)


def remove() -> None:
    """Both bridges, the firewall chain, and the rules the build engine's dockerd added for its
    bridge (only those: other rules in the same tables are left)."""
    for bridge in (layout.BRIDGE, layout.BUILD_BRIDGE):
        if host.link_exists(bridge):
            host.run(["ip", "link", "del", bridge], check=False)
    for argv in layout.firewall_down_cmds():
        host.run(argv, check=False)
    for table in ("filter", "nat"):
        rules = host.run(["iptables", "-w", "-t", table, "-S"], check=False)
        for argv in layout.build_bridge_rule_deletions(table, rules.stdout.decode()):
            host.run(argv, check=False)
