"""The checkout stage: a cached mirror per repository, then this run's work tree at one commit.

Layout: <cache_dir>/git/<sha256 of the normalised URL> is a bare mirror (refspec +refs/*:refs/*),
guarded by <that>.lock (fcntl.flock) while it is fetched and read; the first run of a repository
creates it (cloned: True), later runs only fetch. The work tree is <workdir>/src, a `--shared`
clone of the mirror (objects borrowed, not copied) checked out detached at the exact commit.
The run directory, <cache_dir>/git, each mirror and the work tree are 0700 (tightened when an
older runner left them 0755): a repository's content is its runner user's alone.

Safety, in order: the URL and every ref pass runner.gitsafety before git runs at all; refs reach
git only after `--end-of-options`, as fully qualified names or as resolved hex shas; every git
process gets an environment that allows only the https/http/ssh/git transports (plus file for a
local repository), never prompts (GIT_TERMINAL_PROMPT=0) and stores no credential
(credential.helper reset). Credentials never reach argv, the stored remote URL or a log line:
an HTTPS token is answered to git's prompt by a 0700 askpass script that reads it from the
environment and only for the repository's own host; an SSH key goes to a 0600 file deleted in
`finally` (runner.gitaccess, which the daemon's poll uses too).

A request's commit must be on the ref the request names (whoever holds the webhook secret could
otherwise build any commit the repository has, an unmerged one for instance, as if it were on
main): after the fetch, the commit is the head of the named branch or pull/merge request ref
(refs/heads/*, refs/pull/N/head, refs/merge-requests/N/head, any refs/*) or an ancestor of it
(`git merge-base --is-ancestor`), and a named tag points at it. The mirror's fetch already
brings every ref (+refs/*:refs/*), so this costs no further fetch, except on a shallow mirror,
whose history of that ref is deepened back to the commit's date when the answer is not yet known.

Network commands run through runner.proc.run_command (argv, streaming, cancellation); GitPython
drives the local reads of the mirror (init, config, rev-parse, for-each-ref). GitPython's own
clone/fetch are not used because they cannot be cancelled mid-transfer; nothing here enables its
unsafe protocols or options.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets as _random
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import git

from runner.errors import Cancelled, InvalidInput, SecretWithheld, StageFailed
from runner.gitsafety import (
    check_ref, check_repo_url, is_sha, redact_url, url_kind,
)
from runner.gitaccess import (
    Access, Remote, git_env, remote, repository_access,
)
from runner.model import Pipeline
from runner.outputs import CheckoutOutputs
from runner.private_dir import private_dir
from runner.proc import Result, run_command
from runner.run_request import RunRequest
from runner.stage import Stage, StageContext

STAGE = "checkout"
_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")

# --- pure helpers ---------------------------------------------------------------------------

def normalize_url(url: str) -> str:
    """The identity of a repository for the mirror cache: no credentials, scheme and host in
    lower case, no trailing '/'; a local path and its file:// URL are the same repository."""
    kind = url_kind(url)
    if kind == "local":
        return "local:" + os.path.normpath(os.path.abspath(url))
    if kind == "file":
        return "local:" + os.path.normpath(unquote(url[len("file://"):]))
    clean = redact_url(url).rstrip("/")
    if kind == "scp":
        return clean
    scheme, _, rest = clean.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{authority.lower()}{slash}{path}"


def mirror_key(url: str) -> str:
    return hashlib.sha256(normalize_url(url).encode()).hexdigest()


def parse_symref(ls_remote_output: str) -> str | None:
    """The ref HEAD points to, from `git ls-remote --symref <remote> HEAD` output."""
    for line in ls_remote_output.splitlines():
        m = re.match(r"^ref: (refs/\S+)\tHEAD$", line)
        if m:
            return m.group(1)
    return None


def progress_text(line: str) -> str:
    """Git redraws progress with '\\r': keep only the last state of a line."""
    parts = [p for p in line.split("\r") if p.strip()]
    return parts[-1].rstrip() if parts else ""


# --- what one run asks for ------------------------------------------------------------------

