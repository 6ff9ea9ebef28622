"""A daemon entry's `pipeline:` and its credentials (`token` / `ssh_key`): named like a
pipeline's repository: credentials, the daemon's alone (the file may not name them), and given to
git even in a run that gets no secrets; a fork's test steps run without their secret_env."""
from __future__ import annotations

import pytest

from runner.daemon.config import config_from_dict, repository_pipeline
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model import SecretSource
from runner.repository_pipeline import within_limits
from runner.run_request import RepositoryPipeline
from runner.secrets import Masker, SecretStore

FILE = """version: 1
name: app
repository: {url: https://elsewhere.example.com/x.git}
image: {name: localhost/app}
secrets: {registry: {env: REGISTRY_PASSWORD}, git: {env: GIT_TOKEN}}
"""


def _source(**over) -> RepositoryPipeline:
    return RepositoryPipeline(**{
        "repository": "https://git.example.com/me/app.git", "token": "git", "token_user": "oauth2",
        "secrets": {"git": SecretSource(env="DAEMON_GIT_TOKEN"),
                    "registry": SecretSource(file="/etc/runner/registry")}, **over})


def test_the_file_cannot_name_the_entry_s_credential():
    with pytest.raises(InvalidInput) as caught:
        within_limits(load_pipeline_text(FILE, ".runner.yaml@0123456789ab", environ={}), _source())
    (problem,) = caught.value.problems
    assert (problem.line, problem.column) == (5, 47)
    assert problem.message == ("secret 'git' is the daemon's credential for reading the repository: "
                               "only git gets it (granted: registry)")


def test_the_entry_s_repository_is_reached_with_the_entry_s_credential():
    text = FILE.replace(", git: {env: GIT_TOKEN}", "").replace(
        "x.git}", "x.git, token: registry, token_user: someone}")
    pipeline = within_limits(load_pipeline_text(text, ".runner.yaml", environ={}), _source())
    repo = pipeline.repository
    assert (repo.url, repo.token_secret, repo.token_user, repo.ssh_key_secret) == (
        "https://git.example.com/me/app.git", "git", "oauth2", None)
    assert pipeline.secrets == {"registry": SecretSource(file="/etc/runner/registry"),
                                "git": SecretSource(env="DAEMON_GIT_TOKEN")}


def test_the_entry_names_its_credentials_among_its_secrets(tmp_path):
    entry = {"name": "a", "pipeline": ".runner.yaml", "repo": "https://git.example.com/me/app.git",
             "ssh_key": "deploy_key", "secrets": {"deploy_key": {"file": "keys/deploy"}}}
    cfg = config_from_dict({"base_dir": str(tmp_path), "pipelines": [entry]})
    source = repository_pipeline(cfg.pipelines[0], cfg)
    assert source.ssh_key == "deploy_key" and source.credentials == ("deploy_key",)
    assert source.secrets["deploy_key"].file == str(tmp_path / "keys" / "deploy")
    for bad, why in [({**entry, "ssh_key": "other"}, "ssh_key: 'other' is not one of this entry's secrets"),
                     ({"name": "a", "file": "p.yaml", "token": "t"}, "token and ssh_key reach a repository's")]:
        with pytest.raises(InvalidInput) as caught:
            config_from_dict({"pipelines": [bad]})
        assert why in str(caught.value.problems)


def test_a_run_without_secrets_still_gives_git_the_entry_s_credential(tmp_path):
    from runner.engine import withheld_needs

    text = FILE.replace(", git: {env: GIT_TOKEN}", "") + """stages:
  build: {secrets: [{id: npm, secret: registry}]}
  test: {steps: [{name: unit, commands: [pytest], secret_env: {REGISTRY: registry}}]}
"""
    pipeline = within_limits(load_pipeline_text(text, ".runner.yaml", environ={}), _source())
    store = SecretStore.withheld(pipeline, Masker(), {"DAEMON_GIT_TOKEN": "tok-1234567"}, keep=("git",))
    assert store.value("git") == "tok-1234567"  # the registry's file was not read: it does not exist
    assert store.is_withheld("registry") and not store.is_withheld("git")
    assert withheld_needs(pipeline, "checkout", store) == []
    assert withheld_needs(pipeline, "test", store) == []  # its steps run without it
    assert withheld_needs(pipeline, "build", store) == [("stages.build.secrets[0].secret", "registry")]
