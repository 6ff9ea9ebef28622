"""The lab's token issuer: the token server of distribution's token auth (the scheme Docker Hub,
GHCR and GitLab use), for the lab's registry with `auth: token`.

`runner lab up` starts it (`python -m runner_lab.token_issuer CONFIG.json`, on loopback only),
records its pid, and `down` stops it by that pid. The registry sends a client without a valid token
a challenge `Bearer realm="http://127.0.0.1:5003/token",service="...",scope="repository:NAME:pull"`;
the client asks the realm for a token with its login, and sends it back as `Authorization: Bearer`.

The endpoint, as docker's engine and distribution's client use it:
- GET  /token?service=S&scope=repository:NAME:pull,push[&scope=...][&offline_token=true]
  with Basic auth (or none: anonymous). Answers {"token", "access_token", "expires_in",
  "issued_at"}, with "refresh_token" when offline_token=true and a login was given (that is what
  `docker login` asks for, and then stores as an identity token instead of the password).
- POST /token, an OAuth2 form: grant_type=password (username, password) or
  grant_type=refresh_token (refresh_token); scope (space-separated), service, client_id.
A wrong login is answered 401 (nothing is issued); an anonymous request gets a token that grants
nothing, as Docker Hub answers for a private repository, so the registry then refuses the read.
The users are a bcrypt htpasswd file, read at every request (a new password applies at once);
see `granted_access` for what each may do.

What distribution 2.8 (registry/auth/token/token.go) requires of a token, all checked here by the
real registry in tests/lab/test_registry_token.py:
- a JWS compact serialisation, `alg` one libtrust verifies (ES256 here: the signature is r||s,
  32 bytes each, not DER), and a signing key it trusts: an `x5c` chain verified against the
  `rootcertbundle`, a `jwk`, or a `kid` that is the libtrust fingerprint of the public key of a
  certificate in that bundle. This issuer sends `kid` (as docker_auth and GitLab do).
- claims: `iss` equal to the registry's `auth.token.issuer`; `aud` a single string equal to its
  `auth.token.service` (2.8 reads `aud` as a string: a JSON array makes the token malformed);
  `exp` and `nbf` (60 s leeway); `access`: [{"type": "repository", "name": NAME, "actions":
  [...]}] naming every action a request needs (GET/HEAD: pull; POST/PUT/PATCH: pull and push;
  DELETE: delete).
Nothing secret is logged: requests are logged with the user, the scopes asked and the access
granted; passwords, refresh tokens and tokens never.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ACTIONS = ("pull", "push", "delete")
TOKEN_TTL = 300  # seconds; the engine asks again when a token has expired
REFRESH_PREFIX = "rlab1"


# ---- pure parts ------------------------------------------------------------------------------

def parse_scopes(values: Iterable[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Scope parameters (each may hold several, space-separated) -> [(type, name, actions)].
    A name may hold ':' (a "name:tag" is never a scope, but `repository(plugin)` types exist):
    the type is the first field, the actions the last."""
    out = []
    for value in values:
        for scope in value.split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                out.append((kind, name, tuple(a for a in actions.split(",") if a)))
    return out


def granted_access(user: str | None, scopes: Iterable[tuple[str, str, tuple[str, ...]]],
                   push_only: bool = False) -> list[dict]:
    """The lab's policy: a user of the users file may pull, push and delete in every repository
    and list the catalog; without a login nothing is granted. A push-only user (a CI account
    that may push but not read, as an ECR policy without BatchGetImage allows) gets pull only
    together with push: distribution needs pull for every upload request, but a token asked for
    pull alone, as a reader asks, grants nothing."""
    if user is None:
        return []
    access = []
    for kind, name, actions in scopes:
        if kind == "repository":
            allowed = [a for a in actions if a in ACTIONS]
            if push_only and "push" not in allowed:
                allowed = []
        elif kind == "registry" and name == "catalog":
            allowed = [a for a in actions if a == "*"]
        else:
            allowed = []
        if allowed:
            access.append({"type": kind, "name": name, "actions": allowed})
    return access


