"""``tesla distill``: learn a synthetic set by matching expert trajectories (MTT / TESLA).

Each iteration (PAPER.md section 1):

1. pick an expert e ~ U{experts} and a start epoch t ~ U{T- .. T+(i) - 1} (the matching
   window: T- = ``min_start_epoch``, T+(i) = ``max_start_epoch`` or, with a schedule, growing
   to ``max_start_epoch_final`` by iteration ``window_iterations``: :func:`start_window`);
   read only the snapshots theta*_t and theta*_{t+M} (M = ``expert_epochs``) from its file;
2. labels (``soft_labels``): ``none``, the class indices; ``tesla``, relabel the synthetic
   images with the target expert, Y = softmax(f_{theta*_{t+M}}(X)); ``learned``, Y =
   softmax(Z / T) with learned logits Z (:mod:`tesla.soft_labels`);
3. compute the matching loss L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2
   of an N-step student and its gradients dL/dX, dL/dalpha (and dL/dZ for learned labels)
   with the chosen engine (``exact``, ``tesla`` or ``unroll``, see :mod:`tesla.matching`);
4. X <- SGD(c lr_img, momentum 0.5),  alpha <- SGD(lr_lr, momentum 0.5), then
   alpha <- max(alpha, min_lr) (projected SGD: alpha can never become zero or negative);
   learned labels: Z <- SGD(lr_label, momentum 0.5).
   c is the step-size convention of lr_img (``--lr-img-convention``): 1 for ``gradient``
   (lr_img multiplies dL/dX as the engine computes it), 1/2 for ``tesla-published`` (the
   published TESLA code's image gradient is 0.5x the first-order gradient, PAPER.md
   section 10, so its published lr_img values can be copied verbatim).

The initial images are random real images of each class (``init: real``), only those that a
chosen expert snapshot classifies correctly (``real-correct``, :mod:`tesla.initialisation`),
or noise. The same snapshot (``init_expert``, ``init_epoch``) initialises learned labels:
Z_0 = f_{theta*}(X_0).

The images live in the experts' input space (``tesla.input_space``: the normalisation and
ZCA they were trained with, recorded in their files; all experts must agree).

Every iteration passes the divergence guard (:mod:`tesla.guard`: finite values, alpha
below its ceiling, images within bounds, a loss that does not explode) before anything is
saved; a breach stops the run with the setting that most likely caused it, named as it was
set (a flag, or a config key inside the workflow), and what a rerun will do.

Outputs: the synthetic set file (``tesla-synthetic``, the last iteration's images), a
per-iteration metrics CSV, PNG grids of the images at checkpoints and at the end, and a
checkpoint from which a killed run resumes (on the CPU, bitwise identical to an
uninterrupted run with the same seed). One run at a time per output: the run holds
exclusive locks (:mod:`tesla.locks`) on ``OUT.lock`` and ``CHECKPOINT.lock`` from start to end.

Started by torchrun or srun, a run is one job of several processes (:mod:`tesla.distributed`):
each student step's minibatch is split over them and the sums over it all-reduced, so the result
is the one-process result up to float round-off; rank 0 writes every file and holds the locks,
and a checkpoint resumes with any number of processes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tesla.arguments import finite_float, int_in_range
from tesla import __version__, distributed, guard
from tesla.distributed import SINGLE, Ranks
from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.locks import acquire
from tesla.matching import ENGINES, MatchResult, check_shardable, matching_gradients
from tesla.kept_sets import Keeper
from tesla.student_steps import COMPILE_MODES, StepCompiler, resolve_compile_mode
from tesla.tracking import TrackerOptions, Tracking, add_tracking_arguments, open_tracking
from tesla.tracking import disabled as tracking_disabled
from tesla.tracking import options_from_args as tracking_options

CHECKPOINT_FORMAT = "tesla-distill-checkpoint"
#: 2: adds ``guard_start`` and ``settings``; 3: adds ``label_logits`` and ``opt_labels``
#: (learned labels) and the window settings; versions 1 and 2 are still read (see load_checkpoint)
CHECKPOINT_VERSION = 3
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
MOMENTUM = 0.5
SOFT_LABELS: tuple[str, ...] = ("none", "tesla", "learned")
SOFT_LABELS_OF_BOOL = {True: "tesla", False: "none"}
INITS: tuple[str, ...] = ("real", "real-correct", "noise")
#: lr_img conventions: c in X <- X - c lr_img b, b the momentum buffer of dL/dX. 'gradient':
#: lr_img multiplies the gradient the engine computes; 'tesla-published': the published TESLA
#: code's image step, which is 0.5 x lr_img x the first-order gradient (it drops the 2 of
#: d||r||^2), so a published lr_img is copied verbatim (MTT's published values are 'gradient')
LR_IMG_CONVENTIONS: dict[str, float] = {"gradient": 1.0, "tesla-published": 0.5}
#: settings that may change when a run resumes from its checkpoint (all others must match)
RESUME_TUNABLE = frozenset(
    {
        "out", "metrics", "grid_dir", "checkpoint", "checkpoint_dir", "checkpoint_every", "iterations", "device",
        "progress", "lr_img", "lr_img_convention", "lr_lr", "lr_label", "syn_steps", "batch_syn", "engine", "label_chunk",
        "min_lr", "experts", "train", "zca", "max_lr", "max_image_growth", "max_loss", "restart", "config_key_prefix", "compile",
        "keep_every",
    }
)
#: settings that do not change the synthetic set a run computes (see DistillSettings.result_settings)
RESULT_NEUTRAL = frozenset(
    {
        "train", "experts", "zca", "out", "metrics", "grid_dir", "checkpoint", "checkpoint_dir", "checkpoint_every",
        "device", "progress", "label_chunk", "compile", "max_lr", "max_image_growth", "max_loss", "restart",
        "config_key_prefix", "keep_every",
    }
)
#: step sizes and limits whose change a resumed run reports
RESUME_REPORTED = ("lr_img", "lr_img_convention", "lr_lr", "lr_label", "syn_steps", "batch_syn", "engine", "min_lr", "max_lr", "max_image_growth", "max_loss")


@dataclass
class DistillSettings:
    """Every setting of one distillation run (the CLI options of ``tesla distill``)."""

    train: str
    experts: list[str]
    out: str
    ipc: int
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 20
    lr_img: float = 1000.0
    lr_img_convention: str = "gradient"
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01
    min_lr: float | None = None
    batch_syn: int | None = None
    iterations: int = 10000
    soft_labels: str = "none"
    label_temperature: float = 1.0
    lr_label: float = 10.0
    engine: str = "exact"
    compile: str = "auto"
    dsa: str | None = None
    zca: str | None = None
    seed: int = 0
    init: str = "real"
    init_expert: int = 0
    init_epoch: int | None = None
    min_start_epoch: int = 0
    max_start_epoch_final: int | None = None
    window_iterations: int | None = None
    metrics: str | None = None
    grid_dir: str | None = None
    checkpoint: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    keep_every: int = 0
    device: str = "auto"
    label_chunk: int = 256
    progress: bool = True
    max_lr: float | None = None
    max_image_growth: float = guard.DEFAULT_MAX_IMAGE_GROWTH
    max_loss: float = guard.DEFAULT_MAX_LOSS
    restart: bool = False
    config_key_prefix: str | None = None

    def __post_init__(self) -> None:
        # the boolean form of earlier versions (and of config files): True = TESLA's labels
        if isinstance(self.soft_labels, bool) or self.soft_labels in ("true", "false"):
            self.soft_labels = SOFT_LABELS_OF_BOOL[str(self.soft_labels).lower() == "true"]

    @property
    def learned_labels(self) -> bool:
        return self.soft_labels == "learned"

    @property
    def init_snapshot_epoch(self) -> int:
        """The epoch of the snapshot that decides real-correct images and initialises learned
        labels: ``init_epoch``, by default ``max_start_epoch`` (the end of the first window)."""
        return self.max_start_epoch if self.init_epoch is None else self.init_epoch

    @property
    def uses_init_snapshot(self) -> bool:
        return self.init == "real-correct" or self.learned_labels

    @property
    def largest_max_start_epoch(self) -> int:
        """The largest upper bound the window reaches (the experts must cover it + expert_epochs)."""
        return max(self.max_start_epoch, self.max_start_epoch_final or 0)

    @property
    def alpha_floor(self) -> float:
        """min_lr: the smallest value alpha may take (default lr_teacher / 1000)."""
        return self.lr_teacher * 1e-3 if self.min_lr is None else self.min_lr

    @property
    def alpha_ceiling(self) -> float:
        """max_lr: the largest value alpha may reach before the guard stops the run
        (default lr_teacher x guard.MAX_LR_FACTOR)."""
        return self.lr_teacher * guard.MAX_LR_FACTOR if self.max_lr is None else self.max_lr

    def guard_limits(self) -> guard.Limits:
        return guard.Limits(self.alpha_ceiling, self.max_image_growth, self.max_loss)

    @property
    def wording(self) -> guard.Wording:
        """How messages name settings: flags, or config keys under --config-key-prefix."""
        return guard.Wording(self.config_key_prefix)

    @property
    def image_lr(self) -> float:
        """The SGD step size applied to dL/dX: c lr_img, c of ``lr_img_convention``."""
        return LR_IMG_CONVENTIONS[self.lr_img_convention] * self.lr_img

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(f"{self.out}.ckpt")

    def result_settings(self) -> dict[str, Any]:
        """The settings the synthetic set depends on: all but paths, the device, progress,
        checkpoint interval, the guard's limits and wording (they decide where and whether a
        run goes on, not what it computes)."""
        return {k: v for k, v in asdict(self).items() if k not in RESULT_NEUTRAL}

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it."""
        return {k: v for k, v in asdict(self).items() if k not in RESUME_TUNABLE}

    def effective(self) -> dict[str, Any]:
        """Every setting, with the defaults of min_lr and max_lr filled in (what messages show)."""
        return {**asdict(self), "min_lr": self.alpha_floor, "max_lr": self.alpha_ceiling}

    def start_over(self) -> str:
        """How to discard this run's checkpoint and start from iteration 0."""
        if self.wording.in_workflow:
            return f"delete {self.checkpoint_path} and run snakemake again"
        return f"run the same command with --restart (it discards {self.checkpoint_path})"


