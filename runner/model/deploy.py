"""Settings of the deploy stage. Owned by the deploy work (issue 3); placeholder until then."""
from __future__ import annotations

from runner.model.base import Model


class DeployStage(Model):
    enabled: bool = False
