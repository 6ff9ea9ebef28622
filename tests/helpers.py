"""Small helpers shared by the end-to-end tests: real git repos, the runner CLI as a process."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a registry client accepts for a manifest (an index or a single image, OCI or Docker)
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def make_repo(path: Path, files: dict[str, str], branch: str = "main") -> Path:
    """A real git repository with `files` committed on `branch`."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    commit_files(path, files, "initial")
    return path


def commit_files(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        f = repo / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def copy_example_app(dest: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "app", dest)
    make_repo(dest, {})
    return dest


def runner(*args: str, env: dict | None = None, cwd: Path | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=timeout)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def exec_json(pipeline: Path, data_dir: Path, run_id: str, env: dict | None = None):
    """`runner exec PIPELINE --json` with this run id and data dir: (the process, its events)."""
    proc = runner("exec", str(pipeline), "--json", "--run-id", run_id, "--data-dir",
                  str(data_dir), env=env)
    return proc, events(proc.stdout)


def commit_unique_image(client, repo: str, tag: str, base: str = "local/busybox:1"):
    """A fresh image committed as repo:tag on the engine of docker `client`: `base` with one
    tiny layer (a random file), so that no registry has seen its digest. Returns the image."""
    c = client.containers.create(base, ["true"])
    try:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = uuid.uuid4().hex.encode()
            info = tarfile.TarInfo("nonce.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        c.put_archive("/", buf.getvalue())
        return c.commit(repository=repo, tag=tag)
    finally:
        c.remove(force=True)


def stage_end(evs: list[dict], stage: str) -> dict:
    ends = [e for e in evs if e["event"] == "stage.end" and e["stage"] == stage]
    assert ends, f"no stage.end for {stage}: {[e['event'] for e in evs]}"
    return ends[-1]


def lab_cli(*args: str) -> subprocess.CompletedProcess:
    """`runner lab ARGS` as a user runs it, from the repository's root."""
    return subprocess.run([sys.executable, "-m", "runner", "lab", *args],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                          timeout=300)


def lab_env_printed() -> dict[str, str]:
    """What `runner lab env` prints, parsed as a shell would (every line an `export`)."""
    import shlex

    proc = lab_cli("env")
    assert proc.returncode == 0, proc.stderr
    values = {}
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "export", line
        name, value = words[1].split("=", 1)
        values[name] = value
    return values


def lab_env(lab: dict) -> dict[str, str]:
    """The variables `runner lab env` exports, from the lab fixture's description."""
    from runner_lab.layout import env_vars

    return env_vars(lab)


def remove_app_on_server(deployer, conn, app: str) -> None:
    """Everything a test deploy of `app` left on one server: its containers (by the runner's
    label), its release history and its lock."""
    names = conn.run(["docker", "container", "ls", "--all", "--format", "{{.Names}}",
                      "--filter", f"label=runner.app={app}"]).stdout.split()
    if names:
        conn.run(["docker", "container", "rm", "--force", *names])
    root = deployer.runner_dir(conn)
    conn.run(["rm", "-rf", f"{root}/apps/{app}", f"{root}/locks/{app}"])
