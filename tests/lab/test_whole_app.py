"""Issue 23's whole app on the lab, end to end: a web role and a worker role of ONE image and a
PostgreSQL accessory (the lab's image), in one pipeline file with a staging destination on one
server and a production destination on two.

The image is busybox with the lab PostgreSQL image's psql copied in: the worker inserts a row
every 0.2 s; the web (httpd, a CGI script) answers `VERSION MIGRATIONS ID,ID,...` from the
database; the release command (a migration) creates the tables and adds a row to
`migrations`, so that table's count is how often it ran. Both destinations share the first
server (their container names, ports and databases differ by a variable, as docs/deploy.md
says they must): staging's app reaches its database by name on the runner's network,
production's by the first server's address and the port the accessory publishes there (its
web runs on both servers, its worker on the second).

Deploys go through the deploy stage's deployer (pipelines.deploy.make_deployer, with the
pushed digest a push stage would give it: nothing to build); the accessory, promotion,
rollback and removal through the real command line (click's runner, in this process)."""
from __future__ import annotations

import os
import secrets as _random
import subprocess
import threading
import time
import urllib.request

import httpx
import pytest
from click.testing import CliRunner

from pipelines.deploy import make_deployer
from runner.cli.main import cli
from runner_lab import layout
from runner.loader import load_pipeline
from runner.model.image import ImageRef
from tests.lab.deploy_fixtures import _docker, _port

UID = _random.token_hex(3)
PASSWORD_VAR = f"RUNNER_TEST_WHOLE_PW_{UID}"
PG = f"{layout.REGISTRY}/lab/postgres:15"

# psql and the libraries it links, on busybox (httpd, sh): 21 MB, not the 650 MB of the
# PostgreSQL image, which a server that runs only the app would otherwise pull.
DOCKERFILE = f"""FROM {PG} AS pg
RUN mkdir -p /out/bin && cp /usr/lib/postgresql/{layout.POSTGRES_VERSION}/bin/psql /out/bin/ && \\
    ldd /out/bin/psql | grep -o '/[^ ]*' | xargs -I@ cp --parents -L @ /out
FROM local/busybox:1
COPY --from=pg /out /
ARG VERSION
ENV APP_VERSION=$VERSION
COPY app /app
CMD ["httpd", "-f", "-p", "8080", "-h", "/app/www"]
"""
# The web role's one page: `VERSION MIGRATIONS ID,ID,...` from the database.
ROWS = """#!/bin/sh
if out=$(psql -XAtq -c "SELECT (SELECT count(*) FROM migrations) || ' ' || coalesce((SELECT \\
        string_agg(id::text, ',' ORDER BY id) FROM rows), '')" 2>&1); then
    printf 'Content-Type: text/plain\\r\\n\\r\\n%s %s' "$APP_VERSION" "$out"
else
    printf 'Status: 503\\r\\nContent-Type: text/plain\\r\\n\\r\\n%s' "$out"
fi
"""
WORKER = """#!/bin/sh
trap 'exit 0' TERM
while true; do
    psql -XAtq -c 'INSERT INTO rows DEFAULT VALUES' >/dev/null 2>&1
    sleep 0.2
done
"""
MIGRATE = """#!/bin/sh
set -e
psql -XAtq -v ON_ERROR_STOP=1 <<'SQL'
CREATE TABLE IF NOT EXISTS migrations (id serial PRIMARY KEY, at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS rows (id serial PRIMARY KEY, at timestamptz DEFAULT now());
INSERT INTO migrations DEFAULT VALUES;
SQL
echo "migrated: $(psql -XAtq -c 'SELECT count(*) FROM migrations')"
"""

