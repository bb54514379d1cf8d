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

