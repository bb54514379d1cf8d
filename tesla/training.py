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
evaluation) train in one process with :func:`tesla.group_training.train_group`: one after the other
(``sequential``, bitwise equal to alone), with their steps interleaved on separate CUDA
streams (``streams``), or stacked into one vmapped step (``vmap``, equal to alone within
float32 round-off); each keeps its own initialisation, generator (minibatch order and
augmentation draws), optimizer state and callbacks.  How each step is computed (TF32, a
bf16 autocast, channels-last) is ``tesla.precision.Numerics``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from tesla.errors import TeslaError
from tesla.losses import hard_labels, training_loss
from tesla.precision import Numerics

__all__ = [
    "FINITE_CHECK_EVERY",
    "Augmentation",
    "EndTraining",
    "EpochStats",
    "EpochTally",
    "GroupMember",
    "Recipe",
    "accuracy",
    "begin_epoch",
    "check_finite",
    "check_member",
    "close_epoch",
    "epoch_cohorts",
    "epoch_lr",
    "gather_minibatch",
    "make_optimizer",
    "make_recipe",
    "minibatches",
    "progress_bar",
    "restart_momentum",
    "train",
    "train_alone",
    "train_interleaved",
]


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
FINITE_CHECK_EVERY = 32


def check_finite(loss: float, epoch: int, lr: float, name: str = "train") -> None:
    if not math.isfinite(loss):
        raise TeslaError(
            f"training diverged ({name}): the loss became {loss} in epoch {epoch + 1} at learning rate {lr:g}; "
            f"lower the learning rate (or check the inputs for NaN/inf)"
        )


class EndTraining(Exception):
    """Raised by an ``on_epoch_end`` callback to end *its* network's training after that
    epoch: :func:`train` returns the history so far, and in :func:`tesla.group_training.train_group` the other
    networks of the group go on."""


