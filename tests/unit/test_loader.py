"""The loader: YAML -> Pipeline, every problem located at file:line:column."""
from __future__ import annotations

import os
import textwrap

import pytest

from runner.errors import InvalidInput
from runner.loader import (
    SourceMap, format_path, is_local_path, load_pipeline, load_pipeline_text, problem_at,
    secret_references, source_map,
)
from runner.model import Pipeline

GOOD = """\
name: demo
repository:
  url: https://git.example.com/team/app.git
  token: git_token
image:
  name: 10.87.53.1:5000/team/app
secrets:
  git_token: {env: GIT_TOKEN}
  registry_password: {file: ./secrets/registry}
stages:
  build:
    secrets:
      - {id: npm, secret: git_token}
  push:
    auth: {username: ci, password: registry_password}
"""


def load(text: str, **kw) -> Pipeline:
    kw.setdefault("environ", {})
    return load_pipeline_text(textwrap.dedent(text), "/work/p/pipeline.yml", **kw)


def problems(text: str, **kw) -> list[tuple[int, int, str, str]]:
    with pytest.raises(InvalidInput) as info:
        load(text, **kw)
    assert str(info.value).startswith("/work/p/pipeline.yml: ")
    return [(p.line, p.column, p.path, p.message) for p in info.value.problems]


def test_good_pipeline_loads():
    p = load(GOOD)
    assert p.name == "demo"
    assert p.repository.token_secret == "git_token"
    assert p.stages.push.auth.password_secret == "registry_password"
    assert p.secrets["registry_password"].file == "/work/p/secrets/registry"
    assert p.source_file == "/work/p/pipeline.yml"


