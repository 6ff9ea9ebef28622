"""Test doubles for the two small protocols a stage receives (runner.stage.StageLog and
Secrets), and the outputs of earlier stages for a stage tested on its own. Git, Docker, the
registry and SSH are never doubled: tests use the real ones."""
from __future__ import annotations

from pathlib import Path

from runner.model.image import ImageRef
from runner.outputs import BuildOutputs, CheckoutOutputs, PushOutputs


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


def checkout_outputs(path: str | Path = ".", commit: str = "f" * 40, **over) -> CheckoutOutputs:
    """What a checkout of `commit` into `path` gives (branch `main`), `over` changed."""
    values = dict(commit=commit, branch="main", tag=None, path=Path(path),
                  url="https://example.invalid/t.git", mirror=Path(path) / ".mirror",
                  cloned=True, committed_at="2024-01-01T00:00:00Z")
    return CheckoutOutputs(**{**values, **over})


def build_outputs(tags: list[str] | tuple[str, ...] = (), image_id: str = "",
                  **over) -> BuildOutputs:
    """What a build tagging `tags` gives (`image_id` "": the push checks no image id)."""
    values = dict(image_id=image_id, tags=tuple(tags), builder="buildx", engine="local",
                  cached_steps=0, total_steps=1)
    return BuildOutputs(**{**values, **over})


def push_outputs(ref: str, **over) -> PushOutputs:
    """What a push of `ref` ("name@sha256:...") gives."""
    values = dict(ref=ImageRef.parse(ref), tags=(), verified=True, verification="test",
                  credentials="none (test)")
    return PushOutputs(**{**values, **over})
