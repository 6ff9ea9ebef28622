"""Base images made locally (nothing can be pulled here): local/busybox:1 from the host's
busybox-static, local/python:3.11 from a debootstrapped bookworm rootfs (cached as a tarball in
the state dir, so it is made once per machine), and the servers' reverse proxy image
<registry>/runner/caddy:2 (Debian's caddy binary on local/python:3.11, pushed to the registry)."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from runner_lab import host, layout
from runner_lab.errors import LabError

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


# ---- the reverse proxy image (caddy) ----------------------------------------------------------

def buildkit_docker_cli() -> str:
    cli = layout.BUILDKIT_DOCKER_CLI
    if not Path(cli).exists():
        raise LabError(f"{cli} is missing: the proxy image is built with Debian's docker CLI "
                       "(package docker.io), whose built-in BuildKit works with DOCKER_BUILDKIT=1")
    return cli


def _download_deb(cache: Path, package: str, log: host.Log) -> Path:
    """`apt-get download PACKAGE` into `cache`; when it fails (e.g. no package lists yet on a
    fresh machine), `apt-get update` once and try again."""
    for old in cache.glob(f"{package}_*.deb"):
        old.unlink()
    log(f"apt-get download {package} (not installed: only its binary is used)")
    first = host.run(layout.apt_download_argv(package), cwd=cache, check=False, timeout=300)
    if first.returncode != 0:
        lines = (first.stdout + first.stderr).decode(errors="replace").strip().splitlines()
        log(f"apt-get download {package} failed ({lines[-1] if lines else 'no output'}); "
            "running apt-get update and retrying")
        host.run(layout.apt_update_argv(), timeout=600)
        host.run(layout.apt_download_argv(package), cwd=cache, timeout=300)
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        raise LabError(f"apt-get download {package} left no {package}_*.deb in {cache}")
    return debs[-1]


def ensure_caddy_binary(state: Path, log: host.Log) -> tuple[Path, str]:
    """The proxy image's build context (<state>/cache/caddy) holding the caddy binary extracted
    from Debian's package, and caddy's version. The binary is kept: made once per state dir."""
    cache = layout.proxy_cache(state)
    binary, version_file = cache / "caddy", cache / "version"
    if binary.is_file() and version_file.is_file():
        return cache, version_file.read_text().strip()
    cache.mkdir(parents=True, exist_ok=True)
    deb = _download_deb(cache, layout.PROXY_PACKAGE, log)
    root = cache / "root"
    if root.exists():
        shutil.rmtree(root)  # left by an interrupted run
    host.run(layout.dpkg_extract_argv(deb, root), timeout=120)
    extracted = root / "usr" / "bin" / "caddy"
    if not extracted.is_file():
        raise LabError(f"{deb.name} has no usr/bin/caddy")
    version = layout.deb_version(deb.name) or "unknown"
    partial = cache / "caddy.partial"
    shutil.copyfile(extracted, partial)
    partial.chmod(0o755)
    version_file.write_text(version + "\n")
    partial.rename(binary)  # last: a binary in place means the cache is complete
    shutil.rmtree(root)
    deb.unlink()
    return cache, version


def _made_here(labels: dict | None) -> bool:
    return labels is not None and labels.get(layout.PROXY_RECIPE_LABEL) == layout.proxy_recipe()


def proxy_in_registry() -> bool:
    """The registry has the proxy image, made by this version's recipe (two small GETs)."""
    return _made_here(host.registry_image_labels(layout.PROXY_IMAGE_REPO, layout.PROXY_IMAGE_TAG))


def ensure_caddy(state: Path, log: host.Log) -> None:
    """<registry>/runner/caddy:2 in the lab registry, where the servers pull it. Nothing to do
    when the registry has it (made by this recipe: its label); pushed from the build engine when
    only the engine has it; else built there (FROM local/python:3.11, so that image must exist)
    and pushed. An image of that name made another way is replaced."""
    image = layout.PROXY_IMAGE
    if proxy_in_registry():
        return
    started = time.monotonic()
    docker = buildkit_docker_cli()
    if not _made_here(host.image_labels(layout.BUILD_SOCK, image)):
        context, version = ensure_caddy_binary(state, log)
        host.write_if_changed(context / "Dockerfile", layout.proxy_dockerfile(version))
        host.write_if_changed(context / "init.json", layout.proxy_init_config())
        host.write_if_changed(context / ".dockerignore", "version\nroot\n*.deb\n*.partial\n")
        log(f"building {image} (caddy {version} on {layout.PYTHON_IMAGE}) with BuildKit "
            f"({docker}, DOCKER_BUILDKIT=1)")
        host.run(layout.proxy_build_argv(context, docker), env=layout.proxy_build_env(),
                 timeout=600)
        check = host.run(layout.proxy_check_argv(docker), check=False, timeout=120)
        out = (check.stdout + check.stderr).decode(errors="replace").strip()
        if check.returncode != 0 or not out.lstrip("v").startswith("2."):
            host.run([docker, "-H", layout.BUILD_DOCKER_HOST, "rmi", image], check=False)
            (context / "caddy").unlink(missing_ok=True)  # made again next time
            raise LabError(f"{image} does not run `caddy version` (exit {check.returncode}): {out}")
    log(f"pushing {image}")
    host.run(layout.proxy_push_argv(docker), timeout=600)
    log(f"{image} is in the registry ({time.monotonic() - started:.1f}s)")
