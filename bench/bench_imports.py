"""What imports cost at start-up: torch, torchvision's models, the distillation stage, and the
settings declarations against a settings library (docs/architecture.md, Imports and Settings).

The workflow imports ``tesla.settings`` and ``tesla.distill_settings`` while Snakemake builds the
job graph, on every ``snakemake`` call, so they must not import torch. Each case is timed in a fresh ``python -c`` (so nothing is
cached in the process), ``--repeats`` times, and the median of its CPU time printed as a Markdown table; a
library that is not installed is reported as such. Run from the repository root:

    python3 bench/bench_imports.py --repeats 7
"""

from __future__ import annotations

import argparse
import resource
import dataclasses
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declarations() -> int:
    """The number of settings declared by ``DistillSettings``."""
    sys.path.insert(0, str(ROOT))
    from tesla.distill_settings import DistillSettings

    return len(dataclasses.fields(DistillSettings))


def cases(fields: int) -> dict[str, str]:
    """What each row imports (and, for pydantic, defines: a model of as many fields)."""
    model = "; ".join(f"f{i}: int = {i}" for i in range(fields))
    return {
        "import torch": "import torch",
        "import torch, torchvision.models": "import torch, torchvision.models",
        "import tesla.distill": "import tesla.distill",
        "import tesla.settings": "import tesla.settings",
        "import tesla.distill_settings": "import tesla.distill_settings",
        "from pydantic import BaseModel": "from pydantic import BaseModel",
        f"pydantic, one {fields}-field model defined": (
            "from pydantic import BaseModel\n"
            f"exec('class M(BaseModel):\\n    ' + {model!r}.replace('; ', '\\n    '))"
        ),
    }


def seconds(code: str) -> float | None:
    """CPU seconds (user + system) of one fresh interpreter running ``code``, None when it
    fails: unlike wall time, not inflated by other jobs sharing the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu if done.returncode == 0 else None


def baseline(repeats: int) -> float:
    """Median CPU seconds of an interpreter that imports nothing (subtracted from every row)."""
    return statistics.median(seconds("pass") or 0.0 for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="fresh interpreters per case (the median is printed)")
    a = p.parse_args()
    fields = declarations()
    empty = baseline(a.repeats)
    print(f"{fields} settings declared by DistillSettings; python {sys.version.split()[0]}; "
          f"CPU time (user + system), median of {a.repeats}, less an empty interpreter's start ({empty * 1000:.0f} ms)\n")
    print("| what | CPU ms |\n|---|---|")
    for what, code in cases(fields).items():
        runs = [seconds(code) for _ in range(a.repeats)]
        shown = "not installed" if None in runs else f"{(statistics.median(runs) - empty) * 1000:.0f}"
        print(f"| {what} | {shown} |")


if __name__ == "__main__":
    main()
