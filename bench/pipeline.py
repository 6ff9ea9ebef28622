"""Full pipeline, rebuild and overhead: `runner exec` against the same steps as a shell script.

- full pipeline: a local git repository holding the app; before every run (untimed) one commit
  changes the app's code only. `runner exec` (checkout -> build -> push -> deploy, scan off)
  against a shell script doing `git fetch` (clone the first time), `DOCKER_BUILDKIT=1
  /usr/bin/docker build`, `docker push`, and the plain parallel ssh deploy of bench.deploy, to
  the same servers, same container. Both share the build engine, so both get BuildKit's cache.
- rebuild: `runner exec --only checkout,build` cold (a new CACHE_BUST build arg, read by every
  RUN of the dependency stage, and pip pointed at an empty cache dir: every step runs and pip
  downloads) against code-only (a code commit, the same args as before).
- overhead: from the runner's own event timestamps in the full-pipeline runs: process start to
  run.start, run.start to the first stage, gaps between stages, run.end to process exit; and
  each stage's time minus the same step in the shell script.
"""
from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

from bench.common import (APP_PORT, CONTAINER, DOCKER, HOST_PORT, ROOT, Timer, docker_env, log,
                          pair_range, ratio, set_version, ssh_argv, summary, write_app)
from bench.deploy import plain_remote

STAGES = ("checkout", "build", "push", "deploy")


class Repo:
    """The app in a local git repository; `change()` commits a code-only change."""

    def __init__(self, kind: str, path: Path):
        self.kind, self.path, self.n = kind, path, 0
        # A nonce per bench run: contents never repeat an earlier run's, so BuildKit cannot
        # hand back a layer a previous bench already built for the same text.
        self.nonce = secrets.token_hex(4)
        self.args = write_app(kind, path, f"{self.nonce}-c0")
        self.git("init", "-q", "-b", "main")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "c0")

    def git(self, *argv: str) -> str:
        return subprocess.run(["git", "-C", str(self.path), "-c", "user.name=bench",
                               "-c", "user.email=bench@localhost", *argv], check=True,
                              capture_output=True, text=True).stdout

    def change(self) -> None:
        self.n += 1
        set_version(self.kind, self.path, f"{self.nonce}-c{self.n}")
        self.git("commit", "-q", "-am", f"c{self.n}")


def pipeline_file(workdir: Path, repo: Repo, lab: dict, servers: list[dict]) -> Path:
    s0 = servers[0]
    args = dict(repo.args, CACHE_BUST="${CACHE_BUST}")
    if repo.kind == "example":
        args["PIP_CACHE_DIR"] = "${PIP_CACHE_DIR}"
    doc = {
        "version": 1, "name": "bench-pipe",
        "repository": {"url": str(repo.path), "ref": "main"},
        "variables": {"CACHE_BUST": "warm", "PIP_CACHE_DIR": "/root/.cache/pip"},
        "image": {"name": f"{lab['registry']}/bench/pipe-{repo.kind}", "tags": ["{short_sha}"]},
        "stages": {
            "build": {"context": ".", "args": args},
            "scan": {"enabled": False},
            "push": {},
            "deploy": {
                "enabled": True,
                "servers": [f"{s['user']}@{s['host']}:{s['port']}" for s in servers],
                "ssh": {"key_file": s0["key_file"], "known_hosts": s0["known_hosts"]},
                "container": {"name": CONTAINER, "ports": [f"{HOST_PORT}:{APP_PORT}"]},
                "healthcheck": {"timeout": 60},
                "strategy": {"type": "all"},
                "lock": {"wait": 30},
            },
        },
    }
    path = workdir / "pipeline.yaml"
    path.write_text(json.dumps(doc, indent=1))
    return path


