"""Which images a server drops after a commit, and the record of pulls (deployers.pruning)."""
from __future__ import annotations

import pytest

from deployers.pruning import every_image, images_to_prune, marker_name, marker_ref

REPO = "10.0.0.1:5000/team/app"


def ref(n: int) -> str:
    return f"{REPO}@sha256:{n:064x}"


def test_unverified_images_go_but_never_the_kept_nor_the_running():
    # History (keep_versions 2) was [1, 2]; 4 was just verified: 1 fell out. 3 failed its
    # health gate, 5 was interrupted; 2 and 4 are kept, 4 runs.
    out = images_to_prune(pulled=[ref(1), ref(2), ref(3), ref(4), ref(5)], dropped=[ref(1)],
                          kept=[ref(2), ref(4)], running=ref(4))
    assert [p.ref for p in out] == [ref(1), ref(3), ref(5)]
    assert "fell out" in out[0].why and "not a kept verified" in out[1].why


def test_nothing_pulled_nothing_dropped_nothing_to_prune():
    assert images_to_prune(pulled=[], dropped=[], kept=[ref(1)], running=ref(1)) == []


def test_the_running_image_is_spared_even_when_not_yet_in_the_history():
    assert images_to_prune(pulled=[ref(7)], dropped=[ref(7)], kept=[], running=ref(7)) == []


def test_an_image_pulled_and_dropped_is_pruned_once():
    out = images_to_prune(pulled=[ref(1), ref(1)], dropped=[ref(1)], kept=[ref(2)],
                          running=ref(2))
    assert [p.ref for p in out] == [ref(1)]


def test_every_image_of_the_app_for_remove():
    assert every_image(history=[ref(1), None, ref(2)],
                       containers=[ref(2), "busybox:latest", ref(3)],
                       pulled=[ref(4), ref(1)]) == [ref(1), ref(2), ref(3), ref(4)]


def test_marker_names_round_trip_and_are_one_path_component():
    name = marker_name(ref(9))
    assert "/" not in name and "=" not in name and len(name) < 255
    assert marker_ref(name) == ref(9)


@pytest.mark.parametrize("text", ["busybox:latest", f"-x@sha256:{0:064x}", "", "\u00e9"])
def test_a_stray_marker_names_no_image(text):
    assert marker_ref(marker_name(text)) is None
    assert marker_ref("not base64!") is None