def token_claims(user: str | None, access: list[dict], *, issuer: str, service: str,
                 now: int, ttl: int = TOKEN_TTL, jti: str = "") -> dict:
    return {"iss": issuer, "sub": user or "", "aud": service, "exp": now + ttl, "nbf": now,
            "iat": now, "jti": jti, "access": access}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def libtrust_key_id(spki_der: bytes) -> str:
    """The key id distribution looks up a `kid` by: libtrust's fingerprint of a public key (the
    SHA-256 of its DER SubjectPublicKeyInfo, first 240 bits, base32 without padding, in groups of
    four joined by ':')."""
    text = base64.b32encode(hashlib.sha256(spki_der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def jws_signing_input(header: Mapping, claims: Mapping) -> bytes:
    def part(obj: Mapping) -> str:
        return b64url(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())
    return f"{part(header)}.{part(claims)}".encode()


def refresh_token(user: str, password_hash: str, key: bytes) -> str:
    """A refresh token (what `docker login` stores as an identity token): the user, and a MAC over
    it and the user's password hash, so a new password (a rewritten htpasswd) or a new signing key
    ends every refresh token issued before. Nothing to keep: the issuer holds no state."""
    mac = hmac.new(key, f"{user}\0{password_hash}".encode(), hashlib.sha256).digest()
    return f"{REFRESH_PREFIX}.{b64url(user.encode())}.{b64url(mac)}"


def refresh_token_user(token: str) -> str | None:
    """The user a refresh token claims to be (not checked: see `refresh_token`)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != REFRESH_PREFIX:
        return None
    try:
        return base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def htpasswd_users(text: str) -> dict[str, str]:
    users = {}
    for line in text.splitlines():
        name, sep, hashed = line.strip().partition(":")
        if sep and name and hashed:
            users[name] = hashed
    return users


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        user, sep, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


# ---- keys ------------------------------------------------------------------------------------

def make_signing_key(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate for it (the registry's rootcertbundle):
    (key PEM, certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


class Signer:
    """Signs tokens with the issuer's EC P-256 key (ES256), `kid` its libtrust fingerprint."""

    def __init__(self, key_pem: bytes):
        from cryptography.hazmat.primitives import serialization

        self._key = serialization.load_pem_private_key(key_pem, password=None)
        spki = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.key_id = libtrust_key_id(spki)
        # the refresh tokens' MAC key: bound to the signing key, never written anywhere
        self.mac_key = hashlib.sha256(b"runner-lab refresh token\0" + key_pem).digest()

    def sign(self, claims: Mapping) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "kid": self.key_id}
        data = jws_signing_input(header, claims)
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return f"{data.decode()}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# ---- the server ------------------------------------------------------------------------------

class Issuer:
    def __init__(self, config: Mapping):
        self.issuer = config["issuer"]
        self.service = config["service"]
        self.users_file = Path(config["users"])
        self.push_only = frozenset(config.get("push_only", ()))
        self.ttl = int(config.get("token_ttl", TOKEN_TTL))
        self.signer = Signer(Path(config["key"]).read_bytes())

    def _users(self) -> dict[str, str]:
        try:
            return htpasswd_users(self.users_file.read_text())
        except OSError:
            return {}

    def login(self, user: str, password: str) -> bool:
        import bcrypt

        hashed = self._users().get(user)
        if hashed is None:
            return False
        try:
            return bcrypt.checkpw(password.encode(), hashed.encode())
        except ValueError:
            return False

    def refresh_login(self, token: str) -> str | None:
        user = refresh_token_user(token)
        hashed = self._users().get(user or "")
        if user is None or hashed is None:
            return None
        expected = refresh_token(user, hashed, self.signer.mac_key)
        return user if hmac.compare_digest(expected.encode(), token.encode()) else None

    def issue(self, user: str | None, scopes: list, offline: bool) -> tuple[dict, list[dict]]:
        access = granted_access(user, scopes, push_only=user in self.push_only)
        now = int(time.time())
        claims = token_claims(user, access, issuer=self.issuer, service=self.service, now=now,
                              ttl=self.ttl, jti=secrets.token_hex(8))
        token = self.signer.sign(claims)
        body = {"token": token, "access_token": token, "expires_in": self.ttl,
                "issued_at": datetime.fromtimestamp(now, timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ")}
        if offline and user is not None:
            body["refresh_token"] = refresh_token(user, self._users()[user], self.signer.mac_key)
        return body, access


def _handler(issuer: Issuer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "runner-lab-token-issuer"

        def log_message(self, fmt: str, *args) -> None:  # the request line: no secrets in it
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _reply(self, status: int, body: Mapping, challenge: bool = False) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if challenge:
                self.send_header("WWW-Authenticate", 'Basic realm="runner-lab token issuer"')
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, message: str) -> None:
            self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": message}]},
                        challenge=True)

        def _answer(self, user: str | None, scopes: list, offline: bool, how: str) -> None:
            body, access = issuer.issue(user, scopes, offline)
            sys.stderr.write(f"issued ({how}) to {user or '(anonymous)'}: asked "
                             f"{[':'.join((k, n, ','.join(a))) for k, n, a in scopes]}, granted "
                             f"{[':'.join((g['type'], g['name'], ','.join(g['actions']))) for g in access]}"
                             f"{', with a refresh token' if 'refresh_token' in body else ''}\n")
            self._reply(200, body)

        def _service_ok(self, service: str | None) -> bool:
            if service not in (None, "", issuer.service):
                self._reply(400, {"errors": [{"code": "DENIED", "message":
                                              f"unknown service {service!r}"}]})
                return False
            return True

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/token":
                self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
                return
            query = parse_qs(url.query)
            if not self._service_ok((query.get("service") or [None])[0]):
                return
            scopes = parse_scopes(query.get("scope", []))
            offline = (query.get("offline_token") or ["false"])[0] == "true"
            creds = basic_credentials(self.headers.get("Authorization"))
            if self.headers.get("Authorization") and creds is None:
                self._refuse("malformed Authorization header")
                return
            if creds is not None and not issuer.login(*creds):
                self._refuse("wrong user or password")
                return
            self._answer(creds[0] if creds else None, scopes, offline, "GET")

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/token":
                self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": self.path}]})
                return
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(min(length, 65536)).decode("utf-8", "replace"))

            def one(name: str) -> str:
                return (form.get(name) or [""])[0]

            if not self._service_ok(one("service") or None):
                return
            scopes = parse_scopes(form.get("scope", []))
            grant = one("grant_type")
            if grant == "password":
                user = one("username")
                if not issuer.login(user, one("password")):
                    self._refuse("wrong user or password")
                    return
                self._answer(user, scopes, one("access_type") == "offline", "POST password")
            elif grant == "refresh_token":
                user = issuer.refresh_login(one("refresh_token"))
                if user is None:
                    self._refuse("unknown or outdated refresh token")
                    return
                self._answer(user, scopes, False, "POST refresh_token")
            else:
                self._reply(400, {"errors": [{"code": "UNSUPPORTED", "message":
                                              f"grant_type {grant!r} is not supported"}]})

    return Handler


def serve(config: Mapping) -> ThreadingHTTPServer:
    host, _, port = config["listen"].rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), _handler(Issuer(config)))
    server.daemon_threads = True
    return server


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m runner_lab.token_issuer CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    server = serve(config)
    print(f"token issuer for {config['service']} listening on {config['listen']}",
          file=sys.stderr, flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