PIPELINE = """\
name: {app}
repository: {{url: .}}
image: {{name: {repo}}}
secrets: {{pg_password: {{env: {var}}}}}
variables: {{APP: "", HOSTS: "", WORKER_ON: "", PORT: "", DB_HOST: "", DB_PORT: "",
             DB_PUBLISH: ""}}
destinations:
  staging:
    variables: {{APP: {app}-stg, HOSTS: "{s1}", WORKER_ON: "{h1}", PORT: "{p_stg}",
                 DB_HOST: {app}-stg-db, DB_PORT: "5432", DB_PUBLISH: "{db_stg}"}}
  production:
    variables: {{APP: {app}-prd, HOSTS: "{s1},{s2}", WORKER_ON: "{h2}", PORT: "{p_prd}",
                 DB_HOST: "{h1}", DB_PORT: "{db_prd}", DB_PUBLISH: "{db_prd}"}}
env: {{PGHOST: "${{DB_HOST}}", PGPORT: "${{DB_PORT}}", PGUSER: postgres, PGDATABASE: postgres,
       PGCONNECT_TIMEOUT: "3"}}
stages:
  deploy:
    servers: "${{HOSTS}}"
    ssh: {{key_file: {key}, known_hosts: {known}, connect_timeout: 5, retries: 1}}
    container:
      name: "${{APP}}"
      ports: ["${{PORT}}:8080"]
      stop_timeout: 2
      secret_env: {{PGPASSWORD: pg_password}}
    healthcheck: {{http: {{port: 8080, path: /health}}, timeout: 30, probe_interval: 0.2,
                  min_uptime: 1}}
    lock: {{ttl: 10, wait: 30}}
    release_command: [/app/migrate]
    roles:
      web: {{}}
      worker:
        command: [/app/worker]
        servers: ["${{WORKER_ON}}"]
accessories:
  db:
    image: {pg}
    servers: ["{h1}"]
    secret_env: {{POSTGRES_PASSWORD: pg_password}}
    volumes: ["data:/var/lib/postgresql/data"]
    ports: ["${{DB_PUBLISH}}:5432"]
    healthcheck: {{cmd: "pg_isready -q -h 127.0.0.1 -U postgres", interval: 0.25}}
"""


