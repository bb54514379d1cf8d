"""Collect evaluation runs into the result table ``acc.csv`` (``tesla results``).

Input: the per-run CSVs of ``tesla evaluate`` (``tesla-eval-runs`` v4, or an earlier v3, v2 or v1, one per
method and architecture) and, optionally, the expert trajectory files of the dataset. Output: one row
per (dataset, ipc, method, engine, arch) with the mean and the standard deviation of the
test accuracy over the runs (percent):

    acc_mean = (1/n) sum_r a_r,      acc_std = sqrt((1/n) sum_r (a_r - acc_mean)^2)

i.e. the *population* standard deviation (numpy's default, ``ddof=0``), which is what the
published mean +- std numbers of MTT/TESLA (PAPER.md section 8) use, so the tables compare
like with like. The ``full`` row usually is not trained here: it is the final test
accuracy that the experts recorded after training on the whole training split (the
``note`` says so, and the column ``test_epoch`` the epoch after which the experts measured it:
experts that stopped after their last needed snapshot report an earlier epoch than
``--epochs``); runs of ``tesla evaluate --full`` give a trained ``full`` row instead.

A short human-readable summary (architecture, mean +- std, gain over ``random``) is
printed at the end. Format: docs/formats.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tesla.errors import TeslaError
from tesla.settings import add_arguments, from_args, setting
from tesla.tables import RUN_COLUMNS, RUNS_FORMAT, RUNS_FORMAT_VERSION, format_line, read_format_line, write_csv_atomic

ACC_FORMAT = "tesla-acc"
#: v2 added the column test_epoch (read_table reads v1 too)
ACC_FORMAT_VERSION = 2
READABLE_ACC_VERSIONS = (1, ACC_FORMAT_VERSION)
#: columns of acc.csv, in order
ACC_COLUMNS: tuple[str, ...] = (
    "dataset", "ipc", "method", "engine", "arch", "runs", "acc_mean", "acc_std", "test_epoch", "note",
)
GROUP_KEYS = ["dataset", "ipc", "method", "engine", "arch"]
#: row order of the table: the synthetic set first, then the baselines
METHOD_ORDER = {"tesla": 0, "random": 1, "full": 2}
#: runs-file versions read; v1 lacks lr_decay_epoch and input_space (filled in by _upgrade_v1),
#: v1 and v2 lack the v3 columns (V3_DEFAULTS), v1 to v3 the v4 columns (V4_DEFAULTS)
READABLE_RUNS_VERSIONS = (1, 2, 3, RUNS_FORMAT_VERSION)
#: columns whose values must agree within one row of acc.csv (else the runs are refused)
PROTOCOL_COLUMNS = ("epochs", "lr_decay_epoch", "reset_momentum_at_decay", "labels", "input_space", "precision",
                    "selection", "iteration")
#: what a v1 or v2 runs file means by the absence of the v3 columns (tf32 was not recorded)
V3_DEFAULTS = {"reset_momentum_at_decay": False, "precision": "float32", "tf32": "", "memory_format": "contiguous",
               "group_mode": "sequential"}
#: what a runs file before v4 means by the absence of the v4 columns (iteration not recorded, no selection)
V4_DEFAULTS = {"iteration": "", "selection": ""}


# -- reading -------------------------------------------------------------------------------
def read_runs(path: str | os.PathLike) -> pd.DataFrame:
    """One per-run CSV of ``tesla evaluate``, checked for format, version and columns."""
    path = Path(path)
    if not path.exists():
        raise TeslaError(f"{path}: no such runs file; run 'tesla evaluate' first (or fix the path)")
    name, version = read_format_line(path)
    if name != RUNS_FORMAT:
        raise TeslaError(
            f"{path}: not a tesla evaluation runs file (format {name or 'missing'!r}, expected {RUNS_FORMAT!r}); "
            "give the --out files of 'tesla evaluate'"
        )
    if version not in READABLE_RUNS_VERSIONS:
        raise TeslaError(
            f"{path}: {RUNS_FORMAT} format version {version}, this tesla reads versions "
            f"{', '.join(map(str, READABLE_RUNS_VERSIONS))}; re-run 'tesla evaluate' with this version"
        )
    df = pd.read_csv(
        path, comment="#",
        dtype={"engine": str, "arch": str, "dataset": str, "input_space": str, "tf32": str, "iteration": str, "selection": str},
        keep_default_na=False,
    )
    if version == 1:
        df = _upgrade_v1(df)
    if version < 3:
        df = df.assign(**{k: v for k, v in V3_DEFAULTS.items() if k not in df.columns})
    if version < 4:
        df = df.assign(**{k: v for k, v in V4_DEFAULTS.items() if k not in df.columns})
    missing = [c for c in RUN_COLUMNS if c not in df.columns]
    if missing:
        raise TeslaError(f"{path}: columns {', '.join(missing)} missing; re-run 'tesla evaluate'")
    if df.empty:
        raise TeslaError(f"{path}: no runs recorded; re-run 'tesla evaluate'")
    df["ipc"] = pd.to_numeric(df["ipc"].replace("", pd.NA), errors="raise").astype("Int64")
    for column in ("run", "seed", "epochs", "lr_decay_epoch"):
        df[column] = pd.to_numeric(df[column], errors="raise").astype("int64")
    for column in ("lr", "final_train_loss", "test_acc", "seconds"):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    if df["test_acc"].isna().any():
        raise TeslaError(f"{path}: a run has no test accuracy; re-run 'tesla evaluate'")
    df["reset_momentum_at_decay"] = df["reset_momentum_at_decay"].map(lambda v: str(v).lower() in ("true", "1"))
    df["source_file"] = str(path)
    return df


def _upgrade_v1(df: pd.DataFrame) -> pd.DataFrame:
    """A v1 runs table in v2 columns: v1 always decayed at epochs // 2 and always used the
    split's own normalisation (ZCA eps not recorded: ``split+zca``)."""
    df = df.copy()
    if "epochs" in df.columns:
        df["lr_decay_epoch"] = pd.to_numeric(df["epochs"], errors="raise").astype("int64") // 2
    if "zca" in df.columns:
        df["input_space"] = ["split+zca" if str(z).lower() in ("true", "1") else "split" for z in df["zca"]]
    return df


