"""A command that looks at what runs (`runner app logs`, `runner status`) opens its pipeline
with `defer_unreadable`: a secret it does not use and cannot read does not stop it, every
readable one is still read and masked, and one it uses but cannot read stops it, named at its
line."""
from __future__ import annotations

import pytest

from runner.errors import InvalidInput
from runner.pipeline_file import open_pipeline

PIPELINE = """\
version: 1
name: app
repository: {url: .}
image: {name: registry.example.com/app}
secrets:
  ssh_key: {env: DEFERRED_TEST_KEY}
  db_password: {file: /nonexistent/db-password}
"""


def test_an_unreadable_secret_stops_only_what_uses_it(tmp_path, monkeypatch):
    f = tmp_path / "pipeline.yml"
    f.write_text(PIPELINE)
    monkeypatch.setenv("DEFERRED_TEST_KEY", "key-value-123")
    with pytest.raises(InvalidInput):  # a run (and a deploy, a rollback) reads every one first
        open_pipeline(f, {})
    opened = open_pipeline(f, {}, defer_unreadable=True)
    assert opened.secrets.value("ssh_key") == "key-value-123"
    assert opened.masker.mask("key is key-value-123") == "key is ***"  # read at once, masked
    with pytest.raises(InvalidInput) as exc:
        opened.secrets.value("db_password")
    (problem,) = exc.value.problems
    assert (problem.file, problem.line, problem.path) == (str(f), 7, "secrets.db_password")
    assert "cannot read /nonexistent/db-password" in problem.message
    assert set(opened.secrets.names()) == {"ssh_key", "db_password"}
