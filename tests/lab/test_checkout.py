"""The checkout stage against real git repositories made in tmp_path (no mocks of git).

The HTTP test serves a bare repository through `git http-backend` behind a tiny Basic-auth CGI
wrapper on 127.0.0.1, to prove that the token authenticates yet never lands in argv-visible
places: logs, outputs, the mirror's config or the work tree's config.
"""
from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.checkout import CheckoutStage, mirror_key, normalize_url, parse_symref
from runner.errors import Cancelled, InvalidInput, StageFailed
from runner.model import Image, Pipeline, Repository
from runner.run_request import RunRequest
from runner.stage import StageContext
from tests.doubles import DictSecrets

GIT_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "LC_ALL": "C",
}


def git(*args: str, cwd: Path | None = None) -> str:
    argv = ["git", "-c", "protocol.file.allow=always", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(argv, cwd=cwd, env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def info(self, text: str) -> None:
        self.lines.append("INFO " + text)

    def warn(self, text: str) -> None:
        self.lines.append("WARN " + text)


class Origin:
    """A bare repository plus a work clone that commits and pushes to it."""

    def __init__(self, root: Path, name: str = "origin") -> None:
        self.bare = root / f"{name}.git"
        self.work = root / f"{name}-work"
        git("init", "-q", "--bare", str(self.bare))
        git("init", "-q", str(self.work))
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    def commit(self, name: str, content: str = "", branch: str = "main") -> str:
        if branch != self.branch():
            git("checkout", "-q", "-B", branch, cwd=self.work)
        (self.work / name).write_text(content or name)
        git("add", name, cwd=self.work)
        git("commit", "-q", "-m", f"add {name}", cwd=self.work)
        git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def branch(self) -> str:
        return git("symbolic-ref", "--short", "HEAD", cwd=self.work)

    def tag(self, name: str, annotated: bool = True) -> None:
        git("tag", *(["-a", "-m", name] if annotated else []), name, cwd=self.work)
        git("push", "-q", "origin", f"refs/tags/{name}", cwd=self.work)


@pytest.fixture(scope="module")
def _origin_template(tmp_path_factory) -> Origin:
    o = Origin(tmp_path_factory.mktemp("template"))
    o.first = o.commit("a.txt")
    o.second = o.commit("b.txt")
    return o


@pytest.fixture
def origin(tmp_path: Path, _origin_template: Origin) -> Origin:
    """A bare repository with two commits on main (a copy of one made per module: faster)."""
    o = Origin.__new__(Origin)
    o.bare, o.work = tmp_path / "origin.git", tmp_path / "origin-work"
    shutil.copytree(_origin_template.bare, o.bare, symlinks=True)
    shutil.copytree(_origin_template.work, o.work, symlinks=True)
    git("remote", "set-url", "origin", str(o.bare), cwd=o.work)
    o.first, o.second = _origin_template.first, _origin_template.second
    return o


def make_ctx(tmp_path: Path, url: str, run: str = "r1", request: dict | None = None,
             secrets: dict | None = None, **repo) -> StageContext:
    pipeline = Pipeline(name="app", repository=Repository(url=url, **repo),
                        image=Image(name="registry.example/app"))
    return StageContext(run_id=run, pipeline=pipeline, workdir=tmp_path / "runs" / run,
                        cache_dir=tmp_path / "cache", log=Log(), secrets=DictSecrets(secrets),
                        cancel=threading.Event(), request=RunRequest(**(request or {})))


def run(tmp_path: Path, url: str, **kw) -> tuple[dict, StageContext]:
    """The stage's outputs as the run records them, and its context."""
    ctx = make_ctx(tmp_path, url, **kw)
    return CheckoutStage().run(ctx).to_dict(), ctx


# --- first run, later runs --------------------------------------------------------------------

def test_first_run_clones_then_later_runs_only_fetch(tmp_path, origin):
    out, ctx = run(tmp_path, str(origin.bare), run="r1")
    assert out["cloned"] is True
    assert out["commit"] == origin.second and out["short_sha"] == origin.second[:7]
    assert out["branch"] == "main" and out["tag"] is None
    assert out["url"] == str(origin.bare)
    src = Path(out["path"])
    assert src == ctx.workdir / "src"
    assert (src / "a.txt").read_text() == "a.txt" and (src / "b.txt").exists()
    assert git("rev-parse", "HEAD", cwd=src) == origin.second
    mirror = Path(out["mirror"])
    assert mirror.parent == tmp_path / "cache" / "git"
    assert mirror.name == mirror_key(str(origin.bare))
    assert git("rev-parse", "--is-bare-repository", cwd=mirror) == "true"
    assert any("cloning" in line for line in ctx.log.lines)

    third = origin.commit("c.txt")
    out2, ctx2 = run(tmp_path, str(origin.bare), run="r2")
    assert out2["cloned"] is False
    assert out2["mirror"] == out["mirror"]
    assert out2["commit"] == third
    assert (Path(out2["path"]) / "c.txt").exists()
    assert not any("cloning" in line for line in ctx2.log.lines)
    assert any("fetching" in line for line in ctx2.log.lines)
    # Each run has its own work tree: the first one is untouched.
    assert not (src / "c.txt").exists()


def test_work_tree_is_detached_and_borrows_objects(tmp_path, origin):
    out, _ = run(tmp_path, str(origin.bare))
    src = Path(out["path"])
    assert subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=src,
                          capture_output=True).returncode == 1  # detached
    alternates = (src / ".git" / "objects" / "info" / "alternates").read_text()
    assert out["mirror"] in alternates
    assert git("config", "remote.origin.url", cwd=src) == str(origin.bare)


def test_file_url_and_plain_path_share_one_mirror(tmp_path, origin):
    out1, _ = run(tmp_path, str(origin.bare), run="r1")
    out2, _ = run(tmp_path, f"file://{origin.bare}", run="r2")
    assert out2["mirror"] == out1["mirror"] and out2["cloned"] is False
    assert out2["url"] == f"file://{origin.bare}"
    assert normalize_url(f"file://{origin.bare}/") == normalize_url(str(origin.bare))


# --- which commit -----------------------------------------------------------------------------

def test_checkout_branch(tmp_path, origin):
    feature = origin.commit("f.txt", branch="feature/x")
    out, _ = run(tmp_path, str(origin.bare), ref="feature/x")
    assert out["commit"] == feature and out["branch"] == "feature/x" and out["tag"] is None
    assert (Path(out["path"]) / "f.txt").exists()


def test_checkout_tag(tmp_path, origin):
    git("checkout", "-q", origin.first, cwd=origin.work)
    origin.tag("v1.0.0")
    out, _ = run(tmp_path, str(origin.bare), ref="v1.0.0")
    assert out["commit"] == origin.first  # the commit, not the annotated tag object
    assert out["tag"] == "v1.0.0" and out["branch"] is None
    assert not (Path(out["path"]) / "b.txt").exists()


@pytest.mark.parametrize("annotated", [True, False])
def test_a_branch_build_of_a_tagged_commit_has_no_tag(tmp_path, origin, annotated):
    """{tag} is the tag being built: a branch build of the release's commit must not push (and
    move) the release's image tag. The tag build of that commit has it."""
    origin.tag("v2", annotated=annotated)
    templates = ["{short_sha}", "{branch}", "{tag}"]
    out, tags = _latest_tags(tmp_path, str(origin.bare), "r1", templates, ref="main")
    assert out["branch"] == "main" and out["tag"] is None
    assert tags == [origin.second[:7], "main"]
    out, tags = _latest_tags(tmp_path, str(origin.bare), "r2", templates, request={
        "kind": "push", "ref": "refs/heads/main", "branch": "main", "commit": origin.second})
    assert out["tag"] is None and tags == [origin.second[:7], "main"]
    out, tags = _latest_tags(tmp_path, str(origin.bare), "r3", templates, ref="v2")
    assert out["tag"] == "v2" and tags == [origin.second[:7], "v2"]


def test_a_tag_object_given_as_the_commit_is_peeled(tmp_path, origin):
    """A forge that reports an annotated tag's object as the pushed commit: the checkout builds,
    and reports, the commit the tag points at (the daemon records that as the run's commit)."""
    origin.tag("v4")
    tag_object = git("rev-parse", "refs/tags/v4", cwd=origin.work)
    assert tag_object != origin.second
    out, _ = run(tmp_path, str(origin.bare), request={
        "kind": "push", "ref": "refs/tags/v4", "tag": "v4", "commit": tag_object})
    assert out["commit"] == origin.second and out["tag"] == "v4"


def _latest_tags(tmp_path: Path, url: str, run_id: str, tags: list[str], **kw) -> tuple[dict, list]:
    """The checkout's outputs with these tag templates, and the tags the build computes from
    them (pipelines/build.py: GitInfo from the outputs, then compute_tags)."""
    from runner.tags import GitInfo, compute_tags

    ctx = make_ctx(tmp_path, url, run=run_id, **kw)
    ctx = StageContext(**{**ctx.__dict__, "pipeline": ctx.pipeline.model_copy(
        update={"image": Image(name="registry.example/app", tags=tags)})})
    out = CheckoutStage().run(ctx)
    return out.to_dict(), compute_tags(tags, GitInfo(out.commit, out.branch, out.tag,
                                                     out.default_branch), run_id)


def test_latest_is_given_on_the_default_branch_only(tmp_path, origin):
    # No ref: the remote's HEAD chose the branch, and names the default.
    out, tags = _latest_tags(tmp_path, str(origin.bare), "r1", ["{latest}", "{short_sha}"])
    assert out["default_branch"] == "main" and tags == ["latest", origin.second[:7]]
    # A ref, and a template that needs the default: asked of the remote.
    out, tags = _latest_tags(tmp_path, str(origin.bare), "r2", ["{latest}", "x"], ref="main")
    assert out["default_branch"] == "main" and tags == ["latest", "x"]
    origin.commit("f.txt", branch="feature/x")
    out, tags = _latest_tags(tmp_path, str(origin.bare), "r3", ["{latest}", "x"],
                             ref="feature/x")
    assert out["default_branch"] == "main" and tags == ["x"]
    # No template needs it and the ref chose the branch: the remote is not asked.
    out, _ = _latest_tags(tmp_path, str(origin.bare), "r4", ["x"], ref="main")
    assert out["default_branch"] is None
    # The webhook said it (GitHub's repository.default_branch): believed, not asked.
    out, tags = _latest_tags(tmp_path, str(origin.bare), "r5", ["{latest}", "x"],
                             ref="feature/x", request={"kind": "push",
                                                       "default_branch": "feature/x"})
    assert out["default_branch"] == "feature/x" and tags == ["latest", "x"]


@pytest.mark.parametrize("length", [40, 7])
def test_checkout_sha(tmp_path, origin, length):
    out, _ = run(tmp_path, str(origin.bare), ref=origin.first[:length])
    assert out["commit"] == origin.first and out["branch"] is None
    assert not (Path(out["path"]) / "b.txt").exists()


def test_trigger_commit_wins_over_pipeline_ref(tmp_path, origin):
    out, _ = run(tmp_path, str(origin.bare), ref="main",
                 request={"kind": "push", "ref": "refs/heads/main", "commit": origin.first})
    assert out["commit"] == origin.first and out["branch"] == "main"


def test_trigger_ref_used_when_the_pipeline_has_none(tmp_path, origin):
    feature = origin.commit("f.txt", branch="feature")
    out, _ = run(tmp_path, str(origin.bare),
                 request={"kind": "manual", "ref": "refs/heads/feature", "branch": "feature"})
    assert out["commit"] == feature and out["branch"] == "feature"


def test_pipeline_ref_beats_a_trigger_ref_without_commit(tmp_path, origin):
    """`runner exec --event e.json --ref main`: the engine drops the event's commit and sets
    repository.ref; the event's ref must not win then."""
    origin.commit("f.txt", branch="feature")
    out, _ = run(tmp_path, str(origin.bare), ref="main",
                 request={"kind": "push", "ref": "refs/heads/feature", "branch": "feature"})
    assert out["commit"] == origin.second and out["branch"] == "main"


def test_a_tag_push_request(tmp_path, origin):
    """What the daemon hands `runner exec` for a tag push (runner.run_request)."""
    origin.tag("v3")
    out, _ = run(tmp_path, str(origin.bare), request={
        "kind": "tag", "provider": "github", "ref": "refs/tags/v3", "tag": "v3", "commit": origin.second})
    assert out["commit"] == origin.second and out["tag"] == "v3" and out["branch"] is None


def test_default_branch_is_the_remotes_head(tmp_path, origin):
    trunk = origin.commit("t.txt", branch="trunk")
    git("symbolic-ref", "HEAD", "refs/heads/trunk", cwd=origin.bare)
    out, _ = run(tmp_path, str(origin.bare))
    assert out["commit"] == trunk and out["branch"] == "trunk"


def test_unknown_ref_fails_naming_it(tmp_path, origin):
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, str(origin.bare), ref="no-such-branch")
    assert exc.value.stage == "checkout"
    assert "'no-such-branch' not found" in exc.value.reason


