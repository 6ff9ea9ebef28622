"""The test stage on the lab's build engine: real containers, a real PostgreSQL service, real
JUnit reports; what a failure, a hang, a service that never gets ready and a SIGKILLed runner
leave behind (nothing)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import docker
import httpx
import pytest

from pipelines.testing import TestStage
from pipelines.testing_plan import cache_volume
from runner.errors import StageFailed
from runner_lab import layout
from runner.model import Pipeline
from runner.outputs import Outputs
from runner.stage import StageContext
from tests.doubles import DictSecrets, ListLog, build_outputs, checkout_outputs
from tests.helpers import MANIFEST_TYPES, exec_json, lab_env, make_repo, runner, stage_end

pytestmark = pytest.mark.usefixtures("lab")
PG = f"{layout.REGISTRY}/lab/postgres:15"
XML = ("mkdir -p /tmp/r && printf '<testsuite><testcase classname=\"t\" name=\"ok\"/>"
       "<testcase classname=\"t\" name=\"{name}\"><failure message=\"{msg}\"/></testcase>"
       "</testsuite>' > /tmp/r/unit.xml")


@pytest.fixture
def engine():
    client = docker.DockerClient(base_url=layout.BUILD_DOCKER_HOST)
    yield client
    client.close()


def leftovers(client, run_id: str) -> list[str]:
    f = {"label": f"runner.run={run_id}"}
    return [c.name for c in client.containers.list(all=True, filters=f)] + \
        [n.name for n in client.networks.list(filters=f)]


def make_ctx(tmp: Path, engine, test: dict, run_id: str, image: str = layout.BUSYBOX_IMAGE,
             name: str = "tst"):
    pipeline = Pipeline.model_validate({"name": name, "repository": {"url": "."},
                                        "image": {"name": "reg/tst"}, "stages": {"test": test}})
    return StageContext(run_id=run_id, pipeline=pipeline, workdir=tmp, cache_dir=tmp / "cache",
                        log=ListLog(), secrets=DictSecrets(), cancel=threading.Event(),
                        outputs=Outputs(checkout=checkout_outputs(tmp),
                                        build=build_outputs(image_id=engine.images.get(image).id)))


@pytest.fixture(autouse=True)
def _build_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", layout.BUILD_DOCKER_HOST)


def test_postgres_service_and_a_report(tmp_path, engine):
    step = {"name": "unit", "env": {"DB": "db"}, "reports": ["/tmp/r/*.xml"], "commands": [
        "python3 -c 'import os, socket; socket.create_connection((os.environ[\"DB\"], 5432), 5)'",
        XML.format(name="db_down", msg="no").replace("<failure message=\"no\"/>", "<skipped/>")]}
    ctx = make_ctx(tmp_path, engine, {"services": {"db": {
        "image": PG, "env": {"POSTGRES_PASSWORD": "t"}, "ready": {"port": 5432}}},
        "steps": [step]}, "lab-pg", image=layout.PYTHON_IMAGE)
    out = TestStage().run(ctx)
    assert out.passed and out.services == ("db",)
    assert out.counts == {"passed": 1, "failed": 0, "errors": 0, "skipped": 1, "total": 2}
    assert leftovers(engine, "lab-pg") == []
    # Where the time went, cleanup included (it happens after the steps).
    assert all(out.phases[k] > 0 for k in ("network", "service_start", "service_ready", "steps",
                                           "reports", "cleanup")), out.phases


def test_the_lab_postgres_image_gives_postgres_user_its_database_and_password(tmp_path,
                                                                           engine):
    """The lab's image (cluster made at build time) as the official one: POSTGRES_USER gets
    POSTGRES_PASSWORD (quotes and all) and a database of its name; a wrong password is refused.
    Checked with the image's own psql, from a step on the run's network."""
    password = "it's \"q\""
    ctx = make_ctx(tmp_path, engine, {
        "services": {"db": {"image": PG, "ready": {"port": 5432},
                            "env": {"POSTGRES_USER": "app", "POSTGRES_PASSWORD": password}}},
        "steps": [{"name": "psql", "image": PG,
                   "env": {"PGHOST": "db", "PGUSER": "app", "PGPASSWORD": password},
                   "commands": ["psql -d app -tAc 'select current_user, current_database()' "
                                "| grep -x 'app|app'",
                                "! PGPASSWORD=wrong psql -d app -c 'select 1'"]}]}, "lab-pg-user")
    out = TestStage().run(ctx)
    assert out.passed, ctx.log.everything()
    assert leftovers(engine, "lab-pg-user") == []


def test_a_failing_test_fails_naming_it_and_stops_the_steps(tmp_path, engine):
    ctx = make_ctx(tmp_path, engine, {"steps": [
        {"name": "unit", "reports": ["/tmp/r/*.xml"],
         "commands": [XML.format(name="test_insert", msg="1 != 2"), "exit 3", "echo never"]},
        {"name": "lint", "commands": ["true"]}]}, "lab-fail")
    with pytest.raises(StageFailed) as info:
        TestStage().run(ctx)
    assert "step 'unit' failed: 'exit 3' exited with code 3" in info.value.reason
    out = info.value.outputs.to_dict()
    assert [s["status"] for s in out["steps"]] == ["failed", "not run"]
    assert out["failures"][0]["test"] == "t.test_insert" and out["summary"] == "1 passed, 1 failed"
    assert "FAILED t.test_insert: 1 != 2" in ctx.log.everything()
    assert "never" not in ctx.log.everything()


def test_a_fork_s_run_tests_without_its_secrets_saying_which(tmp_path, engine):
    """A pull request from a fork (--withhold-secrets): the steps and services run with their
    secret_env absent (not empty), and a warning per container says which and why."""
    from runner.errors import WITHHELD_WHY
    from runner.secrets import Masker, SecretStore

    ctx = make_ctx(tmp_path, engine, {
        "services": {"side": {"image": layout.BUSYBOX_IMAGE, "command": ["sleep", "600"],
                              "secret_env": {"SIDE_TOKEN": "api_token"}}},
        "steps": [{"name": "unit", "env": {"PLAIN": "x"}, "secret_env": {"API_TOKEN": "api_token"},
                   "commands": ['test -z "${API_TOKEN+set}" && test "$PLAIN" = x']}]}, "lab-fork")
    ctx.secrets = SecretStore({}, Masker(), withheld=("api_token",))
    out = TestStage().run(ctx)
    assert out.passed and [s.status for s in out.steps] == ["passed"]
    assert ctx.log.warns == [
        f"service side: runs without secret_env SIDE_TOKEN (secret 'api_token'): withheld ({WITHHELD_WHY})",
        f"step unit: runs without secret_env API_TOKEN (secret 'api_token'): withheld ({WITHHELD_WHY})"]
    assert leftovers(engine, "lab-fork") == []


def test_a_hanging_step_is_killed_at_its_timeout_and_services_removed(tmp_path, engine):
    ctx = make_ctx(tmp_path, engine, {
        "services": {"side": {"image": layout.BUSYBOX_IMAGE, "command": ["sleep", "600"]}},
        "steps": [{"name": "hang", "timeout": 2, "commands": ["sleep 600"]}]}, "lab-hang")
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as info:
        TestStage().run(ctx)
    assert time.monotonic() - t0 < 30
    assert "step 'hang' timed out after 2s in: sleep 600" in info.value.reason
    assert leftovers(engine, "lab-hang") == []


def test_a_service_never_ready_fails_naming_it_with_its_log(tmp_path, engine):
    ctx = make_ctx(tmp_path, engine, {
        "services": {"cache": {"image": layout.BUSYBOX_IMAGE, "timeout": 2,
                               "command": ["sh", "-c", "echo booting slowly; sleep 600"],
                               "ready": {"port": 6379}}},
        "steps": [{"name": "unit", "commands": ["true"]}]}, "lab-ready")
    with pytest.raises(StageFailed) as info:
        TestStage().run(ctx)
    assert "service 'cache' was not ready (port 6379) within 2s" in info.value.reason
    assert "booting slowly" in info.value.reason
    assert leftovers(engine, "lab-ready") == []


def test_a_target_that_fails_to_build_fails_the_stage_while_a_service_starts(tmp_path, engine):
    """The step's Dockerfile target is built while the services start: a build that fails fails
    the stage with the build's error as soon as it does (not after the service's wait, which
    would be 30 s here), and the service is removed."""
    (tmp_path / "Dockerfile").write_text(f"FROM {layout.BUSYBOX_IMAGE} AS test\n"
                                         "RUN echo broken recipe; exit 7\n")
    ctx = make_ctx(tmp_path, engine, {
        "services": {"slow": {"image": layout.BUSYBOX_IMAGE, "timeout": 30,
                              "command": ["sleep", "600"], "ready": {"port": 6379}}},
        "steps": [{"name": "unit", "image": {"target": "test"}, "commands": ["true"]}]},
        "lab-target-fails")
    with pytest.raises(StageFailed) as info:
        TestStage().run(ctx)
    assert "building Dockerfile target 'test' failed" in info.value.reason, info.value.reason
    assert "broken recipe" in info.value.reason
    assert leftovers(engine, "lab-target-fails") == []


def test_a_service_that_fails_stops_the_target_build_beside_it(tmp_path, engine):
    """A service that exits while the target is being built fails the stage naming the
    service; the build (300 s of sleep) is stopped, not waited for, and nothing is left."""
    (tmp_path / "Dockerfile").write_text(f"FROM {layout.BUSYBOX_IMAGE} AS test\n"
                                         f"RUN sleep 300 # {uuid.uuid4().hex}\n")
    ctx = make_ctx(tmp_path, engine, {
        "services": {"db": {"image": layout.BUSYBOX_IMAGE, "ready": {"port": 6379},
                            "command": ["sh", "-c", "sleep 5; exit 3"]}},
        "steps": [{"name": "unit", "image": {"target": "test"}, "commands": ["true"]}]},
        "lab-service-fails")
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as info:
        TestStage().run(ctx)
    assert "service 'db' exited (code 3) before it was ready" in info.value.reason
    assert "building target:" in ctx.log.everything()  # it had started, beside the service
    assert time.monotonic() - t0 < 120
    iidfile = str(tmp_path / "test" / "target-test.id")
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit()
                and iidfile in _cmdline(pid)], "the docker build is still running"
    assert leftovers(engine, "lab-service-fails") == []


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_a_cache_is_kept_between_runs_of_its_pipeline_and_no_other(tmp_path, engine):
    """`cache:` is a named volume on the build engine per pipeline and path: what run 1 wrote,
    run 2 of the same pipeline reads; another pipeline's step sees an empty directory."""
    mine, other = f"cache-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"

    def run(pipeline: str, run_id: str, commands: list[str]) -> None:
        (tmp_path / run_id).mkdir()
        TestStage().run(make_ctx(tmp_path / run_id, engine, {
            "cache": ["/cache"], "steps": [{"name": "s", "commands": commands}]}, run_id,
            name=pipeline))

    try:
        run(mine, "lab-cache-1", ["test ! -e /cache/seen", "echo 'run 1' > /cache/seen"])
        assert engine.volumes.get(cache_volume(mine, "/cache")).name  # a real named volume
        run(mine, "lab-cache-2", ["grep -qx 'run 1' /cache/seen"])
        run(other, "lab-cache-3", ["test ! -e /cache/seen"])
    finally:
        for pipeline in (mine, other):
            with contextlib.suppress(docker.errors.NotFound):
                engine.volumes.get(cache_volume(pipeline, "/cache")).remove()


