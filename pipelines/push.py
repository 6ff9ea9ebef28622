"""The push stage: every tag the build produced -> the registry, through the docker SDK.

Outputs: runner.outputs.PushOutputs: the image by digest (an ImageRef, "name@sha256:...", checked
here once: the deploy runs it as it is), the tags, verified (bool), verification (what was
checked, or why nothing was), credentials (where the login came from; never a secret). It reads
the build's (ctx.outputs.build).

- The SDK's push returns HTTP 200 and raises nothing when the registry refuses: the whole stream
  is read, and an item with "error"/"errorDetail" is a failure. The digest comes from the final
  {"aux": {"Digest": ...}} item; every tag of one image must give the same digest.
- Transient errors (connection refused/reset, 5xx, TLS handshake or i/o timeouts) are retried up
  to `stages.push.retries` times with backoff; auth/denied errors are not retried. The engine's
  own "context deadline exceeded" is a timeout too; as it names neither the registry nor its
  token endpoint, the message then says which of the two does not answer (asked briefly,
  without credentials).
- Credentials, in this order: `stages.push.auth`; else docker's own config, as the docker CLI
  finds it ($DOCKER_CONFIG/config.json, else ~/.docker/config.json) and as the SDK resolves it
  (credHelpers for that registry, credsStore, then `auths`, identity tokens included); else none.
  They are resolved once, before anything is pushed, and the very same login goes to the engine
  (auth_config, per push) and to the verification. Never stored, never logged: values read from
  docker's config are registered with the run's masker.
- "Never half-pushed": the digest is only reported once every tag is pushed. On cancel the stage
  stops between tags; a tag that was already pushed stays in the registry, and the message says
  which ones.
- Afterwards the registry itself is asked for the manifest by digest (GET /v2/<repo>/manifests/
  <digest>), over plain HTTP when the engine treats the registry as insecure (as on the lab),
  answering its challenge as docker does: Basic with the login, or Bearer (the token auth of
  Docker Hub, GHCR, GitLab): the token endpoint of the challenge, asked for scope
  repository:<repo>:pull with the same login (GET with Basic auth, or an OAuth2 POST with an
  identity token), or anonymously without one. A registry that refuses the read for lack of
  credentials does not fail the push, which already happened: the stage succeeds with the digest
  the engine reported, warns that the verification was skipped and why, and records verified:
  false. Any other answer that is not the pushed manifest fails the stage, and so does a token
  endpoint that does not answer (within verify_timeout; the message names it).
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from runner.errors import Cancelled, RunnerError, StageFailed
from runner.model import Pipeline
from runner.model.image import ImageName, ImageRef
from runner.outputs import PushOutputs
from runner.stage import Stage, StageContext

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)

_AUTH = re.compile(r"unauthori[sz]ed|denied|authentication required|forbidden|\b401\b|\b403\b",
                   re.I)
_TRANSIENT = re.compile(
    r"connection refused|connection reset|tls handshake timeout|i/o timeout|timeout|"
    r"deadline exceeded|"
    r"broken pipe|unexpected eof|\bEOF\b|temporarily unavailable|too many requests|"
    r"\b5\d\d\b|internal server error|bad gateway|service unavailable|gateway timeout",
    re.I)
# What the OAuth2 token request names as its client (docker's engine says "docker").
OAUTH_CLIENT_ID = "runner"


# ---------------------------------------------------------------------------------------------
# Pure parts


def is_auth_error(message: str) -> bool:
    return bool(_AUTH.search(message))


def is_transient(message: str) -> bool:
    """Worth retrying: network trouble or a 5xx, and not an auth/denied refusal."""
    return not is_auth_error(message) and bool(_TRANSIENT.search(message))


def backoff(attempt: int, base: float, cap: float = 10.0) -> float:
    """Delay before retry number `attempt` (1-based): base, 2*base, 4*base, ... up to cap."""
    return min(cap, base * (2 ** (attempt - 1)))


def registry_is_insecure(host: str, registry_config: Mapping[str, Any] | None) -> bool:
    """Whether the engine speaks plain HTTP to `host` (docker's own rule: a configured insecure
    registry, or an address inside InsecureRegistryCIDRs, which include 127.0.0.0/8)."""
    cfg = registry_config or {}
    index = (cfg.get("IndexConfigs") or {}).get(host)
    if index is not None and index.get("Secure") is False:
        return True
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    hostname = hostname.strip("[]")
    if hostname == "localhost":
        hostname = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        return False
    for cidr in cfg.get("InsecureRegistryCIDRs") or ():
        try:
            if ip in ipaddress.ip_network(cidr, strict=False):
                return True
        except ValueError:
            continue
    return False


@dataclass(frozen=True)
class StreamOutcome:
    digest: str | None
    error: str | None


def read_push_stream(items: Iterable[Mapping[str, Any]],
                     on_line: Callable[[str], None] | None = None) -> StreamOutcome:
    """Read a decoded push stream to its end. Progress-bar updates are not passed to on_line."""
    digest: str | None = None
    error: str | None = None
    for item in items:
        if "error" in item or "errorDetail" in item:
            detail = item.get("errorDetail") or {}
            error = str(item.get("error") or detail.get("message") or item)
            continue
        aux = item.get("aux")
        if isinstance(aux, Mapping) and aux.get("Digest"):
            digest = str(aux["Digest"])
            continue
        status = item.get("status")
        if status and on_line is not None and "progress" not in item:
            ident = item.get("id")
            on_line(f"{ident}: {status}" if ident else str(status))
    if error is not None:
        return StreamOutcome(None, error)
    if digest is None:
        return StreamOutcome(None, "the engine reported no digest for the push")
    return StreamOutcome(digest, None)


@dataclass(frozen=True)
class Credentials:
    """The login used for one registry, and where it came from (`source`, for messages). The
    secret fields never show in repr. No username and no identity token: anonymous, and `source`
    says where a login was looked for."""

    registry: str  # as docker keys its logins: "docker.io" for Docker Hub, else host[:port]
    source: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)

    @property
    def anonymous(self) -> bool:
        return not self.username and not self.identity_token

    def engine_auth(self) -> dict[str, str]:
        """The engine's X-Registry-Auth: exactly this login; {} pushes anonymously."""
        if self.identity_token:
            return {"identitytoken": self.identity_token, "serveraddress": self.registry}
        if self.anonymous:
            return {}
        return {"username": self.username or "", "password": self.password or "",
                "serveraddress": self.registry}

    def describe(self) -> str:
        """Who this login is, for a human: never a secret."""
        if self.anonymous:
            return f"no credentials ({self.source})"
        who = (f"user {self.username!r}" if self.username and not self.identity_token
               else "an identity token")
        return f"{who} from {self.source}"


