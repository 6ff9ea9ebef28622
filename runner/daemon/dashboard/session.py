"""Logins of the dashboard: the API token exchanged for a session cookie, and the CSRF token of
every form.

A session is a signed cookie, not a row anywhere: `ISSUED.NONCE.MAC`, the MAC an HMAC-SHA256
under a key derived from the daemon's API token. So every daemon sharing the token accepts
it, and rotating the token ends every session at once (the key changes). Logging out ends the
session in this daemon (its nonce is remembered until the session would have expired anyway)
and clears the cookie in the browser.

The CSRF token of a form is an HMAC of the session's nonce: a page from this daemon carries it,
a page elsewhere cannot compute it. The cookie is HttpOnly (no script reads it) and
SameSite=Strict (no other site's page sends it).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

COOKIE = "runner_session"
MAX_AGE = 12 * 3600.0  # seconds a login lasts


def bearer_ok(api_token: str | None, headers) -> bool:
    """Whether a request's headers carry the API token (`Authorization: Bearer TOKEN`, or
    `X-Runner-Token: TOKEN`), compared in constant time: the JSON API's check, and the pages'
    for a script that reads them with the token instead of a login."""
    if not api_token:
        return False
    given = headers.get("authorization", "")
    if given.lower().startswith("bearer "):
        given = given[7:].strip()
    else:
        given = headers.get("x-runner-token", "")
    return hmac.compare_digest(given.encode("utf-8", "replace"), api_token.encode("utf-8"))


@dataclass(frozen=True)
class Session:
    nonce: str
    issued: float

    def expires(self, max_age: float = MAX_AGE) -> float:
        return self.issued + max_age


class Sessions:
    """Issues and checks session cookies and CSRF tokens for one API token (None: no logins)."""

    def __init__(self, api_token: str | None, max_age: float = MAX_AGE):
        self._key = (hmac.new(api_token.encode(), b"runner dashboard session v1", hashlib.sha256).digest()
                     if api_token else None)
        self._api_token = api_token
        self.max_age = max_age
        self._ended: dict[str, float] = {}  # nonce -> when it would have expired
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _mac(self, what: str) -> str:
        assert self._key is not None
        return hmac.new(self._key, what.encode(), hashlib.sha256).hexdigest()

    def login(self, given_token: str, now: float | None = None) -> str | None:
        """The cookie value for a correct API token, else None (compared in constant time)."""
        if self._api_token is None:
            return None
        if not hmac.compare_digest(given_token.encode("utf-8", "replace"), self._api_token.encode()):
            return None
        issued = int(now if now is not None else time.time())
        nonce = secrets.token_urlsafe(18)
        return f"{issued}.{nonce}.{self._mac(f'session:{issued}.{nonce}')}"

    def check(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie holds, or None: malformed, forged, expired or logged out."""
        if not cookie or self._key is None:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        issued_s, nonce, mac = parts
        if not hmac.compare_digest(mac.encode("utf-8", "replace"), self._mac(f"session:{issued_s}.{nonce}").encode()):
            return None
        issued = float(issued_s)
        now = now if now is not None else time.time()
        if not (issued - 60 <= now < issued + self.max_age):  # a minute of clock skew between daemons
            return None
        with self._lock:
            if nonce in self._ended:
                return None
        return Session(nonce, issued)

    def logout(self, session: Session, now: float | None = None) -> None:
        now = now if now is not None else time.time()
        with self._lock:
            self._ended = {n: t for n, t in self._ended.items() if t > now}
            self._ended[session.nonce] = session.expires(self.max_age)

    def csrf(self, session: Session) -> str:
        return self._mac(f"csrf:{session.nonce}")

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode("utf-8", "replace"), self.csrf(session).encode())
