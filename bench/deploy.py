"""Deploy: the runner's deploy stage against the plain ssh loop (sequential and parallel) and
against an Ansible playbook, to 1, 2, 4 (8) lab servers. Same image, same servers, same
container (`bench-app`, --restart=always, --init, -p 18080:8080, the image's HEALTHCHECK).

Each timed run is a real version change: the two image versions alternate, and after every
run (untimed) the version not running is removed from the servers, so the next run really
pulls it. Each run is checked (untimed) to have left the expected digest running.

- runner:     `python -m bench.rundeploy` (the deploy stage the engine runs, own process), the
              image's own HEALTHCHECK command probed with `docker exec` (as pipeline.example.yaml)
- runner-http: the same with the pipeline's HTTP probe (`healthcheck.http`, GET /healthz made
              from the server over the SSH connection) instead of a process per probe
- runner-roles: the runner variant's pipeline with two roles (issue 23): web (the same
              container) and a worker (`sh -c 'while true; do sleep 1; done'`, no port, its
              health: 2 s up without a restart) on every server, one release in one rollout.
              The worker starts afresh each run (the other variants' runs remove it, untimed,
              so that the version not running can be pruned and every run pulls)
- plain-seq:  for each server in turn: ssh host 'docker pull … && docker stop … && docker rm …
              && docker run -d --restart=always --init … && until healthy; do sleep 0.1; done'
- plain-par:  the same ssh commands to every server at once, then wait for all
- plain-nowait: (only when asked for, in --variants) plain-seq without the health wait: done
              when `docker run` returns. The floor, not an equivalent: it never learns whether
              the app came up
- runner-before: (only with --before REV) the runner variant run from a `git worktree` of REV
              (cwd and PYTHONPATH = that tree, same interpreter, pipeline file and ref),
              interleaved with the others in the same rounds: the deploy before a change and
              after it, measured under the same load
- ansible:    ansible-playbook, community.docker docker_image_pull + docker_container
              (state: healthy), gather_facts off, pipelining on, forks = servers, OpenSSH with
              ControlPersist (Ansible's defaults otherwise)
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from bench.common import (APP_PORT, CONTAINER, HOST_PORT, ROOT, Timer, cleanup_servers, log,
                          on_servers,
                          pair_range, ratio, ssh_argv, summary)
from runner.model.image import ImageRef

VARIANTS = ("runner", "runner-http", "runner-roles", "plain-seq", "plain-par",
            "ansible")  # the default set
OPTIONAL = ("plain-nowait",)  # run only when named in --variants
BEFORE = "runner-before"  # the runner of another revision (--before REV), in its own worktree
# The per-server phases of the deploy stage's report (deployers.base.ServerResult.phases).
SERVER_PHASES = ("connect", "pull", "switch", "start", "health", "commit")
HEALTH_POLL = 0.1  # the plain loop polls docker's health status this often
HTTP_PATH = "/healthz"  # answered by both images (the example app, and busybox httpd)
WORKER = f"{CONTAINER}-worker"  # the runner-roles variant's worker container (<app>-<role>)
WORKER_COMMAND = ["sh", "-c", "while true; do sleep 1; done"]  # both images have sh


def ansible_available() -> tuple[bool, str]:
    try:
        import ansible  # noqa: F401
        import ansible_collections.community.docker  # noqa: F401
    except ImportError as exc:
        return False, f"ansible is not importable ({exc}); `pip install ansible` brings " \
                      f"ansible-core and the community.docker collection"
    if shutil.which("ansible-playbook") is None:
        return False, "ansible-playbook is not on PATH"
    return True, ""


# ------------------------------------------------------------------ the plain loop

def plain_remote(ref: str, wait: bool = True) -> str:
    """The shell a user would type for one server (values are the harness's own, quoted).
    wait=False leaves out the wait for healthy (the plain-nowait floor)."""
    r, n = shlex.quote(ref), CONTAINER
    run = (
        f"docker pull -q {r} >/dev/null"
        f" && {{ docker stop -t 10 {n} >/dev/null 2>&1; docker rm {n} >/dev/null 2>&1; true; }}"
        f" && docker run -d --name {n} --restart=always --init -p {HOST_PORT}:{APP_PORT} {r}"
        f" >/dev/null"
    )
    if not wait:
        return run
    return (
        run
        + f" && i=0 && until [ \"$(docker inspect -f '{{{{.State.Health.Status}}}}' {n})\""
        f" = healthy ];"
        f" do i=$((i+1)); [ $i -lt 600 ] || exit 1; sleep {HEALTH_POLL}; done"
    )


def run_plain_seq(servers: list[dict], ref: str, wait: bool = True) -> float:
    t0 = time.monotonic()
    for s in servers:
        p = subprocess.run(ssh_argv(s, plain_remote(ref, wait)), capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"plain loop failed on {s['name']}: {p.stderr[-500:]}")
    return time.monotonic() - t0


def run_plain_par(servers: list[dict], ref: str) -> float:
    t0 = time.monotonic()
    procs = [subprocess.Popen(ssh_argv(s, plain_remote(ref)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in servers]
    errors = []
    for s, p in zip(servers, procs):
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            errors.append(f"{s['name']}: {err[-300:]}")
    elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError("plain parallel loop failed: " + "; ".join(errors))
    return elapsed


# ------------------------------------------------------------------ the runner

def runner_pipeline(workdir: Path, servers: list[dict], image_name: str,
                    http: bool = False, roles: bool = False) -> Path:
    """The runner variants' pipeline file; roles: with a worker role beside the web one."""
    s0 = servers[0]
    health = {"timeout": 60}  # the image's own HEALTHCHECK decides
    if http:
        health["http"] = {"port": APP_PORT, "path": HTTP_PATH}
    doc = {
        "version": 1, "name": "bench",
        "repository": {"url": str(ROOT)},
        "image": {"name": image_name},
        "stages": {
            "scan": {"enabled": False},
            "deploy": {
                "enabled": True,
                "servers": [f"{s['user']}@{s['host']}:{s['port']}" for s in servers],
                "ssh": {"key_file": s0["key_file"], "known_hosts": s0["known_hosts"]},
                "container": {"name": CONTAINER, "ports": [f"{HOST_PORT}:{APP_PORT}"]},
                "healthcheck": health,
                "strategy": {"type": "all"},
                "lock": {"wait": 30},
            },
        },
    }
    if roles:
        doc["stages"]["deploy"]["roles"] = {"web": {}, "worker": {"command": WORKER_COMMAND}}
    kind = ("-http" if http else "") + ("-roles" if roles else "")
    path = workdir / f"deploy-{len(servers)}{kind}.yaml"
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return path


def run_runner(pipeline: Path, ref: str, profile: str | None = None,
               tree: Path | None = None) -> tuple[float, dict]:
    """One runner deploy in its own process; tree: run that checkout's code (--before)
    instead of this one's, with the same interpreter, pipeline file and ref."""
    argv = [sys.executable, "-m", "bench.rundeploy", str(pipeline), ref]
    if profile:
        argv += ["--profile", profile]
    env = None
    if tree is not None:
        env = dict(os.environ, PYTHONPATH=str(tree))  # before the editable install's finder
    t = Timer(argv, env=env, cwd=str(tree or ROOT), timeout=300).run()
    out = (t.result.stdout or "").strip().splitlines()
    try:
        info = json.loads(out[-1]) if out else {}
    except json.JSONDecodeError:
        info = {}
    what = "runner deploy" if tree is None else f"runner deploy ({tree})"
    if t.result.returncode != 0 or not info:
        raise RuntimeError(f"{what} failed: {info.get('error') or t.result.stderr[-2000:]}")
    statuses = {s["name"]: s["status"] for s in (info.get("outputs") or {}).get("servers", [])}
    if not statuses or set(statuses.values()) != {"deployed"}:
        raise RuntimeError(f"{what} did not change every server: {statuses}")
    ph = phases(info, t.started_epoch, t.wall)
    ph["_trace"] = info.get("trace") or []
    ph["_servers"] = server_phases(info)
    return t.wall, ph


def server_phases(info: dict) -> dict[str, float]:
    """One run's per-server phases from the stage's outputs (ServerResult.phases): for each
    phase, the slowest server's time in it; `server_total` the slowest server's whole time
    (ServerResult.duration) and `rest` the most any server spent outside the named phases
    (the lock, history, recovery check, waits for the other servers). {} when the deploy's
    report has no phases (revisions before they were added)."""
    rows = [s for s in (info.get("outputs") or {}).get("servers", []) if s.get("phases")]
    if not rows:
        return {}
    out = {k: round(max((s["phases"].get(k) or 0.0) for s in rows), 3)
           for k in sorted({k for s in rows for k in s["phases"]})}
    out["server_total"] = round(max(s.get("duration") or 0.0 for s in rows), 3)
    out["rest"] = round(max((s.get("duration") or 0.0) - sum(s["phases"].values())
                            for s in rows), 3)
    return out


def steps(trace: list[dict]) -> dict[str, float]:
    """Per kind of remote step, the time the slowest server spent in it (one run)."""
    per: dict[str, dict[str, float]] = {}
    for r in trace:
        what = r["what"]
        if what.startswith("exec "):
            what = "exec (health probes)"
        elif what.startswith("sftp"):
            what = "sftp (lock, history)"
        per.setdefault(what, {}).setdefault(r["server"], 0.0)
        per[what][r["server"]] += r["took"]
    return {w: round(max(v.values()), 3) for w, v in per.items()}


def phases(info: dict, spawned: float, wall: float) -> dict:
    """Split one runner deploy into where its time went, from its own milestones and events."""
    ev = info.get("events") or []
    start = next((e["time"] for e in ev if e["event"] == "stage.start"), None)
    end = next((e["time"] for e in ev if e["event"] == "stage.end"), None)
    if start is None or end is None:
        return {}

    def last(*words: str) -> float | None:
        ts = [e["time"] for e in ev if e["event"] == "stage.log"
              and any(w in (e.get("line") or "") for w in words)]
        return max(ts) if ts else None
    out = {
        "python_start_imports": round(info["imported"] - spawned, 3),
        "load_pipeline": round(info["loaded"] - info["imported"], 3),
        "stage_total": round(end - start, 3),
        "exit": round(spawned + wall - info["end"], 3),
    }
    # When the last server reached each milestone, counted from the stage's start.
    # ("<server>: deployed <digest> (healthy)" until bba7fdd, "<server>: healthy <digest>" since)
    for key, words in (("connected_at", (": connected",)), ("pulled_at", (": pulled ",)),
                       ("locked_at", (": deploy lock taken",)), ("started_at", (": started ",)),
                       ("healthy_at", ("(healthy)", ": healthy sha256:"))):
        t = last(*words)
        if t is not None:
            out[key] = round(t - start, 3)
    return out


# ------------------------------------------------------------------ ansible

def ansible_files(workdir: Path, servers: list[dict]) -> tuple[Path, dict[str, str]]:
    d = workdir / f"ansible-{len(servers)}"
    d.mkdir(parents=True, exist_ok=True)
    s0 = servers[0]
    python = os.path.realpath(sys.executable)  # has the docker SDK community.docker needs
    (d / "inventory.ini").write_text(
        "[servers]\n" + "".join(
            f"{s['name']} ansible_host={s['host']} ansible_port={s['port']} "
            f"ansible_user={s['user']}\n" for s in servers)
        + f"\n[servers:vars]\nansible_ssh_private_key_file={s0['key_file']}\n"
          f"ansible_python_interpreter={python}\n")
    (d / "ansible.cfg").write_text(
        "[defaults]\n"
        f"inventory = {d / 'inventory.ini'}\n"
        "host_key_checking = True\n"
        f"forks = {max(5, len(servers))}\n"
        "gathering = explicit\n"
        "retry_files_enabled = False\n"
        "interpreter_python_fallback = []\n"
        "[ssh_connection]\n"
        "pipelining = True\n"
        f"control_path_dir = {d / 'cp'}\n"
        f"ssh_args = -o ControlMaster=auto -o ControlPersist=60s "
        f"-o UserKnownHostsFile={s0['known_hosts']} -o StrictHostKeyChecking=yes\n")
    (d / "deploy.yml").write_text(f"""\
- hosts: servers
  gather_facts: false
  tasks:
    - name: pull the image by digest
      community.docker.docker_image_pull:
        name: "{{{{ ref }}}}"
    - name: run it, wait until healthy
      community.docker.docker_container:
        name: {CONTAINER}
        image: "{{{{ ref }}}}"
        state: healthy
        healthy_wait_timeout: 60
        restart_policy: always
        init: true
        published_ports: ["{HOST_PORT}:{APP_PORT}"]
        stop_timeout: 10
""")
    env = dict(os.environ, ANSIBLE_CONFIG=str(d / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCALHOST_WARNING="False")
    return d / "deploy.yml", env


def stop_ansible_masters(workdir: Path) -> None:
    """Close the OpenSSH control masters Ansible left behind (ControlPersist), ours only."""
    for sock in workdir.glob("ansible-*/cp/*"):
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "bench"],
                       capture_output=True, timeout=10)