def docker_config_file(environ: Mapping[str, str] | None = None,
                       home: str | None = None) -> Path:
    """Where the docker CLI keeps its logins: $DOCKER_CONFIG/config.json, else
    ~/.docker/config.json. Unlike the SDK's own lookup, a DOCKER_CONFIG without a config.json
    does not fall back to ~/.docker: the CLI never does, so `docker login` with DOCKER_CONFIG set
    and this stage agree on which file holds the login."""
    from pipelines.buildkit import docker_config_dir

    return Path(docker_config_dir(environ, home)) / "config.json"


def credentials_from_entry(registry: str, entry: Mapping[str, Any] | None,
                           source: str) -> Credentials | None:
    """A login as the SDK resolves one (docker.auth.AuthConfig.resolve_authconfig): lower-case
    keys from `auths`, capitalised ones from a credential helper; None when it holds no login
    (an `auths` entry of {} beside a credsStore). Pure."""
    if not entry:
        return None
    values = {str(k).lower(): v for k, v in entry.items() if v}
    if values.get("identitytoken"):
        return Credentials(registry, source, username=values.get("username"),
                           identity_token=str(values["identitytoken"]))
    if values.get("username"):
        return Credentials(registry, source, username=str(values["username"]),
                           password=str(values.get("password") or ""))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A WWW-Authenticate header -> (scheme in lower case, its parameters). Pure.
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="..."'."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    # unquoted values (error=invalid_token), looked for outside the quoted ones only
    for k, v in re.findall(r'(\w+)=([^",\s]+)', re.sub(r'"[^"]*"', '""', rest)):
        params.setdefault(k.lower(), v)
    return scheme.lower(), params


