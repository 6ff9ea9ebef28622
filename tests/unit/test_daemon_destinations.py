"""A daemon entry's destination and its promotion on a tag, the pure parts: the config's checks
at file:line:col (`destination:` against the pipeline's `destinations:`, `triggers.tag`), which
tags promote (webhook and poll share push_filter), what is queued, and the argv of each run."""
from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from runner.daemon.config import check_config, config_from_dict, load_config
from runner.daemon.scheduler import poll_decisions
from runner.daemon.webhooks import new_run, push_filter
from runner.daemon.worker import exec_argv, promote_argv, rollback_argv
from runner.errors import InvalidInput

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
from harness import AUTH, config, daemon_in_process  # noqa: E402

PIPELINE = """\
name: shop
repository: {url: https://example.com/shop.git}
image: {name: registry.example.com/shop}
variables: {HOST: ""}
destinations:
  staging: {variables: {HOST: 10.0.0.5}}
  production: {variables: {HOST: 10.0.1.5}}
stages:
  deploy:
    servers: ["${HOST}"]
"""
PLAIN = """\
name: plain
repository: {url: https://example.com/plain.git}
image: {name: registry.example.com/plain}
"""


def _config(tmp_path: Path, entries: str) -> Path:
    (tmp_path / "shop.yaml").write_text(PIPELINE)
    (tmp_path / "plain.yaml").write_text(PLAIN)
    f = tmp_path / "daemon.yaml"
    f.write_text("pipelines:\n" + entries)
    return f


def test_a_destination_is_checked_against_the_pipeline_s_destinations(tmp_path):
    f = _config(tmp_path, """\
  - name: staging
    file: shop.yaml
    destination: staging
  - name: qa
    file: shop.yaml
    destination: qa
  - name: none
    file: shop.yaml
  - name: plain
    file: plain.yaml
    destination: staging
  - name: prod
    file: shop.yaml
    destination: production
    triggers: {push: null, tag: {promote_from: stagin}}
""")
    cfg, problems = check_config(f)
    assert cfg is not None
    shop = tmp_path / "shop.yaml"
    said = [str(p) for p in problems]
    assert said == [
        f"{f}:7:5: error: pipelines[1].destination: unknown destination 'qa': {shop}'s "
        f"destinations are staging, production",
        f"{f}:8:5: error: pipelines[2].name: {shop} has destinations (staging, production): name "
        f"the one this entry deploys to with destination: NAME",
        f"{f}:12:5: error: pipelines[3].destination: destination 'staging': "
        f"{tmp_path / 'plain.yaml'} has no destinations: section",
        f"{f}:16:34: error: pipelines[4].triggers.tag.promote_from: unknown destination "
        f"'stagin': {shop}'s destinations are staging, production"], said


@pytest.mark.parametrize("entry,where,message", [
    ("{name: a, file: x, destination: Prod}", "pipelines[0].destination", "expected a string matching"),
    ("{name: a, file: x, triggers: {tag: {promote_from: staging}}}", "pipelines[0]",
     "triggers.tag promotes to the entry's destination: give destination: NAME"),
    ("{name: a, file: x, destination: staging, triggers: {tag: {promote_from: staging}}}",
     "pipelines[0]", "a promotion moves a release between two destinations"),
    ("{name: a, pipeline: p.yaml, repo: /r, destination: production, "
     "triggers: {tag: {promote_from: staging}}}", "pipelines[0]", "(file:), not one read from"),
    ("{name: a, file: x, destination: production, "
     "triggers: {push: {tags: ['v*']}, tag: {promote_from: staging}}}", "pipelines[0]",
     "either builds (triggers.push.tags) or promotes (triggers.tag)"),
])
def test_the_config_refuses_a_promotion_it_cannot_make(tmp_path, entry, where, message):
    f = tmp_path / "daemon.yaml"
    f.write_text(f"pipelines:\n  - {entry}\n")
    with pytest.raises(InvalidInput) as exc:
        load_config(f)
    (problem,) = exc.value.problems
    assert (problem.file, problem.line, problem.path) == (str(f), 2, where), problem
    assert message in problem.message, problem


def test_with_triggers_tag_a_tag_promotes_by_webhook_and_by_poll():
    cfg = config_from_dict({"pipelines": [{
        "name": "prod", "file": "f", "destination": "production",
        "triggers": {"push": None, "tag": {"promote_from": "staging", "tags": ["v*"]},
                     "poll": {"initial": "run"}}}]})
    p = cfg.pipelines[0]
    assert push_filter(p, None, "v1.2") is None
    assert push_filter(p, None, "nightly") == \
        "prod: tag 'nightly' matches none of triggers.tag.tags ['v*']"
    assert push_filter(p, "main", None) == "prod: push trigger disabled"
    current = {"refs/tags/v1": "4" * 40, "refs/heads/main": "5" * 40}
    assert poll_decisions(p, {}, False, current) == (
        [("refs/tags/v1", None, "v1", None, "4" * 40)],
        ["refs/heads/main: push trigger disabled"])
    run = new_run(p, "tag", "github", "refs/tags/v1", None, "v1", "4" * 40, {})
    assert run.destination == "production" and run.tag == "v1"


def test_the_argv_of_a_run_with_a_destination():
    assert exec_argv(["x"], "/p.yaml", 7, Path("/d"), Path("/r.json"), {}, destination="staging") == [
        "x", "/p.yaml", "--json", "--run-id", "7", "--data-dir", "/d", "--request", "/r.json",
        "-d", "staging"]
    assert rollback_argv(["r"], "/p.yaml", 8, None, {}, destination="production") == [
        "r", "rollback", "/p.yaml", "--json", "--run-id", "8", "-d", "production"]
    assert promote_argv(["r"], "/p.yaml", 9, "staging", "production", "a" * 40, {"A": "1"}) == [
        "r", "promote", "/p.yaml", "--from", "staging", "--to", "production", "--commit", "a" * 40,
        "--json", "--run-id", "9", "--var", "A=1"]


def test_the_api_lists_each_entry_s_destination_and_tag_trigger(tmp_path):
    cfg = config(tmp_path, [
        {"name": "staging", "file": "shop.yaml", "destination": "staging"},
        {"name": "production", "file": "shop.yaml", "destination": "production",
         "triggers": {"push": None, "tag": {"promote_from": "staging"}}}])
    with daemon_in_process(cfg) as d:
        listed = httpx.get(f"{d.url}/api/pipelines", headers=AUTH, timeout=10).json()["pipelines"]
    assert [(p["name"], p["destination"]) for p in listed] == [("staging", "staging"),
                                                              ("production", "production")]
    assert listed[1]["triggers"]["tag"] == {"promote_from": "staging", "tags": ["*"]}
