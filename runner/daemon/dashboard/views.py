"""Pure helpers of the dashboard's pages: what a stored value looks like on a page.

Nothing here reads the store or the network: the routes hand these functions rows and outputs,
and tests check the results by equality (tests/unit/test_dashboard_views.py).
"""
from __future__ import annotations

import html
import re
import time
import urllib.parse
from dataclasses import dataclass, replace

from runner.daemon import ids
from runner.daemon.store import FINAL
from runner.run_request import RunRequest

# -- ANSI colours --------------------------------------------------------------------------------

# SGR ("select graphic rendition") sequences set colours and bold; every other escape (cursor
# moves, erase line, OSC titles) means nothing in a page and is dropped.
_ESCAPE = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_COLOURS = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")


@dataclass
class _Pen:
    fg: str = ""
    bg: str = ""
    bold: bool = False
    dim: bool = False
    italic: bool = False
    underline: bool = False

    def classes(self) -> list[str]:
        out = [c for c in (self.fg and f"fg-{self.fg}", self.bg and f"bg-{self.bg}") if c]
        out += [name for name, on in (("b", self.bold), ("dim", self.dim), ("i", self.italic),
                                      ("u", self.underline)) if on]
        return out

    def apply(self, params: str) -> None:
        codes = [int(c) if c.isdigit() else 0 for c in params.split(";")] if params else [0]
        i = 0
        while i < len(codes):
            c = codes[i]
            if c == 0:
                self.__init__()  # type: ignore[misc]
            elif c == 1:
                self.bold = True
            elif c == 2:
                self.dim = True
            elif c == 3:
                self.italic = True
            elif c == 4:
                self.underline = True
            elif c == 22:
                self.bold = self.dim = False
            elif c == 23:
                self.italic = False
            elif c == 24:
                self.underline = False
            elif 30 <= c <= 37:
                self.fg = _COLOURS[c - 30]
            elif 90 <= c <= 97:
                self.fg = "bright-" + _COLOURS[c - 90]
            elif c == 39:
                self.fg = ""
            elif 40 <= c <= 47:
                self.bg = _COLOURS[c - 40]
            elif 100 <= c <= 107:
                self.bg = "bright-" + _COLOURS[c - 100]
            elif c == 49:
                self.bg = ""
            elif c in (38, 48) and i + 1 < len(codes):
                # 256-colour and true-colour forms: skipped (their arguments too), the text stays.
                i += 2 if codes[i + 1] == 5 else 4 if codes[i + 1] == 2 else 0
            i += 1


def ansi_to_html(text: str) -> str:
    """A log line with ANSI colour codes as escaped HTML with <span class="fg-red b">…</span>."""
    out: list[str] = []
    pen = _Pen()
    pos = 0

    def emit(chunk: str) -> None:
        if not chunk:
            return
        classes = pen.classes()
        if classes:
            out.append(f'<span class="{" ".join(classes)}">{html.escape(chunk, quote=False)}</span>')
        else:
            out.append(html.escape(chunk, quote=False))

    for m in _ESCAPE.finditer(text):
        emit(text[pos:m.start()])
        pos = m.end()
        if m.group(2) == "m":
            pen.apply(m.group(1) or "")
    emit(text[pos:])
    # Other control characters (a stray \r from a progress bar, a bell) would show as boxes.
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", "".join(out))


# -- times ---------------------------------------------------------------------------------------

def duration(seconds: float | None) -> str:
    """1.2s, 42s, 3m 05s, 1h 02m: how long something took, for a table cell."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def run_duration(run: dict, now: float | None = None) -> float | None:
    """Seconds a run took, or has been running so far; None before it started."""
    started = run.get("started_at")
    if not started:
        return None
    end = run.get("finished_at") or (None if run.get("status") in FINAL else (now or time.time()))
    return None if end is None else max(0.0, end - started)


def timestamp(t: float | None) -> str:
    """UTC, to the second, as a person reads it: 2026-12-02 19:40:05."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else ""


def iso(t: float | None) -> str:
    """For <time datetime="...">."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


def ago(t: float | None, now: float | None = None) -> str:
    if not t:
        return ""
    d = max(0, int((now or time.time()) - t))
    if d < 60:
        return f"{d}s ago"
    if d < 3600:
        return f"{d // 60}m ago"
    if d < 86400:
        return f"{d // 3600}h ago"
    return f"{d // 86400}d ago"


# -- commits and forges ---------------------------------------------------------------------------

_SHA = re.compile(r"[0-9a-f]{7,64}")


def _web_base(url: str) -> str | None:
    """https://host/owner/repo from a clone URL over HTTP(S), without credentials or `.git`;
    None for ssh, file paths and anything that is not a web address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    path = parts.path.rstrip("/")
    if path.endswith(".git"):
        path = path[:-4]
    if path.count("/") < 2:
        return None
    return f"{parts.scheme}://{host}{path}"


def commit_url(commit: str | None, request: RunRequest | None, repo: str | None = None) -> str | None:
    """Where the forge shows this commit: from the web address of the repository the run's stored
    request names (a webhook's: GitLab's commits under /-/commit/), else from an HTTPS clone URL
    of the pipeline's repository. None when unknown (a local path, ssh) or not a commit."""
    if not commit or not _SHA.fullmatch(commit):
        return None
    if request is not None and request.repo_url:
        base = _web_base(request.repo_url)
        if base is None:
            return None
        return f"{base}/-/commit/{commit}" if request.provider == "gitlab" else f"{base}/commit/{commit}"
    base = _web_base(repo or "")
    if base is None:
        return None
    return f"{base}/-/commit/{commit}" if "gitlab" in urllib.parse.urlsplit(base).hostname else f"{base}/commit/{commit}"


