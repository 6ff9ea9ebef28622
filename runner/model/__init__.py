"""The pipeline model: one YAML file parsed once into immutable, validated objects.

Load it with `runner.loader.load_pipeline`; never build these from untrusted dicts directly,
the loader is what attaches file, line and column to every problem.
"""
from __future__ import annotations

from pydantic import Field

from runner.model.base import Model
from runner.model.build import BuildSecret, BuildStage
from runner.model.deploy import DeployStage
from runner.model.image import Image
from runner.model.push import PushStage, RegistryAuth
from runner.model.scan import ScanStage
from runner.model.source import Repository

STAGE_ORDER = ("checkout", "build", "scan", "push", "deploy")


class SecretSource(Model):
    """Where a secret's value comes from. Exactly one of env / file."""

    env: str | None = None
    file: str | None = None


class CheckoutStage(Model):
    enabled: bool = True


class Stages(Model):
    checkout: CheckoutStage = Field(default_factory=CheckoutStage)
    build: BuildStage = Field(default_factory=BuildStage)
    scan: ScanStage = Field(default_factory=ScanStage)
    push: PushStage = Field(default_factory=PushStage)
    deploy: DeployStage = Field(default_factory=DeployStage)


class Pipeline(Model):
    version: int = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    repository: Repository
    image: Image
    variables: dict[str, str] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, SecretSource] = Field(default_factory=dict)
    stages: Stages = Field(default_factory=Stages)
    # Set by the loader, not by the YAML: the file the pipeline came from.
    source_file: str = Field(default="", exclude=True)


__all__ = [
    "STAGE_ORDER", "BuildSecret", "BuildStage", "CheckoutStage", "DeployStage", "Image",
    "Pipeline", "PushStage", "RegistryAuth", "Repository", "ScanStage", "SecretSource", "Stages",
]
