"""The test stage's pure parts: steps and services as container configs, orphans, readiness,
JUnit summaries of real pytest reports, and the loader's errors for its keys."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.junit_summary import summarise
from pipelines.testing import TestStage, failed_tests, listening
from pipelines.testing_plan import (
    Owner, cache_volume, create_kwargs, is_orphan, operations, owner_labels, service_spec,
    step_spec,
)
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model import Pipeline
from runner.outputs import TestFailure, TestOutputs

OWNER = Owner("r1", 4242, 777, "box")
LABELS = {"runner.test": "1", "runner.run": "r1", "runner.proc.pid": "4242",
          "runner.proc.start_time": "777", "runner.proc.host": "box"}


def pipeline(test: dict) -> Pipeline:
    return Pipeline.model_validate({"name": "shop", "repository": {"url": "."},
                                    "image": {"name": "reg/shop"}, "stages": {"test": test}})


TEST = {"services": {"db": {"image": "reg/lab/postgres:15", "env": {"POSTGRES_PASSWORD": "t"},
                            "secret_env": {"TOKEN": "tok"}, "command": ["postgres", "-N", "5"],
                            "ready": {"port": 5432}}},
        "cache": ["/root/.cache/pip"],
        "steps": [{"name": "unit", "commands": ["pytest -q"], "env": {"A": "1"},
                   "secret_env": {"API": "api"}, "user": "10001", "reports": ["r/*.xml"]},
                  {"name": "lint", "image": "python:3.11", "commands": ["ruff ."],
                   "cache": ["/root/.cache/ruff"], "timeout": 30}]}


def test_a_service_is_a_container_on_the_run_network_reached_by_its_name():
    spec = service_spec(pipeline(TEST).stages.test, "db", OWNER)
    assert create_kwargs(spec, {"TOKEN": "s3cret"}) == {
        "image": "reg/lab/postgres:15", "name": "runner-test-r1-service-db",
        "labels": {**LABELS, "runner.test.service": "db"},
        "environment": {"POSTGRES_PASSWORD": "t", "TOKEN": "s3cret"},
        "network": "runner-test-r1",
        "networking_config": {"runner-test-r1": {"Aliases": ["db"]}},
        "detach": True, "command": ["postgres", "-N", "5"]}
    assert "s3cret" not in str(spec.to_dict())  # what --dry-run prints names the secret only


def test_a_step_of_one_command_runs_it_as_its_container_s_process_with_the_stage_cache():
    """As `docker run` does: no idle shell and no exec for a step of one command."""
    spec = step_spec(pipeline(TEST).stages.test, 0, OWNER, "shop", "sha256:abc")
    assert create_kwargs(spec, {"API": "v"}) == {
        "image": "sha256:abc", "name": "runner-test-r1-step-1-unit",
        "labels": {**LABELS, "runner.test.step": "unit"},
        "environment": {"A": "1", "API": "v"}, "network": "runner-test-r1",
        "networking_config": {"runner-test-r1": {"Aliases": []}}, "detach": True,
        "entrypoint": ["sh", "-c", "pytest -q"], "command": [], "user": "10001",
        "volumes": {cache_volume("shop", "/root/.cache/pip"):
                    {"bind": "/root/.cache/pip", "mode": "rw"}}}
    assert spec.commands == ("pytest -q",) and not spec.workspace and spec.runs_its_command


def test_a_step_of_several_commands_waits_in_sh_while_each_is_exec_d():
    settings = pipeline({"steps": [{"name": "unit", "commands": ["make", "pytest"]}]}).stages.test
    spec = step_spec(settings, 0, OWNER, "shop", "sha256:abc")
    kwargs = create_kwargs(spec, {})
    assert (kwargs["entrypoint"], kwargs["command"], kwargs["stdin_open"]) == (["sh"], [], True)
    assert not spec.runs_its_command
    assert [(op["op"], op.get("argv")) for op in operations(settings, OWNER, "shop")] == [
        ("container create+start", None), ("exec", ["sh", "-c", "make"]),
        ("exec", ["sh", "-c", "pytest"]), ("container remove", None)]


def test_without_services_the_steps_get_no_network_of_their_own():
    """Nothing to reach by name: the steps use the engine's default network, as `docker run`
    does, instead of paying for a network created and removed around them."""
    settings = pipeline({"steps": [{"name": "unit", "commands": ["true"]}]}).stages.test
    kwargs = create_kwargs(step_spec(settings, 0, OWNER, "shop", "sha256:abc"), {})
    assert "network" not in kwargs and "networking_config" not in kwargs
    assert [op["op"] for op in operations(settings, OWNER, "shop")] == [
        "container create+start+wait", "container remove"]


def test_a_step_in_another_image_works_in_the_copied_checkout():
    spec = step_spec(pipeline(TEST).stages.test, 1, OWNER, "shop")
    assert spec.workspace and spec.workdir == "/workspace" and spec.timeout == 30
    assert sorted(spec.volumes.values()) == ["/root/.cache/pip", "/root/.cache/ruff"]


def test_cache_volumes_are_stable_per_pipeline_and_path():
    assert cache_volume("shop", "/root/.cache/pip") == cache_volume("shop", "/root/.cache/pip/")
    assert cache_volume("shop", "/root/.cache/pip") != cache_volume("cart", "/root/.cache/pip")
    assert cache_volume("shop", "/a") != cache_volume("shop", "/b")


def test_orphans_are_those_of_a_gone_runner_on_this_host():
    labels = owner_labels(OWNER)
    assert not is_orphan(labels, "box", lambda pid: 777)  # still running
    assert is_orphan(labels, "box", lambda pid: None)  # gone
    assert is_orphan(labels, "box", lambda pid: 999)  # pid reused by another process
    assert not is_orphan(labels, "other-host", lambda pid: None)  # not ours to judge


def test_listening_reads_proc_net_tcp():
    text = ("  sl  local_address rem_address   st\n"
            "   0: 00000000:1538 00000000:0000 0A 00000000:00000000\n"
            "   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000\n")
    assert listening(text, 5432)
    assert not listening(text, 8080)  # established, not listening


def test_dry_run_plan_lists_the_docker_operations():
    plan = TestStage().plan(pipeline(TEST))
    ops = [op["op"] for op in plan["docker"]]
    assert ops[0] == "network create" and ops[-1] == "network remove"
    runs = [op["entrypoint"] for op in plan["docker"] if op["op"] == "container create+start+wait"]
    assert runs == [["sh", "-c", "pytest -q"], ["sh", "-c", "ruff ."]]


def test_junit_summary_of_a_real_pytest_report(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip\n"
        "def test_skip(): pass\n")
    report = tmp_path / "unit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}", "test_x.py"], cwd=tmp_path, capture_output=True)
    s = summarise(report, "unit")
    assert s.counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "total": 3}
    assert [(f.test, f.message) for f in s.failures] == [
        ("test_x.test_bad", "AssertionError: one is not two")]
    assert s.warnings == []


def test_garbage_xml_is_a_warning_naming_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<testsuite><oops")
    s = summarise(bad, "unit", "/app/reports/bad.xml")
    assert s.counts["total"] == 0
    assert len(s.warnings) == 1 and "/app/reports/bad.xml" in s.warnings[0]


HEAD = "name: t\nrepository: {url: .}\nimage: {name: reg/app}\nstages:\n  test:\n"


@pytest.mark.parametrize("body,where,fragment", [
    ("    steps:\n      - name: unit\n        commands: [x]\n        comand: [y]\n",
     "9:9", "unknown key 'comand' (did you mean 'commands'?)"),
    ("    steps:\n      - name: unit\n        commands: []\n", "8:19",
     "a step needs at least one command"),
    ("    services:\n      Big_DB: {image: pg}\n    steps:\n      - {name: u, commands: [x]}\n",
     "7:7", "service name 'Big_DB' is not a DNS label"),
    ("    steps:\n      - {name: u, commands: [x]}\n      - {name: u, commands: [y]}\n",
     "7:7", "steps 1 and 2 are both named 'u'"),
])
def test_loader_errors_say_file_line_column(body, where, fragment):
    with pytest.raises(InvalidInput) as info:
        load_pipeline_text(HEAD + body, "/p/pipeline.yml", environ={})
    found = [f"{p.line}:{p.column} {p.message}" for p in info.value.problems]
    assert len(found) == 1 and found[0].startswith(where) and fragment in found[0], found


def test_a_failure_reason_names_the_failed_tests_three_at_most():
    def outputs(n: int) -> TestOutputs:
        return TestOutputs(passed=False, steps=(), services=(),
                           counts={"passed": 1, "failed": n, "errors": 0, "skipped": 0,
                                   "total": n + 1},
                           failures=tuple(TestFailure("unit", f"t.test_{i}", "no")
                                          for i in range(n)))
    assert failed_tests(outputs(1)) == " (1 passed, 1 failed: t.test_0)"
    assert failed_tests(outputs(5)) == \
        " (1 passed, 5 failed: t.test_0, t.test_1, t.test_2 and 2 more)"
    assert failed_tests(outputs(0)) == ""