@dataclass
class GroupMember:
    """One network of a group trained together (:func:`tesla.group_training.train_group`): its model, its
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
class Recipe:
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
    recipe = make_recipe(epochs, lr, momentum, weight_decay, batch_size, lr_decay_epochs, lr_decay, reset_momentum_at_decay)
    member = GroupMember(model, x, y, generator, optimizer, start_epoch, on_epoch_end, desc)
    return train_alone(member, recipe, dsa, input_transform, numerics or Numerics(), progress=progress)


def train_alone(
    member: GroupMember,
    recipe: Recipe,
    dsa: Augmentation | None,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None,
    numerics: Numerics,
    *,
    progress: bool | None,
) -> list[EpochStats]:
    """One network trained alone under ``recipe``: what :func:`train` does once it has made
    its recipe and member (and what the ``sequential`` group mode does for each network).
    The member is checked (:func:`check_member`), then trained in the plain loop; its
    progress bar is named after it.  Returns the statistics of the epochs run."""
    check_member(member, recipe)
    return train_interleaved([member], recipe, dsa, input_transform, numerics, streams=False,
                             progress=progress, desc=member.name)[0]


def make_recipe(epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int,
                lr_decay_epochs: Iterable[int], lr_decay: float, reset_momentum_at_decay: bool) -> Recipe:
    """The settings as a :class:`Recipe`, checked (a TeslaError names the bad one)."""
    _check_settings(epochs, lr, momentum, weight_decay, batch_size, 0)
    return Recipe(epochs, float(lr), float(momentum), float(weight_decay), int(batch_size),
                   tuple(int(d) for d in lr_decay_epochs), float(lr_decay), bool(reset_momentum_at_decay))


def check_member(member: GroupMember, recipe: Recipe) -> None:
    """Settings, labels and start epoch of one network; its labels moved to its images'
    device and its optimizer created when none was given."""
    _check_settings(recipe.epochs, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.batch_size, member.start_epoch)
    _check_labels(member.x, member.y)
    member.y = member.y.to(member.x.device)
    if member.optimizer is None:
        member.optimizer = make_optimizer(member.model, recipe.lr, recipe.momentum, recipe.weight_decay)


def progress_bar(members: Sequence[GroupMember], recipe: Recipe, progress: bool | None, desc: str):
    if progress is False:
        return None
    total = sum((recipe.epochs - m.start_epoch) * math.ceil(m.x.shape[0] / recipe.batch_size) for m in members)
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False, disable=None if progress is None else False)


def gather_minibatch(member: GroupMember, idx: torch.Tensor, input_transform, dsa) -> tuple[torch.Tensor, torch.Tensor]:
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


class EpochTally:
    """Per network: summed minibatch losses (float64) and correct predictions of one epoch."""

    def __init__(self, networks: int, device: torch.device) -> None:
        self.loss_sum = torch.zeros(networks, dtype=torch.float64, device=device)
        self.correct = torch.zeros(networks, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, k: slice | int, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        """Add a minibatch of B images: its mean loss (or K of them) and logits (B x C, or K x B x C)."""
        self.loss_sum[k] += loss.detach().double() * logits.shape[-2]
        self.correct[k] += (logits.argmax(dim=-1) == hard_labels(yb)).sum(dim=-1)


def begin_epoch(optimizers: Iterable[torch.optim.Optimizer], recipe: Recipe, epoch: int) -> float:
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
    check_finite(mean_loss, epoch, lr_e, member.name)
    stats = EpochStats(epoch=epoch + 1, loss=mean_loss, accuracy=correct / n, lr=lr_e, seconds=seconds, images=n)
    history.append(stats)
    if member.on_epoch_end is not None:
        try:
            member.on_epoch_end(stats)
        except EndTraining:
            return False
    return True


def epoch_cohorts(members: Sequence[GroupMember], running: list[bool], recipe: Recipe) -> Iterator[tuple[int, list[int]]]:
    """(epoch, cohort) for every epoch in which some network trains: the cohort is the
    networks that have reached their start epoch and not ended (``running`` is read anew
    at every epoch, so a network that ends leaves the cohort)."""
    for epoch in range(min(m.start_epoch for m in members), recipe.epochs):
        if not any(running):
            return
        cohort = [k for k, m in enumerate(members) if running[k] and m.start_epoch <= epoch]
        if cohort:
            yield epoch, cohort


def close_epoch(members: Sequence[GroupMember], cohort: list[int], tally: "EpochTally", histories: list[list[EpochStats]],
                 running: list[bool], epoch: int, lr_e: float, seconds: float, bar) -> None:
    """Every cohort network's statistics and callback (cohort position j is tally entry j)."""
    sums, correct = tally.loss_sum.tolist(), tally.correct.tolist()
    for j, k in enumerate(cohort):
        running[k] = _end_epoch(members[k], histories[k], epoch, sums[j], correct[j], lr_e, seconds)
    if bar is not None:
        last = histories[cohort[0]][-1]
        bar.set_postfix(loss=f"{last.loss:.4f}", acc=f"{last.accuracy:.4f}")


def train_interleaved(members: list[GroupMember], recipe: Recipe, dsa, input_transform, numerics: Numerics, *,
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
    bar = progress_bar(members, recipe, progress, desc)
    try:
        for epoch, cohort in epoch_cohorts(members, running, recipe):
            lr_e = begin_epoch((members[k].optimizer for k in cohort), recipe, epoch)
            t0 = time.perf_counter()
            tally = EpochTally(len(cohort), device)
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
                        xb, yb = gather_minibatch(m, orders[j][step], input_transform, dsa)
                        loss, logits = _sgd_step(m.model, m.optimizer, xb, yb, numerics)
                        tally.add(j, loss, logits, yb)
                        if step % FINITE_CHECK_EVERY == FINITE_CHECK_EVERY - 1:
                            check_finite(float(tally.loss_sum[j]), epoch, lr_e, m.name)
                    if bar is not None:
                        bar.update(1)
            _join_lanes(lanes, device)
            close_epoch(members, cohort, tally, histories, running, epoch, lr_e, time.perf_counter() - t0, bar)
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
        target = hard_labels(y.to(x.device))
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            if input_transform is not None:
                xb = input_transform(xb)
            correct += (model(xb).argmax(dim=1) == target[s : s + batch_size]).sum()
    finally:
        model.train(was_training)
    return float(correct) / x.shape[0]
