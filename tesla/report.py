"""``tesla report``: the pictures of one distillation, for people and for ``snakemake --report``.

* ``--curves PNG``: two panels over the distillation iterations i, read from the metrics CSV
  that ``tesla distill --metrics`` writes:

  - the matching loss L_i = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2
    (noisy, since every iteration draws another expert and start epoch t), with its moving
    average over a window of w = max(1, n/20) iterations, m_i = (1/w) sum_{j=i-w+1..i} L_j;
    L = 1 means the student got no closer to the target than its start;
  - the learned learning rate alpha_i that evaluation will train with;
  - when the metrics record it (format version 3), the matching window: the start epochs
    window_min .. window_max - 1 that iteration i drew t from, and the t drawn.

* ``--grid PNG``: the final synthetic images, one row per class, mapped back to pixels
  (ZCA inverted, normalisation undone; :func:`tesla.grids.save_class_grid`), enlarged by
  pixel replication when narrower than 480 px.

Both files are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.settings import add_arguments, from_args, setting

#: metrics columns the curves need (tesla.distill.METRICS_COLUMNS has more)
CURVE_COLUMNS = ("iteration", "loss", "alpha")
#: the matching window (metrics version 3; absent from versions 1 and 2)
WINDOW_COLUMNS = ("window_min", "window_max", "start_epoch")


def read_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The iteration, loss and alpha columns of a distillation metrics CSV (any version), and
    the window columns when the file has them (version 3)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise TeslaError(f"{path}: no such file; give the --metrics CSV written by 'tesla distill'")
    try:
        table = pd.read_csv(path, comment="#")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TeslaError(f"{path}: not a readable CSV ({exc}); give the --metrics file of 'tesla distill'") from None
    missing = [c for c in CURVE_COLUMNS if c not in table.columns]
    if missing:
        raise TeslaError(
            f"{path}: column(s) {', '.join(missing)} missing (found {', '.join(map(str, table.columns))}); "
            "give the --metrics CSV written by 'tesla distill'"
        )
    if len(table) == 0:
        raise TeslaError(f"{path}: no iterations recorded; the distillation ran 0 iterations")
    window = WINDOW_COLUMNS if all(c in table.columns for c in WINDOW_COLUMNS) else ()
    return {c: table[c].to_numpy(dtype=np.float64) for c in (*CURVE_COLUMNS, *window)}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """m_i = mean of the last min(w, i+1) values up to i (same length as ``values``)."""
    window = max(1, int(window))
    cumsum = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def _savefig_atomic(fig, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_curves(metrics: dict[str, np.ndarray], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (raw and moving average), alpha and (when recorded) the matching window against the
    iteration, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    it, loss, alpha = metrics["iteration"], metrics["loss"], metrics["alpha"]
    window = max(1, len(loss) // 20)
    window_panel = "window_max" in metrics and np.isfinite(metrics["window_max"]).any()
    fig, axes = plt.subplots(1, 3 if window_panel else 2, figsize=(15 if window_panel else 10, 3.6))
    ax_loss, ax_alpha = axes[0], axes[1]
    ax_loss.plot(it, loss, color="0.75", linewidth=0.8, label="per iteration")
    ax_loss.plot(it, moving_average(loss, window), color="C0", linewidth=1.6, label=f"moving average ({window})")
    ax_loss.axhline(1.0, color="0.4", linestyle=":", linewidth=0.8)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("matching loss (normalised)")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_alpha.plot(it, alpha, color="C1", linewidth=1.4)
    ax_alpha.set_xlabel("iteration")
    ax_alpha.set_ylabel("learned learning rate alpha")
    ax_alpha.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if window_panel:
        ax = axes[2]
        ax.fill_between(it, metrics["window_min"], metrics["window_max"] - 1, step="mid", color="C2", alpha=0.3,
                        label="window (start epochs)")
        ax.plot(it, metrics["start_epoch"], ".", color="C2", markersize=2, label="start epoch drawn")
        ax.set_xlabel("iteration")
        ax.set_ylabel("start epoch t")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        _savefig_atomic(fig, path)
    finally:
        plt.close(fig)
    return path


#: grids narrower than this are enlarged by pixel replication (8x8 digits are unreadable otherwise)
MIN_GRID_WIDTH = 480


def enlarge_png(path: Path, min_width: int = MIN_GRID_WIDTH) -> None:
    """Enlarge a small PNG by an integer factor k = ceil(min_width / width), nearest
    neighbour (each pixel becomes a k x k block, so no detail is invented)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
    if img.width >= min_width:
        return
    k = -(-min_width // img.width)
    big = img.resize((img.width * k, img.height * k), Image.NEAREST)
    with atomic_output(path) as tmp:
        big.save(tmp, format="PNG")


def plot_grid(synthetic_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The final synthetic images of a ``tesla-synthetic`` file, one row per class."""
    from tesla.grids import save_class_grid
    from tesla.synthetic import SyntheticSet

    syn = SyntheticSet.load(synthetic_path)
    path = save_class_grid(
        syn.images, syn.labels, syn.num_classes, path, syn.mean, syn.std, zca=syn.zca(), max_cols=10
    )
    enlarge_png(path)
    return path


@dataclass(frozen=True)
class ReportCommand:
    """Everything ``tesla report`` is told: what to read and which pictures to write."""

    metrics: Path | None = setting(None, kind=Path, config=None, help="metrics CSV written by 'tesla distill --metrics'")
    synthetic: Path | None = setting(None, kind=Path, config=None, help="synthetic set written by 'tesla distill'")
    curves: Path | None = setting(None, kind=Path, config=None,
                                  help="PNG to write: loss and learned learning rate per iteration")
    grid: Path | None = setting(None, kind=Path, config=None, help="PNG to write: the synthetic images, one row per class")
    title: str | None = setting(None, config=None, help="title of the curves (default: the metrics file's folder)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ReportCommand)


def run(args: argparse.Namespace) -> int:
    command = from_args(ReportCommand, args)
    if command.curves is None and command.grid is None:
        raise TeslaError("nothing to do: give --curves (with --metrics) and/or --grid (with --synthetic)")
    if command.curves is not None:
        if command.metrics is None:
            raise TeslaError("--curves needs --metrics (the CSV written by 'tesla distill --metrics')")
        title = command.title if command.title is not None else command.metrics.parent.name
        plot_curves(read_metrics(command.metrics), command.curves, title=title)
        print(f"wrote {command.curves}")
    if command.grid is not None:
        if command.synthetic is None:
            raise TeslaError("--grid needs --synthetic (the file written by 'tesla distill')")
        plot_grid(command.synthetic, command.grid)
        print(f"wrote {command.grid}")
    return 0
