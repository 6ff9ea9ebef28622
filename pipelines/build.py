"""The build stage: the checked-out code -> an image in the build engine, built by BuildKit through
a docker CLI.

Outputs: runner.outputs.BuildOutputs (the image's id, its full "name:tag" refs, which CLI built
on which engine, how many steps were cached); it reads the checkout's (ctx.outputs.checkout).

The build engine is the runner's own (DOCKER_HOST) unless `stages.build.engine` names another
machine's (pipelines/build_engine.py): then the CLI sends the context there, the image stays
there, and scan and push read it from there. The engine is asked first, with the CLI that will
build (buildkit.check_engine), so an unreachable or unfit engine fails the stage with its name
before anything is sent.

The build cache lives in the engine: on the lab it is one long-lived dockerd, so a second build
of the same code reuses its layers and cache mounts; a remote builder keeps its own the same
way. A fresh engine has no cache; there `stages.build.cache_from` (a registry image pushed with
inline cache, `cache_to: [type=inline]`) is the fallback. See pipelines/buildkit.py.
"""
from __future__ import annotations

import os
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.build_engine import BuildEngine, EngineProblem
from pipelines.buildkit import (
    BuildSecretRef,
    BuildSpec,
    NoBuilder,
    Progress,
    build_argv,
    build_warnings,
    check_engine,
    check_secret_id,
    detect_builder,
    secret_env_var,
)
from runner.errors import RunnerError, StageFailed
from runner.model import Pipeline
from runner.outputs import BuildOutputs
from runner.proc import run_command
from runner.stage import Stage, StageContext
from runner.tags import GitInfo, compute_tags, oci_labels

_TAIL = 8  # output lines quoted in a failure message


def resolve_inside(root: Path, relative: str, what: str) -> Path:
    """`root/relative`, refused (ValueError) when it is absolute or leaves `root`, lexically
    (`..`) or through a symlink."""
    if os.path.isabs(relative):
        raise ValueError(f"{what} {relative!r} must be relative to the repository")
    root = root.resolve()
    lexical = os.path.normpath(os.path.join(str(root), relative))
    candidate = Path(lexical).resolve()
    for path in (Path(lexical), candidate):
        if path != root and root not in path.parents:
            raise ValueError(f"{what} {relative!r} leaves the checked-out repository")
    return candidate


def failure_message(progress: Progress, output: str, returncode: int) -> str:
    """Why the build failed, naming the failing Dockerfile step and its last error lines."""
    step = progress.failed_step
    parts: list[str] = []
    if step is not None:
        parts.append(f"step {step.name} failed: {step.error}")
        if step.log:
            parts.append("last output of that step:\n" + "\n".join(
                f"  {line}" for line in list(step.log)[-_TAIL:]))
    summary = [m for m in progress.messages if step is None or m not in parts[0]]
    if summary:
        parts.append("\n".join(summary[-3:]))
    if not parts:
        tail = [line for line in output.splitlines() if line.strip()][-_TAIL:]
        parts.append(f"docker build exited with code {returncode}:\n"
                     + "\n".join(f"  {line}" for line in tail))
    return "\n".join(parts)


