"""Checks on the repository URL and ref a pipeline or webhook hands to git. Pure: no I/O.

Both values come from outside (a pipeline file, a webhook payload) and end up as git arguments.
They are refused before anything runs when git could read them as something else:
- an option: a value starting with '-' (GitPython CVE-2022-24439 and its bypasses such as
  `--upload-pack=...`, `-u ...`, `--config=...`; ssh's `-oProxyCommand=` as a host);
- a remote helper: `<transport>::<address>`, of which `ext::` runs any command;
- more than one line (control characters), which breaks logs and config files.
Refs follow `git check-ref-format` and, on top of it, a conservative character set, so that a ref
such as `zzz";echo${IFS}"hello";#` is refused even though git itself would accept it.
"""
from __future__ import annotations

import re
from urllib.parse import unquote

from runner.errors import InvalidInput

ALLOWED_SCHEMES = ("https", "http", "ssh", "git", "file")

# git's own test for `<transport>::<address>` (transport.c: is_urlschemechar then "::").
_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
# scp-like syntax as git reads it: [user@]host:path, with a colon before any slash.
_SCP = re.compile(r"^(?:([^@/:]+)@)?(\[[^\]/]+\]|[^@/:\[\]]+):(.*)$", re.DOTALL)
_HOST = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+%-]*$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_SHA = re.compile(r"^[0-9a-fA-F]{7,40}$")
# Characters a ref may contain here: git allows more ("$;{}#'), a CI runner needs none of them.
_REF_CHARS = re.compile(r"^[A-Za-z0-9._/+@=,%-]+$")


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _refuse(what: str, value: str, why: str) -> InvalidInput:
    return InvalidInput(f"{what} {redact_url(value)!r} refused: {why}")


def check_repo_url(url: str) -> str:
    """Return `url` unchanged if git may be given it; raise InvalidInput saying why not."""
    if not isinstance(url, str) or not url:
        raise InvalidInput("repository URL is empty")
    if _has_control(url):
        raise _refuse("repository URL", url, "it contains a control character or a line break")
    if url != url.strip():
        raise _refuse("repository URL", url, "it starts or ends with whitespace")
    if url.startswith("-"):
        raise _refuse("repository URL", url,
                      "it starts with '-', which git would read as an option")
    if _HELPER.match(url):
        raise _refuse("repository URL", url,
                      "'<transport>::' remote helpers (such as ext::) can run commands; "
                      f"use one of {', '.join(ALLOWED_SCHEMES)}, user@host:path or a local path")
    m = _SCHEME.match(url)
    if m:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme not in ALLOWED_SCHEMES:
            raise _refuse("repository URL", url,
                          f"scheme {scheme!r} is not allowed "
                          f"(allowed: {', '.join(ALLOWED_SCHEMES)})")
        if scheme == "file":
            if not rest.startswith("/"):
                raise _refuse("repository URL", url, "a file:// URL needs an absolute path")
            return url
        if any(c.isspace() for c in url):
            raise _refuse("repository URL", url, "it contains whitespace")
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        hostport = authority.rpartition("@")[2]
        host, port = _split_hostport(hostport)
        if not host:
            raise _refuse("repository URL", url, "it has no host")
        if not _HOST.match(host):
            raise _refuse("repository URL", url, f"host {host!r} is not a valid host name")
        if port and not _PORT.match(port):
            raise _refuse("repository URL", url, f"port {port!r} is not a number")
        return url
    m = _SCP.match(url)
    if m and "/" not in url.split(":", 1)[0]:
        user, host, path = m.group(1), m.group(2), m.group(3)
        if any(c.isspace() for c in url):
            raise _refuse("repository URL", url, "it contains whitespace")
        if user is not None and not _USER.match(user):
            raise _refuse("repository URL", url, f"user {user!r} is not a valid user name")
        if not _HOST.match(host):
            raise _refuse("repository URL", url, f"host {host!r} is not a valid host name")
        if not path or path.startswith("-"):
            raise _refuse("repository URL", url, "the path after ':' is empty or starts with '-'")
        return url
    # Anything else is a local path, which git reads as such (it does not start with '-').
    return url


