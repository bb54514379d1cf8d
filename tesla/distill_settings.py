"""The settings of ``tesla distill``, each declared once (:mod:`tesla.settings`), and their
checks; no torch at import (the workflow reads them while it builds the job graph).

From the declarations come the command line of ``tesla distill`` (:func:`configure_parser`
of :mod:`tesla.distill`), the config keys of a distill row in
workflow/schemas/config.schema.yaml and the table of config/README.md (both generated:
``python -m tesla.settings_blocks --write``), the workflow's options of a distill job
(:func:`workflow_options`: its params, a rerun trigger, and its run options, not one), the
settings a result depends on (``result=False``: :data:`RESULT_NEUTRAL`) and those a resumed
run may change (``resume_tunable``: :data:`RESUME_TUNABLE`).

The matching window (PAPER.md section 1, and its moving form): iteration i draws the start
epoch t ~ U{T- .. T+(i) - 1}, T- = ``min_start_epoch``, T+(i) = ``max_start_epoch`` or, with
a schedule, growing to ``max_start_epoch_final`` by iteration ``window_iterations``
(:func:`start_window`); its rules are :func:`window_problems`, for the command line and the
config alike, and the last expert snapshot it reads is :func:`last_window_snapshot`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from tesla.devices import DEVICE_NAMES
from tesla.engines import COMPILE_MODES, ENGINES
from tesla.errors import TeslaError
from tesla.selection import SELECT_RULES
from tesla.settings import (
    Wording,
    bound_problems,
    command_options,
    declared_option,
    result_neutral,
    resume_tunable,
    setting,
)

__all__ = [
    "DistillRow",
    "DistillSettings",
    "INITS",
    "LR_IMG_CONVENTIONS",
    "MAX_LR_FACTOR",
    "RESULT_NEUTRAL",
    "RESUME_REPORTED",
    "RESUME_TUNABLE",
    "SOFT_LABELS",
    "SOFT_LABELS_OF_BOOL",
    "check_settings",
    "check_window",
    "keep_option",
    "last_window_snapshot",
    "soft_label_kind",
    "start_window",
    "window_problems",
    "workflow_options",
]

SOFT_LABELS: tuple[str, ...] = ("none", "tesla", "learned")
SOFT_LABELS_OF_BOOL = {True: "tesla", False: "none"}
INITS: tuple[str, ...] = ("real", "real-correct", "noise")
#: lr_img conventions: c in X <- X - c lr_img b, b the momentum buffer of dL/dX. 'gradient':
#: lr_img multiplies the gradient the engine computes; 'tesla-published': the published TESLA
#: code's image step, which is 0.5 x lr_img x the first-order gradient (it drops the 2 of
#: d||r||^2), so a published lr_img is copied verbatim (MTT's published values are 'gradient')
LR_IMG_CONVENTIONS: dict[str, float] = {"gradient": 1.0, "tesla-published": 0.5}
#: the divergence guard's default ceiling of alpha, in units of its start lr_teacher
MAX_LR_FACTOR = 100.0
#: step sizes and limits whose change a resumed run reports
RESUME_REPORTED = ("lr_img", "lr_img_convention", "lr_lr", "lr_label", "syn_steps", "batch_syn", "engine", "min_lr", "max_lr", "max_image_growth", "max_loss")
GUARD = "divergence guard (stops the run before a bad state is saved; see tesla.guard)"


def soft_label_kind(value: str | bool) -> str:
    """A config's ``soft_labels``: a kind (none, tesla, learned), or a boolean of older
    configs (true = tesla, false = none)."""
    return SOFT_LABELS_OF_BOOL[value] if isinstance(value, bool) else value


# when the workflow writes a setting: from the config row, as it always has
def _learned(row: Mapping[str, Any]) -> bool:
    return soft_label_kind(row.get("soft_labels", "none")) == "learned"


def _uses_init_snapshot(row: Mapping[str, Any]) -> bool:
    return row.get("init", "real") == "real-correct" or _learned(row)


def _not(rule: Callable[[Mapping[str, Any]], bool]) -> Callable[[Mapping[str, Any]], bool]:
    return lambda row: not rule(row)


#: the schema of a name that a registry checks (the workflow's message names the key and the known names)
NAME_SCHEMA = {"type": "string", "pattern": "^[a-z-]+$"}
_POSITIVE_INT = {"$ref": "#/$defs/positive_int"}


def _written_apart(row: Mapping[str, Any]) -> bool:
    """keep_every: never among a job's generic options; the rows with select: validation get
    it as a param of its own (:func:`keep_option`), every other row not at all."""
    return True


@dataclass
class DistillSettings:
    """Every setting of one distillation run (the CLI options of ``tesla distill``)."""

    # inputs and outputs: paths (the inputs' content enters the result by its fingerprint)
    train: str = setting(help="training split (tesla-images file from 'tesla prepare')", required=True, config=None,
                         result=False, resume_tunable=True)
    experts: list[str] = setting(help="expert trajectory files (from 'tesla experts')", required=True, nargs="+",
                                 config=None, result=False, resume_tunable=True)
    out: str = setting(help="synthetic set file to write (tesla-synthetic)", required=True, config=None, result=False,
                       resume_tunable=True)
    ipc: int = setting(help="synthetic images per class", kind=int, required=True, minimum=1, config=None)
    syn_steps: int = setting(20, help="N: student steps per iteration", kind=int, minimum=1, always=True,
                             resume_tunable=True)
    expert_epochs: int = setting(2, help="M: the target is M epochs after the start", kind=int, minimum=1, always=True)
    max_start_epoch: int = setting(
        20, kind=int, minimum=1, always=True,
        help="start epoch t ~ U{min .. max-1} (the window's upper bound; with a schedule, its start value)")
    lr_img: float = setting(1000.0, help="learning rate of the images (SGD, momentum 0.5)", kind=float, above=0,
                            always=True, config_default=1000, resume_tunable=True)
    lr_img_convention: str = setting(
        "gradient", choices=tuple(LR_IMG_CONVENTIONS), resume_tunable=True,
        schema=NAME_SCHEMA,
        help="what --lr-img means: 'gradient' = the step on dL/dX as computed; 'tesla-published' = the published TESLA "
             "code's step, half of that (so its published values are copied verbatim)",
        config_help="what lr_img means: gradient (the step on dL/dX as the engine computes it; MTT's published values) "
                    "or tesla-published (TESLA's published values, whose image step is half of that); names checked "
                    "against tesla.distill_settings.LR_IMG_CONVENTIONS")
    lr_lr: float = setting(1e-5, help="learning rate of alpha (SGD, momentum 0.5; 0 keeps alpha fixed)", kind=float,
                           minimum=0, always=True, resume_tunable=True)
    lr_teacher: float = setting(0.01, help="initial alpha (the student's learning rate)", kind=float, above=0,
                                always=True)
    min_lr: float | None = setting(None, help="alpha is kept >= this value (default: lr_teacher / 1000)", kind=float,
                                   above=0, config=None, resume_tunable=True)
    batch_syn: int | None = setting(None, help="synthetic minibatch size per student step (default: all images)",
                                    kind=int, minimum=1, resume_tunable=True,
                                    config_help="synthetic images per student step (null = all of them)")
    iterations: int = setting(10000, help="distillation iterations", kind=int, minimum=1, always=True,
                              resume_tunable=True)
    soft_labels: str = setting(
        "none", choices=SOFT_LABELS, nargs="?", const="tesla", from_config=soft_label_kind,
        schema={"anyOf": [{"type": "string", "pattern": "^[a-z]+$"}, {"type": "boolean"}]},
        help="labels the student trains on: none (class labels, the default), tesla (the target expert's softmax, "
             "recomputed every iteration; the bare flag means this), learned (logits learned with the images, "
             "initialised from the --init-expert/--init-epoch snapshot; docs/beyond-tesla.md)",
        config_help="labels the student trains on: none (class labels), tesla (the target expert's softmax, TESLA), "
                    "learned (logits learned with the images, initialised from the init_expert/init_epoch snapshot); "
                    "true/false are read as tesla/none (names checked against tesla.distill_settings.SOFT_LABELS)")
    label_temperature: float = setting(
        1.0, kind=float, above=0, always=_learned, skip=_not(_learned),
        help="learned labels: T in y = softmax(z / T), z initialised to the snapshot's logits")
    lr_label: float = setting(
        10.0, kind=float, minimum=0, always=_learned, skip=_not(_learned), resume_tunable=True,
        help="learned labels: learning rate of the label logits (SGD, momentum 0.5; 0 keeps them fixed)")
    engine: str = setting(
        "exact", choices=ENGINES, always=True, resume_tunable=True, config_default=["exact"],
        schema={"anyOf": [{"type": "string", "pattern": "^[a-z]+$"},
                          {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^[a-z]+$"}}]},
        help="gradient engine (docs/engines.md: exact, tesla, unroll)",
        config_help="gradient engine, or a list of engines (one distillation each, on the same experts, all in "
                    "acc.csv): exact, tesla (the published first-order gradient), unroll (names checked against "
                    "tesla.engines.ENGINES)")
    compile: str = setting(
        "auto", choices=COMPILE_MODES, config=None, result=False, resume_tunable=True,
        help="how the student steps of exact/tesla run: off (eager), inductor, cudagraph, inductor-cudagraph; "
             "auto: off on the CPU, inductor-cudagraph on CUDA (docs/engines.md)")
    dsa: str | None = setting(None, help="augmentation strategy, or 'none' (default: the experts' strategy)",
                              schema={"anyOf": [{"$ref": "#/$defs/dsa"}, {"type": "null"}]},
                              config_help="augmentation while distilling (null = the experts' strategy)")
    zca: str | None = setting(None, help="ZCA file (required iff the experts were trained with ZCA)", config=None,
                              result=False, resume_tunable=True)
    seed: int = setting(0, help="random seed (images, expert/start choice, minibatches, DSA)", kind=int, minimum=0,
                        config=None, always=True)
    init: str = setting(
        "real", choices=INITS, schema=NAME_SCHEMA,
        help="initial images: random real images of each class, real-correct (only among those the --init-expert/"
             "--init-epoch snapshot classifies correctly), or noise",
        config_help="initial images: real (random real images of each class), real-correct (only among those the "
                    "init_expert/init_epoch snapshot classifies correctly) or noise (names checked against "
                    "tesla.distill_settings.INITS)")
    init_expert: int = setting(
        0, kind=int, minimum=0, always=_uses_init_snapshot, skip=_not(_uses_init_snapshot),
        help="which of --experts (index, default 0) gives the snapshot for real-correct and learned labels",
        config_help="which expert (its number in the pool) gives the snapshot for real-correct and learned labels")
    init_epoch: int | None = setting(
        None, kind=int, minimum=0, skip=_not(_uses_init_snapshot),
        help="that snapshot's epoch (default: --max-start-epoch, the end of the first window)",
        config_help="the epoch of that snapshot (null = max_start_epoch)")
    min_start_epoch: int = setting(0, help="the window's lower bound: t >= this", kind=int, minimum=0,
                                   config_help="the matching window's lower bound, start epochs t >= this")
    max_start_epoch_final: int | None = setting(
        None, kind=int, minimum=1,
        help="moving window: the upper bound grows linearly (rounded down) to this value by --window-iterations",
        config_help="moving window: the upper bound grows linearly from max_start_epoch to this by window_iterations "
                    "(null = a fixed window); experts keep snapshots up to the larger bound + expert_epochs")
    window_iterations: int | None = setting(
        None, kind=int, minimum=1, help="moving window: the iteration at which the upper bound is final",
        config_help="moving window, the iteration at which the upper bound is final (with max_start_epoch_final)")
    metrics: str | None = setting(None, help="per-iteration metrics CSV (written as METRICS.partial while running)",
                                  config=None, result=False, resume_tunable=True)
    grid_dir: str | None = setting(None, help="directory for PNG grids of the images (checkpoints and final.png)",
                                   config=None, result=False, resume_tunable=True)
    checkpoint: str | None = setting(None, help="checkpoint file (default: OUT.ckpt); an existing one is resumed",
                                     config=None, result=False, resume_tunable=True)
    checkpoint_dir: str | None = setting(
        None, config=None, result=False, resume_tunable=True,
        help="instead of --checkpoint: a folder in which the checkpoint is named by a digest of the settings and the "
             "inputs' fingerprints (resumed only by the same job on the same inputs) and removed when the run ends")
    checkpoint_every: int = setting(100, help="iterations between checkpoints", kind=int, minimum=1, result=False,
                                    always=True, resume_tunable=True,
                                    config_help="iterations between resumable checkpoints; not a rerun trigger")
    device: str = setting("auto", help=DEVICE_NAMES, config=None, result=False, resume_tunable=True)
    label_chunk: int = setting(256, help="images per forward pass when assigning soft labels", kind=int, minimum=1,
                               config=None, result=False, resume_tunable=True)
    progress: bool = setting(True, help="no progress bar", kind=bool, config=None, result=False, resume_tunable=True)
    max_lr: float | None = setting(
        None, help=f"alpha may not exceed this (default: {MAX_LR_FACTOR:g} x lr_teacher)", kind=float, above=0,
        group=GUARD, result=False, resume_tunable=True,
        config_help=f"divergence guard, alpha may not exceed this (null = {MAX_LR_FACTOR:g} x lr_teacher); "
                    "not a rerun trigger")
    max_image_growth: float = setting(
        100.0, help="the largest image RMS may not exceed this many times its initial value", kind=float, above=1,
        group=GUARD, result=False, always=True, config_default=100, resume_tunable=True,
        config_help="divergence guard, the largest image RMS may not exceed this many times the initial one; "
                    "not a rerun trigger")
    max_loss: float = setting(
        10.0, help="the matching loss (about 1 at the start) may not exceed this", kind=float, above=1, group=GUARD,
        result=False, always=True, config_default=10, resume_tunable=True,
        config_help="divergence guard, the matching loss (about 1 at the start) may not exceed this; not a rerun "
                    "trigger")
    restart: bool = setting(False, help="discard an existing checkpoint (and its grids) and start from iteration 0",
                            kind=bool, config=None, result=False, resume_tunable=True)
    config_key_prefix: str | None = setting(
        None, metavar="KEY", group=GUARD, config=None, result=False, resume_tunable=True,
        help="name settings in messages as config keys under KEY (set by the workflow, e.g. datasets.demo.distill.1)")
    keep_every: int = setting(
        0, kind=int, minimum=0, maximum=10**9, metavar="K", result=False, resume_tunable=True, skip=_written_apart,
        config_default=100, schema=_POSITIVE_INT,
        help="also keep the set every K iterations and the final one in OUT.kept/ (0: none; for selection by "
             "validation accuracy, docs/selection.md; the workflow sets it for rows with select: validation)",
        config_help="with select: validation, iterations between two kept sets (the final set is always kept); the "
                    "distilled set does not depend on it, which sets are evaluated does: a change reruns that row's "
                    "distillation and evaluations")

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
        return largest_max_start_epoch(vars(self))

    @property
    def last_window_snapshot(self) -> int:
        """The last expert snapshot the window reads: :func:`last_window_snapshot`."""
        return last_window_snapshot(vars(self))

    @property
    def alpha_floor(self) -> float:
        """min_lr: the smallest value alpha may take (default lr_teacher / 1000)."""
        return self.lr_teacher * 1e-3 if self.min_lr is None else self.min_lr

    @property
    def alpha_ceiling(self) -> float:
        """max_lr: the largest value alpha may reach before the guard stops the run
        (default lr_teacher x MAX_LR_FACTOR)."""
        return self.lr_teacher * MAX_LR_FACTOR if self.max_lr is None else self.max_lr

    def guard_limits(self):
        """The guard's limits (a ``tesla.guard.Limits``)."""
        from tesla import guard  # torch: only a run asks

        return guard.Limits(self.alpha_ceiling, self.max_image_growth, self.max_loss)

    @property
    def wording(self) -> Wording:
        """How messages name settings: flags, or config keys under --config-key-prefix."""
        return Wording(self.config_key_prefix)

    @property
    def image_lr(self) -> float:
        """The SGD step size applied to dL/dX: c lr_img, c of ``lr_img_convention``."""
        return LR_IMG_CONVENTIONS[self.lr_img_convention] * self.lr_img

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(f"{self.out}.ckpt")

    def result_settings(self) -> dict[str, Any]:
        """The settings the synthetic set depends on: all but those declared ``result=False``
        (paths, the device, progress, checkpoint interval, the guard's limits and wording: they
        decide where and whether a run goes on, not what it computes)."""
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


