"""The state of a distillation: what it learns and how it learns it.

The learned quantities are the synthetic images X (network input space), the student's
learning rate alpha and, with learned labels, the label logits Z; each has its SGD optimiser
with momentum 0.5 (PAPER.md section 1). Besides them the state holds the random stream, the
divergence guard's references (alpha_0 and the initial largest image RMS) and the metrics
history: everything a checkpoint saves (:mod:`tesla.distill_checkpoint`).

The state starts fresh (:func:`fresh_state`) or from a checkpoint's content
(:func:`restored_state`). The initial state: X_0 random real images of each class (``init: real``), only those a chosen
expert snapshot classifies correctly (``real-correct``, :mod:`tesla.initialisation`), or
noise; alpha_0 = ``lr_teacher``; learned labels Z_0 = f_{theta*}(X_0) of the same snapshot
(``init_expert`` at ``init_epoch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tesla import guard
from tesla.distill_settings import DistillSettings
from tesla.distill_setup import DistillSetup
from tesla.initialisation import correct_indices_per_class
from tesla.soft_labels import expert_logits


#: the momentum of the SGD optimisers of X, alpha and Z
MOMENTUM = 0.5


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
    return expert_logits(setup.model, init_snapshot(setup), images, setup.settings.label_chunk)


def optimisers(images: torch.Tensor, alpha: torch.Tensor, s: DistillSettings) -> tuple[torch.optim.SGD, torch.optim.SGD]:
    """SGD(c lr_img, momentum 0.5) on X and SGD(lr_lr, momentum 0.5) on alpha."""
    return (
        torch.optim.SGD([images], lr=s.image_lr, momentum=MOMENTUM),
        torch.optim.SGD([alpha], lr=s.lr_lr, momentum=MOMENTUM),
    )


def label_optimiser(logits: torch.Tensor | None, s: DistillSettings) -> torch.optim.Optimizer | None:
    """SGD(lr_label, momentum 0.5) on the label logits, as for the images (None without them)."""
    return None if logits is None else torch.optim.SGD([logits], lr=s.lr_label, momentum=MOMENTUM)


def fresh_state(setup: DistillSetup) -> DistillState:
    """Iteration 0: X_0, alpha_0 = lr_teacher, Z_0 (learned labels), the generator seeded with
    ``seed``, and the guard's references taken from X_0 and alpha_0."""
    s = setup.settings
    generator = torch.Generator().manual_seed(s.seed)
    x, classes = initial_images(setup, generator)
    images = x.to(setup.device).requires_grad_(True)
    alpha = torch.tensor(s.lr_teacher, dtype=torch.float32, device=setup.device, requires_grad=True)
    opt_images, opt_alpha = optimisers(images, alpha, s)
    logits = initial_label_logits(setup, images.detach()).requires_grad_(True) if s.learned_labels else None
    return DistillState(
        0, images, classes, [], alpha, None, opt_images, opt_alpha, generator, guard.Start.of(s.lr_teacher, x),
        logits, label_optimiser(logits, s),
    )


def _set_lr(optimiser: torch.optim.Optimizer, lr: float) -> None:
    """Today's step size on a restored optimiser (step sizes may change on resume)."""
    for group in optimiser.param_groups:
        group["lr"] = lr


def _restore_images_and_alpha(payload: dict[str, Any], setup: DistillSetup):
    """X and alpha on the device, with their optimisers' momentum and today's step sizes."""
    s = setup.settings
    images = payload["images"].to(setup.device).requires_grad_(True)
    alpha = payload["alpha"].to(setup.device).requires_grad_(True)
    opt_images, opt_alpha = optimisers(images, alpha, s)
    opt_images.load_state_dict(payload["opt_images"])
    opt_alpha.load_state_dict(payload["opt_alpha"])
    _set_lr(opt_images, s.image_lr)
    _set_lr(opt_alpha, s.lr_lr)
    return images, alpha, opt_images, opt_alpha


def _restore_label_logits(payload: dict[str, Any], setup: DistillSetup):
    """Learned labels: Z on the device and its optimiser (momentum, today's lr_label);
    (None, None) for other labels and for checkpoints before version 3."""
    logits = payload.get("label_logits")
    logits = None if logits is None else logits.to(setup.device).requires_grad_(True)
    opt_labels = label_optimiser(logits, setup.settings)
    if opt_labels is not None:
        opt_labels.load_state_dict(payload["opt_labels"])
        _set_lr(opt_labels, setup.settings.lr_label)
    return logits, opt_labels


def _guard_start(payload: dict[str, Any], setup: DistillSetup) -> guard.Start:
    """The guard's references alpha_0 and rho_0 as saved; checkpoints of version 1 saved none:
    they are recomputed from lr_teacher and the seed's initial images."""
    if payload.get("guard_start") is None:
        x0, _ = initial_images(setup, torch.Generator().manual_seed(setup.settings.seed))
        return guard.Start.of(setup.settings.lr_teacher, x0)
    return guard.Start(**payload["guard_start"])


def restored_state(payload: dict[str, Any], setup: DistillSetup) -> DistillState:
    """The state a checkpoint's content holds (:mod:`tesla.distill_checkpoint`, which reads
    and checks the file), on the device, its optimisers with their momentum and today's step
    sizes (which may change on resume)."""
    images, alpha, opt_images, opt_alpha = _restore_images_and_alpha(payload, setup)
    generator = torch.Generator()
    generator.set_state(payload["generator"])
    soft = payload["soft_labels"]
    start = _guard_start(payload, setup)
    logits, opt_labels = _restore_label_logits(payload, setup)
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
        start,
        logits,
        opt_labels,
    )
