"""Scanner output in, findings out; findings in, SARIF out. Pure: no I/O but what the caller
hands in (dicts parsed from JSON) and returns (dicts to dump as JSON).

Trivy's JSON report (`trivy ... --format json`, schema version 2) holds `Results`, one per target
(an OS, a lockfile, a Dockerfile, a file with a secret), each with `Vulnerabilities`,
`Misconfigurations` and `Secrets`. hadolint's `-f json` output is a flat list.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
RANK = {name: i for i, name in enumerate(SEVERITIES)}

# hadolint levels onto Trivy's severities (the mapping code-scanning tools commonly use).
IMAGE_CONFIG = "<image config>"

HADOLINT_SEVERITY = {"error": "HIGH", "warning": "MEDIUM", "info": "LOW", "style": "LOW"}


@dataclass(frozen=True)
class Finding:
    scanner: str  # "vuln" | "secret" | "misconfig" | "hadolint"
    id: str  # CVE-2024-1234, private-key, DS-0002, DL3020
    severity: str  # one of SEVERITIES
    title: str
    target: str  # what was scanned: "image" | "context"
    path: str  # file (secret, misconfig, hadolint) or the report's target for a package
    package: str | None = None  # vuln: package name
    installed_version: str | None = None
    fixed_version: str | None = None  # vuln: "" / None when no fix exists
    purl: str | None = None
    status: str | None = None  # vuln: fixed / affected / will_not_fix ...; misconfig: FAIL
    line: int | None = None
    url: str | None = None
    aliases: tuple[str, ...] = field(default=())  # other spellings of id (AVD-DS-0002, DS002)

    @property
    def where(self) -> str:
        """The package (with version) for a vulnerability, else the file (and line)."""
        if self.package:
            version = f" {self.installed_version}" if self.installed_version else ""
            return f"{self.package}{version}"
        return f"{self.path}:{self.line}" if self.line else self.path


def _severity(value: Any) -> str:
    text = str(value or "UNKNOWN").upper()
    return text if text in RANK else "UNKNOWN"


def _misconfig_aliases(item: dict[str, Any]) -> tuple[str, ...]:
    names = []
    if item.get("AVDID"):
        names.append(str(item["AVDID"]))
    # "builtin.dockerfile.DS002": the old short id that .trivyignore files still use.
    namespace = str(item.get("Namespace") or "")
    if namespace.startswith("builtin.") and "." in namespace:
        names.append(namespace.rsplit(".", 1)[1])
    return tuple(n for n in names if n and n != item.get("ID"))


def parse_trivy(report: dict[str, Any], target: str) -> list[Finding]:
    """Every finding in one Trivy JSON report. Misconfigurations that passed are skipped."""
    findings: list[Finding] = []
    artifact = str(report.get("ArtifactName") or "")
    for result in report.get("Results") or []:
        where = str(result.get("Target") or "")
        if report.get("ArtifactType") == "container_image" and where == artifact:
            where = IMAGE_CONFIG  # findings in the image's config (history, ENV, USER)
        for v in result.get("Vulnerabilities") or []:
            findings.append(Finding(
                scanner="vuln", id=str(v.get("VulnerabilityID") or "?"),
                severity=_severity(v.get("Severity")), title=str(v.get("Title") or ""),
                target=target, path=str(v.get("PkgPath") or where),
                package=str(v.get("PkgName") or "") or None,
                installed_version=v.get("InstalledVersion") or None,
                fixed_version=v.get("FixedVersion") or None,
                purl=((v.get("PkgIdentifier") or {}).get("PURL")) or None,
                status=v.get("Status") or None, url=v.get("PrimaryURL") or None,
                aliases=tuple(v.get("VendorIDs") or ()),
            ))
        for m in result.get("Misconfigurations") or []:
            if str(m.get("Status") or "FAIL").upper() != "FAIL":
                continue
            cause = m.get("CauseMetadata") or {}
            findings.append(Finding(
                scanner="misconfig", id=str(m.get("ID") or m.get("AVDID") or "?"),
                severity=_severity(m.get("Severity")),
                title=str(m.get("Title") or m.get("Message") or ""),
                target=target, path=where, line=cause.get("StartLine") or None,
                status="FAIL", url=m.get("PrimaryURL") or None, aliases=_misconfig_aliases(m),
            ))
        for s in result.get("Secrets") or []:
            findings.append(Finding(
                scanner="secret", id=str(s.get("RuleID") or "?"),
                severity=_severity(s.get("Severity")), title=str(s.get("Title") or ""),
                target=target, path=where, line=s.get("StartLine") or None,
            ))
    return findings


def parse_hadolint(items: list[dict[str, Any]], path: str) -> list[Finding]:
    """hadolint's `-f json` list. `path` replaces hadolint's own file name (an absolute path in
    the run's checkout) with the Dockerfile's path in the repository."""
    return [
        Finding(
            scanner="hadolint", id=str(i.get("code") or "?"),
            severity=HADOLINT_SEVERITY.get(str(i.get("level") or ""), "UNKNOWN"),
            title=str(i.get("message") or ""), target="context", path=path,
            line=i.get("line") or None,
            url=(f"https://github.com/hadolint/hadolint/wiki/{i['code']}"
                 if str(i.get("code", "")).startswith("DL") else None),
        )
        for i in items
    ]


_SHORT_ID = re.compile(r"^(?:AVD-)?([A-Z]+)-?0*(\d+)$")


def id_key(value: str) -> str:
    """One spelling for ids that Trivy writes in several ways: DS002, DS-0002 and AVD-DS-0002
    are one check. Other ids (CVE-2024-1, private-key, DL3008) compare case-insensitively."""
    text = value.strip().upper()
    m = _SHORT_ID.match(text)
    if m:
        return f"{m.group(1)}-{int(m.group(2))}"
    return text


# --- SARIF 2.1.0 -----------------------------------------------------------------------------

_SARIF_LEVEL = {"CRITICAL": "error", "HIGH": "error", "MEDIUM": "warning", "LOW": "note",
                "UNKNOWN": "note"}
_SECURITY_SEVERITY = {"CRITICAL": "9.5", "HIGH": "8.0", "MEDIUM": "5.5", "LOW": "2.0",
                      "UNKNOWN": "0.0"}
_TOOLS = {
    "trivy": ("Trivy", "https://trivy.dev/"),
    "hadolint": ("hadolint", "https://github.com/hadolint/hadolint"),
}


def to_sarif(findings: list[Finding], versions: dict[str, str],
             ignored: dict[Finding, str] | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log with one run per tool. Ignored findings are kept, marked as
    suppressed with their reason, as code-scanning tools expect."""
    ignored = ignored or {}
    runs = []
    groups = {"trivy": [f for f in findings if f.scanner != "hadolint"],
              "hadolint": [f for f in findings if f.scanner == "hadolint"]}
    for tool, items in groups.items():
        if tool not in versions:
            continue
        name, uri = _TOOLS[tool]
        rules: dict[str, dict[str, Any]] = {}
        results = []
        for f in items:
            if f.id not in rules:
                rule: dict[str, Any] = {
                    "id": f.id,
                    "shortDescription": {"text": f.title or f.id},
                    "properties": {"security-severity": _SECURITY_SEVERITY[f.severity],
                                   "tags": ["security", f.scanner, f.severity]},
                }
                if f.url:
                    rule["helpUri"] = f.url
                rules[f.id] = rule
            text = f"{f.severity} {f.id}: {f.title}" if f.title else f"{f.severity} {f.id}"
            if f.package:
                text += f" ({f.where}; fixed in {f.fixed_version or 'no fixed version'})"
            region = {"startLine": int(f.line)} if f.line else {"startLine": 1}
            result: dict[str, Any] = {
                "ruleId": f.id,
                "ruleIndex": list(rules).index(f.id),
                "level": _SARIF_LEVEL[f.severity],
                "message": {"text": text},
                "locations": [{"physicalLocation": {
                    "artifactLocation": {"uri": f.path.lstrip("/") or f.target},
                    "region": region,
                }}],
                "properties": {"target": f.target, "scanner": f.scanner},
            }
            if f in ignored:
                result["suppressions"] = [{"kind": "external", "justification": ignored[f]}]
            results.append(result)
        runs.append({
            "tool": {"driver": {"name": name, "version": versions[tool], "informationUri": uri,
                                "rules": list(rules.values())}},
            "results": results,
        })
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": runs,
    }
