"""The documentation says only what the code does: README.md, docs/*.md and bench/README.md.

- every relative link resolves: the file exists, and a `#fragment` names a heading of it;
- every `runner …` command shown (in code blocks and inline code) exists in the click command
  tree of runner.cli, with the options it is shown with;
- every fenced ```yaml block loads with the project's own loaders: a pipeline with
  runner.loader, a daemon config with runner.daemon.config. A block of top-level keys of one of
  them but not all a pipeline needs is loaded merged into a minimal pipeline; any other part
  says where it belongs in its first line, and is loaded in place in a minimal document:
      # part of a pipeline file[, under stages:]
      # part of a daemon config[, under pipelines:]
  (a block of nothing but comments, such as an editor's modeline, has nothing to load);
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

from runner.cli import cli
from runner.daemon.config import DaemonConfig, load_config
from runner.errors import InvalidInput
from runner.loader import load_pipeline_text
from runner.model import Pipeline

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])
PAGES = list(DOCS)

# What a `${NAME}` in a documented pipeline stands for, when the block itself does not say.
EXAMPLE_VALUES = {
    "REGISTRY": "registry.example.com",
    "DEPLOY_HOSTS": "root@203.0.113.10,root@203.0.113.11",
    "SSH_KEY_FILE": "/etc/runner/ssh/id_ed25519",
    "KNOWN_HOSTS_FILE": "/etc/runner/ssh/known_hosts",
    "PROXY_IMAGE": "caddy:2",
    "REPO_URL": "https://github.com/me/app.git",
}
MINIMAL_PIPELINE = {
    "version": 1, "name": "docs",
    "repository": {"url": "https://github.com/me/app.git"},
    "image": {"name": "registry.example.com/me/app"},
}
MINIMAL_DAEMON = {"data_dir": "/var/lib/runner"}
# The top-level keys of each kind of file, as the models define them.
PIPELINE_KEYS = {f.alias or n for n, f in Pipeline.model_fields.items() if not f.exclude}
DAEMON_KEYS = {f.alias or n for n, f in DaemonConfig.model_fields.items() if not f.exclude}
PIPELINE_REQUIRED = {f.alias or n for n, f in Pipeline.model_fields.items() if f.is_required()}
PART = re.compile(r"^#\s*part of a (pipeline file|daemon config)(?:, under ([a-z_.]+):)?\s*$")


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _text(path: Path) -> str:
    """The page without its HTML comments (notes for the maintainers, not shown)."""
    return re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.S)


# -- parsing the markdown -----------------------------------------------------------------------

@dataclass
class Block:
    lang: str
    line: int  # of the first line of the block's content, 1-based
    text: str


def code_blocks(text: str) -> list[Block]:
    """Fenced blocks (``` or ~~~), and indented ones (four spaces after a blank line)."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    prev_blank = True
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if m:
            indent, fence, lang = m.groups()
            body, start = [], i + 2
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            out.append(Block(lang.lower(), start, "\n".join(body)))
            i += 1
            prev_blank = False
            continue
        if prev_blank and lines[i].startswith("    ") and lines[i].strip() \
                and not re.match(r"^\s*([-*+]|\d+\.)\s", lines[i]):
            body, start = [], i + 1
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            out.append(Block("", start, "\n".join(body).rstrip()))
            prev_blank = True
            continue
        prev_blank = not lines[i].strip()
        i += 1
    return out


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            fence = None
        elif fence is None:
            out.append(line)
    return "\n".join(out)


def inline_code(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)\1", prose(text).replace("\n", " "))]


def links(text: str) -> list[str]:
    body = prose(text)
    body = re.sub(r"(`+).+?\1", "", body.replace("\n", " "))
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", body)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# -- links ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(_text(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file {dest}")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: {_id(dest)} has no heading #{fragment}")
    assert not broken, "\n".join(broken)


# -- commands -------------------------------------------------------------------------------------

_PREFIX = re.compile(r"^(?:\$\s+|sudo\s+|exec\s+|runuser\s+-u\s+\S+\s+--\s+|[A-Z_][A-Z0-9_]*=\S*\s+)+")