@dataclass
class _Request:
    remote: Remote  # the repository URL, validated, taken apart
    commit: str | None  # exact commit from the request
    ref: str | None  # branch/tag/ref/sha to check out (or, with `commit`, to name it by)
    branch_hint: str | None  # the request's own branch / tag names, when `ref` is the request's
    tag_hint: str | None
    claim: str | None = None  # the ref the request says `commit` is on (checked after the fetch)

    @property
    def url(self) -> str:
        return self.remote.url

    @property
    def redacted(self) -> str:
        return self.remote.redacted

    @property
    def kind(self) -> str:
        return self.remote.kind

    @property
    def fetch_url(self) -> str:
        """What git is given and the mirror stores: no credentials, local paths absolute."""
        return self.remote.fetch_url


def _request(pipeline: Pipeline, request: RunRequest) -> _Request:
    """What to check out. The request's refs and commit were checked when it was made
    (runner.run_request); the pipeline's ref is checked here."""
    repo = pipeline.repository
    url = check_repo_url(repo.url)
    commit = request.commit
    p_ref = check_ref(repo.ref) if repo.ref else None
    # A request's commit wins (the exact commit pushed; its ref only names it). Without one, the
    # pipeline's ref wins: `runner exec --event e.json --ref x` drops the event's commit and
    # puts x into repository.ref, so the event's ref must not override it.
    if commit is not None:
        ref, branch_hint, tag_hint = request.ref or p_ref, request.branch, request.tag
    elif p_ref is not None:
        ref, branch_hint, tag_hint = p_ref, None, None
    else:
        ref, branch_hint, tag_hint = request.ref, request.branch, request.tag
    return _Request(remote=remote(url), commit=commit, ref=ref,
                    branch_hint=branch_hint, tag_hint=tag_hint,
                    claim=None if commit is None else
                    claimed_ref(request.ref, request.branch, request.tag))


def claimed_ref(ref: str | None, branch: str | None, tag: str | None) -> str | None:
    """The ref a request says its commit is on: its full `ref` (refs/heads/main,
    refs/pull/7/head, refs/merge-requests/7/head, refs/tags/v1), else its branch or tag name;
    a short `ref` stays short (looked up as a branch, then a tag). Pure."""
    if ref:
        return ref
    if branch:
        return f"refs/heads/{branch}"
    if tag:
        return f"refs/tags/{tag}"
    return None


def describe_ref(full_ref: str) -> str:
    """'branch main', 'tag v1', or the full name of any other ref. Pure."""
    for prefix, kind in (("refs/heads/", "branch"), ("refs/tags/", "tag")):
        if full_ref.startswith(prefix):
            return f"{kind} {full_ref[len(prefix):]}"
    return full_ref


