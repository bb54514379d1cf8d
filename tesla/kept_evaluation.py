"""The kept sets of a distillation, each evaluated once, and the one that is reported.

``tesla evaluate --kept-sets DIR`` takes the sets X_{i_1}, ..., X_{i_m} that ``tesla distill
--keep-every`` kept (:mod:`tesla.kept_sets`), trains the protocol's networks on each once,
measures each network on the test split and, with ``--validation``, on the validation split
too, and picks the set whose runs are reported by the ``--select`` rule (:mod:`tesla.selection`,
docs/selection.md). How one set is trained and tested is the evaluate stage's
(``tesla.evaluation``), which hands it in as a :data:`SetEvaluation`; this module holds the
loop over the sets, what a killed evaluation does not redo, and the selection.

**Resuming.** With a checkpoint, the runs of every set evaluated so far are kept in
``CHECKPOINT.sets.json`` (format ``tesla-eval-sets-progress`` v1, keyed by what the set's runs
depend on) and a killed evaluation resumes after them; the set in training resumes from the
checkpoint itself (``tesla.group_checkpoint``), which is removed once its set is done.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from tesla.files import atomic_output
from tesla.group_checkpoint import remove_checkpoint
from tesla.kept_sets import kept_files
from tesla.selection import SetScore, check_select, selected_index
from tesla.tables import RunResult

__all__ = ["SetEvaluation", "evaluate_kept_sets", "remove_progress"]

#: how one kept set is evaluated: its file -> (the key of its evaluation, what its runs depend on;
#: a function that trains and tests its networks and returns their runs)
SetEvaluation = Callable[[Path], tuple[str, Callable[[], list[RunResult]]]]


def evaluate_kept_sets(
    folder: str | os.PathLike,
    evaluate_set: SetEvaluation,
    validation: str | os.PathLike | None = None,
    select: str = "final",
    checkpoint: str | os.PathLike | None = None,
) -> tuple[list[list[RunResult]], list[SetScore], int]:
    """Evaluate every kept set of a distillation (``tesla distill --keep-every``) with
    ``evaluate_set`` (the protocol, its lr and augmentation those of each set, each network
    measured on the ``validation`` split too); then pick the reported set by ``select``
    (:mod:`tesla.selection`).

    Returns the runs of every set (in iteration order), their :class:`tesla.selection.SetScore`
    and the index of the selected set (its runs' ``selection`` says by which rule). With a
    ``checkpoint``, the sets already evaluated are kept in ``CHECKPOINT.sets.json`` and a
    killed evaluation resumes after them (the set in training resumes from the checkpoint)."""
    check_select(select, validation)
    files = kept_files(folder)
    done = _DoneSets(checkpoint)
    per_set = []
    for iteration, path in files:
        key, train_and_test = evaluate_set(path)
        results = done.get(key)
        if results is None:
            results = train_and_test()
            done.put(key, results)
        per_set.append(results)
    scores = [
        SetScore(iteration, str(path), [r.test_acc for r in rs], None if validation is None else [r.val_acc for r in rs])
        for (iteration, path), rs in zip(files, per_set)
    ]
    chosen = selected_index(scores, select)
    for r in per_set[chosen]:
        r.selection = select
    return per_set, scores, chosen


def progress_path(checkpoint: str | os.PathLike) -> Path:
    """``CHECKPOINT.sets.json``: the runs of the kept sets evaluated so far."""
    return Path(f"{checkpoint}.sets.json")


def remove_progress(checkpoint: str | os.PathLike) -> None:
    """Remove the checkpoint and the finished sets' runs (once the outputs hold them)."""
    remove_checkpoint(checkpoint)
    progress_path(checkpoint).unlink(missing_ok=True)


class _DoneSets:
    """The runs of the kept sets evaluated so far (``CHECKPOINT.sets.json``, format
    ``tesla-eval-sets-progress`` v1): what a killed ``--kept-sets`` evaluation does not redo."""

    FORMAT, VERSION = "tesla-eval-sets-progress", 1

    def __init__(self, checkpoint: str | os.PathLike | None) -> None:
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.path = None if checkpoint is None else progress_path(checkpoint)
        self.sets: dict[str, list[dict]] = {}
        if self.path is not None and self.path.exists():
            try:
                payload = json.loads(self.path.read_text())
                if payload.get("format") == self.FORMAT and payload.get("format_version") == self.VERSION:
                    self.sets = dict(payload["sets"])
            except (ValueError, KeyError, TypeError) as exc:
                _log(f"{self.path}: unreadable ({exc}); the kept sets are evaluated afresh")

    def get(self, key: str) -> list[RunResult] | None:
        rows = self.sets.get(key)
        return None if rows is None else [RunResult(**row) for row in rows]

    def put(self, key: str, results: list[RunResult]) -> None:
        if self.path is None:
            return
        self.sets[key] = [asdict(r) for r in results]
        with atomic_output(self.path) as tmp:
            Path(tmp).write_text(json.dumps({"format": self.FORMAT, "format_version": self.VERSION, "sets": self.sets}))
        remove_checkpoint(self.checkpoint)  # the next set starts its own training


def _log(message: str) -> None:
    print(f"tesla evaluate: {message}", file=sys.stderr, flush=True)
