"""pipelines.buildkit: argv by exact equality, progress parsing on captured output, detection
against the docker CLIs really installed on this machine."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines import buildkit
from pipelines.buildkit import (
    BUILDX,
    DOCKER_BUILDKIT,
    Builder,
    BuildSecretRef,
    BuildSpec,
    NoBuilder,
    build_argv,
    build_warnings,
    candidate_clis,
    check_secret_id,
    detect_builder,
    detect_builder_in,
    parse_progress,
    secret_env_var,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "build"
CLASSIC = Builder(DOCKER_BUILDKIT, "/usr/bin/docker", "20.10.24+dfsg1")
BX = Builder(BUILDX, "/usr/libexec/docker", "v0.10.4")


def test_minimal_argv_classic():
    spec = BuildSpec(context="/w/src", tags=("r:5000/a/b:abc",))
    assert build_argv(CLASSIC, spec) == [
        "/usr/bin/docker", "build", "--progress=plain", "-t", "r:5000/a/b:abc", "/w/src"]
    assert CLASSIC.env() == {"DOCKER_BUILDKIT": "1"}


def test_minimal_argv_buildx_loads_or_pushes():
    spec = BuildSpec(context="/w/src", tags=("a:1",))
    assert build_argv(BX, spec) == [
        "/usr/libexec/docker", "buildx", "build", "--load", "--progress=plain", "-t", "a:1",
        "/w/src"]
    spec = BuildSpec(context="/w/src", tags=("a:1",), push=True)
    assert build_argv(BX, spec)[:4] == ["/usr/libexec/docker", "buildx", "build", "--push"]


FULL = BuildSpec(
    context="/w/src/app",
    dockerfile="/w/src/app/docker/Dockerfile",
    tags=("reg:5000/x/app:abc1234", "reg:5000/x/app:main"),
    target="runtime",
    args={"PY": "3.11", "EMPTY": ""},
    secrets=(BuildSecretRef("tok", "tok"),),
    labels={"org.opencontainers.image.revision": "abc", "team": "a b"},
    cache_from=("reg:5000/x/app:cache", "type=registry,ref=reg:5000/x/app:main",
                "type=local,src=/tmp/c"),
    cache_to=("type=inline", "type=registry,ref=reg:5000/x/app:cache"),
    pull=True,
    platform="linux/amd64",
)


def test_full_argv_classic():
    assert build_argv(CLASSIC, FULL) == [
        "/usr/bin/docker", "build", "--progress=plain",
        "-f", "/w/src/app/docker/Dockerfile",
        "--target", "runtime",
        "--platform", "linux/amd64",
        "--pull",
        "--build-arg", "PY=3.11",
        "--build-arg", "EMPTY=",
        "--build-arg", "BUILDKIT_INLINE_CACHE=1",
        "--secret", "id=tok",
        "--label", "org.opencontainers.image.revision=abc",
        "--label", "team=a b",
        "--cache-from", "reg:5000/x/app:cache",
        "--cache-from", "reg:5000/x/app:main",
        "-t", "reg:5000/x/app:abc1234",
        "-t", "reg:5000/x/app:main",
        "/w/src/app",
    ]
    assert build_warnings(CLASSIC, FULL) == [
        "cache_from 'type=local,src=/tmp/c' ignored: docker-buildkit only reads registry images "
        "(with inline cache) as cache; install docker-buildx for other cache types",
        "cache_to 'type=registry,ref=reg:5000/x/app:cache' ignored: exporting cache needs buildx "
        "(install docker-buildx); only type=inline works with the built-in BuildKit",
    ]


def test_full_argv_buildx():
    spec = BuildSpec(**{**FULL.__dict__,
                        "secrets": (BuildSecretRef("tok", secret_env_var(BX, "tok")),)})
    assert build_argv(BX, spec) == [
        "/usr/libexec/docker", "buildx", "build", "--load", "--progress=plain",
        "-f", "/w/src/app/docker/Dockerfile",
        "--target", "runtime",
        "--platform", "linux/amd64",
        "--pull",
        "--build-arg", "PY=3.11",
        "--build-arg", "EMPTY=",
        "--secret", "id=tok,env=RUNNER_BUILD_SECRET_TOK",
        "--label", "org.opencontainers.image.revision=abc",
        "--label", "team=a b",
        "--cache-from", "reg:5000/x/app:cache",
        "--cache-from", "type=registry,ref=reg:5000/x/app:main",
        "--cache-from", "type=local,src=/tmp/c",
        "--cache-to", "type=inline",
        "--cache-to", "type=registry,ref=reg:5000/x/app:cache",
        "-t", "reg:5000/x/app:abc1234",
        "-t", "reg:5000/x/app:main",
        "/w/src/app",
    ]
    assert build_warnings(BX, spec) == []


def test_iidfile_before_tags():
    spec = BuildSpec(context="/c", tags=("a:1",), iidfile="/w/build/image-id")
    assert build_argv(CLASSIC, spec) == [
        "/usr/bin/docker", "build", "--progress=plain", "--iidfile", "/w/build/image-id",
        "-t", "a:1", "/c"]


def test_secret_values_never_in_argv():
    # The spec only carries ids and variable names; nothing else can reach the argv.
    spec = BuildSpec(context="/c", secrets=(BuildSecretRef("npm-token", "RUNNER_X"),))
    assert build_argv(BX, spec)[-3:] == ["--secret", "id=npm-token,env=RUNNER_X", "/c"]


def test_secret_env_var_and_ids():
    assert secret_env_var(BX, "npm-token") == "RUNNER_BUILD_SECRET_NPM_TOKEN"
    assert secret_env_var(CLASSIC, "tok") == "tok"
    assert check_secret_id(CLASSIC, "tok") is None
    assert check_secret_id(BX, "npm-token") is None
    assert "environment variable name" in check_secret_id(CLASSIC, "npm-token")
    assert "clashes" in check_secret_id(CLASSIC, "PATH")
    assert "clashes" in check_secret_id(CLASSIC, "DOCKER_HOST")
    assert "without ','" in check_secret_id(BX, "a,src=/etc/shadow")


CACHED_RUN = DATA / "progress" / "cached.txt"
FAILED_RUN = DATA / "progress" / "failed.txt"


def test_parse_progress_counts_steps_and_cached():
    progress = parse_progress(CACHED_RUN.read_text().splitlines())
    names = [s.name for s in progress.steps.values()]
    assert all(n.startswith("[") and "/" in n.split("]")[0] for n in names)
    assert not any(n.startswith("[internal]") for n in names)
    assert progress.total_steps == 5
    assert progress.cached_steps == 3
    assert progress.failed_step is None


def test_parse_progress_finds_failing_step():
    progress = parse_progress(FAILED_RUN.read_text().splitlines())
    step = progress.failed_step
    assert step is not None
    assert step.name == "[3/3] RUN echo about to fail && exit 3"
    assert step.error == ("executor failed running [/bin/sh -c echo about to fail && exit 3]: "
                          "exit code: 3")
    assert list(step.log) == ["about to fail"] and step.lines == 1
    assert progress.messages[-1] == step.error
    assert (progress.total_steps, progress.cached_steps) == (3, 1)


def test_a_step_keeps_its_last_lines_and_counts_them_all():
    """A step's whole output goes to the stage log on disk; in memory only its end, whatever it
    prints (a test step can print hundreds of thousands of lines)."""
    progress = parse_progress(["#5 [2/2] RUN seq 100000",
                               *(f"#5 0.{n % 1000:03d} {n}" for n in range(100_000)),
                               "#5 ERROR: exit code: 1"])
    step = progress.failed_step
    assert step.lines == 100_000
    assert list(step.log) == [str(n) for n in range(100_000 - buildkit.STEP_LOG_TAIL, 100_000)]


def test_parse_progress_stage_names():
    lines = ["#7 [builder 2/4] RUN make", "#7 CACHED", "#8 [stage-1 1/2] FROM x", "#8 DONE 0.1s",
             "#9 exporting to image", "#9 DONE 0.0s"]
    progress = parse_progress(lines)
    assert (progress.total_steps, progress.cached_steps) == (2, 1)


# --- detection, against the CLIs installed here ---------------------------------------------

def test_candidates_dedup_and_include_usr_bin(tmp_path):
    cands = candidate_clis(path=str(tmp_path))
    assert cands == (["/usr/bin/docker"] if os.path.exists("/usr/bin/docker") else [])


def test_no_builder_says_what_was_tried(tmp_path):
    fake = tmp_path / "docker"  # not executable: a clearly broken candidate
    fake.write_text("")
    with pytest.raises(NoBuilder) as err:
        detect_builder_in([str(fake)])
    text = str(err.value)
    assert str(fake) in text and "not an executable file" in text
    assert "docker-buildx" in text and "docker.io" in text


@pytest.mark.skipif(not os.path.exists("/usr/local/bin/docker"),
                    reason="needs the lab machine's docker CLI without buildx")
def test_cli_without_buildx_is_skipped_with_reason():
    with pytest.raises(NoBuilder) as err:
        detect_builder_in(["/usr/local/bin/docker"])
    assert "buildx component is missing" in str(err.value)


@pytest.mark.skipif(not os.path.exists("/usr/bin/docker"), reason="needs Debian's docker.io")
def test_detects_a_buildkit_capable_cli_and_caches_it():
    builder = detect_builder(refresh=True)
    assert builder.kind in (BUILDX, DOCKER_BUILDKIT)
    if builder.kind == DOCKER_BUILDKIT:
        assert builder.docker_cli == "/usr/bin/docker" or os.path.samefile(
            builder.docker_cli, "/usr/bin/docker")
        assert builder.version[:2].isdigit()
    assert detect_builder() is builder
    assert builder.kind in builder.describe() or "buildx" in builder.describe()


@pytest.mark.skipif(not os.path.exists("/usr/bin/docker"), reason="needs Debian's docker.io")
def test_detection_is_kept_on_disk_until_a_cli_or_plugin_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    cache = tmp_path / "cache" / "builder.json"
    real = detect_builder(refresh=True, cache_file=cache)
    stored = json.loads(cache.read_text())
    assert stored["builder"] == {"kind": real.kind, "docker_cli": real.docker_cli,
                                 "version": real.version}

    # A new process (no in-memory answer) takes the file's answer without probing: the file is
    # edited to a version no CLI reports, to tell the two apart.
    stored["builder"]["version"] = "from-the-cache-file"
    cache.write_text(json.dumps(stored))
    monkeypatch.setattr(buildkit, "_cached", None)
    assert detect_builder(cache_file=cache).version == "from-the-cache-file"

    # Installing a plugin dir (as installing buildx would) changes the fingerprint: probed again.
    (tmp_path / "docker-config" / "cli-plugins").mkdir(parents=True)
    monkeypatch.setattr(buildkit, "_cached", None)
    again = detect_builder(cache_file=cache)
    assert again == real
    assert json.loads(cache.read_text())["builder"]["version"] == real.version

    # An unreadable cache file is detected over, never an error.
    cache.write_text("{not json")
    monkeypatch.setattr(buildkit, "_cached", None)
    assert detect_builder(cache_file=cache) == real