#: settings that do not change the synthetic set a run computes (see DistillSettings.result_settings)
RESULT_NEUTRAL = result_neutral(DistillSettings)
#: settings that may change when a run resumes from its checkpoint (all others must match)
RESUME_TUNABLE = resume_tunable(DistillSettings)


@dataclass
class DistillRow:
    """A distill row's keys that are not settings of ``tesla distill`` (never an option of its
    command): its input space, its evaluation, its processes and the set acc.csv reports. The
    workflow reads them (their schema entries and config/README.md's table are generated)."""

    normalize: str | None = setting(
        None, schema={"anyOf": [{"$ref": "#/$defs/normalize"}, {"type": "null"}]},
        help="this row's input-space normalisation (null = the dataset's `normalize`)")
    zca: bool | None = setting(None, kind=bool, help="ZCA whitening for this row (null = the dataset's `zca`)")
    eval_runs: int | None = setting(
        None, schema={"anyOf": [_POSITIVE_INT, {"type": "null"}]},
        help="networks per architecture in the evaluation of this IPC (null = the dataset's evaluate.runs; the "
             "published TESLA commands used 3, MTT 5)")
    gpus: int = setting(
        1, schema=_POSITIVE_INT, result=False,
        help="processes of each distillation of the row, one per GPU (or CPU process with device cpu): G > 1 runs one "
             "torch.distributed job of G processes (torchrun locally, srun under SLURM with G x the profile's "
             "`distill` GPUs and G tasks) with the same result up to round-off, so not a rerun trigger; every "
             "minibatch needs >= G images (batch_syn, and the last, partial one), every engine must be exact or "
             "tesla and the network free of batch norm (tesla.sharding; checked by a dry run)")
    select: str = setting(
        "final", choices=SELECT_RULES,
        help="which synthetic set acc.csv reports: final (the set the distillation ends with) or validation (the "
             "distillation keeps its set every keep_every iterations and the final one; each is evaluated, and the "
             "one with the best accuracy on the dataset's validation split is reported, which needs "
             "validation_per_class > 0); eval/<engine>_<arch>.sets.csv lists every kept set with the final, "
             "best-by-validation and best-by-test (the published protocol's, selected on the test set) picks; "
             "docs/selection.md")


