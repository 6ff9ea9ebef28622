"""`python -m bench`'s parts and ratio rows for issue 23 (pure: no lab): the web + worker deploy
÷ the web-only one with its goal at 2 servers, promote ÷ the full pipeline to the same servers,
and --quick leaving the promote part out unless it is named."""
from __future__ import annotations

from bench.__main__ import parse, ratio_rows


def _summary(median: float) -> dict:
    return {"n": 1, "median": median, "min": median, "max": median, "runs": [median]}


def test_quick_leaves_promote_out_unless_named():
    assert "promote" in parse([]).parts
    assert "promote" not in parse(["--quick"]).parts
    assert parse(["--quick", "promote"]).parts == ["promote"]


def test_roles_and_promote_ratio_rows():
    res = {
        "deploy": {"by_servers": {
            "1": {"runner-roles/runner": {"ratio": 1.4, "pairs": (1.3, 1.5)}},
            "2": {"runner-roles/runner": {"ratio": 1.3, "pairs": (1.2, 1.4)}}}},
        "pipeline": {"servers": 2, "runner": _summary(10.0), "shell": _summary(9.0),
                     "runner/shell": {"ratio": 1.11, "pairs": (1.1, 1.1)}},
        "promote": {"servers": 2, "staging": "srv3", "promote": _summary(4.0)},
    }
    rows = {r[0]: r for r in ratio_rows(res)}
    two = rows["deploy 2 srv: runner-roles ÷ runner (web + worker ÷ web only)"]
    assert two[1:] == ["1.30", "1.20–1.40", "≤ 1.25", "NO (+4%)"]
    one = rows["deploy 1 srv: runner-roles ÷ runner (web + worker ÷ web only)"]
    assert one[3:] == ["", "-"]  # the goal is at 2 servers
    promote = rows["promote 2 srv ÷ full pipeline 2 srv (no build, test, scan, push)"]
    assert promote[1] == "0.40" and promote[3:] == ["", "-"]
    # A full pipeline to another number of servers is no denominator.
    res["pipeline"]["servers"] = 3
    rows = {r[0]: r for r in ratio_rows(res)}
    assert rows["promote 2 srv ÷ full pipeline 2 srv (no build, test, scan, push)"][1] == "-"
