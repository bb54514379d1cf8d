"""bench/architecture.py: its table parses on this tree, and it finds what it measures (an import
circle through a deferred import, a concept importing a stage, a long function) in a tiny
package made here. Time: about a second (no dry run)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "architecture.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_architecture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_table(text: str) -> dict[str, str]:
    """{measure: value} of the script's markdown table; fails on any line that is not a row of two cells."""
    lines = text.strip().splitlines()
    assert lines[:2] == ["| measure | value |", "|---|---|"], lines[:2]
    rows = {}
    for line in lines[2:]:
        assert line.startswith("| ") and line.endswith(" |"), line
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]
        assert len(cells) == 2 and all(cells), line
        rows[cells[0]] = cells[1]
    return rows


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "tesla" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_table_of_this_tree_parses():
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = parse_table(result.stdout)
    for measure in ("import circles (module- and function-level imports)", "concept -> stage imports",
                    "tesla imports inside functions", "functions over 80 lines", "modules", "lines of the package",
                    "modules naming DistillSettings or DistillSetup"):
        assert rows[measure].isdigit(), (measure, rows[measure])
    largest = rows["largest 10 modules (lines)"].split(", ")
    assert len(largest) == 10 and all(re.fullmatch(r"tesla(\.\w+)* \(\d+\)", m) for m in largest), largest
    long = rows["functions over 80 lines (lines)"]
    assert int(rows["functions over 80 lines"]) == (0 if long == "none" else len(long.split(", ")))
    assert "tesla.prepare" in rows["stage modules (from tesla/cli.py)"].split(", ")


def test_a_circle_an_upward_arrow_and_a_long_function_are_found(tmp_path):
    long_body = "".join(f"    x{i} = {i}\n" for i in range(80))
    root = write_package(tmp_path, {
        "__init__.py": "",
        "cli.py": 'COMMANDS = {"go": ("tesla.stage", "run the stage")}\n',
        "stage.py": "import os\n",
        "first.py": "from tesla import second\n\ndef one():\n    return second.two()\n",
        "second.py": "def two():\n    from tesla.first import one  # deferred: still an import\n    from . import stage\n    return one\n",
        "long.py": "def long():\n" + long_body,
        "distill_settings.py": "class DistillSettings:\n    pass\n",
        "loop.py": "from tesla.distill_settings import DistillSettings\n",
        "guard.py": "from tesla import distill_setup\n\ndef check(setup: distill_setup.DistillSetup):\n    pass\n",
    })
    script = load_script()
    rows = parse_table(script.measure(root).markdown())
    assert rows["import circles (module- and function-level imports)"] == "1"
    assert rows["modules in import circles"] == "tesla.first, tesla.second"
    assert rows["concept -> stage arrows"] == "tesla.second -> tesla.stage"
    assert rows["tesla imports inside functions"] == "2"
    assert rows["functions over 80 lines (lines)"] == "tesla.long.long (81)"
    assert rows["stage modules (from tesla/cli.py)"] == "tesla.stage"
    assert rows["modules naming DistillSettings or DistillSetup (names)"] == "tesla.distill_settings, tesla.guard, tesla.loop"

    (root / "tesla" / "second.py").write_text("def two():\n    return 2\n")  # the circle broken
    rows = parse_table(script.measure(root).markdown())
    assert rows["import circles (module- and function-level imports)"] == "0"
    assert rows["concept -> stage imports"] == "0"
