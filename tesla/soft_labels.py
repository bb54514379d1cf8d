"""TESLA soft label assignment (PAPER.md section 3).

Every distillation iteration the *target* expert snapshot theta*_{t+M} labels the current,
un-augmented synthetic images::

    y_n = softmax(f_{theta*_{t+M}}(X_n))        (no temperature, not learned, no gradient)

and the student steps train against them with the soft-target cross-entropy
-sum_c y_c log softmax(z)_c. The labels are computed in chunks of at most ``chunk`` images,
so any number of images works (one image included) at bounded activation memory.
"""

from __future__ import annotations

import torch
from torch import nn

from tesla.models import functional_forward


@torch.no_grad()
def assign_soft_labels(
    model: nn.Module,
    flat: torch.Tensor,
    images: torch.Tensor,
    chunk: int = 256,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = softmax(f_theta(X)) row by row, ``chunk`` images at a time: an N x K float tensor.

    ``model`` is the expert architecture, ``flat`` its flat parameter vector theta*_{t+M}
    (see ``tesla.models.flatten_params``), ``images`` N x C x H x W in network input space.
    The result has the dtype of ``images`` and lives on their device.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    flat = flat.detach().to(device=images.device, dtype=images.dtype)
    parts = [
        torch.softmax(functional_forward(model, flat, images[s : s + chunk].detach(), buffers), dim=1)
        for s in range(0, len(images), chunk)
    ]
    if not parts:
        raise ValueError("no images to label")
    return torch.cat(parts, dim=0)
