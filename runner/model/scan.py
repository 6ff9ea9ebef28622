"""Settings of the scan stage. Owned by the scan work (issue 4); placeholder until then."""
from __future__ import annotations

from runner.model.base import Model


class ScanStage(Model):
    enabled: bool = False
