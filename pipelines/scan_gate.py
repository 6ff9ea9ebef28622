"""The scan gate: findings + threshold + ignore list + today -> passed or not, and why. Pure.

Ignore rules follow Trivy's `.trivyignore.yaml` (sections `vulnerabilities`, `misconfigurations`,
`secrets`, `licenses`; entries with `id`, `statement`, `expired_at`, `paths`, `purls`) and the
plain `.trivyignore` (one id per line, optional `exp:YYYY-MM-DD`, `#` comments). As in Trivy, an
entry stops applying on its `expired_at` date.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipelines.scan_report import RANK, SEVERITIES, Finding, id_key

# Which findings a section of .trivyignore.yaml may match (None: any, for inline entries).
_SECTIONS = {
    "vulnerabilities": frozenset({"vuln"}),
    "misconfigurations": frozenset({"misconfig", "hadolint"}),
    "secrets": frozenset({"secret"}),
    "licenses": frozenset({"license"}),
}


@dataclass(frozen=True)
class IgnoreRule:
    id: str
    statement: str | None = None
    expired_at: dt.date | None = None
    paths: tuple[str, ...] = ()
    purls: tuple[str, ...] = ()
    scanners: frozenset[str] | None = None  # None: any scanner
    source: str = "pipeline"  # where the rule came from, for messages

    def matches(self, f: Finding) -> bool:
        if self.scanners is not None and f.scanner not in self.scanners:
            return False
        if id_key(self.id) not in {id_key(f.id), *(id_key(a) for a in f.aliases)}:
            return False
        if self.paths and not any(_path_match(f.path, p) for p in self.paths):
            return False
        if self.purls and not (f.purl and any(f.purl.startswith(p) for p in self.purls)):
            return False
        return True

    def expired(self, today: dt.date) -> bool:
        return self.expired_at is not None and today >= self.expired_at


def _path_match(path: str, pattern: str) -> bool:
    path, pattern = path.lstrip("/"), pattern.lstrip("/")
    return path == pattern or fnmatch.fnmatchcase(path, pattern)


def _date(value: Any, where: str) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ValueError(f"{where}: expired_at {value!r} is not a date (YYYY-MM-DD)") from None


def parse_ignore_yaml(text: str, source: str) -> list[IgnoreRule]:
    """Trivy's .trivyignore.yaml. Raises ValueError naming the bad entry."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping with sections such as 'vulnerabilities'")
    rules = []
    for section, entries in data.items():
        if section not in _SECTIONS:
            raise ValueError(f"{source}: unknown section {section!r} "
                             f"(known: {', '.join(_SECTIONS)})")
        for n, entry in enumerate(entries or []):
            where = f"{source}: {section}[{n}]"
            if not isinstance(entry, dict) or not entry.get("id"):
                raise ValueError(f"{where}: each entry needs an 'id'")
            unknown = set(entry) - {"id", "statement", "expired_at", "paths", "purls"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
            rules.append(IgnoreRule(
                id=str(entry["id"]), statement=(str(entry["statement"]).strip() or None)
                if entry.get("statement") else None,
                expired_at=_date(entry.get("expired_at"), where),
                paths=tuple(str(p) for p in entry.get("paths") or ()),
                purls=tuple(str(p) for p in entry.get("purls") or ()),
                scanners=_SECTIONS[section], source=source,
            ))
    return rules


def parse_ignore_plain(text: str, source: str) -> list[IgnoreRule]:
    """The plain .trivyignore: `ID [exp:YYYY-MM-DD]` per line; `#` starts a comment, which is
    taken as the reason when it is on the line before or after the id."""
    rules = []
    pending_comment: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line, _, comment = raw.partition("#")
        line, comment = line.strip(), comment.strip()
        if not line:
            pending_comment = comment or None
            continue
        fields = line.split()
        expired = None
        for extra in fields[1:]:
            if extra.startswith("exp:"):
                expired = _date(extra[4:], f"{source}:{number}")
        rules.append(IgnoreRule(id=fields[0], statement=comment or pending_comment,
                                expired_at=expired, source=f"{source}:{number}"))
        pending_comment = None
    return rules


def parse_ignore_file(text: str, source: str) -> list[IgnoreRule]:
    if source.endswith((".yaml", ".yml")):
        return parse_ignore_yaml(text, source)
    return parse_ignore_plain(text, source)


@dataclass(frozen=True)
class Ignored:
    finding: Finding
    reason: str  # the rule's statement, or why it does not count ("no fixed version")
    rule: IgnoreRule | None = None


@dataclass(frozen=True)
class GateResult:
    passed: bool
    fail_on: str
    # Findings that count (not ignored), per severity and per scanner.
    counts: dict[str, int]
    by_scanner: dict[str, dict[str, int]]
    failing: tuple[Finding, ...]  # at or above the threshold, worst first
    counted: tuple[Finding, ...]  # every finding that counts, worst first
    ignored: tuple[Ignored, ...]
    expired: tuple[tuple[Finding, IgnoreRule], ...] = field(default=())  # rule no longer applies

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "fail_on": self.fail_on, "counts": self.counts,
            "by_scanner": self.by_scanner,
            "failing": [finding_dict(f) for f in self.failing],
            "ignored": [dict(finding_dict(i.finding), reason=i.reason) for i in self.ignored],
            "expired_ignores": [dict(finding_dict(f), expired_at=r.expired_at.isoformat()
                                     if r.expired_at else None, statement=r.statement)
                                for f, r in self.expired],
        }