class CheckoutStage(Stage):
    """Outputs: runner.outputs.CheckoutOutputs (the commit, its work tree, the mirror).

    Raises StageFailed for a refused URL or ref, an unreachable repository, missing or wrong
    credentials, an unknown ref and a request's commit that is not on the ref it names;
    Cancelled when ctx.cancel is set (checked between steps, while waiting for the mirror lock and
    inside every git command)."""

    name = STAGE

    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        repo = pipeline.repository
        check_repo_url(repo.url)
        if repo.ref:
            check_ref(repo.ref)
        return {"url": redact_url(repo.url), "ref": repo.ref, "depth": repo.depth,
                "submodules": repo.submodules}

    def run(self, ctx: StageContext) -> CheckoutOutputs:
        try:
            req = _request(ctx.pipeline, ctx.request)
        except InvalidInput as exc:
            raise StageFailed(STAGE, str(exc)) from None
        if req.kind in ("local", "file"):
            path = req.fetch_url if req.kind == "local" else unquote(req.fetch_url[7:])
            if not os.path.isdir(path):
                raise StageFailed(STAGE, f"repository {req.redacted!r} does not exist "
                                  "(repository.url is a local path that is not a directory)")
        _check_cancel(ctx)
        repo = ctx.pipeline.repository
        private_dir(ctx.workdir)  # the key file and the work tree are for this user only
        root = private_dir(ctx.cache_dir / "git")
        key = mirror_key(req.url)
        mirror = root / key
        access = self._access(ctx, req)
        try:
            with _flock(root / f"{key}.lock", ctx):
                cloned = self._update_mirror(ctx, req, access, mirror, repo.depth)
                _check_cancel(ctx)
                commit, branch, tag, head = self._resolve(ctx, req, access, mirror, repo.depth)
                default_branch = self._default_branch(ctx, access, mirror, head, req)
            _check_cancel(ctx)
            dest = self._work_tree(ctx, req, access, mirror, commit)
            if repo.submodules:
                _check_cancel(ctx)
                ctx.log.info("updating submodules")
                self._git(ctx, access, ["-C", str(dest), "submodule", "update", "--init",
                                        "--recursive", "--progress"], what="submodule update")
            committed_at = self._committed_at(ctx, access, dest, commit)
        finally:
            access.cleanup()
        ctx.log.info(f"checked out {commit[:12]}"
                     + (f" (branch {branch})" if branch else "")
                     + (f" (tag {tag})" if tag else "") + f" into {dest}")
        return CheckoutOutputs(commit=commit, branch=branch, tag=tag, path=dest,
                               url=req.redacted, mirror=mirror, cloned=cloned,
                               committed_at=committed_at, default_branch=default_branch)

    def _default_branch(self, ctx: StageContext, access: Access, mirror: Path,
                        head: str | None, req: _Request) -> str | None:
        """The repository's default branch (short name): as the webhook said it, or as read
        while resolving, or asked of the remote only when a tag template needs it ({latest}):
        the mirror is a bare fetch, its own HEAD is not the remote's."""
        said = ctx.request.default_branch
        if said:
            return said[len("refs/heads/"):] if said.startswith("refs/heads/") else said
        if head is None and any("{latest}" in t for t in ctx.pipeline.image.tags):
            res = self._git(ctx, access, ["-C", str(mirror), "ls-remote", "--symref", "origin",
                                          "HEAD"],
                            what=f"reading the default branch of {req.redacted}", quiet=True)
            head = parse_symref(res.output)
        if head is None or not head.startswith("refs/heads/"):
            return None
        return head[len("refs/heads/"):]

    def _committed_at(self, ctx: StageContext, access: Access, dest: Path, commit: str) -> str:
        """The commit's committer time, UTC ISO 8601: the build dates the image by it, so that
        rebuilding a commit gives the same image (and digest) instead of a new one per run."""
        res = self._git(ctx, access, ["-C", str(dest), "show", "-s", "--format=%ct", commit],
                        env=access.local_env, what="reading the commit time", quiet=True)
        stamp = int(res.output.strip().splitlines()[-1])
        return datetime.fromtimestamp(stamp, timezone.utc).isoformat().replace("+00:00", "Z")

    # --- credentials --------------------------------------------------------------------------

    def _access(self, ctx: StageContext, req: _Request) -> Access:
        return repository_access(ctx.pipeline.repository, req.remote,
                                 lambda name, field_name: _secret(ctx, name, field_name),
                                 ctx.workdir, ctx.log.warn)

    # --- mirror ---------------------------------------------------------------------------

    def _update_mirror(self, ctx: StageContext, req: _Request, access: Access, mirror: Path,
                       depth: int | None) -> bool:
        cloned = not _is_repo(mirror)
        if cloned:
            if mirror.exists():
                ctx.log.warn(f"removing a broken mirror at {mirror}")
                shutil.rmtree(mirror)
            target = mirror.with_name(f"{mirror.name}.tmp-{_random.token_hex(4)}")
            ctx.log.info(f"cloning {req.redacted} into the cache ({mirror})")
        else:
            target = mirror
            ctx.log.info(f"fetching {req.redacted} into the cached mirror ({mirror})")
        try:
            if cloned:
                r = git.Repo.init(target, bare=True, mkdir=True)
                r.close()
            _set_config(target, req.fetch_url)
            args = ["-C", str(target), "fetch", "--progress", "--prune", "--no-recurse-submodules"]
            if depth:
                args.append(f"--depth={depth}")
            elif (target / "shallow").exists():
                args.append("--unshallow")
            self._git(ctx, access, [*args, "origin"], what=f"fetch from {req.redacted}")
            if cloned:
                os.rename(target, mirror)
            os.chmod(mirror, 0o700)  # git makes it 0755; an older runner's mirror is tightened
        except BaseException:
            if cloned:
                shutil.rmtree(target, ignore_errors=True)
            raise
        return cloned

    def _resolve(self, ctx: StageContext, req: _Request, access: Access, mirror: Path,
                 depth: int | None) -> tuple[str, str | None, str | None, str | None]:
        """(commit, branch, tag, the remote's HEAD ref when it was read to choose the branch)."""
        repo = git.Repo(mirror)
        try:
            g = repo.git
            g.update_environment(**access.local_env)

            def rev(name: str) -> str | None:
                try:
                    out = g.rev_parse("--verify", "--quiet", "--end-of-options",
                                      f"{name}^{{commit}}")
                except git.GitCommandError:
                    return None
                out = out.strip()
                return out if _FULL_SHA.match(out) else None

            def has(full_ref: str) -> bool:
                return rev(full_ref) is not None

            def fetch_sha(sha: str) -> str | None:
                if not _FULL_SHA.match(sha.lower()):
                    return None
                ctx.log.info(f"commit {sha[:12]} is not on a fetched ref; fetching it by id")
                args = ["-C", str(mirror), "fetch", "--progress", "--no-recurse-submodules"]
                if depth:
                    args.append(f"--depth={depth}")
                res = self._git(ctx, access, [*args, "--end-of-options", "origin", sha.lower()],
                                what=f"fetch of commit {sha}", check=False)
                return rev(sha.lower()) if res.returncode == 0 else None

            branch = tag = head = None
            if req.commit is not None:
                commit = rev(req.commit) or fetch_sha(req.commit)
                if commit is None:
                    raise StageFailed(STAGE, f"commit {req.commit!r} not found in {req.redacted}")
                if req.claim:
                    self._check_claim(ctx, req, access, mirror, g, rev, commit)
                if req.ref:
                    branch, tag = _names(req.ref, has)
            elif req.ref is not None:
                ref = req.ref
                commit = None
                if ref.startswith("refs/"):
                    commit = rev(ref)
                    branch, tag = _names(ref, lambda _: True)
                else:
                    for prefix in ("refs/heads/", "refs/tags/"):
                        commit = rev(prefix + ref)
                        if commit:
                            branch, tag = _names(prefix + ref, lambda _: True)
                            break
                    if commit is None and is_sha(ref):
                        commit = rev(ref) or fetch_sha(ref)
                if commit is None:
                    raise StageFailed(STAGE, f"ref {ref!r} not found in {req.redacted}: "
                                      "no branch, tag or commit of that name")
            else:
                res = self._git(ctx, access, ["-C", str(mirror), "ls-remote", "--symref",
                                              "origin", "HEAD"],
                                what=f"reading the default branch of {req.redacted}", quiet=True)
                head = parse_symref(res.output)
                if head is None or not head.startswith("refs/heads/"):
                    raise StageFailed(STAGE, f"{req.redacted} has no default branch (empty "
                                      "repository or detached HEAD); set repository.ref")
                check_ref(head)
                commit = rev(head)
                if commit is None:
                    raise StageFailed(STAGE, f"default branch {head!r} of {req.redacted} "
                                      "was not fetched")
                g.symbolic_ref("HEAD", head)
                branch = head[len("refs/heads/"):]
            # Only a tag build has a tag: a branch build of a tagged commit must not fill {tag}
            # (it would push, and move, the release's image tag from a branch).
            branch = req.branch_hint or branch
            tag = req.tag_hint or tag
            return commit, branch, tag, head
        finally:
            repo.close()

    def _check_claim(self, ctx: StageContext, req: _Request, access: Access, mirror: Path, g,
                     rev, commit: str) -> None:
        """Raise StageFailed unless `commit` is on the ref the request names: that branch's (or
        pull/merge request ref's) head or an ancestor of it; for a tag, what the tag points at."""
        assert req.claim is not None
        full = req.claim
        if is_sha(full) and commit.startswith(full.lower()):
            return  # the "ref" is the commit itself
        if not full.startswith("refs/"):
            full = next((f"{p}{full}" for p in ("refs/heads/", "refs/tags/")
                         if rev(f"{p}{full}") is not None), f"refs/heads/{full}")
        what, short = describe_ref(full), commit[:12]
        head = rev(full)
        if head is None:
            raise StageFailed(STAGE, f"commit {short} is not on {what} of {req.redacted}: "
                              f"{req.redacted} has no {what}")
        if full.startswith("refs/tags/"):
            if head != commit:
                raise StageFailed(STAGE, f"commit {short} is not what {what} of {req.redacted} "
                                  f"points at (it points at {head[:12]})")
            return
        if head == commit or self._is_ancestor(g, commit, head):
            return
        shallow = (mirror / "shallow").exists()
        if shallow and self._deepen_to(ctx, access, mirror, g, full, commit):
            head = rev(full) or head
            if head == commit or self._is_ancestor(g, commit, head):
                return
        note = (f"; the mirror is shallow (repository.depth), its history of {what} was "
                "deepened back to the commit's date") if shallow else ""
        raise StageFailed(STAGE, f"commit {short} is not on {what} of {req.redacted} "
                          f"(its head is {head[:12]}){note}")

    @staticmethod
    def _is_ancestor(g, commit: str, head: str) -> bool:
        """`git merge-base --is-ancestor`: exit 0 yes, 1 no, anything else an error. Both are
        full hex shas from rev-parse, never names from outside."""
        status, _, err = g.merge_base("--is-ancestor", commit, head, with_exceptions=False,
                                      with_extended_output=True)
        if status not in (0, 1):
            raise StageFailed(STAGE, f"checking that {commit[:12]} is an ancestor of "
                              f"{head[:12]} failed: {err.strip() or f'exit {status}'}")
        return status == 0

    def _deepen_to(self, ctx: StageContext, access: Access, mirror: Path, g, full_ref: str,
                   commit: str) -> bool:
        """On a shallow mirror, fetch the history of `full_ref` back to a day before `commit`'s
        committer date (the commits between them are its descendants, dated after it but for
        clock skew). True when the fetch worked."""
        stamp = int(g.show("-s", "--format=%ct", commit).strip().splitlines()[-1]) - 86400
        since = datetime.fromtimestamp(max(stamp, 0), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        ctx.log.info(f"the mirror is shallow: fetching {describe_ref(full_ref)} since {since} to "
                     f"see whether {commit[:12]} is on it")
        res = self._git(ctx, access, ["-C", str(mirror), "fetch", "--no-recurse-submodules",
                                      f"--shallow-since={since}", "--end-of-options", "origin",
                                      f"+{full_ref}:{full_ref}"],
                        what=f"deepening {describe_ref(full_ref)}", check=False, quiet=True)
        return res.returncode == 0

    # --- work tree -------------------------------------------------------------------------

    def _work_tree(self, ctx: StageContext, req: _Request, access: Access, mirror: Path,
                   commit: str) -> Path:
        dest = (ctx.workdir / "src").absolute()
        if dest.exists():
            shutil.rmtree(dest)
        env = access.local_env
        self._git(ctx, access, ["clone", "--shared", "--no-checkout", "--quiet",
                                "--end-of-options", str(mirror), str(dest)],
                  env=env, what="creating the work tree")
        os.chmod(dest, 0o700)  # git makes it 0755; nothing is checked out into it yet
        # A shallow mirror is cloned over the transport, which carries branches and tags only:
        # a commit fetched by id (an older requested commit) has to be fetched from the mirror.
        present = run_command(["git", "-C", str(dest), "cat-file", "-e", f"{commit}^{{commit}}"],
                              env=env, cancel=ctx.cancel)
        if present.returncode != 0:
            depth = ctx.pipeline.repository.depth
            self._git(ctx, access, ["-C", str(dest), "fetch", "--no-tags", "--quiet",
                                    *([f"--depth={depth}"] if depth else []),
                                    "--end-of-options", str(mirror), commit],
                      env=env, what=f"copying commit {commit[:12]} into the work tree")
        # Submodules with relative URLs resolve against origin: the repository, not the cache.
        self._git(ctx, access, ["-C", str(dest), "config", "remote.origin.url", req.fetch_url],
                  env=env, what="setting the work tree's origin")
        self._git(ctx, access, ["-C", str(dest), "-c", "advice.detachedHead=false", "checkout",
                                "--progress", "--detach", commit],
                  env=env, what=f"checking out {commit[:12]}")
        return dest

    # --- running git ----------------------------------------------------------------------

    def _git(self, ctx: StageContext, access: Access, args: list[str], *, what: str,
             env: dict[str, str] | None = None, check: bool = True, quiet: bool = False) -> Result:
        def on_line(text: str) -> None:
            text = progress_text(text)
            if text:
                ctx.log.line(access.mask(text))

        res = run_command(["git", *args], on_line=None if quiet else on_line, cancel=ctx.cancel,
                          env=env if env is not None else access.env)
        if check and res.returncode != 0:
            raise StageFailed(STAGE, access.mask(_failure(what, res.output)))
        return res


def _names(full_ref: str, exists) -> tuple[str | None, str | None]:
    """(branch, tag) named by a ref; a short name is looked up as a branch, then a tag."""
    if full_ref.startswith("refs/heads/"):
        return full_ref[len("refs/heads/"):], None
    if full_ref.startswith("refs/tags/"):
        return None, full_ref[len("refs/tags/"):]
    if full_ref.startswith("refs/"):
        return None, None
    if exists("refs/heads/" + full_ref):
        return full_ref, None
    if exists("refs/tags/" + full_ref):
        return None, full_ref
    return None, None


def _failure(what: str, output: str) -> str:
    lines = [progress_text(x) for x in output.splitlines()]
    lines = [x for x in lines if x and not re.match(r"^(remote: )?(Counting|Compressing|"
                                                    r"Receiving|Resolving|Enumerating)", x)]
    errors = list(dict.fromkeys(x for x in lines if re.match(r"^(fatal|error): ", x)))
    tail = "; ".join((errors or lines)[:3] if errors else lines[-3:]) or "no output"
    hint = ""
    low = output.lower()
    if ("could not read username" in low or "authentication failed" in low
            or "terminal prompts disabled" in low or "permission denied (publickey" in low):
        hint = " (the repository needs credentials: set repository.token or repository.ssh_key)"
    elif "host key verification failed" in low:
        hint = " (the server's SSH host key is not in known_hosts)"
    return f"{what} failed: {tail}{hint}"


def _check_cancel(ctx: StageContext) -> None:
    if ctx.cancel.is_set():
        raise Cancelled("checkout cancelled")


def _secret(ctx: StageContext, name: str, field_name: str) -> str:
    try:
        value = ctx.secrets.value(name)
    except SecretWithheld as exc:
        raise StageFailed(STAGE, f"{field_name}: {exc.reason}") from None
    except Exception as exc:  # the store's own error type is not this stage's business
        raise StageFailed(STAGE, f"{field_name}: secret {name!r} is not available "
                          f"({type(exc).__name__})") from None
    if not value:
        raise StageFailed(STAGE, f"{field_name}: secret {name!r} is empty")
    return value


def _is_repo(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "config").is_file()


def _set_config(mirror: Path, fetch_url: str) -> None:
    # `git config` rather than GitPython's writer: it escapes values (a path may hold '#').
    r = git.Repo(mirror)
    try:
        g = r.git
        g.update_environment(**git_env(dict(os.environ), allow_file=True))
        g.config("remote.origin.url", fetch_url)
        g.config("remote.origin.fetch", "+refs/*:refs/*")
        g.config("remote.origin.mirror", "true")
        g.config("gc.autoDetach", "false")
    finally:
        r.close()


@contextlib.contextmanager
def _flock(path: Path, ctx: StageContext) -> Iterator[None]:
    """Exclusive lock on the mirror while it is fetched and read; waiting honours cancel."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    ctx.log.info("waiting for another run using the same mirror")
                    told = True
                _check_cancel(ctx)
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
