"""Roles, the pure parts: the loader's checks (file:line:col), each role's derived deploy
settings, the one plan over every role (batches by server, the release command once), and
the rollback's refusal when one server's roles would go back to different releases."""
from __future__ import annotations

import textwrap

import pytest

from deployers.app_deployer import AppDeployer, split_releases
from deployers.commands import show
from deployers.spec import Release, release_for
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model import Pipeline
from runner.model.image import ImageRef
from runner.model.roles import primary_role, role_settings

BASE = """\
name: shop
repository: {url: https://example.com/shop.git}
image: {name: registry.example.com/shop}
secrets: {token: {env: TOKEN}, queue: {env: QUEUE}}
stages:
  deploy:
    servers:
      - {host: 10.0.0.1, name: web-1}
      - {host: 10.0.0.2, name: web-2}
      - {host: 10.0.0.3, name: jobs-1}
    container:
      ports: ["8080:8080"]
      env: {MODE: production, QUEUE_URL: plain}
      secret_env: {TOKEN: token}
    healthcheck: {http: {port: 8080, path: /up}, timeout: 30, min_uptime: 3}
"""
ROLES = """\
    roles:
      web: {servers: [web-1, web-2]}
      worker:
        command: python -m shop.worker
        servers: [jobs-1]
        env: {QUEUE_URL: redis://q}
        secret_env: {QUEUE_TOKEN: queue}
"""
IMAGE = ImageRef("registry.example.com/shop", "sha256:" + "a" * 64)


def load(text: str) -> Pipeline:
    return load_pipeline_text(textwrap.dedent(text), "/p/pipeline.yml", environ={})


def problems(text: str) -> list[tuple[int, int, str]]:
    with pytest.raises(InvalidInput) as info:
        load(text)
    return [(p.line, p.column, p.message) for p in info.value.problems]


def test_without_roles_the_deploy_is_one_role_as_it_was():
    p = load(BASE)
    (only,) = role_settings(p.stages.deploy, "shop")
    assert (only.name, only.primary, only.container, only.unit_suffix) == ("web", True, "shop", "")
    assert only.stage is p.stages.deploy


def test_each_role_runs_the_release_with_its_own_command_servers_env_and_health():
    stage = load(BASE + ROLES).stages.deploy
    web, worker = role_settings(stage, "shop")
    assert (web.name, web.container, worker.name, worker.container) == \
        ("web", "shop", "worker", "shop-worker")
    assert [s.label for s in web.stage.servers] == ["web-1", "web-2"]
    assert [s.label for s in worker.stage.servers] == ["jobs-1/worker"]
    assert web.stage.container.ports == ("8080:8080",) and worker.stage.container.ports == ()
    assert worker.stage.container.command == ("python", "-m", "shop.worker")
    assert worker.stage.container.env == {"MODE": "production", "QUEUE_URL": "redis://q"}
    assert worker.stage.container.secret_env == {"TOKEN": "token", "QUEUE_TOKEN": "queue"}
    # The web's HTTP check would fail on a worker: it only has to stay up, HEALTHCHECK off.
    assert web.stage.healthcheck.http is not None
    h = worker.stage.healthcheck
    assert h.http is None and h.cmd is None and not h.image_check and h.min_uptime == 3
    spec = release_for(worker.stage, IMAGE, pipeline="shop", run_id="r1").spec
    assert spec.health.kind == "uptime" and spec.name == "shop-worker"


def test_a_role_s_servers_and_command_may_each_be_one_string():
    text = BASE + "    roles:\n      web: {}\n      worker: {servers: jobs-1, command: run jobs}\n"
    role = load(text).stages.deploy.roles["worker"]
    assert role.servers == ("jobs-1",) and role.command == ("run", "jobs")


def test_a_role_s_plain_env_wins_over_the_app_s_secret_of_that_name():
    text = BASE + ROLES.replace("env: {QUEUE_URL: redis://q}", "env: {TOKEN: not-secret}")
    worker = role_settings(load(text).stages.deploy, "shop")[1]
    assert worker.stage.container.env["TOKEN"] == "not-secret"
    assert "TOKEN" not in worker.stage.container.secret_env