def plain_script(workdir: Path, repo: Repo, lab: dict, servers: list[dict]) -> Path:
    """The shell script a user would write instead (POSIX sh; prints a timestamp per step)."""
    image = f"{lab['registry']}/bench/pipe-{repo.kind}"
    build_args = " ".join(f"--build-arg {shlex.quote(f'{k}={v}')}" for k, v in repo.args.items())
    template = plain_remote("@@REF@@")
    ssh_lines = "\n".join(
        shlex.join(ssh_argv(s, "")[:-1]) + ' "$remote" & pids="$pids $!"' for s in servers)
    text = f"""#!/bin/sh
set -eu
export DOCKER_HOST={shlex.quote(lab['docker_host'])} DOCKER_BUILDKIT=1
work={shlex.quote(str(workdir / 'plain-work'))}
now() {{ date +%s.%N; }}
echo "start $(now)"
if [ -d "$work/.git" ]; then
  git -C "$work" fetch -q origin main && git -C "$work" checkout -q -f FETCH_HEAD
else
  git clone -q {shlex.quote(str(repo.path))} "$work"
fi
sha=$(git -C "$work" rev-parse --short=7 HEAD)
echo "checkout $(now)"
{DOCKER} build -q {build_args} -t {image}:"$sha" "$work" >/dev/null
echo "build $(now)"
digest=$({DOCKER} push {image}:"$sha" | sed -n 's/.*digest: \\(sha256:[0-9a-f]*\\).*/\\1/p')
[ -n "$digest" ]
echo "push $(now)"
remote=$(printf '%s' {shlex.quote(template)} | sed "s|@@REF@@|{image}@$digest|g")
pids=""
{ssh_lines}
for p in $pids; do wait "$p"; done
echo "deploy $(now)"
echo "ref {image}@$digest"
"""
    path = workdir / "plain-pipeline.sh"
    path.write_text(text)
    path.chmod(0o755)
    return path


def runner_exec(pipeline: Path, lab: dict, data_dir: Path, *extra: str) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "runner", "exec", str(pipeline), "--json",
            "--data-dir", str(data_dir), *extra]
    t = Timer(argv, env=docker_env(lab), cwd=str(ROOT), timeout=900).run()
    events = [json.loads(line) for line in t.result.stdout.splitlines()
              if line.startswith("{")]
    end = next((e for e in events if e.get("event") == "run.end"), {})
    if t.result.returncode != 0:
        raise RuntimeError(f"runner exec failed: {end.get('error')}\n{t.result.stderr[-2000:]}")
    return t.wall, split_events(events, t.started_epoch, t.wall)


def split_events(events: list[dict], spawned: float, wall: float) -> dict:
    """Where one `runner exec` spent its time, from its event timestamps."""
    start = next(e for e in events if e["event"] == "run.start")
    end = next(e for e in events if e["event"] == "run.end")
    stages = {}
    gaps = 0.0
    prev = start["time"]
    outputs = {}
    for e in events:
        if e["event"] == "stage.start":
            gaps += e["time"] - prev
            stages[e["stage"]] = {"start": e["time"]}
        elif e["event"] == "stage.end" and e["stage"] in stages:
            stages[e["stage"]]["duration"] = e.get("duration", 0.0)
            prev = e["time"]
            outputs[e["stage"]] = e.get("outputs") or {}
    gaps += end["time"] - prev
    out = {"startup": round(start["time"] - spawned, 3),
           "between_stages": round(gaps, 3),
           "exit": round(spawned + wall - end["time"], 3),
           "run_duration": end.get("duration")}
    for name, s in stages.items():
        out[f"stage_{name}"] = s.get("duration")
    build = outputs.get("build") or {}
    if "cached_steps" in build:
        out["build_cached_steps"] = build.get("cached_steps")
        out["build_total_steps"] = build.get("total_steps")
    deploy_logs = [e for e in events if e["event"] == "stage.log" and e.get("stage") == "deploy"]
    locked = [e["time"] for e in deploy_logs if ": deploy lock taken" in e.get("line", "")]
    if locked and "deploy" in stages:
        out["deploy_connect_lock"] = round(max(locked) - stages["deploy"]["start"], 3)
    return out


def run_plain(script: Path) -> tuple[float, dict]:
    t = Timer(["sh", str(script)], timeout=900).run()
    if t.result.returncode != 0:
        raise RuntimeError(f"plain pipeline script failed:\n{t.result.stdout[-1500:]}\n"
                           f"{t.result.stderr[-1500:]}")
    marks = {}
    for line in t.result.stdout.splitlines():
        word, _, value = line.partition(" ")
        if word in ("start",) + STAGES:
            marks[word] = float(value)
    steps, prev = {}, marks.get("start")
    for name in STAGES:
        if name in marks and prev is not None:
            steps[f"step_{name}"] = round(marks[name] - prev, 3)
            prev = marks[name]
    return t.wall, steps


