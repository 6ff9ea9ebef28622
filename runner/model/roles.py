"""Roles: one app's release run as several containers of the same image (Kamal's `servers:
{web, job: {cmd}}`, a Procfile's process types), e.g. a web server and a background worker.

Example:

    stages:
      deploy:
        servers: [web-1, web-2, jobs-1]
        container: {env: {MODE: production}}
        roles:
          web: {servers: [web-1, web-2]}            # behind the proxy (the role named web)
          worker:
            command: [python, -m, shop.worker]
            servers: [jobs-1]
            env: {QUEUE: default}

Every role runs the same release (one digest per deploy); a deploy switches every role's
containers in one rollout and counts as verified only when all of them are, so web and worker
are never left on two releases; a rollback returns them together.

`role_settings` turns the deploy settings into one `RoleSettings` per role: the deploy settings
as that role's containers run (its command, servers, env, health check; publishing ports and
the proxy only for the primary role). Pure: no I/O.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from runner.model.base import ContainerCommand, EnvVars, Model, ServerNames
from runner.model.health import Healthcheck

if TYPE_CHECKING:
    from runner.model.deploy import DeploySettings

# A role's name: part of its containers' names (`<app>-<role>`) and of host names.
ROLE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
DEFAULT_ROLE = "web"  # the one role of a deploy without `roles:`, and the proxied one by default


class Role(Model):
    """One role of the app: the release's image run with its own command, on its own servers,
    with its own env and health check. What it does not set comes from `container`."""

    command: ContainerCommand = Field(default=None, examples=[["python", "-m", "shop.worker"]])
    """The arguments after the image, which replace the image's CMD. Unset:
    `container.command`, else the image's CMD."""
    servers: ServerNames = Field(default=(), examples=[["10.0.0.11"]])
    """The servers of `stages.deploy.servers` (by name or host) this role runs on. Unset: all
    of them."""
    env: EnvVars = Field(default_factory=dict, examples=[{"QUEUE": "default"}])
    """Environment variables, over `container.env`."""
    secret_env: EnvVars = Field(default_factory=dict, examples=[{"QUEUE_TOKEN": "queue"}])
    """Secret environment variables (`NAME: secret name`), over `container.secret_env`."""
    healthcheck: Healthcheck | None = None
    """When this role's new container counts as healthy. Unset: the primary role (the one
    behind the proxy, else `web`) uses `stages.deploy.healthcheck`; any other role counts as up
    once it has run `healthcheck.min_uptime` seconds without exiting or restarting, and the
    image's own HEALTHCHECK (which usually probes the web server) is switched off for it."""
    proxy: bool | None = Field(default=None, examples=[False])
    """Whether this role is behind the proxy (`stages.deploy.proxy`). Unset: only the role
    named `web`. At most one role is."""


@dataclass(frozen=True)
class RoleSettings:
    """One role as the deploy runs it. `stage`: the deploy settings of this role's containers
    (servers, container, healthcheck, proxy), so that one role is deployed exactly like an app
    without roles. `unit_suffix`: what the role adds to a server's name in messages and
    reports (`web-1/worker`); "" for the primary role, whose containers keep the app's name,
    history and route (a pipeline that adds roles keeps its web history)."""

    name: str
    primary: bool
    container: str
    stage: DeploySettings

    @property
    def unit_suffix(self) -> str:
        return "" if self.primary else f"/{self.name}"


def primary_role(stage: DeploySettings) -> str:
    """The role whose containers are named after the app: the one behind the proxy, else `web`,
    else the first role."""
    if not stage.roles:
        return DEFAULT_ROLE
    proxied = [n for n, r in stage.roles.items() if _proxied(n, r, stage)]
    if proxied:
        return proxied[0]
    return DEFAULT_ROLE if DEFAULT_ROLE in stage.roles else next(iter(stage.roles))


def _proxied(name: str, role: Role, stage: DeploySettings) -> bool:
    if stage.proxy is None:
        return False
    return role.proxy if role.proxy is not None else name == DEFAULT_ROLE


def role_container(app: str, role: str, primary: bool) -> str:
    return app if primary else f"{app}-{role}"


def role_settings(stage: DeploySettings, app: str) -> tuple[RoleSettings, ...]:
    """Every role of the deploy, the primary first. Without `roles:`, one: the deploy as it is.
    Expects a stage the loader checked (servers known, at most one role behind the proxy)."""
    if not stage.roles:
        return (RoleSettings(DEFAULT_ROLE, True, role_container(app, DEFAULT_ROLE, True),
                             stage),)
    first = primary_role(stage)
    names = [first] + [n for n in stage.roles if n != first]
    return tuple(_one(stage, app, n, stage.roles[n], n == first) for n in names)


def _one(stage: DeploySettings, app: str, name: str, role: Role, primary: bool
         ) -> RoleSettings:
    from runner.model.accessories import NETWORK
    c = stage.container
    container = role_container(app, name, primary)
    behind_proxy = _proxied(name, role, stage)
    env = {**c.env, **role.env}
    secret_env = {**c.secret_env, **role.secret_env}
    for var in role.env:  # a role's plain value wins over the app's secret of that name
        if var not in role.secret_env:
            secret_env.pop(var, None)
    update: dict[str, Any] = {"name": container, "env": env, "secret_env": secret_env}
    if role.command is not None:
        update["command"] = role.command
    if not primary:
        update["ports"] = ()  # the app's published ports are the primary role's
        if stage.proxy is not None:  # it meets the others (and the accessories) there
            update["network"] = NETWORK
    health: Healthcheck = role.healthcheck or (
        stage.healthcheck if primary else
        Healthcheck(timeout=stage.healthcheck.timeout, min_uptime=stage.healthcheck.min_uptime,
                    image_check=False))
    servers = stage.servers
    if role.servers:
        servers = tuple(s for s in stage.servers if s.label in role.servers
                        or s.host in role.servers)
    if not primary:  # how messages and reports tell its containers from the primary's
        servers = tuple(s.model_copy(update={"name": f"{s.label}/{name}"}) for s in servers)
    derived = stage.model_copy(update={
        "container": c.model_copy(update=update), "healthcheck": health, "servers": servers,
        "proxy": stage.proxy if behind_proxy else None, "roles": {},
        # The release command and the hooks run once per deploy, not once per role.
        "release_command": stage.release_command if primary else None,
    })
    return RoleSettings(name, primary, container, derived)
