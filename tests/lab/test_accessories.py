"""`runner accessory` on a lab server with the lab's PostgreSQL image as the accessory: its data
survives `reboot` and `remove` (not `remove --volumes`), the app reaches it by name and app
deploys and `runner app remove` leave it alone, and a deploy fails before any switch when it is
not running. One PostgreSQL accessory for the module (the tests boot it again, which is a no-op
when it runs); commands through click's CliRunner on a pipeline file."""
from __future__ import annotations

import os
import secrets as _random
import subprocess

import pytest
from click.testing import CliRunner

from deployers.base import DeployFailed
from pipelines.deploy import make_deployer
from runner.cli.accessory import make_accessory
from runner.cli.app import make_app
from runner_lab import layout
from runner.loader import load_pipeline
from runner.model.image import ImageRef
from tests.lab.deploy_fixtures import _cleanup, _port

UID = _random.token_hex(3)
PASSWORD_VAR = f"RUNNER_TEST_ACC_PW_{UID}"
PG = f"{layout.REGISTRY}/lab/postgres:15"
UNREACHABLE = "10.87.53.99"  # in the lab's network, nobody there

PIPELINE = """\
name: {app}
repository: {{url: .}}
image: {{name: {repo}}}
secrets: {{pg_password: {{env: {var}}}}}
stages:
  deploy:
    servers: ["{user}@{host}:{port}"]
    ssh: {{key_file: {key}, known_hosts: {known}, connect_timeout: 5, retries: 1}}
    container: {{ports: ["{app_port}:8080"], stop_timeout: 1}}
    healthcheck: {{http: {{port: 8080, path: /health}}, timeout: 10, probe_interval: 0.2}}
accessories:
  db:
    image: {pg}
    secret_env: {{POSTGRES_PASSWORD: pg_password}}
    volumes: ["data:/var/lib/postgresql/data"]
    healthcheck: {{cmd: "pg_isready -q -h 127.0.0.1 -U postgres", interval: 0.25}}
"""


class Setup:
    def __init__(self, lab, images, tmp, app: str):
        s = lab["servers"][0]
        self.app, self.server, self.images = app, s, images
        self.path = tmp / f"{app}.yaml"
        self.path.write_text(PIPELINE.format(
            app=app, repo=images["repo"], var=PASSWORD_VAR, user=s["user"], host=s["host"],
            port=s["port"], key=s["key_file"], known=s["known_hosts"], app_port=_port(), pg=PG))
        self.cli = make_accessory()

    def run(self, *args: str, code: int = 0):
        r = CliRunner().invoke(self.cli, [args[0], str(self.path), *args[1:]])
        assert r.exit_code == code, f"accessory {' '.join(args)} -> {r.exit_code}:\n{r.output}"
        return r.output

    def sql(self, statement: str, code: int = 0) -> str:
        return self.run("exec", "db", "--", "sh", "-c",
                        'PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -U postgres -At -c "$0"',
                        statement, code=code)

    def docker(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "DOCKER_HOST": self.server["docker_host"]})


@pytest.fixture(scope="module")
def acc(lab, images, tmp_path_factory):
    os.environ[PASSWORD_VAR] = f"pw-{UID}"
    setup = Setup(lab, images, tmp_path_factory.mktemp("acc"), f"acc{UID}")
    # boot runs the tag the server has: this lab's image, not one an older lab left there.
    assert setup.docker("pull", "-q", PG).returncode == 0
    yield setup
    setup.run("remove", "--volumes", "--yes")
    _cleanup(lab, setup.app, lab["servers"][:1])
    os.environ.pop(PASSWORD_VAR, None)


