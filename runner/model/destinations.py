"""Destinations: one pipeline, several places to deploy it (staging, production), each a named
set of values for the file's `${VAR}`s (Kamal's `-d`). `runner exec|status|releases|rollback|
app|deploy-lock -d NAME` loads the file with that destination's `variables` over the
top-level `variables:`; `runner promote --from A --to B` moves A's last verified release to B.

Example:

    variables: {DEPLOY_HOST: localhost, APP_ENV: dev}
    destinations:
      staging: {variables: {DEPLOY_HOST: 10.0.0.5, APP_ENV: staging}}
      production: {variables: {DEPLOY_HOST: 10.0.1.5, APP_ENV: production}}
    stages:
      deploy: {servers: ["${DEPLOY_HOST}"]}

Each destination keeps its own release history and deploy lock on its servers.
"""
from __future__ import annotations

import re

from pydantic import Field

from runner.model.base import Model

# A destination's name goes into the key of its history and lock on a server
# (deployers.spec.release_key): a DNS label, like an accessory's name.
DESTINATION_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class Destination(Model):
    """One place to deploy the pipeline to."""

    variables: dict[str, str] = Field(default_factory=dict,
                                      examples=[{"DEPLOY_HOST": "10.0.1.5"}])
    """Values for `${NAME}` when this destination is chosen (`-d NAME`): they replace the
    top-level `variables:` of the same name; `--var` and the environment still win."""
