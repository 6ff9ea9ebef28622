"""`runner exec` end to end on the lab: real git, BuildKit, registry."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.helpers import (ROOT, commit_files, copy_example_app, events, lab_env, make_repo, runner,
                           stage_end)

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runner-data")


def registry_digest(registry: str, repo: str, ref: str) -> str:
    r = httpx.get(f"http://{registry}/v2/{repo}/manifests/{ref}",
                  headers={"Accept": MANIFEST_TYPES}, timeout=10)
    r.raise_for_status()
    return r.headers["Docker-Content-Digest"]


def test_example_pipeline_end_to_end(lab, data_dir):
    """The README's main job: the example app built, tested against the lab's PostgreSQL,
    scanned, pushed, and answering on every lab server with the digest that was pushed."""
    proc = runner("exec", "pipeline.example.yaml", "--json", "--data-dir", str(data_dir),
                  env=lab_env(lab))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    evs = events(proc.stdout)
    assert [e["stage"] for e in evs if e["event"] == "stage.end" and e["status"] == "success"] \
        == ["checkout", "build", "test", "scan", "push", "deploy"]
    counts = stage_end(evs, "test")["outputs"]["counts"]
    assert counts["passed"] == counts["total"] > 0, counts
    push = stage_end(evs, "push")["outputs"]
    assert push["ref"].startswith(f"{lab['registry']}/example/app@sha256:")
    short = stage_end(evs, "checkout")["outputs"]["short_sha"]
    assert registry_digest(lab["registry"], "example/app", short) == push["digest"]
    for server in lab["servers"]:
        r = httpx.get(f"http://{server['host']}:8000/", timeout=10)
        assert r.status_code == 200 and r.json()["message"] == "hello from runner"
        # The deploy counts a server done on the first success of its own probe (the image's
        # health command run at once), before docker's next HEALTHCHECK tick: docker may still
        # say `starting` here, and must reach `healthy` by itself within a few intervals.
        running = _inspect_after_start_period(server["docker_host"], "example-app")
        assert running == [push["ref"], "healthy", "always"]


def _inspect_after_start_period(docker_host: str, name: str, limit: float = 30.0) -> list[str]:
    deadline = time.monotonic() + limit
    while True:
        words = subprocess.run(
            ["docker", "-H", docker_host, "inspect", name, "--format",
             "{{.Config.Image}} {{.State.Health.Status}} {{.HostConfig.RestartPolicy.Name}}"],
            capture_output=True, text=True, check=True).stdout.split()
        if words[1] != "starting" or time.monotonic() > deadline:
            return words
        time.sleep(0.5)


def test_code_only_change_reuses_the_dependency_layers(lab, tmp_path, data_dir):
    repo = copy_example_app(tmp_path / "app")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""
name: rebuild
repository: {{url: {repo}}}
image: {{name: "{lab['registry']}/test/rebuild"}}
stages:
  build: {{args: {{PYTHON_IMAGE: local/python:3.11}}}}
""")
    first = runner("exec", str(pipeline), "--json", "--data-dir", str(data_dir))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    app = (repo / "app.py").read_text().replace("hello from runner", "hello again")
    commit_files(repo, {"app.py": app}, "code-only change")
    second = runner("exec", str(pipeline), "--json", "--data-dir", str(data_dir))
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    evs = events(second.stdout)
    build = stage_end(evs, "build")
    logs = [e["line"] for e in evs if e["event"] == "stage.log" and e["stage"] == "build"]
    # The pip install step (dependency layer) must come from the cache, not run again.
    assert any("CACHED" in line and "pip install" in line for line in logs), "\n".join(logs)
    assert build["outputs"]["cached_steps"] >= 2
    assert stage_end(evs, "checkout")["outputs"]["cloned"] is False  # the mirror was reused
    first_build = stage_end(events(first.stdout), "build")["duration"]
    print(f"cold build {first_build:.1f}s, code-only rebuild {build['duration']:.1f}s")


def _busybox_repo(tmp_path: Path, dockerfile: str) -> Path:
    return make_repo(tmp_path / "repo", {"Dockerfile": dockerfile, "hello.txt": "hi\n"})


def _pipeline(tmp_path: Path, repo: Path, registry: str, extra: str = "") -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"name: t\nrepository: {{url: {repo}}}\n"
                 f"image: {{name: \"{registry}/test/t\"}}\n{extra}")
    return p