def test_unknown_commit_fails(tmp_path, origin):
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, str(origin.bare), request={"commit": "0" * 40})
    assert "0" * 40 in exc.value.reason


def test_missing_repository_fails_clearly(tmp_path):
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, str(tmp_path / "nope.git"))
    assert "nope.git" in exc.value.reason and "does not exist" in exc.value.reason


def test_not_a_repository_fails_clearly_and_leaves_no_mirror(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, str(tmp_path / "plain"))
    assert "fetch from" in exc.value.reason
    assert "does not appear to be a git repository" in exc.value.reason
    assert list((tmp_path / "cache" / "git").iterdir()) == [
        tmp_path / "cache" / "git" / f"{mirror_key(str(tmp_path / 'plain'))}.lock"]


def test_unreachable_remote_fails_clearly(tmp_path):
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, "http://127.0.0.1:9/repo.git")  # discard port: nothing listens
    assert "fetch from http://127.0.0.1:9/repo.git failed" in exc.value.reason


def test_concurrent_runs_share_the_mirror_safely(tmp_path, origin):
    results, errors = {}, []

    def one(name):
        try:
            results[name] = run(tmp_path, str(origin.bare), run=name)[0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(f"r{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r["cloned"] for r in results.values()) == [False, False, True]
    assert {r["commit"] for r in results.values()} == {origin.second}


# --- refused before anything runs -------------------------------------------------------------

def test_ext_url_refused_and_nothing_runs(tmp_path):
    pwned = tmp_path / "pwned"
    url = f"ext::sh -c touch% {pwned}"
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, url)
    assert "remote helper" in exc.value.reason
    assert not pwned.exists()
    assert not (tmp_path / "cache").exists()
    with pytest.raises(InvalidInput):
        CheckoutStage().plan(make_ctx(tmp_path, url).pipeline)


@pytest.mark.parametrize("url", ["--upload-pack=touch {x}", "-u touch {x}",
                                 "--config=core.sshCommand=touch {x}"])
def test_option_like_url_refused(tmp_path, url):
    marker = tmp_path / "x"
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, url.format(x=marker))
    assert "option" in exc.value.reason
    assert not marker.exists()


