"""What `runner exec` shows in a terminal, from recorded tool output, and what a sink that fails
(a full disk, a closed pipe) leaves of the run's record. No lab: the events are the ones the
engine emits (runner.runlog), the BuildKit lines are recorded `--progress=plain` output
(tests/data/build/progress), the Trivy lines are Trivy 0.76's stderr on an offline scan.
End to end on the lab: tests/lab/test_exec_faults.py."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from pipelines.buildkit import STEP_LOG_TAIL, parse_progress
from pipelines.scan import EXPECTED_TRIVY, trivy_message
from runner.render import BuildSteps, JsonSink, TerminalSink
from runner.runlog import RunLog
from runner.secrets import Masker

PROGRESS = Path(__file__).resolve().parents[1] / "data" / "build" / "progress"
WORKDIR = "/data/runs/r1"


def recorded(name: str) -> list[str]:
    return (PROGRESS / name).read_text().splitlines()


def build_events(lines: list[str], status: str = "success", error: str | None = None,
                 outputs: dict | None = None) -> list[dict]:
    """The events of a run whose build stage printed `lines`, as runner.runlog emits them; on
    success with the recap pipelines/build.py logs once the build is done."""
    evs = [{"event": "run.start", "run_id": "r1", "pipeline": "p", "stages": ["build"],
            "workdir": WORKDIR},
           {"event": "stage.start", "stage": "build"},
           {"event": "stage.log", "stage": "build", "kind": "info",
            "line": "running: docker build --progress=plain ."}]
    evs += [{"event": "stage.log", "stage": "build", "kind": "output", "line": line}
            for line in lines]
    if status == "success":
        progress = parse_progress(lines)
        evs += [{"event": "stage.log", "stage": "build", "kind": "info",
                 "line": f"{'CACHED' if s.cached else 'ran   '} {s.name}"}
                for s in progress.steps.values()]
    evs.append({"event": "stage.end", "stage": "build", "status": status, "duration": 1.25,
                "outputs": outputs or {}, "error": error})
    return evs


def show(evs: list[dict], width: int = 200, **options) -> list[str]:
    """The terminal view of `evs` (a plain stream, as when stderr is a file or a pipe)."""
    out = io.StringIO()
    sink = TerminalSink(Console(file=out, width=width, color_system=None, highlight=False,
                                soft_wrap=True), **options)
    for ev in evs:
        sink(ev)
    return out.getvalue().splitlines()


def build_lines(view: list[str]) -> list[str]:
    return [line[len("  [build] "):] for line in view if line.startswith("  [build] ")]


# --- the collapsed build ----------------------------------------------------------------------

def test_build_is_one_line_per_step_with_counts():
    view = show(build_events(recorded("cached.txt")))
    assert build_lines(view) == [
        "running: docker build --progress=plain .",
        "ran    [stage-0 1/5] FROM docker.io/local/busybox:1 (0.0s)",
        "CACHED [stage-0 2/5] WORKDIR /app",
        "CACHED [stage-0 3/5] COPY deps.txt ./",
        # the RUN's continued line comes as a run of spaces, kept whole on a plain stream
        "CACHED [stage-0 4/5] RUN --mount=type=cache,target=/cache cp deps.txt /cache/deps.txt "
        "&& wc -l /cache/deps.txt > installed.txt",
        "ran    [stage-0 5/5] COPY app.sh ./ (0.0s)",
    ]  # and the stage's own recap of the same steps is not shown a second time
    assert "<< build: success (1.2s; 5 steps: 3 cached, 2 ran)" in view
    assert not [line for line in view if "#" in line or "sha256:" in line]


def test_multi_stage_build_with_output_shows_steps_in_the_order_they_finish():
    lines = recorded("example-app.txt")  # the example app's first build on the lab
    view = build_lines(show(build_events(lines)))
    assert view[1:] == [
        "CACHED [deps 1/4] FROM docker.io/local/python:3.11",
        "ran    [deps 2/4] RUN python3 -m venv /venv (3.8s)",
        "ran    [deps 3/4] COPY requirements.txt /tmp/requirements.txt (0.0s)",
        "ran    [deps 4/4] RUN --mount=type=cache,target=/root/.cache/pip /venv/bin/pip "
        "install -r /tmp/requirements.txt (1.6s)",
        "ran    [stage-1 2/4] COPY --from=deps /venv /venv (0.3s)",
        "ran    [stage-1 3/4] WORKDIR /app (0.0s)",
        "ran    [stage-1 4/4] COPY app.py . (0.0s)",
    ]
    assert not [line for line in view if "Collecting" in line]  # pip's output: in -v only


def test_failing_step_is_shown_with_its_whole_output():
    lines = recorded("failed.txt")
    # More output than the stage's error quotes (its last 8 lines): all of it is shown.
    at = lines.index("#6 0.429 about to fail")
    lines[at:at] = [f"#6 0.{300 + n} line {n}" for n in range(12)]
    error = "step [3/3] RUN echo about to fail && exit 3 failed: exit code: 3"
    view = show(build_events(lines, "failed", error))
    assert build_lines(view)[1:] == [
        "CACHED [1/3] FROM docker.io/local/busybox:1",
        "ran    [2/3] RUN echo fine (0.3s)",
        "FAILED [3/3] RUN echo about to fail && exit 3",
        *[f"  line {n}" for n in range(12)],
        "  about to fail",
        "  ERROR: executor failed running [/bin/sh -c echo about to fail && exit 3]: "
        "exit code: 3",
    ]
    end = view.index("<< build: failed (1.2s; 3 steps: 1 cached, 1 ran, 1 failed)")
    assert view[end + 1] == f"   {error}"
    assert view[end + 2] == f"   full log: {WORKDIR}/logs/build.log (or runner exec -v to see it here)"


def test_a_failing_step_that_printed_much_shows_its_last_lines_and_says_where_the_rest_is():
    lines = recorded("failed.txt")
    at = lines.index("#6 0.429 about to fail")
    lines[at:at] = [f"#6 0.{300 + n} line {n}" for n in range(STEP_LOG_TAIL * 3)]
    view = build_lines(show(build_events(lines, "failed", "step failed")))
    failed = view.index("FAILED [3/3] RUN echo about to fail && exit 3")
    assert view[failed + 1] == f"  ({2 * STEP_LOG_TAIL + 1} earlier lines of this step in the " \
                               "full log)"
    assert view[failed + 2:failed + 2 + STEP_LOG_TAIL] == [
        *[f"  line {n}" for n in range(2 * STEP_LOG_TAIL + 1, 3 * STEP_LOG_TAIL)],
        "  about to fail"]


# --- untrusted text on the terminal -----------------------------------------------------------

HOSTILE = ("\x1b]8;;javascript:alert(1)\x1b\\click\x1b]8;;\x1b\\ \x1b[2J \x1b]0;pwned\x07 "
           "over\rwritten \x1b[41mHOSTILE\x1b[0m \x9b2J")


def hostile_run() -> list[dict]:
    """A run whose every kind of text carries escape sequences: build output (also in a failing
    step's quoted lines), a step name, the stages' messages and warnings, errors, the summary."""
    lines = recorded("failed.txt")
    at = lines.index("#6 0.429 about to fail")
    lines[at:at] = [f"#6 0.300 {HOSTILE}"]
    lines = [line.replace("RUN echo fine", f"RUN echo {HOSTILE}") for line in lines]
    evs = build_events(lines, "failed", f"step failed:\n  {HOSTILE}")
    evs[2:2] = [{"event": "stage.log", "stage": "build", "kind": kind, "line": f"{kind} {HOSTILE}"}
                for kind in ("info", "warning")]
    evs.append({"event": "run.end", "run_id": "r1", "status": "failed",
                "stages": [{"name": "build", "status": "failed", "duration": 1.0}],
                "warnings": [f"build: {HOSTILE}"], "error": f"stage 'build' failed: {HOSTILE}"})
    return evs


# What the view itself sends a terminal: its colours, and its spinner's cursor hiding, line
# clearing and moving up (rich's Status). Nothing else may reach the terminal.
RUNNER_OWN = re.compile(r"\x1b\[(?:[0-9;]*m|\?25[lh]|2K|1A)|\r(?=\x1b\[)")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.mark.parametrize("verbose", [False, True])
def test_untrusted_text_cannot_drive_the_terminal(verbose):
    for terminal in (False, True):
        out = io.StringIO()
        console = Console(file=out, width=200, force_terminal=terminal,
                          color_system="standard" if terminal else None, highlight=False,
                          soft_wrap=True)
        sink = TerminalSink(console, verbose=verbose)
        for ev in hostile_run():
            sink(ev)
        text = out.getvalue()
        assert text.count("HOSTILE") >= 4, text  # the text itself is shown
        # Nothing but the runner's own colours: no link, title, clear, overwrite, 8-bit CSI,
        # nor the build's own colour (41: red background).
        assert "\x1b[41m" not in text and "javascript" not in text and "pwned" not in text
        leftover = RUNNER_OWN.sub("", text) if terminal else text
        assert not CONTROL.search(leftover), repr(leftover)
        assert "over\\rwritten" in text
        if terminal:  # and the runner's own colours are there
            assert "\x1b[1;31m  [build] FAILED" in text or verbose
            assert "\x1b[1;36m>> build" in text


def test_verbose_shows_every_line():
    lines = recorded("example-app.txt")
    view = build_lines(show(build_events(lines), verbose=True))
    assert view[1:1 + len(lines)] == lines
    # No step lines besides the raw ones: the stage's recap follows as it was logged.
    assert view[1 + len(lines):] == [
        f"{'CACHED' if s.cached else 'ran   '} {s.name}"
        for s in parse_progress(lines).steps.values()]


def test_quiet_shows_no_steps_but_the_counts():
    view = show(build_events(recorded("cached.txt")), quiet=True)
    assert build_lines(view) == ["running: docker build --progress=plain ."]
    assert "<< build: success (1.2s; 5 steps: 3 cached, 2 ran)" in view


def test_other_tools_output_is_left_to_the_log_and_the_stages_messages_are_shown():
    evs = [{"event": "stage.start", "stage": "checkout"},
           {"event": "stage.log", "stage": "checkout", "kind": "output",
            "line": "remote: Counting objects: 100% (1391/1391), done."},
           {"event": "stage.log", "stage": "checkout", "kind": "info",
            "line": "checked out 4c0976d6eaad (branch main)"},
           {"event": "stage.log", "stage": "checkout", "kind": "warning",
            "line": "warning: something to know"},
           {"event": "stage.end", "stage": "checkout", "status": "success", "duration": 0.3}]
    assert show(evs) == [">> checkout", "  [checkout] checked out 4c0976d6eaad (branch main)",
                         "  [checkout] warning: something to know",
                         "<< checkout: success (0.3s)"]
    assert "  [checkout] remote: Counting objects: 100% (1391/1391), done." in show(evs, verbose=True)


def test_build_steps_counts_a_step_that_never_finished():
    steps = BuildSteps()
    for line in recorded("failed.txt")[:25]:  # cut off while [3/3] runs
        steps.feed(line)
    assert steps.counts() == "3 steps: 1 cached, 1 ran, 1 not finished"
    assert BuildSteps().counts() is None


def test_summary_says_where_the_record_and_the_logs_are():
    evs = build_events(recorded("cached.txt")) + [
        {"event": "run.end", "run_id": "r1", "status": "success", "exit_code": 0,
         "stages": [{"name": "build", "status": "success", "duration": 1.25}], "warnings": []}]
    assert show(evs)[-1] == (f"record: {WORKDIR}/run.json; every line of every stage: "
                             f"{WORKDIR}/logs/<stage>.log")


# --- Trivy's messages -------------------------------------------------------------------------

# Recorded from Trivy 0.76 scanning an image offline (the scan stage's flags).
FALLBACK = ("2026-12-02T05:18:16Z\tERROR\t[misconfig] Falling back to embedded checks\t"
            "err=\"failed to check cache: cache does not exist at \\\"/d/cache/trivy/policy/"
            "content\\\"\"")
ROUTINE = [
    "2026-12-02T05:18:16Z\tINFO\t[vex] Skipping VEX repository update",
    "2026-12-02T05:18:16Z\tINFO\t[checks-client] No downloadable checks were loaded as "
    "--skip-check-update is enabled, loading from existing cache...",
    "2026-12-02T05:18:26Z\tINFO\tDetected OS\tfamily=\"debian\" version=\"12.15\"",
    "2026-12-02T05:18:27Z\tWARN\t[pip] Unable to find python `site-packages` directory. "
    "License detection is skipped.\terr=\"site-packages directory not found\"",
    "",
]


def test_trivy_fallback_is_information():
    kind, message = trivy_message(FALLBACK)
    assert (kind, message) == ("info", EXPECTED_TRIVY[0][1])
    assert "ERROR" not in message


@pytest.mark.parametrize("line", ROUTINE)
def test_trivy_chatter_is_only_in_the_full_log(line):
    assert trivy_message(line) == ("detail", None)


def test_unexpected_trivy_messages_stay_visible():
    warn = "2026-12-02T05:18:27Z\tWARN\t[secret] The size of the scanned file is too large\tsize=12"
    assert trivy_message(warn) == ("info", "trivy WARN: [secret] The size of the scanned file "
                                           "is too large size=12")
    error = "2026-12-02T05:18:27Z\tERROR\t[image] failed to analyze layer\terr=\"boom\""
    assert trivy_message(error) == ("warning", "trivy ERROR: [image] failed to analyze layer "
                                               "err=\"boom\"")
    assert trivy_message("panic: runtime error: index out of range") == \
        ("info", "trivy: panic: runtime error: index out of range")


def test_trivy_fallback_reaches_the_terminal_as_information(tmp_path):
    """What the scan stage logs for the fallback line (the raw line, then the message): the
    terminal shows the message only, -v both; the stage's log file has both."""
    out = io.StringIO()
    sink = TerminalSink(Console(file=out, width=300, color_system=None, soft_wrap=True))
    log = RunLog("r1", Masker(), [sink], tmp_path / "logs")
    scan = log.for_stage("scan")
    for line in [ROUTINE[0], FALLBACK]:
        scan.line(line)
        kind, message = trivy_message(line)
        if message:
            scan.info(message)
    log.close()
    assert out.getvalue().splitlines() == [f"  [scan] {EXPECTED_TRIVY[0][1]}"]
    assert (tmp_path / "logs" / "scan.log").read_text().splitlines() == \
        [ROUTINE[0], FALLBACK, EXPECTED_TRIVY[0][1]]
    assert log.warnings == []


# --- a sink that fails ------------------------------------------------------------------------

def _record(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "events.jsonl").read_text().splitlines()]


