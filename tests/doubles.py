"""Test doubles for the two small protocols a stage receives (pipelines.base.StageLog and
Secrets). Git, Docker, the registry and SSH are never doubled: tests use the real ones."""
from __future__ import annotations


class ListLog:
    """A StageLog that keeps what the stage said, by kind."""

    def __init__(self, on_info=None) -> None:
        self.lines: list[str] = []
        self.infos: list[str] = []
        self.warns: list[str] = []
        self.on_info = on_info

    def line(self, text: str) -> None:
        self.lines.append(text)

    def info(self, text: str) -> None:
        self.infos.append(text)
        if self.on_info:
            self.on_info(text)

    def warn(self, text: str) -> None:
        self.warns.append(text)

    def everything(self) -> str:
        return "\n".join(self.lines + self.infos + self.warns)


class DictSecrets:
    """Secrets from a dict; an unknown name raises KeyError like the real store."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = dict(values or {})

    def value(self, name: str) -> str:
        return self.values[name]