@pytest.mark.parametrize("ref", ['zzz";echo${IFS}"hello";#', "--upload-pack=touch /tmp/x",
                                 "main..other", "-o"])
def test_unsafe_ref_refused_before_git_runs(tmp_path, origin, ref):
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, str(origin.bare), ref=ref)
    assert "refused" in exc.value.reason
    assert not (tmp_path / "cache").exists()


def test_unsafe_request_values_never_reach_the_stage():
    """The request is checked where it is made (runner.run_request): a context cannot carry these."""
    for bad in ({"commit": "--upload-pack=x"}, {"commit": "main"}, {"ref": "a;b"}):  # a commit is a sha
        with pytest.raises(ValidationError):
            RunRequest(**bad)


# --- depth, submodules --------------------------------------------------------------------------

def test_shallow_depth_one(tmp_path, origin):
    out, _ = run(tmp_path, f"file://{origin.bare}", depth=1)
    src = Path(out["path"])
    assert out["commit"] == origin.second
    assert git("rev-list", "--count", "HEAD", cwd=src) == "1"
    assert (Path(out["mirror"]) / "shallow").exists()
    # A later run without depth deepens the mirror again.
    out2, _ = run(tmp_path, f"file://{origin.bare}", run="r2")
    assert git("rev-list", "--count", "HEAD", cwd=Path(out2["path"])) == "2"