def keep_option(row: Mapping[str, Any]) -> str:
    """``--keep-every`` of a row with select: validation: the workflow's ``keep`` param of its
    distillation (a rerun trigger: it decides which sets exist and are evaluated)."""
    return declared_option(DistillSettings, "keep_every", row["keep_every"])


# ---------------------------------------------------------------------------------------
# the matching window
# ---------------------------------------------------------------------------------------
def largest_max_start_epoch(values: Mapping[str, Any]) -> int:
    """The largest upper bound the window reaches: ``max_start_epoch``, or
    ``max_start_epoch_final`` when larger (``values``: settings or a config row)."""
    return max(int(values["max_start_epoch"]), int(values.get("max_start_epoch_final") or 0))


def last_window_snapshot(values: Mapping[str, Any]) -> int:
    """The last expert snapshot the window reads: its largest upper bound + ``expert_epochs``
    (``values``: settings or a config row)."""
    return largest_max_start_epoch(values) + int(values["expert_epochs"])


def window_problems(values: Mapping[str, Any], name: Callable[[str], str]) -> list[str]:
    """What is wrong with the window's settings (``values``: settings or a config row, absent
    keys at their defaults; ``name`` names a setting: its flag or its config key):
    0 <= min_start_epoch < max_start_epoch, and a schedule either absent or complete with
    max_start_epoch_final >= max_start_epoch."""
    low, top = values.get("min_start_epoch") or 0, values["max_start_epoch"]
    final, k = values.get("max_start_epoch_final"), values.get("window_iterations")
    problems = []
    if not 0 <= low < top:
        problems.append(f"{name('min_start_epoch')} {low} must be >= 0 and below {name('max_start_epoch')} {top} "
                        "(start epochs are drawn from min .. max - 1)")
    if (final is None) != (k is None):
        problems.append(
            f"a moving window needs both {name('max_start_epoch_final')} and {name('window_iterations')} (or "
            f"neither): they go together, the window's upper bound grows from {name('max_start_epoch')} to "
            f"{name('max_start_epoch_final')} by iteration {name('window_iterations')}")
    if final is not None and final < top:
        problems.append(f"{name('max_start_epoch_final')} {final} is below {name('max_start_epoch')} {top}: the "
                        "window only grows; give a final value >= the start value")
    return problems


