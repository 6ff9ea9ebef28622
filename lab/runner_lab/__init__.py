"""The lab: a build engine, registries, a PostgreSQL cluster and SSH servers with their own
engines, all real, on one Linux machine (network namespaces on a bridge).
`runner lab up|down|status|env`.

layout (pure names, paths, commands) <- host (processes, probes, packages) <- state (state.json,
the lock) <- one module per part: network, registries, postgres, build_engine (with images),
servers <- lab (the order of the parts in up, status and down) <- cli.
"""
