"""Regenerate the reports in this folder from real runs of the installed Trivy and hadolint.

    python tests/data/trivy/capture.py            # filesystem reports + hadolint
    python tests/data/trivy/capture.py --images   # also image reports (needs DOCKER_HOST set to
                                                  # an engine holding local/busybox:1)

Everything runs offline (no DB, no check bundle). The secrets are generated here, thrown away
after the run, and Trivy masks them in its report.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import string
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from pipelines.scan import find_tool, hadolint_argv, trivy_argv  # noqa: E402

ROOT_DOCKERFILE = 'FROM local/busybox:1\nCOPY . /app\nCMD ["/bin/sh", "/app/app.sh"]\n'
CLEAN_DOCKERFILE = (
    "FROM local/busybox:1\nCOPY app.sh /app/app.sh\nUSER 1000:1000\n"
    'HEALTHCHECK CMD ["/bin/true"]\nCMD ["/bin/sh", "/app/app.sh"]\n'
)
LINT_DOCKERFILE = (
    "FROM local/busybox:latest\nRUN cd /tmp && wget http://example.invalid/x\n"
    "ADD app.sh /app.sh\nCMD /bin/sh /app.sh\n"
)


def private_key(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    path.with_suffix(".pub").unlink(missing_ok=True)


def aws_credentials(path: Path) -> None:
    key_id = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567")
                              for _ in range(16))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits + "+/")
                     for _ in range(40))
    path.write_text(f"[default]\naws_access_key_id = {key_id}\n"
                    f"aws_secret_access_key = {secret}\n")


def make_context(root: Path, dockerfile: str, leak: bool) -> Path:
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(dockerfile)
    (root / "app.sh").write_text("echo hello\n")
    if leak:
        private_key(root / "id_ed25519")
        (root / ".aws").mkdir()
        aws_credentials(root / ".aws" / "credentials")
    return root


def trivy(kind: str, subject: str, scanners: str, out: Path, cache: Path) -> None:
    exe = find_tool("trivy", None)
    argv = trivy_argv(exe, kind, subject, scanners=tuple(scanners.split(",")),
                      cache_dir=str(cache), output=str(out))
    subprocess.run(argv, check=True, capture_output=True)
    # The temporary folder's name changes on every capture: one fixed name instead.
    text = out.read_text().replace(str(cache.parent), "/tmp/capture")
    out.write_text(json.dumps(json.loads(text), indent=2) + "\n")
    print("wrote", out.relative_to(ROOT))


def docker_build(context: Path, tag: str) -> None:
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    subprocess.run(["/usr/bin/docker", "build", "-q", "-t", tag, str(context)], check=True,
                   env=env, capture_output=True)


def docker_save(tag: str, out: Path) -> None:
    subprocess.run(["/usr/bin/docker", "save", "-o", str(out), tag], check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cache = t / "cache"
        leaky = make_context(t / "leaky", ROOT_DOCKERFILE, leak=True)
        clean = make_context(t / "clean", CLEAN_DOCKERFILE, leak=False)
        trivy("fs", str(leaky), "secret,misconfig", HERE / "fs-leaky.json", cache)
        trivy("fs", str(clean), "secret,misconfig", HERE / "fs-clean.json", cache)
        lint = t / "lint"
        lint.mkdir()
        (lint / "Dockerfile").write_text(LINT_DOCKERFILE)
        out = HERE / "hadolint-lint.json"
        subprocess.run(hadolint_argv(find_tool("hadolint", None), str(lint / "Dockerfile"),
                                     str(out)), check=True)
        out.write_text(out.read_text().replace(str(t), "/tmp/capture"))
        print("wrote", out.relative_to(ROOT))
        if args.images:
            docker_build(leaky, "runner-test/scan-leaky:capture")
            docker_build(clean, "runner-test/scan-clean:capture")
            for name in ("leaky", "clean"):
                tar = t / f"{name}.tar"
                docker_save(f"runner-test/scan-{name}:capture", tar)
                trivy("image", str(tar), "secret,misconfig", HERE / f"image-{name}.json", cache)
            subprocess.run(["/usr/bin/docker", "rmi", "runner-test/scan-leaky:capture",
                            "runner-test/scan-clean:capture"], capture_output=True)


if __name__ == "__main__":
    main()