def check_window(s: DistillSettings) -> None:
    """Refuse a window that :func:`window_problems` finds wrong, naming the settings as set."""
    problems = window_problems(vars(s), s.wording.name)
    if problems:
        raise TeslaError(problems[0])


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


# ---------------------------------------------------------------------------------------
# checks: everything is refused before any file is opened
# ---------------------------------------------------------------------------------------
def _choice(value: str, names, flag: str, meaning: str) -> None:
    if value not in names:
        raise TeslaError(f"{flag} {value!r}: choose {meaning}")


def check_settings(s: DistillSettings) -> None:
    """Refuse settings that cannot work, before opening any file: the declared bounds
    (:func:`tesla.settings.bound_problems`), the names, and the rules between settings."""
    name = s.wording.name  # the guard's limits may come from config keys
    problems = bound_problems(s, name)
    if problems:
        raise TeslaError(problems[0])
    _choice(s.lr_img_convention, LR_IMG_CONVENTIONS, "--lr-img-convention",
            f"one of {', '.join(LR_IMG_CONVENTIONS)} ('gradient': lr_img multiplies dL/dX; 'tesla-published': the "
            "published TESLA code's half step)")
    if s.alpha_floor > s.lr_teacher:
        raise TeslaError(f"--min-lr ({s.alpha_floor:g}) is above --lr-teacher ({s.lr_teacher:g}); lower --min-lr")
    if not s.alpha_ceiling > s.lr_teacher:
        raise TeslaError(
            f"{name('max_lr')} ({s.alpha_ceiling:g}) must be above {name('lr_teacher')} ({s.lr_teacher:g}); raise {name('max_lr')}"
        )
    _check_paths(s)
    engines, modes = ENGINES, COMPILE_MODES
    if s.engine not in engines:
        raise TeslaError(f"--engine {s.engine!r} is not an engine; choose one of {', '.join(engines)}")
    if s.compile not in modes:
        raise TeslaError(f"--compile {s.compile!r} is not a compile mode; choose one of {', '.join(modes)}")
    _choice(s.init, INITS, "--init", "'real' (random real images of each class), 'real-correct' (only those the "
            "--init-expert/--init-epoch snapshot classifies correctly) or 'noise'")
    _choice(s.soft_labels, SOFT_LABELS, "--soft-labels", "'none' (class labels), 'tesla' (the target expert's "
            "softmax) or 'learned' (logits learned with the images)")
    check_window(s)
    if not s.experts:
        raise TeslaError("--experts: give at least one expert trajectory file (written by 'tesla experts')")