class BuildStage(Stage):
    name = "build"

    def plan(self, pipeline: Pipeline) -> dict[str, Any]:
        s = pipeline.stages.build
        return {
            "image": pipeline.image.name,
            "tags": list(pipeline.image.tags),
            "context": s.context,
            "dockerfile": s.dockerfile,
            "target": s.target,
            "args": dict(s.args),
            "secrets": [b.id for b in s.secrets],
            "labels": dict(s.labels),
            "cache_from": list(s.cache_from),
            "cache_to": list(s.cache_to),
            "pull": s.pull,
            "platform": s.platform,
            "engine": BuildEngine.of(pipeline).plan(),
        }

    def run(self, ctx: StageContext) -> BuildOutputs:
        settings = ctx.pipeline.stages.build
        checkout = ctx.outputs.checkout
        if checkout is None:
            raise StageFailed(self.name,
                              "no checked-out work tree (the checkout stage did not run)")
        root = checkout.path
        try:
            context = resolve_inside(root, settings.context, "stages.build.context")
            dockerfile = resolve_inside(
                root, os.path.join(os.path.relpath(context, root.resolve()), settings.dockerfile),
                "stages.build.dockerfile")
        except ValueError as exc:
            raise StageFailed(self.name, str(exc)) from None
        if not context.is_dir():
            raise StageFailed(self.name, f"build context {settings.context!r} is not a directory "
                                         "in the repository")
        if not dockerfile.is_file():
            raise StageFailed(self.name, f"no Dockerfile at {settings.dockerfile!r} in context "
                                         f"{settings.context!r}")

        engine = BuildEngine.of(ctx.pipeline)
        engine_dir = Path(ctx.workdir) / "engine"
        try:
            builder = detect_builder(cache_file=Path(ctx.cache_dir) / "builder.json")
            env = engine.cli_env(engine_dir)
            where = ""
            if engine.settings is not None:
                info = check_engine(builder, engine.cli_args(), env, engine.label,
                                    engine.explain, engine.settings.connect_timeout + 15)
                where = f", on build engine {engine.describe()}: {info.describe()}"
        except (NoBuilder, EngineProblem) as exc:
            raise StageFailed(self.name, str(exc)) from None
        ctx.log.info(f"builder: {builder.describe()}{where}")

        sha = checkout.commit
        git = GitInfo(sha, checkout.branch, checkout.tag, checkout.default_branch)
        try:
            tags = compute_tags(list(ctx.pipeline.image.tags), git, ctx.run_id)
        except ValueError as exc:  # the loader checks templates; a hand-built Pipeline may not
            raise StageFailed(self.name, f"image.tags: {exc}") from None
        refs = [f"{ctx.pipeline.image.name}:{t}" for t in dict.fromkeys(tags)]
        if not refs:
            raise StageFailed(self.name, "no image tag: every template in image.tags was empty "
                                         "for this commit")

        # The commit's time, not the build's: a rebuild of the same commit from cache is then
        # the same image, so its digest and the deploy's "unchanged" check hold.
        created = checkout.committed_at or \
            datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        labels = {**oci_labels(checkout.url, sha, created), **settings.labels}

        secret_refs: list[BuildSecretRef] = []
        secret_env: dict[str, str] = {}
        for item in settings.secrets:
            problem = check_secret_id(builder, item.id)
            if problem:
                raise StageFailed(self.name, problem)
            try:
                value = ctx.secrets.value(item.secret)
            except (KeyError, RunnerError) as exc:
                raise StageFailed(self.name, f"build secret {item.id!r}: pipeline secret "
                                             f"{item.secret!r} is not available ({exc})") from None
            var = secret_env_var(builder, item.id)
            secret_refs.append(BuildSecretRef(item.id, var))
            secret_env[var] = value

        # The id comes from the build itself, not from looking up a tag afterwards: another
        # build may re-tag the same name in between.
        iidfile = Path(ctx.workdir) / "build" / "image-id"
        iidfile.parent.mkdir(parents=True, exist_ok=True)
        iidfile.unlink(missing_ok=True)
        spec = BuildSpec(
            context=str(context), dockerfile=str(dockerfile), tags=tuple(refs),
            iidfile=str(iidfile),
            target=settings.target, args=dict(settings.args), secrets=tuple(secret_refs),
            labels=labels, cache_from=settings.cache_from, cache_to=settings.cache_to,
            pull=settings.pull, platform=settings.platform)
        for warning in build_warnings(builder, spec):
            ctx.log.warn(warning)
        argv = build_argv(builder, spec, engine.cli_args())
        ctx.log.info("running: " + shlex.join(argv))

        env.update(builder.env())
        env.update(secret_env)
        progress = Progress()

        def on_line(text: str) -> None:
            ctx.log.line(text)
            progress.feed(text)

        result = run_command(argv, on_line=on_line, cancel=ctx.cancel, env=env, cwd=str(context),
                             timeout=settings.timeout)
        if result.returncode != 0:
            if result.returncode == -1 and \
                    result.output.rsplit("\n", 1)[-1].startswith("timed out after"):
                raise StageFailed(self.name, f"build timed out after {settings.timeout:.0f}s")
            raise StageFailed(self.name, failure_message(progress, result.output,
                                                         result.returncode))

        built_id = iidfile.read_text().strip() if iidfile.is_file() else ""
        # The CLI writes the id the engine gave the image it just stored; asking the engine again
        # would only cost the docker SDK's import (~0.25 s of a 0.6 s code-only rebuild).
        image_id = built_id if built_id.startswith("sha256:") else \
            _image_id(engine, engine_dir, refs[0])
        for step in progress.steps.values():
            ctx.log.info(f"{'CACHED' if step.cached else 'ran   '} {step.name}")
        ctx.log.info(f"built {image_id} as {', '.join(refs)}: {progress.cached_steps} of "
                     f"{progress.total_steps} steps cached")
        return BuildOutputs(image_id=image_id, tags=tuple(refs), builder=builder.kind,
                            engine="local" if engine.local else engine.label,
                            cached_steps=progress.cached_steps,
                            total_steps=progress.total_steps)


def _image_id(engine: BuildEngine, engine_dir: Path, ref: str) -> str:
    """The engine's id for `ref` (an image id or a tag): the build engine really has it."""
    from docker.errors import DockerException, ImageNotFound  # only once something was built

    try:
        client = engine.client(engine_dir)
    except DockerException as exc:
        raise StageFailed("build", f"cannot reach the build engine to inspect {ref}: {exc}") \
            from None
    try:
        return client.images.get(ref).id
    except ImageNotFound:
        raise StageFailed("build", f"the build succeeded but the engine has no image {ref}; "
                                   "is DOCKER_HOST the engine the docker CLI built on?") from None
    except DockerException as exc:
        raise StageFailed("build", f"cannot inspect {ref}: {exc}") from None
    finally:
        client.close()
