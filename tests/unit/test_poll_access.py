"""The daemon's poll reaches a repository with the credentials its pipeline names, as the checkout
stage does (runner.gitaccess). Real git throughout: the HTTP tests poll a bare repository served by
`git http-backend` behind Basic auth (the server of tests/lab/test_checkout.py)."""
from __future__ import annotations

import logging
import stat
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from runner.daemon.config import config_from_dict
from runner.daemon.scheduler import (
    CredentialsUnavailable,
    Schedules,
    ls_remote,
    pipeline_credentials,
)
from runner.daemon.store import open_store
from runner.gitaccess import remote, repository_access
from runner.model import Repository
from runner.secrets import Masker
from tests.lab.test_checkout import TOKEN, http_origin  # noqa: F401 - the fixture is used by name

ENV = "POLL_TEST_GIT_TOKEN"


def _secret(values: dict[str, str]):
    return lambda name, field_name: values[name]


def test_env_for_a_token_answers_the_prompt_through_askpass(tmp_path):
    repo = Repository.model_validate({"url": "https://git.example:8443/o/r.git", "token": "t"})
    warnings: list[str] = []
    access = repository_access(repo, remote(repo.url), _secret({"t": "tok-value-1234"}), tmp_path,
                               warnings.append)
    env = access.env
    script = Path(env["GIT_ASKPASS"])
    assert script.parent == tmp_path and stat.S_IMODE(script.stat().st_mode) == 0o700
    assert env["RUNNER_GIT_HOST"] == "git.example:8443"
    assert env["RUNNER_GIT_USERNAME"] == "x-access-token"
    assert env["RUNNER_GIT_PASSWORD"] == "tok-value-1234"
    assert env["GIT_TERMINAL_PROMPT"] == "0" and "file" not in env["GIT_ALLOW_PROTOCOL"]
    assert "tok-value-1234" not in script.read_text()
    assert access.mask("x tok-value-1234 y") == "x *** y"
    assert warnings == []
    access.cleanup()
    assert not script.exists()


def test_env_for_an_ssh_key_names_the_key_file_only(tmp_path):
    repo = Repository.model_validate({"url": "git@git.example:o/r.git", "ssh_key": "k"})
    key = "-----BEGIN KEY-----\nAAAAAAAAAAAAAAAAAAAAAAAA\n-----END KEY-----"
    access = repository_access(repo, remote(repo.url), _secret({"k": key}), tmp_path, print)
    cmd = access.env["GIT_SSH_COMMAND"].split()
    key_file = Path(cmd[cmd.index("-i") + 1])
    assert cmd[0] == "ssh" and "IdentitiesOnly=yes" in cmd and "BatchMode=yes" in cmd
    assert key_file.parent == tmp_path and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text() == key + "\n"
    assert "GIT_ASKPASS" not in access.extra
    access.cleanup()
    assert not key_file.exists()


# --- the poll against a real git server -------------------------------------------------------

def _pipeline_file(tmp_path: Path, url: str) -> Path:
    f = tmp_path / "pipeline.yml"
    f.write_text(textwrap.dedent(f"""\
        name: app
        repository:
          url: {url}
          token: repo_token
        image:
          name: 10.87.53.1:5000/team/app
        secrets:
          repo_token: {{env: {ENV}}}
        """))
    return f


def _core(tmp_path: Path, url: str, pipeline_url: str | None = None) -> SimpleNamespace:
    cfg = config_from_dict({"pipelines": [{
        "name": "app", "file": str(_pipeline_file(tmp_path, pipeline_url or url)), "repo": url,
        "triggers": {"poll": {"interval": 60, "initial": "run"}}}]})
    return SimpleNamespace(config=cfg, store=open_store(tmp_path / "runner.db"), masker=Masker(),
                           after_accept=lambda cancel: None)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Where the poll makes its temporary directory, to see that it is gone afterwards."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _all_text(records, exc: BaseException | None = None) -> str:
    parts = [r.getMessage() + repr(r.__dict__) for r in records]
    if exc is not None:
        parts.append(str(exc))
    return "\n".join(parts)


def test_poll_without_credentials_is_refused(tmp_path, http_origin, private_tmp):  # noqa: F811
    with pytest.raises(RuntimeError) as exc:
        ls_remote(http_origin.url, 30)
    assert "ls-remote failed" in str(exc.value)
    assert http_origin.handler.seen_auth and not any(http_origin.handler.seen_auth)  # the 401
    assert not list(private_tmp.iterdir())


def test_poll_with_the_pipelines_token_queues_the_branch_head(
        tmp_path, http_origin, private_tmp, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setenv(ENV, TOKEN)
    core = _core(tmp_path, http_origin.url)
    caplog.set_level(logging.DEBUG)
    ids = Schedules(core).poll("app")
    assert len(ids) == 1
    run = core.store.list_runs(trigger="poll")[0]
    assert (run["branch"], run["commit"]) == ("main", http_origin.first)
    assert core.store.poll_state("app") == {"refs/heads/main": http_origin.first}
    assert any(a.startswith("Basic ") for a in http_origin.handler.seen_auth)
    assert TOKEN not in _all_text(caplog.records)
    assert not list(private_tmp.iterdir())  # askpass script and its directory removed


def test_poll_with_a_wrong_token_fails_without_showing_it(
        tmp_path, http_origin, private_tmp, monkeypatch, caplog):  # noqa: F811
    wrong = "wrong-token-value-4f1e2d"
    monkeypatch.setenv(ENV, wrong)
    core = _core(tmp_path, http_origin.url)
    caplog.set_level(logging.DEBUG)
    assert Schedules(core).poll("app") == []
    error = core.store._read("SELECT error FROM poll_state WHERE pipeline='app'")[0]["error"]
    assert "ls-remote failed" in error
    assert wrong not in error and wrong not in _all_text(caplog.records)
    assert core.store.list_runs(trigger="poll") == []
    assert not list(private_tmp.iterdir())


def test_poll_with_a_missing_secret_names_it_and_queues_nothing(
        tmp_path, http_origin, private_tmp, monkeypatch, caplog):  # noqa: F811
    monkeypatch.delenv(ENV, raising=False)
    core = _core(tmp_path, http_origin.url)
    caplog.set_level(logging.DEBUG)
    assert Schedules(core).poll("app") == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].pipeline == "app"
    assert "'app'" in errors[0].error and "repo_token" in errors[0].error and ENV in errors[0].error
    assert core.store.list_runs(trigger="poll") == []
    assert http_origin.handler.seen_auth == []  # git never ran


def test_token_is_not_sent_to_another_host(tmp_path, http_origin, monkeypatch):  # noqa: F811
    monkeypatch.setenv(ENV, TOKEN)
    core = _core(tmp_path, http_origin.url, pipeline_url="https://git.example/team/app.git")
    creds = pipeline_credentials(core.config.pipelines[0], core.config, core.masker)
    assert creds is not None
    with pytest.raises(CredentialsUnavailable) as exc:
        ls_remote(http_origin.url, 30, creds, core.masker)
    assert "git.example" in str(exc.value) and TOKEN not in str(exc.value)
    assert http_origin.handler.seen_auth == []


def test_an_unloadable_pipeline_file_polls_without_credentials(tmp_path, caplog):
    cfg = config_from_dict({"pipelines": [{"name": "app", "file": str(tmp_path / "missing.yml"),
                                           "repo": "/srv/app.git"}]})
    warnings: list[str] = []
    assert pipeline_credentials(cfg.pipelines[0], cfg, Masker(), warn=warnings.append) is None
    assert len(warnings) == 1 and "'app'" in warnings[0] and "missing.yml" in warnings[0]
