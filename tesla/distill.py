"""``tesla distill``: learn a synthetic set by matching expert trajectories (MTT / TESLA).

Each iteration (PAPER.md section 1):

1. pick an expert e ~ U{experts} and a start epoch t ~ U{0 .. max_start_epoch - 1}; read
   only the snapshots theta*_t and theta*_{t+M} (M = ``expert_epochs``) from its file;
2. with soft labels, relabel the synthetic images: Y = softmax(f_{theta*_{t+M}}(X));
3. compute the matching loss L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2
   of an N-step student and its gradients dL/dX, dL/dalpha with the chosen engine
   (``exact``, ``tesla`` or ``unroll``, see :mod:`tesla.matching`);
4. X <- SGD(lr_img, momentum 0.5),  alpha <- SGD(lr_lr, momentum 0.5), then
   alpha <- max(alpha, min_lr) (projected SGD: alpha can never become zero or negative).

Outputs: the synthetic set file (``tesla-synthetic``, the last iteration's images), a
per-iteration metrics CSV, PNG grids of the images at checkpoints and at the end, and a
checkpoint from which a killed run resumes (on the CPU, bitwise identical to an
uninterrupted run with the same seed).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tesla import __version__
from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.matching import ENGINES, MatchResult, matching_gradients
from tesla.student_steps import COMPILE_MODES, StepCompiler, resolve_compile_mode

CHECKPOINT_FORMAT = "tesla-distill-checkpoint"
CHECKPOINT_VERSION = 1
METRICS_FORMAT = "tesla-distill-metrics"
METRICS_VERSION = 1
METRICS_COLUMNS = (
    "iteration",
    "expert",
    "start_epoch",
    "loss",
    "alpha",
    "grad_norm_images",
    "grad_norm_alpha",
    "seconds",
    "peak_memory_mb",
)
MOMENTUM = 0.5
#: settings that may change when a run resumes from its checkpoint (all others must match)
RESUME_TUNABLE = frozenset(
    {
        "out", "metrics", "grid_dir", "checkpoint", "checkpoint_every", "iterations", "device",
        "progress", "lr_img", "lr_lr", "syn_steps", "batch_syn", "engine", "label_chunk", "min_lr",
        "experts", "train", "zca", "compile",
    }
)


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
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01
    min_lr: float | None = None
    batch_syn: int | None = None
    iterations: int = 10000
    soft_labels: bool = False
    engine: str = "exact"
    compile: str = "auto"
    dsa: str | None = None
    zca: str | None = None
    seed: int = 0
    init: str = "real"
    metrics: str | None = None
    grid_dir: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 100
    device: str = "auto"
    label_chunk: int = 256
    progress: bool = True

    @property
    def alpha_floor(self) -> float:
        """min_lr: the smallest value alpha may take (default lr_teacher / 1000)."""
        return self.lr_teacher * 1e-3 if self.min_lr is None else self.min_lr

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(f"{self.out}.ckpt")

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it."""
        return {k: v for k, v in asdict(self).items() if k not in RESUME_TUNABLE}

    def lower_hint(self) -> str:
        return (
            f"lower --lr-img (now {self.lr_img:g}), --lr-lr (now {self.lr_lr:g}) or --syn-steps "
            f"(now {self.syn_steps})"
        )


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
    compiler: StepCompiler | None = field(repr=False, default=None)  # None: eager student steps


