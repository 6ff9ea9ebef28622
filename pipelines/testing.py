"""The test stage: the project's commands in containers, beside service containers, on the build
engine, between build and scan (nothing untested is scanned, pushed or deployed).

Outputs: runner.outputs.TestOutputs (per step: status, exit code, failing command, counts; the
failed tests). A failed stage raises StageFailed with those outputs, so run.json keeps them.

What it does, in order (the values come from pipelines/testing_plan.py; this module makes the
docker SDK calls, on the engine that built the image: local, or `stages.build.engine`):
1. Reaps what an earlier test stage left behind when its runner process died (SIGKILL): every
   labelled container and network whose runner pid (and start time) is gone from this host.
   That is other runs' objects only, so it goes on in a thread beside everything below.
2. Starts building the steps' Dockerfile `target`s, in a thread, and meanwhile creates the run's
   network and starts the services on it, each reachable by its name, and waits for each one's
   `ready` check; one that never gets ready fails the stage naming it, with the end of its log
   (and stops the build); a build that fails fails the stage as soon as it does.
3. Runs the steps in order, each in its own container: the image this run built (by id: what
   passes is what ships), a Dockerfile `target` (waited for), or another image with the checkout
   copied to /workspace. Each command is `sh -c LINE`, a `docker exec` of its own, so the failing
   one is named; the step's `timeout` kills its container.
4. Copies the JUnit reports out (`get_archive`, matched on this side: no shell), summarises them.
5. Removes every container and the network: a step's container as soon as its reports are out,
   beside the next step; the rest in `finally` (on success, failure, timeout, cancel), all at
   once, then the network. The stage returns only once every removal (and the reap) has ended.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import io
import os
import posixpath
import shlex
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.build import resolve_inside
from pipelines.build_engine import BuildEngine, EngineProblem
from pipelines.buildkit import BuildSpec, NoBuilder, build_argv, detect_builder
from pipelines.junit_summary import ReportSummary, summarise
from pipelines.testing_plan import (
    LABEL_TEST, ContainerSpec, Owner, create_kwargs, exec_argv, is_orphan, operations,
    owner_labels, service_spec, step_image, step_spec, steps_network,
)
from runner.errors import WITHHELD_WHY, Cancelled, RunnerError, SecretWithheld, StageFailed
from runner.model import Pipeline
from runner.model.testing import TargetImage
from runner.outputs import TestFailure, TestOutputs, TestStepResult
from runner.proc import run_command, start_time
from runner.stage import Stage, StageContext

# Where the stage's time goes (TestOutputs.phases), in the order they happen.
PHASES = ("connect", "reap", "network", "service_start", "service_ready", "images", "steps",
          "reports", "cleanup")
_LOG_TAIL = 20  # lines of a service's log shown when a step fails or it never gets ready
_MAX_FAILURES = 20
_POLL = 0.1


class TestStage(Stage):
    __test__ = False  # not a pytest test class
    name = "test"

    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        s = pipeline.stages.test
        owner = Owner("<run id>", 0, None, "<host>")
        return {
            "engine": BuildEngine.of(pipeline).plan(),
            "services": {n: {"image": v.image, "ready": v.ready.model_dump(exclude_none=True)
                             if v.ready else None} for n, v in s.services.items()},
            "steps": [{"name": st.name, "image": step_image(st), "commands": list(st.commands)}
                      for st in s.steps],
            "docker": operations(s, owner, pipeline.name),
        }

    def run(self, ctx: StageContext) -> TestOutputs:
        t0 = time.monotonic()
        owner = Owner(ctx.run_id, os.getpid(), start_time(os.getpid()), socket.gethostname())
        engine = BuildEngine.of(ctx.pipeline)
        from docker.errors import DockerException  # the SDK's import is paid only here

        try:
            client = engine.client(Path(ctx.workdir) / "engine", timeout=120)
        except DockerException as exc:
            raise StageFailed(self.name, f"cannot reach the build engine: {exc}") from None
        run = _TestRun(ctx, client, owner)
        run.phases["connect"] = time.monotonic() - t0
        failure: StageFailed | None = None
        try:
            run.reaper = run.beside(run.reap_orphans)
            run.execute()
        except DockerException as exc:
            failure = StageFailed(self.name, f"docker: {exc}")
        except StageFailed as exc:
            failure = exc
        finally:
            run.cleanup()
            client.close()
        # Built after the cleanup, so that its time is in the outputs' phases too.
        outputs = run.outputs(failure is None)
        if failure is not None:
            failure.outputs = outputs
            raise failure
        return outputs


class _TestRun:
    def __init__(self, ctx: StageContext, client: Any, owner: Owner) -> None:
        self.ctx, self.client, self.owner = ctx, client, owner
        self.settings = ctx.pipeline.stages.test
        self.log = ctx.log
        self.containers: list[Any] = []  # still to remove
        self.network: Any = None
        self.results: list[TestStepResult] = []
        self.summary = ReportSummary()
        self.started_services: list[str] = []
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.reaper: threading.Thread | None = None
        self.removals: list[threading.Thread] = []
        # The Dockerfile targets, built in one thread while the services start (_start_builds).
        self.builder: threading.Thread | None = None
        self.builds_stop = threading.Event()  # the stage's cancel, or a service that failed
        self.built: dict[str, str] = {}  # target -> image id
        self.build_failure: BaseException | None = None

    # ------------------------------------------------------------------ what is left behind
    def reap_orphans(self) -> None:
        """Runs beside the stage (`beside`): it touches only objects of runners that are gone,
        and says so rather than failing this run when the engine cannot list them."""
        from docker.errors import DockerException

        host = self.owner.host
        try:
            dead = [c for c in self.client.containers.list(all=True,
                                                           filters={"label": LABEL_TEST})
                    if is_orphan(c.labels, host, start_time)]
            for c in dead:
                self.log.info(f"removing {c.name}, left by a runner process that is gone")
                _quietly(lambda c=c: c.remove(force=True, v=True))
            for net in self.client.networks.list(filters={"label": LABEL_TEST}):
                if is_orphan(net.attrs.get("Labels") or {}, host, start_time):
                    self.log.info(f"removing network {net.name}, left by a runner process that "
                                  "is gone")
                    _quietly(net.remove)
        except DockerException as exc:
            self.log.warn(f"could not look for what killed runners left behind: {exc}")

    def beside(self, action: Callable[[], None]) -> threading.Thread:
        """`action` in a thread of its own, now; cleanup() waits for it."""
        thread = threading.Thread(target=action, daemon=True)
        thread.start()
        return thread

    def _remove_beside(self, c: Any) -> None:
        """Remove container `c` (forced: its process is killed in the same call) while the run
        goes on; cleanup() waits for the removal."""
        self.containers.remove(c)
        self.removals.append(self.beside(lambda: _quietly(lambda: c.remove(force=True, v=True))))

    def cleanup(self) -> None:
        t0 = time.monotonic()
        if self.reaper is not None:
            self.reaper.join()
            self.reaper = None
        self._took("reap", t0)
        t0 = time.monotonic()
        for c in list(self.containers):  # every container at once, each in a thread
            self._remove_beside(c)
        for removal in self.removals:
            removal.join()
        self.removals.clear()
        if self.network is not None:  # after its containers: docker refuses it before
            _quietly(self.network.remove)
            self.network = None
        self._took("cleanup", t0)
        self.log.info("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.phases.items()
                                           if v >= 0.005))

    def _took(self, phase: str, since: float) -> None:
        """Add the time since monotonic `since` to `phase`."""
        self.phases[phase] += time.monotonic() - since

    # ------------------------------------------------------------------------- the run
    def execute(self) -> None:
        """Services, then the steps; raises StageFailed naming what failed (the outputs are
        the caller's, once everything is removed)."""
        self.secret_values = self._secret_values()
        net = steps_network(self.settings, self.owner)
        if net is not None:
            t0 = time.monotonic()
            self.network = self.client.networks.create(net, driver="bridge",
                                                       labels=owner_labels(self.owner))
            self._took("network", t0)
        self._start_builds()
        try:
            for name in self.settings.services:
                self._start_service(name)
                self._check_builds()
            failed: str | None = None
            for i, step in enumerate(self.settings.steps):
                if failed is not None:
                    self.results.append(TestStepResult(step.name, step_image(step), "not run",
                                                       None, None, 0.0, _counts(None), ()))
                    continue
                failed = self._run_step(i)
        finally:
            self._stop_builds()
        outputs = self.outputs(failed is None)
        if outputs.counts["total"]:
            self.log.info(f"tests: {outputs.summary}")
        for f in outputs.failures:
            self.log.info(f"  {'ERROR' if f.error else 'FAILED'} {f.test}: {f.message}")
        if failed is not None:
            self._service_logs()
            raise StageFailed("test", failed + failed_tests(outputs))

    def outputs(self, passed: bool) -> TestOutputs:
        return TestOutputs(passed=passed, steps=tuple(self.results),
                           services=tuple(self.started_services),
                           counts=dict(self.summary.counts),
                           failures=tuple(self.summary.failures[:_MAX_FAILURES]),
                           phases={k: round(v, 3) for k, v in self.phases.items()})

    def _secret_values(self) -> dict[tuple[str, str], str]:
        """(owner, VAR) -> value for every secret_env of the services and steps this run gets
        (a withheld one is absent: see _create)."""
        out: dict[tuple[str, str], str] = {}
        owners = [(f"services.{n}", s.secret_env) for n, s in self.settings.services.items()]
        owners += [(f"steps.{s.name}", s.secret_env) for s in self.settings.steps]
        for who, secret_env in owners:
            for var, secret in secret_env.items():
                try:
                    out[(who, var)] = self.ctx.secrets.value(secret)
                except SecretWithheld:
                    continue  # a fork's pull request: runs without it, said at _create
                except (KeyError, RunnerError) as exc:
                    raise StageFailed("test", f"stages.test.{who}.secret_env.{var}: pipeline "
                                              f"secret {secret!r} is not available ({exc})") \
                        from None
        return out

    def _create(self, who: str, spec: ContainerSpec) -> Any:
        """The container of `spec` (kept for cleanup) with the secret_env this run gets. A
        withheld one (a fork's pull request) is left out of its environment, as Woodpecker and
        GitLab run a fork's jobs, and the log says which, and why; never a value."""
        withheld = {var: name for var, name in spec.secret_env.items()
                    if (who, var) not in self.secret_values}
        if withheld:
            role, _, name = who.partition(".")
            self.log.warn(f"{role.rstrip('s')} {name}: runs without secret_env "
                          + ", ".join(f"{var} (secret {secret!r})" for var, secret in withheld.items())
                          + f": withheld ({WITHHELD_WHY})")
            spec = dataclasses.replace(spec, secret_env={
                var: secret for var, secret in spec.secret_env.items() if var not in withheld})
        c = self.client.containers.create(**create_kwargs(
            spec, {var: self.secret_values[(who, var)] for var in spec.secret_env}))
        self.containers.append(c)
        return c

    # ---------------------------------------------------------------------- services
    def _start_service(self, name: str) -> None:
        svc = self.settings.services[name]
        spec = service_spec(self.settings, name, self.owner)
        self.log.info(f"service {name}: starting {spec.image}")
        t0 = time.monotonic()
        _pull_if_missing(self.client, spec.image)
        c = self._create(f"services.{name}", spec)
        c.start()
        self.started_services.append(name)
        self._took("service_start", t0)
        t0 = time.monotonic()
        try:
            self._wait_ready(name, c)
        finally:
            self._took("service_ready", t0)
        self.log.info(f"service {name}: ready in {time.monotonic() - t0:.2f}s")

    def _wait_ready(self, name: str, c: Any) -> None:
        from docker.errors import APIError

        svc = self.settings.services[name]
        deadline = time.monotonic() + svc.timeout
        while True:
            self._check_cancel()
            self._check_builds()
            c.reload()
            if c.status not in ("running", "created", "restarting"):
                raise StageFailed("test", f"service {name!r} exited (code "
                                          f"{c.attrs['State'].get('ExitCode')}) before it was "
                                          f"ready; its log ends:\n{_tail(c)}")
            try:
                if svc.ready is None or _ready(c, svc.ready):
                    break
            except APIError:
                c.reload()
                if c.status == "running":
                    raise
                continue  # it stopped between the reload and the check: the top says how
            if time.monotonic() > deadline:
                what = f"port {svc.ready.port}" if svc.ready.port else \
                    "command " + shlex.join(svc.ready.command or ())
                raise StageFailed("test", f"service {name!r} was not ready ({what}) within "
                                          f"{svc.timeout:g}s; its log ends:\n{_tail(c)}")
            time.sleep(_POLL)

    def _service_logs(self) -> None:
        for c in self.containers:
            name = c.labels.get("runner.test.service")
            if name:
                self.log.info(f"service {name}: its log ends:\n{_tail(c)}")

    # ------------------------------------------------------------------------- steps
    def _image_for(self, i: int) -> str:
        step = self.settings.steps[i]
        if step.image is None:
            build = self.ctx.outputs.build
            if build is None:
                raise StageFailed("test", f"step {step.name!r} runs in the image this run "
                                          "builds, and the build stage did not run (add it to "
                                          "--only, or give the step an image)")
            return build.image_id
        if isinstance(step.image, TargetImage):
            return self._await_target(step.image.target)
        _pull_if_missing(self.client, step.image)
        return step.image

    # ------------------------------------------------------------ Dockerfile targets
    def _start_builds(self) -> None:
        """Build every step's Dockerfile target, in step order, in one thread, while this one
        starts the services and waits for them (initdb and a pip install hide each other)."""
        targets = list(dict.fromkeys(s.image.target for s in self.settings.steps
                                     if isinstance(s.image, TargetImage)))
        if not targets:
            return

        def build() -> None:
            for target in targets:
                t0 = time.monotonic()
                try:
                    self.built[target] = self._build_target(target)
                except BaseException as exc:  # noqa: BLE001 - raised in the stage's thread
                    self.build_failure = exc
                    return
                self.log.info(f"target {target}: built in {time.monotonic() - t0:.2f}s, "
                              "beside the services")

        self.builder = self.beside(build)

    def _check_builds(self) -> None:
        """Raise the build's failure (StageFailed, or Cancelled) in the stage's thread."""
        if self.build_failure is not None:
            raise self.build_failure

    def _await_target(self, target: str) -> str:
        assert self.builder is not None
        while target not in self.built and self.builder.is_alive():
            if self.ctx.cancel.is_set():
                self.builds_stop.set()  # the build stops and raises Cancelled
            self.builder.join(_POLL)
        self._check_builds()
        return self.built[target]

    def _stop_builds(self) -> None:
        """Stop a build still running (a service failed, a step failed first, a cancel) and
        wait for its thread: nothing of the stage outlives it."""
        if self.builder is not None:
            self.builds_stop.set()
            self.builder.join()
            self.builder = None

    def _build_target(self, target: str) -> str:
        """Dockerfile stage `target`, built the build stage's way (same context, args, engine:
        its cache), untagged; its id."""
        ctx = self.ctx
        settings = ctx.pipeline.stages.build
        checkout = ctx.outputs.checkout
        if checkout is None:
            raise StageFailed("test", "image: {target: ...} needs the checkout stage")
        try:
            context = resolve_inside(checkout.path, settings.context, "stages.build.context")
            dockerfile = resolve_inside(
                checkout.path, os.path.join(os.path.relpath(context, checkout.path.resolve()),
                                            settings.dockerfile), "stages.build.dockerfile")
        except ValueError as exc:
            raise StageFailed("test", str(exc)) from None
        if settings.secrets:
            raise StageFailed("test", f"image: {{target: {target}}}: the build uses "
                                      "stages.build.secrets, which a test target does not get; "
                                      "run the step in the built image or another image")
        engine = BuildEngine.of(ctx.pipeline)
        try:
            builder = detect_builder(cache_file=Path(ctx.cache_dir) / "builder.json")
            env = engine.cli_env(Path(ctx.workdir) / "engine")
        except (NoBuilder, EngineProblem) as exc:
            raise StageFailed("test", str(exc)) from None
        iidfile = Path(ctx.workdir) / "test" / f"target-{target}.id"
        iidfile.parent.mkdir(parents=True, exist_ok=True)
        iidfile.unlink(missing_ok=True)
        spec = BuildSpec(context=str(context), dockerfile=str(dockerfile), target=target,
                         args=dict(settings.args), iidfile=str(iidfile),
                         platform=settings.platform)
        argv = build_argv(builder, spec, engine.cli_args())
        self.log.info("building target: " + shlex.join(argv))
        env.update(builder.env())
        result = run_command(argv, on_line=self.log.line, cancel=self.builds_stop, env=env,
                             cwd=str(context), timeout=settings.timeout)
        if result.returncode != 0 or not iidfile.is_file():
            tail = "\n".join(f"  {ln}" for ln in result.output.splitlines()[-8:])
            raise StageFailed("test", f"building Dockerfile target {target!r} failed "
                                      f"(exit {result.returncode}):\n{tail}")
        return iidfile.read_text().strip()

    def _run_step(self, i: int) -> str | None:
        """Run step i; None when it passed, else why the stage fails."""
        step = self.settings.steps[i]
        t0 = time.monotonic()
        image = self._image_for(i)
        self._took("images", t0)
        t_step = time.monotonic()
        spec = step_spec(self.settings, i, self.owner, self.ctx.pipeline.name, image)
        self.log.info(f"step {step.name}: in {image}")
        c = self._create(f"steps.{step.name}", spec)
        if spec.workspace:
            self._copy_checkout(c)
        if not spec.runs_its_command:
            c.start()
        deadline = t0 + step.timeout
        status, exit_code, failed_command, why = "passed", None, None, None
        for command in step.commands:
            self.log.info(f"step {step.name}: $ {command}")
            code = self._run_own(c, deadline) if spec.runs_its_command else \
                self._exec(c, command, deadline)
            if code is None:
                status, failed_command = "timed out", command
                why = (f"step {step.name!r} timed out after {step.timeout:g}s in: {command}")
                break
            exit_code = code
            if code != 0:
                status, failed_command = "failed", command
                why = f"step {step.name!r} failed: {command!r} exited with code {code}"
                break
        self._took("steps", t_step)
        reports, summary = self._reports(c, spec, step.name)
        self.summary.add(summary)
        for warning in summary.warnings:
            self.log.warn(f"step {step.name}: {warning}")
        self._remove_beside(c)
        duration = time.monotonic() - t0
        self.results.append(TestStepResult(step.name, image, status, exit_code, failed_command,
                                           round(duration, 3), _counts(summary), reports))
        if why is None and summary.counts["failed"] + summary.counts["errors"]:
            # The commands passed but a report says otherwise: the report is the truth.
            why = f"step {step.name!r}: its reports have failed tests"
            self.results[-1] = TestStepResult(step.name, image, "failed", exit_code, None,
                                              round(duration, 3), _counts(summary), reports)
        self.log.info(f"step {step.name}: {self.results[-1].status} ({duration:.2f}s)")
        return why

    def _copy_checkout(self, c: Any) -> None:
        checkout = self.ctx.outputs.checkout
        if checkout is None:
            raise StageFailed("test", "a step in another image needs the checkout stage (its "
                                      "work tree is copied to /workspace)")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(str(checkout.path), arcname="workspace")
        c.put_archive("/", buf.getvalue())

    def _exec(self, c: Any, command: str, deadline: float) -> int | None:
        """Run one command in the step's container, its output in the log; its exit code, or
        None when the step's deadline passed (the container is killed)."""
        api = self.client.api
        exec_id = api.exec_create(c.id, exec_argv(command))["Id"]
        stream = api.exec_start(exec_id, stream=True, demux=False)
        if not self._follow(c, stream, deadline):
            return None
        return api.exec_inspect(exec_id).get("ExitCode")

    def _run_own(self, c: Any, deadline: float) -> int | None:
        """Start the container of a step whose one command is its own process (attached first,
        as `docker run` does), its output in the log; its exit code, or None when the step's
        deadline passed (it is killed). It stays, stopped, for its reports."""
        api = self.client.api
        stream = api.attach(c.id, stdout=True, stderr=True, stream=True, logs=True)
        c.start()
        if not self._follow(c, stream, deadline):
            return None
        return api.wait(c.id).get("StatusCode")

    def _follow(self, c: Any, stream: Any, deadline: float) -> bool:
        """Log `stream`'s lines until it ends (True), or kill `c` at the deadline or a cancel
        (False; Cancelled is raised for a cancel)."""
        done = threading.Event()
        pending = [""]

        def pump() -> None:
            try:
                for chunk in stream:
                    text = pending[0] + chunk.decode("utf-8", "replace")
                    *lines, pending[0] = text.split("\n")
                    for line in lines:
                        self.log.line(line)
            except Exception:  # noqa: BLE001 - the stream ends when the container is killed
                pass
            finally:
                if pending[0]:
                    self.log.line(pending[0])
                done.set()

        threading.Thread(target=pump, daemon=True).start()
        while not done.wait(_POLL):
            if self.ctx.cancel.is_set() or time.monotonic() > deadline:
                _quietly(lambda: c.kill())
                done.wait(10)
                self._check_cancel()
                return False
        return True

    def _check_cancel(self) -> None:
        if self.ctx.cancel.is_set():
            raise Cancelled("cancelled")

    def _reports(self, c: Any, spec: ContainerSpec, step: str) -> tuple[tuple[str, ...],
                                                                         ReportSummary]:
        summary = ReportSummary()
        if not spec.reports:
            return (), summary
        t0 = time.monotonic()
        workdir = spec.workdir or c.attrs.get("Config", {}).get("WorkingDir") or "/"
        dest = Path(self.ctx.workdir) / "test" / step
        copied: list[str] = []
        for glob in spec.reports:
            pattern = posixpath.normpath(posixpath.join(workdir, glob))
            files = _copy_matching(c, pattern, dest)
            if not files:
                summary.warnings.append(f"report glob {glob!r} matched no file (in {workdir})")
            for path, shown in files:
                copied.append(str(path))
                summary.add(summarise(path, step, shown))
        self._took("reports", t0)
        return tuple(copied), summary


def _copy_matching(c: Any, pattern: str, dest: Path) -> list[tuple[Path, str]]:
    """The files in container `c` matching absolute glob `pattern`, copied under `dest`:
    [(local path, path in the container)]. The archive of the pattern's fixed directory is
    fetched and matched here (no shell in the container)."""
    from docker.errors import NotFound

    parts = pattern.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(ch in p for ch in "*?[")), len(parts))
    base = "/".join(parts[:fixed]) or "/"
    try:
        stream, _ = c.get_archive(base)
        data = b"".join(stream)
    except NotFound:
        return []
    found = []
    parent = posixpath.dirname(base.rstrip("/")) or "/"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            inside = posixpath.join(parent, member.name)
            if not member.isfile() or not fnmatch.fnmatchcase(inside, pattern):
                continue
            local = dest / member.name.replace("/", "_")
            local.parent.mkdir(parents=True, exist_ok=True)
            extracted = tar.extractfile(member)
            if extracted is not None:
                local.write_bytes(extracted.read())
                found.append((local, inside))
    return found