def test_the_primary_role_is_the_proxied_one_else_web_else_the_first():
    proxied = BASE.replace('      ports: ["8080:8080"]\n', "") + "    proxy: {app_port: 8080}\n"
    p = load(proxied + "    roles:\n      api: {proxy: true}\n      web: {proxy: false}\n")
    assert primary_role(p.stages.deploy) == "api"
    api, web = role_settings(p.stages.deploy, "shop")
    assert api.container == "shop" and api.stage.proxy is not None
    assert web.container == "shop-web" and web.stage.proxy is None
    assert web.stage.container.network == "runner"
    p = load(BASE + "    roles:\n      jobs: {}\n      web: {}\n")
    assert primary_role(p.stages.deploy) == "web"
    p = load(BASE + "    roles:\n      jobs: {}\n      mail: {}\n")
    assert primary_role(p.stages.deploy) == "jobs"


def test_role_mistakes_are_located_in_the_file():
    text = BASE + """\
    roles:
      Web: {}
      worker: {servers: [jobs-2]}
accessories:
  cache: {image: redis:7}
"""
    got = problems(text.replace("      worker:", "      cache: {}\n      worker:"))
    assert (17, 7, "role name 'Web': use 1 to 32 of a-z 0-9 '-', "
            "starting and ending with a letter or digit (it is part of container names)") in got
    assert any(line == 18 and "role 'cache' has the name of an accessory" in msg
               for line, _c, msg in got), got
    assert any(line == 19 and "unknown server 'jobs-2' (did you mean 'jobs-1'?)" in msg
               for line, _c, msg in got), got


def test_with_a_proxy_exactly_one_role_is_behind_it():
    proxied = BASE.replace('      ports: ["8080:8080"]\n', "") + "    proxy: {app_port: 8080}\n"
    got = problems(proxied + "    roles:\n      jobs: {}\n      mail: {}\n")
    assert any("no role is behind the proxy" in m for _l, _c, m in got), got
    got = problems(proxied + "    roles:\n      web: {}\n      api: {proxy: true}\n")
    assert any("roles web, api are all behind the proxy" in m for _l, _c, m in got), got
    got = problems(BASE + "    roles:\n      web: {proxy: true}\n")
    assert any("a role says proxy: true, but there is no proxy section" in m
               for _l, _c, m in got), got


def _deployer(text: str) -> AppDeployer:
    p = load(text)
    return AppDeployer(p.stages.deploy, pipeline=p.name, image_name=p.image.name, run_id="r1",
                       image=IMAGE, commit="c" * 40)


def test_one_plan_batches_every_role_by_server_and_runs_the_release_command_once():
    text = BASE + ROLES + "    strategy: canary\n    release_command: [manage, migrate]\n"
    plan = _deployer(text).plan()
    assert plan.batches == (("web-1",), ("web-2", "jobs-1/worker"))
    assert plan.release_on == "web-1"
    assert [s.server for s in plan.servers if s.has("release")] == ["web-1"]
    worker = plan.server("jobs-1/worker")
    run = show(worker.command("run").argv)
    assert run[run.index("--name") + 1] == "shop-worker" and "--no-healthcheck" in run
    assert "--publish" not in run and run[-3:] == ["python", "-m", "shop.worker"]
    assert {str(s.release.image) for s in plan.servers} == {str(IMAGE)}
    # The first server runs only the worker: the release command runs in its container there.
    text = text.replace("web: {servers: [web-1, web-2]}", "web: {servers: [web-2]}") \
        .replace("servers: [jobs-1]", "servers: [web-1]")
    plan = _deployer(text).plan()
    assert plan.batches == (("web-1/worker",), ("web-2",)) and plan.release_on == "web-1/worker"


def test_a_rollback_refuses_roles_of_one_server_going_back_to_different_releases():
    d = _deployer(BASE + ROLES.replace("servers: [jobs-1]", "servers: [web-1]"))
    web, worker = d.roles

    def rel(role, digest: str) -> Release:
        return release_for(role.stage, ImageRef(IMAGE.name, "sha256:" + digest * 64),
                           pipeline="shop", run_id="r0")
    same = {"web-1": rel(web, "1"), "web-1/worker": rel(worker, "1"), "web-2": rel(web, "2")}
    assert split_releases(same, d.server_of()) == []
    split = {**same, "web-1/worker": rel(worker, "3")}
    assert split_releases(split, d.server_of()) == [
        f"web-1: web-1 -> sha256:{'1' * 12}, web-1/worker -> sha256:{'3' * 12}"]
