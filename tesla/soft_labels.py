"""Soft labels: TESLA's assigned labels and DATM's learned labels.

**Assigned (TESLA, PAPER.md section 3).** Every distillation iteration the *target* expert
snapshot theta*_{t+M} labels the current, un-augmented synthetic images::

    y_n = softmax(f_{theta*_{t+M}}(X_n))        (no temperature, not learned, no gradient)

**Learned (DATM).** The labels are parameters: one logit vector z_n per synthetic image, and the
student trains against::

    y_n = softmax(z_n / T)                      (T = the label temperature, fixed)

initialised from an expert snapshot's logits on the initial images, z_n = f_{theta*}(X_n), and
updated from the matching loss by SGD. The engines give dL/dY (:mod:`tesla.matching`); the
chain rule through the softmax (:func:`label_logit_gradient`) gives dL/dz.

In both cases the student steps use the soft-target cross-entropy -sum_c y_c log softmax(s)_c.
Expert logits are computed in chunks of at most ``chunk`` images, so any number of images
works (one image included) at bounded activation memory.
"""

from __future__ import annotations

import torch
from torch import nn

from tesla.parameters import functional_forward


@torch.no_grad()
def expert_logits(
    model: nn.Module,
    flat: torch.Tensor,
    images: torch.Tensor,
    chunk: int = 256,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """f_theta(X) row by row, ``chunk`` images at a time: an N x K tensor of logits.

    ``model`` is the expert architecture, ``flat`` its flat parameter vector (see
    ``tesla.parameters.flatten_params``), ``images`` N x C x H x W in network input space. The
    result has the dtype of ``images`` and lives on their device.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to label")
    flat = flat.detach().to(device=images.device, dtype=images.dtype)
    return torch.cat(
        [functional_forward(model, flat, images[s : s + chunk].detach(), buffers) for s in range(0, len(images), chunk)]
    )


def assign_soft_labels(
    model: nn.Module,
    flat: torch.Tensor,
    images: torch.Tensor,
    chunk: int = 256,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """TESLA's labels y = softmax(f_theta(X)): an N x K float tensor (see :func:`expert_logits`)."""
    return torch.softmax(expert_logits(model, flat, images, chunk, buffers), dim=1)


def learned_soft_labels(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The training targets of learned labels: y_n = softmax(z_n / T) (no gradient)."""
    return torch.softmax(logits.detach() / temperature, dim=1)


def label_logit_gradient(logits: torch.Tensor, temperature: float, grad_labels: torch.Tensor) -> torch.Tensor:
    """dL/dz from dL/dy for y = softmax(z / T), row by row::

        dL/dz_n = (1/T) y_n * (dL/dy_n - <y_n, dL/dy_n>)

    (the softmax Jacobian (diag(y) - y y^T) / T is symmetric)."""
    y = learned_soft_labels(logits, temperature)
    g = grad_labels.to(y.dtype)
    return y * (g - torch.sum(y * g, dim=1, keepdim=True)) / temperature


def mean_entropy(probs: torch.Tensor) -> float:
    """The labels' mean entropy in nats, (1/N) sum_n -sum_c y_nc log y_nc: log K for uniform
    labels, 0 for one-hot ones (how far learned labels have moved from hard labels)."""
    p = probs.detach().double()
    return float(-(torch.special.xlogy(p, p)).sum(dim=1).mean())
