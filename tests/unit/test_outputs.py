"""The stages' typed outputs (runner/outputs.py): each gives exactly the JSON the stage records,
the pushed image is an ImageRef checked once, the engine hands them on and records them, and
docs/stage-outputs.md describes every key."""
from __future__ import annotations

import dataclasses
import json
import re
import threading
from pathlib import Path

import pytest

from runner import engine
from runner.errors import StageFailed
from runner.model import STAGE_ORDER, Image, Pipeline, Repository
from runner.model import reference
from runner.model.image import ImageRef
from runner.outputs import (
    OUTPUT_TYPES, BuildOutputs, CheckoutOutputs, DeployOutputs, Outputs, PushOutputs,
    ScanFinding, ScanOutputs, ServerResult, TestFailure, TestOutputs, TestStepResult, described,
)
from runner.run_request import RunRequest
from runner.secrets import Masker
from runner.stage import Stage, StageContext
from tests.doubles import DictSecrets

ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"
DIGEST = "sha256:" + "ab" * 32

CHECKOUT = CheckoutOutputs(commit=SHA, branch="main", tag=None, path=Path("/runs/r1/src"),
                           url="https://git.example.com/app.git",
                           mirror=Path("/cache/git/0f"), cloned=True,
                           committed_at="2024-05-01T12:00:00Z", default_branch="main")
BUILD = BuildOutputs(image_id="sha256:" + "cd" * 32, tags=("reg/app:0123456", "reg/app:main"),
                     builder="buildx", engine="local", cached_steps=3, total_steps=5)
SCAN = ScanOutputs(
    passed=False, fail_on="HIGH", counts={"CRITICAL": 0, "HIGH": 1},
    by_scanner={"secret": {"HIGH": 1}, "vuln": {}}, checked=("vuln", "secret"), ignored=2,
    report="/runs/r1/scan/trivy-image.json",
    reports={"trivy-image": "/runs/r1/scan/trivy-image.json", "gate": "/runs/r1/scan/gate.json"},
    sarif=None, db="missing", skipped_scanners={"hadolint": "hadolint not found"},
    top=(ScanFinding(id="private-key", scanner="secret", severity="HIGH", target="image",
                     where="/app/key", title="Asymmetric Private Key"),
         ScanFinding(id="CVE-2024-1", scanner="vuln", severity="HIGH", target="image",
                     where="openssl 3.0.1", title="a flaw", fixed_version="3.0.2")))
PUSH = PushOutputs(ref=ImageRef("reg/app", DIGEST), tags=("reg/app:0123456", "reg/app:main"),
                   verified=True, verification="the registry serves it",
                   credentials="stages.push.auth")
DEPLOY = DeployOutputs(
    app="app", what="deploy", ok=False, headline="deploy of app failed on web2",
    servers=(ServerResult("web1", "deployed", digest=DIGEST, duration=1.23456,
                          phases={"connect": 0.12345, "pull": 0.5}),
             ServerResult("web2", "rolled_back", digest="sha256:" + "ef" * 32,
                          previous_digest="sha256:" + "ef" * 32, rolled_back=True,
                          reason="health check failed")))
TEST_COUNTS = {"passed": 41, "failed": 2, "errors": 0, "skipped": 1, "total": 44}
TEST = TestOutputs(
    passed=False, services=("db",), counts=TEST_COUNTS,
    steps=(TestStepResult("unit", "sha256:" + "cd" * 32, "failed", 1, "pytest -q", 3.5,
                          TEST_COUNTS, ("/runs/r1/test/unit/reports_unit.xml",)),
           TestStepResult("lint", "python:3.11-slim", "not run", None, None, 0.0,
                          dict.fromkeys(TEST_COUNTS, 0), ())),
    failures=(TestFailure("unit", "tests.test_db.test_insert", "AssertionError: 1 != 2"),),
    phases={"service_start": 0.4, "service_ready": 2.1, "steps": 3.2, "cleanup": 0.6})