# ---------------------------------------------------------------------------------------
# setup: everything is checked before any work starts
# ---------------------------------------------------------------------------------------
@dataclass
class DistillSetup:
    """What a run needs, opened and checked: the split, the experts, the network, ZCA, DSA."""

    settings: DistillSettings
    split: Any
    experts: list[Any]
    model: torch.nn.Module
    model_spec: dict
    zca: Any | None
    zca_bytes: bytes | None
    dsa: Any | None
    dsa_strategy: str
    device: torch.device
    num_images: int
    batch_syn: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = field(repr=False, default=None)
    input_space: Any = None  # tesla.input_space.InputSpace of the experts
    compiler: StepCompiler | None = field(repr=False, default=None)  # None: eager student steps
    ranks: Ranks = SINGLE  # the processes of the job (tesla.distributed); one by default


def _positive(value: float, option: str, integer: bool = False) -> None:
    ok = value is not None and (value >= 1 if integer else (math.isfinite(value) and value > 0))
    if not ok:
        what = "a positive integer" if integer else "a positive finite number"
        raise TeslaError(f"{option} must be {what}, got {value!r}")


def check_window(s: DistillSettings) -> None:
    """The matching window's settings: 0 <= min_start_epoch < max_start_epoch, and a schedule
    either absent or complete (max_start_epoch_final >= max_start_epoch, window_iterations >= 1)."""
    if not 0 <= s.min_start_epoch < s.max_start_epoch:
        raise TeslaError(
            f"--min-start-epoch {s.min_start_epoch} must be >= 0 and below --max-start-epoch {s.max_start_epoch} "
            "(start epochs are drawn from min .. max - 1)"
        )
    final, k = s.max_start_epoch_final, s.window_iterations
    if (final is None) != (k is None):
        raise TeslaError(
            "--max-start-epoch-final and --window-iterations go together (the window's upper bound grows from "
            "--max-start-epoch to --max-start-epoch-final by iteration --window-iterations); give both or neither"
        )
    if final is not None:
        if final < s.max_start_epoch:
            raise TeslaError(
                f"--max-start-epoch-final {final} is below --max-start-epoch {s.max_start_epoch}: the window only "
                "grows; give a final value >= the start value"
            )
        _positive(k, "--window-iterations", integer=True)


def start_window(s: DistillSettings, iteration: int) -> tuple[int, int]:
    """(T-, T+(i)): iteration i (1-based) draws its start epoch t ~ U{T- .. T+(i) - 1}.

    T- = ``min_start_epoch``. Without a schedule T+(i) = ``max_start_epoch``; with one it grows
    linearly, rounded down, from T+_0 = ``max_start_epoch`` to T+_K = ``max_start_epoch_final``
    at iteration K = ``window_iterations`` and stays there::

        T+(i) = T+_0 + floor((T+_K - T+_0) min(i, K) / K)

    A function of the iteration only: a resumed run continues the schedule exactly."""
    upper = s.max_start_epoch
    if s.max_start_epoch_final is not None:
        k = s.window_iterations
        upper += (s.max_start_epoch_final - s.max_start_epoch) * min(iteration, k) // k
    return s.min_start_epoch, upper


