"""A stage's code does not change without a decision about its method version.

The workflow reruns a stage's jobs when its method version (``tesla.registries.METHOD_VERSIONS``)
changes, and only then: Snakemake does not see the package's code. So every change of the code
a stage runs must come with a decision: its results change (bump the version: every job of
that stage reruns, and what follows) or they do not (a refactor, a message, a docstring). This
test holds, per stage, the version and a digest of that code (every ``tesla`` module the stage's
command imports, directly or not, read as syntax trees without docstrings, so that comments,
docstrings and formatting do not count) as recorded in tests/method_versions.json, and fails
when either differs from today's, saying what to do.

After deciding, record the new state with::

    python tests/test_method_versions.py --update

Time budget: under a second.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tesla"
RECORD = Path(__file__).with_name("method_versions.json")

#: the module of each stage's command (what `tesla <stage>` runs)
STAGE_MODULES = {
    "prepare": "tesla.prepare",  # + the sources, which tesla.data.sources.registry imports by name
    "zca": "tesla.zca_fit",
    "experts": "tesla.experts",
    "distill": "tesla.distill",
    "evaluate": "tesla.evaluation",
    "results": "tesla.results",
    "report": "tesla.report",
}


def module_path(name: str) -> Path | None:
    """The file of a ``tesla.*`` module (a package's __init__.py), or None outside tesla."""
    if name != "tesla" and not name.startswith("tesla."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


#: a function named by its module's path, ``tesla.networks:build_convnet``
_MODULE_FUNCTION = re.compile(r"tesla(\.\w+)+:\w+")


def _imports(tree: ast.AST, name: str) -> set[str]:
    """The modules a module imports anywhere in its body (functions included: lazy imports), and
    those it names as ``module:function`` (looked up when used)."""
    package = name if module_path(name) and module_path(name).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from tesla import x` (a module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_FUNCTION.fullmatch(node.value):
            found.add(node.value.partition(":")[0])  # a `module:function` path, imported when used (tesla.models' builders)
    return found


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def stage_code(stage: str) -> dict[str, str]:
    """{module: the dump of its docstring-free syntax tree} for every tesla module a stage runs."""
    todo, seen = [STAGE_MODULES[stage]], {}
    if stage == "prepare":
        todo += [f"tesla.data.sources.{p.stem}" for p in (PACKAGE / "data" / "sources").glob("*.py") if p.stem != "__init__"]
    while todo:
        name = todo.pop()
        path = module_path(name)
        if path is None or name in seen:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        todo.extend(m for m in _imports(tree, name) if module_path(m) is not None)
        seen[name] = ast.dump(_without_docstrings(tree), include_attributes=False)
    return dict(sorted(seen.items()))


def stage_digest(stage: str) -> str:
    h = hashlib.sha256()
    for name, dump in stage_code(stage).items():
        h.update(f"{name}\0{dump}\0".encode())
    return h.hexdigest()[:16]


def current() -> dict[str, dict]:
    from tesla.registries import METHOD_VERSIONS

    return {stage: {"version": METHOD_VERSIONS[stage], "code": stage_digest(stage)} for stage in STAGE_MODULES}


def test_every_stage_of_the_workflow_has_a_version_here():
    from tesla.registries import METHOD_VERSIONS

    assert set(METHOD_VERSIONS) == set(STAGE_MODULES)


def test_the_code_of_each_stage_changed_only_with_a_decision_on_its_version():
    recorded = json.loads(RECORD.read_text())
    now = current()
    problems = []
    for stage, state in now.items():
        old = recorded.get(stage)
        if old == state:
            continue
        if old is None:
            problems.append(f"{stage}: not recorded yet")
        elif old["version"] != state["version"]:
            problems.append(f"{stage}: method version {old['version']} -> {state['version']}: record it")
        else:
            modules = ", ".join(stage_code(stage))
            problems.append(
                f"{stage}: its code changed (one of {modules}). If the same `tesla {stage}` command now gives "
                f"other results, bump METHOD_VERSIONS[{stage!r}] in tesla/registries.py (every {stage} job reruns, "
                f"and what follows); if not, keep it"
            )
    assert not problems, "\n".join(problems) + "\nthen record the state: python tests/test_method_versions.py --update"


def test_a_changed_module_changes_the_digest_of_the_stages_that_import_it(tmp_path, monkeypatch):
    """The digest follows imports (lazy ones too) and ignores docstrings: a stand-in for
    tesla/soft_labels.py with another body changes distill's digest, not prepare's; a changed
    docstring changes nothing."""
    real = module_path
    before = {stage: stage_digest(stage) for stage in ("distill", "prepare")}
    original = (PACKAGE / "soft_labels.py").read_text()
    assert "tesla.soft_labels" in stage_code("distill") and "tesla.soft_labels" not in stage_code("prepare")
    edited = tmp_path / "soft_labels.py"

    def patched(name: str) -> Path | None:
        return edited if name == "tesla.soft_labels" else real(name)

    monkeypatch.setattr(sys.modules[__name__], "module_path", patched)
    edited.write_text(original.replace('"""', '"""Another docstring. ', 1))
    assert stage_digest("distill") == before["distill"]
    edited.write_text(original + "\n\ndef _extra() -> int:\n    return 1\n")
    assert stage_digest("distill") != before["distill"]
    assert stage_digest("prepare") == before["prepare"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: python {Path(__file__).name} --update   (records the method versions and code digests)")
    sys.path.insert(0, str(ROOT))
    RECORD.write_text(json.dumps(current(), indent=2) + "\n")
    print(f"recorded {RECORD}")