def shell_commands(line: str) -> list[str]:
    """The commands of a shell line that start with `runner` (after env assignments, sudo,
    runuser; inside $(...); after &&, ||, ;, or a pipe written with spaces around it)."""
    line = re.sub(r"\s+#.*$", "", line)
    parts = re.findall(r"\$\(([^()]*)\)", line)
    line = re.sub(r"\$\([^()]*\)", "X", line)
    parts += re.split(r"\s(?:&&|\|\||;|\|)\s|;\s*$", line)
    out = []
    for part in parts:
        part = _PREFIX.sub("", part.strip().lstrip("\"'(").strip())
        # `runner`, or a path to it (.venv/bin/runner), not /etc/runner
        if re.match(r"^(?:\S*bin/)?runner(?:\s|$)", part):
            out.append(re.sub(r"^\S*bin/runner", "runner", part))
    return out


def documented_commands(text: str) -> list[tuple[str, str]]:
    """(where, command line) of every `runner …` in code blocks and inline code."""
    found = []
    for block in code_blocks(text):
        if block.lang in ("yaml", "json", "ini", "dockerfile", "caddyfile"):
            continue
        joined = re.sub(r"\\\n\s*", " ", block.text)
        for n, line in enumerate(joined.splitlines()):
            found += [(f"line {block.line + n}", c) for c in shell_commands(line)]
    for span in inline_code(text):
        found += [(f"`{span}`", c) for c in shell_commands(span)]
    return found


def _options(cmd: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def check_command(line: str) -> str | None:
    """None when `line` (runner SUBCOMMAND… [OPTIONS] ARGS) matches the command tree, else why."""
    try:
        words = shlex.split(line.replace("…", " "), posix=True)
    except ValueError:
        words = line.split()
    words = words[1:]
    ctx = click.Context(cli, info_name="runner")
    # Alternatives shown as `app logs|exec|remove`: each must exist; the first is followed.
    chain: list[click.Command] = [cli]
    cmd: click.Command = cli
    args: list[str] = []
    while words:
        word = words.pop(0)
        if isinstance(cmd, click.Group) and re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", word):
            names = word.split("|")
            subs = [cmd.get_command(ctx, n) for n in names]
            missing = [n for n, s in zip(names, subs) if s is None]
            if missing:
                return f"no command `{' '.join(c.name or 'runner' for c in chain)} {missing[0]}`"
            if len(names) > 1:
                for sub in subs[1:]:
                    if not isinstance(sub, click.Command):
                        return f"{sub} is not a command"
            cmd = subs[0]
            chain.append(cmd)
            continue
        args.append(word)
        args += words
        break
    if isinstance(cmd, click.Group) and cmd is not cli and not args:
        return None  # `runner app` alone: the group's help
    known = set().union(*(_options(c) for c in chain[-1:])) | (_options(cli) if cmd is cli else set())
    for word in args:
        if word == "--":
            break
        for token in word.strip("[]").split("|"):
            opt = token.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", opt) and opt not in known:
                return f"`{' '.join(c.name or 'runner' for c in chain)}` has no option {opt}"
    return None


def test_command_checker_refuses_what_does_not_exist():
    # The checker itself must be able to fail, or the test below proves nothing.
    assert check_command("runner exec pipeline.yaml --dry-run") is None
    assert check_command("runner app logs|exec|remove pipeline.yaml") is None
    assert check_command("runner rollback pipeline.yaml [--to POSITION|COMMIT|DIGEST]") is None
    assert "no command" in check_command("runner deploy pipeline.yaml")
    assert "no command" in check_command("runner app logs|tail pipeline.yaml")
    assert "no option --dryrun" in check_command("runner exec pipeline.yaml --dryrun")
    assert shell_commands('eval "$(.venv/bin/runner lab env)"') == ["runner lab env"]
    assert shell_commands("runuser -u runner -- runner daemon --config x --check") == \
        ["runner daemon --config x --check"]
    assert shell_commands("chgrp runner /etc/runner/ssh/*") == []
    assert shell_commands("/etc/runner") == []


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_documented_commands_exist(page: Path):
    wrong = []
    for where, line in documented_commands(_text(page)):
        why = check_command(line)
        if why:
            wrong.append(f"{_id(page)} {where}: {line!r}: {why}")
    assert not wrong, "\n".join(wrong)


def test_the_commands_are_found_at_all():
    # A parser that finds nothing would pass the test above on every page.
    found = [c for p in PAGES for _, c in documented_commands(_text(p))]
    assert len(found) > 50
    assert any(c.startswith("runner daemon --config") for c in found)


# -- YAML blocks ----------------------------------------------------------------------------------

def yaml_blocks() -> list[tuple[Path, Block]]:
    return [(p, b) for p in PAGES for b in code_blocks(_text(p)) if b.lang in ("yaml", "yml")]


def _merge(base: dict, part: dict) -> dict:
    out = dict(base)
    for key, value in part.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _placed(part, under: str | None, top: dict):
    if not under:
        assert isinstance(part, dict), "a part at the top level must be a mapping"
        return _merge(top, part)
    keys = under.split(".")
    if keys == ["pipelines"]:
        assert isinstance(part, list), "a part under pipelines: is a list of entries"
        return {**top, "pipelines": part}
    nested: object = part
    for key in reversed(keys):
        nested = {key: nested}
    return _merge(top, nested)  # type: ignore[arg-type]


def _example_variables(text: str) -> dict[str, str]:
    return {name: EXAMPLE_VALUES[name]
            for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text) if name in EXAMPLE_VALUES}


