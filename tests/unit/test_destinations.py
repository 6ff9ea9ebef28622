"""Destinations and promotion, the pure parts: choosing a destination in the loader (its
variables over the top-level ones; a missing or unknown one is an error at file:line:col with
the list), the key of a destination's history and lock, the release promote moves and its
--commit check."""
from __future__ import annotations

import pytest

from deployers.promotion import NothingToPromote, release_to_promote, require_commit
from deployers.spec import release_key
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text

FILE = """\
name: shop
repository: {url: https://example.com/shop.git}
image: {name: registry.example.com/shop}
variables: {HOST: 10.0.0.9, LEVEL: debug}
destinations:
  staging:
    variables: {HOST: 10.0.0.5}
  production:
    variables: {HOST: 10.0.1.5, LEVEL: "${HOST}-warn"}
env: {LOG_LEVEL: "${LEVEL}"}
stages:
  deploy:
    servers: ["${HOST}"]
"""
DIGEST = "sha256:" + "a" * 64
OLDER = "sha256:" + "b" * 64


def _load(text: str = FILE, destination: str | None = None, **kw):
    return load_pipeline_text(text, "p.yml", environ={}, destination=destination, **kw)


def test_a_destination_s_variables_replace_the_top_level_ones():
    staging = _load(destination="staging")
    assert staging.destination == "staging"
    assert [s.host for s in staging.stages.deploy.servers] == ["10.0.0.5"]
    assert staging.env == {"LOG_LEVEL": "debug"}  # LEVEL from the top level
    production = _load(destination="production")
    assert [s.host for s in production.stages.deploy.servers] == ["10.0.1.5"]
    assert production.env == {"LOG_LEVEL": "10.0.1.5-warn"}  # its own ${...} resolved
    # --var still wins over a destination's value.
    assert [s.host for s in _load(destination="staging", variables={"HOST": "h"})
            .stages.deploy.servers] == ["h"]


def test_a_pipeline_with_destinations_needs_one_named():
    with pytest.raises(InvalidInput) as exc:
        _load()
    (p,) = exc.value.problems
    assert (p.line, p.column) == (5, 1)
    assert "choose one with --destination NAME" in p.message
    assert "staging, production" in p.message


def test_an_unknown_destination_lists_those_that_exist():
    with pytest.raises(InvalidInput) as exc:
        _load(destination="prod")
    (p,) = exc.value.problems
    assert str(p).startswith("p.yml:5:1")
    assert "unknown destination 'prod'" in p.message and "staging, production" in p.message


def test_a_destination_on_a_file_without_destinations_is_refused():
    plain = FILE.split("destinations:")[0] + "stages:\n  deploy:\n    servers: [\"${HOST}\"]\n"
    assert _load(plain).destination == ""
    with pytest.raises(InvalidInput, match="--destination staging: this pipeline has no "
                                           "destinations"):
        _load(plain, destination="staging")


def test_a_broken_destination_value_is_reported_where_the_destination_wrote_it():
    bad = FILE.replace('variables: {HOST: 10.0.0.5}', 'variables: {HOST: "${NOPE}"}')
    with pytest.raises(InvalidInput) as exc:
        _load(bad, destination="staging")
    assert any(p.line == 7 and "NOPE" in p.message for p in exc.value.problems), \
        exc.value.problems
    # The other destination's ${...} is not resolved when it is not the one chosen.
    assert _load(bad, destination="production").destination == "production"


def test_destination_names_are_dns_labels():
    bad = FILE.replace("  staging:", "  Staging_1:")
    with pytest.raises(InvalidInput) as exc:
        _load(bad, destination="production")
    (p,) = exc.value.problems
    assert (p.line, p.column) == (6, 3) and "not a DNS label" in p.message


def test_history_and_lock_key():
    assert release_key("shop") == "shop"  # no destination: what deploys always used
    assert release_key("shop", "") == "shop"
    assert release_key("shop", "staging") == "shop+staging"
    assert release_key("shop", "staging") != release_key("shop.staging")