def run_ansible(playbook: Path, env: dict[str, str], ref: str) -> float:
    argv = ["ansible-playbook", str(playbook), "-e", f"ref={ref}"]
    t = Timer(argv, env=env, cwd=str(playbook.parent), timeout=300).run()
    if t.result.returncode != 0:
        raise RuntimeError(f"ansible-playbook failed:\n{t.result.stdout[-3000:]}\n"
                           f"{t.result.stderr[-1000:]}")
    return t.wall


# ------------------------------------------------------------------ another revision

def _git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                       timeout=120)
    if check and p.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {p.stderr.strip()}")
    return p


@contextlib.contextmanager
def before_tree(rev: str, what: str = BEFORE) -> Iterator[tuple[Path, str]]:
    """`git worktree add --detach <tmp> REV` of this repository: (its path, the full commit).
    Removed again at the end, also on an error, Ctrl-C or SIGTERM (raised as SystemExit while
    it exists, so that this cleanup runs)."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}").stdout.strip()
    parent = Path(tempfile.mkdtemp(prefix="runner-bench-before-"))
    tree = parent / "tree"
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.getsignal(signal.SIGTERM) if main else None

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    try:
        if main:
            signal.signal(signal.SIGTERM, on_term)
        _git("worktree", "add", "--detach", str(tree), commit)
        log(f"{what}: {rev} = {commit[:12]}, worktree {tree}")
        yield tree, commit
    finally:
        if tree.exists():
            _git("worktree", "remove", "--force", str(tree), check=False)
        shutil.rmtree(parent, ignore_errors=True)
        _git("worktree", "prune", check=False)
        if main:
            signal.signal(signal.SIGTERM, old_term)


def tree_state() -> dict:
    """This checkout's commit and its uncommitted changes to the code a deploy runs."""
    head = _git("rev-parse", "HEAD", check=False).stdout.strip()
    dirty = _git("status", "--porcelain", "--", "deployers", "pipelines", "runner",
                 check=False).stdout.splitlines()
    return {"commit": head, "dirty": [line.strip() for line in dirty]}