@pytest.mark.parametrize("page,block", yaml_blocks(),
                         ids=[f"{_id(p)}:{b.line}" for p, b in yaml_blocks()])
def test_yaml_block_loads(page: Path, block: Block, tmp_path: Path):
    where = f"{_id(page)}:{block.line}"
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    part = PART.match(first)
    data = yaml.safe_load(block.text)
    text = block.text  # loaded as written where it can be, so that problems point at its lines
    if data is None:
        pytest.skip(f"{where}: nothing but comments")
    keys = set(data) if isinstance(data, dict) else set()
    if part:
        kind, under = part.groups()
        data = _placed(data, under, MINIMAL_PIPELINE if kind == "pipeline file" else MINIMAL_DAEMON)
        kind = "pipeline" if kind == "pipeline file" else "daemon"
        text = yaml.safe_dump(data, sort_keys=False)
    elif keys and keys <= PIPELINE_KEYS and not keys <= DAEMON_KEYS:
        kind = "pipeline"
        if not PIPELINE_REQUIRED <= keys:  # top-level keys of a pipeline, not a whole one
            text = yaml.safe_dump(_merge(MINIMAL_PIPELINE, data), sort_keys=False)
    elif keys and keys <= DAEMON_KEYS and not keys <= PIPELINE_KEYS:
        kind = "daemon"
    else:
        pytest.fail(f"{where}: a YAML block that is neither a pipeline nor a daemon config "
                    f"(top-level keys {sorted(keys)}): say where it belongs in its first line, "
                    f"e.g. '# part of a pipeline file, under stages:'")
    try:
        if kind == "pipeline":
            # No environment: only the block's own variables and the documented example values.
            # A file with destinations loads for one of them (its first), as `-d` would.
            chosen = next(iter(data.get("destinations") or {}), None)
            load_pipeline_text(text, where, variables=_example_variables(text), environ={},
                               base_dir=tmp_path, destination=chosen)
        else:
            f = tmp_path / "daemon.yaml"
            f.write_text(text)
            load_config(f)
    except InvalidInput as exc:
        pytest.fail(f"{where} ({kind}{', a part' if part else ''}) does not load:\n{exc}")


def test_every_yaml_block_is_checked():
    # The docs show pipelines and daemon configs; if none were found, the parser broke.
    blocks = yaml_blocks()
    assert len(blocks) >= 8, [f"{_id(p)}:{b.line}" for p, b in blocks]


def test_part_marker_places_the_block_where_it_says():
    data = _placed({"deploy": {"enabled": False}}, "stages", MINIMAL_PIPELINE)
    assert data["stages"] == {"deploy": {"enabled": False}} and data["name"] == "docs"
    with pytest.raises(InvalidInput):  # a misplaced part must fail, not pass by accident
        load_pipeline_text(yaml.safe_dump(_placed({"deploy": {"bogus": 1}}, "stages", MINIMAL_PIPELINE)),
                           "<t>", environ={})


def test_readme_starts_with_the_two_commands():
    # The newcomer's first command and CI's (.ci/run runs scripts/test): the README's opening.
    text = (ROOT / "README.md").read_text()
    first = code_blocks(text)[0]
    assert text.startswith("# runner\n\n```sh\n"), text[:80]
    commands = [line.split("#", 1)[0].split() for line in first.text.splitlines()]
    assert commands == [["bash", "scripts/quickstart"], ["bash", "scripts/test"]]
    for _, script in commands:
        assert (ROOT / script).is_file(), script
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
