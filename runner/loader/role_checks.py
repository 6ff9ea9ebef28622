"""What the model cannot check alone about `stages.deploy.roles:`: each name a DNS label (it
becomes part of container names), not an accessory's name (both are `<app>-<NAME>`), each
server one of `stages.deploy.servers`, and, with a proxy, exactly one role behind it."""
from __future__ import annotations

from typing import Any

from runner.errors import Problem
from runner.loader.locations import SourceMap
from runner.loader.mapping import suggest
from runner.model import Pipeline
from runner.model.roles import DEFAULT_ROLE, ROLE_NAME_RE

_AT = ("stages", "deploy", "roles")


def role_checks(data: dict[str, Any], pipeline: Pipeline | None,
                smap: SourceMap) -> list[Problem]:
    stages = data.get("stages")
    deploy = stages.get("deploy") if isinstance(stages, dict) else None
    raw = deploy.get("roles") if isinstance(deploy, dict) else None
    if not isinstance(raw, dict):
        return []
    problems = [smap.problem((*_AT, name),
                             f"role name {name!r}: use 1 to 32 of a-z 0-9 '-', starting and "
                             f"ending with a letter or digit (it is part of container names)",
                             key=True)
                for name in raw if not (isinstance(name, str) and ROLE_NAME_RE.match(name))]
    if pipeline is None or not pipeline.stages.deploy.roles:
        return problems
    stage = pipeline.stages.deploy
    for name in stage.roles:
        if name in pipeline.accessories:
            problems.append(smap.problem(
                (*_AT, name), f"role {name!r} has the name of an accessory: both would be "
                f"the container {pipeline.name}-{name}; rename one", key=True))
    labels = [s.label for s in stage.servers]
    known = {*labels, *(s.host for s in stage.servers)}
    for name, role in stage.roles.items():
        written = raw.get(name, {}).get("servers") if isinstance(raw.get(name), dict) else None
        for i, server in enumerate(role.servers):
            if server in known:
                continue
            path = (*_AT, name, "servers") + ((i,) if isinstance(written, list) else ())
            problems.append(smap.problem(path, f"unknown server {server!r}"
                                         f"{suggest(server, sorted(labels))} (a role runs on "
                                         f"servers of the deploy: {', '.join(labels)})"))
    if stage.proxy is not None:
        proxied = [n for n, r in stage.roles.items()
                   if (r.proxy if r.proxy is not None else n == DEFAULT_ROLE)]
        if len(proxied) > 1:
            problems.append(smap.problem(
                _AT, f"roles {', '.join(proxied)} are all behind the proxy: one role is (the "
                f"app has one route); set proxy: false on the others", key=True))
        elif not proxied:
            problems.append(smap.problem(
                _AT, f"no role is behind the proxy: name one `{DEFAULT_ROLE}` or set proxy: "
                f"true on it (roles: {', '.join(stage.roles)})", key=True))
    return problems