def test_submodules_initialised_when_asked(tmp_path):
    lib = Origin(tmp_path, "lib")
    lib.commit("lib.txt", "library")
    app = Origin(tmp_path, "app")
    app.commit("app.txt")
    git("submodule", "add", "-q", str(lib.bare), "vendor/lib", cwd=app.work)
    git("commit", "-q", "-m", "add submodule", cwd=app.work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=app.work)

    out, _ = run(tmp_path, str(app.bare), run="r1")
    assert not (Path(out["path"]) / "vendor" / "lib" / "lib.txt").exists()
    out, _ = run(tmp_path, str(app.bare), run="r2", submodules=True)
    assert (Path(out["path"]) / "vendor" / "lib" / "lib.txt").read_text() == "library"


# --- cancellation -------------------------------------------------------------------------------

def test_cancelled_before_start(tmp_path, origin):
    ctx = make_ctx(tmp_path, str(origin.bare))
    ctx.cancel.set()
    with pytest.raises(Cancelled):
        CheckoutStage().run(ctx)


def test_plan_is_plain_data_without_credentials(tmp_path):
    ctx = make_ctx(tmp_path, "https://user:hunter2@git.example/o/r.git", ref="main", depth=5,
                   submodules=True)
    assert CheckoutStage().plan(ctx.pipeline) == {
        "url": "https://git.example/o/r.git", "ref": "main", "depth": 5, "submodules": True}


