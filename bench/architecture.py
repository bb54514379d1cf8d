"""Measures of the package's shape, printed as one markdown table (standard library only).

Read from the source files as syntax trees (nothing is imported or run), in the folder given
(default: the project holding this script):

(a) **imports between ``tesla`` modules**: the import circles (strongly connected components of
    more than one module, over module-level and function-level imports alike), and the arrows
    from a concept module up to a stage module. The stage modules are those the command line
    dispatches to (the module names in ``tesla/cli.py``'s ``COMMANDS``, read from its syntax
    tree, so a renamed or split module is followed; :data:`DEFAULT_STAGES` when that table is
    not found), with their submodules when a stage is a package; ``tesla.cli`` and
    ``tesla.__main__`` sit above them. Every other module is a concept module;
(b) the ``tesla`` imports made inside functions (deferred imports), counted;
(c) the functions (and methods) longer than 80 lines, from ``def`` to their last line;
(d) the lines of each module, the 10 largest;
(f) where a stage's settings object goes: the modules that name ``DistillSettings`` or
    ``DistillSetup``, which carries it (import it, name it as a module's attribute, or define
    it), i.e. that take the whole settings of ``tesla distill`` rather than the values they
    need (a module handed the object without naming its type is not seen);
(e) with ``--dry-run-time``: the seconds ``snakemake -n --cores 1`` takes to plan the demo (the
    README's ``snakemake --cores all``: the default target) in a temporary copy of the project.

An import names a module: ``from tesla.x import y`` imports ``tesla.x.y`` when that is a module
of the tree, else ``tesla.x``; relative imports are resolved. Dynamic imports
(``importlib.import_module``) are not counted.

    python3 bench/architecture.py                       # this tree
    python3 bench/architecture.py --root /tmp/other --dry-run-time
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tesla"
#: the stage modules when tesla/cli.py has no readable COMMANDS table
DEFAULT_STAGES = ("tesla.prepare", "tesla.zca", "tesla.experts", "tesla.distill", "tesla.evaluation",
                  "tesla.results", "tesla.report", "tesla.export")
#: modules above the stages (they dispatch to them)
ENTRY_MODULES = ("tesla.cli", "tesla.__main__")
LONG_FUNCTION = 80
LARGEST = 10
#: what the copy of the project for the dry run leaves out
COPY_IGNORE = (".git", ".venv", "__pycache__", ".snakemake", "resources", "results", ".pytest_cache", ".device",
               ".work", "build", "dist", "*.egg-info")


# -- reading the package ----------------------------------------------------------------------


@dataclass
class Module:
    """One module of the package: its name, file, syntax tree and whether it is a package."""

    name: str
    path: Path
    tree: ast.Module
    is_package: bool

    @property
    def lines(self) -> int:
        return len(self.path.read_text(encoding="utf-8").splitlines())


@dataclass
class Import:
    """An import of a package module by another: at module level or inside a function."""

    source: str
    target: str
    deferred: bool
    line: int


def read_package(root: Path, package: str = PACKAGE) -> dict[str, Module]:
    """Every module of ``root/package`` by dotted name (``__init__.py``: the package's name)."""
    base = root / package
    if not base.is_dir():
        raise SystemExit(f"{base}: no such folder; give the project root with --root")
    modules = {}
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path)), is_package)
    return modules


def _imported_names(node: ast.Import | ast.ImportFrom, module: Module, known: set[str]) -> list[str]:
    """The modules of ``known`` an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if node.level:
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    if len(found) < len(node.names) and base in known:
        found.append(base)  # names defined in the module ``base`` itself
    return found


def module_imports(module: Module, known: set[str]) -> list[Import]:
    """The package modules ``module`` imports, each with whether it is inside a function."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Import(module.name, target, in_function, child.lineno)
                             for target in _imported_names(child, module, known) if target != module.name)
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(module.tree, False)
    return found


def import_graph(modules: dict[str, Module]) -> list[Import]:
    known = set(modules)
    return [imp for module in modules.values() for imp in module_imports(module, known)]


# -- (a) circles and upward arrows ------------------------------------------------------------


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components (Tarjan, without recursion), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_circles(modules: dict[str, Module], imports: list[Import]) -> list[list[str]]:
    """The components of more than one module, largest first."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        edges.setdefault(imp.source, set()).add(imp.target)
    circles = [c for c in strongly_connected(sorted(modules), edges) if len(c) > 1]
    return sorted(circles, key=lambda c: (-len(c), c))


def stage_modules(modules: dict[str, Module]) -> tuple[str, ...]:
    """The modules ``tesla/cli.py``'s ``COMMANDS`` names (its values' first string), or :data:`DEFAULT_STAGES`."""
    cli = modules.get(f"{PACKAGE}.cli")
    for node in ast.walk(cli.tree) if cli else ():
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "COMMANDS" and isinstance(node.value, ast.Dict):
            names = []
            for value in node.value.values:
                first = value.elts[0] if isinstance(value, ast.Tuple) and value.elts else value
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.append(first.value)
            if names:
                return tuple(dict.fromkeys(names))
    return DEFAULT_STAGES


def layer_of(name: str, stages: tuple[str, ...], modules: dict[str, Module]) -> str:
    """``entry``, ``stage`` (a stage module, or a module inside a stage package) or ``concept``."""
    if name in ENTRY_MODULES:
        return "entry"
    for stage in stages:
        if name == stage or (stage in modules and modules[stage].is_package and name.startswith(stage + ".")):
            return "stage"
    return "concept"


def upward_arrows(modules: dict[str, Module], imports: list[Import], stages: tuple[str, ...]) -> list[tuple[str, str]]:
    """(concept module, stage module it imports), sorted, each pair once."""
    return sorted({(imp.source, imp.target) for imp in imports
                   if layer_of(imp.source, stages, modules) == "concept" and layer_of(imp.target, stages, modules) == "stage"})


# -- (c) long functions -----------------------------------------------------------------------


def long_functions(modules: dict[str, Module], limit: int = LONG_FUNCTION) -> list[tuple[str, int]]:
    """(``module.function`` or ``module.Class.method``, lines from ``def`` to the end) over ``limit`` lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    if length > limit:
                        found.append((name, length))
                visit(child, name)
            else:
                visit(child, prefix)

    for module in modules.values():
        visit(module.tree, module.name)
    return sorted(found, key=lambda f: (-f[1], f[0]))


