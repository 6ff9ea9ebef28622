"""Accessories, the pure parts: the model and the loader's checks (file:line:col), the spec and
its exact `docker run` argv, the fingerprint, the plan, and the deploy plan's check."""
from __future__ import annotations

import json
import textwrap

import pytest

from deployers.accessory_check import _not_running, states
from deployers.accessory_plan import (LABEL_ACCESSORY, AccessorySpec, accessory_specs,
                                      needed_on, plan_accessory, run_argv)
from deployers.commands import ENV_FILE, show
from deployers.plan import plan_deploy
from deployers.spec import HealthSpec, targets
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model import Pipeline
from runner.model.image import ImageRef

BASE = """\
name: shop
repository: {url: https://example.com/shop.git}
image: {name: registry.example.com/shop}
secrets: {db_password: {env: DB_PASSWORD}}
stages:
  deploy:
    servers:
      - {host: 10.0.0.1, name: web-1}
      - 10.0.0.2
"""
DB = """\
accessories:
  db:
    image: postgres:16
    env: {POSTGRES_USER: shop}
    secret_env: {POSTGRES_PASSWORD: db_password}
    volumes: ["data:/var/lib/postgresql/data"]
    healthcheck: {cmd: "pg_isready -U shop"}
"""


def load(text: str) -> Pipeline:
    return load_pipeline_text(textwrap.dedent(text), "/p/pipeline.yml", environ={})


def problems(text: str) -> list[tuple[int, int, str]]:
    with pytest.raises(InvalidInput) as info:
        load(text)
    return [(p.line, p.column, p.message) for p in info.value.problems]


# --------------------------------------------------------------------------- the file

def test_an_accessory_runs_on_every_deploy_server_unless_it_names_some():
    specs = accessory_specs(load(BASE + DB))
    assert specs["db"].servers == ("web-1", "10.0.0.2")
    one = load(BASE + DB.replace("  db:\n", "  db:\n    servers: 10.0.0.2\n"))
    assert accessory_specs(one)["db"].servers == ("10.0.0.2",)
    assert needed_on(accessory_specs(one)) == {"10.0.0.2": (accessory_specs(one)["db"],)}


def test_an_unknown_server_is_located_and_the_deploy_servers_listed():
    found = problems(BASE + DB.replace("  db:\n", "  db:\n    servers: [web-1, web-2]\n"))
    assert found == [(12, 22, "unknown server 'web-2' (did you mean 'web-1'?) (an accessory "
                              "runs on servers of the deploy; stages.deploy.servers has web-1, "
                              "10.0.0.2)")]


def test_an_accessory_name_must_be_a_dns_label():
    found = problems(BASE + DB.replace("  db:", "  My_DB:"))
    assert found == [(11, 3, "accessory name 'My_DB': use 1 to 32 of a-z 0-9 '-', starting "
                             "and ending with a letter or digit (it is part of a host name)")]


def test_volumes_are_named_volumes():
    found = problems(BASE + DB.replace('"data:/var', '"/srv/pg:/var'))
    assert len(found) == 1 and found[0][:2] == (15, 14)
    assert "must be a volume name" in found[0][2] and "not host directories" in found[0][2]


def test_an_accessory_needs_servers_from_the_deploy():
    text = BASE.split("stages:")[0] + DB
    assert problems(text) == [(6, 3, "accessory 'db' has no server: give its servers, or "
                                     "stages.deploy.servers (an accessory runs on servers of "
                                     "the deploy)")]


def test_an_unknown_secret_in_secret_env_is_located():
    found = problems(BASE + DB.replace("db_password}", "nope}"))
    assert [(line, col) for line, col, _ in found] == [(14, 37)]
    assert "unknown secret 'nope'" in found[0][2]


def test_with_accessories_a_stop_start_app_joins_the_runner_network():
    assert load(BASE).deploy_settings().container.network is None
    assert load(BASE + DB).deploy_settings().container.network == "runner"
    other = BASE.replace("      - 10.0.0.2\n", "      - 10.0.0.2\n    container: {network: "
                                                "backend}\n") + DB
    assert [m for _, _, m in problems(other)] == [
        "with accessories, the app joins the runner's network ('runner') where they are; "
        "remove container.network"]


# --------------------------------------------------------------------------- spec and argv

def test_run_argv_exactly():
    spec = accessory_specs(load(BASE + DB))["db"]
    assert spec.container == "shop-db" and spec.volume_names == ("shop-db-data",)
    assert show(run_argv(spec, ENV_FILE)) == [
        "docker", "run", "--detach", "--name", "shop-db", "--hostname", "shop-db",
        "--network", "runner", "--restart", "always", "--stop-timeout", "30",
        "--label", "runner.accessory=db", "--label", "runner.accessory.of=shop",
        "--label", f"runner.accessory.spec={spec.fingerprint}",
        "--volume", "shop-db-data:/var/lib/postgresql/data",
        "--env-file", "<env file>",
        "--health-cmd", "pg_isready -U shop", "--health-interval", "1s",
        "--health-timeout", "5s", "--health-retries", "3", "--health-start-period", "60s",
        "postgres:16"]
    # Nothing of a secret's value, and no runner.app label: app deploys never see it.
    assert not any("runner.app" in str(w) for w in run_argv(spec, ENV_FILE))


