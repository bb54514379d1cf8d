"""What a distillation writes and shows besides its checkpoint: the per-iteration metrics
CSV (``tesla-distill-metrics``, docs/formats.md), PNG grids of the synthetic images, the
synthetic set file (``tesla-synthetic``, :mod:`tesla.synthetic`), the sets kept every K
iterations (:mod:`tesla.kept_sets`), the progress bar and the live curves of an optional
tracker (:mod:`tesla.tracking`). A running distillation records each iteration through one
:class:`RunRecord`.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tesla import __version__, guard
from tesla.distill_setup import DistillSetup, input_fingerprints, result_key
from tesla.distill_state import DistillState
from tesla.matching import MatchResult
from tesla.grids import class_grid, save_class_grid
from tesla.kept_sets import Keeper
from tesla.soft_labels import learned_soft_labels, mean_entropy
from tesla.synthetic import SyntheticSet
from tesla.tables import format_line, write_csv_atomic
from tesla.tracking import TrackerOptions, Tracking, open_tracking
from tesla.tracking import disabled as tracking_disabled

try:
    import resource  # the process's peak resident set size (Linux, macOS)
except ImportError:  # pragma: no cover - not on Linux/macOS
    resource = None

METRICS_FORMAT = "tesla-distill-metrics"
#: 2: adds the ``max_image_rms`` column; 3: adds the matching window (``window_min``,
#: ``window_max``: t was drawn from window_min .. window_max - 1) and ``grad_norm_labels``
METRICS_VERSION = 3
METRICS_COLUMNS = (
    "iteration",
    "expert",
    "start_epoch",
    "window_min",
    "window_max",
    "loss",
    "alpha",
    "grad_norm_images",
    "grad_norm_alpha",
    "grad_norm_labels",
    "max_image_rms",
    "seconds",
    "peak_memory_mb",
)


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated since the iteration began; CPU: the process's
    peak resident set size so far (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resource is None:  # pragma: no cover - not on Linux/macOS
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def metrics_row(
    state: DistillState, info: dict, result: MatchResult, grad_logits: torch.Tensor | None, t0: float,
    device: torch.device,
) -> dict:
    """The metrics CSV's row of the iteration just done (:data:`METRICS_COLUMNS`);
    ``t0``: the iteration's start on :func:`time.perf_counter`."""
    return {
        "iteration": state.iteration,
        "expert": info["expert"],
        "start_epoch": info["start_epoch"],
        "window_min": info["window_min"],
        "window_max": info["window_max"],
        "loss": result.loss,
        "alpha": float(state.alpha.detach()),
        "grad_norm_images": float(torch.linalg.vector_norm(result.grad_images)),
        "grad_norm_alpha": abs(result.grad_alpha),
        "grad_norm_labels": "" if grad_logits is None else float(torch.linalg.vector_norm(grad_logits)),
        "max_image_rms": guard.largest_image_rms(state.images),
        "seconds": time.perf_counter() - t0,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def write_metrics(path: Path, rows: list[dict]) -> None:
    """The metrics CSV: a ``# format: ...`` line, the header, one row per iteration (atomic)."""
    write_csv_atomic(path, format_line(METRICS_FORMAT, METRICS_VERSION), METRICS_COLUMNS, rows)


def append_metrics_row(path: Path, row: dict) -> None:
    """One more row at the end of a metrics CSV (the ``.partial`` file of a running job)."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=METRICS_COLUMNS).writerow(row)


def save_grid(setup: DistillSetup, state: DistillState, name: str) -> None:
    """The images as a PNG grid, one row per class, ``GRID_DIR/name`` (none without --grid-dir)."""
    s = setup.settings
    if not s.grid_dir:
        return
    save_class_grid(
        state.images.detach(),
        state.classes,
        setup.split.num_classes,
        Path(s.grid_dir) / name,
        setup.input_space.mean,
        setup.input_space.std,
        setup.zca,
    )


def grid_image(setup: DistillSetup, state: DistillState) -> np.ndarray:
    """The images' grid as an array (for the tracker)."""
    return class_grid(state.images.detach(), state.classes, setup.split.num_classes, setup.input_space.mean,
                      setup.input_space.std, setup.zca)


def synthetic_set(setup: DistillSetup, state: DistillState) -> SyntheticSet:
    """The synthetic set file's content for the current state."""
    s, split, space = setup.settings, setup.split, setup.input_space
    soft, logits = state.soft_labels, None
    if state.label_logits is not None:
        logits = state.label_logits.detach().cpu().float()
        soft = learned_soft_labels(logits, s.label_temperature)
    return SyntheticSet(
        images=state.images.detach().cpu(),
        labels=state.classes.clone(),
        soft_labels=None if soft is None else soft.detach().cpu().float(),
        label_logits=logits,
        label_temperature=s.label_temperature if logits is not None else None,
        lr=float(state.alpha.detach()),
        dataset=split.dataset,
        dataset_fingerprint=split.fingerprint,
        num_classes=split.num_classes,
        class_ids=list(split.class_ids),
        class_names=list(split.class_names),
        mean=space.mean,
        std=space.std,
        normalization=space.name,
        dsa_strategy=setup.dsa_strategy,
        model_spec=setup.model_spec,
        ipc=s.ipc,
        engine=s.engine,
        zca_artifact=setup.zca_bytes,
        settings={
            **asdict(s), "batch_syn": setup.batch_syn, "min_lr": s.alpha_floor, "lr_img_effective": s.image_lr,
            "tesla_version": __version__, "world_size": setup.ranks.world_size,
        },
        iteration=state.iteration,
    )


def write_outputs(setup: DistillSetup, state: DistillState, final: SyntheticSet, metrics_partial: Path | None) -> None:
    """The run's files at its end: metrics, the final grid, the synthetic set; then the
    checkpoints under --checkpoint-dir go (the output holds the result now)."""
    s = setup.settings
    if s.metrics:
        write_metrics(Path(s.metrics), state.log)
        metrics_partial.unlink(missing_ok=True)
    save_grid(setup, state, "final.png")
    final.save(s.out)
    if s.checkpoint_dir is not None:
        for old in Path(s.checkpoint_dir).glob("checkpoint-*.pt"):
            old.unlink(missing_ok=True)


def open_tracker(setup: DistillSetup, state: DistillState, options: TrackerOptions) -> Tracking:
    """The run's live curves (``--tracker``, :mod:`tesla.tracking`): one tracker run per
    output and result (a resumed run continues it from its checkpoint's iteration), its
    configuration every setting and the inputs' fingerprints; TensorBoard's events by
    default in a folder ``tensorboard`` beside the output."""
    if options.tracker is None:
        return tracking_disabled()
    s, key = setup.settings, result_key(setup)
    config = {"settings": s.effective(), "batch_syn": setup.batch_syn, "inputs": input_fingerprints(setup),
              "result_key": key, "tesla_version": __version__}
    return open_tracking(options, stage="distill", identity={"out": str(Path(s.out).resolve()), "result": key},
                         default_dir=Path(s.out).parent / "tensorboard", step_name="iteration",
                         name=f"distill {s.out}", config=config, start=state.iteration)


def tracked_values(setup: DistillSetup, state: DistillState, row: dict) -> dict[str, float]:
    """What the tracker gets of an iteration: the metrics row's numbers (the expert as its
    index among --experts), the guard's state (image growth: the largest image RMS over its
    initial value) and, with learned labels, the labels' mean entropy."""
    names = [Path(e).name for e in setup.settings.experts]
    values = {**row, "expert": names.index(row["expert"]) if row["expert"] in names else ""}
    values["image_growth"] = float(row["max_image_rms"]) / state.start.largest_image_rms
    if state.label_logits is not None:
        probs = learned_soft_labels(state.label_logits.detach(), setup.settings.label_temperature)
        values["label_entropy"] = mean_entropy(probs)
    return values


class RunRecord:
    """What a running distillation records as it goes (rank 0 alone over several processes):
    each iteration's metrics row (appended to ``METRICS.partial``, which starts with the rows
    a resumed checkpoint holds), the progress bar (none with --no-progress), the tracker's
    curves and, with --keep-every K, the set every K iterations; at the end the outputs."""

    def __init__(self, setup: DistillSetup, state: DistillState, tracking: TrackerOptions) -> None:
        s, writes = setup.settings, setup.ranks.writes
        self.setup, self.state = setup, state
        self.metrics_partial = Path(f"{s.metrics}.partial") if s.metrics and writes else None
        if self.metrics_partial is not None:
            write_metrics(self.metrics_partial, state.log)
        self.keeper = Keeper(s.out, s.keep_every, state.iteration, writes)
        # what needs closing (close()) is opened last, once nothing above can fail
        self.tracker = open_tracker(setup, state, tracking if writes else TrackerOptions())
        self.bar = None
        if s.progress and writes:
            self.bar = tqdm(total=s.iterations, initial=min(state.iteration, s.iterations), desc="distill", unit="it",
                            file=sys.stderr)

    def iteration(self, row: dict) -> None:
        """Record the iteration just done (its metrics row, already in the state's log)."""
        setup, state = self.setup, self.state
        self.tracker.log_scalars(row["iteration"], lambda: tracked_values(setup, state, row))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", alpha=f"{row['alpha']:.3g}")
        if self.metrics_partial is not None:
            append_metrics_row(self.metrics_partial, row)
        self.keeper.after_iteration(row["iteration"], lambda: synthetic_set(setup, state))

    def close(self) -> None:
        """Close the progress bar and the tracker (also when the run stops early)."""
        if self.bar is not None:
            self.bar.close()
        self.tracker.close()

    def finish(self, final: SyntheticSet) -> None:
        """The outputs of a finished run: the last kept set, the metrics, the final grid, the
        synthetic set (:func:`write_outputs`)."""
        self.keeper.finish(final)
        write_outputs(self.setup, self.state, final, self.metrics_partial)
