"""The gate and the parsers, on reports captured from this Trivy's and hadolint's own runs
(tests/data/trivy/capture.py regenerates them). Pure: no scanner runs here."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from pipelines.scan import image_source, trivy_argv
from pipelines.scan_gate import (
    IgnoreRule, describe, evaluate, failure_message, parse_ignore_plain, parse_ignore_yaml, table,
)
from pipelines.scan_report import Finding, id_key, parse_hadolint, parse_trivy, to_sarif

DATA = Path(__file__).resolve().parents[1] / "data" / "trivy"
TODAY = dt.date(2026, 6, 1)


def load(name: str, target: str = "context") -> list[Finding]:
    return parse_trivy(json.loads((DATA / name).read_text()), target)


def hadolint() -> list[Finding]:
    return parse_hadolint(json.loads((DATA / "hadolint-lint.json").read_text()), "Dockerfile")


def test_parse_leaky_context_report():
    found = {(f.scanner, f.id, f.severity, f.path) for f in load("fs-leaky.json")}
    assert found == {
        ("misconfig", "DS-0002", "HIGH", "Dockerfile"),
        ("misconfig", "DS-0026", "LOW", "Dockerfile"),
        ("secret", "aws-access-key-id", "CRITICAL", ".aws/credentials"),
        ("secret", "aws-secret-access-key", "CRITICAL", ".aws/credentials"),
        ("secret", "private-key", "HIGH", "id_ed25519"),
    }
    ds002 = next(f for f in load("fs-leaky.json") if f.id == "DS-0002")
    assert "DS002" in ds002.aliases  # the short id from the check's namespace


def test_parse_clean_report_has_no_findings():
    assert load("fs-clean.json") == []


def test_threshold_high_fails_on_secrets_and_root_user():
    r = evaluate(load("fs-leaky.json"), fail_on="HIGH", today=TODAY,
                 scanners=["secret", "misconfig"])
    assert not r.passed
    assert [f.id for f in r.failing] == [
        "aws-access-key-id", "aws-secret-access-key", "DS-0002", "private-key"]
    assert r.counts == {"CRITICAL": 2, "HIGH": 2, "MEDIUM": 0, "LOW": 1, "UNKNOWN": 0}
    assert r.by_scanner == {"secret": {"CRITICAL": 2, "HIGH": 1},
                            "misconfig": {"HIGH": 1, "LOW": 1}}


def test_threshold_critical_and_none():
    findings = [f for f in load("fs-leaky.json") if f.scanner == "misconfig"]
    assert evaluate(findings, fail_on="HIGH", today=TODAY).passed is False
    assert evaluate(findings, fail_on="CRITICAL", today=TODAY).passed is True
    assert evaluate(findings, fail_on="LOW", today=TODAY).failing[-1].id == "DS-0026"
    assert evaluate(load("fs-leaky.json"), fail_on="NONE", today=TODAY).passed is True


@pytest.mark.parametrize("spelling", ["DS002", "DS-0002", "AVD-DS-0002", "ds002"])
def test_ignore_accepts_every_spelling_trivy_accepts(spelling):
    # Trivy 0.76 itself honours all of these for the check it reports as DS-0002.
    findings = [f for f in load("fs-leaky.json") if f.scanner == "misconfig"]
    r = evaluate(findings, fail_on="HIGH", today=TODAY,
                 ignores=[IgnoreRule(spelling, "runs as root on purpose")])
    assert r.passed
    assert [(i.finding.id, i.reason) for i in r.ignored] == [("DS-0002", "runs as root on purpose")]
    assert r.counts["HIGH"] == 0 and r.counts["LOW"] == 1


def test_ignore_expiry_against_injected_today():
    findings = [f for f in load("fs-leaky.json") if f.scanner == "misconfig"]
    rule = IgnoreRule("DS002", "until we add a user", expired_at=dt.date(2026, 6, 2))
    assert evaluate(findings, fail_on="HIGH", ignores=[rule], today=TODAY).passed
    # As in Trivy, the entry stops applying on its expiry date.
    on_day = evaluate(findings, fail_on="HIGH", ignores=[rule], today=dt.date(2026, 6, 2))
    assert not on_day.passed
    assert on_day.expired[0][1] is rule
    assert "expired on 2026-06-02" in failure_message(on_day)


def test_ignore_paths_and_sections():
    findings = load("fs-leaky.json")
    yaml_text = """
