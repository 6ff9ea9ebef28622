"""The one error for deploy settings that cannot work on any server (a missing key, a bad
known_hosts file, an unknown secret): raised before anything is touched, exit 2."""
from __future__ import annotations


class ConfigError(ValueError):
    """The deploy settings cannot work (missing key, bad known_hosts, unknown secret)."""