def test_parse_symref():
    out = "ref: refs/heads/trunk\tHEAD\n" + "a" * 40 + "\tHEAD\n"
    assert parse_symref(out) == "refs/heads/trunk"
    assert parse_symref("a" * 40 + "\tHEAD\n") is None


# --- credentials over HTTP --------------------------------------------------------------------

TOKEN = "tok-3f9a1c77e2b54d08a6"


class _GitHTTP(BaseHTTPRequestHandler):
    """CGI wrapper: Basic auth, then `git http-backend` with the request as CGI variables."""

    root: Path
    user = "x-access-token"
    seen_auth: list[str]

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    delay = 0.0

    def _serve(self) -> None:
        time.sleep(self.delay)
        auth = self.headers.get("Authorization", "")
        self.seen_auth.append(auth)
        want = "Basic " + base64.b64encode(f"{self.user}:{TOKEN}".encode()).decode()
        if auth != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1", "REQUEST_METHOD": self.command, "PATH_INFO": path,
            "QUERY_STRING": query, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": self.user, "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        proc = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True)
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve


@pytest.fixture
def http_origin(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    o = Origin(served, "repo")
    o.first = o.commit("a.txt")
    handler = type("Handler", (_GitHTTP,), {"root": served, "seen_auth": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    o.url = f"http://127.0.0.1:{server.server_address[1]}/repo.git"
    o.handler = handler
    try:
        yield o
    finally:
        server.shutdown()
        server.server_close()


def _everything_written(tmp_path: Path) -> str:
    texts = []
    for path in tmp_path.rglob("*"):
        if path.is_file() and "served" not in path.parts:
            texts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(texts)


def test_token_over_http_never_leaks(tmp_path, http_origin):
    out, ctx = run(tmp_path, http_origin.url, token="repo_token",
                   secrets={"repo_token": TOKEN})
    assert out["commit"] == http_origin.first and out["cloned"] is True
    assert any(a.startswith("Basic ") for a in http_origin.handler.seen_auth)  # token was used
    assert TOKEN not in repr(out)
    assert not any(TOKEN in line for line in ctx.log.lines)
    mirror_config = (Path(out["mirror"]) / "config").read_text()
    assert http_origin.url in mirror_config and TOKEN not in mirror_config
    assert TOKEN not in (Path(out["path"]) / ".git" / "config").read_text()
    assert TOKEN not in _everything_written(tmp_path)  # cache, run dir, work tree
    # The askpass helper is gone once the stage is done.
    assert not list(ctx.workdir.glob(".git-askpass*"))
    # A second run fetches with the token again.
    out2, _ = run(tmp_path, http_origin.url, run="r2", token="repo_token",
                  secrets={"repo_token": TOKEN})
    assert out2["cloned"] is False


def test_token_in_url_is_stripped_from_everything(tmp_path, http_origin):
    url = http_origin.url.replace("http://", f"http://x-access-token:{TOKEN}@")
    out, ctx = run(tmp_path, url)
    assert out["url"] == http_origin.url
    assert TOKEN not in repr(out) and not any(TOKEN in line for line in ctx.log.lines)
    assert TOKEN not in _everything_written(tmp_path)


def test_missing_token_fails_fast_without_prompting(tmp_path, http_origin):
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, http_origin.url)
    assert "credentials" in exc.value.reason


def test_wrong_token_fails_and_is_masked(tmp_path, http_origin):
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, http_origin.url, token="t", secrets={"t": "wrong-token-value-123"})
    assert "wrong-token-value-123" not in str(exc.value)


def test_ssh_key_file_is_private_and_removed(tmp_path, origin, monkeypatch):
    """The key goes to a 0600 file in the 0700 run directory, named in GIT_SSH_COMMAND, and is
    deleted afterwards.
    (No SSH server here: the repository is local, the key file's life cycle is what is tested.)"""
    from pipelines import checkout as mod

    seen = {}
    real = mod.run_command

    def spy(argv, **kw):
        env = kw.get("env") or {}
        if "GIT_SSH_COMMAND" in env and "-i" in env["GIT_SSH_COMMAND"]:
            key = env["GIT_SSH_COMMAND"].split("-i ", 1)[1].split(" ", 1)[0]
            seen["cmd"] = env["GIT_SSH_COMMAND"]
            seen["mode"] = stat.S_IMODE(os.stat(key).st_mode)
            seen["dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(key)).st_mode)
            seen["path"] = key
        return real(argv, **kw)

    monkeypatch.setattr(mod, "run_command", spy)
    out, ctx = run(tmp_path, str(origin.bare), ssh_key="deploy_key",
                   secrets={"deploy_key": "-----BEGIN KEY-----\nAAAA\n-----END KEY-----"})
    assert "IdentitiesOnly=yes" in seen["cmd"] and seen["mode"] == 0o600
    assert seen["dir_mode"] == 0o700  # the run directory: nobody else even lists it
    assert not Path(seen["path"]).exists()
    assert out["commit"] == origin.second


def test_askpass_answers_only_for_the_repository_host(tmp_path):
    from runner.gitaccess import ASKPASS

    script = tmp_path / "askpass"
    script.write_text(ASKPASS)
    script.chmod(0o700)
    env = {"PATH": os.environ["PATH"], "RUNNER_GIT_HOST": "git.example:8443",
           "RUNNER_GIT_USERNAME": "bot", "RUNNER_GIT_PASSWORD": TOKEN}

    def ask(prompt):
        return subprocess.run([str(script), prompt], env=env, capture_output=True, text=True)

    assert ask("Username for 'https://git.example:8443': ").stdout == "bot\n"
    assert ask("Password for 'https://bot@git.example:8443': ").stdout == TOKEN + "\n"
    for other in ("Password for 'https://bot@evil.example': ",
                  "Password for 'https://git.example': ",
                  "Password for 'https://git.example:8443.evil.example': "):
        res = ask(other)
        assert res.returncode != 0 and TOKEN not in res.stdout


def test_remote_repository_cannot_pull_local_submodules(tmp_path, http_origin):
    """A .gitmodules in a remote repository pointing at a local path is refused (the file
    transport is allowed only when the repository itself is local: CVE-2022-39253)."""
    secret = Origin(tmp_path, "private")
    secret.commit("secret.txt", "do not leak")
    git("submodule", "add", "-q", str(secret.bare), "leak", cwd=http_origin.work)
    git("commit", "-q", "-m", "add submodule", cwd=http_origin.work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=http_origin.work)
    with pytest.raises(StageFailed) as exc:
        run(tmp_path, http_origin.url, token="t", secrets={"t": TOKEN}, submodules=True)
    assert "submodule update failed" in exc.value.reason
    assert "transport 'file' not allowed" in exc.value.reason
    assert not (tmp_path / "runs" / "r1" / "src" / "leak" / "secret.txt").exists()


def test_waiting_for_the_mirror_lock_honours_cancel(tmp_path, origin):
    import fcntl

    ctx = make_ctx(tmp_path, str(origin.bare))
    lock = tmp_path / "cache" / "git" / f"{mirror_key(str(origin.bare))}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        threading.Timer(0.3, ctx.cancel.set).start()
        with pytest.raises(Cancelled):
            CheckoutStage().run(ctx)
    assert any("waiting for another run" in line for line in ctx.log.lines)


def test_broken_mirror_is_replaced(tmp_path, origin):
    mirror = tmp_path / "cache" / "git" / mirror_key(str(origin.bare))
    mirror.mkdir(parents=True)
    (mirror / "junk").write_text("half a clone")
    out, ctx = run(tmp_path, str(origin.bare))
    assert out["cloned"] is True and out["commit"] == origin.second
    assert not (mirror / "junk").exists()


def test_rerun_in_the_same_run_dir_replaces_the_work_tree(tmp_path, origin):
    out, _ = run(tmp_path, str(origin.bare), ref=origin.first)
    (Path(out["path"]) / "stale.txt").write_text("x")
    out2, _ = run(tmp_path, str(origin.bare), ref="main")
    assert out2["path"] == out["path"] and out2["commit"] == origin.second
    assert not (Path(out2["path"]) / "stale.txt").exists()


def test_shallow_mirror_fetches_an_older_trigger_commit_by_id(tmp_path, origin):
    run(tmp_path, f"file://{origin.bare}", run="r1", depth=1)
    out, ctx = run(tmp_path, f"file://{origin.bare}", run="r2", depth=1,
                   request={"kind": "push", "ref": "refs/heads/main", "commit": origin.first})
    assert out["commit"] == origin.first and out["branch"] == "main"
    assert any("fetching it by id" in line for line in ctx.log.lines)
    assert git("rev-list", "--count", "HEAD", cwd=Path(out["path"])) == "1"


def test_cancel_during_fetch_stops_git_and_cleans_up(tmp_path, http_origin):
    http_origin.handler.delay = 8.0  # far longer than the cancel takes: the bound below tells
    # "git was stopped" from "git ran to the end", with room for a loaded machine
    ctx = make_ctx(tmp_path, http_origin.url, token="t", secrets={"t": TOKEN})
    threading.Timer(0.3, ctx.cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        CheckoutStage().run(ctx)
    assert time.monotonic() - started < 6
    assert [p.name for p in (tmp_path / "cache" / "git").iterdir()] == [
        f"{mirror_key(http_origin.url)}.lock"]  # no half-made mirror left behind
    assert not list(ctx.workdir.glob(".git-askpass*"))
