"""Tags computed from git, image names, OCI labels."""
from __future__ import annotations

import pytest

from runner.tags import (
    GitInfo, compute_tags, is_valid_tag, oci_labels, render_template, sanitize_tag,
    strip_credentials, validate_image_name, validate_template,
)

SHA = "0123456789abcdef0123456789abcdef01234567"
DEFAULT = ("{short_sha}", "{branch}", "{tag}")

BRANCH = GitInfo(SHA, branch="main", default_branch="main")
FEATURE = GitInfo(SHA, branch="feature/Login_v2", default_branch="main")
TAG = GitInfo(SHA, tag="v1.2.0", default_branch="main")
DETACHED = GitInfo(SHA)


@pytest.mark.parametrize("templates,info,run_id,expected", [
    (DEFAULT, BRANCH, None, ["0123456", "main"]),
    (DEFAULT, FEATURE, None, ["0123456", "feature-Login_v2"]),
    (DEFAULT, TAG, None, ["0123456", "v1.2.0"]),
    (DEFAULT, DETACHED, None, ["0123456"]),
    (("{tag}",), BRANCH, None, ["0123456"]),  # nothing left: the short sha
    (("{branch}",), DETACHED, None, ["0123456"]),
    (("{sha}",), BRANCH, None, [SHA]),
    (("build-{run_id}", "{branch}-{short_sha}"), BRANCH, "42", ["build-42", "main-0123456"]),
    (("build-{run_id}",), BRANCH, None, ["0123456"]),
    (("{latest}", "{branch}"), BRANCH, None, ["latest", "main"]),
    (("{latest}", "{branch}"), FEATURE, None, ["feature-Login_v2"]),
    (("{latest}",), TAG, None, ["0123456"]),
    (("stable", "{branch}", "main", "{short_sha}", "{short_sha}"), BRANCH, None,
     ["stable", "main", "0123456"]),
    (("v{tag}",), GitInfo(SHA, tag="1.0"), None, ["v1.0"]),
    (("{branch}",), GitInfo(SHA, branch="refs/heads/dev"), None, ["dev"]),
    (("{tag}",), GitInfo(SHA, tag="refs/tags/v2"), None, ["v2"]),
    (("{branch}",), GitInfo(SHA, branch="-.weird branch!"), None, ["weird-branch-"]),
    (("{branch}",), GitInfo(SHA, branch="..."), None, ["0123456"]),
    ((), BRANCH, None, ["0123456"]),
])
def test_compute_tags(templates, info, run_id, expected):
    tags = compute_tags(templates, info, run_id)
    assert tags == expected
    assert all(is_valid_tag(t) for t in tags)


def test_long_branch_truncated_to_128():
    tag = compute_tags(["{branch}"], GitInfo(SHA, branch="b" * 300))[0]
    assert len(tag) == 128 and is_valid_tag(tag)


@pytest.mark.parametrize("value,expected", [
    ("main", "main"), ("feature/x", "feature-x"), ("a b:c", "a-b-c"), ("_ok", "_ok"),
    (".hidden", "hidden"), ("--x", "x"), ("é", ""), ("xé", "x-"), ("", ""),
    ("v1.2.3-rc.1", "v1.2.3-rc.1"),
])
def test_sanitize_tag(value, expected):
    assert sanitize_tag(value) == expected


@pytest.mark.parametrize("template,fragment", [
    ("{short_sha}", None), ("v{tag}-{run_id}", None), ("latest", None), ("{latest}", None),
    ("{brnch}", "did you mean '{branch}'"), ("{sha", "unbalanced"), ("x}", "unbalanced"),
    ("", "empty"), ("   ", "empty"), ("...", "no valid docker tag"), ("{}", "unknown placeholder"),
])
def test_validate_template(template, fragment):
    message = validate_template(template)
    if fragment is None:
        assert message is None
    else:
        assert message is not None and fragment in message


def test_render_template_refuses_invalid():
    with pytest.raises(ValueError):
        render_template("{nope}", BRANCH)


@pytest.mark.parametrize("name", [
    "app", "team/app", "10.87.53.1:5000/example/app", "localhost:5000/app", "localhost/app",
    "registry.example.com/a/b/c", "reg-1.example.com:443/team/app_x", "ghcr.io/o/my.app",
    "a__b/c--d", "[::1]:5000/app",
])
def test_valid_image_names(name):
    assert validate_image_name(name) is None


@pytest.mark.parametrize("name,fragment", [
    ("", "empty"),
    ("Registry.Example.com/app", None),  # host names are case-insensitive
    ("reg.local/Team/app", "must be lowercase ('Team' -> 'team')"),
    ("MyApp", "must be lowercase"),
    ("reg.local:5000/app:1.0", "must not include a tag (':1.0')"),
    ("app:latest", "must not include a tag"),
    ("reg.local/app@sha256:abcd", "must not include a digest"),
    ("reg.local/", "no repository path"),
    ("reg.local//app", "invalid path component ''"),
    ("reg.local/-app", "invalid path component '-app'"),
    ("reg.local/app_", "invalid path component"),
    ("reg_local.x:5000/app", "invalid registry"),
    ("reg.local:port/app", "invalid registry"),
    ("my app", "contains spaces"),
    ("a/" * 130 + "b", "longer than 255"),
])
def test_invalid_image_names(name, fragment):
    message = validate_image_name(name)
    if fragment is None:
        assert message is None
    else:
        assert message is not None and fragment in message, message


@pytest.mark.parametrize("url,expected", [
    ("https://x-access-token:ghp_abc@github.com/o/r.git", "https://github.com/o/r.git"),
    ("https://user@gitlab.example.com:8443/o/r.git", "https://gitlab.example.com:8443/o/r.git"),
    ("ssh://git@host:2222/o/r.git", "ssh://host:2222/o/r.git"),
    ("https://github.com/o/r", "https://github.com/o/r"),
    ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ("/srv/git/app", "/srv/git/app"),
])
def test_strip_credentials(url, expected):
    assert strip_credentials(url) == expected


def test_oci_labels():
    assert oci_labels("https://u:p@git.example.com/o/r.git", SHA, "2026-01-01T00:00:00Z") == {
        "org.opencontainers.image.source": "https://git.example.com/o/r.git",
        "org.opencontainers.image.revision": SHA,
        "org.opencontainers.image.created": "2026-01-01T00:00:00Z",
    }