@dataclass(frozen=True)
class Verification:
    """What the registry was asked after the push. verified=False: nothing was checked, and
    `detail` says why (the registry refused the read for lack of credentials)."""

    verified: bool
    detail: str


# ---------------------------------------------------------------------------------------------
# The stage


class PushStage(Stage):
    name = "push"

    def __init__(self, backoff_base: float = 1.0, verify_timeout: float = 10.0):
        self.backoff_base = backoff_base
        self.verify_timeout = verify_timeout

    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        s = pipeline.stages.push
        explicit = bool(s.auth.username or s.auth.password_secret)
        return {
            "image": pipeline.image.name,
            "registry": ImageName.parse(pipeline.image.name).registry,
            "auth": {"username": s.auth.username, "password": s.auth.password_secret},
            "credentials": "stages.push.auth" if explicit else (
                "docker's config (DOCKER_CONFIG or ~/.docker/config.json: credHelpers, "
                "credsStore, auths), else none"),
            "retries": s.retries,
        }

    def run(self, ctx: StageContext) -> PushOutputs:
        from docker.errors import DockerException

        from pipelines.build_engine import engine_client

        settings = ctx.pipeline.stages.push
        build = ctx.outputs.build
        refs = list(build.tags) if build is not None else []
        if not refs:
            raise StageFailed(self.name, "nothing to push: the build stage produced no tags")
        try:
            names = {ref: ImageName.parse(ref) for ref in refs}
        except ValueError as exc:
            raise StageFailed(self.name, f"cannot push: {exc}") from None
        name = ctx.pipeline.image.name
        logins = {}
        for parsed in names.values():
            key = parsed.registry
            if key not in logins:
                logins[key] = self._credentials(ctx, key)
                ctx.log.info(f"registry {key}: {logins[key].describe()}")

        try:
            client = engine_client(ctx)  # the engine that built the image pushes it
        except DockerException as exc:
            raise StageFailed(self.name, f"cannot reach the build engine: {exc}") from None
        pushed: list[str] = []
        digests: dict[str, str] = {}
        try:
            for ref in refs:
                if ctx.cancel.is_set():
                    raise Cancelled(_cancel_message(pushed, refs))
                creds = logins[names[ref].registry]
                digests[ref] = self._push_one(client, ref, names[ref], build.image_id, creds,
                                              settings.retries, ctx, pushed, refs)
                pushed.append(ref)
                ctx.log.info(f"pushed {ref} ({digests[ref]})")
            distinct = sorted(set(digests.values()))
            if len(distinct) != 1:
                raise StageFailed(self.name, "the tags of one image gave different digests: "
                                  + ", ".join(f"{r} -> {d}" for r, d in digests.items()))
            digest = distinct[0]
            try:
                image = ImageRef(name, digest)
            except ValueError as exc:  # the engine's answer, not a digest a deploy could run
                raise StageFailed(self.name, str(exc) + _pushed_note(pushed)) from None
            try:
                registry_config = client.info().get("RegistryConfig")
            except DockerException:
                registry_config = None
        finally:
            client.close()

        try:
            check = verify_pushed(image.parsed, digest, build.image_id,
                                  logins[image.registry],
                                  registry_config, self.verify_timeout)
        except StageFailed as exc:
            raise StageFailed(self.name, exc.reason + _pushed_note(pushed)) from None
        if check.verified:
            ctx.log.info(f"verified: {check.detail}")
        else:
            ctx.log.warn(f"pushed {name}@{digest} (the digest the engine reported), but its "
                         f"verification was skipped: {check.detail}")
        creds = logins[image.registry]
        return PushOutputs(ref=image, tags=tuple(pushed), verified=check.verified,
                           verification=check.detail,
                           credentials=f"none ({creds.source})" if creds.anonymous
                           else creds.source)

    # -----------------------------------------------------------------------------------------

    def _credentials(self, ctx: StageContext, registry: str) -> Credentials:
        """stages.push.auth, else docker's config, else none (see the module docstring)."""
        auth = ctx.pipeline.stages.push.auth
        if auth.username or auth.password_secret:
            if not (auth.username and auth.password_secret):
                raise StageFailed(self.name, "stages.push.auth needs both username and password")
            try:
                password = ctx.secrets.value(auth.password_secret)
            except (KeyError, RunnerError) as exc:
                raise StageFailed(self.name, f"registry password secret {auth.password_secret!r} "
                                             f"is not available ({exc})") from None
            return Credentials(registry, "stages.push.auth", username=auth.username,
                               password=password)
        config = docker_config_file()
        creds = self._docker_config_credentials(registry, config)
        if creds is None:
            return Credentials(registry, f"stages.push.auth is not set, and {config} "
                               + (f"has no login for {registry}" if config.exists()
                                  else "does not exist"))
        # Values from docker's config are no pipeline secret: the masker learns them here.
        masker = getattr(ctx.secrets, "masker", None)
        if masker is not None:
            # "user:password" too: its base64 form is the `auth` field of docker's config
            pair = f"{creds.username}:{creds.password}" if creds.password else None
            for value in (creds.password, creds.identity_token, pair):
                if value:
                    masker.add(value, f"the login for {registry} from {creds.source}")
        return creds

    def _docker_config_credentials(self, registry: str, config: Path) -> Credentials | None:
        """The login docker's config holds for `registry`, resolved by the SDK itself (credential
        helpers run as `docker-credential-NAME get`), or None."""
        from docker.auth import load_config
        from docker.errors import DockerException

        if not config.is_file():
            return None
        try:
            cfg = load_config(config_path=str(config))
        except (DockerException, ValueError, OSError) as exc:
            raise StageFailed(self.name, f"cannot read the logins in docker's config {config}: "
                                         f"{exc}") from None
        helper = cfg.get_credential_store(registry)
        try:
            entry = cfg.resolve_authconfig(registry)
        except DockerException as exc:
            # a helper that is missing or fails; its message names it, never a secret
            raise StageFailed(self.name, f"the credential helper docker-credential-{helper} "
                                         f"(named in {config} for {registry}) failed: "
                                         f"{exc}") from None
        # Only the SDK's credential-helper path sets "ServerAddress" (capitalised); an `auths`
        # entry has lower-case keys, or only IdentityToken.
        if helper and entry and "ServerAddress" in entry:
            source = f"credential helper docker-credential-{helper} (named in {config})"
        else:
            source = f"docker's config {config}"
        return credentials_from_entry(registry, entry, source)

    def _push_one(self, client: Any, ref: str, parsed: ImageName, image_id: str | None,
                  creds: Credentials, retries: int, ctx: StageContext, pushed: list[str],
                  refs: list[str]) -> str:
        from docker.errors import APIError, DockerException
        from requests.exceptions import RequestException

        repo, tag = parsed.name, parsed.tag or "latest"
        if image_id:
            try:
                local = client.images.get(ref).id
            except DockerException as exc:
                raise StageFailed(self.name, f"cannot push {ref}: {exc}") from None
            if local != image_id:
                raise StageFailed(self.name, (
                    f"{ref} no longer points at the image this run built ({image_id}) but at "
                    f"{local}: another build re-tagged it; not pushing someone else's image"
                ) + _pushed_note(pushed))
        attempts = retries + 1
        error = ""
        timeout = ctx.pipeline.stages.push.timeout
        for attempt in range(1, attempts + 1):
            try:
                # Always an explicit login ({} = anonymous): without one the SDK would look
                # for a login on its own, possibly another one than the verification uses.
                items, stop = open_push_stream(client, repo, tag, creds.engine_auth())
                with PushWatch(stop, timeout, ctx.cancel) as watch:
                    try:
                        outcome = read_push_stream(items, ctx.log.line)
                    except Exception:  # noqa: BLE001 - whatever ending the stream raised
                        if watch.why is None:
                            raise
                        outcome = StreamOutcome(None, None)
                if outcome.digest is not None:
                    return outcome.digest
                if watch.why == "cancel":
                    raise Cancelled(_cancel_message(pushed, refs))
                if watch.why == "timeout":
                    error = (f"the push did not end within {timeout:g}s (stages.push.timeout) "
                             f"and was stopped" + (f"; the engine said: {outcome.error}"
                                                   if outcome.error else ""))
                    retry = True
                else:
                    error = outcome.error or "unknown push error"
                    retry = is_transient(error)
            except APIError as exc:
                error = str(exc.explanation or exc)
                status = exc.status_code or 0
                retry = (status >= 500 or is_transient(error)) and not is_auth_error(error)
            except (RequestException, DockerException) as exc:
                error = f"the build engine connection failed: {exc}"
                retry = True
            if not retry or attempt == attempts:
                break
            delay = backoff(attempt, self.backoff_base)
            ctx.log.warn(f"push of {ref} failed (attempt {attempt}/{attempts}): {error}; "
                         f"retrying in {delay:g}s")
            if ctx.cancel.wait(delay):
                raise Cancelled(_cancel_message(pushed, refs))
        if attempt > 1:
            how = f"after {attempt} attempts"
        elif retry:
            how = "after 1 attempt (retries: 0)"
        else:
            how = "(not retried: not a transient error)"
        message = f"pushing {ref} failed {how}: {error}"
        if is_auth_error(error):
            message += "\n" + _auth_hint(creds, repo)
        elif "connection refused" in error.lower():
            message += f"\nis a registry listening at {parsed.api_host}?"
        elif re.search(r"deadline exceeded|timeout", error, re.I):
            message += "\n" + _unanswered_hint(client, parsed.api_host)
        raise StageFailed(self.name, message + _pushed_note(pushed))


