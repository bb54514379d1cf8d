"""The CSV tables we write: a first line naming the format and its version, then a header
row (docs/formats.md), and the columns and rows of the per-run evaluation table
(``tesla-eval-runs``), which ``tesla evaluate`` writes and ``tesla results`` reads.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tesla import __version__
from tesla.files import atomic_output

__all__ = [
    "RUNS_FORMAT", "RUNS_FORMAT_VERSION", "RUN_COLUMNS", "RunResult", "format_line", "read_format_line", "write_csv_atomic",
]

RUNS_FORMAT = "tesla-eval-runs"
#: v2 added the columns lr_decay_epoch and input_space; v3 reset_momentum_at_decay, precision,
#: tf32, memory_format and group_mode; v4 iteration and selection (``tesla results`` reads v1 to v3 too)
RUNS_FORMAT_VERSION = 4

#: columns of the per-run CSV, in order (docs/formats.md)
RUN_COLUMNS: tuple[str, ...] = (
    "dataset",
    "ipc",
    "method",
    "engine",
    "arch",
    "run",
    "seed",
    "epochs",
    "lr_decay_epoch",
    "reset_momentum_at_decay",
    "lr",
    "final_train_loss",
    "test_acc",
    "seconds",
    "labels",
    "dsa",
    "zca",
    "input_space",
    "num_images",
    "device",
    "precision",
    "tf32",
    "memory_format",
    "group_mode",
    "source",
    "iteration",
    "selection",
)


@dataclass
class RunResult:
    """One row of the per-run CSV."""

    dataset: str
    ipc: int
    method: str
    engine: str
    arch: str
    run: int
    seed: int
    epochs: int
    lr_decay_epoch: int
    lr: float
    final_train_loss: float
    test_acc: float
    seconds: float
    labels: str
    dsa: str
    zca: bool
    input_space: str
    num_images: int
    device: str
    source: str
    reset_momentum_at_decay: bool = False
    precision: str = "float32"
    tf32: bool = False
    memory_format: str = "contiguous"
    group_mode: str = "sequential"
    #: a synthetic set's distillation iteration ('' for the baselines) and the rule that chose it among kept sets
    iteration: int | str = ""
    selection: str = ""
    #: accuracy on the validation split (percent; not a column of the runs table: tesla.selection's table has it)
    val_acc: float | None = None

    def row(self) -> dict:
        """The CSV row; ``ipc`` is empty for the ``full`` baseline (all images, no IPC)."""
        row = {c: getattr(self, c) for c in RUN_COLUMNS}
        if self.method == "full":
            row["ipc"] = ""
        return row


def format_line(name: str, version: int) -> str:
    """The first line of every CSV we write: it names the format and its version."""
    return f"# format: {name}, format_version: {version}, tesla_version: {__version__}\n"


def write_csv_atomic(path: str | os.PathLike, header_line: str, columns: Sequence[str], rows: Sequence[dict]) -> Path:
    """Write a CSV with a leading ``# format: ...`` line to a temporary name, then rename it."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(header_line)
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def read_format_line(path: Path) -> tuple[str, int]:
    """Parse the ``# format: NAME, format_version: V, ...`` first line of our CSVs."""
    with open(path, "r", newline="") as f:
        first = f.readline().strip()
    if not first.startswith("#"):
        return "", -1
    fields = {}
    for part in first.lstrip("#").split(","):
        if ":" in part:
            key, value = part.split(":", 1)
            fields[key.strip()] = value.strip()
    try:
        version = int(fields.get("format_version", -1))
    except ValueError:
        version = -1
    return fields.get("format", ""), version
