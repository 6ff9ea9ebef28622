"""Table-driven tests of runner.gitsafety: what reaches git and what is refused before it runs."""
from __future__ import annotations

import pytest

from runner.errors import InvalidInput
from runner.gitsafety import check_ref, check_repo_url, redact_url, split_credentials, url_kind

GOOD_URLS = [
    "https://github.com/org/repo.git",
    "http://127.0.0.1:8080/repo.git",
    "https://x-access-token:abc@github.com/org/repo",
    "ssh://git@example.com:2222/org/repo.git",
    "git://example.com/repo.git",
    "file:///srv/git/repo.git",
    "git@github.com:org/repo.git",
    "example.com:org/repo.git",
    "/srv/git/repo.git",
    "./relative/repo",
    "../up/repo",
    "repo",
    "/tmp/with space/repo",
    "http://[::1]:8080/repo.git",
]

BAD_URLS = [
    ("ext::sh -c touch% /tmp/pwned", "remote helper"),
    ("EXT::sh -c id", "remote helper"),
    ("fd::17", "remote helper"),
    ("file::/etc", "remote helper"),
    ("https::example.com/repo", "remote helper"),
    ("--upload-pack=touch /tmp/x", "option"),
    ("-u touch /tmp/x", "option"),
    ("--config=core.sshCommand=touch /tmp/x", "option"),
    ("-oProxyCommand=touch /tmp/x", "option"),
    ("https://example.com/repo\n--upload-pack=x", "control"),
    ("https://example.com/repo\r", "control"),
    ("/tmp/repo\x00", "control"),
    ("ftp://example.com/repo", "not allowed"),
    ("javascript://example.com/x", "not allowed"),
    ("ssh://-oProxyCommand=touch%20x/repo", "host"),
    ("-oProxyCommand=x:repo", "option"),
    ("git@-oProxyCommand=x:repo", "host"),
    ("https://exa mple.com/repo", "whitespace"),
    ("https:///repo", "no host"),
    ("http://example.com:abc/repo", "port"),
    ("file://relative/path", "absolute"),
    (" https://example.com/repo", "whitespace"),
    ("", "empty"),
]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_allowed_urls(url):
    assert check_repo_url(url) == url


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_refused_urls(url, why):
    with pytest.raises(InvalidInput) as exc:
        check_repo_url(url)
    assert why in str(exc.value)


def test_refusal_message_has_no_credentials():
    with pytest.raises(InvalidInput) as exc:
        check_repo_url("ftp://user:s3cr3t@example.com/repo")
    assert "s3cr3t" not in str(exc.value)


GOOD_REFS = [
    "main", "feature/x-1", "release/1.2.3", "v1.0.0", "refs/heads/main", "refs/tags/v1",
    "refs/pull/12/head", "deadbee", "0123456789abcdef0123456789abcdef01234567", "user@host",
    "a+b", "a=b,c",
]

BAD_REFS = [
    ('zzz";echo${IFS}"hello";#', "not allowed"),
    ("$(touch /tmp/x)", "not allowed"),
    ("`id`", "not allowed"),
    ("a;b", "not allowed"),
    ("--upload-pack=touch /tmp/x", "'-'"),
    ("-u", "'-'"),
    ("--output=/tmp/x", "'-'"),
    ("a..b", "'..'"),
    ("a@{1}", "'@{'"),
    ("@", "'@'"),
    ("a\\b", "'\\\\'"),
    ("a b", "' '"),
    ("a~1", "'~'"),
    ("a^", "'^'"),
    ("a:b", "':'"),
    ("a?", "'?'"),
    ("a*", "'*'"),
    ("a[b", "'['"),
    ("a\nb", "control"),
    ("a\x7fb", "control"),
    ("main.lock", ".lock"),
    ("refs/heads/x.lock/y", ".lock"),
    ("main/", "'/'"),
    ("/main", "'/'"),
    ("a//b", "'//'"),
    ("main.", "end with '.'"),
    (".hidden", "start with '.'"),
    ("refs/heads/.x", "start with '.'"),
    ("", "empty"),
]


@pytest.mark.parametrize("ref", GOOD_REFS)
def test_allowed_refs(ref):
    assert check_ref(ref) == ref


@pytest.mark.parametrize(("ref", "why"), BAD_REFS)
def test_refused_refs(ref, why):
    with pytest.raises(InvalidInput) as exc:
        check_ref(ref)
    assert why in str(exc.value)


@pytest.mark.parametrize(("url", "redacted"), [
    ("https://x-access-token:ghp_abc@github.com/o/r.git", "https://github.com/o/r.git"),
    ("https://ghp_abc@github.com/o/r.git", "https://github.com/o/r.git"),
    ("http://u:p@127.0.0.1:8080/r", "http://127.0.0.1:8080/r"),
    ("https://u:a/b@c@host.example/r", "https://host.example/r"),  # unencoded '/' and '@'
    ("https://host.example/path@v1", "https://host.example/path@v1"),
    ("ssh://git:pw@host/r", "ssh://git@host/r"),
    ("ssh://git@host/r", "ssh://git@host/r"),
    ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ("/srv/git/r", "/srv/git/r"),
    ("file:///srv/git/r", "file:///srv/git/r"),
])
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_split_credentials():
    assert split_credentials("https://u:p%40ss@h/r") == ("https://h/r", "u", "p@ss")
    assert split_credentials("https://tok@h/r") == ("https://h/r", "tok", None)
    assert split_credentials("https://h/r") == ("https://h/r", None, None)
    assert split_credentials("ssh://git@h/r") == ("ssh://git@h/r", None, None)


@pytest.mark.parametrize(("url", "kind"), [
    ("/x", "local"), ("./a:b", "local"), ("git@h:x", "scp"), ("h:x", "scp"),
    ("HTTPS://h/x", "https"), ("file:///x", "file"), ("ssh://h/x", "ssh"),
])
def test_url_kind(url, kind):
    assert url_kind(url) == kind