class App:
    """The pipeline file, its images, and the lab servers it uses."""

    def __init__(self, lab, tmp):
        self.name = f"wa{UID}"
        self.s1, self.s2 = lab["servers"][0], lab["servers"][1]
        self.registry = lab["registry"]
        self.repo_path = f"whole-{UID}/app"
        self.repo = f"{self.registry}/{self.repo_path}"
        self.password = f"pw-{UID}"
        self.ports = {"staging": _port(), "production": _port()}
        self.path = tmp / "whole.yaml"
        self.path.write_text(PIPELINE.format(
            app=self.name, repo=self.repo, var=PASSWORD_VAR, pg=PG,
            s1=self._address(self.s1), s2=self._address(self.s2), h1=self.s1["host"],
            h2=self.s2["host"], p_stg=self.ports["staging"], p_prd=self.ports["production"],
            db_stg=_port(), db_prd=_port(), key=self.s1["key_file"],
            known=self.s1["known_hosts"]))
        self.images: dict[str, str] = {}
        self.deployed = False  # the first test went through: the second removes what it left
        self._built = threading.Thread(target=self._build_or_fail, args=(tmp,))
        self._build_error: BaseException | None = None

    @staticmethod
    def _address(s: dict) -> str:
        return f"{s['user']}@{s['host']}:{s['port']}"

    def start_build(self) -> None:
        """The images are built while staging's database boots: `images` after `built()`."""
        self._built.start()

    def built(self) -> dict[str, str]:
        self._built.join()
        if self._build_error is not None:
            raise self._build_error
        return self.images

    def _build_or_fail(self, tmp) -> None:
        try:
            self._build(tmp)
        except BaseException as exc:  # raised again by built(), in the test's thread
            self._build_error = exc

    def _build(self, tmp) -> None:
        """v1 and v2 (they differ in APP_VERSION only), pushed; name@digest refs."""
        ctx = tmp / "ctx"
        (ctx / "app" / "www" / "cgi-bin").mkdir(parents=True)
        (ctx / "Dockerfile").write_text(DOCKERFILE)
        (ctx / "app" / "www" / "health").write_text("ok\n")
        for name, text in (("worker", WORKER), ("migrate", MIGRATE), ("www/cgi-bin/rows", ROWS)):
            (ctx / "app" / name).write_text(text)
            (ctx / "app" / name).chmod(0o755)
        for version in ("v1", "v2"):
            tag = f"{self.repo}:{version}"
            _docker("build", "-q", "--build-arg", f"VERSION={version}", "-t", tag, ".", cwd=ctx)
            _docker("push", tag)
            self.images[version] = _docker("inspect", "--format", "{{index .RepoDigests 0}}",
                                           tag).strip()

    def cli(self, command: str, *args: str, code: int = 0) -> str:
        """`runner COMMAND PIPELINE ARGS...` (COMMAND: one or two words); its output."""
        argv = [*command.split(), str(self.path), *args]
        r = CliRunner().invoke(cli, argv, env={PASSWORD_VAR: self.password})
        assert r.exit_code == code, f"runner {' '.join(argv)} -> {r.exit_code}:\n{r.output}"
        return r.output

    def deploy(self, where: str, version: str):
        """The deploy stage's deployer, as `runner exec -d WHERE` runs it after its push."""
        pipeline = load_pipeline(self.path, destination=where,
                                 environ={PASSWORD_VAR: self.password})
        d = make_deployer(pipeline, run_id=f"{where}-{version}-{UID}",
                          image=ImageRef.parse(self.images[version]), commit=version * 20,
                          secret={"pg_password": self.password}.__getitem__)
        try:
            return d.apply()
        finally:
            d.close()

    def page(self, where: str, server: dict) -> tuple[str, int, list[int]]:
        """(version, migrations, row ids) as the web role on `server` shows them."""
        url = f"http://{server['host']}:{self.ports[where]}/cgi-bin/rows"
        with urllib.request.urlopen(url, timeout=10) as r:
            version, migrations, *ids = r.read().decode().split(" ")
        return version, int(migrations), [int(i) for i in (ids[0].split(",") if ids and ids[0]
                                                           else [])]

    def rows_grow(self, where: str, server: dict, beyond: list[int]) -> list[int]:
        """The row ids once the worker has added some after `beyond` (it writes every 0.2 s)."""
        deadline = time.monotonic() + 20
        while True:
            ids = self.page(where, server)[2]
            if ids and max(ids) > max(beyond, default=0) + 1:
                return ids
            assert time.monotonic() < deadline, f"no new rows on {where}: {ids}"
            time.sleep(0.2)

    def running(self, server: dict, container: str) -> str:
        return subprocess.run(["docker", "-H", server["docker_host"], "inspect", "--format",
                               "{{.Config.Image}}", container], capture_output=True, text=True,
                              check=True).stdout.strip()

    def tags(self) -> list[str]:
        r = httpx.get(f"http://{self.registry}/v2/{self.repo_path}/tags/list", timeout=10)
        return sorted(r.json().get("tags") or [])

    def leftovers(self) -> list[str]:
        """Containers and volumes of the app (any destination, role or accessory)."""
        out = []
        for s in (self.s1, self.s2):
            docker = ["docker", "-H", s["docker_host"]]
            out += subprocess.run([*docker, "ps", "-a", "--format", "{{.Names}}", "--filter",
                                   f"name={self.name}"], capture_output=True, text=True
                                  ).stdout.split()
            out += subprocess.run([*docker, "volume", "ls", "-q", "--filter",
                                   f"name={self.name}"], capture_output=True, text=True
                                  ).stdout.split()
        return out


