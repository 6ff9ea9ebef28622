"""The checks the model cannot do alone, on the interpolated data of a pipeline file.

The format version; each secret's source (exactly one of `env:` / `file:` / `command:`) and every reference
to a secret naming one that is defined; a top-level `env:` with no deploy to reach; the
repository URL and ref as git will be given them (as written, before relative paths are
resolved); the image name and tag templates. They run on the raw data, so that they are reported
along with the model's own problems, each at its place.
"""
from __future__ import annotations

from typing import Any

from runner import tags as _tags
from runner.errors import InvalidInput, Problem
from runner.gitsafety import check_ref, check_repo_url
from runner.loader.locations import SourceMap
from runner.loader.mapping import suggest
from runner.loader.secret_refs import secret_references

SUPPORTED_VERSIONS = (1,)


def repository_checks(data: dict[str, Any], smap: SourceMap) -> list[Problem]:
    """The repository URL and ref as git will be given them. Run before relative paths are
    made absolute: `-oProxyCommand=x` would pass as `<the file's dir>/-oProxyCommand=x`."""
    problems: list[Problem] = []
    repo = data.get("repository")
    if isinstance(repo, dict):
        for key, check in (("url", check_repo_url), ("ref", check_ref)):
            if isinstance(repo.get(key), str):
                try:
                    check(repo[key])
                except InvalidInput as exc:
                    problems.append(smap.problem(("repository", key), str(exc)))
    return problems


def cross_checks(data: dict[str, Any], smap: SourceMap) -> list[Problem]:
    """The problems of `data` beyond what `Pipeline` validation finds."""
    problems: list[Problem] = []
    version = data.get("version", 1)
    if isinstance(version, int) and not isinstance(version, bool) \
            and version not in SUPPORTED_VERSIONS:
        problems.append(smap.problem(("version",), f"unsupported version {version} (this runner "
                                     f"reads version {', '.join(map(str, SUPPORTED_VERSIONS))})"))
    secrets = data.get("secrets")
    names: set[str] = set()
    if isinstance(secrets, dict):
        names = set(secrets)
        for name, src in secrets.items():
            if not isinstance(src, dict):
                continue
            given = [k for k in ("env", "file", "command") if src.get(k) is not None]
            if len(given) != 1:
                what = " and ".join(given) if given else "none"
                problems.append(smap.problem(
                    ("secrets", name), f"secret '{name}' needs exactly one of 'env:' (an "
                    f"environment variable), 'file:' (a path) or 'command:' (an argv), {what} "
                    "given", key=True))
            elif "timeout" in src and given != ["command"]:
                problems.append(smap.problem(("secrets", name, "timeout"), "timeout is how long "
                                             "a secret's command may run: this secret has none",
                                             key=True))
    for path, name in secret_references(data):
        if name not in names:
            hint = suggest(name, sorted(names))
            known = f"; defined: {', '.join(sorted(names))}" if names and not hint else ""
            problems.append(smap.problem(path, f"unknown secret '{name}'{hint} (add it under "
                                         f"secrets:{known})"))
    stages = data.get("stages")
    if data.get("env") and not (isinstance(stages, dict) and "deploy" in stages):
        problems.append(smap.problem(
            ("env",), "the top-level env is the environment of the deployed container, and "
            "this pipeline has no stages.deploy section, so it would reach nothing: remove it, "
            "or add the deploy (a Dockerfile gets its values as stages.build.args)", key=True))
    image = data.get("image")
    if isinstance(image, dict):
        if isinstance(image.get("name"), str):
            message = _tags.validate_image_name(image["name"])
            if message:
                problems.append(smap.problem(("image", "name"), message))
        if isinstance(image.get("tags"), list):
            for i, template in enumerate(image["tags"]):
                if isinstance(template, str):
                    message = _tags.validate_template(template)
                    if message:
                        problems.append(smap.problem(("image", "tags", i), message))
    return problems