SAMPLES = {"checkout": CHECKOUT, "build": BUILD, "test": TEST, "scan": SCAN, "push": PUSH,
           "deploy": DEPLOY}

# What the stages emitted as dicts before they had types (and checkout's default_branch, added
# since): the record must not change.
EXPECTED = {
    "checkout": {"commit": SHA, "short_sha": SHA[:7], "branch": "main", "tag": None,
                 "path": "/runs/r1/src", "url": "https://git.example.com/app.git",
                 "mirror": "/cache/git/0f", "cloned": True,
                 "committed_at": "2024-05-01T12:00:00Z", "default_branch": "main"},
    "build": {"image_id": "sha256:" + "cd" * 32, "tags": ["reg/app:0123456", "reg/app:main"],
              "builder": "buildx", "engine": "local", "cached_steps": 3, "total_steps": 5},
    "test": {"passed": False, "summary": "41 passed, 2 failed, 1 skipped",
             "steps": [{"name": "unit", "image": "sha256:" + "cd" * 32, "status": "failed",
                        "exit_code": 1, "failed_command": "pytest -q", "duration": 3.5,
                        "counts": TEST_COUNTS, "reports": ["/runs/r1/test/unit/reports_unit.xml"]},
                       {"name": "lint", "image": "python:3.11-slim", "status": "not run",
                        "exit_code": None, "failed_command": None, "duration": 0.0,
                        "counts": dict.fromkeys(TEST_COUNTS, 0), "reports": []}],
             "services": ["db"], "counts": TEST_COUNTS,
             "failures": [{"step": "unit", "test": "tests.test_db.test_insert",
                           "message": "AssertionError: 1 != 2", "error": False}],
             "phases": {"service_start": 0.4, "service_ready": 2.1, "steps": 3.2,
                        "cleanup": 0.6}},
    "scan": {"passed": False, "fail_on": "HIGH", "counts": {"CRITICAL": 0, "HIGH": 1},
             "by_scanner": {"secret": {"HIGH": 1}, "vuln": {}}, "checked": ["vuln", "secret"],
             "ignored": 2, "report": "/runs/r1/scan/trivy-image.json",
             "reports": {"trivy-image": "/runs/r1/scan/trivy-image.json",
                         "gate": "/runs/r1/scan/gate.json"},
             "sarif": None, "db": "missing", "skipped_scanners": {"hadolint": "hadolint not found"},
             "top": [{"id": "private-key", "scanner": "secret", "severity": "HIGH",
                      "target": "image", "where": "/app/key", "title": "Asymmetric Private Key"},
                     {"id": "CVE-2024-1", "scanner": "vuln", "severity": "HIGH",
                      "target": "image", "where": "openssl 3.0.1", "title": "a flaw",
                      "fixed_version": "3.0.2"}]},
    "push": {"digest": DIGEST, "ref": f"reg/app@{DIGEST}",
             "tags": ["reg/app:0123456", "reg/app:main"], "verified": True,
             "verification": "the registry serves it", "credentials": "stages.push.auth"},
    "deploy": {"app": "app", "what": "deploy", "ok": False,
               "headline": "deploy of app failed on web2",
               "servers": [{"name": "web1", "status": "deployed", "digest": DIGEST,
                            "previous_digest": "", "release": "", "rolled_back": False,
                            "verified": True, "kept": "", "reason": "", "duration": 1.235,
                            "phases": {"connect": 0.123, "pull": 0.5}},
                           {"name": "web2", "status": "rolled_back",
                            "digest": "sha256:" + "ef" * 32,
                            "previous_digest": "sha256:" + "ef" * 32, "release": "",
                            "rolled_back": True, "verified": True, "kept": "",
                            "reason": "health check failed",
                            "duration": 0.0, "phases": {}}]},
}


# --------------------------------------------------------------------------- the types

