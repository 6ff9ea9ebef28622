"""Destinations and promotion on the lab: one pipeline with a staging destination on the first
server and a production destination on the second; `runner exec -d staging` builds, pushes and
deploys once, `runner promote --from staging --to production` puts that same digest on
production without building or pushing anything, each destination keeping its own history."""
from __future__ import annotations

import json
import secrets as _random
import subprocess

import httpx
import pytest

from tests.helpers import events, make_repo, runner, stage_end
from tests.lab.deploy_fixtures import _port

UID = _random.token_hex(3)
DOCKERFILE = """FROM local/busybox:1
RUN mkdir -p /www && echo promoted > /www/index.html
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


def _address(server: dict) -> str:
    return f"{server['user']}@{server['host']}:{server['port']}"


def _pipeline(lab, name: str, repo, port: int, **deploy) -> dict:
    """A pipeline of `repo` with a staging destination on server 1 and a production one on
    server 2 (`deploy`: more settings of its deploy stage)."""
    s1, s2 = lab["servers"][0], lab["servers"][1]
    return {
        "name": name,
        "repository": {"url": str(repo)},
        "image": {"name": f"{lab['registry']}/promote-{UID}/{name}"},
        "variables": {"HOST": "", "WHERE": "nowhere"},
        "destinations": {
            "staging": {"variables": {"HOST": _address(s1), "WHERE": "staging"}},
            "production": {"variables": {"HOST": _address(s2), "WHERE": "production"}}},
        "env": {"WHERE": "${WHERE}"},
        "stages": {"deploy": {
            "servers": ["${HOST}"],
            "ssh": {"key_file": s1["key_file"], "known_hosts": s1["known_hosts"],
                    "connect_timeout": 5, "retries": 1},
            "container": {"ports": [f"{port}:8080"], "stop_timeout": 2},
            "healthcheck": {"http": {"port": 8080, "path": "/"}, "timeout": 10,
                            "probe_interval": 0.2},
            "lock": {"ttl": 10, "wait": 30}, **deploy}}}


@pytest.fixture(scope="module")
def promo(lab, tmp_path_factory):
    """The pipeline file (its destinations on servers 1 and 2), with both destinations'
    deploys removed at the end by `runner app remove -d`."""
    tmp = tmp_path_factory.mktemp("promote")
    repo = make_repo(tmp / "repo", {"Dockerfile": DOCKERFILE})
    name = f"pr{UID}"
    port = _port()
    path = tmp / "pipeline.yaml"
    path.write_text(json.dumps(_pipeline(lab, name, repo, port)))  # JSON is YAML
    yield {"path": str(path), "name": name, "data": tmp / "data", "s1": lab["servers"][0],
           "s2": lab["servers"][1], "port": port}
    for where in ("staging", "production"):
        runner("app", "remove", str(path), "-d", where, "--yes")


def _tags(lab, repo: str) -> list[str]:
    r = httpx.get(f"http://{lab['registry']}/v2/{repo}/tags/list", timeout=10)
    return sorted(r.json().get("tags") or []) if r.status_code == 200 else []


def _running(server: dict, name: str) -> tuple[str, list[str]]:
    out = subprocess.run(["docker", "-H", server["docker_host"], "inspect", name, "--format",
                          "{{.Config.Image}} {{json .Config.Env}}"],
                         capture_output=True, text=True, check=True).stdout
    image, env = out.split(" ", 1)
    return image, json.loads(env)


def _releases(path: str, destination: str) -> dict[str, list[str]]:
    proc = runner("releases", path, "-d", destination, "--json")
    assert proc.returncode == 0, proc.stderr
    return {row["server"]: [r["digest"] for r in row["releases"]]
            for row in json.loads(proc.stdout)}


def test_promote_moves_the_verified_digest_without_a_build(lab, promo):
    path = promo["path"]
    # Nothing verified on staging yet: refused, nothing changed.
    early = runner("promote", path, "--from", "staging", "--to", "production")
    assert early.returncode == 2, early.stdout + early.stderr
    assert "nothing is verified on staging" in early.stderr, early.stderr

    # Without -d, or with an unknown one: exit 2 naming the destinations there are.
    for args in ((), ("-d", "qa")):
        proc = runner("status", path, *args)
        assert proc.returncode == 2 and "staging, production" in proc.stderr, proc.stderr

    staged = runner("exec", path, "-d", "staging", "--json", "--data-dir", str(promo["data"]))
    assert staged.returncode == 0, staged.stdout[-3000:] + staged.stderr[-3000:]
    evs = events(staged.stdout)
    ref = stage_end(evs, "push")["outputs"]["ref"]
    digest = ref.split("@", 1)[1]
    assert _running(promo["s1"], promo["name"])[0] == ref
    tags = _tags(lab, f"promote-{UID}/{promo['name']}")
    assert tags, "the staging run pushed no tag"

    promoted = runner("promote", path, "--from", "staging", "--to", "production", "--json")
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    report = json.loads(promoted.stdout)
    assert report["ok"] and [s["digest"] for s in report["servers"]] == [digest], report
    # Production runs the very image staging verified, with production's own env value.
    image, env = _running(promo["s2"], promo["name"])
    assert image == ref
    assert "WHERE=production" in env, env
    assert "WHERE=staging" in _running(promo["s1"], promo["name"])[1]
    assert httpx.get(f"http://{promo['s2']['host']}:{promo['port']}/",
                     timeout=10).text.strip() == "promoted"
    # Nothing was built or pushed: no stage ran, the registry holds the same tags.
    assert "build" not in promoted.stderr.lower(), promoted.stderr
    assert _tags(lab, f"promote-{UID}/{promo['name']}") == tags

    # Each destination's own history, on its own server.
    s1, s2 = promo["s1"], promo["s2"]
    staging, production = _releases(path, "staging"), _releases(path, "production")
    assert list(staging.values()) == [[digest]] and list(production.values()) == [[digest]]
    assert set(staging) != set(production)
    assert s1["host"] in next(iter(staging)) and s2["host"] in next(iter(production))
    # Keyed by destination on the server: production's history on staging's server is empty
    # although staging's release runs there.
    proc = runner("releases", path, "-d", "production", "--var", f"HOST={_address(s1)}",
                  "--json")
    assert proc.returncode == 0, proc.stderr
    assert [row["releases"] for row in json.loads(proc.stdout)] == [[]]


def test_daemon_entries_deploy_to_their_destination_and_a_tag_promotes(lab, tmp_path):
    """Two daemon entries of one pipeline file: `staging` builds and deploys each push of main
    to staging; `production` (triggers.tag.promote_from: staging) promotes on a tag, with no
    build, the release staging verified if it is the tag's commit; the deploy hooks run around
    the promotion; a rollback run of the staging entry rolls staging back, not production."""
    import sys
    from pathlib import Path

    from tests.helpers import commit_files
    from tests.lab.deploy_fixtures import _get

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "daemon"))
    from harness import api_get, config, daemon_in_process, push_payload, send_github, wait_for

    s1, s2 = lab["servers"][0], lab["servers"][1]
    name, port = f"pd{UID}", _port()
    repo = make_repo(tmp_path / "repo", {"Dockerfile": DOCKERFILE.replace(
        "RUN mkdir -p /www && echo promoted > /www/index.html", "COPY www /www"),
        "www/index.html": "v1\n"})
    c1 = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                        check=True).stdout.strip()
    hooks = tmp_path / "hooks.log"
    line = f'echo "$0 $RUNNER_COMMIT $RUNNER_SERVERS $RUNNER_DIGEST" >> {hooks}'
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(_pipeline(lab, name, repo, port, hooks={
        "pre_deploy": ["sh", "-c", line, "pre"], "post_deploy": ["sh", "-c", line, "post"]})))
    cfg = config(tmp_path, [
        {"name": "staging", "file": str(path), "repo": str(repo), "destination": "staging",
         "triggers": {"push": {"branches": ["main"]}}},
        {"name": "production", "file": str(path), "repo": str(repo), "destination": "production",
         "triggers": {"push": None, "tag": {"promote_from": "staging", "tags": ["v*"]}}}])
    cfg.pop("exec_command")  # the real `runner exec`, `runner promote`, `runner rollback`
    final = ("success", "failed", "invalid", "cancelled", "interrupted")

    def run_of(d, payload, delivery):
        answer = send_github(d.url, payload, delivery).json()
        (rid,) = answer["runs"]
        return wait_for(lambda: (r := d.store.get_run(rid)) and r["status"] in final and r, 180,
                        f"run {rid} to end")

    def tag(d, t, sha, delivery):
        return run_of(d, push_payload(str(repo), ref=f"refs/tags/{t}", after=sha), delivery)

    try:
        with daemon_in_process(cfg) as d:
            # Nothing verified on staging: the tag's run fails saying so, and deploys nothing.
            early = tag(d, "v1", c1, "t-1")
            assert early["status"] == "failed", early
            assert "nothing is verified on staging" in early["reason"], early
            assert _get(s2["host"], port).startswith("error"), "production was deployed"

            staged = run_of(d, push_payload(str(repo), after=c1), "p-1")
            assert staged["status"] == "success", (staged, d.store.logs(staged["id"])[-20:])
            assert staged["destination"] == "staging" and _get(s1["host"], port) == "v1"
            digest1 = d.store.deploys("staging", limit=1)[0]["outputs"]["servers"][0]["digest"]
            page = api_get(d.url, f"/runs/{staged['id']}").text
            assert '<dd id="destination">staging</dd>' in page

            # A tag of a commit staging has not verified: refused, naming both commits.
            c2 = commit_files(repo, {"www/index.html": "v2\n"}, "v2")
            other = tag(d, "v2", c2, "t-2")
            assert other["status"] == "failed" and c1[:12] in other["reason"] \
                and c2[:12] in other["reason"], other
            assert _get(s2["host"], port).startswith("error"), "production was deployed"

            hooks.write_text("")
            promoted = tag(d, "v1", c1, "t-3")  # the failed tag's commit, delivered again
            logs = "\n".join(x["line"] for x in d.store.logs(promoted["id"]))
            assert promoted["status"] == "success", (promoted, logs[-3000:])
            assert promoted["destination"] == "production" and promoted["trigger"] == "tag"
            (stage,) = d.store.stages(promoted["id"])  # no checkout, build, push
            assert stage["name"] == "deploy" and stage["outputs"]["what"] == "promote", stage
            assert [s["digest"] for s in stage["outputs"]["servers"]] == [digest1]
            assert _get(s2["host"], port) == "v1" and _running(s2, name)[0].endswith(digest1)
            assert "WHERE=production" in _running(s2, name)[1]
            assert hooks.read_text().splitlines() == [
                f"{phase} {c1} {s2['host']} {digest1}" for phase in ("pre", "post")], logs

            # Staging moves on to v2; a rollback run of its entry returns staging to v1 and
            # leaves production alone.
            v2 = run_of(d, push_payload(str(repo), after=c2, before=c1), "p-2")
            assert v2["status"] == "success" and _get(s1["host"], port) == "v2", v2
            back = d.trigger_rollback("staging", None)
            rb = wait_for(lambda: (r := d.store.get_run(back)) and r["status"] in final and r, 120,
                          "the rollback")
            assert rb["status"] == "success" and rb["destination"] == "staging", \
                (rb, d.store.logs(back)[-20:])
            assert _get(s1["host"], port) == "v1" and _get(s2["host"], port) == "v1"
    finally:  # its containers (a unique app's history left on the servers is harmless)
        for server in (s1, s2):
            docker = ["docker", "-H", server["docker_host"]]
            ids = subprocess.run([*docker, "ps", "-aq", "--filter", f"label=runner.app={name}"],
                                 capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run([*docker, "rm", "-f", *ids], capture_output=True)
