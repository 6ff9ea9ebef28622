"""`stages.build.engine` on the lab: a lab server's own engine, reached over real SSH by the docker
CLI's ssh transport (and by the SDK for scan and push), builds, keeps its BuildKit cache, and
pushes to the registry; the image lives on that engine and never on the runner's own. A refused
host key and an unreachable engine fail with messages naming the engine.

The servers cannot pull from Docker Hub, and BuildKit inside their 20.10 engine does not read a
plain-HTTP registry for FROM; their engine's own pull does. So the base image is local/busybox:1
pushed to the lab registry under a name of this module, pulled by the builder's engine, and
removed from both afterwards, like every image and tag the tests make there.
"""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from pipelines.build_engine import BuildEngine
from pipelines.buildkit import parse_progress
from runner.model.engine import BuildEngineSettings
from tests.helpers import commit_files, events, make_repo, runner, stage_end

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json"])


def docker(host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "-H", host, *args], capture_output=True, text=True,
                          check=check, timeout=300)


def has_image(host: str, ref: str) -> bool:
    return docker(host, "image", "inspect", ref, check=False).returncode == 0


@pytest.fixture(scope="module")
def builder(lab) -> dict:
    """The lab server whose engine builds: the last one (the deploy tests start with the
    first)."""
    return lab["servers"][-1]


@pytest.fixture(scope="module")
def base_image(lab, builder):
    ref = f"{lab['registry']}/test/remote-base-{uuid.uuid4().hex[:8]}:1"
    docker(lab["docker_host"], "tag", "local/busybox:1", ref)
    try:
        docker(lab["docker_host"], "push", ref)
    finally:
        docker(lab["docker_host"], "rmi", ref, check=False)
    docker(builder["docker_host"], "pull", ref)
    yield ref
    docker(builder["docker_host"], "rmi", ref, check=False)
    _delete_from_registry(lab["registry"], ref)


@pytest.fixture
def made(lab, builder):
    """Image ids and refs a test made on the builder's engine and in the registry; removed
    afterwards."""
    things = {"images": [], "pushed": []}
    yield things
    for ref in things["images"]:
        docker(builder["docker_host"], "rmi", "-f", ref, check=False)
    for ref in things["pushed"]:
        _delete_from_registry(lab["registry"], ref)


def _delete_from_registry(registry: str, ref: str) -> None:
    name, tag = ref[len(registry) + 1:].rsplit(":", 1)
    r = httpx.head(f"http://{registry}/v2/{name}/manifests/{tag}",
                   headers={"Accept": MANIFEST_TYPES}, timeout=10)
    if r.status_code == 200:
        httpx.delete(f"http://{registry}/v2/{name}/manifests/"
                     f"{r.headers['Docker-Content-Digest']}", timeout=10)


def _engine_yaml(builder: dict, known_hosts: str | None = None, port: int | None = None) -> str:
    host = f"ssh://{builder['user']}@{builder['host']}" + (f":{port}" if port else "")
    return (f"    engine:\n      host: {host}\n      key_file: {builder['key_file']}\n"
            f"      known_hosts: {known_hosts or builder['known_hosts']}\n")


def _app(tmp_path: Path, base: str, cache_id: str) -> Path:
    # deps.txt carries a token of this test, so the first build cannot hit an older session's
    # layers; the cache mount's id is the test's own, so its count starts at this test.
    return make_repo(tmp_path / "repo", {
        "Dockerfile": (
            f"FROM {base}\n"
            "COPY deps.txt /deps.txt\n"
            f"RUN --mount=type=cache,id={cache_id},target=/cache "
            "sh -c 'echo run >> /cache/runs; echo \"cache-lines=$(wc -l < /cache/runs)\"'\n"
            "COPY code.txt /code.txt\n"
            "USER 10001:10001\n"),
        "deps.txt": f"deps {cache_id}\n",
        "code.txt": "v1\n",
    })


def _pipeline(tmp_path: Path, repo: Path, image: str, engine_yaml: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"name: remote\nrepository: {{url: {repo}}}\nimage: {{name: \"{image}\"}}\n"
                 f"stages:\n  build:\n{engine_yaml}"
                 "  scan: {scanners: [secret, misconfig], hadolint: false}\n")
    return p