def test_no_report_and_garbage_xml_are_warnings(tmp_path, engine):
    ctx = make_ctx(tmp_path, engine, {"steps": [{
        "name": "unit", "reports": ["/tmp/r/*.xml", "/nowhere/*.xml"],
        "commands": ["mkdir -p /tmp/r && echo '<testsuite><oops' > /tmp/r/bad.xml"]}]},
        "lab-warn")
    out = TestStage().run(ctx)
    assert out.passed and out.counts["total"] == 0
    warnings = "\n".join(ctx.log.warns)
    assert "report /tmp/r/bad.xml is not JUnit XML" in warnings
    assert "report glob '/nowhere/*.xml' matched no file" in warnings


def test_a_sigkilled_runner_leaves_nothing_after_the_next_run(tmp_path, engine):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Dockerfile").write_text(f"FROM {layout.BUSYBOX_IMAGE}\nRUN echo built > /built\n")
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "x"], check=True)
    (tmp_path / "p.yaml").write_text(json.dumps({
        "name": "killed", "repository": {"url": str(repo)},
        "image": {"name": f"{layout.REGISTRY}/lab-test/killed"},
        "stages": {"test": {"services": {"side": {"image": layout.BUSYBOX_IMAGE,
                                                  "command": ["sleep", "600"]}},
                            "steps": [{"name": "s", "commands": ["sleep 600"]}]}}}))
    env = {**os.environ, "RUNNER_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "runner", "exec", str(tmp_path / "p.yaml"),
                             "--only", "checkout,build,test"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    f = {"label": f"runner.proc.pid={proc.pid}"}
    deadline = time.monotonic() + 60
    while not any("step" in c.name for c in engine.containers.list(filters=f)):
        assert time.monotonic() < deadline and proc.poll() is None, "the step never started"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(engine.containers.list(all=True, filters=f)) == 2  # left behind, for now
    ctx = make_ctx(tmp_path / "next", engine, {"steps": [{"name": "ok", "commands": ["true"]}]},
                   "lab-next")
    (tmp_path / "next").mkdir()
    TestStage().run(ctx)
    assert engine.containers.list(all=True, filters=f) == []
    assert engine.networks.list(filters=f) == []
    assert "left by a runner process that is gone" in ctx.log.everything()


def test_runner_exec_with_a_failing_test_pushes_and_deploys_nothing(lab, tmp_path):
    """As a user runs it: `runner exec` of a pipeline whose test step fails exits 1, push and
    deploy are skipped (the registry has no such tag), and the failing test's name is in the
    terminal, the --json events and run.json."""
    repo = make_repo(tmp_path / "repo", {"Dockerfile": f"FROM {layout.BUSYBOX_IMAGE}\n"
                                                       "RUN echo built > /built\n"})
    name = f"lab-test/failing-{uuid.uuid4().hex[:8]}"
    tag = "never-pushed"
    step = {"name": "unit", "reports": ["/tmp/r/*.xml"],
            "commands": [XML.format(name="test_insert", msg="1 != 2"), "exit 3"]}
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "name": "failing", "repository": {"url": str(repo)},
        "image": {"name": f"{lab['registry']}/{name}", "tags": [tag]},
        "stages": {"test": {"steps": [step]},
                   "deploy": {"servers": "${DEPLOY_HOSTS}",
                              "ssh": {"key_file": "${SSH_KEY_FILE}",
                                      "known_hosts": "${KNOWN_HOSTS_FILE}"},
                              "container": {"name": "never-deployed"}}}}))
    env = lab_env(lab)
    data = tmp_path / "data"
    plain = runner("exec", str(pipeline), "--data-dir", str(data), "--run-id", "fail-plain",
                   env=env)
    assert plain.returncode == 1, plain.stdout[-3000:] + plain.stderr[-3000:]
    terminal = plain.stdout + plain.stderr
    # The last word on the run names the failing test, not only the log lines above it.
    assert "stage 'test' failed: step 'unit' failed: 'exit 3' exited with code 3 " \
           "(1 passed, 1 failed: t.test_insert)" in terminal, terminal[-3000:]
    assert "FAILED t.test_insert: 1 != 2" in terminal, terminal[-3000:]

    proc, evs = exec_json(pipeline, data, "fail-json", env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {e["stage"]: e["status"] for e in evs if e["event"] == "stage.end"}
    assert status == {"checkout": "success", "build": "success", "test": "failed",
                      "push": "skipped", "deploy": "skipped"}, status
    outputs = stage_end(evs, "test")["outputs"]
    assert outputs["failures"][0]["test"] == "t.test_insert", outputs
    assert outputs["steps"][0]["failed_command"] == "exit 3"
    run_json = json.loads((data / "runs" / "fail-json" / "run.json").read_text())
    test = next(s for s in run_json["stages"] if s["name"] == "test")
    assert test["outputs"]["failures"][0]["test"] == "t.test_insert", test
    assert test["outputs"]["summary"] == "1 passed, 1 failed"
    assert "t.test_insert" in run_json["error"], run_json["error"]
    r = httpx.get(f"http://{lab['registry']}/v2/{name}/manifests/{tag}",
                  headers={"Accept": MANIFEST_TYPES}, timeout=10)
    assert r.status_code == 404, (r.status_code, r.text[:300])
