"""The daemon config's reference, generated from its model (runner.daemon.config) as the
pipeline's is from runner/model: the generated part of docs/daemon-config.md. `runner schema
--docs docs` writes it with the pipeline's files and `runner schema --check docs` checks it
(`DOCS`: every generated Markdown file, the pipeline's and this one)."""
from __future__ import annotations

from runner.daemon.config import DaemonConfig
from runner.model.reference import GENERATED, REGENERATE, reference

DAEMON_CONFIG_FILE = "daemon-config.md"
DAEMON_CONFIG_BEGIN = (f"<!-- generated from runner/daemon/config.py by `{REGENERATE}`: edit "
                       f"the model's docstrings, not this part -->")


def daemon_config_reference() -> str:
    """The generated part of docs/daemon-config.md (without the markers)."""
    return reference(DaemonConfig)


DOCS = GENERATED + ((DAEMON_CONFIG_FILE, DAEMON_CONFIG_BEGIN, daemon_config_reference),)
