"""The packages' dependencies point one way (docs/architecture.md):

    ffcv_data  <-  pml_dist core  <-  pml_dist.training  <-  pml_dist.use
               <-  pml_dist.pseudo  <-  pml_dist.pipeline  <-  cli

pml_dist.use (predict, export) is a leaf beside the pipeline: only the command line imports it.
Every import of every module counts, also those inside functions (the heavy ones live there)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ["ffcv_data", "pml_dist", "pml_dist.training", "pml_dist.use", "pml_dist.pseudo",
          "pml_dist.pipeline", "pml_dist.cli"]


def _layer(module: str) -> int | None:
    """The highest layer whose package holds `module` (pml_dist.pseudo.infer -> pml_dist.pseudo)."""
    if module == "pml_dist.__main__":  # `python -m pml_dist` is the command line
        module = "pml_dist.cli"
    found = None
    for i, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            found = i
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_package_imports_one_above_it():
    wrong = []
    files = [*REPO.glob("ffcv_data/**/*.py"), *REPO.glob("pml_dist/**/*.py")]
    assert len(files) > 20
    for path in files:
        module = _module(path)
        own = _layer(module)
        for imported in _imports(path):
            layer = _layer(imported)
            # `from pml_dist import x` names a module: judged by the module, not by the package
            if imported in LAYERS[1:2] or layer is None:
                continue
            if layer > own:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_only_the_command_line_uses_pml_dist_use():
    """The layer order lets pseudo and pipeline import pml_dist.use; they must not: it is the user's
    end of the library, not a part of the experiment."""
    wrong = []
    for path in [*REPO.glob("ffcv_data/**/*.py"), *REPO.glob("pml_dist/**/*.py")]:
        module = _module(path)
        if _layer(module) in (LAYERS.index("pml_dist.use"), LAYERS.index("pml_dist.cli")):
            continue
        wrong += [f"{module} imports {name}" for name in _imports(path)
                  if name == "pml_dist.use" or name.startswith("pml_dist.use.")]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_check_sees_a_wrong_import(tmp_path):
    """The checker itself: an import pointing back up is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pml_dist.pipeline.graph import Graph\n")
    assert "pml_dist.pipeline.graph" in _imports(bad)
    assert _layer("pml_dist.pipeline.graph") > _layer("pml_dist.training.trainer") > _layer("ffcv_data.coco")