def test_cache_mount_dockerfile_builds(lab, tmp_path, data_dir):
    repo = _busybox_repo(tmp_path, "FROM local/busybox:1\n"
                         "RUN --mount=type=cache,target=/cache echo x >> /cache/n && cat /cache/n\n")
    proc = runner("exec", str(_pipeline(tmp_path, repo, lab["registry"])), "--json",
                  "--only", "checkout,build", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_rebuilding_a_commit_gives_the_same_image(lab, tmp_path, data_dir):
    """The image is dated by the commit, not by the build: a re-run of the same commit (a retry,
    a redelivered webhook) yields the same image, so its digest and the deploy's "unchanged"
    check hold instead of a new image per run."""
    repo = _busybox_repo(tmp_path, "FROM local/busybox:1\nRUN echo built > /built\n")
    pipeline = _pipeline(tmp_path, repo, lab["registry"])
    outs = []
    for run in range(2):
        if run:
            time.sleep(1.1)  # the build's own clock moves on between the two runs
        proc = runner("exec", str(pipeline), "--json", "--only", "checkout,build",
                      "--data-dir", str(data_dir))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        evs = events(proc.stdout)
        outs.append((stage_end(evs, "checkout")["outputs"], stage_end(evs, "build")["outputs"]))
    (co1, b1), (co2, b2) = outs
    assert co1["commit"] == co2["commit"] and b1["image_id"] == b2["image_id"]
    created = subprocess.run(
        ["docker", "-H", lab["docker_host"], "image", "inspect", b1["image_id"], "--format",
         '{{index .Config.Labels "org.opencontainers.image.created"}}'],
        capture_output=True, text=True, check=True).stdout.strip()
    committed = subprocess.run(["git", "-C", str(repo), "show", "-s", "--format=%cI", "HEAD"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert created == co1["committed_at"]
    assert datetime.fromisoformat(created.replace("Z", "+00:00")) == \
        datetime.fromisoformat(committed)


def test_failing_run_fails_the_build_stage_with_exit_1(lab, tmp_path, data_dir):
    repo = _busybox_repo(tmp_path, "FROM local/busybox:1\nRUN echo about to fail && exit 3\n")
    proc = runner("exec", str(_pipeline(tmp_path, repo, lab["registry"])), "--data-dir",
                  str(data_dir))
    assert proc.returncode == 1
    assert "stage 'build' failed" in proc.stderr
    assert "exit 3" in proc.stderr or "exit code: 3" in proc.stderr


def test_secret_never_reaches_logs_json_or_image(lab, tmp_path, data_dir):
    value = "tok-9f2c4e1b-never-log-me"
    repo = _busybox_repo(tmp_path, "FROM local/busybox:1\n"
                         "RUN --mount=type=secret,id=tok test -s /run/secrets/tok && "
                         "cat /run/secrets/tok && echo secret-was-there\n")
    p = _pipeline(tmp_path, repo, lab["registry"], extra="""
secrets:
  TOKEN: {env: TEST_BUILD_TOKEN}
stages:
  build:
    secrets: [{id: tok, secret: TOKEN}]
""")
    proc = runner("exec", str(p), "--json", "--run-id", "secret-test", "--data-dir", str(data_dir),
                  env={"TEST_BUILD_TOKEN": value})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "secret-was-there" in proc.stdout  # the build really read the secret
    assert value not in proc.stdout and value not in proc.stderr
    for f in (data_dir / "runs" / "secret-test").rglob("*"):
        if f.is_file() and "src" not in f.relative_to(data_dir).parts:
            assert value.encode() not in f.read_bytes(), f
    image = stage_end(events(proc.stdout), "build")["outputs"]["tags"][0]
    for argv in (["history", "--no-trunc", image], ["inspect", image]):
        out = subprocess.run(["docker", *argv], capture_output=True, text=True, check=True).stdout
        assert value not in out


def test_sigint_during_build_stops_it_and_exits_130(lab, tmp_path, data_dir):
    marker = "31.4159"
    repo = _busybox_repo(tmp_path, f"FROM local/busybox:1\nRUN sleep {marker}\n")
    p = _pipeline(tmp_path, repo, lab["registry"])
    proc = subprocess.Popen([sys.executable, "-m", "runner", "exec", str(p), "--json",
                             "--data-dir", str(data_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _sleeping(marker):
        time.sleep(0.2)
    assert _sleeping(marker), "the build never reached the RUN sleep step"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert stage_end(events(out), "build")["status"] == "cancelled"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _sleeping(marker):
        time.sleep(0.5)
    assert not _sleeping(marker), "the build's RUN step kept running after Ctrl-C"


def _sleeping(marker: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes() == b"sleep\0" + marker.encode() + b"\0":
                return True
        except OSError:
            continue
    return False