def _run(pipeline: Path, data_dir: Path, only: str) -> list[dict]:
    proc = runner("exec", str(pipeline), "--json", "--only", only, "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    return events(proc.stdout)


def _build_progress(evs: list[dict]):
    return parse_progress([e["line"] for e in evs if e["event"] == "stage.log"
                           and e["stage"] == "build" and e.get("kind") == "output"])


def _step(progress, text: str):
    [step] = [s for s in progress.steps.values() if text in s.name]
    return step


def test_build_on_a_servers_engine_rebuild_from_its_cache_scan_and_push(
        lab, builder, base_image, made, tmp_path):
    token = uuid.uuid4().hex[:8]
    image = f"{lab['registry']}/test/remote-build-{token}"
    repo = _app(tmp_path, base_image, f"rb-{token}")
    pipeline = _pipeline(tmp_path, repo, image, _engine_yaml(builder))
    data_dir = tmp_path / "data"
    address = f"ssh://{builder['user']}@{builder['host']}"

    # 1. Cold: everything runs on the server's engine; scan exports it from there, push goes
    # from there to the registry.
    evs = _run(pipeline, data_dir, "checkout,build,scan,push")
    build = stage_end(evs, "build")["outputs"]
    made["images"] += [build["image_id"], *build["tags"]]
    assert build["engine"] == address
    infos = [e["line"] for e in evs if e["event"] == "stage.log" and e.get("kind") == "info"]
    assert any(line.startswith("builder: ") and f"on build engine {address} over ssh" in line
               and "Docker Engine" in line for line in infos), infos
    first = _build_progress(evs)
    run_step = _step(first, "RUN --mount=type=cache")
    assert not run_step.cached and "cache-lines=1" in run_step.log, run_step
    assert has_image(builder["docker_host"], build["image_id"])
    assert not has_image(lab["docker_host"], build["image_id"])
    for tag in build["tags"]:
        assert has_image(builder["docker_host"], tag) and not has_image(lab["docker_host"], tag)

    scan = stage_end(evs, "scan")["outputs"]
    assert scan["passed"] and set(scan["checked"]) == {"secret", "misconfig"}
    assert any(line.startswith(f"exported {build['image_id'][:19]} for scanning")
               for line in infos), infos

    push = stage_end(evs, "push")["outputs"]
    made["pushed"] += build["tags"]
    assert push["digest"].startswith("sha256:") and push["ref"] == f"{image}@{push['digest']}"
    r = httpx.get(f"http://{lab['registry']}/v2/test/remote-build-{token}/manifests/"
                  f"{build['tags'][0].rsplit(':', 1)[1]}",
                  headers={"Accept": MANIFEST_TYPES}, timeout=10)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == push["digest"]
    assert r.json()["config"]["digest"] == build["image_id"]

    # 2. A code-only change: the dependency steps come from the server's BuildKit cache.
    commit_files(repo, {"code.txt": "v2\n"}, "code-only change")
    evs = _run(pipeline, data_dir, "checkout,build,push")
    again = stage_end(evs, "build")["outputs"]
    made["images"] += [again["image_id"], *again["tags"]]
    second = _build_progress(evs)
    assert _step(second, "COPY deps.txt").cached
    assert _step(second, "RUN --mount=type=cache").cached
    assert not _step(second, "COPY code.txt").cached
    assert again["cached_steps"] == second.cached_steps >= 2
    assert again["image_id"] != build["image_id"]
    assert has_image(builder["docker_host"], again["image_id"])
    assert not has_image(lab["docker_host"], again["image_id"])
    pushed = stage_end(evs, "push")["outputs"]
    made["pushed"] += again["tags"]
    assert pushed["digest"].startswith("sha256:") and pushed["digest"] != push["digest"]

    # 3. A dependency change runs the step again, and its cache mount still holds what the
    # first build put there: the mount lives in the server's engine too.
    commit_files(repo, {"deps.txt": f"deps {token} and more\n"}, "dependency change")
    evs = _run(pipeline, data_dir, "checkout,build")
    third = stage_end(evs, "build")["outputs"]
    made["images"] += [third["image_id"], *third["tags"]]
    run_step = _step(_build_progress(evs), "RUN --mount=type=cache")
    assert not run_step.cached and "cache-lines=2" in run_step.log, run_step


def _failed_build(tmp_path: Path, lab: dict, base: str, engine_yaml: str) -> str:
    repo = make_repo(tmp_path / "repo", {"Dockerfile": f"FROM {base}\n"})
    pipeline = _pipeline(tmp_path, repo, f"{lab['registry']}/test/remote-refused", engine_yaml)
    proc = runner("exec", str(pipeline), "--json", "--only", "checkout,build",
                  "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    end = stage_end(events(proc.stdout), "build")
    assert end["status"] == "failed"
    return end["error"]


def test_an_unknown_host_key_is_refused_naming_the_engine(lab, builder, base_image, tmp_path):
    # A known_hosts with every lab server but the builder: its key is unknown there.
    known = [line for line in Path(builder["known_hosts"]).read_text().splitlines()
             if line.strip() and not line.startswith(builder["host"] + " ")]
    other = tmp_path / "known_hosts"
    other.write_text("\n".join(known) + "\n")
    error = _failed_build(tmp_path, lab, base_image, _engine_yaml(builder, str(other)))
    assert error.startswith(f"build engine ssh://root@{builder['host']} cannot be used by ")
    assert f"the builder's host key is not in {other}" in error
    assert "Host key verification failed" in error


def test_a_changed_host_key_is_refused_naming_the_engine(lab, builder, base_image, tmp_path):
    # Another server's key written for the builder's address: what a man in the middle shows.
    lines = Path(builder["known_hosts"]).read_text().splitlines()
    foreign = next(line for line in lines if line and not line.startswith(builder["host"] + " "))
    forged = tmp_path / "known_hosts"
    forged.write_text(builder["host"] + " " + foreign.split(" ", 1)[1] + "\n")
    error = _failed_build(tmp_path, lab, base_image, _engine_yaml(builder, str(forged)))
    assert f"build engine ssh://root@{builder['host']}" in error
    assert f"the builder's host key is not the one in {forged}: refused" in error


def test_an_unreachable_engine_is_named(lab, builder, base_image, tmp_path):
    error = _failed_build(tmp_path, lab, base_image, _engine_yaml(builder, port=2222))
    assert error.startswith(f"build engine ssh://root@{builder['host']}:2222 cannot be used")
    assert "nothing accepts ssh connections at that address and port" in error
    assert "Connection refused" in error


def test_the_sdk_client_reaches_the_same_engine_and_refuses_unknown_keys(
        lab, builder, base_image, tmp_path):
    settings = BuildEngineSettings(host=f"ssh://root@{builder['host']}",
                                   key_file=builder["key_file"],
                                   known_hosts=builder["known_hosts"])
    client = BuildEngine(settings).client(tmp_path / "engine")
    try:
        assert base_image in [t for i in client.images.list() for t in i.tags]
        # The server's own engine: it is the one with the registry among its insecure ones.
        assert lab["registry"] in json.dumps(client.info()["RegistryConfig"])
    finally:
        client.close()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    from docker.errors import DockerException

    with pytest.raises(DockerException) as info:
        BuildEngine(BuildEngineSettings(host=settings.host, key_file=builder["key_file"],
                                        known_hosts=str(empty))).client(tmp_path / "engine2")
    assert str(info.value).startswith(f"build engine ssh://root@{builder['host']} cannot be "
                                      f"reached: the builder's host key is not in {empty}")


# --- tcp:// with TLS ---------------------------------------------------------------------------
# The lab's engines listen on unix sockets only, and they are not to be restarted with other
# flags. So a TLS front does what `dockerd --tlsverify` does for its TCP socket: it demands a
# client certificate from its CA, then joins the connection to the builder's engine socket.
# The runner's side, the docker CLI's --tlsverify flags and the SDK's TLSConfig, is real.

import datetime as _dt  # noqa: E402
import ipaddress  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import threading  # noqa: E402


def _cert(name: str, issuer=None, *, server: bool = False, ip: str | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer[0].subject if issuer else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - _dt.timedelta(minutes=5))
         .not_valid_after(now + _dt.timedelta(days=1)))
    if issuer is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        if ip:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    cert = b.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _write_pem(directory: Path, stem: str, pair) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    cert, key = pair
    c, k = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    k.chmod(0o600)
    return str(c), str(k)


class TLSFront:
    def __init__(self, engine_socket: str, ca: str, cert: str, key: str) -> None:
        self.engine_socket = engine_socket
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.load_verify_locations(ca)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refused = 0
        self.open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            front = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused += 1
            raw.close()
            return
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.connect(self.engine_socket)
        self.open |= {front, back}
        there = threading.Thread(target=self._pump, args=(front, back), daemon=True)
        there.start()
        self._pump(back, front)
        there.join(timeout=30)
        for s in (front, back):
            s.close()
            self.open.discard(s)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        try:
            if isinstance(dst, ssl.SSLSocket):
                dst.close()
            else:
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in list(self.open):
            s.close()


@pytest.fixture(scope="module")
def tls_builder(builder, tmp_path_factory):
    """The builder's engine behind TLS at tcp://127.0.0.1:PORT, with the files a pipeline names:
    a CA, the runner's client certificate, and a client certificate of another CA."""
    d = tmp_path_factory.mktemp("tls")
    ca = _cert("runner test CA")
    other_ca = _cert("another CA")
    files = {"ca": _write_pem(d, "ca", ca)[0]}
    server_cert, server_key = _write_pem(d, "server", _cert("builder", ca, server=True,
                                                            ip="127.0.0.1"))
    files["cert"], files["key"] = _write_pem(d, "client", _cert("runner", ca))
    files["other_cert"], files["other_key"] = _write_pem(d, "other", _cert("runner", other_ca))
    files["other_ca"] = _write_pem(d, "other-ca", other_ca)[0]
    front = TLSFront(builder["docker_host"].removeprefix("unix://"), files["ca"], server_cert,
                     server_key)
    yield {"port": front.port, "front": front, **files}
    front.close()


def _tls_yaml(t: dict, cert: str = "cert", key: str = "key", ca: str = "ca") -> str:
    return (f"    engine:\n      host: tcp://127.0.0.1:{t['port']}\n"
            f"      tls: {{ca: {t[ca]}, cert: {t[cert]}, key: {t[key]}}}\n")


def test_a_tls_engine_builds_and_pushes(lab, builder, base_image, made, tls_builder, tmp_path):
    token = uuid.uuid4().hex[:8]
    image = f"{lab['registry']}/test/remote-tls-{token}"
    repo = _app(tmp_path, base_image, f"rb-tls-{token}")
    pipeline = _pipeline(tmp_path, repo, image, _tls_yaml(tls_builder))
    evs = _run(pipeline, tmp_path / "data", "checkout,build,push")
    build = stage_end(evs, "build")["outputs"]
    made["images"] += [build["image_id"], *build["tags"]]
    made["pushed"] += build["tags"]
    assert build["engine"] == f"tcp://127.0.0.1:{tls_builder['port']}"
    running = [e["line"] for e in evs if e["event"] == "stage.log" and e["stage"] == "build"
               and e["line"].startswith("running: ")]
    assert f"-H tcp://127.0.0.1:{tls_builder['port']} --tlsverify --tlscacert " \
           f"{tls_builder['ca']}" in running[0]
    assert has_image(builder["docker_host"], build["image_id"])
    assert not has_image(lab["docker_host"], build["image_id"])
    push = stage_end(evs, "push")["outputs"]
    assert push["ref"] == f"{image}@{push['digest']}"


def test_a_tls_engine_refuses_a_certificate_of_another_ca(lab, base_image, tls_builder,
                                                          tmp_path):
    refused = tls_builder["front"].refused
    error = _failed_build(tmp_path, lab, base_image,
                          _tls_yaml(tls_builder, cert="other_cert", key="other_key"))
    assert error.startswith(f"build engine tcp://127.0.0.1:{tls_builder['port']} cannot be "
                            "used by ")
    assert (f"the engine refused the runner's client certificate ({tls_builder['other_cert']})"
            in error), error
    assert tls_builder["front"].refused > refused


def test_the_sdk_checks_the_engines_certificate(lab, tls_builder, tmp_path):
    from docker.errors import DockerException

    def settings(ca: str) -> BuildEngineSettings:
        return BuildEngineSettings(host=f"tcp://127.0.0.1:{tls_builder['port']}", tls={
            "ca": tls_builder[ca], "cert": tls_builder["cert"], "key": tls_builder["key"]})

    client = BuildEngine(settings("ca")).client(tmp_path / "engine")
    try:
        assert lab["registry"] in json.dumps(client.info()["RegistryConfig"])
    finally:
        client.close()
    with pytest.raises(DockerException) as info:
        BuildEngine(settings("other_ca")).client(tmp_path / "engine")
    assert str(info.value).startswith(
        f"build engine tcp://127.0.0.1:{tls_builder['port']} cannot be reached: the engine's "
        f"certificate is not signed by tls.ca {tls_builder['other_ca']} (")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
