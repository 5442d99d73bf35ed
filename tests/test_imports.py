"""The import rule of the package: imports go down only.

Layers, bottom to top (a module may import its own layer and those below it):

0. ``stats``, ``layout``, ``activations``, ``_errors`` — the math, the canonical layouts, the
   activation table, the error types;
1. ``kernels`` — the backends (nothing above them: a backend is a leaf of the design);
2. ``ops``, ``running`` — the op boundary and the running-statistics policy;
3. ``functional`` — argument checks and the call into ops;
4. ``distributed``, ``nn`` — the layers;
5. ``tools`` — convert, fuse, fold, recalibrate, monitor, export;
6. ``experiments``, ``cli`` and the package's ``__init__`` — the harness and the public API.

The test reads every module's imports (the deferred ones inside functions too) from its
source, so an upward import fails here however it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import batchnorm

ROOT = Path(batchnorm.__file__).parent
LAYERS = {
    "stats": 0, "layout": 0, "activations": 0, "_errors": 0,
    "kernels": 1,
    "ops": 2, "running": 2,
    "functional": 3,
    "distributed": 4, "nn": 4,
    "tools": 5,
    "experiments": 6, "cli": 6, "__init__": 6, "__main__": 6,
}


def _top(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> list[str]:
    """Top-level package parts (``kernels``, ``ops``, …) that ``path`` imports."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # ``from . import x`` at the top: x is the module
                    found += [a.name for a in node.names]
                else:
                    found.append(target[0])
            elif node.module and node.module.startswith("batchnorm."):
                found.append(node.module.split(".")[1])
            elif node.module == "batchnorm":
                found += [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names
                      if a.name.startswith("batchnorm.")]
    return found


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        top = path.relative_to(ROOT).parts[0].removesuffix(".py")
        assert top in LAYERS, f"{path}: no layer for {top!r}; add it to LAYERS"


def test_imports_go_down_only():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        top = path.relative_to(ROOT).parts[0].removesuffix(".py")
        mine = LAYERS[top]
        for imported in _imports(path):
            layer = LAYERS.get(_top(imported))
            if layer is not None and layer > mine:
                upward.append(f"{path.relative_to(ROOT)} imports {imported} (layer {layer} > "
                              f"{mine})")
    assert not upward, "\n".join(upward)


def test_kernels_import_nothing_above_them():
    """The rule the issue names: kernels/ never imports ops, functional, nn or tools."""
    for path in (ROOT / "kernels").rglob("*.py"):
        bad = {i for i in _imports(path) if i in ("ops", "functional", "nn", "tools", "running")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
