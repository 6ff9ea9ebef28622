"""Logins of the dashboard: the API token exchanged for a session cookie, and the CSRF token of
every form; the API token's check itself (TokenGate), with the addresses that guessed it wrong
too often, for the login form and the JSON API alike.

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
import ipaddress
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("runner.daemon")

COOKIE = "runner_session"
MAX_AGE = 12 * 3600.0  # seconds a login lasts


def presented_token(headers) -> str | None:
    """The API token a request presents (`Authorization: Bearer TOKEN`, or `X-Runner-Token:
    TOKEN`), or None when it presents none."""
    given = headers.get("authorization", "")
    if given.lower().startswith("bearer "):
        return given[7:].strip()
    return headers.get("x-runner-token")


class TooManyGuesses(Exception):
    """An address that gave a wrong token too often: answered 429 with Retry-After."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many wrong tokens from this address: try again in {retry_after} s")
        self.retry_after = retry_after


def client_address(request) -> str:
    """Whose wrong tokens count together: the peer's address, or the X-Forwarded-For one when
    the peer is a proxy uvicorn trusts (FORWARDED_ALLOW_IPS; by default 127.0.0.1 and ::1); an
    IPv6 address by its /64 (one host usually holds a whole /64)."""
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class TokenGate:
    """The API token, compared in constant time, for the JSON API, the pages (a Bearer header)
    and the login form alike; and the addresses that guessed it wrong too often. After `limit`
    wrong tokens within `window` seconds of its first, an address is refused (TooManyGuesses)
    until the window has passed, whatever token it gives then, the right one included: so
    guessing goes no faster than `limit` a window. Other addresses are not affected, nor are
    sessions (cookies). At most `capacity` addresses are remembered: when full, the ones whose
    window has passed go first, then the oldest."""

    def __init__(self, api_token: str | None, limit: int = 5, window: float = 60.0, capacity: int = 4096):
        self._token = api_token.encode("utf-8") if api_token else None
        self.limit, self.window, self.capacity = limit, window, capacity
        self._failures: dict[str, tuple[float, int]] = {}  # address -> (first failure, count)
        self._lock = threading.Lock()

    def check(self, address: str, now: float | None = None) -> None:
        """Raises TooManyGuesses while `address` is refused."""
        now = time.monotonic() if now is None else now
        with self._lock:
            first, count = self._failures.get(address, (0.0, 0))
        if count >= self.limit and now < first + self.window:
            raise TooManyGuesses(max(1, math.ceil(first + self.window - now)))

    def ok(self, given: str | None, address: str, now: float | None = None) -> bool:
        """Whether `given` is the API token (None: no token presented, not a guess). Raises
        TooManyGuesses while `address` is refused, before comparing."""
        if given is None or self._token is None:
            return False
        self.check(address, now)
        if hmac.compare_digest(given.encode("utf-8", "replace"), self._token):
            return True
        self.failed(address, now)
        return False

    def failed(self, address: str, now: float | None = None) -> None:
        """Count a wrong token from `address`; log when that makes it refused."""
        now = time.monotonic() if now is None else now
        with self._lock:
            first, count = self._failures.pop(address, (now, 0))
            if now >= first + self.window:
                first, count = now, 0
            if len(self._failures) >= self.capacity:
                self._failures = {a: v for a, v in self._failures.items() if now < v[0] + self.window}
                while len(self._failures) >= self.capacity:
                    del self._failures[next(iter(self._failures))]
            self._failures[address] = (first, count + 1)
        if count + 1 == self.limit:
            log.warning("too many wrong API tokens: refusing this address until its window passes",
                        extra={"address": address, "failures": count + 1,
                               "retry_after": max(1, math.ceil(first + self.window - now))})


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