# -- (f) where the settings object goes ------------------------------------------------------

#: the settings object of ``tesla distill`` (tesla.distill_settings) and what carries it (tesla.distill_setup)
SETTINGS_OBJECTS = ("DistillSettings", "DistillSetup")


def modules_naming(modules: dict[str, Module], names: tuple[str, ...]) -> list[str]:
    """The modules that import one of ``names`` from a package module, name it as an attribute of
    one (``distill_settings.DistillSettings``) or define a class of that name, sorted."""
    found = set()
    for module in modules.values():
        for node in ast.walk(module.tree):
            imported = isinstance(node, ast.ImportFrom) and any(alias.name in names for alias in node.names)
            if imported or (isinstance(node, ast.ClassDef) and node.name in names) or (
                    isinstance(node, ast.Attribute) and node.attr in names):
                found.add(module.name)
    return sorted(found)


# -- (e) the dry run --------------------------------------------------------------------------


def _snakemake() -> str:
    beside = Path(sys.executable).with_name("snakemake")
    found = str(beside) if beside.exists() else shutil.which("snakemake")
    if found is None:
        raise SystemExit("snakemake not found (beside this Python or on PATH); activate the project's environment")
    return found


def dry_run_seconds(root: Path, repeats: int = 1, targets: tuple[str, ...] = ()) -> list[float]:
    """Wall seconds of ``snakemake -n --cores 1 [targets]`` in a fresh copy of ``root`` per repeat
    (``tesla`` imported from the copy), each checked to succeed."""
    times = []
    command = [_snakemake(), "-n", "--cores", "1", *targets]
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="tesla-dry-run-") as tmp:
            copy = Path(tmp) / "project"
            shutil.copytree(root, copy, ignore=shutil.ignore_patterns(*COPY_IGNORE))
            env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
            start = time.perf_counter()
            result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if result.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed in a copy of {root}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return times


# -- the table --------------------------------------------------------------------------------


@dataclass
class Measures:
    """What the table shows, one value (text) per row."""

    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, measure: str, value: str) -> None:
        self.rows.append((measure, value.replace("|", "\\|").replace("\n", " ") or "none"))

    def markdown(self) -> str:
        lines = ["| measure | value |", "|---|---|"]
        lines += [f"| {measure} | {value} |" for measure, value in self.rows]
        return "\n".join(lines)


def measure(root: Path, dry_run: bool = False, repeats: int = 1, targets: tuple[str, ...] = ()) -> Measures:
    modules = read_package(root)
    imports = import_graph(modules)
    stages = stage_modules(modules)
    out = Measures()
    circles = import_circles(modules, imports)
    out.add("import circles (module- and function-level imports)", str(len(circles)))
    out.add("modules in import circles", "; ".join(", ".join(c) for c in circles))
    arrows = upward_arrows(modules, imports, stages)
    out.add("concept -> stage imports", str(len(arrows)))
    out.add("concept -> stage arrows", ", ".join(f"{a} -> {b}" for a, b in arrows))
    deferred = [imp for imp in imports if imp.deferred]
    out.add("tesla imports inside functions", str(len(deferred)))
    out.add("modules with tesla imports inside functions", str(len({imp.source for imp in deferred})))
    long = long_functions(modules)
    out.add(f"functions over {LONG_FUNCTION} lines", str(len(long)))
    out.add(f"functions over {LONG_FUNCTION} lines (lines)", ", ".join(f"{name} ({n})" for name, n in long))
    sizes = sorted(((m.lines, m.name) for m in modules.values()), key=lambda s: (-s[0], s[1]))
    out.add("modules", str(len(modules)))
    out.add("lines of the package", str(sum(n for n, _ in sizes)))
    out.add(f"largest {LARGEST} modules (lines)", ", ".join(f"{name} ({n})" for n, name in sizes[:LARGEST]))
    out.add("stage modules (from tesla/cli.py)", ", ".join(stages))
    takers = modules_naming(modules, SETTINGS_OBJECTS)
    out.add(f"modules naming {' or '.join(SETTINGS_OBJECTS)}", str(len(takers)))
    out.add(f"modules naming {' or '.join(SETTINGS_OBJECTS)} (names)", ", ".join(takers))
    if dry_run:
        times = dry_run_seconds(root, repeats, targets)
        what = f"median of {len(times)}: " + ", ".join(f"{t:.1f}" for t in times) if len(times) > 1 else "one run"
        out.add("snakemake -n --cores 1, demo (s)", f"{statistics.median(times):.1f} ({what})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project folder (holding tesla/)")
    parser.add_argument("--dry-run-time", action="store_true", help="also time snakemake -n on the demo in a copy")
    parser.add_argument("--repeats", type=int, default=1, help="dry runs to time (the median is shown)")
    parser.add_argument("--target", nargs="*", default=[], help="snakemake targets of the dry run (default: the demo's)")
    args = parser.parse_args(argv)
    print(measure(args.root.resolve(), args.dry_run_time, max(1, args.repeats), tuple(args.target)).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
