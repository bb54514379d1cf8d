"""The settings of the training stages, declared once: ``tesla experts`` and ``tesla evaluate``.

Each setting is a field declared with :func:`tesla.settings.setting`; the stages' command
lines, the config schema's ``experts:`` and ``evaluate:`` blocks, the workflow's options of
these jobs and config/README.md's tables are generated from these declarations.

* :class:`ExpertConfig`: one expert run (PAPER.md section 1: plain SGD on the real data);
  :class:`ExpertsCommand`: ``tesla experts``, a group of experts with one set of settings;
* :class:`Protocol`: the evaluation's training recipe (PAPER.md section 6);
  :class:`EvaluateCommand`: ``tesla evaluate`` beyond the subject; :class:`SubjectChoice`: what
  it trains on (a synthetic set, the kept sets of a distillation, or a baseline: exactly one);
  :class:`BaselineSubject`: the random or full baseline's data (a synthetic set carries its
  own); :class:`KeptSetSelection`: with ``--kept-sets``, the validation split, the rule that
  picks the reported set (:mod:`tesla.selection`) and the per-set table;
* :class:`ExpertPool` and :class:`EvaluationTargets`: keys that only the workflow reads (how
  many experts, how many per job; which architectures and baselines), never an option;
* :class:`ExpertsBlock` and :class:`EvaluateBlock`: a dataset entry's ``experts:`` and
  ``evaluate:`` blocks, everything above that is a config key (:data:`SCHEMA_BLOCKS`,
  :data:`README_BLOCKS`).

The arithmetic of a training step (``--precision``, ``--tf32``, ``--channels-last``;
:mod:`tesla.precision`) and the group mode are declared once each and are fields of both
stages (:func:`precision_setting`, ...).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tesla.devices import DEVICE_NAMES
from tesla.dsa_strategy import DEFAULT_STRATEGY, parse_strategy
from tesla.errors import TeslaError
from tesla.normalizations import NORMALIZATIONS
from tesla.models import available_models
from tesla.numerics_options import PRECISIONS
from tesla.selection import SELECT_RULES, check_select
from tesla.settings import SchemaBlock, generated_blocks, setting
from tesla.group_modes import AUTO_GROUP_MODE, GROUP_MODES

__all__ = [
    "BLOCK_FILES",
    "BaselineSubject",
    "DEFAULT_CHECKPOINT_SECONDS",
    "EvaluateBlock",
    "EvaluateCommand",
    "EvaluationTargets",
    "ExpertConfig",
    "ExpertPool",
    "ExpertsBlock",
    "ExpertsCommand",
    "KeptSetSelection",
    "LR_RANDOM",
    "PAPER_DSA_STRATEGY",
    "Protocol",
    "README_BLOCKS",
    "SCHEMA_BLOCKS",
    "SubjectChoice",
    "channels_last_setting",
    "group_mode_setting",
    "precision_setting",
    "tf32_setting",
]

#: the paper's augmentation strategy: the experts' and the baselines' unless --dsa says otherwise
PAPER_DSA_STRATEGY = DEFAULT_STRATEGY
#: the learning rate of the random and full baselines (``--lr-random``; a synthetic set carries its own)
LR_RANDOM = 0.01
#: seconds between two checkpoints of the runs' training, at least (``--checkpoint-every``)
DEFAULT_CHECKPOINT_SECONDS = 300

_POSITIVE_NUMBER = {"$ref": "#/$defs/positive_number"}
_TRAINING = "training"
_ARITHMETIC = "arithmetic of a training step (tesla.precision; recorded in the output)"


# ---------------------------------------------------------------------------------------
# shared by both stages
# ---------------------------------------------------------------------------------------
def precision_setting() -> Any:
    """``--precision``: the forward pass in float32, or under a bfloat16 autocast."""
    return setting(
        "float32", choices=PRECISIONS, group=_ARITHMETIC,
        help="forward pass in float32, or under a bfloat16 autocast (bf16); recorded in the output",
        config_help="forward pass in float32, or under a bfloat16 autocast (bf16; names checked against "
                    "tesla.numerics_options.PRECISIONS); the test accuracy is measured in float32",
        schema={"type": "string", "pattern": "^[a-z0-9]+$"},  # a name the registry checks, naming the valid ones
    )


def tf32_setting() -> Any:
    """``--tf32/--no-tf32``: TF32 tensor cores (None: on where the GPU has them)."""
    return setting(
        None, kind=bool, group=_ARITHMETIC,
        help="TF32 tensor cores for float32 convolutions and matrix products (default: on where the GPU has them; "
             "--no-tf32 turns them off); recorded in the output",
        config_help="TF32 tensor cores for float32 convolutions and matrix products where the GPU has them "
                    "(null = on there)",
    )


def channels_last_setting() -> Any:
    """``--channels-last/--no-channels-last`` (None: the device type's default,
    :data:`tesla.precision.CHANNELS_LAST_DEFAULT`)."""
    return setting(
        None, kind=bool, group=_ARITHMETIC,
        help="channels-last memory format (default: off; on the CPU it was not faster, docs/benchmarks.md; on CUDA "
             "not yet measured); recorded in the output",
        config_help="channels-last memory format (null = the device type's default, off until a measurement shows it "
                    "faster; tesla.precision)",
    )


def group_mode_setting(what: str) -> Any:
    """``--group-mode``: how the ``what`` of one process train together (a run option)."""
    return setting(
        "auto", choices=("auto", *GROUP_MODES), result=False,
        help=f"how the {what} train together in this process: sequential (one after the other, each bitwise as "
             "alone), streams (steps interleaved on CUDA streams), vmap (stacked into one step, equal to alone within "
             f"float32 round-off); auto: {AUTO_GROUP_MODE['cpu']} on a CPU (measured fastest, docs/benchmarks.md), "
             f"{AUTO_GROUP_MODE['cuda']} on CUDA (not yet measured)",
        config_help="how the networks of one job train together: sequential, streams (CUDA streams), vmap (stacked), "
                    "or auto (sequential on a CPU, streams on CUDA; names checked against tesla.group_modes.GROUP_MODES)",
        schema={"type": "string", "pattern": "^[a-z]+$"},
    )


def _device_setting() -> Any:
    return setting("auto", help=DEVICE_NAMES, config=None, result=False)


def _dsa_schema() -> dict[str, Any]:
    return {"$ref": "#/$defs/dsa"}


# ---------------------------------------------------------------------------------------
# tesla experts
# ---------------------------------------------------------------------------------------
def _storage_dtypes() -> tuple[str, ...]:
    """The snapshot storage types of tesla.trajectories (torch: asked only where a parser or the
    schema is built, so that the workflow reads this module without torch)."""
    from tesla.trajectories import STORAGE_DTYPES

    return tuple(STORAGE_DTYPES)


@dataclass
class ExpertConfig:
    """Everything that defines one expert run (the command line's options)."""

    train: Path = setting(help="training split (tesla-images HDF5 from 'tesla prepare')", kind=Path, required=True,
                          config=None)
    test: Path = setting(help="test split of the same dataset (for the final test accuracy)", kind=Path,
                         required=True, config=None)
    out: Path = setting(help="output trajectory file(s) (tesla-trajectory HDF5), e.g. expert_K.h5; one per --seed",
                        kind=Path, required=True, nargs="+", config=None)
    seed: int = setting(help="expert number(s) k: seeds the initialisation and the data order; several seeds train a "
                             "group of experts in one process (one --out each, in the same order)",
                        kind=int, minimum=0, required=True, nargs="+", config=None)
    model: str = setting("convnet", help=f"network: {', '.join(available_models())}", config=None, always=True)
    epochs: int = setting(50, help="training epochs E (snapshots 0..E)", kind=int, minimum=1, always=True)
    lr: float = setting(0.01, help="SGD learning rate (no momentum, no weight decay)", kind=float, always=True,
                        schema=_POSITIVE_NUMBER)
    batch_size: int = setting(256, help="minibatch size", kind=int, minimum=1, always=True)
    dsa: str = setting(PAPER_DSA_STRATEGY, help="DSA strategy ('_'-joined families, one picked per batch) or 'none'",
                       always=True, schema=_dsa_schema())
    zca: Path | None = setting(None, help="ZCA whitening file from 'tesla zca' (applied to train and test)", kind=Path,
                               config=None)
    # None: the ZCA file's normalisation, else 'split'
    normalize: str | None = setting(
        None, choices=NORMALIZATIONS, config=None,
        help="input normalisation (default: the --zca file's, else 'split' = the training split's own mean/std; "
             "'none' = pixels in [0, 1]; or the published constants)",
    )
    keep_snapshots: int | None = setting(
        None, kind=int, metavar="K",
        help="keep snapshots 0..K only and stop training after epoch K (K = max_start_epoch + expert_epochs of the "
             "distillation; default: all, K = E)",
        config_help="snapshots theta*_0..theta*_K kept per expert, and trained: an expert stops after epoch K "
                    "(null = every epoch; auto = the largest max_start_epoch + expert_epochs of the distill rows "
                    "that use these experts)",
        schema={"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}, {"type": "null"}]},
    )
    train_to_end: bool = setting(
        False, kind=bool,
        help="with --keep-snapshots: train all --epochs anyway (for the final test accuracy of fully trained experts, "
             "e.g. the 'full' row of acc.csv)",
        config_help="with keep_snapshots below epochs: train all epochs anyway, so that the 'full' row of acc.csv "
                    "reports fully trained experts (false: experts stop after the last kept snapshot and the row's "
                    "test_epoch says so)",
    )
    dtype: str = setting("float32", choices=_storage_dtypes, always=True,
                         help="snapshot storage type; 16-bit halves the file, see docs/formats.md for its effect on the "
                              "matching loss")
    device: str = _device_setting()
    precision: str = precision_setting()
    tf32: bool | None = tf32_setting()  # None: on where the GPU has it
    channels_last: bool | None = channels_last_setting()  # None: tesla.precision.CHANNELS_LAST_DEFAULT

    @property
    def last_snapshot(self) -> int:
        """K: snapshots theta*_0 .. theta*_K are stored."""
        return self.epochs if self.keep_snapshots is None else self.keep_snapshots

    @property
    def stop_epoch(self) -> int:
        """The epochs trained: K (the last stored snapshot), or all --epochs with --train-to-end."""
        return self.epochs if self.train_to_end else self.last_snapshot




@dataclass
class ExpertsCommand(ExpertConfig):
    """``tesla experts``: the settings of its experts, and how the group trains."""

    group_mode: str = group_mode_setting("experts of several --seed")
    stop_after_epochs: int | None = setting(None, help=argparse.SUPPRESS, kind=int, config=None, result=False)


@dataclass(kw_only=True)
class ExpertPool:
    """The workflow's keys of an expert pool (never a command-line option)."""

    count: int = setting(5, help="experts trained per input space (expert_0 .. expert_{count-1}); adding experts trains only the new ones", kind=int, minimum=1)
    per_job: int = setting(
        1, kind=int, minimum=1, result=False,
        help="experts trained by one job, in one process on one device (tesla experts --seed k1 k2 ...; one GPU per "
             "job under SLURM); each still gets its own file and equals the expert trained alone",
    )


@dataclass
class ExpertsBlock(ExpertsCommand, ExpertPool):
    """A dataset entry's ``experts:`` block (generated schema keys and docs; no command line)."""


# ---------------------------------------------------------------------------------------
# tesla evaluate
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """The training recipe of PAPER.md section 6 (everything but the data and the network).
    ``lr`` and ``dsa_strategy`` are the subject's (a synthetic set's learned ones), not options."""

    epochs: int = setting(1000, help="training epochs", kind=int, minimum=1, always=True, group=_TRAINING)
    lr: float = LR_RANDOM
    batch_size: int = setting(256, help="minibatch size", kind=int, minimum=1, always=True, group=_TRAINING)
    momentum: float = setting(0.9, help="SGD momentum", kind=float, config=None, group=_TRAINING)
    weight_decay: float = setting(5e-4, help="SGD weight decay", kind=float, config=None, group=_TRAINING)
    dsa_strategy: str = PAPER_DSA_STRATEGY
    lr_decay_epoch: int | None = setting(
        None, kind=int, metavar="K", group=_TRAINING,
        help="the lr drops x0.1 at the start of 0-based epoch K (default: epochs // 2; the published protocol: "
             "--epochs 1001 --lr-decay-epoch 502)",
        config_help="the learning rate is x0.1 from this epoch on (null = epochs // 2; the published protocol is 1001 "
                    "epochs with 502)",
        schema={"anyOf": [{"$ref": "#/$defs/positive_int"}, {"type": "null"}]},
    )
    reset_momentum_at_decay: bool = setting(
        False, kind=bool, group=_TRAINING,
        help="restart the SGD momentum buffer when the lr decays, as the published code does by creating a new "
             "optimizer there (default: keep it); recorded per run",
        config_help="restart the SGD momentum buffer when the learning rate decays (the published code creates a new "
                    "optimizer there); false keeps it",
    )

    @property
    def decay_epoch(self) -> int:
        """K, the first (0-based) epoch at 0.1 alpha: ``lr_decay_epoch``, default E // 2
        (0: no decay, which only the default gives, for E = 1)."""
        return self.epochs // 2 if self.lr_decay_epoch is None else int(self.lr_decay_epoch)

    @property
    def lr_decay_epochs(self) -> tuple[int, ...]:
        """One x0.1 decay: eta = alpha for epochs e < K, 0.1 alpha for e >= K."""
        k = self.decay_epoch
        return (k,) if k > 0 else ()

    def check(self) -> None:
        if self.epochs < 1:
            raise TeslaError(f"--epochs {self.epochs}: need at least 1 epoch")
        if self.lr_decay_epoch is not None and not (1 <= self.lr_decay_epoch < self.epochs):
            raise TeslaError(
                f"--lr-decay-epoch {self.lr_decay_epoch}: the learning rate drops x0.1 at the start of that 0-based "
                f"epoch, so it must be in 1..{self.epochs - 1} for --epochs {self.epochs} (the published protocol: "
                "--epochs 1001 --lr-decay-epoch 502)"
            )
        if self.batch_size < 1:
            raise TeslaError(f"--batch-size {self.batch_size}: need at least 1 image per batch")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TeslaError(f"learning rate {self.lr}: must be a positive finite number (--lr-random, or the set's learned lr)")
        if not 0 <= self.momentum < 1:
            raise TeslaError(f"--momentum {self.momentum:g}: must be in [0, 1) (SGD's momentum; the protocol's is 0.9)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TeslaError(f"--weight-decay {self.weight_decay:g}: must be a finite number >= 0 (the protocol's is 5e-4)")
        parse_strategy(self.dsa_strategy or "none")  # an unknown augmentation family fails here, before any data


@dataclass(frozen=True, kw_only=True)
class EvaluateCommand(Protocol):
    """``tesla evaluate``: the protocol, the network, the runs, and where the result goes."""

    test: Path = setting(help="real test split (tesla-images)", kind=Path, required=True, config=None)
    arch: str = setting(
        help="'distill': the network the set was distilled with (its stored model spec), or a registered "
             f"architecture: {', '.join(available_models())}",
        required=True, config=None, always=True,
    )
    runs: int = setting(5, help="random initialisations (and random draws) to average over", kind=int, minimum=1,
                        always=True)
    seed: int = setting(0, help="run r uses seed + r", kind=int, minimum=0, config=None, always=True)
    group_mode: str = group_mode_setting("runs")
    precision: str = precision_setting()
    tf32: bool | None = tf32_setting()
    channels_last: bool | None = channels_last_setting()
    device: str = _device_setting()
    out: Path = setting(help="per-run CSV to write (tesla-eval-runs)", kind=Path, required=True, config=None)
    checkpoint: Path | None = setting(
        None, kind=Path, config=None, result=False,
        help="file holding the state of the runs' training (default: OUT.ckpt): a killed evaluation run again resumes "
             "from it when its settings and training data are the same (else it starts afresh, saying why); removed "
             "once OUT is written",
    )
    checkpoint_every: float = setting(
        DEFAULT_CHECKPOINT_SECONDS, kind=float, minimum=0, metavar="SECONDS", result=False, always=True,
        help="save the checkpoint after an epoch once this many seconds have passed since the last save (every epoch "
             "or every SECONDS, whichever is rarer; 0: every epoch)",
        config_help="seconds between two saves of an evaluation's resumable state, at least (it is saved at the end "
                    "of an epoch: every epoch or every checkpoint_every seconds, whichever is rarer; 0 = every epoch); "
                    "not a rerun trigger",
        schema={"type": "number", "minimum": 0},
    )


@dataclass(frozen=True)
class BaselineSubject:
    """The data of the random and full baselines (``--random``, ``--full``); a synthetic set
    carries its own, so each of these is refused with ``--synthetic`` (None: not given)."""

    train: Path | None = setting(None, help="training split (with --random or --full)", kind=Path, config=None,
                                 group="baselines")
    ipc: int | None = setting(None, help="images per class (with --random)", kind=int, config=None, group="baselines")
    normalize: str | None = setting(
        None, choices=NORMALIZATIONS, config=None, group="baselines",
        help="input normalisation of --random/--full (default: the --zca file's, else 'split' = the training split's "
             "own mean/std); a synthetic set carries its own",
    )
    zca: Path | None = setting(None, help="ZCA file (with --random/--full; a synthetic set carries its own)",
                               kind=Path, config=None, group="baselines")
    dsa: str | None = setting(
        None, config=None, group="baselines",
        help=f"augmentation strategy for --random/--full (default {PAPER_DSA_STRATEGY}; 'none' for none); a synthetic "
             "set uses the strategy stored in its file",
    )
    lr_random: float | None = setting(
        None, kind=float, config_default=LR_RANDOM, always=True, group="baselines",
        help=f"learning rate of the random and full baselines (default {LR_RANDOM:g}; a synthetic set uses its "
             "learned lr)",
        config_help="learning rate of the random baseline (distilled sets carry their learned one)",
        schema=_POSITIVE_NUMBER,
    )


_SUBJECT = "subject"
_KEPT_SETS = "kept sets (with --kept-sets; docs/selection.md)"


@dataclass(frozen=True)
class SubjectChoice:
    """What ``tesla evaluate`` trains on: exactly one of a synthetic set, the kept sets of a
    distillation, the random or the full baseline (one mutually exclusive group of options)."""

    synthetic: Path | None = setting(None, help="synthetic set file (tesla-synthetic) to evaluate", kind=Path,
                                     config=None, required=True, exclusive=_SUBJECT)
    kept_sets: Path | None = setting(
        None, kind=Path, metavar="DIR", config=None, required=True, exclusive=_SUBJECT,
        help="the kept sets of a distillation (OUT.kept/ of tesla distill --keep-every): every set is evaluated, "
             "--out gets the runs of the one --select picks (docs/selection.md)",
    )
    random: bool = setting(False, help="baseline: IPC random real images per class of --train", kind=bool,
                           config=None, required=True, exclusive=_SUBJECT)
    full: bool = setting(
        False, kind=bool, config=None, required=True, exclusive=_SUBJECT,
        help="baseline: the whole --train split (must fit on the device; the 'full' row usually comes from the "
             "experts' recorded accuracy instead)",
    )


@dataclass(frozen=True)
class KeptSetSelection:
    """With ``--kept-sets``: the validation split every network is measured on too, the rule
    that picks the set whose runs are reported (:mod:`tesla.selection`), and the per-set table."""

    validation: Path | None = setting(
        None, kind=Path, metavar="VAL.h5", config=None, group=_KEPT_SETS,
        help="with --kept-sets: the validation split held out of the training split (val.h5 of tesla prepare "
             "--validation-per-class); every network is measured on it too",
    )
    select: str = setting(
        "final", choices=SELECT_RULES, config=None, group=_KEPT_SETS,
        help="with --kept-sets: the set whose runs go to --out: final (the last set) or validation (the best mean "
             "accuracy on --validation); the test split never selects",
    )
    sets_out: Path | None = setting(
        None, kind=Path, config=None, result=False, group=_KEPT_SETS,
        help="with --kept-sets: the per-set table (tesla-eval-sets; default OUT with suffix .sets.csv)",
    )

    def check(self, kept_sets: Path | None) -> None:
        """These options belong to ``--kept-sets`` (None: not given), and ``--select validation``
        needs ``--validation``."""
        if kept_sets is not None:
            check_select(self.select, self.validation)
            return
        for flag, value in (("--validation", self.validation), ("--sets-out", self.sets_out)):
            if value is not None:
                raise TeslaError(f"{flag} applies to --kept-sets only; drop it")
        if self.select != "final":
            raise TeslaError("--select applies to --kept-sets only; drop it")


@dataclass(frozen=True, kw_only=True)
class EvaluationTargets:
    """The workflow's keys of the evaluation: what is evaluated (never a command-line option)."""

    architectures: tuple[str, ...] = setting(
        ("convnet",),
        help="networks trained on each set (names checked against tesla.models; `distill` = the distillation network)",
        schema={"type": "array", "minItems": 1, "uniqueItems": True,
                "items": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}},
    )
    random_baseline: bool = setting(True, kind=bool,
                                    help="also evaluate random real images at the same IPC (method 'random')")
    full_data: bool = setting(True, kind=bool,
                              help="add the experts' own test accuracy (trained on all data) as the 'full' row")


@dataclass(frozen=True, kw_only=True)
class EvaluateBlock(EvaluateCommand, BaselineSubject, EvaluationTargets):
    """A dataset entry's ``evaluate:`` block (generated schema keys and docs; no command line)."""


# ---------------------------------------------------------------------------------------
# generated blocks
# ---------------------------------------------------------------------------------------
_EXPERTS = generated_blocks("tesla.training_settings.ExpertsBlock", ExpertsBlock, "experts.")
_EVALUATE = generated_blocks("tesla.training_settings.EvaluateBlock", EvaluateBlock, "evaluate.")
#: the schema's ``experts:`` and ``evaluate:`` properties (workflow/schemas/config.schema.yaml)
SCHEMA_BLOCKS: dict[str, SchemaBlock] = {"experts": _EXPERTS[0], "evaluate": _EVALUATE[0]}
#: their tables in config/README.md
README_BLOCKS: dict[str, SchemaBlock] = {"experts": _EXPERTS[1], "evaluate": _EVALUATE[1]}
#: the files the blocks are in, relative to the project root
BLOCK_FILES = {"workflow/schemas/config.schema.yaml": SCHEMA_BLOCKS, "config/README.md": README_BLOCKS}