def _check_paths(s: DistillSettings) -> None:
    if s.checkpoint is not None and s.checkpoint_dir is not None:
        raise TeslaError(
            f"--checkpoint {s.checkpoint} and --checkpoint-dir {s.checkpoint_dir}: give one (a file, or a folder in "
            "which the run names its checkpoint by its settings and inputs)"
        )
    if s.checkpoint_dir is not None and Path(s.checkpoint_dir).exists() and not Path(s.checkpoint_dir).is_dir():
        raise TeslaError(f"--checkpoint-dir {s.checkpoint_dir} is a file; give a folder (it is made if missing)")
    if Path(s.checkpoint_path).resolve() == Path(s.out).resolve():
        raise TeslaError(f"--checkpoint {s.checkpoint_path} is the --out file; give another --checkpoint path")


# ---------------------------------------------------------------------------------------
# the workflow's command line of a distill job
# ---------------------------------------------------------------------------------------
#: the order in which the workflow has always written a job's options (a reordered string
#: would rerun every job); settings declared later follow in declaration order
WORKFLOW_ORDER = (
    "ipc", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_teacher", "iterations", "engine",
    "seed", "lr_img_convention", "dsa", "batch_syn", "soft_labels", "label_temperature", "lr_label",
    "min_start_epoch", "max_start_epoch_final", "window_iterations", "init", "init_expert", "init_epoch",
)
WORKFLOW_RUN_ORDER = ("checkpoint_dir", "checkpoint_every", "config_key_prefix", "max_lr", "max_image_growth", "max_loss")


def workflow_options(row: Mapping[str, Any], result: bool, cls: type = DistillSettings, **given: Any) -> str:
    """The options of one distill job of a config row (keys: config keys), with the values
    the workflow sets itself in ``given`` (ipc, engine, seed; checkpoint_dir,
    config_key_prefix): those that change the result (``result=True``: the job's params, a
    rerun trigger) or the others (its run options). ``cls``: the settings declaration."""
    order = WORKFLOW_ORDER if result else WORKFLOW_RUN_ORDER
    return " ".join(command_options(cls, row, result=result, order=order, given=given))