def bench_pipeline(lab: dict, kind: str, servers: list[dict], rounds: int, warmup: int,
                   workdir: Path) -> dict:
    repo = Repo(kind, workdir / "repo")
    pipeline = pipeline_file(workdir, repo, lab, servers)
    script = plain_script(workdir, repo, lab, servers)
    data_dir = workdir / "runner-data"
    times = {"runner": [], "shell": []}
    details = {"runner": [], "shell": []}
    for r in range(warmup + rounds):
        counted = r >= warmup
        for v in ("runner", "shell"):
            repo.change()
            wall, info = (runner_exec(pipeline, lab, data_dir) if v == "runner"
                          else run_plain(script))
            log(f"pipeline {'' if counted else '(warm-up) '}{v}: {wall:.2f}s")
            if counted:
                times[v].append(wall)
                details[v].append(info)
    out = {"servers": len(servers), "pipeline_file": str(pipeline), "script": script.read_text(),
           "runner": summary(times["runner"]), "shell": summary(times["shell"]),
           "runner/shell": {"ratio": None, "pairs": pair_range(times["runner"], times["shell"])}}
    out["runner/shell"]["ratio"] = ratio(out["runner"], out["shell"])
    keys = sorted({k for d in details["runner"] for k in d})
    out["runner_parts"] = {k: summary([d[k] for d in details["runner"]
                                       if isinstance(d.get(k), (int, float))]) for k in keys}
    keys = sorted({k for d in details["shell"] for k in d})
    out["shell_parts"] = {k: summary([d[k] for d in details["shell"] if k in d]) for k in keys}
    out["_repo"] = repo
    out["_pipeline"] = pipeline
    out["_data_dir"] = data_dir
    return out


def bench_rebuild(lab: dict, repo: Repo, pipeline: Path, data_dir: Path, rounds: int,
                  warmup: int) -> dict:
    times = {"cold": [], "code_only": []}
    builds = {"cold": [], "code_only": []}
    parts = {"cold": [], "code_only": []}
    for r in range(warmup + rounds):
        counted = r >= warmup
        for v in ("cold", "code_only"):
            repo.change()
            extra = ["--only", "checkout,build"]
            if v == "cold":
                nonce = secrets.token_hex(6)
                extra += ["--var", f"CACHE_BUST=cold-{nonce}",
                          "--var", f"PIP_CACHE_DIR=/tmp/pip-cold-{nonce}"]
            wall, info = runner_exec(pipeline, lab, data_dir, *extra)
            log(f"rebuild {'' if counted else '(warm-up) '}{v}: build stage "
                f"{info.get('stage_build')}s, whole exec {wall:.2f}s "
                f"({info.get('build_cached_steps')}/{info.get('build_total_steps')} cached)")
            if counted:
                times[v].append(wall)
                builds[v].append(info.get("stage_build") or 0.0)
                parts[v].append(info)
    out = {"definition": "cold: new CACHE_BUST build arg (every RUN of the dependency stage "
                         "misses) and pip's cache dir pointed at an empty directory; code_only: "
                         "a commit changing only the app's source, same args",
           "build_stage": {v: summary(builds[v]) for v in builds},
           "whole_exec": {v: summary(times[v]) for v in times},
           "cached_steps": {v: [(p.get("build_cached_steps"), p.get("build_total_steps"))
                                for p in parts[v]] for v in parts}}
    out["code_only/cold"] = {
        "ratio": ratio(out["build_stage"]["code_only"], out["build_stage"]["cold"]),
        "pairs": pair_range(builds["code_only"], builds["cold"]),
        "whole_exec_ratio": ratio(out["whole_exec"]["code_only"], out["whole_exec"]["cold"])}
    return out


def overhead(pipe: dict) -> dict:
    """The runner's own time, from the full-pipeline runs' events (medians)."""
    rp, sp = pipe["runner_parts"], pipe["shell_parts"]

    def med(d: dict, k: str) -> float | None:
        return (d.get(k) or {}).get("median")
    out = {k: med(rp, k) for k in ("startup", "between_stages", "exit", "deploy_connect_lock")}
    own = [v for v in (out["startup"], out["between_stages"], out["exit"]) if v is not None]
    out["outside_stages_total"] = round(sum(own), 3)
    for s in STAGES:
        a, b = med(rp, f"stage_{s}"), med(sp, f"step_{s}")
        out[f"{s}_stage_minus_shell_step"] = round(a - b, 3) if a is not None and b is not None \
            else None
    return out
