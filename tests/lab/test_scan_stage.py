"""The scan stage with the real Trivy and hadolint, offline, on a build context on disk (no engine
needed). Image scans through the lab's engine are in test_scan_lab.py."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from pipelines.scan import ScanGateFailed, ScanStage, find_tool
from runner.errors import StageFailed
from runner.model import Pipeline
from runner.outputs import Outputs
from runner.stage import StageContext
from tests.doubles import DictSecrets, ListLog, build_outputs, checkout_outputs

pytestmark = pytest.mark.skipif(find_tool("trivy", None) is None,
                                reason="trivy is not installed (pip install -e '.[scan]')")

ROOT_DOCKERFILE = 'FROM local/busybox:1\nCOPY app.sh /app/app.sh\nCMD ["/bin/sh", "/app/app.sh"]\n'
CLEAN_DOCKERFILE = ("FROM local/busybox:1\nCOPY app.sh /app/app.sh\nUSER 1000:1000\n"
                    'HEALTHCHECK CMD ["/bin/true"]\nCMD ["/bin/sh", "/app/app.sh"]\n')


def make_ctx(tmp: Path, repo: Path, scan: dict[str, Any], image_id: str | None = None,
             cache: Path | None = None) -> StageContext:
    pipeline = Pipeline.model_validate({
        "name": "scan-test", "repository": {"url": str(repo)},
        "image": {"name": "127.0.0.1:5000/scan-test"},
        "stages": {"scan": {"enabled": True, **scan}},
    })
    workdir = tmp / "run"
    workdir.mkdir(exist_ok=True)
    outputs = Outputs(checkout=checkout_outputs(repo),
                      build=build_outputs(image_id=image_id) if image_id else None)
    return StageContext(run_id="t", pipeline=pipeline, workdir=workdir,
                        cache_dir=cache or tmp / "cache", log=ListLog(), secrets=DictSecrets(),
                        cancel=threading.Event(), outputs=outputs)


def repo(tmp: Path, dockerfile: str, key: bool = False,
         extra: dict[str, str] | None = None) -> Path:
    path = tmp / "repo"
    path.mkdir()
    (path / "Dockerfile").write_text(dockerfile)
    (path / "app.sh").write_text("echo hello\n")
    for name, text in (extra or {}).items():
        (path / name).write_text(text)
    if key:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(path / "deploy_key")], check=True)
        (path / "deploy_key.pub").unlink()
    return path


CONTEXT = {"targets": ["context"]}
TODAY = dt.date(2026, 6, 1)


def run(ctx: StageContext) -> dict[str, Any]:
    """The stage's outputs as the run records them."""
    return ScanStage(today=lambda: TODAY).run(ctx).to_dict()


def test_private_key_in_context_fails_naming_the_secret(tmp_path):
    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE, key=True),
                   {**CONTEXT, "scanners": ["secret"], "sarif": True})
    with pytest.raises(ScanGateFailed) as info:
        run(ctx)
    msg = info.value.reason
    assert "private-key [secret] HIGH in deploy_key:" in msg, msg
    out = info.value.outputs.to_dict()
    assert out["passed"] is False
    assert out["by_scanner"] == {"secret": {"HIGH": 1}}
    report = json.loads(Path(out["report"]).read_text())
    assert report["Results"][0]["Secrets"][0]["RuleID"] == "private-key"
    sarif = json.loads(Path(out["sarif"]).read_text())
    assert sarif["runs"][0]["results"][0]["ruleId"] == "private-key"
    assert Path(out["reports"]["gate"]).is_file()


def test_offline_fallback_is_explained(tmp_path):
    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE),
                   {**CONTEXT, "scanners": ["misconfig"]})
    run(ctx)
    assert any("Falling back to embedded checks" in line for line in ctx.log.lines)
    # Said as information, once, and not as a warning: Trivy's ERROR level is not the news.
    said = [i for i in ctx.log.infos if "built into Trivy (expected offline" in i]
    assert len(said) == 1, ctx.log.infos
    assert not ctx.log.warns


