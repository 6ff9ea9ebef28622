"""The scan gate on real images from the lab's build engine, with the real Trivy, offline:
through `runner exec` (checkout -> build -> scan -> push), and the stage alone."""
from __future__ import annotations

import datetime as dt
import stat
import subprocess
import threading
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest

from pipelines.scan import ScanGateFailed, ScanStage, find_tool
from runner.errors import StageFailed
from runner.model import Pipeline
from runner.outputs import Outputs
from runner.stage import StageContext
from tests.helpers import events, make_repo, runner, stage_end
from tests.doubles import DictSecrets, ListLog, build_outputs, checkout_outputs

pytestmark = pytest.mark.skipif(find_tool("trivy", None) is None, reason="trivy not installed")

CLEAN = ("FROM local/busybox:1\nCOPY hello.txt /srv/hello.txt\nUSER 1000:1000\n"
         'HEALTHCHECK CMD ["/bin/true"]\nCMD ["cat", "/srv/hello.txt"]\n')
ROOT_USER = 'FROM local/busybox:1\nCOPY hello.txt /srv/hello.txt\nCMD ["cat", "/srv/hello.txt"]\n'
# Copies a deploy key into the image: the mistake the secret scanner is there for.
KEY_IN_IMAGE = ("FROM local/busybox:1\nCOPY deploy_key /home/app/.ssh/id_ed25519\n"
                "USER 1000:1000\nHEALTHCHECK CMD [\"/bin/true\"]\nCMD [\"true\"]\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, lab) -> Path:
    yield tmp_path_factory.mktemp("scan-data")
    # The images these tests built in the lab's engine (the registry keeps what was pushed).
    out = subprocess.run(["/usr/bin/docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                         capture_output=True, text=True).stdout.split()
    mine = [ref for ref in out if "/scantest/" in ref]
    if mine:
        subprocess.run(["/usr/bin/docker", "rmi", "-f", *mine], capture_output=True)


def _repo(tmp: Path, dockerfile: str, key: bool = False) -> Path:
    repo = tmp / "repo"
    files = {"Dockerfile": dockerfile, "hello.txt": "hi\n"}
    repo.mkdir()
    if key:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(repo / "deploy_key")], check=True)
        (repo / "deploy_key.pub").unlink()
    return make_repo(repo, files)


def _pipeline(tmp: Path, repo: Path, registry: str, name: str, scan: str) -> Path:
    p = tmp / "pipeline.yaml"
    p.write_text(f"name: {name}\nrepository: {{url: {repo}}}\n"
                 f"image: {{name: \"{registry}/scantest/{name}\"}}\n"
                 f"stages:\n  scan:\n    enabled: true\n{scan}")
    return p


def _tags(registry: str, repo: str) -> list[str]:
    r = httpx.get(f"http://{registry}/v2/{repo}/tags/list", timeout=10)
    if r.status_code == 404:
        return []
    r.raise_for_status()
    return r.json().get("tags") or []


def test_private_key_in_image_fails_the_gate_and_nothing_is_pushed(lab, tmp_path, data_dir):
    """Nothing is left behind either: the blocked image loses its registry names on the build
    engine, and the run directory, its checkout (the key sits there at git's 0644) and the
    mirror cache are 0700, also where an older runner left them 0755."""
    name = f"leaky-{tmp_path.name[-12:].lower().replace('_', '-')}"
    repo = _repo(tmp_path, KEY_IN_IMAGE, key=True)
    p = _pipeline(tmp_path, repo, lab["registry"], name,
                  "    scanners: [secret, misconfig]\n    sarif: true\n")
    data = tmp_path / "data"
    for old in ("runs", "cache/git"):
        (data / old).mkdir(parents=True, mode=0o755)
        (data / old).chmod(0o755)
    proc = runner("exec", str(p), "--json", "--skip", "deploy", "--data-dir", str(data))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    evs = events(proc.stdout)
    scan = stage_end(evs, "scan")
    assert scan["status"] == "failed"
    assert "private-key [secret] HIGH in /home/app/.ssh/id_ed25519" in scan["error"]
    assert stage_end(evs, "push")["status"] == "skipped"
    assert _tags(lab["registry"], f"scantest/{name}") == []
    logs = [e["line"] for e in evs if e["event"] == "stage.log" and e["stage"] == "scan"]
    assert any("SEVERITY" in line and "SCANNER" in line for line in logs), logs  # the table

    image = f"{lab['registry']}/scantest/{name}"
    built = stage_end(evs, "build")["outputs"]
    assert built["tags"] and all(t.startswith(image + ":") for t in built["tags"])
    client = docker.from_env()
    try:
        assert client.images.list(name=image) == []
        for tag in built["tags"]:
            assert any(f"untagged {tag}: the scan gate blocked it" in line for line in logs)
            with pytest.raises(docker.errors.ImageNotFound):
                client.images.get(tag)
    finally:
        client.close()

    checkout = stage_end(evs, "checkout")["outputs"]
    run_dir = Path(checkout["path"]).parent
    private = [data / "runs", run_dir, Path(checkout["path"]), data / "cache",
               data / "cache" / "git", Path(checkout["mirror"])]
    assert {str(d): stat.S_IMODE(d.stat().st_mode) for d in private} == \
        {str(d): 0o700 for d in private}
    assert (Path(checkout["path"]) / "deploy_key").is_file()


def test_clean_image_passes_and_is_pushed(lab, tmp_path, data_dir):
    name = f"clean-{tmp_path.name[-12:].lower().replace('_', '-')}"
    repo = _repo(tmp_path, CLEAN)
    p = _pipeline(tmp_path, repo, lab["registry"], name,
                  "    scanners: [secret, misconfig]\n    fail_on: LOW\n")
    proc = runner("exec", str(p), "--json", "--skip", "deploy", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evs = events(proc.stdout)
    out = stage_end(evs, "scan")["outputs"]
    assert out["passed"] is True and out["checked"] == ["secret", "misconfig"]
    assert sum(out["counts"].values()) == 0
    assert Path(out["report"]).is_file()
    assert stage_end(evs, "push")["status"] == "success"
    assert _tags(lab["registry"], f"scantest/{name}")


def test_vuln_without_db_fails_clearly_and_nothing_is_pushed(lab, tmp_path, data_dir):
    name = f"nodb-{tmp_path.name[-12:].lower().replace('_', '-')}"
    repo = _repo(tmp_path, CLEAN)
    p = _pipeline(tmp_path, repo, lab["registry"], name, "    scanners: [vuln, secret]\n")
    proc = runner("exec", str(p), "--json", "--skip", "deploy", "--data-dir", str(data_dir))
    assert proc.returncode == 1
    scan = stage_end(events(proc.stdout), "scan")
    assert "no Trivy vulnerability database" in scan["error"]
    assert "Nothing was checked for vulnerabilities" in scan["error"]
    assert _tags(lab["registry"], f"scantest/{name}") == []


# --- the stage alone, on an image built in the lab's engine ----------------------------------

def _build(tmp: Path, dockerfile: str, tag: str) -> str:
    ctx = tmp / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    (ctx / "hello.txt").write_text("hi\n")
    env = {**__import__("os").environ, "DOCKER_BUILDKIT": "1"}
    subprocess.run(["/usr/bin/docker", "build", "-q", "-t", tag, str(ctx)], check=True, env=env,
                   capture_output=True)
    out = subprocess.run(["/usr/bin/docker", "image", "inspect", "-f", "{{.Id}}", tag],
                         check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip()


def _ctx(tmp: Path, image_id: str, scan: dict) -> StageContext:
    pipeline = Pipeline.model_validate({
        "name": "scan-lab", "repository": {"url": "/x"}, "image": {"name": "r/x"},
        "stages": {"scan": {"enabled": True, **scan}}})
    (tmp / "run").mkdir(exist_ok=True)
    return StageContext(run_id="t", pipeline=pipeline, workdir=tmp / "run",
                        cache_dir=tmp / "cache", log=ListLog(), secrets=DictSecrets(),
                        cancel=threading.Event(),
                        outputs=Outputs(checkout=checkout_outputs(tmp / "ctx"),
                                        build=build_outputs(image_id=image_id)))


@pytest.mark.parametrize("source", ["engine", "archive"])
def test_image_running_as_root_fails_at_high_and_passes_at_critical(lab, tmp_path, source):
    image = _build(tmp_path, ROOT_USER, f"runner-test/scan-root:{source}")
    base = {"scanners": ["misconfig"], "image_source": source}
    try:
        stage = ScanStage(today=lambda: dt.date(2026, 6, 1))
        with pytest.raises(ScanGateFailed) as info:
            stage.run(_ctx(tmp_path, image, {**base, "fail_on": "HIGH"}))
        assert "DS-0002 [misconfig] HIGH in <image config> (image)" in info.value.reason
        out = stage.run(_ctx(tmp_path, image, {**base, "fail_on": "CRITICAL"})).to_dict()
        assert out["passed"] and out["counts"]["HIGH"] == 1
        ignored = stage.run(_ctx(tmp_path, image, {**base, "ignore": [
            {"id": "DS002", "statement": "needs port 80"}]})).to_dict()
        assert ignored["passed"] and ignored["ignored"] == 1
        with pytest.raises(ScanGateFailed):
            stage.run(_ctx(tmp_path, image, {**base, "ignore": [
                {"id": "DS002", "statement": "needs port 80", "expired_at": "2026-01-01"}]}))
        assert not (tmp_path / "run" / "scan" / "image.tar").exists()  # export cleaned up
    finally:
        subprocess.run(["/usr/bin/docker", "rmi", "-f", f"runner-test/scan-root:{source}"],
                       capture_output=True)


@pytest.mark.parametrize("source", ["engine", "archive"])
def test_unknown_image_fails_as_a_stage_failure(lab, tmp_path, source):
    (tmp_path / "ctx").mkdir()
    with pytest.raises(StageFailed, match="image") as info:
        ScanStage().run(_ctx(tmp_path, "sha256:" + "0" * 64,
                             {"scanners": ["secret"], "image_source": source}))
    assert not isinstance(info.value, ScanGateFailed)