def open_push_stream(client: Any, repo: str, tag: str,
                     auth: Mapping[str, str]) -> tuple[Iterator[dict], Callable[[], None]]:
    """The engine's decoded push stream, and a function that ends it from another thread.

    The engine stops pushing when the client's connection closes, so ending a push (a timeout,
    a cancelled run) means closing that connection; docker-py's `api.push` keeps the response
    to itself, hence its lower-level calls here."""
    from docker import auth as docker_auth

    api = client.api
    response = api._post_json(api._url("/images/{0}/push", repo), None,
                              headers={"X-Registry-Auth": docker_auth.encode_header(dict(auth))},
                              stream=True, params={"tag": tag})
    api._raise_for_status(response)

    def stop() -> None:
        # Only a shutdown from this other thread: the reading thread then meets the end of the
        # stream and closes the response itself (http.client's close is not thread-safe).
        try:
            raw = response.raw._fp.fp.raw  # the socket.SocketIO over the engine's socket
            getattr(raw, "_sock", raw).shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            response.close()  # not a plain socket (or already closed): the blunt way

    return api._stream_helper(response, decode=True), stop


class PushWatch:
    """Ends a push stream (`stop`) when the run is cancelled or `timeout` seconds pass; `why`
    says which ("cancel", "timeout"), None while neither happened."""

    def __init__(self, stop: Callable[[], None], timeout: float, cancel: threading.Event,
                 poll: float = 0.2):
        self.why: str | None = None
        self._stop, self._cancel, self._poll = stop, cancel, poll
        self._deadline = time.monotonic() + timeout
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="push-watch", daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(self._poll):
            if self._cancel.is_set():
                self.why = "cancel"
            elif time.monotonic() >= self._deadline:
                self.why = "timeout"
            else:
                continue
            self._stop()
            return

    def __enter__(self) -> PushWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def _unanswered_hint(client: Any, host: str, timeout: float = 3.0) -> str:
    """Who did not answer in time: the registry, or the token endpoint its challenge names (the
    engine says only "context deadline exceeded"). Asks both briefly, without credentials."""
    try:
        insecure = registry_is_insecure(host, client.info().get("RegistryConfig"))
    except Exception:  # noqa: BLE001 - a hint only
        insecure = False
    url = f"{'http' if insecure else 'https'}://{host}/v2/"
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as http:
            resp = http.get(url)
            scheme, params = parse_challenge(resp.headers.get("www-authenticate", ""))
            realm = params.get("realm") if scheme == "bearer" else None
            if not realm:
                return f"registry {host} did not answer the engine in time ({url} answers now)"
            try:
                http.get(realm, params={"service": params.get("service", "")})
            except httpx.HTTPError as exc:
                return (f"registry {host} answers, but its token endpoint {realm} does not "
                        f"({type(exc).__name__} after {timeout:g}s)")
            return (f"registry {host} or its token endpoint {realm} did not answer the engine "
                    "in time (both answer now)")
    except httpx.HTTPError as exc:
        return f"registry {host} does not answer ({url}: {type(exc).__name__})"


