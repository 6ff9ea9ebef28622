"""SSHOptions: the settings every SSH connection of a deploy is made with."""
from __future__ import annotations

from dataclasses import dataclass, field

import paramiko

from deployers.host_keys import HostKeyPolicy
from deployers.spec import Target


@dataclass(frozen=True)
class SSHOptions:
    # The pipeline's own key (ssh.key_file / ssh.key), offered before any other; None: only
    # the user's keys (agent, IdentityFile, ~/.ssh/id_*) that each Target names.
    key: paramiko.PKey | None = None
    host_keys: HostKeyPolicy = field(default_factory=HostKeyPolicy)
    connect_timeout: float = 10
    command_timeout: float = 600
    retries: int = 2
    jump: Target | None = None  # for a target without its own Target.jump
    key_label: str = "ssh.key_file"  # how messages name `key`
    keepalive: int = 15
    reuse_shell: bool = True  # run commands through a kept remote `sh` (see ssh_connection._Shell)
    # Seconds a single SFTP operation (each read or write of its channel) or a wait for the
    # SFTP session may take; also bounds writing a command's input.
    io_timeout: float = 30
