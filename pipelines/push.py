"""The push stage: every tag the build produced -> the registry, through the docker SDK.

Outputs (ctx.results["push"]): digest ("sha256:..."), ref ("name@sha256:..."), tags.

- The SDK's push returns HTTP 200 and raises nothing when the registry refuses: the whole stream
  is read, and an item with "error"/"errorDetail" is a failure. The digest comes from the final
  {"aux": {"Digest": ...}} item; every tag of one image must give the same digest.
- Transient errors (connection refused/reset, 5xx, TLS handshake or i/o timeouts) are retried up
  to `stages.push.retries` times with backoff; auth/denied errors are not retried.
- Credentials go to the engine per push (auth_config), are never stored and never logged.
- "Never half-pushed": the digest is only reported once every tag is pushed. On cancel the stage
  stops between tags; a tag that was already pushed stays in the registry, and the message says
  which ones.
- Afterwards the registry itself is asked for the manifest by digest (GET /v2/<repo>/manifests/
  <digest>), over plain HTTP when the engine treats the registry as insecure (as on the lab).
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from pipelines.base import Stage, StageContext
from runner.errors import Cancelled, RunnerError, StageFailed
from runner.model import Pipeline
from runner.tags import split_image_name

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
    r"broken pipe|unexpected eof|\bEOF\b|temporarily unavailable|too many requests|"
    r"\b5\d\d\b|internal server error|bad gateway|service unavailable|gateway timeout",
    re.I)


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


def split_ref(ref: str) -> tuple[str, str]:
    """"host:5000/a/b:tag" -> ("host:5000/a/b", "tag"). A ref without a tag gets "latest"."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, "latest"


def split_name(name: str) -> tuple[str, str]:
    """Repository name -> (registry host, path in that registry), as docker reads names."""
    registry, path = split_image_name(name)
    if registry is not None:
        return registry, path
    return "registry-1.docker.io", path if "/" in path else f"library/{path}"


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


# ---------------------------------------------------------------------------------------------
# The stage


