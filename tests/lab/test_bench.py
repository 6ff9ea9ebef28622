"""Smoke test of the benchmark harness (`python -m bench`): every variant once on a tiny image,
and the JSON it writes holds every figure. No timing assertions: timings belong to the bench.

On 2 servers only, not the bench's default 1, 2, 4: every server count runs the same code
(bench/deploy.py's loop over the counts: every variant, phase and ratio), so one count proves
the figures are written, and 2 is the one where the parallel variants and the rollout's waits
for the other servers have something to do. The 4th server (added by the bench) cost the suite
about a minute, the 1-server block a quarter of the rest; `python -m bench` itself still
runs 1, 2, 4."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

def _ansible() -> str | None:
    try:
        import ansible  # noqa: F401
        import ansible_collections.community.docker  # noqa: F401
    except ImportError as exc:
        return f"ansible is not importable ({exc}): `pip install ansible` to bench against it"
    if shutil.which("ansible-playbook") is None:  # what bench/deploy.py runs
        return "ansible-playbook is not on PATH (scripts/test puts .venv/bin first)"
    return None


@pytest.fixture(scope="module")
def quick(lab, tmp_path_factory):
    """One `python -m bench --quick` on the tiny image: (process, JSON, ansible skip reason)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    no_ansible = _ansible()
    variants = "runner,runner-http,runner-roles,plain-seq,plain-par,plain-nowait" + \
        ("" if no_ansible else ",ansible")
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--image", "tiny",
                        "--servers", "2", "--variants", variants, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=330,
                       env=dict(os.environ, DOCKER_HOST=lab["docker_host"]))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ratio" in p.stdout and str(out) in p.stdout
    return p, json.loads(out.read_text()), no_ansible


@pytest.mark.timeout(340)
def test_bench_quick_writes_every_figure(quick):
    p, data, no_ansible = quick
    variants = "runner,runner-http,runner-roles,plain-seq,plain-par,plain-nowait"

    dep = data["deploy"]
    assert list(dep["by_servers"]) == ["2"]
    n, block = "2", dep["by_servers"]["2"]
    for v in variants.split(","):
        assert block[v]["n"] == 1 and block[v]["median"] > 0, (n, v, block[v])
    assert block["runner/plain-par"]["ratio"] > 0
    assert block["runner/plain-seq"]["ratio"] > 0
    assert block["runner-http/plain-par"]["ratio"] > 0
    assert block["runner/plain-nowait"]["ratio"] > 0
    assert block["runner-roles/runner"]["ratio"] > 0  # web + worker ÷ web only (issue 23)
    assert block["runner_roles_server_phases"]["server_total"]["median"] is not None
    phases = block["runner_phases"]
    for key in ("python_start_imports", "stage_total", "healthy_at"):
        assert phases[key]["median"] is not None, (n, key, phases)
    server_phases = block["runner_server_phases"]  # from the deploy report's phases
    for key in ("connect", "pull", "switch", "start", "health", "commit", "server_total"):
        assert server_phases[key]["median"] is not None, (n, key, server_phases)
    assert dep["refs"][0] != dep["refs"][1]

    pipe = data["pipeline"]
    assert pipe["runner"]["median"] > 0 and pipe["shell"]["median"] > 0
    assert pipe["runner/shell"]["ratio"] > 0
    for s in ("checkout", "build", "push", "deploy"):
        assert pipe["runner_parts"][f"stage_{s}"]["median"] is not None
        assert pipe["shell_parts"][f"step_{s}"]["median"] is not None

    reb = data["rebuild"]
    assert reb["build_stage"]["cold"]["median"] > 0
    assert reb["build_stage"]["code_only"]["median"] > 0
    assert reb["code_only/cold"]["ratio"] > 0

    ov = data["overhead"]
    for key in ("startup", "between_stages", "exit", "outside_stages_total",
                "deploy_stage_minus_shell_step"):
        assert ov[key] is not None, key

    zd = data["zero-downtime"]
    for v in ("stop-start", "proxy"):
        assert zd["variants"][v]["requests"] > 0 and zd["variants"][v]["deploy"]["median"] > 0
    assert zd["variants"]["proxy"]["failed"] == 0, zd["variants"]["proxy"]["failures"]
    assert zd["latency"]["proxy"]["n"] > 0 and zd["latency"]["added_p50_ms"] is not None
    assert "zero-downtime" in p.stdout and "failed requests" in p.stdout

    names = {r["ratio"] for r in data["ratios"]}
    assert "deploy 2 srv: runner ÷ plain-par" in names
    assert "deploy 2 srv: runner ÷ plain-nowait" in names
    assert "deploy 2 srv: runner-roles ÷ runner (web + worker ÷ web only)" in names
    assert "promote" not in data  # --quick leaves the promote part out
    assert "full pipeline: runner exec ÷ shell script" in names
    assert "rebuild: code-only ÷ cold (build stage)" in names
    assert "zero-downtime: deploy proxy ÷ stop-start" in names

    # Nothing left running on the servers.
    from bench.common import lab_status
    for s in lab_status()["servers"]:
        r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o",
                            f"UserKnownHostsFile={s['known_hosts']}", "-i", s["key_file"],
                            f"{s['user']}@{s['host']}", "docker ps -aq --filter name=^bench-"],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "", s["name"]


def test_bench_quick_ansible_figures(quick):
    p, data, no_ansible = quick
    if no_ansible:
        pytest.skip(f"Ansible variant not run: {no_ansible}")
    block = data["deploy"]["by_servers"]["2"]
    assert block["ansible"]["n"] == 1 and block["ansible"]["median"] > 0
    assert block["runner/ansible"]["ratio"] > 0
    assert "deploy 2 srv: runner ÷ ansible" in {r["ratio"] for r in data["ratios"]}


@pytest.mark.timeout(60)
def test_bench_dashboard_small_writes_every_figure(tmp_path):
    """`python -m bench.dashboard` on a small SQLite store and one short live run (about 6 s; no
    lab needed). No timing assertions: the figures are there and every live line arrived."""
    from tests.lab.browser import browser_available
    missing = browser_available()
    if missing:
        pytest.skip(f"no browser for the live-log part: {missing}")
    out = tmp_path / "dashboard.json"
    p = subprocess.run([sys.executable, "-m", "bench.dashboard", "--runs", "2000", "--loads", "2", "--lines", "10",
                        "--sse-runs", "1", "--setups", "sqlite", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=50, check=False)
    assert out.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    part = data["runs_page"]["sqlite"]
    assert part["fill"]["runs"] == 2000 and part["fill"]["enqueue_s"] > 0
    for label, page in part["pages"].items():
        assert page["n"] == 2 and page["p50_ms"] > 0 and page["render_p50_ms"] is not None, (label, page)
        assert page["page_over_api_runs"] > 0 and page["query_p50_ms"] is not None, (label, page)
    assert part["pages"]["/runs"]["rows_shown"] == 50
    live = data["live"]
    assert [r["status"] for r in live["runs"]] == ["success"]
    run = live["runs"][0]
    # 10 ticks and the stage's first lines (fake_exec's "working" line and its stderr line).
    assert run["lines_stored"] == run["lines_on_page"] == live["python_sse"]["count"] == 12, run
    assert live["browser"]["count"] == 12 - run["lines_in_page_at_load"] >= 10, run  # the ticks arrive live
    assert "issue 13's goals" in p.stdout and "met?" in p.stdout
