"""What a person checks before a deploy, in a few lines: the summary that opens a deploy plan
(`runner exec --dry-run`, the deploy stage's plan) before its argv. Servers, image, strategy,
and for each role its container, env names, secret names (never a value), proxy hosts and
health probe. Pure: reads the plan and the deploy's settings."""
from __future__ import annotations

from typing import Any

from deployers.base import DeployPlan
from deployers.spec import HealthSpec
from runner.model.deploy import DeploySettings
from runner.model.roles import RoleSettings


def plan_summary(stage: DeploySettings, roles: tuple[RoleSettings, ...],
                 plan: DeployPlan) -> dict[str, Any]:
    images = sorted({f"{s.release.image.name}@<the digest the push gives>" if plan.placeholder
                     else str(s.release.image) for s in plan.servers})
    image: Any = images[0] if len(images) == 1 else images
    servers = list(dict.fromkeys(f"{s.target.user}@{s.target.host}:{s.target.port}"
                                 for s in plan.servers))
    out: dict[str, Any] = {
        "servers": servers,
        "image": image,
        "strategy": f"{plan.strategy}, batches {' then '.join('+'.join(b) for b in plan.batches)}"
                    f", on failure {plan.on_failure}",
    }
    secrets = _deploy_secrets(stage)
    if secrets:
        out["secrets"] = secrets
    parts = [_role(role, plan) for role in roles]
    if len(parts) == 1:
        out.update(parts[0])
    else:
        out["roles"] = {role.name: part for role, part in zip(roles, parts)}
    return out


def _deploy_secrets(stage: DeploySettings) -> list[str]:
    """The secrets the deploy itself reads (not a container's env), by name and use."""
    named = [(stage.registry.password_secret, "registry password"),
             (stage.ssh.key_secret, "SSH key"), (stage.ssh.key_passphrase_secret,
                                                  "SSH key passphrase")]
    return [f"{name} ({use})" for name, use in named if name]


def _role(role: RoleSettings, plan: DeployPlan) -> dict[str, Any]:
    s = role.stage
    mine = [p for p in plan.servers if p.release.spec.name == role.container]
    spec = mine[0].release.spec if mine else None
    out: dict[str, Any] = {"container": role.container}
    if len(plan.servers) != len(mine):  # several roles: where this one runs
        out["on"] = list(dict.fromkeys(p.target.label for p in mine))
    if spec is not None:
        out["env"] = [name for name, _value in spec.env] or "none"
        out["secret env"] = [f"{var} (secret {name})" for var, name in spec.secret_env] or "none"
    if s.proxy is not None:
        scheme = "https" if s.proxy.tls else "http"
        hosts = ", ".join(f"{scheme}://{h}{s.proxy.path_prefix}" for h in s.proxy.hosts) or \
            f"any host name, path {s.proxy.path_prefix}"
        out["proxy"] = f"{hosts} -> container port {s.proxy.app_port} (zero downtime)"
    else:
        out["proxy"] = "none (stop-start: the old container stops, then the new one starts)"
    if s.proxy is not None and s.proxy.health is not None:
        out["health"] = (f"GET {s.proxy.health.path} on container port {s.proxy.app_port}, "
                         f"2xx (the proxy's gate)")
    elif spec is not None:
        out["health"] = _health(spec.health)
    return out


def _health(h: HealthSpec) -> str:
    if h.kind == "http":
        codes = "/".join(str(c) for c in h.http_status)
        return (f"GET {h.http_path} on container port {h.http_port or 80}, {codes}, within "
                f"{h.timeout:g} s")
    if h.kind == "cmd":
        return f"the command {h.cmd!r} in the container, within {h.timeout:g} s"
    if h.kind == "image":
        return f"the image's HEALTHCHECK if it has one, then up for {h.min_uptime:g} s"
    return f"up for {h.min_uptime:g} s (no health check)"
