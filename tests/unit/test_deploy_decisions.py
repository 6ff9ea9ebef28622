"""The pure decisions of the SSH cutovers, apart from SSH: what prepare does to a server an
earlier run left mid-switch (deployers.recovery), what a restore does (deployers.restore_plan),
which kept copies go (deployers.pruning); and that every command they choose is one of the
server's plan, which `--dry-run` prints (deployers.plan)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from deployers import commands as cmd
from deployers.base import ServerSteps
from deployers.server_session import SessionSteps
from deployers.health import ContainerState
from deployers.plan import ASIDE, UNVERIFIED, VERIFIED, Action, plan_deploy
from deployers.pruning import holding_ports, kept_to_prune
from deployers.recovery import decide_recovery
from deployers.restore_plan import put_back, route_back, unreuse
from deployers.spec import LABEL_DIGEST, LABEL_SPEC
from deployers.ssh_proxy import ProxySteps
from deployers.stop_start import StopStartSteps
from runner.model.deploy import DeploySettings
from runner.model.image import ImageRef

ROOT = Path(__file__).resolve().parents[2]
APP = "shop"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def box(cid: str, name: str, release: int, *, running: bool = True, started: str = "",
        ports: tuple[str, ...] = (), alias: str = "") -> ContainerState:
    labels = {LABEL_DIGEST: digest(release), LABEL_SPEC: "spec"}
    if alias:
        labels["runner.alias"] = alias
    return ContainerState(id=cid, name=name, status="running" if running else "exited",
                          running=running, exit_code=0, oom_killed=False, error="",
                          started_at=started, restart_count=0, health=None, labels=labels,
                          published=ports)


def entry(release: int) -> dict:
    return {"digest": digest(release), "spec": {"labels": [[LABEL_SPEC, "spec"]]}}


def keys(actions) -> list[tuple[str, dict, bool]]:
    return [(a.key, dict(a.slots), a.check) for a in actions]


# ------------------------------------------------------------------------------ recovery

def test_the_last_verified_release_runs_older_ones_aside_go():
    found = [box("c1", APP, 2), box("p1", f"{APP}_prev_r1", 1, running=False)]
    r = decide_recovery(APP, [entry(1), entry(2)], found)
    assert keys(r.actions) == [("recover_remove_aside", {ASIDE: "p1"}, False)]
    assert r.did == "" and r.say == ""


def test_an_unverified_release_runs_the_verified_one_aside_comes_back():
    found = [box("c3", APP, 3), box("p2", f"{APP}_prev_r2", 2, running=False, started="2"),
             box("p1", f"{APP}_prev_r1", 1, running=False, started="1")]
    r = decide_recovery(APP, [entry(1), entry(2)], found)
    assert keys(r.actions) == [("recover_remove", {UNVERIFIED: "c3"}, True),
                               ("recover_rename", {VERIFIED: "p2"}, True),
                               ("recover_start", {}, True),
                               ("recover_remove_aside", {ASIDE: "p1"}, False)]
    assert "unverified" in r.say and r.did.startswith("returned to the last verified release")


def test_nothing_runs_the_verified_one_aside_comes_back():
    r = decide_recovery(APP, [entry(2)], [box("p2", f"{APP}_prev_r2", 2, running=False)])
    assert keys(r.actions) == [("recover_rename", {VERIFIED: "p2"}, True),
                               ("recover_start", {}, True)]
    assert "aside" in r.say and r.did


def test_no_container_of_the_verified_release_is_left_nothing_is_touched():
    r = decide_recovery(APP, [entry(2)], [box("c3", APP, 3)])
    assert r.actions == () and r.did == "" and r.say.startswith("WARNING")
    assert decide_recovery(APP, [entry(2)], []) == decide_recovery(APP, [], [])


def test_no_history_an_older_runners_container_aside_is_restored_newest_first():
    found = [box("old", f"{APP}_prev_a", 1, running=False, started="1"),
             box("new", f"{APP}_prev_b", 2, running=False, started="2")]
    r = decide_recovery(APP, [], found)
    assert keys(r.actions) == [("recover_rename", {VERIFIED: "new"}, True),
                               ("recover_start", {}, False)]
    assert r.did == f"restored {APP}_prev_b, left aside by an interrupted deploy"
    assert decide_recovery(APP, [], [box("c1", APP, 1)]).actions == ()


# ------------------------------------------------------------------------------- restore

def test_put_back_the_previous_container_aside():
    pb = put_back(new_id="n", holds_name="n", prev_id="p", prev_was_running=True)
    assert keys(pb.actions) == [("remove_new", {cmd.NEW: "n"}, False), ("rename_back", {}, True),
                                ("start_previous", {}, True)]
    assert pb.started and not pb.none_before


def test_put_back_removes_a_container_started_without_its_id_and_keeps_a_stopped_one_stopped():
    pb = put_back(new_id="", holds_name="x", prev_id="p", prev_was_running=False)
    assert keys(pb.actions) == [("remove_new", {cmd.NEW: "x"}, False), ("rename_back", {}, True)]
    assert not pb.started


def test_put_back_when_the_previous_container_still_has_the_name():
    pb = put_back(new_id="n", holds_name="p", prev_id="p", prev_was_running=True)
    assert keys(pb.actions) == [("remove_new", {cmd.NEW: "n"}, False),
                                ("start_previous", {}, True)]


def test_put_back_with_nothing_before_only_removes():
    pb = put_back(new_id="n", holds_name="n", prev_id="", prev_was_running=False)
    assert keys(pb.actions) == [("remove_new", {cmd.NEW: "n"}, False)] and pb.none_before


def test_route_back_by_what_the_previous_container_is_now():
    assert route_back("", None, "runner.alias").kind == "drop"
    assert route_back("p", None, "runner.alias").kind == "gone"
    assert route_back("p", box("p", "x", 1), "runner.alias").kind == "gone"  # no alias
    assert route_back("p", box("p", "x", 1, alias="a"), "runner.alias") == \
        type(route_back("", None, ""))("route", "a")
    assert route_back("p", box("p", "x", 1, running=False, alias="a"), "runner.alias").kind \
        == "start"


def test_a_reused_kept_container_goes_back_to_being_kept():
    assert keys(unreuse("n", f"{APP}_kept_r1", True, 10)) == [
        ("unrestart_reused", {cmd.NEW: "n"}, False), ("stop_reused", {cmd.NEW: "n"}, False),
        ("rename_reused_back", {cmd.NEW: "n", cmd.KEPT: f"{APP}_kept_r1"}, False)]
    assert [a.key for a in unreuse("n", "k", False, 10)] == ["unrestart_reused", "stop_reused"]
    assert unreuse("n", "k", False, 10)[1].timeout == 40


# --------------------------------------------------------------------------- kept copies

def test_kept_copies_out_of_the_history_are_pruned():
    found = [box("k1", f"{APP}_kept_a", 1, running=False), box("k2", f"{APP}_kept_b", 2),
             box("c3", APP, 3), box("o1", "other_kept_a", 1)]
    wanted = {(digest(2), "spec", ""), (digest(3), "spec", "")}
    assert kept_to_prune(APP, found, wanted) == ["k1"]


def test_running_copies_on_the_proxys_host_ports_are_found():
    found = [box("a", "a", 1, ports=("8080:80",)), box("b", "b", 1, ports=("9090:80",)),
             box("c", "c", 1, running=False, ports=("8080:80",))]
    assert [c.id for c in holding_ports(("8080:80", "8443:443"), found)] == ["a"]


# ----------------------------------------------------------------- everything is planned

def _stage(proxy: bool) -> DeploySettings:
    data: dict = {"servers": [{"host": "10.0.0.1"}], "container": {"name": APP}}
    if proxy:
        data["proxy"] = {"hosts": ["shop.example"]}
    return DeploySettings.model_validate(data)


@pytest.mark.parametrize("proxy", [False, True])
def test_every_command_a_decision_chooses_is_in_the_plan(proxy):
    plan = plan_deploy(_stage(proxy), pipeline=APP, image_name="r/app", run_id="r9",
                       image=ImageRef("r/app", digest(9))).servers[0]
    chosen = ["recover_remove", "recover_rename", "recover_start", "recover_remove_aside",
              "remove_new", "rename_back", "start_previous"]
    if proxy:
        chosen += ["unrestart_reused", "stop_reused", "rename_reused_back", "start_drained",
                   "route_back", "leave_stop_start", "proxy_replace", "proxy_boot_undo",
                   "proxy_start", "stray_kept_unrestart", "stray_kept_stop", "prune_kept"]
    for key in chosen:
        assert plan.has(key), key
        assert plan.command(key).when, key  # the dry run says when it runs


# Builders of commands that change a container; the steps take these argv from the plan.
CHANGING = {"remove", "start", "stop", "rename", "set_restart", "remove_image", "run"}
STEPS = ("ssh_docker", "ssh_proxy", "stop_start", "server_session", "server_prepare",
         "server_commit", "container_switch", "previous_container", "image_pull",
         "health_probe", "release_secrets")


@pytest.mark.parametrize("module", STEPS)
def test_the_steps_build_no_changing_command_of_their_own(module):
    tree = ast.parse((ROOT / "deployers" / f"{module}.py").read_text())
    built = [n.lineno for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "cmd"
             and n.func.attr in CHANGING]
    raw = [n.lineno for n in ast.walk(tree)
           if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.List)]
    assert built == [] and raw == [], f"deployers/{module}.py:{(built + raw)[0]}"


def test_the_cutovers_are_siblings_over_shared_public_pieces():
    # Siblings: neither cutover is built on the other; both on the shared session's steps.
    assert StopStartSteps.__bases__ == (SessionSteps,) == ProxySteps.__bases__
    assert SessionSteps.__bases__ == (ServerSteps,)
    private = []
    for path in sorted((ROOT / "deployers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deployers"):
                private += [f"{path.name}:{node.lineno} {a.name}" for a in node.names
                            if a.name.startswith("_")]
    assert private == []


def test_an_action_binds_its_slots_in_the_planned_argv():
    plan = plan_deploy(_stage(False), pipeline=APP, image_name="r/app", run_id="r9",
                       image=ImageRef("r/app", digest(9))).servers[0]
    assert Action("recover_remove_aside", ((ASIDE, "abc"),)).argv(plan) == \
        ["docker", "container", "rm", "--force", "abc"]
