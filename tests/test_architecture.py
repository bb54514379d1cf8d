"""The package's shape (docs/architecture.md): no stage module imports another, no other module
imports a stage module, and the names the workflow checks while it builds the job graph, and
every settings declaration, load without torch. The package works without Snakemake: only the workflow's own modules (workflow/lib) read it. Shared pieces live in modules of their own (tesla.tables, tesla.grids,
tesla.input_space, tesla.zca, ...); a stage module (the `tesla <command>` of each stage) is
imported by the command line only.

Time budget: about 3 seconds (two short subprocesses)."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_method_versions import _imports, module_path

import tesla

ROOT = Path(__file__).resolve().parents[1]

#: modules that implement a `tesla` command
STAGES = ("tesla.prepare", "tesla.experts", "tesla.distill", "tesla.evaluation", "tesla.results",
          "tesla.report", "tesla.export", "tesla.zca_fit")
#: the command line, which imports each stage module (by name, when its command runs)
COMMAND_LINE = {"tesla.cli", "tesla.__main__"}


def _package_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(tesla.__path__, "tesla."))


def _stage_imports(name: str) -> set[str]:
    """The stage modules ``name`` imports when it runs (anywhere in its body; imports for type
    annotations only, under ``if TYPE_CHECKING:``, do not load the stage and are left out)."""
    tree = ast.parse(module_path(name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            node.body = [ast.Pass()]
    return {m for m in _imports(tree, name) if m in STAGES} - {name}


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_module_imports_another(stage):
    imported = _stage_imports(stage)
    assert not imported, f"{stage} imports the stage module(s) {sorted(imported)}"


def _non_stage_modules() -> list:
    return [n for n in _package_modules() if n not in STAGES and n not in COMMAND_LINE]


@pytest.mark.parametrize("name", _non_stage_modules())
def test_no_other_module_imports_a_stage_module(name):
    """A concept or shared module is importable without any stage: what stages share lives
    below them (a stage's names that others need move to a module of their own)."""
    imported = _stage_imports(name)
    assert not imported, f"{name} imports the stage module(s) {sorted(imported)}; move what it needs out of them"


# -- the names the workflow checks at parse time load no torch -----------------------------------
def _workflow_modules() -> list[str]:
    """Every tesla module the Snakefile, its rule files and the workflow's own modules (workflow/lib,
    which the rule files import) import: they all run at parse time."""
    files = [ROOT / "workflow" / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk")),
             *sorted((ROOT / "workflow" / "lib").glob("*.py"))]
    return _tesla_imports("\n".join(p.read_text() for p in files))


def _tesla_imports(text: str) -> list[str]:
    """The tesla modules that the import lines of ``text`` (Python, or a rule file's Python lines)
    import, a name list in parentheses over several lines included."""
    found = set()
    for m in re.finditer(r"^[ \t]*from (tesla[\w.]*) import (\([^)]*\)|[^\n]*)", text, re.MULTILINE):
        listed = re.sub(r"#[^\n]*", "", m.group(2)).strip("() \n")
        found.add(m.group(1))
        for name in (n.split(" as ")[0].strip() for n in listed.split(",")):
            if name and module_path(f"{m.group(1)}.{name}"):
                found.add(f"{m.group(1)}.{name}")
    found.update(re.findall(r"^[ \t]*import (tesla[\w.]*)", text, re.MULTILINE))
    return sorted(found)


def _first_to_import_torch(modules: list[str]) -> str | None:
    """In a fresh interpreter, import ``modules`` in turn: the first after which torch is loaded."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "    if 'torch' in sys.modules:\n"
            "        print(name)\n"
            "        break\n")
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip() or None


def _settings_modules() -> list[str]:
    """The settings declarations (tesla.settings and every ``tesla.*_settings``) and the module
    that writes the schema's and README's blocks from them (tesla.settings_blocks)."""
    return [n for n in _package_modules() if re.fullmatch(r"tesla\.(\w+_)?settings(_blocks)?", n)]


def test_the_import_lines_are_read_whole():
    text = ("from tesla.training import (\n    accuracy,  # a comment\n    train,\n)\n"
            "    from tesla import registries as named  # (indented, in a rule file's try:)\n"
            "from tesla.data.sources import workflow as data_sources\nimport tesla.devices\n")
    assert _tesla_imports(text) == ["tesla", "tesla.data.sources", "tesla.data.sources.workflow", "tesla.devices",
                                    "tesla.registries", "tesla.training"]


def test_the_workflow_imports_tesla_modules_at_parse_time():
    assert {"tesla.registries", "tesla.devices", "tesla.slurm"} <= set(_workflow_modules())  # tesla.slurm: from workflow/lib
    assert {"tesla.settings", "tesla.distill_settings", "tesla.zca_settings", "tesla.tracking_settings",
            "tesla.training_settings", "tesla.settings_blocks"} <= set(_settings_modules())


def test_what_the_workflow_imports_at_parse_time_loads_no_torch():
    """The workflow imports these while it builds the job graph (every `snakemake` call, every
    job's own start on a cluster): torch would add about a second to each. Every settings
    declaration is held to it too, whether the workflow reads it today or not (and so is
    regenerating the blocks made from them), so that one can move into the workflow freely."""
    culprit = _first_to_import_torch(["tesla", *_workflow_modules(), *_settings_modules()])
    assert culprit is None, f"importing {culprit} imports torch; give the names the workflow needs a torch-free home"


def _all_modules() -> list[str]:
    """Every module of the package but ``tesla.__main__`` (which runs the command line)."""
    return ["tesla"] + [n for n in _package_modules() if n != "tesla.__main__"]


def _modules_with_all() -> list[str]:
    return [n for n in _package_modules() if "__all__" in module_path(n).read_text()]


@pytest.mark.parametrize("name", _modules_with_all())
def test_every_name_a_module_exports_is_there(name):
    """`from tesla.x import *` works: a name that moved elsewhere leaves the `__all__` too."""
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


def test_the_distill_settings_object_stays_in_the_distill_stage():
    """Only the distill stage's own modules (and the generator of the settings' blocks) take the
    whole settings object of `tesla distill`, or the setup that carries it; the library modules
    the loop calls (matching, guard, soft labels, input space, kept sets, ...) are handed the
    values they need, so they stay usable and testable without the stage."""
    from test_bench_architecture import load_script

    script = load_script()
    takers = script.modules_naming(script.read_package(ROOT), script.SETTINGS_OBJECTS)
    outside = [m for m in takers if not m.startswith("tesla.distill") and m != "tesla.settings_blocks"]
    assert "tesla.distill_settings" in takers and not outside, (
        f"{outside} take the distill settings (or DistillSetup); hand them the values they need instead"
    )