def test_one_type_per_stage_in_stage_order():
    assert tuple(OUTPUT_TYPES) == STAGE_ORDER
    assert set(SAMPLES) == set(OUTPUT_TYPES)
    assert all(type(SAMPLES[s]) is t for s, t in OUTPUT_TYPES.items())


@pytest.mark.parametrize("stage", list(SAMPLES))
def test_to_dict_is_the_json_the_stage_emitted(stage):
    out = SAMPLES[stage].to_dict()
    assert out == EXPECTED[stage]
    assert list(out) == list(EXPECTED[stage])  # and in the same order, for run.json's readers
    assert json.loads(json.dumps(out)) == out  # plain JSON: lists, not tuples or paths


@pytest.mark.parametrize("stage", list(SAMPLES))
def test_outputs_are_frozen(stage):
    name = dataclasses.fields(SAMPLES[stage])[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(SAMPLES[stage], name, "changed")


def test_a_push_outputs_cannot_hold_a_bad_ref():
    with pytest.raises(TypeError, match="must be an ImageRef"):
        PushOutputs(ref=f"reg/app@{DIGEST}", tags=(), verified=True, verification="",
                    credentials="")
    with pytest.raises(ValueError, match="not an image reference by digest"):
        PushOutputs(ref=ImageRef("reg/app", "sha256:abc"), tags=(), verified=True,
                    verification="", credentials="")
    with pytest.raises(ValueError):
        ImageRef.parse("reg/app:main")


def test_the_deploy_reads_the_pushed_ref_as_it_is():
    assert isinstance(PUSH.ref, ImageRef)
    assert PUSH.digest == PUSH.ref.digest == DIGEST
    assert str(PUSH.ref) == EXPECTED["push"]["ref"]


def test_scan_finding_has_fixed_version_only_for_vulnerabilities():
    assert "fixed_version" not in SCAN.top[0].to_dict()
    unfixed = ScanFinding(id="CVE-1", scanner="vuln", severity="LOW", target="image",
                          where="zlib 1", title="t")
    assert unfixed.to_dict()["fixed_version"] is None


def test_outputs_takes_each_stage_own_type_only():
    outputs = Outputs()
    outputs.add("checkout", CHECKOUT)
    assert outputs.checkout is CHECKOUT and outputs.build is None
    with pytest.raises(TypeError, match="stage 'build' returned dict, not BuildOutputs"):
        outputs.add("build", BUILD.to_dict())
    with pytest.raises(TypeError, match="returned CheckoutOutputs, not PushOutputs"):
        outputs.add("push", CHECKOUT)
    with pytest.raises(KeyError):
        outputs.add("lint", CHECKOUT)


# --------------------------------------------------------------------------- the reference

ALL_TYPES = [*OUTPUT_TYPES.values(), ScanFinding, ServerResult, TestStepResult, TestFailure]


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_every_key_is_described(cls):
    rows = described(cls)
    sample = {"ScanFinding": SCAN.top[1], "ServerResult": DEPLOY.servers[0],
              "TestStepResult": TEST.steps[0], "TestFailure": TEST.failures[0]}.get(
        cls.__name__) or SAMPLES[cls.stage]
    assert sorted(r.key for r in rows) == sorted(sample.to_dict())
    assert all(r.doc.strip() for r in rows)


def _tables(text: str) -> dict[str, set[str]]:
    """docs/stage-outputs.md's generated tables: heading path -> the keys its table lists."""
    start, end = text.index(reference.OUTPUTS_BEGIN), text.index(reference.END)
    tables: dict[str, set[str]] = {}
    current = None
    for line in text[start:end].splitlines():
        m = re.match(r"^#{3,4} `([^`]+)`$", line)
        if m:
            current = tables.setdefault(m.group(1), set())
        m = re.match(r"^\| `([^`]+)` \|", line)
        if m and current is not None:
            current.add(m.group(1))
    return tables


def test_every_field_of_every_type_is_in_the_committed_stage_outputs_page():
    tables = _tables((ROOT / "docs" / reference.OUTPUTS_FILE).read_text(encoding="utf-8"))
    sections = dict(reference.output_sections())
    assert set(tables) == set(sections)
    for path, cls in sections.items():
        keys = {f.metadata.get("key", f.name) for f in dataclasses.fields(cls)}
        assert keys | set(cls.computed) == tables[path], path
    assert set(sections.values()) == set(ALL_TYPES)


def test_a_field_without_description_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        computed = ()
        x: int = 0

    with pytest.raises(ValueError, match="Bare.x has no description"):
        described(Bare)


# --------------------------------------------------------------------------- the engine

class _Checkout(Stage):
    name = "checkout"

    def plan(self, pipeline):
        return {}

    def run(self, ctx: StageContext) -> CheckoutOutputs:
        return CHECKOUT


class _Build(Stage):
    name = "build"
    seen: list = []

    def plan(self, pipeline):
        return {}

    def run(self, ctx: StageContext) -> BuildOutputs:
        self.seen.append(ctx.outputs.checkout)
        return BUILD


class _GateFails(Stage):
    name = "scan"

    def plan(self, pipeline):
        return {}

    def run(self, ctx: StageContext) -> ScanOutputs:
        raise StageFailed("scan", "HIGH found", SCAN)


class _ReturnsADict(Stage):
    name = "scan"

    def plan(self, pipeline):
        return {}

    def run(self, ctx: StageContext):
        return EXPECTED["scan"]


def _run(tmp_path: Path, monkeypatch, stages: dict[str, type]) -> tuple[engine.RunResult, dict]:
    monkeypatch.setattr(engine, "_stage", lambda name: stages[name]())
    pipeline = Pipeline(name="t", repository=Repository(url="https://example.invalid/t.git"),
                        image=Image(name="reg/app"))
    prep = engine.Prepared(pipeline=pipeline, stages=tuple(stages), request=RunRequest(),
                           masker=Masker(), secrets=DictSecrets(), run_id="r1",
                           data_dir=tmp_path)
    events: list[dict] = []
    result = engine.execute(prep, [events.append], threading.Event())
    record = json.loads((tmp_path / "runs" / "r1" / "run.json").read_text())
    ends = {e["stage"]: e for e in events if e["event"] == "stage.end"}
    assert {s["name"]: s["outputs"] for s in record["stages"]} == \
        {name: e["outputs"] for name, e in ends.items()}
    return result, ends


def test_the_engine_hands_outputs_on_and_records_their_json(tmp_path, monkeypatch):
    _Build.seen.clear()
    result, ends = _run(tmp_path, monkeypatch, {"checkout": _Checkout, "build": _Build})
    assert result.status == "success"
    assert _Build.seen == [CHECKOUT]
    assert ends["checkout"]["outputs"] == EXPECTED["checkout"]
    assert ends["build"]["outputs"] == EXPECTED["build"]


def test_a_failed_gate_records_its_typed_outputs(tmp_path, monkeypatch):
    result, ends = _run(tmp_path, monkeypatch,
                        {"checkout": _Checkout, "build": _Build, "scan": _GateFails})
    assert result.status == "failed"
    assert ends["scan"]["status"] == "failed" and ends["scan"]["error"] == "HIGH found"
    assert ends["scan"]["outputs"] == EXPECTED["scan"]


def test_a_stage_returning_another_type_is_a_bug_in_the_runner(tmp_path, monkeypatch):
    result, ends = _run(tmp_path, monkeypatch,
                        {"checkout": _Checkout, "build": _Build, "scan": _ReturnsADict})
    assert result.status == "failed" and ends["scan"]["outputs"] == {}
    assert "internal error in runner" in ends["scan"]["error"]
    assert "returned dict, not ScanOutputs" in ends["scan"]["error"]
