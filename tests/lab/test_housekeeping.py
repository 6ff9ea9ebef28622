"""Housekeeping of the build engine on the lab's engine: after each run the pipeline keeps
build.keep_images of its images; `runner gc` does the same by hand (and --dry-run only says
so), test cache volumes above build.test_cache_limit go, a build cache above build.cache_limit
would be pruned (--dry-run only: the lab's engine's cache is everyone's); a disk below
build.disk_reserve fails the run before any stage, saying what uses the engine's disk.

One module-wide repository and five real runs (checkout + build, in this process) of one
pipeline whose image name is this module's own."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from runner.engine import RunOptions, execute, prepare
from tests.helpers import commit_files, commit_unique_image, make_repo, runner

DOCKERFILE = "FROM local/busybox:1\nCOPY version.txt /version.txt\n"


def _pipeline(tmp: Path, repo: Path, image: str, extra: str = "") -> Path:
    path = tmp / "pipeline.yml"
    path.write_text(
        f"name: {image.rsplit('/', 1)[-1]}\n"
        f"repository: {{url: {repo}, ref: main}}\n"
        f"image: {{name: {image}, tags: ['{{short_sha}}']}}\n"
        "stages:\n  build:\n    pull: false\n" + extra)
    return path


def _images(client, image: str) -> list[str]:
    return sorted(i.id for i in client.images.list(name=image))


@pytest.fixture(scope="module")
def built(lab, tmp_path_factory):
    """Five runs of one pipeline, each of a new commit: (pipeline file, image name, the five
    image ids in build order, the data dir). The images are removed at the end."""
    import docker

    tmp = tmp_path_factory.mktemp("housekeeping")
    image = f"{lab['registry']}/test/hk-{uuid.uuid4().hex[:8]}"
    repo = make_repo(tmp / "repo", {"Dockerfile": DOCKERFILE, "version.txt": "0\n"})
    pipeline = _pipeline(tmp, repo, image)
    data = tmp / "data"
    ids = []
    for n in range(1, 6):
        commit_files(repo, {"version.txt": f"{n} {uuid.uuid4().hex}\n"}, f"v{n}")
        prep = prepare(pipeline, RunOptions(only=("checkout", "build"), data_dir=data))
        result = execute(prep, [])
        assert result.status == "success", result.error
        ids.append(next(s for s in result.stages if s.name == "build").outputs["image_id"])
    client = docker.from_env()
    yield pipeline, image, ids, data, client
    for ref in client.images.list(name=image):
        for tag in ref.tags:
            client.images.remove(tag, force=True)
    client.close()


def test_runs_keep_only_keep_images_of_the_pipeline(built):
    _, image, ids, data, client = built
    # keep_images 3: the three newest stay, the two oldest are gone (before: all five).
    assert _images(client, image) == sorted(ids[2:])
    log = (data / "runs").glob("*/logs/build.log")
    removed = [line for f in log for line in f.read_text().splitlines() if "housekeeping:" in line]
    assert len([r for r in removed if "removed image" in r]) == 2
    # Its figures were recorded for the daemon's metrics.
    record = json.loads(next((data / "cache" / "engines").glob("*.json")).read_text())
    assert record["engine"] == "local" and record["disk_free_bytes"] > 0
    assert record["build_cache_bytes"] >= 0


def test_gc_by_hand_dry_run_then_for_real(built, tmp_path):
    pipeline, image, ids, data, client = built
    extra = [commit_unique_image(client, image, f"extra{n}").id for n in range(2)]
    volume = client.volumes.create(f"runner-cache-{Path(image).name}-{uuid.uuid4().hex[:12]}")
    client.containers.run("local/busybox:1", ["dd", "if=/dev/zero", "of=/c/f", "bs=1024",
                                              "count=2048"],
                          volumes={volume.name: {"bind": "/c", "mode": "rw"}}, remove=True)
    limits = ("    keep_images: 3\n    test_cache_limit: 1MB\n    cache_limit: 1kB\n")
    small = _pipeline(tmp_path, Path("/nonexistent"), image, limits)
    dry = runner("gc", str(small), "--dry-run", "--data-dir", str(data))
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    # The two newest are the extra tags; the oldest two of the runs' would go, and the volume.
    assert out.count("would remove image") == 2, out
    assert ids[2][:19] in out and ids[3][:19] in out
    assert f"would remove test cache volume {volume.name} (2.1 MB)" in out
    assert "would prune the build cache of" in out and "down to cache_limit 1kB" in out
    assert _images(client, image) == sorted([*ids[2:], *extra])  # nothing removed

    real = tmp_path / "real.yml"
    real.write_text(small.read_text().replace("    cache_limit: 1kB\n", ""))
    done = runner("gc", str(real), "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("removed image") == 2 and "removed test cache volume" in done.stdout
    assert _images(client, image) == sorted([ids[4], *extra])
    assert volume.name not in [v.name for v in client.volumes.list()]


def test_disk_below_the_reserve_fails_the_run_before_it_starts(built, tmp_path):
    pipeline, image, ids, data, client = built
    short = tmp_path / "short.yml"
    short.write_text(pipeline.read_text().replace("    pull: false\n",
                                                  "    pull: false\n    disk_reserve: 100TB\n"))
    before = _images(client, image)
    proc = runner("exec", str(short), "--only", "checkout,build", "--data-dir", str(data),
                  "--run-id", "short")
    assert proc.returncode == 1
    assert "not enough disk space to start the run: the build engine local's disk" in proc.stderr
    assert "less than build.disk_reserve (100 TB)" in proc.stderr
    assert "on the build engine: images" in proc.stderr and "build cache" in proc.stderr
    record = json.loads((data / "runs" / "short" / "run.json").read_text())
    assert record["status"] == "failed"
    stages = {s["name"]: s for s in record["stages"]}
    assert stages["checkout"]["status"] == stages["build"]["status"] == "skipped"
    assert {s["status"] for s in stages.values()} == {"skipped"}
    assert _images(client, image) == before