def _auth_hint(creds: Credentials, repo: str) -> str:
    registry = creds.registry
    if creds.anonymous:
        return (f"authentication failed: registry {registry} wants a login, and none was found "
                f"({creds.source}): check stages.push.auth (username, password), or run "
                f"`docker login {registry}` as the user the runner runs as")
    if creds.source == "stages.push.auth":
        return (f"authentication failed: registry {registry} refused user {creds.username!r} "
                f"(or its access to {repo}); check stages.push.auth")
    return (f"authentication failed: registry {registry} refused {creds.describe()} (or its "
            f"access to {repo}); run `docker login {registry}` again (the same user and "
            "DOCKER_CONFIG as the runner), or set stages.push.auth")


def verify_pushed(name: ImageName, digest: str, image_id: str | None, creds: Credentials,
                  registry_config: Any, timeout: float = 10.0) -> Verification:
    """Ask the registry for name@digest as a client reading it would, with `creds` (see the
    module docstring). Raises StageFailed when the registry answers but not with that manifest,
    or cannot be reached; returns verified=False when it refuses the read for lack of
    credentials."""
    host, path = name.api_host, name.repository
    insecure = registry_is_insecure(host, registry_config)
    url = f"{'http' if insecure else 'https'}://{host}/v2/{path}/manifests/{digest}"
    headers = {"Accept": ", ".join(MANIFEST_TYPES)}
    asked = "without credentials"
    # trust_env=False: the registry is reached directly, never through a proxy from the env.
    # Redirects are followed (httpx drops the Authorization header across origins).
    try:
        with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=True) as http:
            # First without credentials, as docker does: the challenge says how to log in.
            resp = http.get(url, headers=headers)
            if resp.status_code == 401:
                scheme, params = parse_challenge(resp.headers.get("www-authenticate", ""))
                if scheme == "basic":
                    if creds.anonymous or creds.identity_token:
                        return Verification(False, (
                            f"registry {host} wants a login (Basic) to read {name}, and "
                            + ("there is none: " + creds.source if creds.anonymous else
                               f"the only one is {creds.describe()}, which Basic auth cannot "
                               "use")))
                    asked = f"with {creds.describe()}"
                    resp = http.get(url, headers=headers,
                                    auth=(creds.username or "", creds.password or ""))
                elif scheme == "bearer":
                    try:
                        token, why = _bearer_token(http, params, f"repository:{path}:pull",
                                                   creds, insecure)
                    except httpx.HTTPError as exc:
                        raise StageFailed("push", (
                            f"pushed {digest}, but its verification failed: registry {host} "
                            f"wants a token (Bearer) to read {name}, and its token endpoint "
                            f"{params.get('realm')} did not answer ({type(exc).__name__}: "
                            f"{exc})")) from None
                    if token is None:
                        return Verification(False, f"registry {host} wants a token (Bearer) to "
                                                   f"read {name}: {why}")
                    asked = (f"with a token from {params.get('realm')} for "
                             f"{creds.describe()}")
                    resp = http.get(url, headers={**headers, "Authorization": f"Bearer {token}"})
                else:
                    return Verification(False, (
                        f"registry {host} answers 401 to a read of {name} with a challenge "
                        f"this runner does not answer: {scheme or '(none)'}"))
    except httpx.HTTPError as exc:
        raise StageFailed("push", f"pushed {digest}, but the registry could not be asked for it "
                                  f"({url}): {exc}") from None
    if resp.status_code in (401, 403):
        return Verification(False, f"registry {host} refused to serve {name}@{digest} {asked} "
                                   f"({resp.status_code}): reading it needs another login")
    if resp.status_code != 200:
        raise StageFailed("push", f"pushed {digest}, but the registry answers "
                                  f"{resp.status_code} for {url}")
    served = resp.headers.get("docker-content-digest")
    body_digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
    if (served and served != digest) or (digest.startswith("sha256:")
                                         and body_digest != digest):
        raise StageFailed("push", f"the registry serves a different manifest for {digest} "
                                  f"(header {served}, body {body_digest})")
    try:
        config = (resp.json().get("config") or {}).get("digest")
    except (ValueError, AttributeError):
        config = None
    if image_id and config and config != image_id:
        raise StageFailed("push", f"the registry's {name}@{digest} is image {config}, not "
                                  f"the image this run built ({image_id})")
    checked = "its content hashes to that digest"
    if image_id and config:
        checked += f" and its config is the image this run built ({image_id})"
    return Verification(True, f"the registry serves {name}@{digest} "
                              f"({resp.headers.get('content-type', '?')}) when read {asked}; "
                              f"{checked}")