def round_order(variants: tuple[str, ...]) -> tuple[str, ...]:
    """The order of the variants within a round. With runner-before, it and the runner each
    come right after a variant that is not a runner (runner-before first, after the previous
    round's last one; the runner after the first plain or ansible variant), so that both start
    from the same state: a container the runner did not start, and history written by the
    other revision. Without it, the order given."""
    if BEFORE not in variants:
        return variants
    rest = [v for v in variants if v != BEFORE]
    others = [v for v in rest if not v.startswith("runner")]
    if not others or "runner" not in rest:
        return (BEFORE,) + tuple(rest)
    ours = ["runner"] + [v for v in rest if v.startswith("runner") and v != "runner"]
    return (BEFORE, others[0], *ours, *others[1:])


# ------------------------------------------------------------------ the bench

def check_and_prune(servers: list[dict], ref: str, other: str, worker: bool = False) -> None:
    """Untimed: every server runs `ref` now (worker: in the worker role's container too, else
    that container goes, as it holds an image); remove `other` so the next run must pull it."""
    names = f"{CONTAINER} {WORKER}" if worker else CONTAINER
    remote = (f"docker inspect -f '{{{{.Config.Image}}}}' {names}; "
              + ("" if worker else f"docker rm -f {WORKER} >/dev/null 2>&1; ")
              + f"docker image rm {shlex.quote(other)} >/dev/null 2>&1; true")
    for s, p in zip(servers, on_servers(servers, remote)):
        running = (p.stdout or "").split()
        if running != [ref] * len(names.split()):
            raise RuntimeError(f"{s['name']}: expected {ref} to run in {names}, found "
                               f"{running!r}")


