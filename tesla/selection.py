"""Which synthetic set is reported: the final one, the best by validation, the best by test.

A distillation that keeps its set every K iterations (``tesla distill --keep-every``,
:mod:`tesla.kept_sets`) gives the sets X_{i_1}, ..., X_{i_m}, the last one the final set.
``tesla evaluate --kept-sets`` trains the protocol's R networks on each once, and tests every
trained network on the validation split (images held out of the training split by
``tesla prepare --validation-per-class``, never seen by the experts or distillation) and on
the test split. With v_j and a_j the mean validation and test accuracies of set j over its
R networks, three sets are picked:

* ``final``: j = m, the set the distillation ended with (what ``tesla distill`` writes);
* ``validation``: argmax_j v_j, an honest model selection (the test split plays no part);
* ``test``: argmax_j a_j, what the published code reports (it keeps the set with the best
  *test* accuracy seen during distillation): optimistic, since the test split chose it.

Ties go to the later iteration. The per-set table (``tesla-eval-sets`` v1, docs/formats.md)
lists every kept set with its accuracies and which rule picked it.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tesla.errors import TeslaError
from tesla.tables import format_line, read_format_line, write_csv_atomic

#: what ``--select`` may choose for the reported (acc.csv) number: never the test split
SELECT_RULES: tuple[str, ...] = ("final", "validation")
#: every rule the per-set table reports, in its order
PICK_RULES: tuple[str, ...] = ("final", "validation", "test")
#: how the table and the summaries name the test-set rule
PUBLISHED_LABEL = "published protocol: selected on the test set"
SETS_FORMAT = "tesla-eval-sets"
SETS_FORMAT_VERSION = 1
SET_COLUMNS: tuple[str, ...] = (
    "dataset", "ipc", "engine", "arch", "iteration", "runs", "val_acc_mean", "val_acc_std", "test_acc_mean",
    "test_acc_std", "picked_by", "source",
)  # fmt: skip


@dataclass
class SetScore:
    """One kept set's accuracies (percent), one value per trained network."""

    iteration: int
    source: str
    test_accs: list[float]
    val_accs: list[float] | None = None

    @property
    def test_mean(self) -> float:
        return float(np.mean(self.test_accs))

    @property
    def val_mean(self) -> float:
        return float(np.mean(self.val_accs)) if self.val_accs else math.nan


def _best(scores: Sequence[SetScore], value) -> int | None:
    """The index of the largest value, the later iteration on ties; None when none is known."""
    known = [(value(s), i) for i, s in enumerate(scores) if not math.isnan(value(s))]
    return max(known)[1] if known else None


def pick_sets(scores: Sequence[SetScore]) -> dict[str, int | None]:
    """{rule: index into ``scores`` (sorted by iteration)}; ``validation`` is None without a validation split."""
    if not scores:
        raise TeslaError("no kept set to select from")
    if [s.iteration for s in scores] != sorted(s.iteration for s in scores):
        raise ValueError("scores must be sorted by iteration")
    return {
        "final": len(scores) - 1,
        "validation": _best(scores, lambda s: s.val_mean),
        "test": _best(scores, lambda s: s.test_mean),
    }


def check_select(select: str, validation: object | None) -> None:
    """``--select`` is a rule of :data:`SELECT_RULES`, and ``validation`` needs a validation
    split (``validation``: its path, or None when none is given)."""
    if select not in SELECT_RULES or (select == "validation" and validation is None):
        raise TeslaError(f"--select {select}: choose final, or validation together with --validation VAL.h5 "
                         "(written by tesla prepare --validation-per-class)")


def selected_index(scores: Sequence[SetScore], select: str) -> int:
    """The set ``--select`` reports (``final`` or ``validation``), refused as
    :func:`check_select` refuses (``validation`` needs scores on a validation split)."""
    picks = pick_sets(scores)
    check_select(select, picks["validation"])  # None without scores on a validation split
    return picks[select]