def check_ref(ref: str) -> str:
    """Return `ref` unchanged if it is a safe branch, tag, full ref name or 7-40 hex commit sha."""
    if not isinstance(ref, str) or not ref:
        raise InvalidInput("ref is empty")
    if _SHA.match(ref):
        return ref

    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"ref {ref!r} refused: {why}")

    if _has_control(ref):
        raise bad("it contains a control character or a line break")
    if ref.startswith("-"):
        raise bad("it starts with '-', which git would read as an option")
    for chars in (" ", "~", "^", ":", "?", "*", "[", "\\"):
        if chars in ref:
            raise bad(f"{chars!r} is not allowed in a git ref name")
    if ".." in ref:
        raise bad("'..' is not allowed in a git ref name")
    if "@{" in ref:
        raise bad("'@{' is not allowed in a git ref name")
    if ref == "@":
        raise bad("'@' alone is not a ref name")
    if ref.startswith("/") or ref.endswith("/") or "//" in ref:
        raise bad("a ref name cannot start or end with '/' or contain '//'")
    if ref.endswith("."):
        raise bad("a ref name cannot end with '.'")
    for part in ref.split("/"):
        if part.startswith("."):
            raise bad("no part of a ref name may start with '.'")
        if part.endswith(".lock"):
            raise bad("no part of a ref name may end with '.lock'")
    if not _REF_CHARS.match(ref):
        odd = sorted({c for c in ref if not _REF_CHARS.match(c)})
        raise bad(f"characters {''.join(odd)!r} are not allowed "
                  "(letters, digits and . _ - / + @ = , % only)")
    return ref


def is_local_path(url: str) -> bool:
    """True for a local path; False for a URL (scheme://...) or scp-like `[user@]host:path`,
    which has a colon before any slash. A leading colon names no host, so `:x` is a path."""
    if "://" in url:
        return False
    colon, slash = url.find(":"), url.find("/")
    return not (colon > 0 and (slash < 0 or colon < slash))


def is_sha(ref: str) -> bool:
    """True for a 7-40 hex string (which may still also be the name of a branch)."""
    return bool(_SHA.match(ref))


def _split_hostport(text: str) -> tuple[str, str]:
    """"host:port" or "[v6]:port" -> (host, port); port is "" when absent."""
    if text.startswith("["):
        host, _, port = text.partition("]")
        return host + "]", port[1:] if port.startswith(":") else port
    host, _, port = text.partition(":")
    return host, port


def _valid_hostport(text: str) -> bool:
    host, port = _split_hostport(text)
    return bool(_HOST.match(host)) and (not port or bool(_PORT.match(port)))


def _userinfo_end(rest: str) -> int:
    """Index of the '@' ending the userinfo in what follows 'scheme://', or -1."""
    cut = min([i for i in (rest.find(s) for s in "/?#") if i != -1] or [len(rest)])
    at = rest.rfind("@", 0, cut)
    if at != -1:
        return at
    # No '@' in the authority. If the authority is not a host[:port] but an '@' follows, the
    # writer forgot to percent-encode a '/', '?' or '#' in a password: treat it as userinfo.
    if not _valid_hostport(rest[:cut]) and "@" in rest[cut:]:
        first = rest.index("@", cut)
        end = min([i for i in (rest.find(s, first) for s in "/?#") if i != -1] or [len(rest)])
        return rest.rfind("@", 0, end)
    return -1


def redact_url(url: str) -> str:
    """`url` without the credentials in its userinfo, for logs and outputs. Never raises.

    http(s)://user:token@host/x -> http(s)://host/x (a token is often the user name);
    ssh://git:pw@host/x -> ssh://git@host/x; scp-like addresses and local paths are unchanged."""
    if not isinstance(url, str):
        return "<not a string>"
    m = _SCHEME.match(url)
    if not m:
        return url
    scheme, rest = m.group(1), m.group(2)
    at = _userinfo_end(rest)
    if at == -1:
        return url
    userinfo, hostpart = rest[:at], rest[at + 1:]
    user, sep, _ = userinfo.partition(":")
    if scheme.lower() in ("http", "https") or not _USER.match(user or "-"):
        return f"{scheme}://{hostpart}"
    return f"{scheme}://{user}@{hostpart}" if sep else url


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(url without userinfo, user, password) for http(s) URLs; (url, None, None) otherwise."""
    m = _SCHEME.match(url)
    if not m or m.group(1).lower() not in ("http", "https"):
        return url, None, None
    rest = m.group(2)
    at = _userinfo_end(rest)
    if at == -1:
        return url, None, None
    user, sep, password = rest[:at].partition(":")
    return (f"{m.group(1)}://{rest[at + 1:]}", unquote(user) or None,
            unquote(password) if sep else None)


def url_kind(url: str) -> str:
    """How git will reach an already-checked URL: a scheme name, "scp" or "local"."""
    m = _SCHEME.match(url)
    if m:
        return m.group(1).lower()
    m = _SCP.match(url)
    if m and "/" not in url.split(":", 1)[0]:
        return "scp"
    return "local"