def _positive(value: float, option: str, integer: bool = False) -> None:
    ok = value is not None and (value >= 1 if integer else (math.isfinite(value) and value > 0))
    if not ok:
        what = "a positive integer" if integer else "a positive finite number"
        raise TeslaError(f"{option} must be {what}, got {value!r}")


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
    _positive(s.lr_teacher, "--lr-teacher")
    if not (math.isfinite(s.lr_lr) and s.lr_lr >= 0):
        raise TeslaError(f"--lr-lr must be a finite number >= 0 (0 keeps alpha fixed), got {s.lr_lr!r}")
    _positive(s.alpha_floor, "--min-lr")
    if s.alpha_floor > s.lr_teacher:
        raise TeslaError(f"--min-lr ({s.alpha_floor:g}) is above --lr-teacher ({s.lr_teacher:g}); lower --min-lr")
    if s.batch_syn is not None:
        _positive(s.batch_syn, "--batch-syn", integer=True)
    if s.engine not in ENGINES:
        raise TeslaError(f"--engine {s.engine!r} is not an engine; choose one of {', '.join(ENGINES)}")
    if s.compile not in COMPILE_MODES:
        raise TeslaError(f"--compile {s.compile!r} is not a compile mode; choose one of {', '.join(COMPILE_MODES)}")
    if s.init not in ("real", "noise"):
        raise TeslaError(f"--init {s.init!r}: choose 'real' (random real images of each class) or 'noise'")
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
    need = s.max_start_epoch + s.expert_epochs + 1
    for traj in experts:
        traj.check_compatible(
            model_spec=spec,
            dataset_fingerprint=split.fingerprint,
            zca_fingerprint=first.zca_fingerprint,
            needed_snapshots=None,
        )
        if traj.num_snapshots < need:
            raise TeslaError(
                f"{traj.path}: stores snapshots theta*_0 .. theta*_{traj.num_snapshots - 1}, but --max-start-epoch "
                f"{s.max_start_epoch} + --expert-epochs {s.expert_epochs} needs theta*_{need - 1}; lower "
                f"--max-start-epoch to at most {max(0, traj.num_snapshots - 1 - s.expert_epochs)} or train "
                f"experts keeping more snapshots"
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
    from tesla.experts import zca_fingerprint
    from tesla.zca import ZCA

    if not fingerprint:
        raise TeslaError(f"--zca {s.zca}: the experts were trained without ZCA; drop --zca (or retrain the experts with it)")
    zca = ZCA.load(s.zca)
    if zca_fingerprint(zca) != fingerprint:
        raise TeslaError(f"--zca {s.zca}: not the ZCA file the experts were trained with; give that file")
    if tuple(zca.image_shape) != (split.channels, split.resolution, int(split.attrs["width"])):
        raise TeslaError(f"--zca {s.zca}: fitted on images of shape {tuple(zca.image_shape)}, not those of {s.train}")
    return zca, Path(s.zca).read_bytes()


def build_setup(s: DistillSettings) -> DistillSetup:
    """Open and cross-check the inputs; raise TeslaError with the fix for anything wrong."""
    from tesla.augment import DSA
    from tesla.data import ImageSplit
    from tesla.models import build_from_spec, functional_forward, param_layout
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
    strategy = s.dsa if s.dsa is not None else (experts[0].dsa or "none")
    dsa = DSA(strategy)
    device = pick_device(s.device)
    compile_mode = resolve_compile_mode(s.compile, device)
    spec = dict(experts[0].model_spec)
    model = build_from_spec(spec).to(device)
    layout = param_layout(model)
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
        compiler=None if compile_mode == "off" else StepCompiler(compile_mode, announce=s.progress, fallback=s.compile == "auto"),
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


def initial_images(setup: DistillSetup, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """X_0 and its classes: ``ipc`` random real images of every class (class-major), in
    network input space (normalised with the split's mean/std, then ZCA when on); or, with
    ``init='noise'``, standard normal images."""
    from tesla.data import normalize

    s, split = setup.settings, setup.split
    classes = torch.arange(split.num_classes).repeat_interleave(s.ipc)
    if s.init == "noise":
        shape = (setup.num_images, split.channels, split.resolution, int(split.attrs["width"]))
        return torch.randn(shape, generator=generator), classes
    pixels, labels = split.sample_per_class(s.ipc, generator)
    x = normalize(pixels, split.mean, split.std)
    if setup.zca is not None:
        x = setup.zca.apply_chunked(x)
    assert torch.equal(torch.as_tensor(labels, dtype=torch.int64), classes)
    return x, classes


def _optimisers(images: torch.Tensor, alpha: torch.Tensor, s: DistillSettings):
    return (
        torch.optim.SGD([images], lr=s.lr_img, momentum=MOMENTUM),
        torch.optim.SGD([alpha], lr=s.lr_lr, momentum=MOMENTUM),
    )


def fresh_state(setup: DistillSetup) -> DistillState:
    s = setup.settings
    generator = torch.Generator().manual_seed(s.seed)
    x, classes = initial_images(setup, generator)
    images = x.to(setup.device).requires_grad_(True)
    alpha = torch.tensor(s.lr_teacher, dtype=torch.float32, device=setup.device, requires_grad=True)
    opt_images, opt_alpha = _optimisers(images, alpha, s)
    return DistillState(0, images, classes, [], alpha, None, opt_images, opt_alpha, generator)


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
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, setup: DistillSetup) -> DistillState:
    """Restore a state saved by :func:`save_checkpoint`, refusing one of a different run."""
    s = setup.settings
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file
        raise TeslaError(f"{path}: cannot read this checkpoint ({exc}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TeslaError(f"{path}: not a tesla distill checkpoint; give another --checkpoint path or delete it")
    if int(payload.get("format_version", -1)) != CHECKPOINT_VERSION:
        raise TeslaError(f"{path}: checkpoint format version {payload.get('format_version')}; delete it to start over")
    if payload["dataset_fingerprint"] != setup.split.fingerprint:
        raise TeslaError(f"{path}: checkpoint of a run on another dataset; delete it or give another --checkpoint")
    theirs, ours = payload["identity"], s.identity()
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        listed = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in diff)
        raise TeslaError(
            f"{path}: checkpoint of a run with other settings ({listed}); use the same settings to resume, "
            "or delete the checkpoint (or give another --checkpoint) to start over"
        )
    images = payload["images"].to(setup.device).requires_grad_(True)
    alpha = payload["alpha"].to(setup.device).requires_grad_(True)
    opt_images, opt_alpha = _optimisers(images, alpha, s)
    opt_images.load_state_dict(payload["opt_images"])
    opt_alpha.load_state_dict(payload["opt_alpha"])
    for opt, lr in ((opt_images, s.lr_img), (opt_alpha, s.lr_lr)):  # tunable on resume
        for group in opt.param_groups:
            group["lr"] = lr
    generator = torch.Generator()
    generator.set_state(payload["generator"])
    soft = payload["soft_labels"]
    return DistillState(
        int(payload["iteration"]),
        images,
        payload["classes"],
        list(payload["log"]),
        alpha,
        None if soft is None else soft.to(setup.device),
        opt_images,
        opt_alpha,
        generator,
    )


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
    """A non-finite loss, gradient, alpha or image: the run stops with the settings to lower."""


def _diverged(setup: DistillSetup, iteration: int, what: str, saved: str) -> Diverged:
    s = setup.settings
    return Diverged(
        f"iteration {iteration}: {what} is not finite (engine {s.engine}, syn_steps {s.syn_steps}, "
        f"lr_img {s.lr_img:g}, lr_lr {s.lr_lr:g}, lr_teacher {s.lr_teacher:g}); {s.lower_hint()} "
        f"and run the same command again: {saved}"
    )


def distill_iteration(setup: DistillSetup, state: DistillState) -> tuple[MatchResult, dict]:
    """One iteration: choose (expert, t), read theta*_t and theta*_{t+M}, label (soft), match."""
    s, g = setup.settings, state.generator
    e = int(torch.randint(len(setup.experts), (1,), generator=g))
    t = int(torch.randint(s.max_start_epoch, (1,), generator=g))
    expert = setup.experts[e]
    theta_start = expert.snapshot(t).to(setup.device, torch.float32)
    theta_target = expert.snapshot(t + s.expert_epochs).to(setup.device, torch.float32)
    images = state.images.detach()
    if s.soft_labels:
        from tesla.soft_labels import assign_soft_labels

        state.soft_labels = assign_soft_labels(setup.model, theta_target, images, s.label_chunk)
        targets = state.soft_labels
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
    )
    return result, {"expert": Path(s.experts[e]).name, "start_epoch": t}