def _entry(digest: str, when: float, name: str = "registry.example.com/shop") -> dict:
    return {"digest": digest, "ref": f"{name}@{digest}", "commit": "c" * 40, "run_id": "r",
            "time": when}


def test_promote_takes_the_newest_verified_release_of_the_source():
    histories = [("srv1", [_entry(OLDER, 1.0), _entry(DIGEST, 3.0)]),
                 ("srv4", [_entry(OLDER, 2.0)])]  # missed the last deploy
    image, entry = release_to_promote("staging", histories)
    assert str(image) == f"registry.example.com/shop@{DIGEST}"
    assert entry["time"] == 3.0


def test_promote_with_nothing_verified_on_the_source():
    with pytest.raises(NothingToPromote, match="nothing is verified on staging.*srv1, srv2"):
        release_to_promote("staging", [("srv1", []), ("srv2", [])])


def test_promote_refuses_an_entry_whose_ref_is_not_its_digest():
    bad = _entry(DIGEST, 1.0)
    bad["ref"] = f"registry.example.com/shop@{OLDER}"
    with pytest.raises(NothingToPromote, match="not its digest"):
        release_to_promote("staging", [("srv1", [bad])])
    bad["ref"] = "registry.example.com/shop:latest"
    with pytest.raises(NothingToPromote, match="names no image by digest"):
        release_to_promote("staging", [("srv1", [bad])])


def test_without_a_destination_its_variables_are_not_reported_as_undefined():
    # HOST is defined by the destinations alone: the choice is the one problem said.
    text = FILE.replace("variables: {HOST: 10.0.0.9, LEVEL: debug}", "variables: {LEVEL: debug}")
    for chosen in (None, "qa"):
        with pytest.raises(InvalidInput) as exc:
            _load(text, destination=chosen)
        assert [p.path for p in exc.value.problems] == ["destinations"], exc.value.problems


def test_a_daemon_rollback_reads_the_repository_pipeline_with_its_destination(tmp_path):
    """`runner rollback FILE --request R -d NAME` (a daemon `pipeline:` entry with a destination):
    the file is read from the repository with that destination; an unknown one is exit 2 at the
    file's destinations: line with the names (it was refused as -d with --request before)."""
    import subprocess

    from click.testing import CliRunner

    from runner.cli.main import cli

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "p.yml").write_text(FILE)
    for argv in (["init", "-q", "-b", "main"], ["add", "p.yml"],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"]):
        subprocess.run(["git", *argv], cwd=repo, check=True)
    (tmp_path / "request.json").write_text(
        '{"kind": "rollback", "ref": "refs/heads/main", "branch": "main", '
        '"pipeline_from": {"repository": "%s"}}' % repo)
    res = CliRunner().invoke(cli, ["rollback", "p.yml", "-d", "qa",
                                   "--request", str(tmp_path / "request.json")])
    assert res.exit_code == 2, res.output
    assert "p.yml@" in res.output and "unknown destination 'qa'" in res.output, res.output
    assert "staging, production" in res.output, res.output


def test_a_promotion_on_a_tag_moves_the_tag_s_commit_or_nothing():
    entry = {"commit": "c" * 40, "run_id": "12"}
    require_commit("staging", entry, "c" * 40)
    require_commit("staging", entry, "CCCCCCC")
    with pytest.raises(NothingToPromote) as exc:
        require_commit("staging", entry, "d" * 40)
    assert str(exc.value) == (f"the release last verified on staging is commit {'c' * 12} (run 12), "
                              f"not {'d' * 12}: deploy {'d' * 12} to staging first (nothing was "
                              f"changed)")
    with pytest.raises(NothingToPromote, match=r"is commit \(none recorded\)"):
        require_commit("staging", {"run_id": "3"}, "d" * 40)