def test_root_dockerfile_fails_at_high_passes_at_critical(tmp_path):
    # Trivy 0.76 reports DS-0002 ("Image user should not be 'root'") as HIGH.
    r = repo(tmp_path, ROOT_DOCKERFILE)
    with pytest.raises(ScanGateFailed) as info:
        run(make_ctx(tmp_path, r, {**CONTEXT, "scanners": ["misconfig"], "fail_on": "HIGH"}))
    assert "DS-0002 [misconfig] HIGH in Dockerfile" in info.value.reason
    out = run(make_ctx(tmp_path, r, {**CONTEXT, "scanners": ["misconfig"],
                                     "fail_on": "CRITICAL"}))
    assert out["passed"] is True
    assert out["counts"]["HIGH"] == 1 and out["counts"]["LOW"] == 1  # still counted, not failing
    assert out["checked"] == ["misconfig"] and out["skipped_scanners"] == {}


def test_ignore_with_reason_passes_and_expired_does_not(tmp_path):
    r = repo(tmp_path, ROOT_DOCKERFILE)
    entry = {"id": "DS002", "reason": "the app binds port 80"}
    ctx = make_ctx(tmp_path, r, {**CONTEXT, "scanners": ["misconfig"], "ignore": [entry]})
    out = run(ctx)
    assert out["passed"] is True and out["ignored"] == 1
    assert any("ignored DS-0002 in Dockerfile: the app binds port 80" in i
               for i in ctx.log.infos)
    expired = {**entry, "expired_at": "2026-05-31"}
    ctx = make_ctx(tmp_path, r, {**CONTEXT, "scanners": ["misconfig"], "ignore": [expired]})
    with pytest.raises(ScanGateFailed) as info:
        run(ctx)
    assert "DS-0002" in info.value.reason and "expired on 2026-05-31" in info.value.reason
    assert any("expired on 2026-05-31" in w for w in ctx.log.warns)


def test_repository_trivyignore_yaml_is_used(tmp_path):
    ignore = ("misconfigurations:\n  - id: AVD-DS-0002\n    statement: needs root\n"
              "    expired_at: 2027-01-01\n")
    r = repo(tmp_path, ROOT_DOCKERFILE, extra={".trivyignore.yaml": ignore})
    ctx = make_ctx(tmp_path, r, {**CONTEXT, "scanners": ["misconfig"]})
    assert run(ctx)["passed"] is True
    assert "using the repository's .trivyignore.yaml" in ctx.log.infos


def test_clean_context_passes(tmp_path):
    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE),
                   {**CONTEXT, "scanners": ["secret", "misconfig"], "fail_on": "LOW"})
    out = run(ctx)
    assert out["passed"] is True
    assert out["counts"] == {"CRITICAL": 0, "HIGH": 0, "MEDIUM": 0, "LOW": 0, "UNKNOWN": 0}
    assert out["by_scanner"] == {"secret": {}, "misconfig": {}}
    assert out["db"] == "not used"


def test_vuln_without_db_fails_clearly(tmp_path):
    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE), CONTEXT)  # default: all three
    with pytest.raises(StageFailed) as info:
        run(ctx)
    msg = info.value.reason
    assert "no Trivy vulnerability database" in msg
    assert "Nothing was checked for vulnerabilities" in msg
    assert not (ctx.workdir / "scan" / "trivy-context.json").exists()


def test_vuln_without_db_allowed_skips_only_vuln(tmp_path):
    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE),
                   {**CONTEXT, "allow_missing_db": True})
    out = run(ctx)
    assert out["passed"] is True
    assert out["checked"] == ["secret", "misconfig"]
    assert "vuln" not in out["by_scanner"]
    assert out["skipped_scanners"]["vuln"].startswith("no vulnerability database at ")
    assert out["db"] == "missing"
    assert any(w.startswith("VULNERABILITIES NOT CHECKED") for w in ctx.log.warns)