def synthetic_set(setup: DistillSetup, state: DistillState):
    """The synthetic set file's content for the current state."""
    from tesla.synthetic import SyntheticSet

    s, split = setup.settings, setup.split
    return SyntheticSet(
        images=state.images.detach().cpu(),
        labels=state.classes.clone(),
        soft_labels=None if state.soft_labels is None else state.soft_labels.detach().cpu().float(),
        lr=float(state.alpha.detach()),
        dataset=split.dataset,
        dataset_fingerprint=split.fingerprint,
        num_classes=split.num_classes,
        class_ids=list(split.class_ids),
        class_names=list(split.class_names),
        mean=split.mean,
        std=split.std,
        dsa_strategy=setup.dsa_strategy,
        model_spec=setup.model_spec,
        ipc=s.ipc,
        engine=s.engine,
        zca_artifact=setup.zca_bytes,
        settings={**asdict(s), "batch_syn": setup.batch_syn, "min_lr": s.alpha_floor, "tesla_version": __version__},
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
    from tesla.export import save_class_grid

    s = setup.settings
    if not s.grid_dir:
        return
    save_class_grid(
        state.images.detach(),
        state.classes,
        setup.split.num_classes,
        Path(s.grid_dir) / name,
        setup.split.mean,
        setup.split.std,
        setup.zca,
    )


def distill(settings: DistillSettings):
    """Run (or resume) a distillation; returns the final :class:`tesla.synthetic.SyntheticSet`."""
    setup = build_setup(settings)
    s = settings
    ckpt = s.checkpoint_path
    state = load_checkpoint(ckpt, setup) if ckpt.exists() else fresh_state(setup)
    if state.iteration > 0:
        print(f"tesla distill: resuming from {ckpt} at iteration {state.iteration}", file=sys.stderr)
    metrics_partial = Path(f"{s.metrics}.partial") if s.metrics else None
    if metrics_partial is not None:  # the rows so far (those of the checkpoint when resuming)
        _write_metrics(metrics_partial, state.log)
    bar = None
    if s.progress:
        from tqdm import tqdm

        bar = tqdm(total=s.iterations, initial=min(state.iteration, s.iterations), desc="distill", unit="it", file=sys.stderr)
    last_saved = state.iteration if ckpt.exists() else None
    try:
        while state.iteration < s.iterations:
            it = state.iteration + 1
            generator_state = state.generator.get_state()
            if setup.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(setup.device)
            t0 = time.perf_counter()
            result, info = distill_iteration(setup, state)
            grad_images, grad_alpha = result.grad_images, result.grad_alpha
            problem = None
            if not math.isfinite(result.loss):
                problem = "the matching loss"
            elif not bool(torch.isfinite(grad_images).all()) or not math.isfinite(grad_alpha):
                problem = "the gradient"
            if problem is not None:
                save_checkpoint(ckpt, setup, state, generator_state)
                raise _diverged(setup, it, problem, f"it resumes from the last good state saved in {ckpt} (iteration {state.iteration})")
            state.images.grad = grad_images.to(state.images.dtype)
            state.alpha.grad = torch.tensor(grad_alpha, dtype=state.alpha.dtype, device=state.alpha.device)
            state.opt_images.step()
            state.opt_alpha.step()
            with torch.no_grad():
                state.alpha.clamp_(min=s.alpha_floor)  # projected SGD: alpha >= min_lr > 0
            if not bool(torch.isfinite(state.images).all()) or not math.isfinite(float(state.alpha.detach())):
                where = f"it resumes from {ckpt} (iteration {last_saved})" if last_saved else "no checkpoint was saved yet"
                raise _diverged(setup, it, "the updated images or alpha", where)
            state.iteration = it
            row = {
                "iteration": it,
                "expert": info["expert"],
                "start_epoch": info["start_epoch"],
                "loss": result.loss,
                "alpha": float(state.alpha.detach()),
                "grad_norm_images": float(torch.linalg.vector_norm(grad_images)),
                "grad_norm_alpha": abs(grad_alpha),
                "seconds": time.perf_counter() - t0,
                "peak_memory_mb": _peak_memory_mb(setup.device),
            }
            state.log.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", alpha=f"{row['alpha']:.3g}")
            if metrics_partial is not None:
                with open(metrics_partial, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=METRICS_COLUMNS).writerow(row)
            if it % s.checkpoint_every == 0 or it == s.iterations:
                save_checkpoint(ckpt, setup, state, state.generator.get_state())
                last_saved = it
                _save_grid(setup, state, f"iteration_{it:06d}.png")
    finally:
        if bar is not None:
            bar.close()
    final = synthetic_set(setup, state)
    if s.metrics:
        _write_metrics(Path(s.metrics), state.log)
        metrics_partial.unlink(missing_ok=True)
    _save_grid(setup, state, "final.png")
    final.save(s.out)
    return final


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
    a("--max-start-epoch", type=int, default=d.max_start_epoch, help="start epoch t ~ U{0 .. max-1}")
    a("--lr-img", type=float, default=d.lr_img, help="learning rate of the images (SGD, momentum 0.5)")
    a("--lr-lr", type=float, default=d.lr_lr, help="learning rate of alpha (SGD, momentum 0.5; 0 keeps alpha fixed)")
    a("--lr-teacher", type=float, default=d.lr_teacher, help="initial alpha (the student's learning rate)")
    a("--min-lr", type=float, default=None, help="alpha is kept >= this value (default: lr_teacher / 1000)")
    a("--batch-syn", type=int, default=None, help="synthetic minibatch size per student step (default: all images)")
    a("--iterations", type=int, default=d.iterations, help="distillation iterations")
    a("--soft-labels", action="store_true", help="TESLA soft labels from the target expert (default: hard labels)")
    a("--engine", choices=ENGINES, default=d.engine, help="gradient engine (see docs/benchmarks for the choice)")
    a("--compile", choices=COMPILE_MODES, default=d.compile,
      help="how the student steps of exact/tesla run: off (eager), inductor, cudagraph, inductor-cudagraph; "
           "auto: off on the CPU, inductor-cudagraph on CUDA (README, Gradient engines)")
    a("--dsa", default=None, help="augmentation strategy, or 'none' (default: the experts' strategy)")
    a("--zca", default=None, help="ZCA file (required iff the experts were trained with ZCA)")
    a("--seed", type=int, default=d.seed, help="random seed (images, expert/start choice, minibatches, DSA)")
    a("--init", choices=("real", "noise"), default=d.init, help="initial images: random real images of each class, or noise")
    a("--metrics", default=None, help="per-iteration metrics CSV (written as METRICS.partial while running)")
    a("--grid-dir", default=None, help="directory for PNG grids of the images (checkpoints and final.png)")
    a("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt); an existing one is resumed")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="iterations between checkpoints")
    a("--label-chunk", type=int, default=d.label_chunk, help="images per forward pass when assigning soft labels")
    a("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    fields = DistillSettings.__dataclass_fields__
    return DistillSettings(**{k: getattr(args, k) for k in fields if hasattr(args, k)})


def run(args: argparse.Namespace) -> int:
    final = distill(settings_from_args(args))
    print(
        f"wrote {args.out}: {final.num_images} images ({final.ipc} per class), alpha {final.lr:.4g}, "
        f"{final.iteration} iterations",
        file=sys.stderr,
    )
    return 0
