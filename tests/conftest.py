"""What both kinds of test share. The kinds are folders:

- tests/unit: needs neither root nor the lab, runs anywhere in well under a minute
  (`pytest tests/unit`);
- tests/lab: needs the lab (build engine, registries, PostgreSQL, SSH servers; root), brought up
  once per session by tests/lab/conftest.py, which marks every test there `lab`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "tests" / "lab"


def pytest_collection_modifyitems(config, items):
    # One marker, applied by folder, so `-m "not lab"` and `tests/unit` select the same kind.
    for item in items:
        if LAB in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.lab)
