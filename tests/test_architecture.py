"""The package's shape (docs/architecture.md): no stage module imports another. Shared
pieces live in modules of their own (tesla.tables, tesla.grids, tesla.input_space, ...).
`tesla.zca` is the ZCA artifact (fit, apply, fingerprint), which experts and distillation
use, and also carries the small `tesla zca` command: it imports no stage module itself.
The package works without Snakemake: only the workflow's own modules (workflow/lib) read it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_method_versions import _imports, module_path

#: modules that implement a `tesla` command (besides their concept, for tesla.zca)
STAGES = ("tesla.prepare", "tesla.experts", "tesla.distill", "tesla.evaluation", "tesla.results",
          "tesla.report", "tesla.export", "tesla.zca")
#: stage modules that others may import because they are also a concept's home
CONCEPTS = {"tesla.zca"}


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_module_imports_another(stage):
    tree = ast.parse(module_path(stage).read_text())
    imported = {m for m in _imports(tree, stage) if m in STAGES} - {stage}
    allowed = set() if stage in CONCEPTS else CONCEPTS  # the concept module itself imports no stage
    assert imported <= allowed, f"{stage} imports the stage module(s) {sorted(imported - allowed)}"



def _all_modules() -> list[str]:
    """Every module of the package but ``tesla.__main__`` (which runs the command line)."""
    import pkgutil

    import tesla

    return ["tesla"] + sorted(m.name for m in pkgutil.walk_packages(tesla.__path__, "tesla.") if m.name != "tesla.__main__")


def _modules_with_all() -> list[str]:
    return [n for n in _all_modules() if n != "tesla" and "__all__" in module_path(n).read_text()]


@pytest.mark.parametrize("name", _modules_with_all())
def test_every_name_a_module_exports_is_there(name):
    """`from tesla.x import *` works: a name that moved elsewhere leaves the `__all__` too."""
    import importlib

    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not have: {missing}"


#: what the package must never import: Snakemake and its plugins belong to the workflow
#: (workflow/lib), which the `workflow` extra of pyproject.toml installs
WORKFLOW_ONLY = ("snakemake",)


@pytest.mark.parametrize("name", _all_modules())
def test_no_module_imports_snakemake_even_lazily(name):
    """No import statement of the package names Snakemake or a plugin of it, in a function or not."""
    found = sorted(m for m in _imports(ast.parse(module_path(name).read_text()), name) if m.startswith(WORKFLOW_ONLY))
    assert not found, f"{name} imports {found}: the package must work without Snakemake (workflow/lib is its glue)"


def test_every_module_imports_with_snakemake_unimportable():
    """Every module of the package imports in a Python where Snakemake and its plugins cannot
    be imported (as after `pip install -e .` without the `workflow` extra)."""
    modules = _all_modules()
    script = f"""
import importlib, importlib.abc, sys

class NoSnakemake(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith({WORKFLOW_ONLY!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, NoSnakemake())
for name in {modules!r}:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith({WORKFLOW_ONLY!r}))
assert not loaded, loaded
print("imported", len({modules!r}), "modules")
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"imported {len(modules)} modules" in run.stdout
