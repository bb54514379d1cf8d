"""The one training loop: experts (plain SGD on the real data) and evaluation (on a synthetic set).

Data live as tensors on the device (``ImageSplit.load_tensors``): an epoch is a random
permutation of 0..N-1 drawn from an explicit ``torch.Generator``, cut into minibatches of
``batch_size`` indices (the last one may be smaller); a minibatch is one index gather,
one differentiable siamese augmentation call (``dsa(x_b, generator)``) and one SGD step

    theta <- theta - lr_e * (grad_theta l(f_theta(A(x_b)), y_b) + wd * theta)   (+ momentum),

with l the cross-entropy (hard labels) or the soft-target cross-entropy (soft labels).
There is no per-sample Python work and no host/device copy of images.  The learning rate
of epoch e is ``lr * decay ** #{d in lr_decay_epochs : d <= e}`` (0-based e), so a run
resumed at ``start_epoch`` continues the same schedule.

Experts (PAPER.md section 1): ``train(model, x, y, epochs=50, lr=0.01, batch_size=256,
dsa=DSA(...), generator=g)`` (no momentum, no weight decay).  Evaluation (section 6): the
same call with ``momentum=0.9, weight_decay=5e-4, lr_decay_epochs=(epochs // 2,)``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tesla.errors import TeslaError

__all__ = [
    "EpochStats",
    "accuracy",
    "epoch_lr",
    "make_optimizer",
    "minibatches",
    "NetworkInput",
    "pick_device",
    "soft_cross_entropy",
    "train",
    "training_loss",
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
    """Class indices: y itself, or argmax_c y_c for soft labels."""
    return y.argmax(dim=1) if y.is_floating_point() else y


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


class NetworkInput:
    """x = (u / 255 - mean_c) / std_c for a gathered uint8 N x H x W x C batch -> contiguous N x C x H x W.

    Keeping a split on the device as uint8 and normalising per minibatch takes a quarter of
    the memory of float32 images (ImageNet-1K at 64 px: 15.7 GB instead of 63 GB); the values
    are those of ``tesla.data.normalize``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        x = u.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        return ((x - self.mean) / self.std).contiguous()


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


def _check_finite(loss: float, epoch: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise TeslaError(
            f"training diverged: the loss became {loss} in epoch {epoch + 1} at learning rate {lr:g}; "
            f"lower the learning rate (or check the inputs for NaN/inf)"
        )


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
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool | None = False,
    desc: str = "train",
) -> list[EpochStats]:
    """Train ``model`` in place on (x, y) for epochs ``start_epoch`` .. ``epochs - 1``.

    ``x``: float N x C x H x W in network input space, on the model's device, or images in
    any stored form (e.g. uint8 N x H x W x C) that ``input_transform`` maps, one gathered
    minibatch at a time, to network input space (:class:`NetworkInput`); ``y``: int64
    class indices (cross-entropy) or float N x K probabilities (soft-target cross-entropy).
    ``generator`` (a CPU ``torch.Generator``) draws the minibatch order and, through
    ``dsa(x_b, generator)``, the augmentation parameters, so a run is reproducible and a
    resumed run (same model, optimizer and generator state, ``start_epoch``) continues
    exactly.  ``optimizer`` defaults to :func:`make_optimizer`; its learning rate is set
    to :func:`epoch_lr` at the start of every epoch.  ``on_epoch_end(stats)`` runs after
    every epoch (snapshotting, checkpoints; an exception from it stops training).
    ``progress``: a tqdm bar over minibatches on stderr (None: only when stderr is a terminal).

    Raises TeslaError naming the epoch and learning rate when the loss stops being finite.
    Returns the statistics of the epochs run.
    """
    _check_settings(epochs, lr, momentum, weight_decay, batch_size, start_epoch)
    _check_labels(x, y)
    device = x.device
    y = y.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model, lr, momentum, weight_decay)
    n = x.shape[0]
    history: list[EpochStats] = []
    bar = None
    if progress is not False:
        from tqdm import tqdm

        bar = tqdm(
            total=(epochs - start_epoch) * math.ceil(n / batch_size), desc=desc, unit="batch", file=sys.stderr,
            leave=False, disable=None if progress is None else False,
        )
    model.train()
    try:
        for epoch in range(start_epoch, epochs):
            lr_e = epoch_lr(lr, epoch, lr_decay_epochs, lr_decay)
            for group in optimizer.param_groups:
                group["lr"] = lr_e
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for step, idx in enumerate(minibatches(n, batch_size, generator, device)):
                xb, yb = x[idx], y[idx]
                if input_transform is not None:
                    xb = input_transform(xb)
                if dsa is not None:
                    xb, _ = dsa(xb, generator)
                logits = model(xb)
                loss = training_loss(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    loss_sum += loss.detach().double() * len(idx)
                    correct += (logits.argmax(dim=1) == _hard(yb)).sum()
                if bar is not None:
                    bar.update(1)
                if step % _FINITE_CHECK_EVERY == _FINITE_CHECK_EVERY - 1:
                    _check_finite(float(loss_sum), epoch, lr_e)
            mean_loss = float(loss_sum) / n
            _check_finite(mean_loss, epoch, lr_e)
            stats = EpochStats(
                epoch=epoch + 1,
                loss=mean_loss,
                accuracy=float(correct) / n,
                lr=lr_e,
                seconds=time.perf_counter() - t0,
                images=n,
            )
            history.append(stats)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{stats.accuracy:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(stats)
    finally:
        if bar is not None:
            bar.close()
    return history


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