def test_missing_trivy_fails_with_install_hint(tmp_path):
    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE),
                   {**CONTEXT, "trivy": str(tmp_path / "no-such-trivy")})
    hint = r"scan extra \(in runner's checkout: `pip install '\.\[scan\]'`"
    with pytest.raises(StageFailed, match=hint):
        run(ctx)


def test_missing_trivy_not_required_skips_loudly(tmp_path):
    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE),
                   {**CONTEXT, "trivy": str(tmp_path / "no-such-trivy"), "required": False})
    out = run(ctx)
    assert out["checked"] == []
    assert set(out["skipped_scanners"]) == {"vuln", "secret", "misconfig"}
    assert any("SCAN NOT DONE" in w for w in ctx.log.warns)
    assert any("NOT known to be clean" in w for w in ctx.log.warns)


@pytest.mark.skipif(find_tool("hadolint", None) is None, reason="hadolint is not installed")
def test_hadolint_shares_threshold_and_ignores(tmp_path):
    bad = "FROM local/busybox:1\nADD app.sh /app.sh\nUSER 1000\nCMD [\"/bin/sh\", \"/app.sh\"]\n"
    r = repo(tmp_path, bad)
    with pytest.raises(ScanGateFailed) as info:
        run(make_ctx(tmp_path, r, {"scanners": [], "hadolint": True}))
    assert "DL3020 [hadolint] HIGH in Dockerfile:2" in info.value.reason
    out = run(make_ctx(tmp_path, r, {"scanners": [], "hadolint": True, "sarif": True,
                                     "ignore": [{"id": "DL3020",
                                                 "statement": "ADD of a local file"}]}))
    assert out["passed"] and out["checked"] == ["hadolint"]
    sarif = json.loads(Path(out["sarif"]).read_text())
    driver = sarif["runs"][0]["tool"]["driver"]
    assert driver["name"] == "hadolint" and driver["version"][0].isdigit()
    assert sarif["runs"][0]["results"][0]["suppressions"][0]["justification"] == \
        "ADD of a local file"


def test_plan_is_plain_data():
    pipeline = Pipeline.model_validate({
        "name": "p", "repository": {"url": "/x"}, "image": {"name": "r/x"},
        "stages": {"scan": {"enabled": True, "scanners": ["secret"], "fail_on": "CRITICAL"}}})
    plan = ScanStage().plan(pipeline)
    assert plan["scanners"] == ["secret"] and plan["fail_on"] == "CRITICAL"
    assert plan["db"]["skip_update"] is True  # the keys the file uses (stages.scan.db)
    json.dumps(plan)


def test_cancel_while_trivy_runs_stops_it(tmp_path):
    from runner.errors import Cancelled

    ctx = make_ctx(tmp_path, repo(tmp_path, CLEAN_DOCKERFILE),
                   {**CONTEXT, "scanners": ["secret", "misconfig"]})

    class CancellingLog(ListLog):
        def line(self, text: str) -> None:
            super().line(text)
            ctx.cancel.set()  # the first line Trivy prints: it is running

    ctx.log = CancellingLog()
    with pytest.raises(Cancelled):
        run(ctx)
    assert ctx.log.lines  # Trivy had started
    assert not (ctx.workdir / "scan" / "gate.json").exists()  # no verdict from a partial scan


# --- the scanners run at the same time ---------------------------------------------------------
# A stand-in for Trivy (stages.scan.trivy), so that the runs can wait for each other: it records
# its pid beside its report (scan/image.pid, scan/fs.pid), says so, then does what BEHAVIOUR says
# for its kind (image or fs). The real Trivy cannot be made to wait for another run.
FAKE_TRIVY = r'''#!/bin/sh
kind=$1
while [ $# -gt 0 ]; do [ "$1" = --output ] && out=$2; shift; done
dir=$(dirname "$out")
echo $$ > "$dir/$kind.pid.tmp" && mv "$dir/$kind.pid.tmp" "$dir/$kind.pid"
echo "started $kind"
waitfor() { i=0; while [ ! -e "$dir/$1" ]; do i=$((i+1)); [ $i -gt 200 ] && exit 9; sleep 0.05; done; }
report() {
  printf '{"SchemaVersion":2,"Trivy":{"Version":"fake"},"Results":[{"Target":"t","Secrets":[{"RuleID":"fake-%s","Severity":"LOW","Title":"t","StartLine":1}]}]}' "$kind" > "$out"
}
BEHAVIOUR
'''