def read_all_runs(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """All per-run CSVs together; refuses the same run twice (e.g. a file given twice)."""
    if not paths:
        raise TeslaError("--runs: give at least one per-run CSV written by 'tesla evaluate'")
    df = pd.concat([read_runs(p) for p in paths], ignore_index=True)
    dup = df.duplicated(GROUP_KEYS + ["run", "seed"], keep=False)
    if dup.any():
        files = sorted(set(df.loc[dup, "source_file"]))
        raise TeslaError(
            f"the same evaluation run appears twice (in {', '.join(files)}); give each runs file once, "
            "or evaluate with a different --seed"
        )
    return df


# -- aggregation ---------------------------------------------------------------------------
def population_std(values: pd.Series) -> float:
    """sqrt(mean((a - mean(a))^2)): numpy's ``std`` with ``ddof=0`` (0 for a single run)."""
    return float(np.std(values.to_numpy(dtype=np.float64), ddof=0))


def _note(group: pd.DataFrame) -> str:
    epochs = int(group["epochs"].iloc[0])
    decay = int(group["lr_decay_epoch"].iloc[0])
    lrs = sorted(set(float(v) for v in group["lr"]))
    lr = f"lr {lrs[0]:.6g}" if len(lrs) == 1 else f"lr {lrs[0]:.6g}..{lrs[-1]:.6g}"
    parts = []
    method = group["method"].iloc[0]
    if method == "random":
        parts.append(f"{len(group)} draws of random real images, hard labels")
    elif method == "full":
        parts.append(f"trained on the whole training split ({int(group['num_images'].iloc[0])} images), hard labels")
    else:
        parts.append(f"synthetic set, learned {lr}, {group['labels'].iloc[0]} labels")
        lr = ""
    restart = ", momentum restarted there" if decay and bool(group["reset_momentum_at_decay"].iloc[0]) else ""
    parts.append(f"{len(group)} random initialisations, {epochs} epochs" + (f" (lr x0.1 from epoch {decay}{restart})" if decay else ""))
    if lr:
        parts.append(lr)
    parts.append(f"DSA {group['dsa'].iloc[0]}")
    selected = _selection_note(group)
    if selected:
        parts.append(selected)
    parts.append(f"inputs {group['input_space'].iloc[0]}")
    if group["precision"].iloc[0] != "float32":
        parts.append(f"precision {group['precision'].iloc[0]}")
    return "; ".join(parts)


def _selection_note(group: pd.DataFrame) -> str:
    """Which kept set the runs trained on, when ``tesla evaluate --kept-sets`` chose it."""
    rule = str(group["selection"].iloc[0])
    iteration = str(group["iteration"].iloc[0])
    if rule == "validation":
        return f"the kept set of iteration {iteration}, selected by its validation accuracy"
    if rule == "final":
        return f"the final set (iteration {iteration}) of the kept sets"
    return ""


def aggregate_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, ipc, method, engine, arch): runs, acc_mean, acc_std (percent), note.

    A group whose runs differ in epochs, decay epoch, label kind or input space is refused:
    averaging different protocols would give a number that means nothing.
    """
    rows = []
    for keys, group in df.groupby(GROUP_KEYS, sort=False, dropna=False):
        for column in PROTOCOL_COLUMNS:
            values = sorted(set(map(str, group[column])))
            if len(values) > 1:
                raise TeslaError(
                    f"runs of {dict(zip(GROUP_KEYS, keys))} differ in {column} ({', '.join(values)}; files "
                    f"{', '.join(sorted(set(group['source_file'])))}); aggregate such runs in separate tables"
                )
        accs = group["test_acc"].astype(np.float64)
        rows.append(
            {
                **dict(zip(GROUP_KEYS, keys)),
                "runs": int(len(group)),
                "acc_mean": float(accs.mean()),
                "acc_std": population_std(accs),
                "test_epoch": int(group["epochs"].iloc[0]),
                "note": _note(group),
            }
        )
    return pd.DataFrame(rows, columns=list(ACC_COLUMNS))


def full_data_rows(expert_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The ``full`` baseline from the experts: each expert's recorded final test accuracy
    (after training on the whole training split), one row per (dataset, expert network).
    The experts of a row must have measured it after the same epoch (``test_epoch``)."""
    records = [expert_summary(p) for p in expert_paths]
    if not records:
        return pd.DataFrame(columns=list(ACC_COLUMNS))
    experts = pd.DataFrame(records)
    rows = []
    for (dataset, arch), group in experts.groupby(["dataset", "arch"], sort=False):
        epochs = sorted(set(int(e) for e in group["test_epoch"]))
        if len(epochs) > 1:
            by_epoch = {e: sorted(group.loc[group["test_epoch"] == e, "path"]) for e in epochs}
            raise TeslaError(
                f"--experts: the {arch} experts of {dataset} measured their test accuracy after different epochs ("
                + "; ".join(f"epoch {e}: {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}" for e, paths in by_epoch.items())
                + "); averaging them means nothing: give experts trained alike (tesla experts --train-to-end trains "
                "every expert to its --epochs)"
            )
        requested = sorted(set(int(e) for e in group["epochs_requested"]))
        stopped = epochs[0] < requested[-1]
        accs = group["test_acc"].astype(np.float64)
        rows.append(
            {
                "dataset": dataset,
                "ipc": pd.NA,
                "method": "full",
                "engine": "",
                "arch": arch,
                "runs": int(len(group)),
                "acc_mean": float(accs.mean()),
                "acc_std": population_std(accs),
                "test_epoch": epochs[0],
                "note": f"expert final test accuracy, {len(group)} expert{'s' if len(group) != 1 else ''}, "
                + (f"{epochs[0]} of {requested[-1]} epochs" if stopped else f"{epochs[0]} epochs")
                + " on the whole training split"
                + (" (training stopped after the last snapshot distillation needs)" if stopped else ""),
            }
        )
    return pd.DataFrame(rows, columns=list(ACC_COLUMNS))