BAD = [
    # (description, yaml, expected (line, column, path, message fragment))
    ("yaml syntax", """\
        name: demo
        repository: {url: x
        image: {name: a}
        """, (3, 6, "", "YAML syntax error")),
    ("bad indentation", """\
        name: demo
          repository: x
        """, (2, 13, "", "YAML syntax error")),
    ("unknown top key", """\
        nmae: demo
        repository: {url: x}
        image: {name: a}
        """, (1, 1, "nmae", "unknown key 'nmae' (did you mean 'name'?)")),
    ("unknown key at depth", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        stages:
          build:
            dockerfil: Dockerfile.prod
        """, (6, 5, "stages.build.dockerfil", "unknown key 'dockerfil' (did you mean 'dockerfile'?)")),
    ("unknown key in list item", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        secrets: {s: {env: S}}
        stages:
          build:
            secrets:
              - id: a
                secret: s
                sekret: s
        """, (10, 9, "stages.build.secrets[0].sekret", "unknown key 'sekret' (did you mean 'secret'?)")),
    ("unknown key without suggestion", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        zzzz: 1
        """, (4, 1, "zzzz", "unknown key 'zzzz'")),
    ("wrong type", """\
        name: demo
        repository:
          url: x
          depth: lots
        image: {name: a}
        """, (4, 10, "repository.depth",
              "expected a whole number of at least 1, got the string 'lots'")),
    ("wrong type: mapping expected", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        stages: 5
        """, (4, 9, "stages",
              "expected a mapping {checkout?, build?, test?, scan?, push?, deploy?}, got the number 5")),
    ("constraint", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        stages:
          push: {retries: 99}
        """, (5, 19, "stages.push.retries",
              "expected a whole number from 0 to 10, got the number 99")),
    ("name pattern", """\
        name: Demo App
        repository: {url: x}
        image: {name: a}
        """, (1, 7, "name", "expected a string matching ^[a-z0-9][a-z0-9_.-]{0,62}$, got the "
              "string 'Demo App'")),
    ("missing top-level field", """\
        name: demo
        image: {name: a}
        """, (1, 1, "repository", "missing required field 'repository'")),
    ("missing nested field", """\
        name: demo
        repository:
          ref: main
        image: {name: a}
        """, (2, 1, "repository.url", "missing required field 'url'")),
    ("undefined variable", """\
        name: demo
        repository: {url: x}
        image:
          name: "${REGISTRY}/app"
        """, (4, 9, "image.name", "undefined variable 'REGISTRY' (set it in the environment, with --var REGISTRY=..., or under variables:)")),
    ("required variable with message", """\
        name: demo
        repository: {url: "${REPO:?give the repository URL}"}
        image: {name: a}
        """, (2, 19, "repository.url", "variable 'REPO' is not set: give the repository URL")),
    ("malformed interpolation", """\
        name: demo
        repository: {url: "x${"}
        image: {name: a}
        """, (2, 19, "repository.url", "unterminated")),
    ("duplicate key", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        repository: {url: y}
        """, (4, 1, "repository", "duplicate key 'repository' (first given at line 2, column 1)")),
    ("duplicate key at depth", """\
        name: demo
        repository:
          url: x
          ref: main
          ref: dev
        image: {name: a}
        """, (5, 3, "repository.ref", "duplicate key 'ref'")),
    ("bad secret reference", """\
        name: demo
        repository: {url: x, token: git_tokn}
        image: {name: a}
        secrets:
          git_token: {env: T}
        """, (2, 29, "repository.token", "unknown secret 'git_tokn' (did you mean 'git_token'?)")),
    ("bad secret reference in list", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        stages:
          build:
            secrets:
              - {id: npm, secret: npmrc}
        """, (7, 27, "stages.build.secrets[0].secret", "unknown secret 'npmrc'")),
    ("secret with neither source", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        secrets:
          tok: {}
        """, (5, 3, "secrets.tok", "exactly one of 'env:'")),
    ("secret with both sources", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        secrets:
          tok: {env: A, file: b}
        """, (5, 3, "secrets.tok", "env and file given")),
    ("bad image name: uppercase", """\
        name: demo
        repository: {url: x}
        image:
          name: registry.local/Team/app
        """, (4, 9, "image.name", "must be lowercase")),
    ("bad image name: tag", """\
        name: demo
        repository: {url: x}
        image: {name: "registry.local:5000/app:1.0"}
        """, (3, 15, "image.name", "must not include a tag")),
    ("bad tag template", """\
        name: demo
        repository: {url: x}
        image:
          name: app
          tags: ["{short_sha}", "{brnch}"]
        """, (5, 25, "image.tags[1]", "unknown placeholder '{brnch}'")),
    ("secret interpolated", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        secrets: {tok: {env: TOKEN}}
        env: {T: "${TOKEN}"}
        """, (5, 10, "env.T", "would copy the value of secret 'tok'")),
    ("top level is a list", """\
        - name: demo
        """, (1, 1, "", "must be a mapping")),
    ("top level is a scalar", """\
        hello
        """, (1, 1, "", "must be a mapping")),
    ("empty file", "", (1, 1, "", "the file is empty")),
    ("unsupported version", """\
        version: 2
        name: demo
        repository: {url: x}
        image: {name: a}
        """, (1, 10, "version", "unsupported version 2")),
    ("source_file is not a key", """\
        name: demo
        source_file: /etc/passwd
        repository: {url: x}
        image: {name: a}
        """, (2, 1, "source_file", "unknown key 'source_file'")),
    ("unknown yaml tag", """\
        name: !!python/object:os.system demo
        repository: {url: x}
        image: {name: a}
        """, (1, 7, "name", "cannot read this value")),
    ("complex key", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        ? [a, b]
        : c
        """, (4, 3, "", "a key must be a plain string")),
    ("variable name not usable", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        variables:
          my-var: x
        """, (5, 3, "variables.my-var", "cannot be used as ${...}")),
    ("remote helper url refused", """\
        name: demo
        repository:
          url: "ext::sh -c touch% /tmp/pwned"
        image: {name: a}
        """, (3, 8, "repository.url", "remote helpers")),
    ("option-like url refused", """\
        name: demo
        repository: {url: "-oProxyCommand=touch:x"}
        image: {name: a}
        """, (2, 19, "repository.url", "git would read as an option")),
    ("option-like url that looks like a relative path refused", """\
        name: demo
        repository:
          url: "-oProxyCommand=x"
        image: {name: a}
        """, (3, 8, "repository.url", "git would read as an option")),
    ("unsafe ref refused", """\
        name: demo
        repository: {url: x, ref: 'main";echo$${IFS}hi;#'}
        image: {name: a}
        """, (2, 27, "repository.ref", "refused")),
    ("two documents", """\
        name: demo
        ---
        name: other
        """, (2, 1, "", "expected a single document")),
    ("tab indentation", "name: demo\nrepository:\n\turl: x\n", (3, 1, "", "YAML syntax error")),
    ("recursive alias", """\
        name: demo
        repository: {url: x}
        image: {name: a}
        env: &e {a: *e}
        """, (4, 6, "env.a", "an alias refers to itself")),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_problem_is_located(text, expected):
    found = problems(text)
    line, column, path, fragment = expected
    matching = [p for p in found if fragment in p[3]]
    assert matching, f"no problem mentions {fragment!r}: {found}"
    assert matching[0][:3] == (line, column, path), found


def test_all_problems_reported_at_once():
    found = problems("""\
        nmae: demo
        repository:
          url: x
          depth: zero
          token: nope
        image:
          name: "${NOPE}"
        stages:
          build: {timeout: -1}
          push: {auth: {username: ci, password: nope2}}
        repository: {url: y}
        """)
    assert [(p[0], p[1]) for p in found] == [
        (1, 1), (1, 1), (4, 10), (5, 10), (7, 9), (9, 20), (10, 41), (11, 1)]
    messages = " | ".join(p[3] for p in found)
    for fragment in ("unknown key 'nmae'", "missing required field 'name'",
                     "expected a whole number of at least 1, got the string 'zero'",
                     "unknown secret 'nope'", "undefined variable 'NOPE'",
                     "expected a number above 0, got the number -1",
                     "unknown secret 'nope2'", "duplicate key 'repository'"):
        assert fragment in messages


def test_problems_print_as_file_line_column():
    with pytest.raises(InvalidInput) as info:
        load("name: demo\nrepository: {url: x}\nimage: {name: a}\nzz: 1\n")
    assert "/work/p/pipeline.yml:4:1: error: zz: unknown key 'zz'" in str(info.value)
    assert info.value.exit_code == 2


def test_yaml_numbers_and_booleans_in_string_fields_are_taken_as_written():
    p = load("""\
        name: demo
        repository: {url: x, ref: 0123456}
        image: {name: a, tags: [1.0, "{short_sha}", on, 2024-01-02]}
        variables: {PORT: 8080}
        stages: {build: {args: {N: 1.10}}}
        """)
    assert p.repository.ref == "0123456"
    assert p.image.tags == ("1.0", "{short_sha}", "on", "2024-01-02")
    assert p.variables == {"PORT": "8080"}
    assert p.stages.build.args == {"N": "1.10"}


def test_interpolation_everywhere_but_keys():
    p = load("""\
        name: demo
        repository: {url: "https://${HOST}/app.git", depth: "${DEPTH}"}
        image: {name: "${HOST}/app"}
        stages:
          build:
            args:
              ${KEY}: "$$HOME is literal, ${HOST} is not"
        """, environ={"HOST": "git.example.com", "DEPTH": "5", "KEY": "no"})
    assert p.repository.url == "https://git.example.com/app.git"
    assert p.repository.depth == 5
    assert p.stages.build.args == {"${KEY}": "$HOME is literal, git.example.com is not"}


def test_interpolation_precedence():
    text = """\
        name: demo
        repository: {url: x}
        image: {name: "${REGISTRY}/${NAME}"}
        variables:
          REGISTRY: ${REGISTRY_HOST:-localhost:5000}
          NAME: app
        """
    assert load(text).image.name == "localhost:5000/app"
    assert load(text, environ={"REGISTRY_HOST": "reg:1"}).image.name == "reg:1/app"
    assert load(text, environ={"REGISTRY": "env.local"}).image.name == "env.local/app"
    p = load(text, environ={"REGISTRY": "env.local", "NAME": "envname"},
             variables={"REGISTRY": "cli.local"})
    assert p.image.name == "cli.local/envname"
    assert p.variables == {"REGISTRY": "cli.local", "NAME": "envname"}


def test_variables_may_refer_to_each_other():
    p = load("""\
        name: demo
        repository: {url: x}
        image: {name: "${IMAGE}"}
        variables:
          IMAGE: ${REGISTRY}/app
          REGISTRY: ${REGISTRY:-reg.local}
        """)
    assert p.image.name == "reg.local/app"


def test_broken_variable_reported_once_at_its_definition():
    found = problems("""\
        name: demo
        repository: {url: x}
        image: {name: "${IMAGE}"}
        variables:
          IMAGE: ${MISSING}/app
        """)
    assert [(p[0], p[1], p[2]) for p in found] == [(5, 10, "variables.IMAGE")]
    assert "undefined variable 'MISSING'" in found[0][3]


def test_anchors_and_merge_keys():
    p = load("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        variables: &v {A: "1"}
        env:
          <<: *v
          B: "2"
        stages:
          build: {args: {<<: *v, A: "3"}, cache_from: &c [x], cache_to: *c}
          deploy: {enabled: false}
        """)
    assert p.env == {"A": "1", "B": "2"}
    assert p.stages.build.args == {"A": "3"}
    assert p.stages.build.cache_to == ("x",)


def test_merge_keys_explicit_wins():
    p = load("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        variables: &v {A: "1", B: "x"}
        env:
          <<: *v
          B: "2"
        stages: {deploy: {enabled: false}}
        """)
    assert p.env == {"A": "1", "B": "2"}
    assert source_map(p).locate(("env", "B")) == (7, 6)


def test_relative_paths_resolved_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "pipeline.yml"
    f.write_text("name: demo\nrepository: {url: ../app}\nimage: {name: a}\n"
                 "secrets: {k: {file: keys/id}}\n")
    p = load_pipeline(f, environ={})
    assert p.repository.url == str(tmp_path / "app")
    assert p.secrets["k"].file == str(tmp_path / "sub" / "keys" / "id")
    assert p.source_file == str(f)


@pytest.mark.parametrize("url,local", [
    ("../app", True), ("/srv/git/app.git", True), ("app", True), ("./a:b", True), (":x", True),
    ("https://github.com/a/b.git", False), ("ssh://git@host/a.git", False),
    ("file:///srv/git/app", False), ("git@github.com:a/b.git", False),
    ("github.com:a/b.git", False),
])
def test_is_local_path(url, local):
    assert is_local_path(url) is local


def test_remote_urls_untouched():
    p = load(GOOD.replace("https://git.example.com/team/app.git", "git@host:team/app.git"))
    assert p.repository.url == "git@host:team/app.git"


def test_missing_file():
    with pytest.raises(InvalidInput, match="no such pipeline file"):
        load_pipeline("/nonexistent/pipeline.yml")


def test_directory_and_unreadable(tmp_path):
    with pytest.raises(InvalidInput, match="is a directory"):
        load_pipeline(tmp_path)
    f = tmp_path / "p.yml"
    f.write_bytes(b"name: demo\nrepository: {url: \xff}\n")
    with pytest.raises(InvalidInput) as info:
        load_pipeline(f)
    assert (info.value.problems[0].line, info.value.problems[0].column) == (2, 19)
    if os.geteuid() != 0:  # root reads anything
        f.write_text("name: x\n")
        f.chmod(0)
        with pytest.raises(InvalidInput, match="cannot read"):
            load_pipeline(f)


def test_byte_order_mark_and_text_source(tmp_path):
    f = tmp_path / "p.yml"
    f.write_bytes("\ufeffname: demo\nrepository: {url: x}\nimage: {name: a}\n".encode())
    assert load_pipeline(f, environ={}).name == "demo"
    p = load_pipeline_text("name: demo\nrepository: {url: x}\nimage: {name: a}\n", environ={})
    assert p.source_file == "<pipeline>"


def test_alias_bomb_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    found = problems("\n".join(lines) + "\n")
    assert any("expands to more than" in p[3] for p in found)


def test_secret_references_walks_the_model():
    p = load(GOOD)
    assert secret_references(p) == [
        (("repository", "token"), "git_token"),
        (("stages", "build", "secrets", 0, "secret"), "git_token"),
        (("stages", "push", "auth", "password"), "registry_password"),
    ]


def test_secret_reference_hooks():
    from pydantic import Field

    from runner.loader import register_secret_reference
    from runner.loader.secret_refs import refs_in
    from runner.model.base import Model

    class Extra(Model):
        api_secret: str | None = Field(default=None, alias="api")  # by name
        marked: str | None = Field(default=None, json_schema_extra={"secret_ref": True})
        registered: tuple[str, ...] = ()
        secret_env: dict[str, str] = Field(default_factory=dict)
        plain: str | None = None

    register_secret_reference(Extra, "registered")
    data = {"api": "a", "marked": "b", "registered": ["c", "d"], "secret_env": {"E": "e"},
            "plain": "not a secret"}
    assert list(refs_in(Extra, data, ("x",))) == [
        (("x", "api"), "a"), (("x", "marked"), "b"), (("x", "registered", 0), "c"),
        (("x", "registered", 1), "d"), (("x", "secret_env", "E"), "e")]
    with pytest.raises(ValueError):
        register_secret_reference(Extra, "nope")


def test_source_map_and_problem_at():
    p = load(GOOD)
    smap = source_map(p)
    assert isinstance(smap, SourceMap)
    assert smap.locate(("repository", "token")) == (4, 10)
    assert smap.locate(("repository", "token"), key=True) == (4, 3)
    assert smap.locate(("stages", "build", "secrets", 0, "secret")) == (13, 27)
    prob = problem_at(p, ("secrets", "git_token"), "boom", key=True)
    assert (prob.line, prob.column, prob.path) == (8, 3, "secrets.git_token")
    copied = p.model_copy(update={"name": "other"})  # e.g. the engine applying --repo
    assert problem_at(copied, ("secrets", "git_token"), "x", key=True).line == 8
    built = Pipeline.model_validate({"name": "x", "repository": {"url": "x"},
                                     "image": {"name": "a"}})
    prob = problem_at(built, ("name",), "x")
    assert (prob.file, prob.line, prob.column) == ("<pipeline>", 0, 0)


def test_each_pipeline_carries_its_own_source_map(tmp_path):
    first, second = tmp_path / "first.yml", tmp_path / "second.yml"
    first.write_text(GOOD)
    second.write_text("\n\n" + GOOD.replace("secrets:\n", "secrets:\n  other: {env: X}\n", 1))
    a = load_pipeline(first, environ={})
    copied = a.model_copy(update={"name": "other"})
    b = load_pipeline(second, environ={})
    assert source_map(a) is not source_map(b)
    for p in (a, copied):
        prob = problem_at(p, ("secrets", "git_token"), "x", key=True)
        assert (prob.file, prob.line, prob.column) == (str(first), 8, 3)
    prob = problem_at(b, ("secrets", "git_token"), "x", key=True)
    assert (prob.file, prob.line, prob.column) == (str(second), 11, 3)
    # The same file loaded again, changed: pipelines from the first load keep their own map.
    first.write_text("\n" + GOOD)
    again = load_pipeline(first, environ={})
    assert problem_at(again, ("secrets", "git_token"), "x", key=True).line == 9
    assert problem_at(copied, ("secrets", "git_token"), "x", key=True).line == 8
    # Built in code, even naming a loaded file: no map, so no line and column.
    built = Pipeline.model_validate({"name": "x", "repository": {"url": "x"},
                                     "image": {"name": "a"}, "source_file": str(first)})
    assert source_map(built) is None
    prob = problem_at(built, ("secrets", "git_token"), "x", key=True)
    assert (prob.file, prob.line, prob.column, prob.path) == (
        str(first), 0, 0, "secrets.git_token")


def test_union_alternatives_reported_once():
    from runner.errors import Problem
    from runner.loader.mapping import merge_union_problems

    merged = merge_union_problems([
        Problem("f", 5, 19, "x.y", "Input should be 'LOW' or 'HIGH' (got 'BAD')"),
        Problem("f", 5, 19, "x.y", "Input should be 'NONE' (got 'BAD')"),
        Problem("f", 6, 1, "x.z", "other"),
    ])
    assert [p.message for p in merged] == [
        "Input should be 'LOW' or 'HIGH'; or input should be 'NONE' (got 'BAD')", "other"]


def test_format_path():
    assert format_path(("stages", "build", "secrets", 0, "id")) == "stages.build.secrets[0].id"
    assert format_path(("env", "a.b")) == "env['a.b']"
    assert format_path(()) == ""


def test_default_environ_is_process_environment(monkeypatch):
    monkeypatch.setenv("RUNNER_TEST_REGISTRY", "from-env.local")
    p = load_pipeline_text("name: demo\nrepository: {url: x}\n"
                           "image: {name: '${RUNNER_TEST_REGISTRY}/app'}\n", "p.yml")
    assert p.image.name == "from-env.local/app"


# ------------------------------------------------------------------ messages in the file's words

MESSAGES = [
    ("tags: a string", "image: {name: a, tags: latest}\n",
     (3, 24, "image.tags", "expected a list of strings, got the string 'latest' (write [latest])")),
    ("ignore: a string", "stages:\n  scan: {ignore: CVE-1}\n",
     (5, 18, "stages.scan.ignore", "expected a list of {id, statement, expired_at?, paths?, "
      "purls?} entries, got the string 'CVE-1'")),
    ("ignore: one mapping", "stages:\n  scan: {ignore: {id: X, reason: r}}\n",
     (5, 18, "stages.scan.ignore", "expected a list of {id, statement, expired_at?, paths?, "
      "purls?} entries, got a mapping {id, reason} (write [{id: X, reason: r}])")),
    ("a mapping given a number", "stages:\n  push: {auth: 5}\n",
     (5, 16, "stages.push.auth", "expected a mapping {username?, password?}, got the number 5")),
    ("a choice, any case", "stages:\n  scan: {fail_on: hihg}\n",
     (5, 19, "stages.scan.fail_on", "expected one of UNKNOWN, LOW, MEDIUM, HIGH, CRITICAL or NONE "
      "(in any case), got the string 'hihg' (did you mean 'HIGH'?)")),
    ("a list item choice", "stages:\n  scan: {targets: [imag]}\n",
     (5, 20, "stages.scan.targets[0]", "expected one of image or context, got the string 'imag' "
      "(did you mean 'image'?)")),
    ("a section left empty", "stages:\n  scan:\n",
     (5, 8, "stages.scan", "got nothing (an empty value) (write scan: {} for the defaults)")),
    ("true for a number", "stages:\n  push: {retries: true}\n",
     (5, 19, "stages.push.retries", "expected a whole number, got true")),
    ("a number out of range", "stages:\n  deploy: {servers: [a], keep_versions: 0}\n",
     (5, 41, "stages.deploy.keep_versions", "expected a whole number from 1 to 100, got the "
      "number 0")),
    ("servers: a number", "stages:\n  deploy: {servers: 5}\n",
     (5, 21, "stages.deploy.servers", "expected a list of {host, port?, user?, name?, host_key?} "
      "entries, or one string of comma-separated `user@host:port`")),
    ("a date", "stages:\n  scan: {ignore: [{id: X, reason: r, expired_at: soon}]}\n",
     (5, 50, "stages.scan.ignore[0].expired_at", "expected a date (YYYY-MM-DD), got the string "
      "'soon'")),
    ("the other name of a required key", "stages:\n  scan: {ignore: [{id: X}]}\n",
     (5, 19, "stages.scan.ignore[0].statement", "missing required field 'statement' (or 'reason', "
      "the same)")),
    ("only half a login", "stages:\n  push: {auth: {username: ci}}\n",
     (5, 16, "stages.push.auth", "give both username and password (a secret name), or neither")),
]


@pytest.mark.parametrize("body,expected", [c[1:] for c in MESSAGES], ids=[c[0] for c in MESSAGES])
def test_messages_say_what_the_field_takes(body, expected):
    found = problems("name: demo\nrepository: {url: x}\nimage: {name: a}\n" + body
                     if not body.startswith("image:") else
                     "name: demo\nrepository: {url: x}\n" + body)
    line, column, path, fragment = expected
    matching = [p for p in found if fragment in p[3]]
    assert matching, f"no problem mentions {fragment!r}: {found}"
    assert matching[0][:3] == (line, column, path), found
    assert not any("Input should" in p[3] or "valid tuple" in p[3] or "instance of" in p[3]
                   for p in found), found


def test_unknown_key_lists_the_keys_of_its_section():
    found = problems("""\
        name: demo
        repository: {url: x, tokn: t}
        image: {name: a}
        """)
    assert found == [(2, 22, "repository.tokn", "unknown key 'tokn' (did you mean 'token'?); "
                      "repository takes: url, ref, depth, submodules, token, token_user, ssh_key")]


@pytest.mark.parametrize("yaml_text,where,value,kind", [
    ("image: {name: a}\nstages:\n  deploy: {servers: ${HOSTS}}\n", (5, 21), "${HOSTS}",
     "mapping {...}"),
    ("image: {name: a, tags: [v${N}, latest]}\n", (3, 25), "v${N}", "list [...]"),
    ("image: {name: a}\nenv: {URL: ${BASE}/api}\n", (4, 12), "${BASE}/api", "mapping {...}"),
])
def test_interpolation_in_a_flow_collection_is_said_plainly(yaml_text, where, value, kind):
    # Unquoted, YAML reads the `{` of `${` as a nested mapping; PyYAML only says
    # "expected ',' or '}', but got '{'".
    found = problems("name: demo\nrepository: {url: x}\n" + yaml_text)
    assert len(found) == 1, found
    assert found[0][:2] == where
    assert found[0][3] == (f"{value} inside a flow {kind} needs quotes: YAML reads the '{{' of "
                           f"'${{' there as the start of a nested mapping; write \"{value}\"")


def test_interpolation_quoted_in_a_flow_collection_works():
    p = load("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        stages:
          deploy: {servers: "${HOSTS}"}
        """, environ={"HOSTS": "root@10.0.0.1,10.0.0.2"})
    assert [s.host for s in p.stages.deploy.servers] == ["10.0.0.1", "10.0.0.2"]


# --------------------------------------------------------------------------- stages and env

def _stages(text: str) -> dict[str, bool]:
    p = load("name: demo\nrepository: {url: x}\nimage: {name: a}\n" + textwrap.dedent(text))
    return {n: getattr(p.stages, n).enabled
            for n in ("checkout", "build", "scan", "push", "deploy")}


def test_a_stage_section_runs_unless_it_says_enabled_false():
    assert _stages("") == {"checkout": True, "build": True, "scan": False, "push": True,
                           "deploy": False}  # absent: as before
    assert _stages("stages: {scan: {}}\n")["scan"] is True
    assert _stages("stages: {scan: {fail_on: low}}\n")["scan"] is True
    assert _stages("stages: {deploy: {servers: [10.0.0.1]}}\n")["deploy"] is True
    assert _stages("stages: {deploy: {enabled: false, ssh: {port: 2222}}}\n")["deploy"] is False
    assert _stages("stages: {build: {enabled: false}, push: {enabled: false}}\n") == {
        "checkout": True, "build": False, "scan": False, "push": False, "deploy": False}


def test_a_deploy_section_without_servers_says_why_it_needs_them():
    found = problems("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        stages:
          deploy: {container: {name: app}}
        """)
    assert found == [(5, 11, "stages.deploy", "servers: at least one server is needed (a deploy "
                      "section runs unless it says enabled: false)")]


def test_top_level_env_without_a_deploy_is_refused():
    found = problems("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        env: {MODE: production}
        """)
    assert [(p[0], p[1], p[2]) for p in found] == [(4, 1, "env")]
    assert "it would reach nothing" in found[0][3] and "stages.build.args" in found[0][3]
    # A deploy that is turned off keeps its settings, the top-level env with them.
    load("name: demo\nrepository: {url: x}\nimage: {name: a}\nenv: {MODE: production}\n"
         "stages: {deploy: {enabled: false}}\n")


def test_top_level_env_is_checked_like_a_containers():
    found = problems("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        env: {1BAD: x}
        stages: {deploy: {enabled: false}}
        """)
    assert found[0][:3] == (4, 6, "env")
    assert "not an environment variable name: '1BAD'" in found[0][3]


def test_top_level_env_goes_under_the_containers_own():
    p = load("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        secrets: {tok: {env: TOKEN}}
        env: {MODE: staging, REGION: eu, API_TOKEN: not-the-secret}
        stages:
          deploy:
            servers: [10.0.0.1]
            container:
              env: {MODE: production}
              secret_env: {API_TOKEN: tok}
        """)
    assert p.stages.deploy.container.env == {"MODE": "production"}  # the model is the file
    settings = p.deploy_settings()
    assert settings.container.env == {"MODE": "production", "REGION": "eu"}
    assert settings.container.secret_env == {"API_TOKEN": "tok"}
    assert settings.servers == p.stages.deploy.servers
    from pipelines.deploy import make_deployer
    release = make_deployer(p, run_id="r").plan().servers[0].release
    assert dict(release.spec.env) == {"MODE": "production", "REGION": "eu"}


# --------------------------------------------------------------------------- paths

def test_paths_on_the_runners_machine_are_relative_to_the_file(tmp_path):
    (tmp_path / "ci").mkdir()
    f = tmp_path / "ci" / "pipeline.yml"
    f.write_text(textwrap.dedent("""\
        name: demo
        repository: {url: x}
        image: {name: a}
        stages:
          scan: {trivy: bin/trivy, hadolint_path: /opt/hadolint, ignore_file: .trivyignore,
                 db: {cache_dir: trivy-db}}
          build: {context: app, dockerfile: Dockerfile.prod}
          deploy:
            servers: [10.0.0.1]
            ssh: {key_file: "${KEYS}/id", known_hosts: ~/kh}
        """))
    p = load_pipeline(f, environ={"KEYS": "keys"})
    assert p.stages.deploy.ssh.key_file == str(tmp_path / "ci" / "keys" / "id")
    assert p.stages.deploy.ssh.known_hosts == os.path.expanduser("~/kh")
    assert p.stages.scan.trivy == str(tmp_path / "ci" / "bin" / "trivy")
    assert p.stages.scan.hadolint_path == "/opt/hadolint"
    # Paths in the repository and in the cache are left for the stage that knows the root.
    assert (p.stages.scan.ignore_file, p.stages.scan.db.cache_dir) == (".trivyignore", "trivy-db")
    assert (p.stages.build.context, p.stages.build.dockerfile) == ("app", "Dockerfile.prod")