def _std(values: Sequence[float] | None) -> str:
    return "" if not values else f"{float(np.std(np.asarray(values, dtype=np.float64), ddof=0)):.4f}"


def set_rows(scores: Sequence[SetScore], dataset: str, ipc: int, engine: str, arch: str) -> list[dict]:
    """The per-set table's rows (percent, 4 decimals); ``picked_by`` joins the rules that chose the set with ';'."""
    picks = pick_sets(scores)
    rows = []
    for i, s in enumerate(scores):
        rows.append({
            "dataset": dataset, "ipc": ipc, "engine": engine, "arch": arch, "iteration": s.iteration,
            "runs": len(s.test_accs), "val_acc_mean": "" if math.isnan(s.val_mean) else f"{s.val_mean:.4f}",
            "val_acc_std": _std(s.val_accs), "test_acc_mean": f"{s.test_mean:.4f}", "test_acc_std": _std(s.test_accs),
            "picked_by": ";".join(rule for rule in PICK_RULES if picks[rule] == i), "source": s.source,
        })  # fmt: skip
    return rows


def write_sets(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    return write_csv_atomic(path, format_line(SETS_FORMAT, SETS_FORMAT_VERSION), SET_COLUMNS, rows)


def read_sets(path: str | os.PathLike) -> list[dict]:
    """A per-set table, checked for its format line."""
    path = Path(path)
    name, version = read_format_line(path)
    if name != SETS_FORMAT or version != SETS_FORMAT_VERSION:
        raise TeslaError(f"{path}: not a {SETS_FORMAT} table of version {SETS_FORMAT_VERSION} (found {name!r} v{version})")
    with open(path, newline="") as f:
        f.readline()
        return list(csv.DictReader(f))


def three_numbers(rows: Sequence[dict]) -> dict[str, dict]:
    """{rule: the row that rule picked} of one per-set table (``validation`` missing without a validation split)."""
    out = {}
    for row in rows:
        for rule in filter(None, row["picked_by"].split(";")):
            out[rule] = row
    return out


def summary_lines(scores: Sequence[SetScore]) -> list[str]:
    """The three picks as lines: iteration, mean test accuracy, and the validation accuracy that chose it."""
    picks = pick_sets(scores)
    label = {"final": "final set", "validation": "best by validation", "test": f"best by test ({PUBLISHED_LABEL})"}
    lines = []
    for rule in PICK_RULES:
        i = picks[rule]
        if i is None:
            lines.append(f"  {label[rule]}: no validation split given")
            continue
        s = scores[i]
        val = "" if math.isnan(s.val_mean) else f", validation {s.val_mean:.2f}"
        lines.append(f"  {label[rule]}: iteration {s.iteration}, test {s.test_mean:.2f} +- {_std(s.test_accs)[:-2]}{val}")
    return lines


def config_problems(dataset: dict, where: str) -> list[str]:
    """The workflow's checks of the selection keys of a (schema-filled) dataset entry: a row
    with select: validation needs the dataset's validation split, and more than one kept set."""
    problems = []
    for ipc, row in dataset["distill"].items():
        if row.get("select", "final") != "validation":
            continue
        key = f"config key {where}.distill.{ipc}"
        if not dataset.get("validation_per_class"):
            problems.append(
                f"{key}.select: validation needs a validation split, but {where}.validation_per_class is 0; set it "
                "to the images per class to hold out of the training split (e.g. 10), or use select: final"
            )
        if row["keep_every"] >= row["iterations"]:
            problems.append(
                f"{key}.keep_every: {row['keep_every']} keeps only the final set of {row['iterations']} iterations; "
                "lower it (e.g. to iterations / 10) so that there is a choice"
            )
        if int(row.get("gpus", 1)) > 1:
            problems.append(f"{key}: select: validation runs in one process only; set gpus: 1 or select: final")
    return problems
