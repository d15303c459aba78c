"""diffusion/ is the maths layer: it never imports the layers above it (issue #11: the demo-model training
imported nodes/ from inside diffusion/, an upward arrow; it now lives in demo_model/)."""

from __future__ import annotations

import ast
from pathlib import Path

DIFFUSION = Path(__file__).resolve().parents[2] / "diffusion"
HIGHER_LAYERS = {"nodes", "service", "server", "cli", "demo_model", "bench"}


def imported_top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_diffusion_imports_no_higher_layer():
    offenders = {
        str(path.relative_to(DIFFUSION.parent)): sorted(imported_top_level_names(path) & HIGHER_LAYERS)
        for path in DIFFUSION.rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}