def test_ports_and_command_and_no_env():
    spec = AccessorySpec(name="cache", app="shop", image="redis:7", servers=("a",),
                         ports=("127.0.0.1:6379:6379",), command=("redis-server", "--save", ""))
    argv = show(run_argv(spec, None))
    assert argv[argv.index("--publish") + 1] == "127.0.0.1:6379:6379"
    assert "--env-file" not in argv and "--health-cmd" not in argv
    assert argv[-4:] == ["redis:7", "redis-server", "--save", ""]


def test_the_fingerprint_follows_the_settings_not_the_servers():
    spec = accessory_specs(load(BASE + DB))["db"]
    moved = accessory_specs(load(BASE + DB.replace("  db:\n", "  db:\n    servers: web-1\n")))
    changed = accessory_specs(load(BASE + DB.replace("POSTGRES_USER: shop", "POSTGRES_USER: x")))
    assert moved["db"].fingerprint == spec.fingerprint
    assert changed["db"].fingerprint != spec.fingerprint


def test_the_plan_names_every_command_with_when_it_runs():
    pipeline = load(BASE + DB)
    spec = accessory_specs(pipeline)["db"]
    plan = plan_accessory(spec, targets(pipeline.stages.deploy)[0]).to_dict()
    assert list(plan["commands"]) == ["inspect", "network", "volume:shop-db-data", "start",
                                      "run", "probe", "logs", "stop", "remove",
                                      "volume_rm:shop-db-data"]
    assert plan["commands"]["volume_rm:shop-db-data"] == {
        "phase": "remove", "argv": ["docker", "volume", "rm", "shop-db-data"],
        "when": "remove --volumes: its data is deleted"}
    assert plan["commands"]["stop"]["argv"] == ["docker", "container", "stop", "--time", "30",
                                                "shop-db"]


# --------------------------------------------------------------------------- the deploy

def test_the_deploy_plan_checks_the_accessories_of_each_server_first():
    pipeline = load(BASE + DB.replace("  db:\n", "  db:\n    servers: 10.0.0.2\n"))
    plan = plan_deploy(pipeline.deploy_settings(), pipeline="shop", image_name="r/shop",
                       run_id="r1", image=ImageRef.parse(f"r/shop@sha256:{'a' * 64}"),
                       needs=needed_on(accessory_specs(pipeline)))
    first, second = plan.servers
    assert not first.has("accessories")
    assert second.commands[0].key == "accessories" and second.commands[0].phase == "reach"
    assert second.argv("accessories") == ["docker", "container", "inspect", "shop-db"]
    # The app runs on the runner's network, made where missing (stop-start has no proxy to).
    assert first.argv("network")[-1] == "runner"
    assert "--network" in first.argv("run") and "runner" in first.argv("run")


def _inspect(name: str, status: str, labels: dict, health: str | None = None) -> dict:
    state = {"Status": status, "Running": status == "running"}
    if health:
        state["Health"] = {"Status": health}
    return {"Id": "c" * 64, "Name": f"/{name}", "State": state, "Config": {"Labels": labels}}


def test_what_counts_as_a_running_accessory():
    ours = {LABEL_ACCESSORY: "db"}
    found = states(json.dumps([_inspect("shop-db", "running", ours),
                               _inspect("shop-cache", "exited", ours),
                               _inspect("shop-q", "running", {}),
                               _inspect("shop-s", "running", ours, "unhealthy")]))
    assert _not_running(found["shop-db"]) == ""
    assert _not_running(found["shop-cache"]) == "its container is exited"
    assert "not one the runner booted" in _not_running(found["shop-q"])
    assert _not_running(found["shop-s"]) == "its container is unhealthy"
    assert _not_running(found.get("shop-x")) == "no such container"
    assert states("") == {} and states("not json") == {}


def test_no_healthcheck_means_staying_up():
    spec = accessory_specs(load(BASE + DB.replace('    healthcheck: {cmd: "pg_isready -U shop"}\n',
                                                  "")))["db"]
    assert spec.health == HealthSpec(kind="image", min_uptime=2.0)


def test_the_deploy_stage_and_the_rollback_command_check_the_accessories(monkeypatch):
    from pipelines.deploy import DeployStage
    from runner.cli.deploy import _open

    pipeline = load(BASE + DB)
    dry = DeployStage().plan(pipeline)
    assert [[c["argv"] for c in s["commands"] if c["phase"] == "reach"]
            for s in dry["servers"]] == [[["docker", "container", "inspect", "shop-db"]]] * 2
    monkeypatch.setenv("DB_PASSWORD", "a-long-enough-password")
    _, rollback, _ = _open("p.yml", (), lambda path, variables: pipeline, "r", print)
    assert rollback.needs == needed_on(accessory_specs(pipeline))
