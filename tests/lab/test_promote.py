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


@pytest.fixture(scope="module")
def promo(lab, tmp_path_factory):
    """The pipeline file (its destinations on servers 1 and 2), with both destinations'
    deploys removed at the end by `runner app remove -d`."""
    tmp = tmp_path_factory.mktemp("promote")
    repo = make_repo(tmp / "repo", {"Dockerfile": DOCKERFILE})
    s1, s2 = lab["servers"][0], lab["servers"][1]
    name = f"pr{UID}"
    port = _port()
    path = tmp / "pipeline.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "name": name,
        "repository": {"url": str(repo)},
        "image": {"name": f"{lab['registry']}/promote-{UID}/app"},
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
            "lock": {"ttl": 10, "wait": 30}}}}))
    yield {"path": str(path), "name": name, "data": tmp / "data", "s1": s1, "s2": s2, "port": port}
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
    tags = _tags(lab, f"promote-{UID}/app")
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
    assert _tags(lab, f"promote-{UID}/app") == tags

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