def expert_summary(path: str | os.PathLike) -> dict:
    """dataset, arch (the label evaluation would give the expert's network), the epoch after
    which the final test accuracy (percent) recorded in one ``tesla-trajectory`` file was
    measured, and the epochs its run was asked for."""
    from tesla.models import architecture_label
    from tesla.trajectories import Trajectory

    with Trajectory.open(path) as trajectory:
        accuracy = trajectory.final_test_accuracy
        if not (np.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
            raise TeslaError(f"{path}: recorded final test accuracy {accuracy} is not in [0, 1]; re-run 'tesla experts'")
        return {
            "dataset": trajectory.dataset,
            "arch": architecture_label(trajectory.model_spec),
            "test_epoch": trajectory.test_accuracy_epoch,
            "epochs_requested": trajectory.epochs_requested,
            "test_acc": 100.0 * accuracy,
            "path": str(path),
        }


def build_table(runs: pd.DataFrame, full: pd.DataFrame | None = None) -> pd.DataFrame:
    """acc.csv rows in a stable order: dataset, ipc, then tesla / random / full, then arch."""
    table = aggregate_runs(runs)
    if full is not None and len(full):
        datasets = set(runs["dataset"])
        foreign = sorted(set(full["dataset"]) - datasets)
        if foreign:
            raise TeslaError(
                f"--experts: the experts were trained on {', '.join(foreign)}, but the runs are of "
                f"{', '.join(sorted(datasets))}; give the experts of the same dataset"
            )
        table = pd.concat([table, full], ignore_index=True)
    table["ipc"] = table["ipc"].astype("Int64")
    table["runs"] = table["runs"].astype("int64")
    table["test_epoch"] = table["test_epoch"].astype("int64")
    order = table["method"].map(lambda m: METHOD_ORDER.get(m, len(METHOD_ORDER)))
    table = table.assign(_order=order).sort_values(["dataset", "_order", "method", "engine", "arch", "ipc"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write acc.csv atomically (temporary name, then rename); accuracies with 4 decimals."""
    rows = []
    for rec in table.to_dict("records"):
        rec = dict(rec)
        rec["ipc"] = "" if pd.isna(rec["ipc"]) else int(rec["ipc"])
        rec["acc_mean"] = f"{rec['acc_mean']:.4f}"
        rec["acc_std"] = f"{rec['acc_std']:.4f}"
        rows.append({c: rec[c] for c in ACC_COLUMNS})
    return write_csv_atomic(path, format_line(ACC_FORMAT, ACC_FORMAT_VERSION), ACC_COLUMNS, rows)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read acc.csv back (checks its format line); a v1 table has no ``test_epoch`` (read as missing)."""
    path = Path(path)
    name, version = read_format_line(path)
    if name != ACC_FORMAT or version not in READABLE_ACC_VERSIONS:
        raise TeslaError(
            f"{path}: not a {ACC_FORMAT} table of version {' or '.join(map(str, READABLE_ACC_VERSIONS))} "
            f"(found {name!r} v{version})"
        )
    df = pd.read_csv(path, comment="#", dtype={"engine": str, "arch": str, "dataset": str, "note": str}, keep_default_na=False)
    df["ipc"] = pd.to_numeric(df["ipc"].replace("", pd.NA)).astype("Int64")
    if "test_epoch" not in df.columns:
        df.insert(list(df.columns).index("note"), "test_epoch", pd.NA)
    df["test_epoch"] = pd.to_numeric(df["test_epoch"].replace("", pd.NA)).astype("Int64")
    return df


# -- summary -------------------------------------------------------------------------------
def summary_lines(table: pd.DataFrame) -> list[str]:
    """Per (dataset, ipc, arch): each method's mean +- std and the gain over ``random``."""
    lines = []
    methods = table[table["method"] != "full"]
    for (dataset, ipc), block in methods.groupby(["dataset", "ipc"], sort=False):
        lines.append(f"{dataset}, {ipc} images per class (test accuracy %, mean +- std over runs):")
        for arch, rows in block.groupby("arch", sort=False):
            random = rows[rows["method"] == "random"]
            base = float(random["acc_mean"].iloc[0]) if len(random) else None
            for rec in rows.to_dict("records"):
                name = rec["method"] + (f" ({rec['engine']})" if rec["engine"] else "")
                text = f"  {arch:<16} {name:<16} {rec['acc_mean']:6.2f} +- {rec['acc_std']:5.2f}  ({rec['runs']} runs)"
                if rec["method"] != "random" and base is not None:
                    text += f"  gain over random {rec['acc_mean'] - base:+.2f}"
                lines.append(text)
    for rec in table[table["method"] == "full"].to_dict("records"):
        lines.append(
            f"  {rec['arch']:<16} {'full':<16} {rec['acc_mean']:6.2f} +- {rec['acc_std']:5.2f}  ({rec['note']})"
        )
    return lines


# -- command line --------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultsCommand:
    """Everything ``tesla results`` is told: the per-run tables, the experts, the result table."""

    runs: tuple[Path, ...] = setting(help="per-run CSVs written by 'tesla evaluate'", kind=Path, nargs="+",
                                     required=True, config=None)
    experts: tuple[Path, ...] = setting((), kind=Path, nargs="*", config=None,
                                        help="expert trajectory files: their recorded final test accuracy gives the "
                                             "'full' row")
    out: Path = setting(None, help="result table to write (acc.csv)", kind=Path, required=True, config=None)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ResultsCommand)


def run(args: argparse.Namespace) -> int:
    command = from_args(ResultsCommand, args)
    runs = read_all_runs(command.runs)
    full = full_data_rows(command.experts) if command.experts else None
    table = build_table(runs, full)
    write_table(table, command.out)
    for line in summary_lines(table):
        print(line)
    print(f"-> {command.out}", file=sys.stderr)
    return 0
