"""Dependency direction: config -> model <- kernels; data, optim, checkpoint on config only."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "mpt_jax"

# What each part may import from mpt_jax besides itself (function-level imports included);
# atomic_write is a leaf (files written whole) that any part may use.
ALLOWED = {
    "atomic_write": set(),
    "config": set(),
    "kernels": set(),
    "data": {"atomic_write"},
    "optim": {"config"},
    "checkpoint": {"config"},
    "sharding": {"config"},
    "rounding": set(),
    "run_log": set(),
    "memory": set(),
    "model": {"config", "attention", "kernels", "sharding", "hf_checkpoint", "rounding"},
}


def _part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    """The top-level mpt_jax parts that one source file imports, at any nesting."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = node.module.split(".")
            if names[0] != "mpt_jax":
                continue
            if len(names) > 1:
                parts.add(names[1])
            else:
                parts.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; use mpt_jax.<part>")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "mpt_jax" and len(names) > 1:
                    parts.add(names[1])
    return parts


@functools.cache  # one parse of the package for all the rules
def _imports_by_part() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        part = _part_of(path)
        graph.setdefault(part, set()).update(_imported_parts(path) - {part})
    return graph


def test_the_scan_sees_the_package():
    graph = _imports_by_part()
    # A scan that read nothing would pass every rule below.
    assert {"config", "model", "train", "data", "kernels"} <= graph.keys()
    assert {"model", "optim", "data", "checkpoint"} <= graph["train"]


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_part_imports_only_what_the_layering_allows(part):
    imported = _imports_by_part()[part]
    assert imported <= ALLOWED[part], f"mpt_jax.{part} imports {sorted(imported - ALLOWED[part])}"


def test_nothing_but_the_command_line_imports_train():
    importers = {part for part, imported in _imports_by_part().items() if "train" in imported}
    assert importers <= {"cli"}, f"train imported by {sorted(importers)}"
