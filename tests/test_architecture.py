"""The package's shape (docs/architecture.md): no stage module imports another. Shared
pieces live in modules of their own (tesla.tables, tesla.grids, tesla.input_space, ...).
`tesla.zca` is the ZCA artifact (fit, apply, fingerprint), which experts and distillation
use, and also carries the small `tesla zca` command: it imports no stage module itself."""

from __future__ import annotations

import ast

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



def _modules_with_all() -> list[str]:
    import pkgutil

    import tesla

    names = [m.name for m in pkgutil.walk_packages(tesla.__path__, "tesla.")]
    return sorted(n for n in names if "__all__" in module_path(n).read_text())


@pytest.mark.parametrize("name", _modules_with_all())
def test_every_name_a_module_exports_is_there(name):
    """`from tesla.x import *` works: a name that moved elsewhere leaves the `__all__` too."""
    import importlib

    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not have: {missing}"
