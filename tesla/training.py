"""The one training loop: experts (plain SGD on the real data) and evaluation (on a synthetic set).

Data live as tensors on the device (``ImageSplit.load_tensors``): an epoch is a random
permutation of 0..N-1 drawn from an explicit ``torch.Generator``, cut into minibatches of
``batch_size`` indices (the last one may be smaller); a minibatch is one index gather,
one differentiable siamese augmentation call (``dsa(x_b, generator)``) and one SGD step

    theta <- theta - lr_e * (grad_theta l(f_theta(A(x_b)), y_b) + wd * theta)   (+ momentum),

with l the cross-entropy (hard labels) or the soft-target cross-entropy (soft labels).
There is no per-sample Python work and no host/device copy of images.  The learning rate
of epoch e is ``lr * decay ** #{d in lr_decay_epochs : d <= e}`` (0-based e), so a run
resumed at ``start_epoch`` continues the same schedule; optionally the momentum buffer
restarts at each decay epoch (the published evaluation re-creates its optimizer there).

Experts (PAPER.md section 1): ``train(model, x, y, epochs=50, lr=0.01, batch_size=256,
dsa=DSA(...), generator=g)`` (no momentum, no weight decay).  Evaluation (section 6): the
same call with ``momentum=0.9, weight_decay=5e-4, lr_decay_epochs=(epochs // 2,)``.

Several networks with the same settings (the experts of one job, the runs of one
evaluation) train in one process with :func:`train_group`: one after the other
(``sequential``, bitwise equal to alone), with their steps interleaved on separate CUDA
streams (``streams``), or stacked into one vmapped step (``vmap``, equal to alone within
float32 round-off); each keeps its own initialisation, generator (minibatch order and
augmentation draws), optimizer state and callbacks.  How each step is computed (TF32, a
bf16 autocast, channels-last) is ``tesla.precision.Numerics``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tesla.errors import TeslaError
from tesla.precision import Numerics

__all__ = [
    "AUTO_GROUP_MODE",
    "EndTraining",
    "EpochStats",
    "GROUP_MODES",
    "GroupMember",
    "accuracy",
    "add_group_mode_argument",
    "epoch_lr",
    "make_optimizer",
    "minibatches",
    "pick_device",
    "resolve_group_mode",
    "restart_momentum",
    "soft_cross_entropy",
    "train",
    "train_group",
    "training_loss",
]

#: how a group of networks with the same settings trains in one process (:func:`train_group`)
GROUP_MODES: tuple[str, ...] = ("sequential", "streams", "vmap")
#: what ``--group-mode auto`` means per device type. CPU: measured (docs/benchmarks.md,
#: "Running several runs together (torch.func.vmap)?": vmap is 2.6x slower at IPC 10 there). CUDA: chosen by argument before any
#: GPU measurement, to be confirmed by bench/gpu_training.sh: streams run the same kernels as
#: alone, so they cannot lose much, and they let the GPU work on other networks while one
#: network's step waits for the host (each DSA call copies its parameters from pageable host
#: memory, which synchronises that network's stream)
AUTO_GROUP_MODE: dict[str, str] = {"cpu": "sequential", "cuda": "streams"}

#: a differentiable augmentation: (x, generator) -> (x_aug, sampled parameters)
Augmentation = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, object]]


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did: mean training loss and accuracy over its (augmented) minibatches."""

    epoch: int  #: 1-based number of epochs completed (the trajectory snapshot index)
    loss: float
    accuracy: float
    lr: float
    seconds: float
    images: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return asdict(self)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when present, else the CPU; otherwise the named device.

    Raises TeslaError for a device this machine does not have.
    """
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TeslaError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TeslaError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TeslaError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise TeslaError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    elif device.type != "cpu":
        raise TeslaError(f"--device {name}: unsupported device type {device.type!r}; use auto, cpu, cuda or cuda:N")
    return device


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy, batch mean:  l = -(1/B) sum_b sum_c y_bc log softmax(z_b)_c."""
    return -(probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def training_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for int64 class indices, soft-target cross-entropy for float N x K labels."""
    if y.is_floating_point():
        return soft_cross_entropy(logits, y)
    return F.cross_entropy(logits, y)


def _check_labels(x: torch.Tensor, y: torch.Tensor, what: str = "training set") -> None:
    if x.ndim != 4:
        raise TeslaError(f"{what}: images must be N x C x H x W, got shape {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise TeslaError(f"{what}: {x.shape[0]} images but {y.shape[0]} labels")
    if y.is_floating_point():
        if y.ndim != 2:
            raise TeslaError(f"{what}: soft labels must be N x K probabilities, got shape {tuple(y.shape)}")
    elif y.dtype != torch.int64 or y.ndim != 1:
        raise TeslaError(f"{what}: hard labels must be int64 class indices of shape (N,), got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise TeslaError(f"{what} is empty")


def _hard(y: torch.Tensor) -> torch.Tensor:
    """Class indices: y itself, or argmax_c y_c for soft labels (classes on the last axis)."""
    return y.argmax(dim=-1) if y.is_floating_point() else y


def minibatches(n: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """One epoch's minibatches: a permutation of 0..n-1 (drawn on ``generator``) cut into chunks.

    The permutation is drawn on the generator's device (the CPU for a CPU generator) and
    moved to ``device`` once, so the same generator gives the same order on every device.
    """
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    return torch.split(perm, batch_size)


def epoch_lr(lr: float, epoch: int, lr_decay_epochs: Iterable[int] = (), decay: float = 0.1) -> float:
    """lr_e = lr * decay^{#{d in lr_decay_epochs : d <= e}} for the 0-based epoch e."""
    return lr * decay ** sum(1 for d in lr_decay_epochs if int(d) <= epoch)


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> torch.optim.SGD:
    """SGD over the model's parameters (PyTorch's momentum/weight-decay convention)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _check_settings(epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int, start_epoch: int) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise TeslaError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TeslaError(f"learning rate must be a positive finite number, got {lr!r}")
    if not (0.0 <= momentum < 1.0):
        raise TeslaError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise TeslaError(f"weight decay must be >= 0, got {weight_decay!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TeslaError(f"batch size must be a positive integer, got {batch_size!r}")
    if not isinstance(start_epoch, int) or not (0 <= start_epoch <= epochs):
        raise TeslaError(f"start epoch must be in 0..{epochs}, got {start_epoch!r}")


#: minibatches between two finiteness checks of the running loss (a device sync each)
_FINITE_CHECK_EVERY = 32


def _check_finite(loss: float, epoch: int, lr: float, name: str = "train") -> None:
    if not math.isfinite(loss):
        raise TeslaError(
            f"training diverged ({name}): the loss became {loss} in epoch {epoch + 1} at learning rate {lr:g}; "
            f"lower the learning rate (or check the inputs for NaN/inf)"
        )


class EndTraining(Exception):
    """Raised by an ``on_epoch_end`` callback to end *its* network's training after that
    epoch: :func:`train` returns the history so far, and in :func:`train_group` the other
    networks of the group go on."""


@dataclass
class GroupMember:
    """One network of a group trained together (:func:`train_group`): its model, its
    training data (in the stored form that ``input_transform`` maps), its own CPU
    ``generator`` (minibatch order and augmentation draws), its optimizer (default: SGD of
    the group's settings), the epoch it resumes at, and what runs after each of its epochs."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    optimizer: torch.optim.Optimizer | None = None
    start_epoch: int = 0
    on_epoch_end: Callable[[EpochStats], None] | None = None
    name: str = "train"


@dataclass(frozen=True)
class _Recipe:
    """The settings every network of a group shares."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    lr_decay_epochs: tuple[int, ...]
    lr_decay: float
    reset_momentum_at_decay: bool

    def restarts_momentum(self, epoch: int) -> bool:
        """The published evaluation re-creates its optimizer when it decays the lr: with
        ``reset_momentum_at_decay`` the momentum buffer is zero at the start of every decay epoch."""
        return self.reset_momentum_at_decay and epoch > 0 and epoch in self.lr_decay_epochs


def restart_momentum(optimizer: torch.optim.Optimizer) -> None:
    """b <- 0 for every parameter: the next SGD step starts its momentum afresh (b = g + wd theta),
    as a newly created optimizer would."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state.get(p, {}).pop("momentum_buffer", None)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    dsa: Augmentation | None = None,
    generator: torch.Generator,
    lr_decay_epochs: Sequence[int] = (),
    lr_decay: float = 0.1,
    reset_momentum_at_decay: bool = False,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    numerics: Numerics | None = None,
    progress: bool | None = False,
    desc: str = "train",
) -> list[EpochStats]:
    """Train ``model`` in place on (x, y) for epochs ``start_epoch`` .. ``epochs - 1``.

    ``x``: float N x C x H x W in network input space, on the model's device, or images in
    any stored form (e.g. uint8 N x H x W x C) that ``input_transform`` maps, one gathered
    minibatch at a time, to network input space
    (``tesla.input_space.InputSpace.minibatch_transform``); ``y``: int64 class indices
    (cross-entropy) or float N x K probabilities (soft-target cross-entropy).
    ``generator`` (a CPU ``torch.Generator``) draws the minibatch order and, through
    ``dsa(x_b, generator)``, the augmentation parameters, so a run is reproducible and a
    resumed run (same model, optimizer and generator state, ``start_epoch``) continues
    exactly.  ``optimizer`` defaults to :func:`make_optimizer`; its learning rate is set
    to :func:`epoch_lr` at the start of every epoch, and with ``reset_momentum_at_decay``
    its momentum buffer restarts at every decay epoch (:func:`restart_momentum`).
    ``numerics``: bf16 autocast and memory layout of the step (default: float32, contiguous).
    ``on_epoch_end(stats)`` runs after every epoch (snapshotting, checkpoints); raising
    :class:`EndTraining` from it ends training there, any other exception propagates.
    ``progress``: a tqdm bar over minibatches on stderr (None: only when stderr is a terminal).

    Raises TeslaError naming the epoch and learning rate when the loss stops being finite.
    Returns the statistics of the epochs run.
    """
    recipe = _recipe(epochs, lr, momentum, weight_decay, batch_size, lr_decay_epochs, lr_decay, reset_momentum_at_decay)
    member = GroupMember(model, x, y, generator, optimizer, start_epoch, on_epoch_end, desc)
    _check_member(member, recipe)
    return _train_interleaved([member], recipe, dsa, input_transform, numerics or Numerics(), streams=False,
                              progress=progress, desc=desc)[0]


def train_group(
    members: Sequence[GroupMember],
    *,
    mode: str,
    epochs: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    dsa: Augmentation | None = None,
    lr_decay_epochs: Sequence[int] = (),
    lr_decay: float = 0.1,
    reset_momentum_at_decay: bool = False,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    numerics: Numerics | None = None,
    progress: bool | None = False,
    desc: str = "train",
) -> list[list[EpochStats]]:
    """Train several networks with the same settings in one process; network k of the group
    computes what :func:`train` computes for it alone (its own initialisation, generator,
    data, optimizer, start epoch and callbacks).  ``mode`` (:data:`GROUP_MODES`):

    * ``sequential``: one after the other, each through :func:`train`: bitwise equal to alone;
    * ``streams``: their minibatch steps interleaved, each network's on its own CUDA stream
      so that the GPU can overlap their kernels; the same kernels as alone (on a device
      without streams: interleaved on one, bitwise equal to alone);
    * ``vmap``: the networks' parameters stacked, theta[k] = network k's, and one step for
      all, ``torch.func.vmap`` over ``functional_call`` (convolutions become grouped
      convolutions), summed losses sum_k l_k(theta[k]) differentiated once (network k's
      gradient is grad l_k, as nothing else depends on theta[k]), one SGD update of the
      stacked tensors (element-wise, so each network's SGD): equal to alone within float32
      round-off.  Needs SGD optimizers, the same number of images for every network and a
      contiguous layout; batch-norm running statistics are stacked and updated per network.
      Networks that resume at a later epoch join the stack when the others reach it.

    Returns each member's statistics of the epochs it ran.
    """
    if mode not in GROUP_MODES:
        raise TeslaError(f"group mode {mode!r}: choose one of {', '.join(GROUP_MODES)} (or auto)")
    if not members:
        return []
    recipe = _recipe(epochs, lr, momentum, weight_decay, batch_size, lr_decay_epochs, lr_decay, reset_momentum_at_decay)
    numerics = numerics or Numerics()
    for member in members:
        _check_member(member, recipe)
    if mode == "sequential":
        return [
            train(
                m.model, m.x, m.y, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                batch_size=batch_size, dsa=dsa, generator=m.generator, lr_decay_epochs=lr_decay_epochs,
                lr_decay=lr_decay, reset_momentum_at_decay=reset_momentum_at_decay, start_epoch=m.start_epoch,
                optimizer=m.optimizer, on_epoch_end=m.on_epoch_end, input_transform=input_transform,
                numerics=numerics, progress=progress, desc=m.name,
            )
            for m in members
        ]
    if mode == "vmap":
        _check_stackable(members, numerics)
        return _train_stacked(list(members), recipe, dsa, input_transform, numerics, progress=progress, desc=desc)
    return _train_interleaved(list(members), recipe, dsa, input_transform, numerics, streams=True, progress=progress, desc=desc)


def resolve_group_mode(mode: str, device: torch.device | str, networks: int, numerics: Numerics | None = None) -> str:
    """``auto`` -> the mode chosen for ``device`` (:data:`AUTO_GROUP_MODE`: measured on the CPU, argued for
    CUDA until measured there); one
    network, or a channels-last layout (which vmap cannot keep), -> ``sequential``.
    Other names are checked and returned."""
    if mode != "auto" and mode not in GROUP_MODES:
        raise TeslaError(f"--group-mode {mode!r}: choose one of auto, {', '.join(GROUP_MODES)}")
    channels_last = numerics is not None and numerics.channels_last
    if mode == "vmap" and channels_last:
        raise TeslaError(
            "--group-mode vmap stacks the networks into grouped convolutions, which have no channels-last layout; "
            "drop --channels-last (or give --no-channels-last), or use --group-mode sequential or streams"
        )
    if mode != "auto":
        return mode
    if networks <= 1 or channels_last:
        return "sequential"
    return AUTO_GROUP_MODE.get(torch.device(device).type, "sequential")


def add_group_mode_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--group-mode auto|sequential|streams|vmap`` for a command that trains several ``what``."""
    parser.add_argument(
        "--group-mode", default="auto", choices=["auto", *GROUP_MODES],
        help=f"how the {what} train together in this process: sequential (one after the other, each bitwise as "
             "alone), streams (steps interleaved on CUDA streams), vmap (stacked into one step, equal to alone within "
             "float32 round-off); auto: chosen per device from measurement (docs/benchmarks.md)",
    )


# -- the loops -----------------------------------------------------------------------------
def _recipe(epochs, lr, momentum, weight_decay, batch_size, lr_decay_epochs, lr_decay, reset_momentum_at_decay) -> _Recipe:
    _check_settings(epochs, lr, momentum, weight_decay, batch_size, 0)
    return _Recipe(epochs, float(lr), float(momentum), float(weight_decay), int(batch_size),
                   tuple(int(d) for d in lr_decay_epochs), float(lr_decay), bool(reset_momentum_at_decay))


def _check_member(member: GroupMember, recipe: _Recipe) -> None:
    """Settings, labels and start epoch of one network; its labels moved to its images'
    device and its optimizer created when none was given."""
    _check_settings(recipe.epochs, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.batch_size, member.start_epoch)
    _check_labels(member.x, member.y)
    member.y = member.y.to(member.x.device)
    if member.optimizer is None:
        member.optimizer = make_optimizer(member.model, recipe.lr, recipe.momentum, recipe.weight_decay)


def _progress_bar(members: Sequence[GroupMember], recipe: _Recipe, progress: bool | None, desc: str):
    if progress is False:
        return None
    from tqdm import tqdm

    total = sum((recipe.epochs - m.start_epoch) * math.ceil(m.x.shape[0] / recipe.batch_size) for m in members)
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False, disable=None if progress is None else False)


def _minibatch(member: GroupMember, idx: torch.Tensor, input_transform, dsa) -> tuple[torch.Tensor, torch.Tensor]:
    """(A(T(x[idx])), y[idx]): gather, map to network input space, augment with the member's generator."""
    xb, yb = member.x[idx], member.y[idx]
    if input_transform is not None:
        xb = input_transform(xb)
    if dsa is not None:
        xb, _ = dsa(xb, member.generator)
    return xb, yb


def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
              numerics: Numerics) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on one minibatch; returns (loss, logits)."""
    with numerics.autocast(xb.device):
        logits = model(numerics.input(xb))
        loss = training_loss(logits, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


class _EpochTally:
    """Per network: summed minibatch losses (float64) and correct predictions of one epoch."""

    def __init__(self, networks: int, device: torch.device) -> None:
        self.loss_sum = torch.zeros(networks, dtype=torch.float64, device=device)
        self.correct = torch.zeros(networks, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, k: slice | int, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        """Add a minibatch of B images: its mean loss (or K of them) and logits (B x C, or K x B x C)."""
        self.loss_sum[k] += loss.detach().double() * logits.shape[-2]
        self.correct[k] += (logits.argmax(dim=-1) == _hard(yb)).sum(dim=-1)


def _start_epoch_for(optimizers: Iterable[torch.optim.Optimizer], recipe: _Recipe, epoch: int) -> float:
    lr_e = epoch_lr(recipe.lr, epoch, recipe.lr_decay_epochs, recipe.lr_decay)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr_e
        if recipe.restarts_momentum(epoch):
            restart_momentum(optimizer)
    return lr_e


def _end_epoch(member: GroupMember, history: list[EpochStats], epoch: int, loss_sum: float, correct: int, lr_e: float,
               seconds: float) -> bool:
    """Record the epoch and run the member's callback; False when it ended its training."""
    n = member.x.shape[0]
    mean_loss = loss_sum / n
    _check_finite(mean_loss, epoch, lr_e, member.name)
    stats = EpochStats(epoch=epoch + 1, loss=mean_loss, accuracy=correct / n, lr=lr_e, seconds=seconds, images=n)
    history.append(stats)
    if member.on_epoch_end is not None:
        try:
            member.on_epoch_end(stats)
        except EndTraining:
            return False
    return True


def _cohorts(members: Sequence[GroupMember], running: list[bool], recipe: _Recipe) -> Iterator[tuple[int, list[int]]]:
    """(epoch, cohort) for every epoch in which some network trains: the cohort is the
    networks that have reached their start epoch and not ended (``running`` is read anew
    at every epoch, so a network that ends leaves the cohort)."""
    for epoch in range(min(m.start_epoch for m in members), recipe.epochs):
        if not any(running):
            return
        cohort = [k for k, m in enumerate(members) if running[k] and m.start_epoch <= epoch]
        if cohort:
            yield epoch, cohort


def _close_epoch(members: Sequence[GroupMember], cohort: list[int], tally: "_EpochTally", histories: list[list[EpochStats]],
                 running: list[bool], epoch: int, lr_e: float, seconds: float, bar) -> None:
    """Every cohort network's statistics and callback (cohort position j is tally entry j)."""
    sums, correct = tally.loss_sum.tolist(), tally.correct.tolist()
    for j, k in enumerate(cohort):
        running[k] = _end_epoch(members[k], histories[k], epoch, sums[j], correct[j], lr_e, seconds)
    if bar is not None:
        last = histories[cohort[0]][-1]
        bar.set_postfix(loss=f"{last.loss:.4f}", acc=f"{last.accuracy:.4f}")


def _train_interleaved(members: list[GroupMember], recipe: _Recipe, dsa, input_transform, numerics: Numerics, *,
                       streams: bool, progress: bool | None, desc: str) -> list[list[EpochStats]]:
    """Each network's own SGD steps, the networks' steps interleaved minibatch by minibatch
    (one network: the plain loop).  With ``streams`` on CUDA each network runs on its own
    stream: it waits for the default stream at the start of every epoch, and the default
    stream waits for it before the epoch's statistics and callbacks."""
    device = members[0].x.device
    cuda_streams = streams and device.type == "cuda"
    lanes = [torch.cuda.Stream(device) if cuda_streams else None for _ in members]
    histories: list[list[EpochStats]] = [[] for _ in members]
    running = [True] * len(members)
    for m in members:
        numerics.model(m.model).train()
    bar = _progress_bar(members, recipe, progress, desc)
    try:
        for epoch, cohort in _cohorts(members, running, recipe):
            lr_e = _start_epoch_for((members[k].optimizer for k in cohort), recipe, epoch)
            t0 = time.perf_counter()
            tally = _EpochTally(len(cohort), device)
            _lanes_wait(lanes, device)
            orders = []
            for k in cohort:
                with _on_lane(lanes[k], device):
                    orders.append(minibatches(members[k].x.shape[0], recipe.batch_size, members[k].generator, device))
            for step in range(max(len(o) for o in orders)):
                for j, k in enumerate(cohort):
                    if step >= len(orders[j]):
                        continue
                    m = members[k]
                    with _on_lane(lanes[k], device):
                        xb, yb = _minibatch(m, orders[j][step], input_transform, dsa)
                        loss, logits = _sgd_step(m.model, m.optimizer, xb, yb, numerics)
                        tally.add(j, loss, logits, yb)
                        if step % _FINITE_CHECK_EVERY == _FINITE_CHECK_EVERY - 1:
                            _check_finite(float(tally.loss_sum[j]), epoch, lr_e, m.name)
                    if bar is not None:
                        bar.update(1)
            _join_lanes(lanes, device)
            _close_epoch(members, cohort, tally, histories, running, epoch, lr_e, time.perf_counter() - t0, bar)
    finally:
        if bar is not None:
            bar.close()
    return histories


def _on_lane(stream, device: torch.device):
    """The context that puts work on a network's CUDA stream (nothing without one)."""
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def _lanes_wait(lanes: Sequence, device: torch.device) -> None:
    """Every network's stream waits for the default stream (the epoch's setup, the callbacks)."""
    current = torch.cuda.current_stream(device) if any(s is not None for s in lanes) else None
    for stream in lanes:
        if stream is not None:
            stream.wait_stream(current)


def _join_lanes(lanes: Sequence, device: torch.device) -> None:
    """The default stream waits for every network's stream (before reading their results)."""
    current = torch.cuda.current_stream(device) if any(s is not None for s in lanes) else None
    for stream in lanes:
        if stream is not None:
            current.wait_stream(stream)


class _Stack:
    """The networks of a cohort as one stacked network: theta[k] = network k's parameters
    (``torch.func.stack_module_state``), one SGD optimizer over the stacked tensors (SGD is
    element-wise, so it is each network's SGD; their momentum buffers are stacked too)."""

    def __init__(self, members: Sequence[GroupMember], numerics: Numerics) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        self.members = list(members)
        self.numerics = numerics
        template = self.members[0].model
        self.params, self.buffers = stack_module_state([m.model for m in self.members])
        settings = _sgd_settings(self.members[0].optimizer)
        self.optimizer = torch.optim.SGD(list(self.params.values()), **settings)
        for name, stacked in self.params.items():
            buffers = [_momentum_buffer(m, name) for m in self.members]
            if all(b is not None for b in buffers):
                self.optimizer.state[stacked]["momentum_buffer"] = torch.stack(buffers)
            elif any(b is not None for b in buffers):  # networks of one cohort are at the same epoch
                raise TeslaError("networks resumed at the same epoch disagree on having an SGD momentum buffer; "
                                 "their partial states are inconsistent: delete them to start over")

        def forward(params, buffers, xb):
            return functional_call(template, (params, buffers), (xb,))

        self._forward = vmap(forward)
        self._losses = vmap(training_loss)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of every network on its minibatch: xb K x B x C x H x W, yb K x B (x classes).
        Returns (K losses, K x B x classes logits)."""
        with self.numerics.autocast(xb.device):
            logits = self._forward(self.params, self.buffers, xb)
            losses = self._losses(logits, yb)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses, logits

    @torch.no_grad()
    def unstack(self) -> None:
        """Copy network k's parameters, buffers, momentum buffer and lr back into member k."""
        lr = self.optimizer.param_groups[0]["lr"]
        for k, m in enumerate(self.members):
            for name, p in m.model.named_parameters():
                p.copy_(self.params[name][k])
                state = m.optimizer.state[p]
                stacked = self.optimizer.state.get(self.params[name], {}).get("momentum_buffer")
                if stacked is None:
                    state.pop("momentum_buffer", None)
                else:
                    state["momentum_buffer"] = stacked[k].clone()
            for name, b in m.model.named_buffers():
                b.copy_(self.buffers[name][k])
            for group in m.optimizer.param_groups:
                group["lr"] = lr


def _sgd_settings(optimizer: torch.optim.Optimizer) -> dict:
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        raise TeslaError("group mode vmap stacks plain SGD optimizers (one parameter group); use --group-mode sequential")
    group = optimizer.param_groups[0]
    return {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}


def _momentum_buffer(member: GroupMember, name: str) -> torch.Tensor | None:
    param = dict(member.model.named_parameters())[name]
    return member.optimizer.state.get(param, {}).get("momentum_buffer")


def _check_stackable(members: Sequence[GroupMember], numerics: Numerics) -> None:
    """What vmap needs: one architecture, the same data shape and label kind, SGD with the
    same settings, a contiguous layout."""
    if numerics.channels_last:
        resolve_group_mode("vmap", members[0].x.device, len(members), numerics)  # raises
    first = members[0]
    layout = [(n, tuple(p.shape)) for n, p in first.model.named_parameters()]
    buffers = [(n, tuple(b.shape)) for n, b in first.model.named_buffers()]
    settings = _sgd_settings(first.optimizer)
    for m in members[1:]:
        if [(n, tuple(p.shape)) for n, p in m.model.named_parameters()] != layout or \
                [(n, tuple(b.shape)) for n, b in m.model.named_buffers()] != buffers or type(m.model) is not type(first.model):
            raise TeslaError(f"group mode vmap: {m.name} is another architecture than {first.name}; "
                             "vmap trains copies of one network (use --group-mode sequential)")
        if tuple(m.x.shape) != tuple(first.x.shape) or m.y.dtype != first.y.dtype or tuple(m.y.shape) != tuple(first.y.shape):
            raise TeslaError(f"group mode vmap: {m.name} has {tuple(m.x.shape)} images and labels {tuple(m.y.shape)}, "
                             f"{first.name} {tuple(first.x.shape)} and {tuple(first.y.shape)}; vmap needs the same number "
                             "of images and the same label kind for every network (use --group-mode sequential)")
        if _sgd_settings(m.optimizer) != settings:
            raise TeslaError("group mode vmap: the networks' SGD settings differ; use --group-mode sequential")


def _train_stacked(members: list[GroupMember], recipe: _Recipe, dsa, input_transform, numerics: Numerics, *,
                   progress: bool | None, desc: str) -> list[list[EpochStats]]:
    """The vmap loop: each epoch, the networks that are due (started, not ended) train as one
    stack; every network draws its own minibatch order and augmentation from its generator,
    in the same order as alone (the permutation first, then one draw per minibatch).  The
    stack is copied back into the members after every epoch when they have callbacks (they
    save states), else when the cohort changes and at the end."""
    device = members[0].x.device
    histories: list[list[EpochStats]] = [[] for _ in members]
    running = [True] * len(members)
    shared_x = all(m.x is members[0].x for m in members)
    for m in members:
        m.model.train()
    stack: _Stack | None = None
    stacked: list[int] = []
    callbacks = any(m.on_epoch_end is not None for m in members)
    bar = _progress_bar(members, recipe, progress, desc)
    try:
        for epoch, cohort in _cohorts(members, running, recipe):
            if cohort != stacked:
                if stack is not None and not callbacks:
                    stack.unstack()
                stack, stacked = _Stack([members[k] for k in cohort], numerics), cohort
            lr_e = _start_epoch_for([stack.optimizer], recipe, epoch)
            t0 = time.perf_counter()
            tally = _EpochTally(len(cohort), device)
            orders = [minibatches(members[k].x.shape[0], recipe.batch_size, members[k].generator, device) for k in cohort]
            for step in range(len(orders[0])):
                xb, yb = _stacked_minibatch([members[k] for k in cohort], [o[step] for o in orders], input_transform, dsa,
                                            shared_x)
                losses, logits = stack.step(xb, yb)
                tally.add(slice(None), losses, logits, yb)
                if bar is not None:
                    bar.update(len(cohort))
                if step % _FINITE_CHECK_EVERY == _FINITE_CHECK_EVERY - 1:
                    for j, value in enumerate(tally.loss_sum.tolist()):
                        _check_finite(value, epoch, lr_e, members[cohort[j]].name)
            seconds = time.perf_counter() - t0
            if callbacks:
                stack.unstack()
            _close_epoch(members, cohort, tally, histories, running, epoch, lr_e, seconds, bar)
        if stack is not None and not callbacks:
            stack.unstack()
    finally:
        if bar is not None:
            bar.close()
    return histories


def _stacked_minibatch(members: Sequence[GroupMember], idx: Sequence[torch.Tensor], input_transform, dsa,
                       shared_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K minibatches stacked, K x B x ...: one gather and one input transform for all when the
    networks share their images, then each network's own augmentation draw."""
    if shared_x:
        order = torch.stack(list(idx))
        xs = members[0].x[order.reshape(-1)]
        if input_transform is not None:
            xs = input_transform(xs)
        xs = xs.view(len(members), -1, *xs.shape[1:])
        ys = [m.y[i] for m, i in zip(members, idx)]
        if dsa is not None:
            xs = torch.stack([dsa(xs[k], m.generator)[0] for k, m in enumerate(members)])
        return xs, torch.stack(ys)
    batches = [_minibatch(m, i, input_transform, dsa) for m, i in zip(members, idx)]
    return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])


@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Top-1 accuracy (1/N) sum_n [argmax_c f(x_n)_c = y_n] in eval mode, without gradients.

    Soft labels count their argmax class; ``input_transform`` as in :func:`train`.  The
    model's train/eval mode is restored.
    """
    _check_labels(x, y, "evaluation set")
    was_training = model.training
    model.eval()
    try:
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        target = _hard(y.to(x.device))
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            if input_transform is not None:
                xb = input_transform(xb)
            correct += (model(xb).argmax(dim=1) == target[s : s + batch_size]).sum()
    finally:
        model.train(was_training)
    return float(correct) / x.shape[0]
