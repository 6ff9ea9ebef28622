"""The lab's token issuer without the lab: its pure parts by equality, its tokens checked with
`cryptography` as distribution 2.8 checks them (tests/lab/test_registry_token.py has the real
registry accept them), and the real HTTP server on a free loopback port, with a real users file.
The lab's files for it (registry config, issuer config, description) by equality."""
from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from runner_lab import layout
from runner_lab import token_issuer as ti


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_scopes_are_read_as_docker_sends_them():
    # GET: one scope parameter per scope; the OAuth2 POST: one parameter, space-separated
    assert ti.parse_scopes(["repository:a/b:pull,push", "repository:c:pull"]) == [
        ("repository", "a/b", ("pull", "push")), ("repository", "c", ("pull",))]
    assert ti.parse_scopes(["repository:a/b:push,pull registry:catalog:*"]) == [
        ("repository", "a/b", ("push", "pull")), ("registry", "catalog", ("*",))]
    assert ti.parse_scopes(["repository(plugin):a/b:pull"]) == [
        ("repository(plugin)", "a/b", ("pull",))]
    assert ti.parse_scopes(["", "nonsense"]) == []


def test_policy_anonymous_gets_nothing_and_push_only_reads_only_while_pushing():
    want = [("repository", "a/b", ("pull", "push", "*")), ("registry", "catalog", ("*",)),
            ("repository", "c", ("pull",))]
    assert ti.granted_access(None, want) == []
    assert ti.granted_access("lab", want) == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
        {"type": "repository", "name": "c", "actions": ["pull"]}]
    assert ti.granted_access("ci", want, push_only=True) == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]}]


def test_claims_hold_what_distribution_2_8_checks():
    claims = ti.token_claims("lab", [], issuer="iss", service="svc", now=1000, ttl=300, jti="j")
    assert claims == {"iss": "iss", "sub": "lab", "aud": "svc", "exp": 1300, "nbf": 1000,
                      "iat": 1000, "jti": "j", "access": []}
    assert isinstance(claims["aud"], str)  # 2.8 reads aud as a string: an array is malformed


def test_a_token_is_an_es256_jws_whose_kid_is_the_certificates_libtrust_fingerprint():
    key_pem, cert_pem = ti.make_signing_key("test issuer")
    assert ti.key_matches_cert(key_pem, cert_pem)
    assert not ti.key_matches_cert(ti.make_signing_key("other")[0], cert_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    token = ti.Signer(key_pem).sign({"aud": "svc", "access": []})
    head, body, sig = token.split(".")
    header = json.loads(_b64decode(head))
    assert header == {"typ": "JWT", "alg": "ES256", "kid": ti.libtrust_key_id(spki)}
    groups = header["kid"].split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)
    assert json.loads(_b64decode(body)) == {"aud": "svc", "access": []}
    raw = _b64decode(sig)
    assert len(raw) == 64  # JOSE r||s, not DER
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    cert.public_key().verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))


def test_libtrust_key_id_encoding():
    # 240 bits of SHA-256, base32 without padding, groups of four
    kid = ti.libtrust_key_id(b"spki")
    text = base64.b32encode(__import__("hashlib").sha256(b"spki").digest()[:30]).decode()
    assert kid.replace(":", "") == text.rstrip("=") and len(text) == 48


def test_refresh_tokens_name_their_user_and_end_with_a_new_password():
    token = ti.refresh_token("lab", "hash1", b"k" * 32)
    assert ti.refresh_token_user(token) == "lab"
    assert token != ti.refresh_token("lab", "hash2", b"k" * 32)
    assert token != ti.refresh_token("lab", "hash1", b"j" * 32)
    assert ti.refresh_token_user("garbage") is None


@pytest.fixture
def issuer(tmp_path):
    """The real server on a free loopback port; users "lab" and push-only "ci"."""
    key_pem, cert_pem = ti.make_signing_key("test issuer")
    (tmp_path / "key.pem").write_bytes(key_pem)
    hashed = bcrypt.hashpw(b"pw-right", bcrypt.gensalt(4)).decode()
    users = tmp_path / "users"
    users.write_text(f"lab:{hashed}\nci:{hashed}\n")
    server = ti.serve({"listen": "127.0.0.1:0", "issuer": "iss", "service": "svc",
                       "key": str(tmp_path / "key.pem"), "users": str(users),
                       "push_only": ["ci"]})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token", users, cert_pem
    finally:
        server.shutdown()
        server.server_close()


def _claims(token: str) -> dict:
    return json.loads(_b64decode(token.split(".")[1]))