def fake_trivy(tmp: Path, behaviour: str) -> str:
    path = tmp / "fake-trivy"
    path.write_text(FAKE_TRIVY.replace("BEHAVIOUR", behaviour))
    path.chmod(0o755)
    return str(path)


def both_targets(tmp: Path, trivy: str, **scan: Any) -> StageContext:
    return make_ctx(tmp, repo(tmp, CLEAN_DOCKERFILE),
                    {"targets": ["image", "context"], "scanners": ["secret"], "trivy": trivy,
                     "image_source": "engine", "timeout": 1, **scan},
                    image_id="sha256:" + "1" * 64)


def gone(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except ProcessLookupError:
        return True
    return False


def test_scanners_run_together_and_report_in_the_given_order(tmp_path):
    # Each Trivy run finishes only once the other has started, and the image's only after the
    # context's report is written: one after the other, the image's run would wait in vain.
    trivy = fake_trivy(tmp_path, 'case $kind in\n'
                                 '  image) waitfor fs.pid; waitfor trivy-context.json; report;;\n'
                                 '  fs) waitfor image.pid; report;;\n'
                                 'esac')
    hadolint = find_tool("hadolint", None) is not None
    ctx = both_targets(tmp_path, trivy, sarif=True, hadolint=hadolint)
    out = run(ctx)
    assert out["passed"] and out["counts"]["LOW"] == 2
    names = ["trivy-image", "trivy-context", *(["hadolint"] if hadolint else []), "gate"]
    assert list(out["reports"]) == names
    sarif = json.loads(Path(out["sarif"]).read_text())
    rules = [r["ruleId"] for run_ in sarif["runs"] for r in run_["results"]]
    assert rules[:2] == ["fake-image", "fake-fs"]  # the targets' order, not the finishing order
    # Each line in the stage's log says which run printed it.
    assert "[trivy image] started image" in ctx.log.lines
    assert "[trivy context] started fs" in ctx.log.lines


def test_one_failing_scanner_stops_the_others_and_is_named(tmp_path):
    trivy = fake_trivy(tmp_path, 'case $kind in\n'
                                 '  image) exec sleep 60;;\n'
                                 '  fs) waitfor image.pid; echo "no such directory"; exit 3;;\n'
                                 'esac')
    ctx = both_targets(tmp_path, trivy)
    with pytest.raises(StageFailed) as info:
        run(ctx)
    assert "trivy failed on the context (exit 3)" in info.value.reason, info.value.reason
    assert "no such directory" in info.value.reason
    assert gone(ctx.workdir / "scan" / "image.pid")  # stopped, not left to sleep
    assert not (ctx.workdir / "scan" / "gate.json").exists()


def test_cancel_stops_every_scanner(tmp_path):
    from runner.errors import Cancelled

    trivy = fake_trivy(tmp_path, "exec sleep 60")
    ctx = both_targets(tmp_path, trivy)

    class CancellingLog(ListLog):
        def line(self, text: str) -> None:
            super().line(text)
            if {"[trivy image] started image", "[trivy context] started fs"} <= set(self.lines):
                ctx.cancel.set()  # both are running

    ctx.log = CancellingLog()
    with pytest.raises(Cancelled):
        run(ctx)
    scan = ctx.workdir / "scan"
    assert gone(scan / "image.pid") and gone(scan / "fs.pid")
    assert not (scan / "gate.json").exists()