def check_settings(s: DistillSettings) -> None:
    """Refuse settings that cannot work, before opening any file."""
    _positive(s.ipc, "--ipc", integer=True)
    _positive(s.syn_steps, "--syn-steps", integer=True)
    _positive(s.expert_epochs, "--expert-epochs", integer=True)
    _positive(s.max_start_epoch, "--max-start-epoch", integer=True)
    _positive(s.iterations, "--iterations", integer=True)
    _positive(s.checkpoint_every, "--checkpoint-every", integer=True)
    _positive(s.label_chunk, "--label-chunk", integer=True)
    _positive(s.lr_img, "--lr-img")
    if s.lr_img_convention not in LR_IMG_CONVENTIONS:
        raise TeslaError(
            f"--lr-img-convention {s.lr_img_convention!r}: choose one of {', '.join(LR_IMG_CONVENTIONS)} "
            "('gradient': lr_img multiplies dL/dX; 'tesla-published': the published TESLA code's half step)"
        )
    _positive(s.lr_teacher, "--lr-teacher")
    if not (math.isfinite(s.lr_lr) and s.lr_lr >= 0):
        raise TeslaError(f"--lr-lr must be a finite number >= 0 (0 keeps alpha fixed), got {s.lr_lr!r}")
    _positive(s.alpha_floor, "--min-lr")
    if s.alpha_floor > s.lr_teacher:
        raise TeslaError(f"--min-lr ({s.alpha_floor:g}) is above --lr-teacher ({s.lr_teacher:g}); lower --min-lr")
    name = s.wording.name  # the guard's limits may come from config keys
    if not s.alpha_ceiling > s.lr_teacher:
        raise TeslaError(
            f"{name('max_lr')} ({s.alpha_ceiling:g}) must be above {name('lr_teacher')} ({s.lr_teacher:g}); raise {name('max_lr')}"
        )
    for value, key in ((s.max_image_growth, "max_image_growth"), (s.max_loss, "max_loss")):
        if not (math.isfinite(value) and value > 1):
            raise TeslaError(f"{name(key)} must be a finite number above 1 (the value at the start), got {value!r}")
    if s.checkpoint is not None and s.checkpoint_dir is not None:
        raise TeslaError(
            f"--checkpoint {s.checkpoint} and --checkpoint-dir {s.checkpoint_dir}: give one (a file, or a folder in "
            "which the run names its checkpoint by its settings and inputs)"
        )
    if s.checkpoint_dir is not None and Path(s.checkpoint_dir).exists() and not Path(s.checkpoint_dir).is_dir():
        raise TeslaError(f"--checkpoint-dir {s.checkpoint_dir} is a file; give a folder (it is made if missing)")
    if Path(s.checkpoint_path).resolve() == Path(s.out).resolve():
        raise TeslaError(f"--checkpoint {s.checkpoint_path} is the --out file; give another --checkpoint path")
    if s.batch_syn is not None:
        _positive(s.batch_syn, "--batch-syn", integer=True)
    if s.engine not in ENGINES:
        raise TeslaError(f"--engine {s.engine!r} is not an engine; choose one of {', '.join(ENGINES)}")
    if s.compile not in COMPILE_MODES:
        raise TeslaError(f"--compile {s.compile!r} is not a compile mode; choose one of {', '.join(COMPILE_MODES)}")
    if s.init not in INITS:
        raise TeslaError(
            f"--init {s.init!r}: choose 'real' (random real images of each class), 'real-correct' (only those the "
            "--init-expert/--init-epoch snapshot classifies correctly) or 'noise'"
        )
    if s.soft_labels not in SOFT_LABELS:
        raise TeslaError(
            f"--soft-labels {s.soft_labels!r}: choose 'none' (class labels), 'tesla' (the target expert's softmax) "
            "or 'learned' (logits learned with the images)"
        )
    _positive(s.label_temperature, "--label-temperature")
    if not (math.isfinite(s.lr_label) and s.lr_label >= 0):
        raise TeslaError(f"--lr-label must be a finite number >= 0 (0 keeps the labels fixed), got {s.lr_label!r}")
    check_window(s)
    if s.init_expert < 0:
        raise TeslaError(f"--init-expert must be >= 0 (an index into --experts), got {s.init_expert}")
    if s.init_epoch is not None and s.init_epoch < 0:
        raise TeslaError(f"--init-epoch must be >= 0 (a snapshot epoch), got {s.init_epoch}")
    if not s.experts:
        raise TeslaError("--experts: give at least one expert trajectory file (written by 'tesla experts')")


def _open_experts(s: DistillSettings, split) -> list:
    """Open the expert files and refuse any of another network, dataset or ZCA setting, or
    one that stores fewer snapshots than max_start_epoch + expert_epochs + 1."""
    from tesla.trajectories import Trajectory

    experts = [Trajectory.open(p) for p in s.experts]
    first = experts[0]
    spec = first.model_spec
    for key, value in (("channels", split.channels), ("resolution", split.resolution), ("num_classes", split.num_classes)):
        if int(spec.get(key, -1)) != int(value):
            raise TeslaError(
                f"{s.experts[0]}: expert network has {key}={spec.get(key)}, {s.train} has {value}; "
                "give experts trained on this split"
            )
    need = s.largest_max_start_epoch + s.expert_epochs + 1
    if s.uses_init_snapshot:
        if s.init_expert >= len(experts):
            raise TeslaError(
                f"--init-expert {s.init_expert}: there are only {len(experts)} --experts (indices 0..{len(experts) - 1}); "
                "give the index of the expert whose snapshot initialises the images/labels"
            )
        init_traj = experts[s.init_expert]
        if s.init_snapshot_epoch >= init_traj.num_snapshots:
            raise TeslaError(
                f"{init_traj.path}: --init-epoch {s.init_snapshot_epoch} (default: --max-start-epoch) needs snapshot "
                f"theta*_{s.init_snapshot_epoch}, but the file stores theta*_0 .. theta*_{init_traj.num_snapshots - 1}; "
                f"give --init-epoch at most {init_traj.num_snapshots - 1}"
            )
    bound = "--max-start-epoch" if s.max_start_epoch_final is None else "--max-start-epoch-final"
    window = f"{bound} {s.largest_max_start_epoch}"
    if s.max_start_epoch_final is not None:
        window = f"the window's largest upper bound ({bound}) {s.largest_max_start_epoch}"
    for traj in experts:
        traj.check_compatible(
            model_spec=spec,
            dataset_fingerprint=split.fingerprint,
            zca_fingerprint=first.zca_fingerprint,
            needed_snapshots=None,
        )
        if traj.num_snapshots < need:
            raise TeslaError(
                f"{traj.path}: stores snapshots theta*_0 .. theta*_{traj.num_snapshots - 1}, but {window} "
                f"+ --expert-epochs {s.expert_epochs} needs theta*_{need - 1}; lower {bound} to at most "
                f"{max(0, traj.num_snapshots - 1 - s.expert_epochs)} or train experts keeping more snapshots"
            )
    return experts


def _open_zca(s: DistillSettings, experts: list, split):
    """The ZCA transform and its file's bytes (to embed), when the experts used ZCA."""
    fingerprint = experts[0].zca_fingerprint or ""
    if not s.zca:
        if fingerprint:
            raise TeslaError(
                f"{s.experts[0]}: the experts were trained on ZCA-whitened images; give the same file with --zca"
            )
        return None, None
    from tesla.zca import ZCA, zca_fingerprint

    if not fingerprint:
        raise TeslaError(f"--zca {s.zca}: the experts were trained without ZCA; drop --zca (or retrain the experts with it)")
    zca = ZCA.load(s.zca)
    if zca_fingerprint(zca) != fingerprint:
        raise TeslaError(f"--zca {s.zca}: not the ZCA file the experts were trained with; give that file")
    if tuple(zca.image_shape) != (split.channels, split.resolution, int(split.attrs["width"])):
        raise TeslaError(f"--zca {s.zca}: fitted on images of shape {tuple(zca.image_shape)}, not those of {s.train}")
    return zca, Path(s.zca).read_bytes()