class PushStage(Stage):
    name = "push"

    def __init__(self, backoff_base: float = 1.0, verify_timeout: float = 10.0):
        self.backoff_base = backoff_base
        self.verify_timeout = verify_timeout

    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        s = pipeline.stages.push
        return {
            "image": pipeline.image.name,
            "registry": split_name(pipeline.image.name)[0],
            "username": s.auth.username,
            "password_secret": s.auth.password_secret,
            "retries": s.retries,
        }

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import docker
        from docker.errors import DockerException

        settings = ctx.pipeline.stages.push
        build = ctx.results.get("build") or {}
        refs = list(build.get("tags") or [])
        if not refs:
            raise StageFailed(self.name, "nothing to push: the build stage produced no tags")
        auth_config = self._auth(ctx)

        try:
            client = docker.from_env()
        except DockerException as exc:
            raise StageFailed(self.name, f"cannot reach the build engine: {exc}") from None
        pushed: list[str] = []
        digests: dict[str, str] = {}
        try:
            for ref in refs:
                if ctx.cancel.is_set():
                    raise Cancelled(_cancel_message(pushed, refs))
                digests[ref] = self._push_one(client, ref, build.get("image_id"), auth_config,
                                              settings.retries, ctx, pushed, refs)
                pushed.append(ref)
                ctx.log.info(f"pushed {ref} ({digests[ref]})")
            distinct = sorted(set(digests.values()))
            if len(distinct) != 1:
                raise StageFailed(self.name, "the tags of one image gave different digests: "
                                  + ", ".join(f"{r} -> {d}" for r, d in digests.items()))
            digest = distinct[0]
            try:
                registry_config = client.info().get("RegistryConfig")
            except DockerException:
                registry_config = None
        finally:
            client.close()

        name = split_ref(refs[0])[0]
        try:
            self._verify(ctx, name, digest, build.get("image_id"), auth_config, registry_config)
        except StageFailed as exc:
            raise StageFailed(self.name, exc.reason + _pushed_note(pushed)) from None
        return {"digest": digest, "ref": f"{name}@{digest}", "tags": pushed}

    # -----------------------------------------------------------------------------------------

    def _auth(self, ctx: StageContext) -> dict[str, str] | None:
        auth = ctx.pipeline.stages.push.auth
        if not auth.username and not auth.password_secret:
            return None
        if not (auth.username and auth.password_secret):
            raise StageFailed(self.name, "stages.push.auth needs both username and password")
        try:
            password = ctx.secrets.value(auth.password_secret)
        except (KeyError, RunnerError) as exc:
            raise StageFailed(self.name, f"registry password secret {auth.password_secret!r} is "
                                         f"not available ({exc})") from None
        return {"username": auth.username, "password": password}

    def _push_one(self, client: Any, ref: str, image_id: str | None,
                  auth_config: dict[str, str] | None, retries: int, ctx: StageContext,
                  pushed: list[str], refs: list[str]) -> str:
        from docker.errors import APIError, DockerException
        from requests.exceptions import RequestException

        repo, tag = split_ref(ref)
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
        for attempt in range(1, attempts + 1):
            try:
                items = client.api.push(repo, tag=tag, stream=True, decode=True,
                                        auth_config=auth_config)
                outcome = read_push_stream(items, ctx.log.line)
                if outcome.digest is not None:
                    return outcome.digest
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
            registry = split_name(repo)[0]
            if auth_config:
                message += (f"\nauthentication failed: registry {registry} refused user "
                            f"{auth_config['username']!r} (or its access to {repo}); check "
                            "stages.push.auth")
            else:
                message += (f"\nauthentication failed: registry {registry} wants a login; "
                            "check stages.push.auth (username, password)")
        elif "connection refused" in error.lower():
            message += f"\nis a registry listening at {split_name(repo)[0]}?"
        raise StageFailed(self.name, message + _pushed_note(pushed))

    def _verify(self, ctx: StageContext, name: str, digest: str, image_id: str | None,
                auth_config: dict[str, str] | None, registry_config: Any) -> None:
        host, path = split_name(name)
        scheme = "http" if registry_is_insecure(host, registry_config) else "https"
        url = f"{scheme}://{host}/v2/{path}/manifests/{digest}"
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        basic = (auth_config["username"], auth_config["password"]) if auth_config else None
        # trust_env=False: the registry is reached directly, never through a proxy from the env.
        try:
            with httpx.Client(timeout=self.verify_timeout, trust_env=False) as http:
                resp = http.get(url, headers=headers, auth=basic)
                if resp.status_code == 401 and basic is not None:
                    token = _bearer_token(http, resp.headers.get("www-authenticate", ""), basic)
                    if token:
                        resp = http.get(url, headers={**headers,
                                                      "Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise StageFailed(self.name, f"pushed {digest}, but the registry could not be asked "
                                         f"for it ({url}): {exc}") from None
        if resp.status_code != 200:
            raise StageFailed(self.name, f"pushed {digest}, but the registry answers "
                                         f"{resp.status_code} for {url}")
        served = resp.headers.get("docker-content-digest")
        body_digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
        if (served and served != digest) or (digest.startswith("sha256:")
                                             and body_digest != digest):
            raise StageFailed(self.name, f"the registry serves a different manifest for {digest} "
                                         f"(header {served}, body {body_digest})")
        try:
            config = (resp.json().get("config") or {}).get("digest")
        except ValueError:
            config = None
        if image_id and config and config != image_id:
            raise StageFailed(self.name, f"the registry's {name}@{digest} is image {config}, not "
                                         f"the image this run built ({image_id})")
        ctx.log.info(f"verified: the registry serves {name}@{digest} "
                     f"({resp.headers.get('content-type', '?')})")


def _bearer_token(http: httpx.Client, challenge: str, basic: tuple[str, str]) -> str | None:
    """Token auth (the distribution spec's Bearer challenge), for registries that use it."""
    if not challenge.lower().startswith("bearer "):
        return None
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", None)
    if not realm:
        return None
    resp = http.get(realm, params=params, auth=basic)
    if resp.status_code != 200:
        return None
    data = resp.json()
    return data.get("token") or data.get("access_token")


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
