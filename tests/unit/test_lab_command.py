"""`runner lab` is the lab's command (runner-cd-lab, lab/ of the repository), found by name:
with the lab installed it is the lab's own group; without it, it says how to install it."""
from __future__ import annotations

import sys

from click.testing import CliRunner

from runner.cli import cli
from runner.errors import EXIT_INVALID


class _NoLab:
    """An import finder that finds no runner_lab, as on a machine without runner-cd-lab."""

    def find_spec(self, name, path=None, target=None):
        if name == "runner_lab":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_runner_lab_is_the_installed_lab():
    from runner_lab.cli import lab

    assert cli.get_command(None, "lab") is lab
    assert "lab" in cli.list_commands(None)


def test_runner_lab_without_the_lab_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "runner_lab" or m.startswith("runner_lab.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoLab(), *sys.meta_path])
    for args in (["lab", "status", "--json"], ["lab", "up", "--servers", "1"], ["lab"]):
        result = CliRunner().invoke(cli, args, prog_name="runner")
        assert result.exit_code == EXIT_INVALID, result.output
        assert "the lab is not installed" in result.output
        assert "runner-cd-lab" in result.output and "pip install -e ./lab" in result.output
    assert "lab" in cli.list_commands(None)
