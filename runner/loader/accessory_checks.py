"""What the model cannot check alone about `accessories:`: each name a DNS label (it becomes
part of a host name), each server one of `stages.deploy.servers` (whose SSH settings reach it),
some server at all, and an app that can join the runner's network where they are."""
from __future__ import annotations

from typing import Any

from runner.errors import Problem
from runner.loader.locations import SourceMap
from runner.loader.mapping import suggest
from runner.model import Pipeline
from runner.model.accessories import NAME_RE, NETWORK


def accessory_checks(data: dict[str, Any], pipeline: Pipeline | None,
                     smap: SourceMap) -> list[Problem]:
    raw = data.get("accessories")
    if not isinstance(raw, dict):
        return []
    problems = [smap.problem(("accessories", name),
                             f"accessory name {name!r}: use 1 to 32 of a-z 0-9 '-', starting "
                             f"and ending with a letter or digit (it is part of a host name)",
                             key=True)
                for name in raw if not (isinstance(name, str) and NAME_RE.match(name))]
    if pipeline is None or not pipeline.accessories:
        return problems
    deploy = pipeline.stages.deploy
    labels = [s.label for s in deploy.servers]
    known = {*labels, *(s.host for s in deploy.servers)}
    for name, acc in pipeline.accessories.items():
        if not acc.servers and not deploy.servers:
            problems.append(smap.problem(
                ("accessories", name), f"accessory {name!r} has no server: give its servers, "
                "or stages.deploy.servers (an accessory runs on servers of the deploy)",
                key=True))
        written = raw.get(name, {}).get("servers") if isinstance(raw.get(name), dict) else None
        for i, server in enumerate(acc.servers):
            if server in known:
                continue
            path = ("accessories", name, "servers") + ((i,) if isinstance(written, list) else ())
            hint = suggest(server, sorted(labels))
            listed = f"; stages.deploy.servers has {', '.join(labels)}" if labels else \
                "; stages.deploy.servers is empty"
            problems.append(smap.problem(path, f"unknown server {server!r}{hint} (an "
                                         f"accessory runs on servers of the deploy{listed})"))
    network = deploy.container.network
    if network is not None and network != NETWORK:
        problems.append(smap.problem(
            ("stages", "deploy", "container", "network"),
            f"with accessories, the app joins the runner's network ({NETWORK!r}) where they "
            f"are; remove container.network"))
    return problems