def _input_space(s: DistillSettings, experts: list, split, zca):
    """The experts' input space (normalisation name and constants, and their ZCA): every
    expert must record the same one, and it must be what that normalisation means for
    ``split``. The synthetic images live in it."""
    from tesla.input_space import resolve_normalization, space_of_record

    first = experts[0]
    record = (first.input_normalization, first.input_mean, first.input_std)
    for traj in experts[1:]:
        other = (traj.input_normalization, traj.input_mean, traj.input_std)
        if other != record:
            raise TeslaError(
                f"{traj.path}: expert trained on inputs of normalisation {other[0]} (mean {other[1]}, std {other[2]}), "
                f"but {first.path} on normalisation {record[0]} (mean {record[1]}, std {record[2]}); give experts of one "
                "input space (trained with the same --normalize/--zca)"
            )
    expected = resolve_normalization(first.input_normalization, split, f"{first.path}: normalisation")
    mean, std = (record[1], record[2]) if record[1] else (expected.mean, expected.std)  # files that recorded none
    space = space_of_record(first.input_normalization, mean, std, zca, first.path)
    if not expected.has_constants(space.mean, space.std):
        raise TeslaError(
            f"{first.path}: expert inputs normalised with mean {space.mean}, std {space.std}, but normalisation "
            f"{space.name} of {s.train} is mean {list(expected.mean)}, std {list(expected.std)}; give experts trained on this split"
        )
    if zca is not None and zca.normalization != space.name:
        raise TeslaError(
            f"--zca {s.zca}: fitted in normalisation {zca.normalization}, but the experts record {space.name}; "
            "give the ZCA file the experts were trained with"
        )
    return space


def _check_per_sample(model: torch.nn.Module, spec: dict, ranks: Ranks) -> None:
    """Refuse a batch-statistics network over several processes: each rank would normalise its
    shard of a minibatch by the shard's own statistics, which is not the one-process network."""
    if ranks.distributed and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise TeslaError(
            f"the experts' network {spec.get('name')} uses batch norm, whose statistics span the minibatch: over "
            f"{ranks.world_size} processes each would normalise its own share; run it in one process, or use experts "
            "with instance norm (the default)"
        )


