"""JUnit XML reports -> counts and failures, with junitparser (the format's maintained parser).

Pure apart from reading the report files. A file that is not JUnit XML is a warning naming the
file, never an exception: a broken report must not hide the test run's own outcome.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Skipped
from junitparser.junitparser import JUnitXmlError

from runner.outputs import TestFailure

COUNT_KEYS = ("passed", "failed", "errors", "skipped", "total")


@dataclass
class ReportSummary:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    failures: list[TestFailure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, other: ReportSummary) -> None:
        for key in COUNT_KEYS:
            self.counts[key] += other.counts[key]
        self.failures.extend(other.failures)
        self.warnings.extend(other.warnings)


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def summarise(path: Path, step: str, shown_as: str | None = None) -> ReportSummary:
    """The counts and failures of one JUnit XML file (`<testsuites>` or a lone `<testsuite>`)."""
    out = ReportSummary()
    name = shown_as or str(path)
    try:
        xml = JUnitXml.fromfile(str(path))
        suites = [xml] if xml._tag == "testsuite" else list(xml)
        cases = [case for suite in suites for case in suite]
    except (JUnitXmlError, OSError, ValueError, SyntaxError) as exc:
        # lxml and ElementTree both raise a SyntaxError subclass for malformed XML.
        out.warnings.append(f"report {name} is not JUnit XML, left out: {exc}")
        return out
    for case in cases:
        out.counts["total"] += 1
        results = list(case.result)
        bad = next((r for r in results if isinstance(r, (Failure, Error))), None)
        if bad is not None:
            error = isinstance(bad, Error)
            out.counts["errors" if error else "failed"] += 1
            test = ".".join(p for p in (case.classname, case.name) if p)
            out.failures.append(TestFailure(step=step, test=test, error=error,
                                            message=_first_line(bad.message) or
                                            _first_line(bad.text)))
        elif any(isinstance(r, Skipped) for r in results):
            out.counts["skipped"] += 1
        else:
            out.counts["passed"] += 1
    return out

