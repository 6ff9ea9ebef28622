"""The pipeline format's JSON Schema and reference (runner/model/reference.py): generated from
the model, committed in docs/, and truthful: what the loader accepts, the schema accepts, and
the other way round for the mistakes it can see. The stage-output reference
(docs/stage-outputs.md) is generated and checked the same way."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from runner.cli import cli
from runner.errors import InvalidInput
from runner.loader import load_pipeline, load_pipeline_text, secret_references
from runner.daemon.config import DaemonConfig
from runner.daemon.reference import DAEMON_CONFIG_BEGIN, DAEMON_CONFIG_FILE, DOCS as ALL_DOCS
from runner.model import reference
from runner.model.words import fields_of

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SCHEMA = json.loads((DOCS / "pipeline.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


class _Yaml12ish(yaml.SafeLoader):
    """YAML as a JSON Schema validator sees it: JSON has no dates, so a date stays the string it
    was written as (what yaml-language-server does too)."""


_Yaml12ish.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def as_json(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12ish)


def schema_errors(data: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in VALIDATOR.iter_errors(data)]


def pipeline_files() -> list[Path]:
    """pipeline.example.yaml and every pipeline (a mapping with `repository:`) under
    tests/data."""
    found = [ROOT / "pipeline.example.yaml"]
    for path in sorted((ROOT / "tests" / "data").rglob("*.y*ml")):
        data = as_json(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "repository" in data:
            found.append(path)
    return found


# --------------------------------------------------------------------------- the files

def test_schema_is_valid_draft7():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert "$defs" not in json.dumps(SCHEMA)  # draft-07 has `definitions`


def test_committed_schema_and_reference_match_the_model():
    stale = reference.stale_docs(DOCS)
    assert not stale, (f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} out of date: "
                       f"run `{reference.REGENERATE}`")


def test_schema_command_prints_the_committed_schema_and_checks_docs():
    cli_runner = CliRunner()
    out = cli_runner.invoke(cli, ["schema"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == SCHEMA
    out = cli_runner.invoke(cli, ["schema", "--reference"])
    assert out.exit_code == 0 and out.output == reference.reference()
    assert cli_runner.invoke(cli, ["schema", "--check", str(DOCS)]).exit_code == 0


def test_docs_regenerate_in_place_and_check_says_when_stale(tmp_path):
    md = (DOCS / "pipeline.md").read_text(encoding="utf-8")
    start, end = md.index(reference.BEGIN), md.index(reference.END)
    (tmp_path / "pipeline.md").write_text(md[:start + len(reference.BEGIN)] + "\nold\n" + md[end:])
    cli_runner = CliRunner()
    out = cli_runner.invoke(cli, ["schema", "--check", str(tmp_path)])
    assert out.exit_code == 1
    assert "pipeline.md: does not match the model" in out.output
    assert "pipeline.schema.json: does not match the model" in out.output
    assert cli_runner.invoke(cli, ["schema", "--docs", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "pipeline.md").read_text() == md  # the hand-written parts untouched
    assert json.loads((tmp_path / "pipeline.schema.json").read_text()) == SCHEMA


def test_stage_outputs_regenerate_in_place_and_check_says_when_stale(tmp_path):
    md = (DOCS / reference.OUTPUTS_FILE).read_text(encoding="utf-8")
    start, end = md.index(reference.OUTPUTS_BEGIN), md.index(reference.END)
    for name in (reference.SCHEMA_FILE, reference.REFERENCE_FILE):
        (tmp_path / name).write_text((DOCS / name).read_text(encoding="utf-8"))
    (tmp_path / DAEMON_CONFIG_FILE).write_text((DOCS / DAEMON_CONFIG_FILE).read_text(encoding="utf-8"))
    stale = md[:start + len(reference.OUTPUTS_BEGIN)] + "\nold\n" + md[end:]
    (tmp_path / reference.OUTPUTS_FILE).write_text(stale)
    cli_runner = CliRunner()
    out = cli_runner.invoke(cli, ["schema", "--check", str(tmp_path)])
    assert out.exit_code == 1
    assert out.output.count("does not match") == 1
    assert f"{reference.OUTPUTS_FILE}: does not match" in out.output
    out = cli_runner.invoke(cli, ["schema", "--docs", str(tmp_path)])
    assert out.exit_code == 0 and reference.OUTPUTS_FILE in out.output
    assert (tmp_path / reference.OUTPUTS_FILE).read_text() == md  # hand-written parts kept
    assert cli_runner.invoke(cli, ["schema", "--check", str(tmp_path)]).exit_code == 0


def test_committed_daemon_config_reference_matches_its_model(tmp_path):
    """docs/daemon-config.md's reference is generated from runner/daemon/config.py; `runner
    schema --check` says when it is stale, `--docs` rewrites only its generated part."""
    assert not reference.stale_docs(DOCS, ALL_DOCS), f"run `{reference.REGENERATE}`"
    md = (DOCS / DAEMON_CONFIG_FILE).read_text(encoding="utf-8")
    for key, _name, _info in fields_of(DaemonConfig):
        assert f"| `{key}` |" in md, key
    assert "| `triggers` | mapping: [`pipelines[].triggers`](#pipelinestriggers) | `{}` |" in md
    assert "base_dir" not in md  # set by the loader, not written in the file
    for name in (reference.SCHEMA_FILE, reference.REFERENCE_FILE, reference.OUTPUTS_FILE):
        (tmp_path / name).write_text((DOCS / name).read_text(encoding="utf-8"))
    start, end = md.index(DAEMON_CONFIG_BEGIN), md.index(reference.END)
    (tmp_path / DAEMON_CONFIG_FILE).write_text(md[:start + len(DAEMON_CONFIG_BEGIN)] + "\nold\n"
                                               + md[end:])
    cli_runner = CliRunner()
    out = cli_runner.invoke(cli, ["schema", "--check", str(tmp_path)])
    assert out.exit_code == 1 and out.output.count("does not match") == 1, out.output
    assert f"{DAEMON_CONFIG_FILE}: does not match" in out.output
    assert cli_runner.invoke(cli, ["schema", "--docs", str(tmp_path)]).exit_code == 0
    assert (tmp_path / DAEMON_CONFIG_FILE).read_text() == md  # hand-written parts kept


def test_a_missing_stage_outputs_page_is_stale(tmp_path):
    for name in (reference.SCHEMA_FILE, reference.REFERENCE_FILE):
        (tmp_path / name).write_text((DOCS / name).read_text(encoding="utf-8"))
    assert reference.stale_docs(tmp_path) == [tmp_path / reference.OUTPUTS_FILE]


# The variables the pipeline files take from their environment (the lab's, for the example).
ENVIRON = {"REGISTRY": "10.87.53.1:5000", "DEPLOY_HOSTS": "root@10.87.53.11:22",
           "SSH_KEY_FILE": "/k", "KNOWN_HOSTS_FILE": "/kh", "REPO_URL": "/srv/git/app"}


@pytest.mark.parametrize("path", pipeline_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_schema_validates_every_pipeline_file(path):
    assert schema_errors(as_json(path.read_text(encoding="utf-8"))) == []
    load_pipeline(path, environ=ENVIRON)  # and the loader reads it


def _modeline(path: Path) -> str | None:
    for line in path.read_text(encoding="utf-8").splitlines()[:5]:
        m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", line)
        if m:
            return m.group(1)
    return None


def test_the_example_starts_with_the_modeline():
    first = (ROOT / "pipeline.example.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=docs/pipeline.schema.json"


@pytest.mark.parametrize("path", [p for p in pipeline_files() if _modeline(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_modeline_points_at_the_schema_from_the_files_directory(path):
    # yaml-language-server takes a relative $schema against the YAML file's own directory.
    assert (path.parent / _modeline(path)).resolve() == DOCS / "pipeline.schema.json"


# --------------------------------------------------------------------------- the reference

def _schema_paths(node: dict[str, Any], path: str, out: set[str], seen: set[str]) -> None:
    """Every key a file may write, as reference paths, walking the JSON Schema itself."""
    def resolve(n: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in n:
            n = SCHEMA["definitions"][n["$ref"].rsplit("/", 1)[1]]
        return n

    def alternatives(n: dict[str, Any]) -> list[dict[str, Any]]:
        n = resolve(n)
        alts = [n]
        for key in ("anyOf", "allOf", "oneOf"):
            for alt in n.get(key, ()):
                alts += alternatives(alt)
        return alts

    for alt in alternatives(node):
        for key, child in alt.get("properties", {}).items():
            here = f"{path}.{key}" if path else key
            out.add(here)
            if here not in seen:
                seen.add(here)
                _schema_paths(child, here, out, seen)
        if isinstance(alt.get("items"), dict):
            _schema_paths(alt["items"], path + "[]", out, seen)
        if isinstance(alt.get("additionalProperties"), dict):
            _schema_paths(alt["additionalProperties"], path + ".<name>", out, seen)


def _reference_paths() -> set[str]:
    md = (DOCS / "pipeline.md").read_text(encoding="utf-8")
    generated = md[md.index(reference.BEGIN):md.index(reference.END)]
    out: set[str] = set()
    section = None
    for line in generated.splitlines():
        heading = re.fullmatch(r"### (?:`(.+)`|Top level)", line)
        if heading:
            section = heading.group(1) or ""
        row = re.match(r"\| `([^`]+)` \|", line)
        if row and section is not None:
            out.add(f"{section}.{row.group(1)}" if section else row.group(1))
    return out


def _homes() -> dict[str, str]:
    """A model's second place (a role's healthcheck) -> the one section that describes it."""
    out = {}
    for s in reference.sections():
        for k, _n, info in fields_of(s.model):
            child = reference._child_section(s.child(k), info.annotation)
            if child is not None and reference._home(child[1]) != child[0]:
                out[child[0]] = reference._home(child[1])
    return out


def test_every_schema_field_is_in_the_reference():
    in_schema: set[str] = set()
    _schema_paths(SCHEMA, "", in_schema, set())
    homes = _homes()
    assert "stages.deploy.roles.<name>.healthcheck" in homes
    in_schema = {next((homes[a] + p[len(a):] for a in homes if p.startswith(a + ".")), p)
                 for p in in_schema}
    in_reference = _reference_paths()
    assert len(in_schema) > 100
    assert in_schema - in_reference == set()
    assert in_reference - in_schema == set()


def test_every_field_and_section_is_described():
    missing = []
    for section in reference.sections():
        if not reference.model_description(section.model):
            missing.append(f"{section.title} (class {section.model.__name__}: no docstring)")
        for key, name, info in fields_of(section.model):
            if not reference.description(info):
                missing.append(f"{section.child(key)} ({section.model.__name__}.{name}: add a "
                               f"docstring under the field)")
    assert missing == []


# --------------------------------------------------------------------------- examples

BASE = {"name": "demo", "repository": {"url": "https://git.example.com/team/app.git"},
        "image": {"name": "registry.example.com/team/app"},
        "stages": {"deploy": {"servers": ["10.0.0.11"]}}}

# What some examples need beside them to make a valid pipeline.
CONTEXT = {
    "stages.deploy.proxy.tls": {"hosts": ["app.example.com"]},
    "stages.push.auth.username": {"password": "registry_password"},
    "stages.push.auth.password": {"username": "ci"},
    "stages.deploy.registry.username": {"password": "registry_password"},
    "stages.deploy.registry.password": {"username": "deploy"},
    # A tcp:// engine needs its TLS files; key_file and known_hosts are for ssh:// engines.
    "stages.build.engine.host": {"tls": {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"}},
    "stages.build.engine.connect_timeout": {"tls": {"ca": "ca.pem", "cert": "cert.pem",
                                                    "key": "key.pem"}},
    "stages.build.engine.key_file": {"host": "ssh://root@10.0.0.5"},
    "stages.build.engine.known_hosts": {"host": "ssh://root@10.0.0.5"},
    "secrets.<name>.timeout": {"command": ["op", "read", "op://deploy/registry/password"]},
}


def _minimal(model: type) -> dict[str, Any]:
    """The required keys of a section, each with its example."""
    return {key: copy.deepcopy(reference.example(key, info)) if reference.example(key, info)
            is not None else _minimal(reference._child_section("x", info.annotation)[1])
            for key, _name, info in fields_of(model) if info.is_required()}


def _place(data: dict[str, Any], section: str, key: str, value: Any) -> None:
    """Put `key: value` into the section at `section` ("stages.deploy.servers[]"), creating the
    sections on the way with their required keys."""
    owners = {s.path: s.model for s in reference.sections()}
    node = data
    parts = [p for p in re.split(r"\.(?![^<]*>)", section) if p] if section else []
    walked = ""
    for part in parts:
        name = part.removesuffix("[]")
        walked = f"{walked}.{name}" if walked else name
        if name == "<name>":  # an entry of a mapping of sections (services), with its required keys
            node = node.setdefault("example", _minimal(owners[walked]) if walked in owners else {})
            continue
        if part.endswith("[]"):
            items = node.setdefault(name, [])
            if not items or not isinstance(items[0], dict):
                items[:] = [_minimal(owners[walked + "[]"])]
            node = items[0]
            walked += "[]"
        else:
            nxt = node.get(name)
            if not isinstance(nxt, dict):
                nxt = node[name] = _minimal(owners[walked]) if walked in owners else {}
            node = nxt
    node[key] = copy.deepcopy(value)


def _examples() -> list[tuple[str, str, Any]]:
    out = []
    for section in reference.sections():
        for key, _name, info in fields_of(section.model):
            value = reference.example(key, info)
            if value is not None:
                out.append((section.path, key, value))
    return out


@pytest.mark.parametrize("section,key,value", _examples(),
                         ids=[f"{s}.{k}" if s else k for s, k, _ in _examples()])
def test_every_example_is_valid_where_the_reference_shows_it(section, key, value):
    data = copy.deepcopy(BASE)
    path = f"{section}.{key}" if section else key
    if section.startswith("secrets."):
        data["secrets"] = {}
    _place(data, section, key, value)
    for other, other_value in CONTEXT.get(path, {}).items():
        _place(data, section, other, other_value)
    for _ref, name in secret_references(data):
        data.setdefault("secrets", {}).setdefault(name, {"env": f"SECRET_{name.upper()}"})
    text = yaml.safe_dump(data, sort_keys=False)
    assert schema_errors(as_json(text)) == [], text
    # A file with destinations loads for one of them (its first), as `-d` would.
    load_pipeline_text(text, "/work/p/pipeline.yml", environ={},
                       destination=next(iter(data.get("destinations") or {}), None))


def test_every_scalar_and_list_field_has_an_example():
    # A section (a mapping documented below it) needs none; every other field shows one.
    missing = [f"{s.child(k)}" for s in reference.sections() for k, _n, info in fields_of(s.model)
               if reference.example(k, info) is None
               and reference._child_section("x", info.annotation) is None]
    assert missing == []


# ------------------------------------------------------------------ loader and schema agree

def _text(body: str) -> str:
    """A pipeline with `body` in it (a body with its own `repository:` replaces the usual)."""
    repo = "" if "\nrepository:" in "\n" + body else \
        "repository: {url: https://git.example.com/a.git}\n"
    return "name: demo\n" + repo + "image: {name: registry.example.com/a}\n" + body


ACCEPTED = [
    # interpolated where the model wants a number, a choice, a boolean, a list, a pattern
    ("number", "variables: {D: '2'}\nrepository: {url: x, depth: '${D}'}\n"),
    ("list of servers", "variables: {H: 'a,b'}\nstages:\n  deploy: {servers: '${H}'}\n"),
    ("choice", "variables: {F: low}\nstages:\n  scan: {fail_on: '${F}'}\n"),
    ("boolean", "variables: {P: 'true'}\nstages:\n  build: {pull: '${P}'}\n"),
    ("pattern",
     "variables: {N: app}\nstages:\n  deploy: {servers: [a], container: {name: '${N}'}}\n"),
    ("date", "variables: {E: '2030-01-01'}\nstages:\n  scan:\n"
     "    ignore: [{id: X, reason: r, expired_at: '${E}'}]\n"),
    # YAML values taken as written, and shorthands
    ("number as a string", "repository: {url: x, ref: 1234}\n"),
    ("yes as a boolean", "stages:\n  build: {pull: yes}\n"),
    ("any case", "stages:\n  scan: {fail_on: critical}\n"),
    ("reason for statement", "stages:\n  scan: {ignore: [{id: X, reason: r}]}\n"),
    ("server strings", "stages:\n  deploy: {servers: [root@a:22, {host: b}], strategy: canary}\n"),
    ("command string", "stages:\n  deploy: {servers: [a], container: {command: 'serve -p 80'}}\n"),
    ("one proxy host", "stages:\n  deploy: {servers: [a], proxy: {hosts: app.example.com}}\n"),
]


@pytest.mark.parametrize("body", [b for _, b in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_what_the_loader_accepts_the_schema_accepts(body):
    text = _text(body)
    load_pipeline_text(text, "/work/p/pipeline.yml", environ={})
    assert schema_errors(as_json(text)) == []


REFUSED = [
    ("a string for a list", "image: {name: a, tags: latest}\n"),
    ("an unknown key", "stages:\n  build: {dockerfil: x}\n"),
    ("true for a number", "stages:\n  push: {retries: true}\n"),
    ("out of range", "stages:\n  push: {retries: 11}\n"),
    ("not a choice", "stages:\n  scan: {fail_on: SEVERE}\n"),
    ("a number for servers", "stages:\n  deploy: {servers: 5}\n"),
    ("a mapping for a list", "stages:\n  scan: {ignore: {id: X, reason: r}}\n"),
    ("ignore without a reason", "stages:\n  scan: {ignore: [{id: X}]}\n"),
    ("statement and reason", "stages:\n  scan: {ignore: [{id: X, reason: r, statement: s}]}\n"),
    ("a secret with two sources", "secrets: {s: {env: A, file: b}}\n"),
    ("a secret with none", "secrets: {s: {}}\n"),
    ("a list for a mapping", "stages:\n  build: {args: [a]}\n"),
    ("a pattern", "stages:\n  deploy: {servers: [a], container: {restart: sometimes}}\n"),
]


@pytest.mark.parametrize("body", [b for _, b in REFUSED], ids=[i for i, _ in REFUSED])
def test_what_the_schema_refuses_the_loader_refuses(body):
    text = _text(body)
    assert schema_errors(as_json(text)) != []
    with pytest.raises(InvalidInput):
        load_pipeline_text(text, "/work/p/pipeline.yml", environ={})


# --------------------------------------------------------------------------- --dry-run

# Keys of a stage's plan that are not settings of its section: what the plan adds.
PLAN_EXTRAS = {
    "checkout": set(),
    "build": {"image", "tags"},  # image.name and image.tags, which the build uses
    "scan": {"enabled"},
    "push": {"image", "registry", "credentials"},
}
NESTED_EXTRAS = {"stages.build.engine": {"note"}}  # says which engine, when none is set
PLAN_SECTIONS = {"checkout": "repository", "build": "stages.build", "scan": "stages.scan",
                 "push": "stages.push"}


@pytest.mark.parametrize("stage", sorted(PLAN_SECTIONS))
def test_dry_run_says_settings_with_the_keys_the_file_uses(stage):
    from runner.engine import _stage

    pipeline = load_pipeline(ROOT / "tests" / "data" / "pipelines" / "full.yaml", environ={})
    plan = _stage(stage).plan(pipeline)
    model = {s.path: s.model for s in reference.sections()}[PLAN_SECTIONS[stage]]
    keys = {key for key, _name, _info in fields_of(model)}
    assert set(plan) - keys - PLAN_EXTRAS[stage] == set()
    for key, value in plan.items():  # nested settings too (`auth: {username, password}`)
        if isinstance(value, dict) and key in keys and not key.endswith(("args", "labels")):
            path = f"{PLAN_SECTIONS[stage]}.{key}"
            sub = {s.path: s.model for s in reference.sections()}[path]
            allowed = {k for k, _n, _i in fields_of(sub)} | NESTED_EXTRAS.get(path, set())
            assert set(value) <= allowed, (key, value)