@dataclass(frozen=True)
class CommitFacts:
    """What a run's page tells of the change it built, from the run's stored request (the forge's
    event, parsed once when it arrived: runner.trigger): the commit's message and author, who
    sent it, the pull or merge request (number, title, link). Untrusted text (anyone who can push
    writes it): the templates escape it."""

    title: str = ""  # the message's first line
    body: str = ""  # the rest of the message, when there is more
    author: str = ""
    sender: str = ""  # who pushed, or opened or updated the pull request
    pull_number: int | None = None
    pull_title: str = ""
    pull_url: str | None = None
    pull_branches: str = ""  # "feature/x → main": the branch it brings, the one it targets


def commit_facts(request: RunRequest | None) -> CommitFacts:
    """The commit and pull request a run's stored request names; empty facts for a run that has
    none (a poll's, a cron or manual run's) or says none."""
    if request is None:
        return CommitFacts()
    first, _, rest = (request.commit_message or "").strip("\n").partition("\n")
    facts = CommitFacts(title=first.strip(), body=rest.strip("\n"), author=(request.commit_author or "").strip(),
                        sender=request.sender or "")
    pr = request.pull_request
    if pr is None:
        return facts
    branches = f"{pr.head_branch} → {pr.base_branch}" if pr.head_branch and pr.base_branch else pr.head_branch or ""
    return replace(facts, pull_number=pr.number, pull_title=(pr.title or "").strip(), pull_url=pr.url,
                   pull_branches=branches)


def running_release(deploys: list[dict]) -> str | None:
    """The digest a pipeline's servers run now, by its stored deploy stages (newest first, as
    store.deploys returns them): the newest deploy or rollback that succeeded, when all its
    servers ended on one digest. A deploy that did not succeed and changed nothing that stayed
    (every switched server put back) is passed over; one still going, or one that left servers
    switched, makes it unknown (None): the page then offers the rollback as before."""
    for d in deploys:
        status, servers = d.get("stage_status"), (d.get("outputs") or {}).get("servers") or []
        if status == "success":
            digests = {s.get("digest") for s in servers}
            return digests.pop() if len(digests) == 1 and None not in digests else None
        if status in ("running", "queued"):
            return None
        if any(s.get("digest") and s.get("digest") != s.get("previous_digest") and not s.get("rolled_back")
               for s in servers):
            return None
    return None


def run_state(status: str | None, stages) -> str:
    """The run's status and each stage's, in one string: the page carries the one it was
    rendered with, the event stream sends the current one as soon as it connects, and the page's
    script reloads its tables when they differ (a stage that ended between the page and the
    stream would otherwise stay "running" on it). `stages`: the store's rows, in order."""
    return ";".join([status or ""] + [f"{s['name']}={s['status']}" for s in stages])


# -- lists ---------------------------------------------------------------------------------------

RUN_FILTERS = ("pipeline", "branch", "status", "trigger")
STATUSES = ("queued", "running", "success", "failed", "invalid", "cancelled", "interrupted")
TRIGGERS = ("push", "tag", "pull_request", "poll", "cron", "manual", "retry", "rollback")
PAGE_SIZE = 50


@dataclass(frozen=True)
class RunQuery:
    """The runs page's filters and position, read once from the query string."""

    pipeline: str | None = None
    branch: str | None = None
    status: str | None = None
    trigger: str | None = None
    before: int | None = None  # show runs older than this id (keyset pagination: no OFFSET)

    @classmethod
    def parse(cls, params) -> "RunQuery":
        def text(name: str) -> str | None:
            v = (params.get(name) or "").strip()
            return v[:200] or None

        status = text("status")
        trigger = text("trigger")
        before = text("before")
        return cls(pipeline=text("pipeline"), branch=text("branch"),
                   status=status if status in STATUSES else None,
                   trigger=trigger if trigger in TRIGGERS else None,
                   before=ids.run_id(before))  # not a run id: ignored like a filter it is not

    def filters(self) -> dict[str, str]:
        return {k: v for k in RUN_FILTERS if (v := getattr(self, k))}

    def href(self, **change) -> str:
        """This query's URL with some fields changed (None removes one)."""
        values = {**self.filters(), **({"before": str(self.before)} if self.before else {})}
        for k, v in change.items():
            if v is None:
                values.pop(k, None)
            else:
                values[k] = str(v)
        return "/runs" + ("?" + urllib.parse.urlencode(values) if values else "")


def older_page(query: RunQuery, runs: list[dict], page_size: int = PAGE_SIZE) -> str | None:
    """The link to the next page of older runs, when there may be one. `runs` was read with
    one more row than is shown, so a full page says whether more exist without counting."""
    if len(runs) <= page_size:
        return None
    return query.href(before=runs[page_size - 1]["id"])


STATUS_LABEL = {"success": "✔ success", "failed": "✘ failed", "invalid": "✘ invalid",
                "cancelled": "⊘ cancelled", "interrupted": "⚠ interrupted", "running": "● running",
                "queued": "○ queued", "skipped": "– skipped",
                # a test step's
                "passed": "✔ passed", "timed out": "✘ timed out", "not run": "– not run"}


def status_label(status: str | None) -> str:
    """A status with a sign, so that it reads without colour (and to a screen reader)."""
    return STATUS_LABEL.get(status or "", status or "")


def short(digest_or_sha: str | None, n: int = 12) -> str:
    if not digest_or_sha:
        return ""
    s = digest_or_sha
    if s.startswith("sha256:"):
        return "sha256:" + s[7:7 + n]
    return s[:n]
