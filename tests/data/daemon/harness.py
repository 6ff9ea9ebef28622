"""Helpers shared by tests/*/test_daemon*.py and tests/unit/test_webhooks.py: a daemon on 127.0.0.1 with
an ephemeral port (in-process here; as a subprocess with runner.daemon.spawn.daemon_subprocess),
signing, real git repositories."""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
FAKE_EXEC = [sys.executable, str(HERE / "fake_exec.py")]
SECRET = "s3cret-for-tests"
TOKEN = "api-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # reading the API needs it too (read_requires_token)


def fake_pipeline(tmp: Path, name: str = "fake", sleep: float = 0.05, fail: str | None = None,
                  stages=("checkout", "build")) -> Path:
    p = tmp / f"{name}.json"
    p.write_text(json.dumps({"name": name, "stages": list(stages), "sleep": sleep, "fail": fail}))
    return p


def config(tmp: Path, pipelines: list[dict], **over) -> dict:
    cfg = {
        "name": "test",
        "listen": {"host": "127.0.0.1", "port": 0},
        "data_dir": str(tmp / "data"),
        "concurrency": 2,
        "api_token": {"value": TOKEN},
        "webhooks": {p: {"secret": {"value": SECRET}} for p in ("github", "gitea", "gitlab", "generic")},
        "exec_command": FAKE_EXEC,
        "lease_seconds": 3,
        "grace_period": 5,
        "pipelines": pipelines,
    }
    cfg.update(over)
    return cfg


@contextlib.contextmanager
def daemon_in_process(cfg: dict):
    from runner.daemon.config import config_from_dict
    from runner.daemon.service import Daemon

    d = Daemon(config_from_dict(cfg))
    d.start()
    try:
        yield d
    finally:
        d.stop(grace=2)


def api_get(url: str, path: str, **params) -> httpx.Response:
    """GET the daemon's API with the token."""
    return httpx.get(f"{url}{path}", params=params, headers=AUTH, timeout=5)


@contextlib.contextmanager
def fake_forge(credential: str = "Authorization"):
    """A forge's status API on 127.0.0.1: yields (its base URL, the POSTs it got as
    [(path, the `credential` header (GitLab's: PRIVATE-TOKEN), JSON body)]), answering each 201."""
    seen: list[tuple[str, str | None, dict]] = []

    class Forge(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append((self.path, self.headers[credential],
                         json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(201)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()


def wait_for(pred, timeout: float, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def github_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def push_payload(repo_url: str, ref: str = "refs/heads/main", after: str = "a" * 40,
                 before: str = "0" * 40, deleted: bool = False) -> dict:
    return {"ref": ref, "before": before, "after": after, "created": False, "deleted": deleted,
            "forced": False,
            "repository": {"name": "app", "full_name": "me/app", "clone_url": repo_url, "html_url": repo_url},
            "pusher": {"name": "me", "email": "me@example.com"}, "sender": {"login": "me"},
            "head_commit": None if deleted else {"id": after, "message": "change"}}


def send_github(url: str, payload: dict | bytes, delivery: str, secret: str = SECRET, event: str = "push",
                query: str = "", client: httpx.Client | None = None) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
               "X-Hub-Signature-256": github_signature(secret, body)}
    c = client or httpx
    return c.post(f"{url}/hooks/github{query}", content=body, headers=headers, timeout=10)


def git(*args, cwd=None) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def bare_repo(tmp: Path) -> tuple[Path, Path]:
    """A bare repository with one commit on main, and a work clone to push more from."""
    bare = tmp / "repo.git"
    work = tmp / "work"
    git("init", "--bare", "-b", "main", str(bare))
    git("clone", str(bare), str(work))
    git("checkout", "-b", "main", cwd=work)
    commit(work, "first")
    return bare, work


def commit(work: Path, message: str, branch: str = "main") -> str:
    (work / "file.txt").write_text(message + "\n")
    git("add", "file.txt", cwd=work)
    git("commit", "-m", message, cwd=work)
    git("push", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
    return git("rev-parse", "HEAD", cwd=work)