def test_the_issuer_over_http(issuer):
    url, users, _cert = issuer
    with httpx.Client(trust_env=False, timeout=10) as http:
        ok = http.get(url, params={"service": "svc", "scope": "repository:a:pull,push"},
                      auth=("lab", "pw-right"))
        assert ok.status_code == 200 and "refresh_token" not in ok.json()
        claims = _claims(ok.json()["token"])
        assert (claims["iss"], claims["aud"], claims["sub"]) == ("iss", "svc", "lab")
        assert claims["access"] == [{"type": "repository", "name": "a",
                                     "actions": ["pull", "push"]}]
        assert ok.json()["access_token"] == ok.json()["token"]

        wrong = http.get(url, params={"service": "svc"}, auth=("lab", "pw-wrong"))
        assert wrong.status_code == 401 and "token" not in wrong.json()
        assert http.get(url, params={"service": "svc"}, auth=("nobody", "x")).status_code == 401
        assert http.get(url, params={"service": "other"}).status_code == 400

        anon = http.get(url, params={"service": "svc", "scope": "repository:a:pull"})
        assert anon.status_code == 200 and _claims(anon.json()["token"])["access"] == []

        ci = http.get(url, params={"service": "svc", "scope": "repository:a:pull"},
                      auth=("ci", "pw-right"))
        assert _claims(ci.json()["token"])["access"] == []

        # `docker login` asks for a refresh token; the engine then uses it in an OAuth2 POST
        login = http.get(url, params={"service": "svc", "offline_token": "true",
                                      "client_id": "docker", "account": "lab"},
                         auth=("lab", "pw-right"))
        refresh = login.json()["refresh_token"]
        post = http.post(url, data={"grant_type": "refresh_token", "refresh_token": refresh,
                                    "service": "svc", "client_id": "docker",
                                    "scope": "repository:a:push,pull"})
        assert post.status_code == 200
        assert _claims(post.json()["access_token"])["access"] == [
            {"type": "repository", "name": "a", "actions": ["push", "pull"]}]
        bad = http.post(url, data={"grant_type": "refresh_token", "refresh_token": refresh + "x",
                                   "service": "svc", "client_id": "docker"})
        assert bad.status_code == 401
        pw = http.post(url, data={"grant_type": "password", "username": "lab",
                                  "password": "pw-right", "service": "svc",
                                  "client_id": "docker", "access_type": "offline"})
        assert pw.status_code == 200 and pw.json()["refresh_token"] == refresh
        assert http.post(url, data={"grant_type": "password", "username": "lab",
                                    "password": "nope"}).status_code == 401

        # a new password (the htpasswd rewritten) ends the refresh tokens issued before
        users.write_text(f"lab:{bcrypt.hashpw(b'pw-new', bcrypt.gensalt(4)).decode()}\n")
        after = http.post(url, data={"grant_type": "refresh_token", "refresh_token": refresh,
                                     "service": "svc"})
        assert after.status_code == 401
        assert http.get(url, params={"service": "svc"}, auth=("lab", "pw-new")).status_code == 200


# ---- the lab's files for it --------------------------------------------------------------------

def test_token_registry_config_and_issuer_config():
    state = Path("/tmp/lab")
    text = layout.token_registry_config(state)
    assert ("auth:\n  token:\n    realm: http://127.0.0.1:5003/token\n"
            "    service: runner-lab-registry\n    issuer: runner-lab-token-issuer\n"
            "    rootcertbundle: /tmp/lab/token-issuer/cert.pem\n") in text
    assert "rootdirectory: /tmp/lab/token-registry\n" in text
    assert "http:\n  addr: 127.0.0.1:5002\n" in text  # loopback: no engine needs a new flag
    assert "127.0.0.1:5002" not in layout.INSECURE_REGISTRIES
    assert layout.token_registry_argv(state) == ["docker-registry", "serve",
                                                 "/tmp/lab/token-registry.yml"]
    assert layout.token_issuer_argv(state, "/venv/bin/python") == [
        "/venv/bin/python", "-m", "runner_lab.token_issuer", "/tmp/lab/token-issuer.json"]
    assert json.loads(layout.token_issuer_config(state)) == {
        "listen": "127.0.0.1:5003", "issuer": "runner-lab-token-issuer",
        "service": "runner-lab-registry", "key": "/tmp/lab/token-issuer/key.pem",
        "users": "/tmp/lab/token-registry.htpasswd", "push_only": ["lab-pushonly"]}
    assert layout.describe(state, [])["token_registry"] == {
        "address": "127.0.0.1:5002", "username": "lab", "push_only_username": "lab-pushonly",
        "password_file": "/tmp/lab/token-registry.password",
        "realm": "http://127.0.0.1:5003/token", "service": "runner-lab-registry"}


def test_the_signing_key_is_made_once_and_made_again_only_when_it_no_longer_fits(tmp_path):
    from runner_lab.registries import ensure_token_signing_key
    from runner_lab.state import State

    state = State(tmp_path, log=lambda msg: None)
    assert ensure_token_signing_key(state) is True
    key, cert = tmp_path / "token-issuer" / "key.pem", tmp_path / "token-issuer" / "cert.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    first = key.read_bytes(), cert.read_bytes()
    assert ti.key_matches_cert(*first)
    assert ensure_token_signing_key(state) is False
    assert (key.read_bytes(), cert.read_bytes()) == first
    cert.write_bytes(ti.make_signing_key("someone else")[1])  # another key's certificate
    assert ensure_token_signing_key(state) is True
    assert ti.key_matches_cert(key.read_bytes(), cert.read_bytes())
    assert key.read_bytes() != first[0]


def test_the_token_registrys_users_share_one_password_file(tmp_path):
    from runner_lab.registries import ensure_htpasswd
    from runner_lab.state import State

    state = State(tmp_path, log=lambda msg: None)
    users = (layout.TOKEN_REGISTRY_USER, layout.TOKEN_REGISTRY_PUSH_ONLY_USER)
    pw_file, htpasswd = tmp_path / "pw", tmp_path / "htpasswd"
    assert ensure_htpasswd(state, pw_file, htpasswd, users, "test") is True
    password = pw_file.read_text().strip()
    entries = ti.htpasswd_users(htpasswd.read_text())
    assert sorted(entries) == sorted(users)
    assert all(bcrypt.checkpw(password.encode(), h.encode()) for h in entries.values())
    assert ensure_htpasswd(state, pw_file, htpasswd, users, "test") is False
    # a file from before the push-only user existed is written again
    htpasswd.write_text(f"lab:{entries['lab']}\n")
    assert ensure_htpasswd(state, pw_file, htpasswd, users, "test") is True
    assert sorted(ti.htpasswd_users(htpasswd.read_text())) == sorted(users)