def test_a_full_terminal_is_dropped_and_the_record_and_the_other_sink_go_on(tmp_path):
    full = open("/dev/full", "w")  # every write fails: No space left on device
    seen: list[dict] = []
    terminal = TerminalSink(Console(file=full, color_system=None))
    log = RunLog("r1", Masker(), [terminal, seen.append], tmp_path / "logs")
    build = log.for_stage("build")
    lines = recorded("example-app.txt")
    for line in lines:
        build.line(line)
    log.emit("stage.end", stage="build", status="success", duration=1.0)
    log.close()
    full.close()
    assert len(log.warnings) == 1
    assert log.warnings[0].startswith("the terminal output (stderr) failed (OSError: [Errno 28]")
    assert (tmp_path / "logs" / "build.log").read_text().splitlines() == lines
    record = _record(tmp_path / "logs")
    assert [e["line"] for e in record if e["event"] == "stage.log"] == lines
    # It failed at its first write: the first finished step (the view shows no raw line).
    failed = [i for i, e in enumerate(record) if e["event"] == "sink.failed"]
    assert len(failed) == 1 and record[failed[0] - 1]["line"] == "#4 CACHED"
    assert record[-1]["event"] == "stage.end"
    # The sink that works got everything, the failure included.
    assert [e["event"] for e in seen] == [e["event"] for e in record]


def test_json_sink_on_a_full_disk_fails_once_and_is_dropped(tmp_path):
    full = open("/dev/full", "w")
    log = RunLog("r1", Masker(), [JsonSink(full)], tmp_path / "logs")
    for n in range(3):
        log.for_stage("checkout").line(f"line {n}")
    log.close()
    full.close()
    assert len(log.warnings) == 1 and "the --json output (stdout) failed" in log.warnings[0]
    assert (tmp_path / "logs" / "checkout.log").read_text() == "line 0\nline 1\nline 2\n"


GUARDED = r"""
import os, sys
from runner.render import guard_std_fds
guard_std_fds()
record = open(sys.argv[1], "w")
os.write(2, b"to descriptor 2\n")  # as a C library or faulthandler would
record.write("the record\n")
record.close()
print(os.readlink("/proc/self/fd/2"))
"""


def test_closed_stderr_is_not_taken_by_the_next_file(tmp_path):
    import subprocess
    import sys

    record = tmp_path / "events.jsonl"
    proc = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, "-c", GUARDED,
                           str(record)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout
    assert record.read_text() == "the record\n"
    assert proc.stdout == "/dev/null\n"