def bench_deploy(lab: dict, refs: list[str], counts: list[int], rounds: int, warmup: int,
                 workdir: Path, variants: tuple[str, ...] = VARIANTS,
                 profile_dir: Path | None = None,
                 before: tuple[Path, str, str] | None = None,
                 after: tuple[Path, str, str] | None = None) -> dict:
    """before: (worktree, commit, rev as given) of another revision, run as runner-before.
    after: the same for the runner and runner-http variants (default: this tree as it is,
    uncommitted edits included)."""
    here = after[0] if after else None
    ok, why = ansible_available()
    skipped = {}
    if "ansible" in variants and not ok:
        skipped["ansible"] = why
        log(f"ansible skipped: {why}")
        variants = tuple(v for v in variants if v != "ansible")
    variants = tuple(v for v in variants if v != BEFORE)
    if before is not None:
        variants = round_order(variants + (BEFORE,))
    image_name = ImageRef.parse(refs[0]).name
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {"variants": list(variants), "skipped": skipped, "rounds": rounds,
                 "warmup": warmup, "container": CONTAINER, "host_port": HOST_PORT,
                 "refs": refs, "by_servers": {}}
    # What the runner variants ran: this tree as it is (edits included), or --after's commit.
    out["after"] = {"rev": after[2], "commit": after[1], "dirty": []} if after else tree_state()
    if before is not None:
        out["before"] = {"rev": before[2], "commit": before[1], "variant": BEFORE,
                         "order": list(variants)}
    for n in counts:
        servers = lab["servers"][:n]
        cleanup_servers(servers, refs)  # every block starts from nothing
        if len(servers) < n:
            out["by_servers"][str(n)] = {"error": f"the lab has only {len(servers)} servers"}
            continue
        pipeline = runner_pipeline(workdir, servers, image_name)
        pipeline_http = runner_pipeline(workdir, servers, image_name, http=True)
        pipeline_roles = runner_pipeline(workdir, servers, image_name, roles=True)
        playbook, aenv = ansible_files(workdir, servers) if "ansible" in variants else (None, None)
        times: dict[str, list[float]] = {v: [] for v in variants}
        runner_phases: list[dict] = []
        http_phases: list[dict] = []
        roles_phases: list[dict] = []
        before_phases: list[dict] = []
        k = 0  # which version goes next: they alternate run by run
        for r in range(warmup + rounds):
            counted = r >= warmup
            for v in variants:
                ref, other = refs[k % 2], refs[(k + 1) % 2]
                k += 1
                prof = None
                if profile_dir and v == "runner" and counted and r == warmup:
                    prof = str(profile_dir / f"runner-deploy-{n}.prof")
                if v == "runner":
                    wall, ph = run_runner(pipeline, ref, prof, tree=here)
                    if counted:
                        runner_phases.append(ph)
                elif v == "runner-http":
                    wall, ph = run_runner(pipeline_http, ref, tree=here)
                    if counted:
                        http_phases.append(ph)
                elif v == "runner-roles":
                    wall, ph = run_runner(pipeline_roles, ref, tree=here)
                    if counted:
                        roles_phases.append(ph)
                elif v == BEFORE:
                    assert before is not None
                    wall, ph = run_runner(pipeline, ref, tree=before[0])
                    if counted:
                        before_phases.append(ph)
                elif v == "plain-seq":
                    wall = run_plain_seq(servers, ref)
                elif v == "plain-par":
                    wall = run_plain_par(servers, ref)
                elif v == "plain-nowait":
                    wall = run_plain_seq(servers, ref, wait=False)
                else:
                    wall = run_ansible(playbook, aenv, ref)
                check_and_prune(servers, ref, other, worker=v == "runner-roles")
                log(f"deploy {n} server(s) {'' if counted else '(warm-up) '}{v}: {wall:.2f}s")
                if counted:
                    times[v].append(wall)
        block = {v: summary(times[v]) for v in variants}
        for name, runs in (("runner", runner_phases), ("runner_http", http_phases),
                           ("runner_roles", roles_phases), ("runner_before", before_phases)):
            if not runs and name != "runner":
                continue
            traces = [p.pop("_trace", []) for p in runs]
            per_server = [p.pop("_servers", {}) for p in runs]
            block[f"{name}_phases"] = {key: summary([p[key] for p in runs if key in p])
                                       for key in sorted({k for p in runs for k in p})}
            # Per phase: the slowest server of each round, median (min-max) over the rounds.
            block[f"{name}_server_phases"] = {
                key: summary([p[key] for p in per_server if key in p])
                for key in sorted({k for p in per_server for k in p})}
            if name in ("runner_http", "runner_roles"):
                continue
            per_run = [steps(t) for t in traces if t]
            block[f"{name}_remote_steps"] = {w: summary([r.get(w, 0.0) for r in per_run])
                                             for w in sorted({w for r in per_run for w in r})}
            block[f"{name}_traces"] = traces
        if BEFORE in times:
            block[f"runner/{BEFORE}"] = {"ratio": ratio(block["runner"], block[BEFORE])
                                         if "runner" in block else None,
                                         "pairs": pair_range(times.get("runner", []),
                                                             times[BEFORE])}
        if "runner-roles" in times and "runner" in times:  # issue 23: web + worker ÷ web only
            block["runner-roles/runner"] = {"ratio": ratio(block["runner-roles"],
                                                           block["runner"]),
                                            "pairs": pair_range(times["runner-roles"],
                                                                times["runner"])}
        for ours in ("runner", "runner-http", BEFORE):
            for base in ("plain-seq", "plain-par", "ansible", "plain-nowait"):
                if base in times and ours in times:
                    block[f"{ours}/{base}"] = {"ratio": ratio(block[ours], block[base]),
                                               "pairs": pair_range(times[ours], times[base])}
        out["by_servers"][str(n)] = block
    stop_ansible_masters(workdir)
    out["after"]["dirty_at_end"] = [] if after else tree_state()["dirty"]
    return out