secrets:
  - id: aws-access-key-id
    paths: [".aws/*"]
    statement: test fixture credentials
  - id: aws-secret-access-key
    paths: ["elsewhere/credentials"]
    statement: wrong path, does not apply
misconfigurations:
  - id: private-key
    statement: wrong section, does not apply
"""
    rules = parse_ignore_yaml(yaml_text, ".trivyignore.yaml")
    r = evaluate(findings, fail_on="HIGH", ignores=rules, today=TODAY)
    assert [i.finding.id for i in r.ignored] == ["aws-access-key-id"]
    assert {f.id for f in r.failing} == {"aws-secret-access-key", "private-key", "DS-0002"}


def test_trivyignore_yaml_format():
    rules = parse_ignore_yaml("""
vulnerabilities:
  - id: CVE-2023-2650
  - id: CVE-2023-29491
    expired_at: 2023-09-01
    purls: ["pkg:deb/debian/libssl1.1"]
    statement: Accept the risk
""", "x.yaml")
    assert rules[0] == IgnoreRule("CVE-2023-2650", None, None, (), (), frozenset({"vuln"}),
                                  "x.yaml")
    assert rules[1].expired_at == dt.date(2023, 9, 1)
    assert rules[1].statement == "Accept the risk"
    with pytest.raises(ValueError, match="unknown key"):
        parse_ignore_yaml("secrets:\n  - id: x\n    reason_typo: y\n", "x.yaml")
    with pytest.raises(ValueError, match="not a date"):
        parse_ignore_yaml("secrets:\n  - id: x\n    expired_at: soon\n", "x.yaml")


def test_plain_trivyignore_format():
    rules = parse_ignore_plain("# the app needs root\nDS002\n\nprivate-key exp:2020-01-01 "
                               "# test key\n", ".trivyignore")
    assert [(r.id, r.statement, r.expired_at) for r in rules] == [
        ("DS002", "the app needs root", None),
        ("private-key", "test key", dt.date(2020, 1, 1)),
    ]


def test_ignore_unfixed_only_touches_vulnerabilities():
    # No vulnerability DB can be had here, so no captured report has vulnerabilities: these two
    # are built by hand from the fields parse_trivy fills.
    fixed = Finding("vuln", "CVE-2024-0001", "CRITICAL", "t", "image", "lib/apk/db/installed",
                    package="openssl", installed_version="3.0.1", fixed_version="3.0.2")
    unfixed = Finding("vuln", "CVE-2024-0002", "CRITICAL", "t", "image", "lib/apk/db/installed",
                      package="zlib", installed_version="1.2")
    secret = load("fs-leaky.json")[2]
    r = evaluate([fixed, unfixed, secret], fail_on="CRITICAL", ignore_unfixed=True, today=TODAY)
    assert [f.id for f in r.failing] == ["aws-access-key-id", "CVE-2024-0001"]
    assert [i.reason for i in r.ignored] == ["no fixed version (ignore_unfixed)"]
    assert describe(fixed) == ("CVE-2024-0001 [vuln] CRITICAL in openssl 3.0.1 (image), "
                               "fixed in 3.0.2: t")


def test_failure_message_names_top_findings():
    r = evaluate(load("fs-leaky.json"), fail_on="HIGH", today=TODAY)
    msg = failure_message(r, top=2)
    assert msg.splitlines() == [
        "4 findings at or above HIGH:",
        "  - aws-access-key-id [secret] CRITICAL in .aws/credentials:2 (context): "
        "AWS Access Key ID",
        "  - aws-secret-access-key [secret] CRITICAL in .aws/credentials:3 (context): "
        "AWS Secret Access Key",
        "  ... and 2 more",
    ]


def test_table_lists_counted_findings():
    rows = table(evaluate(load("fs-leaky.json"), fail_on="HIGH", today=TODAY))
    assert rows[0].split() == ["SEVERITY", "SCANNER", "ID", "WHERE", "FIXED"]
    assert rows[1].split()[:3] == ["CRITICAL", "secret", "aws-access-key-id"]
    assert len(rows) == 6


def test_hadolint_levels_map_to_severities_and_share_the_gate():
    found = [(f.id, f.severity, f.line) for f in hadolint()]
    assert found == [("DL3007", "MEDIUM", 1), ("DL3003", "MEDIUM", 2), ("DL3047", "LOW", 2),
                     ("DL3020", "HIGH", 3), ("DL3025", "MEDIUM", 4)]
    r = evaluate(hadolint(), fail_on="HIGH", today=TODAY, scanners=["hadolint"])
    assert [f.id for f in r.failing] == ["DL3020"]
    rules = parse_ignore_yaml("misconfigurations:\n  - id: DL3020\n    statement: ADD of a "
                              "local file is fine here\n", "x.yaml")
    assert evaluate(hadolint(), fail_on="HIGH", ignores=rules, today=TODAY).passed


def test_id_key():
    assert id_key("AVD-DS-0002") == id_key("DS002") == id_key("ds-2") == "DS-2"
    assert id_key("CVE-2024-1234") == "CVE-2024-1234"
    assert id_key("DL3008") == "DL-3008"
    assert id_key("private-key") == "PRIVATE-KEY"


def test_sarif_from_real_findings():
    findings = load("fs-leaky.json") + hadolint()
    r = evaluate(findings, fail_on="HIGH", today=TODAY,
                 ignores=[IgnoreRule("DS002", "root on purpose")])
    log = to_sarif(findings, {"trivy": "0.76.0", "hadolint": "2.15.1"},
                   {i.finding: i.reason for i in r.ignored})
    assert log["version"] == "2.1.0"
    trivy_run, hado_run = log["runs"]
    assert trivy_run["tool"]["driver"]["name"] == "Trivy"
    assert len(trivy_run["results"]) == 5 and len(hado_run["results"]) == 5
    key = next(x for x in trivy_run["results"] if x["ruleId"] == "private-key")
    assert key["level"] == "error"
    assert key["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "id_ed25519"
    ds = next(x for x in trivy_run["results"] if x["ruleId"] == "DS-0002")
    assert ds["suppressions"] == [{"kind": "external", "justification": "root on purpose"}]
    rules = trivy_run["tool"]["driver"]["rules"]
    for res in trivy_run["results"]:
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
    json.dumps(log)


def test_trivy_argv_is_offline_and_unfiltered():
    argv = trivy_argv("/bin/trivy", "image", "/run/x/image.tar", scanners=("secret", "misconfig"),
                      cache_dir="/c", output="/run/x/r.json")
    assert argv == [
        "/bin/trivy", "image", "--format", "json", "--output", "/run/x/r.json", "--cache-dir",
        "/c", "--scanners", "secret,misconfig", "--no-progress", "--ignorefile", "",
        "--timeout", "600s", "--skip-check-update", "--skip-version-check",
        "--disable-telemetry", "--skip-java-db-update", "--skip-vex-repo-update",
        "--offline-scan", "--skip-db-update", "--image-config-scanners", "secret,misconfig",
        "--input", "/run/x/image.tar",
    ]
    online = trivy_argv("/bin/trivy", "fs", "/src", scanners=("vuln",), cache_dir="/c",
                        output="/o", skip_db_update=False, db_repository="10.0.0.1:5000/trivy-db")
    assert "--skip-db-update" not in online
    assert online[-3:] == ["--db-repository", "10.0.0.1:5000/trivy-db", "/src"]


def test_image_report_names_the_secret_and_the_image_config():
    findings = load("image-leaky.json", target="image")
    r = evaluate(findings, fail_on="HIGH", today=TODAY, scanners=["secret", "misconfig"])
    assert not r.passed
    where = {(f.id, f.where) for f in r.failing}
    assert ("private-key", "/app/id_ed25519:2") in where
    assert ("DS-0002", "<image config>") in where  # from --image-config-scanners misconfig
    assert "private-key [secret] HIGH in /app/id_ed25519:2 (image)" in failure_message(r, top=9)
    # An ignore limited to the copied Dockerfile leaves the image's own root user counted.
    only_file = IgnoreRule("DS002", "copied file only", paths=("app/Dockerfile",))
    r2 = evaluate([f for f in findings if f.scanner == "misconfig"], fail_on="HIGH",
                  ignores=[only_file], today=TODAY)
    assert [(f.id, f.where) for f in r2.failing] == [("DS-0002", "<image config>")]


def test_clean_image_report_passes_at_every_threshold():
    assert load("image-clean.json", target="image") == []
    assert evaluate(load("image-clean.json", "image"), fail_on="UNKNOWN", today=TODAY).passed


def test_trivy_argv_engine_source_never_pulls():
    argv = trivy_argv("/bin/trivy", "image", "sha256:abc", scanners=("secret",), cache_dir="/c",
                      output="/o", docker_host="unix:///run/x.sock")
    assert argv[-7:] == ["--image-config-scanners", "secret", "--image-src", "docker",
                         "--docker-host", "unix:///run/x.sock", "sha256:abc"]
    assert "remote" not in argv and "--input" not in argv


def test_image_source_choice():
    assert image_source("auto", None) == ""
    assert image_source("auto", "unix:///run/runner-lab/docker.sock") == \
        "unix:///run/runner-lab/docker.sock"
    assert image_source("auto", "ssh://root@host") is None
    assert image_source("archive", "unix:///x") is None
    assert image_source("engine", "tcp://127.0.0.1:2375") == "tcp://127.0.0.1:2375"


def test_db_status_reads_age_from_metadata(tmp_path):
    from pipelines.scan import db_status
    now = dt.datetime(2026, 6, 3, 12, 0, tzinfo=dt.timezone.utc)
    assert db_status(tmp_path, now)["summary"] == "missing"
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "trivy.db").write_bytes(b"x")
    assert db_status(tmp_path, now)["summary"] == "present, age unknown"
    # The fields Trivy writes into db/metadata.json next to trivy.db.
    (tmp_path / "db" / "metadata.json").write_text(json.dumps({
        "Version": 2, "NextUpdate": "2026-06-01T12:00:00.123456789Z",
        "UpdatedAt": "2026-06-01T06:00:00.123456789Z",
        "DownloadedAt": "2026-06-01T07:00:00Z"}))
    status = db_status(tmp_path, now)
    assert status["present"] and status["age_hours"] == 54.0
    assert status["summary"] == "2.2 days old (updated 2026-06-01 06:00Z)"


def test_model_refuses_a_scan_that_checks_nothing():
    from pydantic import ValidationError

    from runner.model import ScanSettings
    with pytest.raises(ValidationError, match="nothing would be checked"):
        ScanSettings(enabled=True, scanners=[], hadolint=False)
    with pytest.raises(ValidationError, match="only once"):
        ScanSettings(scanners=["secret", "secret"])
    with pytest.raises(ValidationError):
        ScanSettings(fail_on="SEVERE")
    with pytest.raises(ValidationError, match="statement"):
        ScanSettings(ignore=[{"id": "DS002"}])  # an inline ignore needs its reason
    assert ScanSettings(ignore=[{"id": "DS002", "reason": "r"}]).ignore[0].statement == "r"
