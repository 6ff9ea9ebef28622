"""The import layers of docs/architecture.md, checked on the source (every import statement,
also those inside functions): the floor never imports the stages, the deploy targets or the
runtime; the stages and deploy targets never import the runtime; deploy targets never import
the stages."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each layer is, by module name prefix (a module belongs to the first layer that names it).
ROOF = ("runner.engine", "runner.runlog", "runner.render", "runner.cli", "runner.daemon",
        "runner.__main__", "runner_lab")
STAGES = ("pipelines",)
TARGETS = ("deployers",)
FLOOR = ("runner",)  # everything else in runner/: model, stage contract, outputs, loader, ...

FORBIDDEN = {
    "floor": ROOF + STAGES + TARGETS,
    "stages": ROOF,
    "targets": ROOF + STAGES,
}


def _layer(module: str) -> str:
    for name, prefixes in (("roof", ROOF), ("stages", STAGES), ("targets", TARGETS),
                           ("floor", FLOOR)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} is in no layer")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top, where in (("runner", ROOT), ("pipelines", ROOT), ("deployers", ROOT),
                       ("runner_lab", ROOT / "lab")):
        for path in sorted((where / top).rglob("*.py")):
            rel = path.relative_to(where).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append((".".join(parts), path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _violations(modules: list[tuple[str, Path]]) -> list[str]:
    bad = []
    for module, path in modules:
        layer = _layer(module)
        for line, imported in _imports(path):
            if any(imported == p or imported.startswith(p + ".")
                   for p in FORBIDDEN.get(layer, ())):
                bad.append(f"{path.name}:{line}: {layer} module {module} "
                           f"imports {imported} ({_layer(imported)})")
    return bad


def test_every_module_is_in_a_layer():
    assert len(_modules()) > 50
    for module, _ in _modules():
        _layer(module)


def test_imports_go_down_the_layers_only():
    assert _violations(_modules()) == []


def test_the_product_never_imports_the_lab():
    # The lab is the distribution runner-cd-lab: runner-cd runs without it (`runner lab` is
    # found by name in runner/cli/main.py only when the lab is installed).
    product = [(m, p) for m, p in _modules() if not m.startswith("runner_lab")]
    assert len(product) > 50
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {imported}" for _, path in product
           for line, imported in _imports(path)
           if imported.split(".")[0] == "runner_lab" or imported.startswith("runner.lab")]
    assert bad == []
    assert not (ROOT / "runner" / "lab").exists()


@pytest.mark.parametrize("module, imported", [
    ("runner.model.fake", "deployers.spec"),
    ("deployers.fake", "pipelines.push"),
    ("pipelines.fake", "runner.engine"),
])
def test_the_check_sees_a_wrong_import_even_inside_a_function(module, imported, tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(f"import os\n\n\ndef f():\n    from {imported} import x\n    return x\n")
    assert _violations([(module, path)]) == [
        f"fake.py:5: {_layer(module)} module {module} imports {imported} ({_layer(imported)})"]