def _bearer_token(http: httpx.Client, params: Mapping[str, str], scope: str, creds: Credentials,
                  insecure: bool) -> tuple[str | None, str]:
    """A token for `scope` from the realm of a Bearer challenge (the distribution spec's token
    auth), with `creds` as docker's engine asks: an identity token through the OAuth2 POST
    (grant_type=refresh_token), a username and password as Basic auth on a GET, else
    anonymously. (None, why) when none is given."""
    realm = params.get("realm")
    if not realm or urlsplit(realm).scheme not in ("http", "https"):
        return None, f"its challenge names no usable token endpoint (realm {realm!r})"
    if urlsplit(realm).scheme == "http" and not insecure and not creds.anonymous:
        return None, (f"its token endpoint {realm} is plain HTTP while the registry is not: "
                      f"{creds.describe()} is not sent there")
    service = params.get("service")
    query = {"scope": scope, **({"service": service} if service else {})}
    if creds.identity_token:
        resp = http.post(realm, data={**query, "grant_type": "refresh_token",
                                      "refresh_token": creds.identity_token,
                                      "client_id": OAUTH_CLIENT_ID})
    elif not creds.anonymous:
        resp = http.get(realm, params={**query, "account": creds.username or ""},
                        auth=(creds.username or "", creds.password or ""))
    else:
        resp = http.get(realm, params=query)
    asker = creds.describe()
    if resp.status_code in (401, 403):
        return None, f"its token endpoint {realm} refused {asker} ({resp.status_code})"
    if resp.status_code != 200:
        return None, f"its token endpoint {realm} answered {resp.status_code} for {asker}"
    try:
        data = resp.json()
        token = data.get("token") or data.get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not token:
        return None, f"its token endpoint {realm} gave no token for {asker}"
    return str(token), ""


def _pushed_note(pushed: list[str]) -> str:
    if not pushed:
        return ""
    return "\nalready pushed (these tags stay in the registry): " + ", ".join(pushed)


def _cancel_message(pushed: list[str], refs: list[str]) -> str:
    rest = [r for r in refs if r not in pushed]
    if not pushed:
        return "push cancelled before any tag was pushed"
    return ("push cancelled between tags; pushed (these stay in the registry): "
            + ", ".join(pushed) + "; not pushed: " + ", ".join(rest))
