"""The serving packages never import the tiny-pair builder (issue 13): decode_worker,
predictor_service and speckv_client run where `speckv_tinypair` is not installed (the worker
image removes it), and speckv_eval, which that image also ships, imports without it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVING = {
    "decode_worker": "decode_worker",
    "predictor_service": "predictor_service",
    "speckv_client": "client",
}
BUILDER = "speckv_tinypair"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (lazy imports included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_no_serving_module_names_the_builder() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line}: import {name}"
        for folder in SERVING.values()
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, name in _imports(path)
        if name == BUILDER or name.startswith(BUILDER + ".")
    ]
    assert not offenders, "\n".join(offenders)
    # The scan does see imports: the builder's own CLI names it.
    assert any(n.startswith(BUILDER) for _, n in _imports(REPO / "benchmarks" / BUILDER / "cli.py"))


# A fresh interpreter where `speckv_tinypair` cannot be imported, as in the worker image.
NO_BUILDER = """
import importlib, importlib.abc, pkgutil, sys

class NoBuilder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "speckv_tinypair" or name.startswith("speckv_tinypair."):
            raise ImportError(f"{name} is not installed here (the worker image)")
        return None

sys.meta_path.insert(0, NoBuilder())
"""
# Import every module of the packages named on the command line, then look in sys.modules.
IMPORT_ALL = """
imported = []
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    imported.append(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "speckv_tinypair")
print(len(imported), " ".join(leaked) or "-")
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", NO_BUILDER + code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
        check=False,
    )


@pytest.mark.slow
def test_serving_packages_import_without_the_builder() -> None:
    done = _python(IMPORT_ALL, *SERVING, "speckv_eval")
    assert done.returncode == 0, done.stderr[-3000:]
    count, leaked = done.stdout.split()
    assert leaked == "-", f"imported the builder: {leaked}"
    assert int(count) >= 30  # every module of those packages, not just their __init__
    # The blocker works: the builder itself does not import there.
    assert _python("import speckv_tinypair").returncode != 0


def test_speckv_worker_says_where_the_builder_went_where_it_is_not_installed() -> None:
    done = _python("from decode_worker.cli import main; sys.exit(main(['tiny-pair']))")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "speckv-tiny-pair" in done.stderr
