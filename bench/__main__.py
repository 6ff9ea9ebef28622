"""The runner against the plain command sequence and against Ansible, side by side, in one run.

    python -m bench [deploy] [pipeline] [rebuild] [overhead] [zero-downtime] [promote]
                                                        # default: all (--quick: not promote)
        [--rounds 5] [--warmup 1] [--quick] [--servers 1,2,4] [--pipeline-servers 2]
        [--image example|tiny] [--variants runner,runner-http,plain-seq,plain-par,ansible]
        (add plain-nowait to --variants for the plain loop without its health wait, the floor)
        [--out FILE] [--profile] [--keep] [--before REV [--after REV]]

Brings the lab up (adding servers if --servers needs more), pushes two versions of the app to
the lab's registry, then runs the variants alternately (A B A B …, --rounds counted runs each
after --warmup uncounted ones). Prints the medians, min–max and one table of ratios with the
goals of issues 3, 6 and 9, and writes every raw number to bench/results/<UTC time>.json (or
--out). `--quick` is one run of each, no warm-up, a short latency sample (the smoke test),
and leaves out the promote part unless it is named. Run as root.
`--before REV` adds the deploy variant runner-before: the runner of REV (a temporary
`git worktree` of this repository, removed at the end), in the same rounds as the others, so
that before and after a change are measured in one run under the same load. `--after REV`
runs the runner variants from a worktree of REV too, instead of this tree as it is (whose
uncommitted edits would otherwise be measured, even ones made during the run).
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time

from bench import common
from bench.common import log
from bench.deploy import BEFORE, OPTIONAL, SERVER_PHASES, VARIANTS

PARTS = ("deploy", "pipeline", "rebuild", "overhead", "zero-downtime", "promote")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (all)")
    ap.add_argument("--rounds", type=int, default=5, help="counted runs of each variant")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted runs first")
    ap.add_argument("--quick", action="store_true",
                    help="one run of each, no warm-up, a short latency sample")
    ap.add_argument("--servers", default="1,2,4", help="server counts for the deploy (1,2,4,8)")
    ap.add_argument("--pipeline-servers", type=int, default=2)
    ap.add_argument("--image", choices=("example", "tiny"), default="example",
                    help="example: the Flask app of examples/app; tiny: busybox httpd")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"deploy variants ({','.join(VARIANTS)}; also {','.join(OPTIONAL)})")
    ap.add_argument("--out", help="write the JSON here instead of bench/results/")
    ap.add_argument("--profile", action="store_true",
                    help="also write a cProfile of one runner deploy per server count")
    ap.add_argument("--keep", action="store_true", help="leave the bench containers running")
    ap.add_argument("--before", metavar="REV",
                    help=f"also deploy with the runner of git revision REV ({BEFORE}, from a "
                         "temporary worktree), interleaved with the other variants")
    ap.add_argument("--after", metavar="REV",
                    help="run the runner variants from a temporary worktree of REV too "
                         "(default: this tree, uncommitted edits included)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 1, 0
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    # The smoke test's --quick leaves out promote (a staging deploy and a promotion per round,
    # compared with the pipeline part): name it to run it.
    args.parts = [p for p in PARTS if p in args.parts] or \
        [p for p in PARTS if not (args.quick and p == "promote")]
    args.counts = [int(c) for c in args.servers.split(",") if c.strip()]
    if args.before and "runner" not in args.variants.split(","):
        ap.error("--before compares with the runner variant: keep runner in --variants")
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS + OPTIONAL]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; choose from "
                 f"{', '.join(VARIANTS + OPTIONAL)}")
    if not 1 <= args.rounds <= 50 or not 0 <= args.warmup <= 10:
        ap.error("--rounds is 1..50, --warmup 0..10")
    if any(not 1 <= c <= 16 for c in args.counts):
        ap.error("--servers: counts are 1..16")
    return args


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def goal_row(name: str, value: float | None, goal: float | None, rng=None) -> list[str]:
    met = "-" if value is None or goal is None else ("yes" if value <= goal else
                                                     f"NO (+{(value / goal - 1) * 100:.0f}%)")
    span = f"{rng[0]:.2f}–{rng[1]:.2f}" if rng else ""
    return [name, fmt(value), span, f"≤ {goal:.2f}" if goal is not None else "", met]


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(res: dict) -> str:
    out = []
    dep = res.get("deploy")
    if dep:
        rows = []
        for n, block in dep["by_servers"].items():
            if "error" in block:
                rows.append([f"{n}", block["error"], "", ""])
                continue
            for v in dep["variants"]:
                s = block[v]
                rows.append([n, v, fmt(s["median"]), f"{fmt(s['min'])}–{fmt(s['max'])}"])
        out.append("deploy wall time (s), median of "
                   f"{dep['rounds']} after {dep['warmup']} warm-up, per server count:")
        out.append(table(rows, ["servers", "variant", "median", "min–max"]))
        for why in dep["skipped"].values():
            out.append(f"ansible column skipped: {why}")
        if dep.get("before"):
            b = dep["before"]
            a = dep.get("after") or {}
            edits = sorted(set(a.get("dirty", [])) | set(a.get("dirty_at_end", [])))
            here = (f"{a['rev']} ({a['commit'][:12]}, a worktree)" if a.get("rev") else
                    f"this tree ({a.get('commit', '?')[:12]}"
                    + (f", with uncommitted {'; '.join(edits)}" if edits else "") + ")")
            out.append(f"{BEFORE}: the runner of {b['rev']} ({b['commit'][:12]}, a worktree); "
                       f"runner: {here}. Order in each round: {', '.join(b['order'])}")
        rows, srows = [], []
        for n, block in dep["by_servers"].items():
            for name, key in (("runner", "runner_phases"), ("runner-roles", "runner_roles_phases"),
                              (BEFORE, "runner_before_phases")):
                ph = block.get(key) or {}
                if ph:
                    rows.append([n, name] + [fmt((ph.get(k) or {}).get("median")) for k in PHASES])
            for name, key in (("runner", "runner_server_phases"),
                              ("runner-roles", "runner_roles_server_phases"),
                              (BEFORE, "runner_before_server_phases")):
                ph = block.get(key) or {}
                if ph:
                    srows.append([n, name] + [fmt((ph.get(k) or {}).get("median"))
                                              for k in SERVER_PHASES + ("rest", "server_total")])
        for n, block in dep["by_servers"].items():
            for name, key in (("runner", "runner_remote_steps"),
                              (BEFORE, "runner_before_remote_steps")):
                st = block.get(key) or {}
                if st:
                    rows_st = sorted(st.items(), key=lambda kv: -(kv[1]["median"] or 0))
                    out.append(f"{name} deploy to {n} server(s), remote steps (s, slowest "
                               "server, median): " + ", ".join(f"{k} {fmt(v['median'])}"
                                                               for k, v in rows_st))
        if rows:
            out.append("\nrunner deploy, where the time goes (medians, s; *_at: when the last "
                       "server got there, from the deploy stage's start):")
            out.append(table(rows, ["servers", "variant"] + list(PHASES)))
        if srows:
            out.append("\nrunner deploy, per-server phases from the deploy's report (s; each "
                       "phase: the slowest server of a round, median over rounds; rest: outside "
                       "the phases (lock, history, recovery check, waits for the other servers); "
                       "server_total: the slowest server's whole time):")
            out.append(table(srows, ["servers", "variant"] + list(SERVER_PHASES)
                             + ["rest", "server_total"]))
    pipe = res.get("pipeline")
    if pipe:
        out.append(f"\nfull pipeline to {pipe['servers']} servers (s): runner exec "
                   f"{fmt(pipe['runner']['median'])} ({fmt(pipe['runner']['min'])}–"
                   f"{fmt(pipe['runner']['max'])}), shell script {fmt(pipe['shell']['median'])} "
                   f"({fmt(pipe['shell']['min'])}–{fmt(pipe['shell']['max'])})")
        rp, sp = pipe["runner_parts"], pipe["shell_parts"]
        rows = [[s, fmt((rp.get(f"stage_{s}") or {}).get("median")),
                 fmt((sp.get(f"step_{s}") or {}).get("median"))]
                for s in ("checkout", "build", "push", "deploy")]
        out.append(table(rows, ["step", "runner stage", "shell step"]))
    reb = res.get("rebuild")
    if reb:
        b, w = reb["build_stage"], reb["whole_exec"]
        out.append(f"\nrebuild through runner exec (build stage / whole exec, s): cold "
                   f"{fmt(b['cold']['median'])} / {fmt(w['cold']['median'])}, code-only "
                   f"{fmt(b['code_only']['median'])} / {fmt(w['code_only']['median'])}")
    pro = res.get("promote")
    if pro:
        p = pro["promote"]
        out.append(f"\nrunner promote to {pro['servers']} servers (s, staging on "
                   f"{pro['staging']}, its deploys untimed): {fmt(p['median'])} "
                   f"({fmt(p['min'])}–{fmt(p['max'])})")
    ov = res.get("overhead")
    if ov:
        out.append("\nrunner overhead in the full pipeline (medians, s): " + ", ".join(
            f"{k} {fmt(v)}" for k, v in ov.items()))
    zd = res.get("zero-downtime")
    if zd:
        from bench import zero_downtime
        out.append("\n" + "\n".join(zero_downtime.rows(zd)))
    out.append("\n" + table(ratio_rows(res), ["ratio", "median", "pairs min–max", "goal", "met"]))
    return "\n".join(out)


PHASES = ("python_start_imports", "load_pipeline", "pulled_at", "locked_at", "started_at",
          "healthy_at", "stage_total", "exit")


def ratio_rows(res: dict) -> list[list[str]]:
    rows = []
    dep = res.get("deploy")
    if dep:
        blocks = {int(n): b for n, b in dep["by_servers"].items() if "error" not in b}
        for n, b in sorted(blocks.items()):
            for base, goal_2 in (("plain-par", 1.0), ("ansible", 0.30), ("plain-seq", None),
                                 ("plain-nowait", None)):
                key = f"runner/{base}"
                if key in b:
                    goal = goal_2 if n == 2 else (1.10 if (n == 1 and base == "plain-seq")
                                                  else None)
                    rows.append(goal_row(f"deploy {n} srv: runner ÷ {base}", b[key]["ratio"],
                                         goal, b[key]["pairs"]))
            key = "runner-roles/runner"  # issue 23: web + worker ÷ web only
            if key in b:
                rows.append(goal_row(f"deploy {n} srv: runner-roles ÷ runner (web + worker ÷ "
                                     f"web only)", b[key]["ratio"], 1.25 if n == 2 else None,
                                     b[key]["pairs"]))
            for base in ("plain-par", "ansible"):
                key = f"runner-http/{base}"
                if key in b:
                    rows.append(goal_row(f"deploy {n} srv: runner-http ÷ {base}",
                                         b[key]["ratio"], None, b[key]["pairs"]))
            # Issue 9: the restructured deploy must not be slower (after, and before with
            # --before); and after ÷ before itself, without a goal.
            base, goal = {2: ("plain-par", 0.65), 1: ("plain-seq", 0.55)}.get(n, (None, None))
            if base:
                for ours, when in (("runner", "after"), (BEFORE, "before")):
                    key = f"{ours}/{base}"
                    if key in b:
                        rows.append(goal_row(f"deploy {n} srv: {ours} ÷ {base} (issue 9, {when})",
                                             b[key]["ratio"], goal, b[key]["pairs"]))
            key = f"runner/{BEFORE}"
            if key in b:
                rows.append(goal_row(f"deploy {n} srv: runner ÷ {BEFORE} (after ÷ before)",
                                     b[key]["ratio"], None, b[key]["pairs"]))
        one = blocks.get(1, {}).get("runner")
        for n, goal in ((4, 1.5), (8, 2.0)):
            if n in blocks and one:
                rows.append(goal_row(f"deploy runner: {n} srv ÷ 1 srv",
                                     common.ratio(blocks[n]["runner"], one), goal))
        bone = blocks.get(1, {}).get(BEFORE)
        if 4 in blocks and bone and BEFORE in blocks[4]:
            rows.append(goal_row(f"deploy {BEFORE}: 4 srv ÷ 1 srv (reference)",
                                 common.ratio(blocks[4][BEFORE], bone), None))
        pone = blocks.get(1, {}).get("plain-par")
        if 4 in blocks and pone and "plain-par" in blocks[4]:
            rows.append(goal_row("deploy plain-par: 4 srv ÷ 1 srv (reference)",
                                 common.ratio(blocks[4]["plain-par"], pone), None))
    pipe = res.get("pipeline")
    if pipe:
        rows.append(goal_row("full pipeline: runner exec ÷ shell script",
                             pipe["runner/shell"]["ratio"], 1.05, pipe["runner/shell"]["pairs"]))
    pro = res.get("promote")
    if pro:
        whole = (pipe or {}).get("runner") if (pipe or {}).get("servers") == pro["servers"] \
            else None
        rows.append(goal_row(f"promote {pro['servers']} srv ÷ full pipeline {pro['servers']} srv "
                             f"(no build, test, scan, push)",
                             common.ratio(pro["promote"], whole), None))
    reb = res.get("rebuild")
    if reb:
        r = reb["code_only/cold"]
        rows.append(goal_row("rebuild: code-only ÷ cold (build stage)", r["ratio"], 0.05,
                             r["pairs"]))
        rows.append(goal_row("rebuild: code-only ÷ cold (whole runner exec)",
                             r["whole_exec_ratio"], None))
    zd = res.get("zero-downtime")
    if zd:
        rows.append(goal_row("zero-downtime: deploy proxy ÷ stop-start", zd["deploy_ratio"],
                             1.2))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from bench import deploy as deploy_mod
    from bench import pipeline as pipeline_mod

    need = max(args.counts + [args.pipeline_servers]) if "deploy" in args.parts else \
        args.pipeline_servers
    if "promote" in args.parts:  # staging: one server more than the pipeline part's
        need = max(need, args.pipeline_servers + 1)
    lab = common.ensure_lab(need)
    workdir = common.new_workdir()
    started = time.time()
    res: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                 "machine": common.machine(), "image": args.image, "rounds": args.rounds,
                 "warmup": args.warmup, "argv": sys.argv[1:], "parts": args.parts}
    refs: list[str] = []
    used = lab["servers"][:need]
    try:
        if "deploy" in args.parts:
            with contextlib.ExitStack() as stack:
                before = after = None
                if args.before:
                    tree, commit = stack.enter_context(deploy_mod.before_tree(args.before))
                    before = (tree, commit, args.before)
                if args.after:
                    tree, commit = stack.enter_context(
                        deploy_mod.before_tree(args.after, "runner"))
                    after = (tree, commit, args.after)
                refs = common.two_versions(lab, args.image, workdir)
                log(f"images: {refs}")
                res["deploy"] = deploy_mod.bench_deploy(
                    lab, refs, args.counts, args.rounds, args.warmup, workdir,
                    variants=tuple(v for v in args.variants.split(",") if v),
                    profile_dir=common.RESULTS_DIR if args.profile else None, before=before,
                    after=after)
        if "zero-downtime" in args.parts:
            from bench import zero_downtime
            if not refs:
                refs = common.two_versions(lab, args.image, workdir)
            res["zero-downtime"] = zero_downtime.bench_zero_downtime(
                lab, refs, lab["servers"][:args.pipeline_servers], args.rounds, workdir,
                quick=args.quick)
        pipe = None
        if {"pipeline", "rebuild", "overhead"} & set(args.parts):
            pipe = pipeline_mod.bench_pipeline(lab, args.image,
                                               lab["servers"][:args.pipeline_servers],
                                               args.rounds, args.warmup, workdir)
            repo, pfile, data_dir = pipe.pop("_repo"), pipe.pop("_pipeline"), pipe.pop("_data_dir")
            if "pipeline" in args.parts or "overhead" in args.parts:
                res["pipeline"] = pipe
            if "overhead" in args.parts:
                res["overhead"] = pipeline_mod.overhead(pipe)
            if "rebuild" in args.parts:
                res["rebuild"] = pipeline_mod.bench_rebuild(lab, repo, pfile, data_dir,
                                                            args.rounds, args.warmup)
        if "promote" in args.parts:
            from bench import promote
            if not refs:
                refs = common.two_versions(lab, args.image, workdir)
            res["promote"] = promote.bench_promote(
                refs, lab["servers"][:args.pipeline_servers],
                lab["servers"][args.pipeline_servers], args.rounds, args.warmup, workdir)
    finally:
        if not args.keep:
            common.cleanup_servers(used, refs)
            common.on_servers(used, "docker image ls --format '{{.Repository}}@{{.Digest}}' "
                                    "| grep '/bench/pipe-' | xargs -r docker image rm "
                                    ">/dev/null 2>&1; true")
        shutil.rmtree(workdir, ignore_errors=True)
    res["duration"] = round(time.time() - started, 1)
    res["ratios"] = [dict(zip(["ratio", "median", "pairs", "goal", "met"], r))
                     for r in ratio_rows(res)]
    path = common.write_results(res, args.out)
    print(report(res))
    print(f"\nraw numbers: {path}  (machine: {res['machine']['cpus']} cpus "
          f"{res['machine']['cpu']}, {res['machine']['memory']}; {res['duration']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
