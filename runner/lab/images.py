"""Base images made locally (nothing can be pulled here): local/busybox:1 from the host's
busybox-static, local/python:3.11 from a debootstrapped bookworm rootfs (cached as a tarball in
the state dir, so it is made once per machine)."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from runner.lab import host, layout
from runner.lab.errors import LabError

BUSYBOX = Path("/bin/busybox")


def docker_cli() -> str:
    cli = shutil.which("docker") or "/usr/bin/docker"
    if not Path(cli).exists():
        raise LabError("no docker CLI found (Debian package docker.io provides /usr/bin/docker)")
    return cli


def busybox_tar(busybox: Path = BUSYBOX) -> bytes:
    """A rootfs tar: the static busybox binary, a symlink per applet, and the few files a shell
    and httpd expect."""
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys",
                  "dev", "var", "var/www", "home", "run"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets:
            if applet == "bin/busybox" or "/" not in applet:
                continue
            link = tarfile.TarInfo(applet)
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
            tar.addfile(link)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                               b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("etc/hosts", b"127.0.0.1 localhost\n")
    return buf.getvalue()


def ensure_busybox(log: host.Log) -> None:
    if host.image_exists(layout.BUILD_SOCK, layout.BUSYBOX_IMAGE):
        return
    log(f"importing {layout.BUSYBOX_IMAGE} from {BUSYBOX}")
    host.run(layout.docker_import_argv(docker_cli(), layout.BUSYBOX_IMAGE, "-"),
             stdin=busybox_tar())


def debian_mirror() -> str:
    sources: dict[str, str] = {}
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.is_file() and path.suffix in ("", ".list", ".sources"):
            try:
                sources[path.name] = path.read_text()
            except OSError:
                continue
    mirror = layout.apt_mirror(sources)
    if mirror is None:
        raise LabError("found no bookworm mirror in /etc/apt/sources.list*; "
                       "debootstrap needs the Debian mirror apt uses")
    return mirror


def ensure_python_rootfs(state: Path, log: host.Log) -> Path:
    """The cached rootfs tarball, made with debootstrap if it is not there yet (~1 minute)."""
    cache = layout.python_rootfs_cache(state)
    if cache.exists():
        return cache
    if not layout.HOST_CA_BUNDLE.exists():
        raise LabError(f"{layout.HOST_CA_BUNDLE} is missing (package ca-certificates)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    root = cache.parent / "python-rootfs"
    if root.exists():
        shutil.rmtree(root)  # a half-made rootfs from an interrupted run
    mirror = debian_mirror()
    log(f"debootstrap {layout.DEBIAN_SUITE} from {mirror} for {layout.PYTHON_IMAGE} (about a minute, once)")
    started = time.monotonic()
    debootstrap_log = cache.parent / "debootstrap.log"
    with open(debootstrap_log, "wb") as out:
        proc = subprocess.run(layout.debootstrap_argv(root, mirror), stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise LabError(f"debootstrap failed (exit {proc.returncode}); {debootstrap_log}:\n"
                       f"{host.log_tail(debootstrap_log)}")
    # The outbound TLS proxy re-signs certificates: trust exactly what this host trusts.
    shutil.copyfile(layout.HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
    # A base image is for `pip install` in a Dockerfile, as in the official python images.
    for marker in (root / "usr/lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()
    partial = cache.with_suffix(".partial")
    host.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], timeout=300)
    partial.rename(cache)
    shutil.rmtree(root)
    log(f"python rootfs cached at {cache} ({time.monotonic() - started:.0f}s)")
    return cache


def ensure_python(state: Path, log: host.Log) -> None:
    if host.image_exists(layout.BUILD_SOCK, layout.PYTHON_IMAGE):
        return
    tarball = ensure_python_rootfs(state, log)
    log(f"importing {layout.PYTHON_IMAGE}")
    docker = docker_cli()
    host.run(layout.docker_import_argv(docker, layout.PYTHON_IMAGE, str(tarball)), timeout=600)
    check = host.run([docker, "-H", layout.BUILD_DOCKER_HOST, "run", "--rm", "--network", "none",
                      layout.PYTHON_IMAGE, "python3", "-c", "import ssl, venv; print(ssl.OPENSSL_VERSION)"],
                     check=False, timeout=120)
    if check.returncode != 0:
        host.run([docker, "-H", layout.BUILD_DOCKER_HOST, "rmi", layout.PYTHON_IMAGE], check=False)
        raise LabError(f"{layout.PYTHON_IMAGE} does not run python3 with ssl: "
                       f"{(check.stdout + check.stderr).decode(errors='replace')}")