def test_boot_is_idempotent_and_reboot_keeps_the_data(acc):
    assert "booted" in acc.run("boot")
    acc.sql("CREATE TABLE t (v text); INSERT INTO t VALUES ('before-reboot')")
    again = acc.run("boot")
    assert "already running with these settings" in again and "not restarted" in again
    assert f"volumes kept: {acc.app}-db-data" in acc.run("reboot")
    assert acc.sql("SELECT v FROM t").split() == ["before-reboot"]
    status = acc.run("status")
    assert f"{acc.app}-db running (healthy), current settings" in status, status
    assert f"pw-{UID}" not in status + acc.run("logs")


def test_the_app_reaches_it_by_name_and_app_remove_leaves_it_alone(acc):
    acc.run("boot")
    pipeline = load_pipeline(acc.path)
    d = make_deployer(pipeline, run_id=f"acc{UID}", image=ImageRef.parse(acc.images["v1"]))
    try:
        assert d.apply().ok
    finally:
        d.close()
    reach = acc.docker("exec", acc.app, "nc", "-w", "3", f"{acc.app}-db", "5432", "-e", "true")
    assert reach.returncode == 0, reach.stderr
    removed = CliRunner().invoke(make_app(), ["remove", str(acc.path), "--yes"])
    assert removed.exit_code == 0 and f"removed container {acc.app} " in removed.output, \
        removed.output
    assert f"{acc.app}-db" not in removed.output
    assert f"{acc.app}-db running" in acc.run("status")


def test_a_deploy_fails_before_any_switch_when_the_accessory_is_not_running(acc, lab):
    text = acc.path.read_text().replace(f"name: {acc.app}", f"name: {acc.app}x")
    other = acc.path.with_name("other.yaml")
    other.write_text(text)
    d = make_deployer(load_pipeline(other), run_id="nodb", image=ImageRef.parse(acc.images["v1"]))
    try:
        report = d.apply()
    except DeployFailed as exc:
        failed = exc
    else:
        _cleanup(lab, f"{acc.app}x", lab["servers"][:1])
        pytest.fail(f"the deploy went ahead without its accessory: {report.headline}")
    finally:
        d.close()
    [row] = failed.report.servers
    assert row.server == f"{acc.server['host']}" and row.status == "failed"
    assert f"accessory 'db' ({acc.app}x-db) is not running there: no such container" \
        in row.reason and "nothing was changed" in row.reason, row.reason
    assert acc.docker("container", "inspect", f"{acc.app}x").returncode != 0  # never started


def test_unknown_names_are_refused_with_the_list_and_an_unreachable_server_named(acc):
    for command in (["boot", "nope"], ["exec", "nope", "--", "true"]):
        out = acc.run(*command, code=2)
        assert "unknown accessory 'nope'" in out and "has db" in out, out
    text = acc.path.read_text().replace(acc.server["host"], UNREACHABLE)
    acc.path.with_name("away.yaml").write_text(text.replace("connect_timeout: 5, retries: 1",
                                                            "connect_timeout: 1, retries: 0"))
    r = CliRunner().invoke(acc.cli, ["boot", str(acc.path.with_name("away.yaml"))])
    assert r.exit_code == 1 and f"{UNREACHABLE}: db: FAILED: cannot reach {UNREACHABLE}:22" \
        in r.output, r.output


def test_remove_keeps_the_volumes_unless_told(acc):
    acc.run("boot")
    acc.sql("CREATE TABLE IF NOT EXISTS r (v text); INSERT INTO r VALUES ('survives')")
    out = acc.run("remove", "--yes")
    volume = f"{acc.app}-db-data"
    said, done = out.index(f"keeps volumes {volume}"), out.index(f"removed container {acc.app}-db")
    assert said < done and f"kept volume {volume}" in out, out
    acc.run("boot")
    assert acc.sql("SELECT v FROM r").split() == ["survives"]
    out = acc.run("remove", "--volumes", "--yes")
    assert out.index(f"deletes volumes {volume}") < out.index(f"removed volume {volume}"), out
    assert acc.docker("volume", "inspect", volume).returncode != 0
    assert f"{acc.app}-db absent" in acc.run("status", code=1)
