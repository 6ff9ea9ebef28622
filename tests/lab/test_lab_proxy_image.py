"""The lab's reverse proxy image (issue 10): a server pulls `lab["proxy_image"]` from the lab
registry, runs it with a JSON config (Caddy on :80 with a static response, admin API on the
container's loopback), answers on its published port inside the server's network namespace, and
switches to a second config loaded the way the deployer drives it: `docker exec -i C caddy reload
--config /dev/stdin` (Caddy's admin API /load, atomic). Whatever the test creates it removes."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from runner_lab import layout

DOCKER = os.environ.get("RUNNER_TEST_DOCKER", "docker")


def _config(body: str) -> dict:
    return {
        "admin": {"listen": "localhost:2019"},
        "apps": {"http": {"servers": {"lab": {
            "listen": [":80"],
            "automatic_https": {"disable": True},
            "routes": [{"handle": [{"handler": "static_response", "body": body}]}],
        }}}},
    }


def _get_in_netns(netns_path: str, url: str) -> str:
    """GET url from inside the server's network namespace (the host's python3, nsenter --net)."""
    code = ("import sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')")
    proc = subprocess.run(["nsenter", f"--net={netns_path}", "python3", "-c", code, url],
                          capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return proc.stdout


def _wait_for_body(netns_path: str, url: str, want: str, timeout: float = 15) -> str:
    body, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = _get_in_netns(netns_path, url)
            if body == want:
                return body
        except OSError as exc:
            body = f"({exc})"
        time.sleep(0.2)
    return body


def test_a_server_pulls_the_proxy_image_and_caddy_reloads_from_stdin(lab, tmp_path):
    image = lab["proxy_image"]
    assert image == f"{lab['registry']}/runner/caddy:2"
    server = lab["servers"][-1]
    state = Path(server["key_file"]).parent.parent
    netns_path = layout.server_from_name(server["name"], state).netns_path
    docker = [DOCKER, "-H", server["docker_host"]]

    def d(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(docker + list(args), capture_output=True, text=True, input=stdin,
                              timeout=timeout)

    had_image = d("image", "inspect", image).returncode == 0
    name = f"labtest-proxy-{uuid.uuid4().hex[:8]}"
    init = tmp_path / "init.json"
    init.write_text(json.dumps(_config("proxy-one")))
    try:
        pull = d("pull", image)
        assert pull.returncode == 0, pull.stdout + pull.stderr
        labels = json.loads(d("image", "inspect", "--format", "{{json .Config.Labels}}",
                              image).stdout)
        assert labels[layout.PROXY_RECIPE_LABEL] == layout.proxy_recipe()
        # the image's own CMD: caddy run --config /etc/caddy/init.json
        run = d("run", "-d", "--name", name, "--publish", "80",
                "--volume", f"{init}:{layout.PROXY_INIT_CONFIG}:ro", image)
        assert run.returncode == 0, run.stdout + run.stderr
        port = d("port", name, "80/tcp").stdout.splitlines()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}/"
        assert _wait_for_body(netns_path, url, "proxy-one") == "proxy-one", d("logs", name).stderr

        reload = d("exec", "-i", name, "caddy", "reload", "--config", "/dev/stdin",
                   stdin=json.dumps(_config("proxy-two")), timeout=60)
        assert reload.returncode == 0, reload.stdout + reload.stderr
        # /load has returned: the very next request is served by the new config
        assert _get_in_netns(netns_path, url) == "proxy-two"

        # the admin API answers on the container's loopback (python3 is in the image) ...
        admin = d("exec", name, "python3", "-c",
                  "import urllib.request; print(urllib.request.urlopen("
                  "'http://localhost:2019/config/', timeout=2).read().decode())")
        assert admin.returncode == 0, admin.stderr
        assert "proxy-two" in admin.stdout
        # ... and not on the container's own address, which the server can reach
        ip = d("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
               name).stdout.strip()
        with pytest.raises(OSError):
            _get_in_netns(netns_path, f"http://{ip}:2019/config/")
    finally:
        d("rm", "-f", name)
        if not had_image:
            d("rmi", image)  # fails harmlessly if a proxy container of a deploy uses it now