def failed_tests(outputs: TestOutputs, shown: int = 3) -> str:
    """The reports' verdict for the failure's one-line reason (the run's error: the terminal's
    last line, run.json, the dashboard, a commit status): `(1 passed, 2 failed: a, b)`."""
    if not outputs.failures:
        return ""
    bad = outputs.counts.get("failed", 0) + outputs.counts.get("errors", 0)
    names = ", ".join(f.test for f in outputs.failures[:shown])
    more = f" and {bad - shown} more" if bad > shown else ""
    return f" ({outputs.summary}: {names}{more})"


def _counts(summary: ReportSummary | None) -> dict[str, int]:
    return dict(summary.counts) if summary is not None else ReportSummary().counts


def _ready(c: Any, ready: Any) -> bool:
    if ready.command:
        result = c.exec_run(list(ready.command))
        return result.exit_code == 0
    # Listening on the port, as the service's own kernel view says (works for a local or a
    # remote engine alike, with no tool in the image beyond `cat`).
    result = c.exec_run(["cat", "/proc/net/tcp", "/proc/net/tcp6"])
    return result.exit_code == 0 and listening(result.output.decode("ascii", "replace"),
                                               ready.port)


def listening(proc_net_tcp: str, port: int) -> bool:
    """Whether /proc/net/tcp{,6} text shows a socket listening (state 0A) on `port`."""
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and ":" in fields[1] and fields[3] == "0A":
            try:
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
            except ValueError:
                continue
    return False


def _tail(c: Any) -> str:
    try:
        text = c.logs(tail=_LOG_TAIL).decode("utf-8", "replace").rstrip()
    except Exception as exc:  # noqa: BLE001 - a log that cannot be read is said, not raised
        return f"  (its log cannot be read: {exc})"
    return "\n".join(f"  {line}" for line in text.splitlines()) or "  (empty)"


def _pull_if_missing(client: Any, image: str) -> None:
    from docker.errors import ImageNotFound

    try:
        client.images.get(image)
    except ImageNotFound:
        client.images.pull(image)


def _quietly(action: Any) -> None:
    from docker.errors import DockerException, NotFound

    try:
        action()
    except (NotFound, DockerException):
        pass


__all__ = ["TestStage", "TestFailure", "failed_tests", "listening"]