def build_setup(s: DistillSettings, ranks: Ranks = SINGLE) -> DistillSetup:
    """Open and cross-check the inputs; raise TeslaError with the fix for anything wrong.
    ``ranks``: the processes of a distributed job (:mod:`tesla.distributed`)."""
    from tesla.augment import DSA
    from tesla.data import ImageSplit
    from tesla.models import build_from_spec
    from tesla.parameters import functional_forward, param_layout
    from tesla.training import pick_device, training_loss

    check_settings(s)
    split = ImageSplit.open(s.train)
    smallest = int(np.diff(split.class_offsets).min())
    if s.ipc > smallest:
        c = int(np.argmin(np.diff(split.class_offsets)))
        raise TeslaError(
            f"--ipc {s.ipc}: class {split.class_ids[c]} of {s.train} has only {smallest} images; "
            f"lower --ipc to at most {smallest}"
        )
    num_images = s.ipc * split.num_classes
    batch_syn = num_images if s.batch_syn is None else s.batch_syn
    if batch_syn > num_images:
        raise TeslaError(
            f"--batch-syn {batch_syn} is larger than the synthetic set ({s.ipc} x {split.num_classes} classes = "
            f"{num_images} images); lower --batch-syn to at most {num_images} (or omit it: all images)"
        )
    experts = _open_experts(s, split)
    zca, zca_bytes = _open_zca(s, experts, split)
    input_space = _input_space(s, experts, split, zca)
    strategy = s.dsa if s.dsa is not None else (experts[0].dsa or "none")
    dsa = DSA(strategy)
    device = distributed.local_device(pick_device(s.device), ranks)
    compile_mode = resolve_compile_mode(s.compile, device)
    spec = dict(experts[0].model_spec)
    model = build_from_spec(spec).to(device)
    layout = param_layout(model)
    _check_per_sample(model, spec, ranks)
    check_shardable(s.engine, batch_syn, num_images, ranks)
    if layout.total != experts[0].num_params:
        raise TeslaError(
            f"{s.experts[0]}: snapshots have {experts[0].num_params} parameters, the network "
            f"{spec.get('name')} has {layout.total}; the file does not match its own model spec"
        )

    def loss_fn(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """l(f_theta(x), y): cross-entropy (hard labels) or soft-target cross-entropy."""
        return training_loss(functional_forward(model, theta, x, layout=layout), y)

    return DistillSetup(
        settings=s,
        split=split,
        experts=experts,
        model=model,
        model_spec=spec,
        zca=zca,
        zca_bytes=zca_bytes,
        dsa=None if not dsa.families else dsa,
        dsa_strategy=dsa.strategy,
        device=device,
        num_images=num_images,
        batch_syn=batch_syn,
        loss_fn=loss_fn,
        input_space=input_space,
        compiler=None if compile_mode == "off" else StepCompiler(compile_mode, announce=s.progress, fallback=s.compile == "auto"),
        ranks=ranks,
    )


# ---------------------------------------------------------------------------------------
# state: what a checkpoint holds
# ---------------------------------------------------------------------------------------
@dataclass
class DistillState:
    """The learned quantities, their optimisers, the random stream and the history."""

    iteration: int
    images: torch.Tensor  # X, leaf tensor (network input space)
    classes: torch.Tensor  # the class each image was initialised from (class-major)
    log: list[dict] = field(default_factory=list)
    alpha: torch.Tensor = None  # scalar leaf tensor
    soft_labels: torch.Tensor | None = None
    opt_images: torch.optim.Optimizer = None
    opt_alpha: torch.optim.Optimizer = None
    generator: torch.Generator = None
    start: guard.Start = None  # alpha_0 and the initial largest image RMS (the guard's references)
    label_logits: torch.Tensor | None = None  # Z, leaf tensor (learned labels only)
    opt_labels: torch.optim.Optimizer | None = None


def init_snapshot(setup: DistillSetup) -> torch.Tensor:
    """theta* of the initialising snapshot (``init_expert`` at ``init_epoch``) on the device."""
    s = setup.settings
    return setup.experts[s.init_expert].snapshot(s.init_snapshot_epoch).to(setup.device, torch.float32)


def initial_images(setup: DistillSetup, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """X_0 and its classes: ``ipc`` random real images of every class (class-major), in
    the experts' input space x = T((u/255 - mean)/std); with ``init='real-correct'`` only
    among those the initialising snapshot classifies correctly; with ``init='noise'``,
    standard normal images."""
    s, split = setup.settings, setup.split
    classes = torch.arange(split.num_classes).repeat_interleave(s.ipc)
    if s.init == "noise":
        shape = (setup.num_images, split.channels, split.resolution, int(split.attrs["width"]))
        return torch.randn(shape, generator=generator), classes
    if s.init == "real-correct":
        from tesla.initialisation import correct_indices_per_class

        where = f"--init real-correct (snapshot theta*_{s.init_snapshot_epoch} of {s.experts[s.init_expert]})"
        index = correct_indices_per_class(
            split, s.ipc, setup.model, init_snapshot(setup), setup.input_space, generator, s.label_chunk, where
        )
        pixels, labels = split.images_uint8(index), split.labels[index]
    else:
        pixels, labels = split.sample_per_class(s.ipc, generator)
    x = setup.input_space.to_input(pixels)
    assert torch.equal(torch.as_tensor(labels, dtype=torch.int64), classes)
    return x, classes


def initial_label_logits(setup: DistillSetup, images: torch.Tensor) -> torch.Tensor:
    """Z_0 = f_{theta*}(X_0): the initialising snapshot's logits on the initial images."""
    from tesla.soft_labels import expert_logits

    return expert_logits(setup.model, init_snapshot(setup), images, setup.settings.label_chunk)


def _optimisers(images: torch.Tensor, alpha: torch.Tensor, s: DistillSettings):
    return (
        torch.optim.SGD([images], lr=s.image_lr, momentum=MOMENTUM),
        torch.optim.SGD([alpha], lr=s.lr_lr, momentum=MOMENTUM),
    )


def _label_optimiser(logits: torch.Tensor | None, s: DistillSettings) -> torch.optim.Optimizer | None:
    """SGD(lr_label, momentum 0.5) on the label logits, as for the images (None without them)."""
    return None if logits is None else torch.optim.SGD([logits], lr=s.lr_label, momentum=MOMENTUM)


def fresh_state(setup: DistillSetup) -> DistillState:
    s = setup.settings
    generator = torch.Generator().manual_seed(s.seed)
    x, classes = initial_images(setup, generator)
    images = x.to(setup.device).requires_grad_(True)
    alpha = torch.tensor(s.lr_teacher, dtype=torch.float32, device=setup.device, requires_grad=True)
    opt_images, opt_alpha = _optimisers(images, alpha, s)
    logits = initial_label_logits(setup, images.detach()).requires_grad_(True) if s.learned_labels else None
    return DistillState(
        0, images, classes, [], alpha, None, opt_images, opt_alpha, generator, guard.Start.of(s.lr_teacher, x),
        logits, _label_optimiser(logits, s),
    )


def save_checkpoint(path: Path, setup: DistillSetup, state: DistillState, generator_state: torch.Tensor) -> None:
    """Write the state atomically (temporary file, then rename)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "tesla_version": __version__,
        "identity": setup.settings.identity(),
        "dataset_fingerprint": setup.split.fingerprint,
        "iteration": state.iteration,
        "images": state.images.detach().cpu(),
        "classes": state.classes,
        "alpha": state.alpha.detach().cpu(),
        "soft_labels": None if state.soft_labels is None else state.soft_labels.cpu(),
        "opt_images": state.opt_images.state_dict(),
        "opt_alpha": state.opt_alpha.state_dict(),
        "generator": generator_state,
        "log": state.log,
        "guard_start": asdict(state.start),
        "settings": asdict(setup.settings),
        "label_logits": None if state.label_logits is None else state.label_logits.detach().cpu(),
        "opt_labels": None if state.opt_labels is None else state.opt_labels.state_dict(),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


#: identity settings added by checkpoint version 3, with the value every earlier run had
_ADDED_IN_VERSION_3 = ("label_temperature", "init_expert", "init_epoch", "min_start_epoch", "max_start_epoch_final", "window_iterations")


def _identity_of_version(identity: dict[str, Any], version: int) -> dict[str, Any]:
    """A checkpoint's identity in today's terms: before version 3, ``soft_labels`` was a
    boolean and the label/window/init-snapshot settings did not exist (their defaults are what
    those runs did)."""
    if version >= 3:
        return identity
    defaults = DistillSettings(train="", experts=[], out="", ipc=1)
    upgraded = {**identity, **{k: getattr(defaults, k) for k in _ADDED_IN_VERSION_3}}
    if isinstance(identity.get("soft_labels"), bool):
        upgraded["soft_labels"] = SOFT_LABELS_OF_BOOL[identity["soft_labels"]]
    return upgraded


def load_checkpoint(path: Path, setup: DistillSetup) -> DistillState:
    """Restore a state saved by :func:`save_checkpoint`, refusing one of a different run or
    one whose state fails the guard's state rules (an old version-1 checkpoint may hold a
    state saved without them). Version 1 (no ``guard_start``) is read: rho_0 is recomputed
    from the seed's initial images. Versions 1 and 2 (no learned labels, no window schedule)
    are read as runs with today's defaults for those settings."""
    s = setup.settings
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file
        raise TeslaError(f"{path}: cannot read this checkpoint ({exc}); to start over, {s.start_over()}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TeslaError(f"{path}: not a tesla distill checkpoint; give another --checkpoint path or delete it")
    version = int(payload.get("format_version", -1))
    if version not in (1, 2, CHECKPOINT_VERSION):
        raise TeslaError(
            f"{path}: checkpoint format version {payload.get('format_version')} (this tesla reads 1 to "
            f"{CHECKPOINT_VERSION}); to start over, {s.start_over()}"
        )
    if payload["dataset_fingerprint"] != setup.split.fingerprint:
        raise TeslaError(f"{path}: checkpoint of a run on another dataset; give another --checkpoint or, to start over, {s.start_over()}")
    theirs, ours = _identity_of_version(payload["identity"], version), s.identity()
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        listed = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in diff)
        why = ""
        if "lr_teacher" in diff:
            why = (
                f" (lr_teacher is alpha's initial value: the checkpoint's alpha has moved on from it to "
                f"{float(payload['alpha']):.4g}, so a new lr_teacher only acts from iteration 0)"
            )
        raise TeslaError(
            f"{path}: checkpoint (iteration {payload['iteration']}) of a run with other settings ({listed}){why}; "
            f"on resume only {', '.join(RESUME_REPORTED)}, the iterations, the device and the paths may change. "
            f"Use the checkpoint's settings to resume it, give another --checkpoint, or, to start over with these "
            f"settings, {s.start_over()}"
        )
    images = payload["images"].to(setup.device).requires_grad_(True)
    alpha = payload["alpha"].to(setup.device).requires_grad_(True)
    opt_images, opt_alpha = _optimisers(images, alpha, s)
    opt_images.load_state_dict(payload["opt_images"])
    opt_alpha.load_state_dict(payload["opt_alpha"])
    for opt, lr in ((opt_images, s.image_lr), (opt_alpha, s.lr_lr)):  # tunable on resume
        for group in opt.param_groups:
            group["lr"] = lr
    generator = torch.Generator()
    generator.set_state(payload["generator"])
    soft = payload["soft_labels"]
    if version == 1:
        x0, _ = initial_images(setup, torch.Generator().manual_seed(s.seed))
        start = guard.Start.of(s.lr_teacher, x0)
    else:
        start = guard.Start(**payload["guard_start"])
    logits = payload.get("label_logits")
    logits = None if logits is None else logits.to(setup.device).requires_grad_(True)
    opt_labels = _label_optimiser(logits, s)
    if opt_labels is not None:
        opt_labels.load_state_dict(payload["opt_labels"])
        for group in opt_labels.param_groups:
            group["lr"] = s.lr_label  # tunable on resume
    state = DistillState(
        int(payload["iteration"]),
        images,
        payload["classes"],
        list(payload["log"]),
        alpha,
        None if soft is None else soft.to(setup.device),
        opt_images,
        opt_alpha,
        generator,
        start,
        logits,
        opt_labels,
    )
    breach = guard.check_state(float(alpha.detach()), images, start, s.guard_limits()) or _check_labels(state)
    if breach is not None:
        old = " (written by a tesla before version-2 checkpoints, which saved states without these checks)" if version == 1 else ""
        limit = f"; if the value is intended, raise {s.wording.name(breach.limit)}" if breach.limit else ""
        raise TeslaError(
            f"{path}: the checkpoint (iteration {state.iteration}) holds a state that fails the divergence guard"
            f"{old}: {breach.what}. Resuming it would continue from a diverged state; to start over, {s.start_over()}"
            f"{limit}"
        )
    changed = {k: v for k, v in payload.get("settings", {}).items() if k in RESUME_REPORTED and v != getattr(s, k)}
    if changed:
        listed = ", ".join(f"{k} {guard.format_value(v)} -> {guard.format_value(getattr(s, k))}" for k, v in changed.items())
        print(f"tesla distill: resuming {path} with changed settings: {listed}", file=sys.stderr)
    return state


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated since the iteration began; CPU: the process's
    peak resident set size so far (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, AttributeError):  # pragma: no cover - not on Linux/macOS
        return float("nan")


class Diverged(TeslaError):
    """A state that failed the divergence guard (:mod:`tesla.guard`): the run stops with the
    setting that most likely caused it and what a rerun will do."""


def _rerun_note(s: DistillSettings, last_saved: int | None, breach: guard.Breach) -> str:
    """What happens when the user reruns: where it resumes, and how to change a setting
    that only acts from iteration 0 (lr_teacher)."""
    wording, ckpt = s.wording, s.checkpoint_path
    resumes = f"resumes from iteration {last_saved} ({ckpt})" if last_saved else "starts from iteration 0"
    if wording.in_workflow:  # the checkpoint is named by a digest of the settings and inputs (--checkpoint-dir)
        return (
            f"Nothing was saved from this state. Change the setting in the config and run snakemake again: "
            f"with changed distill settings this distillation starts afresh (its checkpoint is named by its "
            f"settings and inputs); a raised limit does not rename the checkpoint: the rerun {resumes}."
        )
    if last_saved is None:
        return "Nothing was checkpointed yet: the next run starts afresh from iteration 0."
    resumable = [k for k in (*breach.suspects, breach.limit) if k in RESUME_TUNABLE]
    fixed = [k for k in breach.suspects if k not in RESUME_TUNABLE]
    note = f"Nothing was saved from this state; the last good state, iteration {last_saved}, stays in {ckpt}"
    if resumable:
        note += f": the same command with a changed {' or '.join(map(wording.name, resumable))} resumes from it"
    if fixed:
        note += (
            f". {' and '.join(wording.name(k) for k in fixed)} cannot change on resume"
            f"{' (alpha starts from lr_teacher: it only acts at iteration 0)' if 'lr_teacher' in fixed else ''}; "
            f"to start over with a new value, {s.start_over()}"
        )
    return note + "."


def _stop(s: DistillSettings, iteration: int, breach: guard.Breach, last_saved: int | None) -> Diverged:
    return Diverged(f"{guard.explain(breach, iteration, s.effective(), s.wording)} {_rerun_note(s, last_saved, breach)}")


def _check_labels(state: DistillState, grad_logits: torch.Tensor | None = None) -> guard.Breach | None:
    """The divergence guard's rule for learned labels: the logits Z (and, when given, dL/dZ)
    finite. (The labels' probabilities softmax(Z / T) are then finite and sum to 1.)"""
    if grad_logits is not None and not bool(torch.isfinite(grad_logits).all()):
        return guard.Breach("finite", "the gradient of the learned labels is not finite", ("lr_label",))
    if state.label_logits is not None and not bool(torch.isfinite(state.label_logits.detach()).all()):
        return guard.Breach("finite", "the learned label logits are not finite", ("lr_label",))
    return None


def distill_iteration(setup: DistillSetup, state: DistillState) -> tuple[MatchResult, dict]:
    """One iteration: choose (expert, t in the window), read theta*_t and theta*_{t+M}, label
    (soft: assigned or learned), match."""
    s, g = setup.settings, state.generator
    e = int(torch.randint(len(setup.experts), (1,), generator=g))
    lower, upper = start_window(s, state.iteration + 1)
    t = lower + int(torch.randint(upper - lower, (1,), generator=g))
    expert = setup.experts[e]
    theta_start = expert.snapshot(t).to(setup.device, torch.float32)
    theta_target = expert.snapshot(t + s.expert_epochs).to(setup.device, torch.float32)
    images = state.images.detach()
    if s.soft_labels == "tesla":
        from tesla.soft_labels import assign_soft_labels

        state.soft_labels = setup.ranks.assemble_rows(  # the labelling pass, shared by the processes
            len(images), lambda rows: assign_soft_labels(setup.model, theta_target, images[rows], s.label_chunk)
        )
        targets = state.soft_labels
    elif s.learned_labels:
        from tesla.soft_labels import learned_soft_labels

        targets = learned_soft_labels(state.label_logits, s.label_temperature)
    else:
        targets = state.classes.to(setup.device)
    result = matching_gradients(
        s.engine,
        setup.loss_fn,
        theta_start,
        theta_target,
        images,
        targets,
        float(state.alpha.detach()),
        s.syn_steps,
        setup.batch_syn,
        setup.dsa,
        g,
        compiler=setup.compiler,
        learn_labels=s.learned_labels,
        ranks=setup.ranks,
    )
    return result, {"expert": Path(s.experts[e]).name, "start_epoch": t, "window_min": lower, "window_max": upper}


def synthetic_set(setup: DistillSetup, state: DistillState):
    """The synthetic set file's content for the current state."""
    from tesla.synthetic import SyntheticSet

    s, split, space = setup.settings, setup.split, setup.input_space
    soft, logits = state.soft_labels, None
    if state.label_logits is not None:
        from tesla.soft_labels import learned_soft_labels

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


def _write_metrics(path: Path, rows: list[dict]) -> None:
    """The metrics CSV: a ``# format: ...`` line, the header, one row per iteration (atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "w", newline="") as f:
            f.write(f"# format: {METRICS_FORMAT}, format_version: {METRICS_VERSION}, tesla_version: {__version__}\n")
            w = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_grid(setup: DistillSetup, state: DistillState, name: str) -> None:
    from tesla.grids import save_class_grid

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


def result_key(setup: DistillSetup) -> str:
    """A digest of everything the synthetic set depends on: the result settings
    (:meth:`DistillSettings.result_settings`) and the fingerprints of the inputs (the training
    split, each expert trajectory's content, the ZCA transform). Names the checkpoint under
    ``--checkpoint-dir``: a rerun of the same job on the same inputs resumes it, a rerun with
    anything changed starts afresh (with another name) instead of resuming a foreign state."""
    from tesla.zca import zca_fingerprint

    s = setup.settings
    key = {
        "settings": s.result_settings(),
        "train": setup.split.fingerprint,
        "experts": [e.content_fingerprint() for e in setup.experts],
        "zca": zca_fingerprint(setup.zca),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def distill(settings: DistillSettings, tracking: TrackerOptions | None = None):
    """Run (or resume) a distillation; returns the final :class:`tesla.synthetic.SyntheticSet`.

    The inputs are checked first; then the run holds exclusive locks on ``OUT.lock`` and
    ``CHECKPOINT.lock`` (:func:`tesla.locks.acquire`) until it ends, so a second run on the
    same output or checkpoint is refused with the first one's pid and host. With
    ``--checkpoint-dir`` the checkpoint is ``DIR/checkpoint-<result_key>.pt``, removed (with
    any other ``checkpoint-*.pt`` left there by runs of other settings) once the output is
    written. ``tracking``: the live curves (:func:`open_tracker`; none by default), kept by
    rank 0 alone over several processes."""
    ranks = distributed.join(settings.device)
    try:
        setup = build_setup(settings, ranks)
        s = settings
        if s.checkpoint_dir is not None:
            s.checkpoint = str(Path(s.checkpoint_dir) / f"checkpoint-{result_key(setup)}.pt")
        if ranks.distributed and ranks.writes:
            print(f"tesla distill: one run over {ranks.describe()}", file=sys.stderr)
        with distributed.held_by_rank_zero(ranks, lambda: _output_locks(s)):
            return _distill_locked(setup, tracking or TrackerOptions())
    finally:
        distributed.leave(ranks)


@contextlib.contextmanager
def _output_locks(s: DistillSettings):
    """The exclusive locks of a run on ``OUT.lock`` and ``CHECKPOINT.lock`` (held by rank 0 for
    the whole job when it runs over several processes)."""
    with acquire(f"{s.out}.lock", stage="tesla distill", protects=f"--out {s.out}"), acquire(
        f"{s.checkpoint_path}.lock", stage="tesla distill", protects=f"the checkpoint {s.checkpoint_path}"
    ):
        yield


def _restart(s: DistillSettings) -> None:
    """--restart: discard the checkpoint and the grids of an earlier run (under the lock)."""
    ckpt = s.checkpoint_path
    if ckpt.exists():
        ckpt.unlink()
        print(f"tesla distill: --restart: removed {ckpt}; starting from iteration 0", file=sys.stderr)
    if s.grid_dir and Path(s.grid_dir).is_dir():
        for old in Path(s.grid_dir).glob("iteration_*.png"):
            old.unlink()


def _distill_locked(setup: DistillSetup, tracking: TrackerOptions):
    s = setup.settings
    ckpt = s.checkpoint_path
    writes = setup.ranks.writes  # over several processes rank 0 writes every file
    if s.restart and writes:
        _restart(s)
    setup.ranks.barrier()  # every rank reads the checkpoint (or none) as rank 0 left it
    state = load_checkpoint(ckpt, setup) if ckpt.exists() else fresh_state(setup)
    tracker = open_tracker(setup, state, tracking if writes else TrackerOptions())
    keeper = Keeper(s.out, s.keep_every, state.iteration, writes)
    if state.iteration > 0 and writes:
        print(f"tesla distill: resuming from {ckpt} at iteration {state.iteration}", file=sys.stderr)
    metrics_partial = Path(f"{s.metrics}.partial") if s.metrics and writes else None
    if metrics_partial is not None:  # the rows so far (those of the checkpoint when resuming)
        _write_metrics(metrics_partial, state.log)
    bar = None
    if s.progress and writes:
        from tqdm import tqdm

        bar = tqdm(total=s.iterations, initial=min(state.iteration, s.iterations), desc="distill", unit="it", file=sys.stderr)
    limits = s.guard_limits()
    last_saved = state.iteration if ckpt.exists() else None
    due = False  # the state is due for a checkpoint once its own loss has passed the guard

    def checkpoint(generator_state: torch.Tensor) -> None:
        nonlocal last_saved, due
        if writes:
            save_checkpoint(ckpt, setup, state, generator_state)
            _save_grid(setup, state, f"iteration_{state.iteration:06d}.png")
            tracker.log_image(state.iteration, "synthetic images", lambda: _grid(setup, state))
        last_saved, due = state.iteration, False

    try:
        while state.iteration < s.iterations:
            it = state.iteration + 1
            generator_state = state.generator.get_state()
            if setup.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(setup.device)
            t0 = time.perf_counter()
            result, info = distill_iteration(setup, state)
            grad_images, grad_alpha = result.grad_images, result.grad_alpha
            grad_logits = None
            if result.grad_labels is not None:
                from tesla.soft_labels import label_logit_gradient

                grad_logits = label_logit_gradient(state.label_logits, s.label_temperature, result.grad_labels)
            alpha = float(state.alpha.detach())
            breach = guard.check_match(
                result.loss, grad_images, grad_alpha, alpha, state.images, state.start, limits, state.log
            )
            breach = breach or _check_labels(state, grad_logits)
            if breach is not None:
                raise _stop(s, it, breach, last_saved)
            if due:  # the state of iteration it - 1 passed its loss check: now it may be saved
                checkpoint(generator_state)
            state.images.grad = grad_images.to(state.images.dtype)
            state.alpha.grad = torch.tensor(grad_alpha, dtype=state.alpha.dtype, device=state.alpha.device)
            state.opt_images.step()
            state.opt_alpha.step()
            if state.opt_labels is not None:
                state.label_logits.grad = grad_logits.to(state.label_logits.dtype)
                state.opt_labels.step()
            with torch.no_grad():
                state.alpha.clamp_(min=s.alpha_floor)  # projected SGD: alpha >= min_lr > 0
            breach = guard.check_state(float(state.alpha.detach()), state.images, state.start, limits)
            breach = breach or _check_labels(state)
            if breach is not None:
                raise _stop(s, it, breach, last_saved)
            state.iteration = it
            row = {
                "iteration": it,
                "expert": info["expert"],
                "start_epoch": info["start_epoch"],
                "window_min": info["window_min"],
                "window_max": info["window_max"],
                "loss": result.loss,
                "alpha": float(state.alpha.detach()),
                "grad_norm_images": float(torch.linalg.vector_norm(grad_images)),
                "grad_norm_alpha": abs(grad_alpha),
                "grad_norm_labels": "" if grad_logits is None else float(torch.linalg.vector_norm(grad_logits)),
                "max_image_rms": guard.largest_image_rms(state.images),
                "seconds": time.perf_counter() - t0,
                "peak_memory_mb": _peak_memory_mb(setup.device),
            }
            state.log.append(row)
            tracker.log_scalars(it, lambda: tracked_values(setup, state, row))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", alpha=f"{row['alpha']:.3g}")
            if metrics_partial is not None:
                with open(metrics_partial, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=METRICS_COLUMNS).writerow(row)
            keeper.after_iteration(it, lambda: synthetic_set(setup, state))
            if it == s.iterations:  # no next loss to wait for: saved with the output
                checkpoint(state.generator.get_state())
            elif it % s.checkpoint_every == 0:
                due = True
    finally:
        if bar is not None:
            bar.close()
        tracker.close()
    final = synthetic_set(setup, state)
    if writes:
        keeper.finish(final)
        _write_outputs(setup, state, final, metrics_partial)
        print(f"tesla distill: {_headroom(state, limits)}", file=sys.stderr)
    setup.ranks.barrier()  # the job ends once the output is written
    return final


def _write_outputs(setup: DistillSetup, state: DistillState, final, metrics_partial: Path | None) -> None:
    """The run's files at its end: metrics, the final grid, the synthetic set; then the
    checkpoints under --checkpoint-dir go (the output holds the result now)."""
    s = setup.settings
    if s.metrics:
        _write_metrics(Path(s.metrics), state.log)
        metrics_partial.unlink(missing_ok=True)
    _save_grid(setup, state, "final.png")
    final.save(s.out)
    if s.checkpoint_dir is not None:
        for old in Path(s.checkpoint_dir).glob("checkpoint-*.pt"):
            old.unlink(missing_ok=True)


def open_tracker(setup: DistillSetup, state: DistillState, options: TrackerOptions) -> Tracking:
    """The run's live curves (``--tracker``, :mod:`tesla.tracking`): one tracker run per
    output and result (a resumed run continues it from its checkpoint's iteration), its
    configuration every setting and the inputs' fingerprints; TensorBoard's events by
    default in a folder ``tensorboard`` beside the output."""
    if options.kind is None:
        return tracking_disabled()
    from tesla.zca import zca_fingerprint

    s, key = setup.settings, result_key(setup)
    inputs = {"train": setup.split.fingerprint, "experts": [e.content_fingerprint() for e in setup.experts],
              "zca": zca_fingerprint(setup.zca)}
    config = {"settings": s.effective(), "batch_syn": setup.batch_syn, "inputs": inputs, "result_key": key,
              "tesla_version": __version__}
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
        from tesla.soft_labels import learned_soft_labels, mean_entropy

        probs = learned_soft_labels(state.label_logits.detach(), setup.settings.label_temperature)
        values["label_entropy"] = mean_entropy(probs)
    return values


def _grid(setup: DistillSetup, state: DistillState):
    from tesla.grids import class_grid

    return class_grid(state.images.detach(), state.classes, setup.split.num_classes, setup.input_space.mean,
                      setup.input_space.std, setup.zca)


def _headroom(state: DistillState, limits: guard.Limits) -> str:
    """The run's peaks against the guard's limits (how close it came to a stop)."""
    rows = state.log
    loss = max((float(r["loss"]) for r in rows), default=math.nan)
    alpha = max((float(r["alpha"]) for r in rows), default=math.nan)
    rms = max((float(r["max_image_rms"]) for r in rows if r.get("max_image_rms") not in (None, "")), default=math.nan)
    return (
        f"guard peaks over {len(rows)} iterations: loss {loss:.4g} (limit {limits.max_loss:g}), alpha {alpha:.4g} "
        f"(ceiling {limits.max_lr:g}), largest image RMS {rms / state.start.largest_image_rms:.3g} x its initial value "
        f"(limit {limits.max_image_growth:g} x)"
    )


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = DistillSettings(train="", experts=[], out="", ipc=1)
    a = parser.add_argument
    a("--train", required=True, help="training split (tesla-images file from 'tesla prepare')")
    a("--experts", required=True, nargs="+", help="expert trajectory files (from 'tesla experts')")
    a("--out", required=True, help="synthetic set file to write (tesla-synthetic)")
    a("--ipc", required=True, type=int, help="synthetic images per class")
    a("--syn-steps", type=int, default=d.syn_steps, help="N: student steps per iteration")
    a("--expert-epochs", type=int, default=d.expert_epochs, help="M: the target is M epochs after the start")
    a("--max-start-epoch", type=int, default=d.max_start_epoch,
      help="start epoch t ~ U{min .. max-1} (the window's upper bound; with a schedule, its start value)")
    a("--min-start-epoch", type=int, default=d.min_start_epoch, help="the window's lower bound: t >= this")
    a("--max-start-epoch-final", type=int, default=None,
      help="moving window: the upper bound grows linearly (rounded down) to this value by --window-iterations")
    a("--window-iterations", type=int, default=None, help="moving window: the iteration at which the upper bound is final")
    a("--lr-img", type=finite_float, default=d.lr_img, help="learning rate of the images (SGD, momentum 0.5)")
    a("--lr-img-convention", choices=tuple(LR_IMG_CONVENTIONS), default=d.lr_img_convention,
      help="what --lr-img means: 'gradient' = the step on dL/dX as computed; 'tesla-published' = the published TESLA "
           "code's step, half of that (so its published values are copied verbatim)")
    a("--lr-lr", type=finite_float, default=d.lr_lr, help="learning rate of alpha (SGD, momentum 0.5; 0 keeps alpha fixed)")
    a("--lr-teacher", type=finite_float, default=d.lr_teacher, help="initial alpha (the student's learning rate)")
    a("--min-lr", type=finite_float, default=None, help="alpha is kept >= this value (default: lr_teacher / 1000)")
    a("--batch-syn", type=int, default=None, help="synthetic minibatch size per student step (default: all images)")
    a("--iterations", type=int, default=d.iterations, help="distillation iterations")
    a("--soft-labels", nargs="?", const="tesla", default=d.soft_labels, choices=SOFT_LABELS,
      help="labels the student trains on: none (class labels, the default), tesla (the target expert's softmax, "
           "recomputed every iteration; the bare flag means this), learned (logits learned with the images, "
           "initialised from the --init-expert/--init-epoch snapshot; README, Beyond TESLA)")
    a("--label-temperature", type=finite_float, default=d.label_temperature,
      help="learned labels: T in y = softmax(z / T), z initialised to the snapshot's logits")
    a("--lr-label", type=finite_float, default=d.lr_label,
      help="learned labels: learning rate of the label logits (SGD, momentum 0.5; 0 keeps them fixed)")
    a("--engine", choices=ENGINES, default=d.engine, help="gradient engine (see docs/benchmarks for the choice)")
    a("--compile", choices=COMPILE_MODES, default=d.compile,
      help="how the student steps of exact/tesla run: off (eager), inductor, cudagraph, inductor-cudagraph; "
           "auto: off on the CPU, inductor-cudagraph on CUDA (README, Gradient engines)")
    a("--dsa", default=None, help="augmentation strategy, or 'none' (default: the experts' strategy)")
    a("--zca", default=None, help="ZCA file (required iff the experts were trained with ZCA)")
    a("--seed", type=int, default=d.seed, help="random seed (images, expert/start choice, minibatches, DSA)")
    a("--init", choices=INITS, default=d.init,
      help="initial images: random real images of each class, real-correct (only among those the --init-expert/"
           "--init-epoch snapshot classifies correctly), or noise")
    a("--init-expert", type=int, default=d.init_expert,
      help="which of --experts (index, default 0) gives the snapshot for real-correct and learned labels")
    a("--init-epoch", type=int, default=None,
      help="that snapshot's epoch (default: --max-start-epoch, the end of the first window)")
    a("--metrics", default=None, help="per-iteration metrics CSV (written as METRICS.partial while running)")
    a("--grid-dir", default=None, help="directory for PNG grids of the images (checkpoints and final.png)")
    a("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt); an existing one is resumed")
    a("--checkpoint-dir", default=None,
      help="instead of --checkpoint: a folder in which the checkpoint is named by a digest of the settings and the "
           "inputs' fingerprints (resumed only by the same job on the same inputs) and removed when the run ends")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="iterations between checkpoints")
    a("--keep-every", type=int_in_range(0, 10**9), default=d.keep_every, metavar="K",
      help="also keep the set every K iterations and the final one in OUT.kept/ (for selection: docs/selection.md)")
    a("--restart", action="store_true", help="discard an existing checkpoint (and its grids) and start from iteration 0")
    a("--label-chunk", type=int, default=d.label_chunk, help="images per forward pass when assigning soft labels")
    a("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_tracking_arguments(parser)
    g = parser.add_argument_group("divergence guard (stops the run before a bad state is saved; see tesla.guard)")
    g.add_argument("--max-lr", type=finite_float, default=None, help=f"alpha may not exceed this (default: {guard.MAX_LR_FACTOR:g} x lr_teacher)")
    g.add_argument("--max-image-growth", type=finite_float, default=d.max_image_growth, help="the largest image RMS may not exceed this many times its initial value")
    g.add_argument("--max-loss", type=finite_float, default=d.max_loss, help="the matching loss (about 1 at the start) may not exceed this")
    g.add_argument(
        "--config-key-prefix", default=None, metavar="KEY",
        help="name settings in messages as config keys under KEY (set by the workflow, e.g. datasets.demo.distill.1)",
    )


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    fields = DistillSettings.__dataclass_fields__
    return DistillSettings(**{k: getattr(args, k) for k in fields if hasattr(args, k)})


def run(args: argparse.Namespace) -> int:
    final = distill(settings_from_args(args), tracking_options(args))
    print(
        f"wrote {args.out}: {final.num_images} images ({final.ipc} per class), alpha {final.lr:.4g}, "
        f"{final.iteration} iterations",
        file=sys.stderr,
    )
    return 0