@pytest.fixture(scope="module")
def whole(lab, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    app = App(lab, tmp)
    app.start_build()
    yield app
    app._built.join()
    # What the test's own removal left (it may have failed): every container and volume of
    # the app, roles and accessories, straight through each server's engine.
    for s in (app.s1, app.s2):
        docker = ["docker", "-H", s["docker_host"]]
        names = subprocess.run([*docker, "ps", "-aq", "--filter", f"name={app.name}"],
                               capture_output=True, text=True).stdout.split()
        if names:
            subprocess.run([*docker, "rm", "-f", *names], capture_output=True)
        volumes = subprocess.run([*docker, "volume", "ls", "-q", "--filter",
                                  f"name={app.name}"], capture_output=True, text=True
                                 ).stdout.split()
        if volumes:
            subprocess.run([*docker, "volume", "rm", "-f", *volumes], capture_output=True)


def test_web_worker_database_migrate_promote_reboot_deploy_rollback(whole):
    app = whole
    s1, s2 = app.s1, app.s2
    assert "booted" in app.cli("accessory boot", "-d", "staging")
    v1, v2 = app.built()["v1"], app.built()["v2"]

    # Staging, one server: web and worker, the migration once (while production's database
    # boots: the deploy runs in a thread, the command line in this one).
    staging: dict = {}
    deploy = threading.Thread(target=lambda: staging.update(r=app.deploy("staging", "v1")))
    deploy.start()
    try:
        assert "booted" in app.cli("accessory boot", "-d", "production")
    finally:
        deploy.join()
    assert staging["r"].ok and len(staging["r"].servers) == 2, staging["r"].headline
    assert [app.running(s1, c) for c in (f"{app.name}-stg", f"{app.name}-stg-worker")] == \
        [v1, v1]
    staged = app.rows_grow("staging", s1, [])
    assert app.page("staging", s1)[:2] == ("v1", 1)

    # Promotion to production (two servers, the worker on the second): staging's digest, no
    # build or push (the registry's tags are the same), the migration once for the three
    # containers.
    tags = app.tags()
    out = app.cli("promote", "--from", "staging", "--to", "production")
    assert f"promoting {v1}" in out, out
    assert app.tags() == tags == ["v1", "v2"]
    prd, prd_worker = f"{app.name}-prd", f"{app.name}-prd-worker"
    assert [app.running(s1, prd), app.running(s2, prd), app.running(s2, prd_worker)] == \
        [v1, v1, v1]
    before_reboot = app.rows_grow("production", s2, [])
    assert app.page("production", s1)[:2] == ("v1", 1)  # the same database from both servers

    # The database's data survives `accessory reboot`; the worker carries on writing.
    assert "volumes kept" in app.cli("accessory reboot", "-d", "production", "db")
    before_deploy = app.rows_grow("production", s1, before_reboot)
    assert set(before_reboot) <= set(before_deploy)

    # A deploy of v2: the migration runs again (twice in all), the rows stay.
    assert app.deploy("production", "v2").ok
    assert [app.running(s1, prd), app.running(s2, prd), app.running(s2, prd_worker)] == \
        [v2, v2, v2]
    before_rollback = app.rows_grow("production", s2, before_deploy)
    assert set(before_deploy) <= set(before_rollback)
    assert app.page("production", s1)[:2] == ("v2", 2)

    # A rollback returns web and worker to v1 together; no migration; the rows stay.
    out = app.cli("rollback", "-d", "production")
    assert [app.running(s1, prd), app.running(s2, prd), app.running(s2, prd_worker)] == \
        [v1, v1, v1], out
    after = app.rows_grow("production", s1, before_rollback)
    assert set(before_rollback) <= set(after)
    assert app.page("production", s2)[:2] == ("v1", 2)

    # Staging kept its own database and release all along.
    assert app.page("staging", s1)[:2] == ("v1", 1)
    assert set(staged) <= set(app.page("staging", s1)[2])
    app.deployed = True


def test_app_remove_and_accessory_remove_leave_nothing(whole):
    """`accessory remove --volumes` and `runner app remove` (every role's containers), each
    destination: nothing of the app is left on either server."""
    app = whole
    if not app.deployed:
        pytest.skip("the whole app was not deployed (the test before failed or did not run)")
    for where in ("staging", "production"):
        app.cli("accessory remove", "-d", where, "--volumes", "--yes")
    for where in ("staging", "production"):
        app.cli("app remove", "-d", where, "--yes")
    assert app.leftovers() == []