def _order(f: Finding) -> tuple:
    return (-RANK[f.severity], f.scanner, f.id, f.path)


def evaluate(
    findings: Iterable[Finding],
    *,
    fail_on: str,
    ignores: Sequence[IgnoreRule] = (),
    ignore_unfixed: bool = False,
    today: dt.date,
    scanners: Iterable[str] = (),
) -> GateResult:
    """Apply ignores and the threshold. `scanners` lists those that ran, so that they appear in
    `by_scanner` with zero counts (a scanner that ran and found nothing is not one that was
    skipped). `fail_on` "NONE" never fails."""
    counted: list[Finding] = []
    ignored: list[Ignored] = []
    expired: list[tuple[Finding, IgnoreRule]] = []
    for f in findings:
        live = [r for r in ignores if r.matches(f)]
        active = [r for r in live if not r.expired(today)]
        if active:
            rule = active[0]
            ignored.append(Ignored(f, rule.statement or f"listed in {rule.source} (no reason)",
                                   rule))
            continue
        if ignore_unfixed and f.scanner == "vuln" and not f.fixed_version:
            ignored.append(Ignored(f, "no fixed version (ignore_unfixed)"))
            continue
        expired.extend((f, r) for r in live)
        counted.append(f)
    counted.sort(key=_order)
    counts = {s: 0 for s in reversed(SEVERITIES)}
    by_scanner: dict[str, dict[str, int]] = {s: {} for s in scanners}
    for f in counted:
        counts[f.severity] += 1
        per = by_scanner.setdefault(f.scanner, {})
        per[f.severity] = per.get(f.severity, 0) + 1
    threshold = RANK.get(fail_on, len(SEVERITIES))  # NONE: above every severity
    failing = tuple(f for f in counted if RANK[f.severity] >= threshold)
    return GateResult(
        passed=not failing, fail_on=fail_on, counts=counts, by_scanner=by_scanner,
        failing=failing, counted=tuple(counted), ignored=tuple(ignored), expired=tuple(expired),
    )


def finding_dict(f: Finding) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f.id, "scanner": f.scanner, "severity": f.severity,
                           "target": f.target, "where": f.where, "title": f.title}
    if f.scanner == "vuln":
        out["fixed_version"] = f.fixed_version
    return out


def describe(f: Finding) -> str:
    """One line a user can act on: id, package or file, severity, fixed version where known."""
    text = f"{f.id} [{f.scanner}] {f.severity} in {f.where} ({f.target})"
    if f.scanner == "vuln":
        text += f", fixed in {f.fixed_version}" if f.fixed_version else ", no fixed version"
    if f.title:
        text += f": {f.title}"
    return text


def failure_message(result: GateResult, top: int = 5) -> str:
    n = len(result.failing)
    lines = [f"{n} finding{'s' if n != 1 else ''} at or above {result.fail_on}:"]
    lines += [f"  - {describe(f)}" for f in result.failing[:top]]
    if n > top:
        lines.append(f"  ... and {n - top} more")
    for f, rule in result.expired[:3]:
        if f in result.failing:
            lines.append(f"  note: the ignore entry for {rule.id} in {rule.source} expired on "
                         f"{rule.expired_at}")
    return "\n".join(lines)


def table(result: GateResult, limit: int = 10) -> list[str]:
    """A short table of the counted findings, for the terminal summary."""
    rows = [(f.severity, f.scanner, f.id, f.where,
             (f.fixed_version or "-") if f.scanner == "vuln" else "") for f in result.counted]
    if not rows:
        return []
    head = ("SEVERITY", "SCANNER", "ID", "WHERE", "FIXED")
    shown = rows[:limit]
    widths = [min(48, max(len(str(r[i])) for r in [head, *shown])) for i in range(len(head))]
    out = ["  ".join(str(c)[:w].ljust(w) for c, w in zip(r, widths)).rstrip()
           for r in [head, *shown]]
    if len(rows) > limit:
        out.append(f"... {len(rows) - limit} more in the report")
    return out
