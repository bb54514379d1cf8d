"""The training losses: cross-entropy for class indices, the soft-target cross-entropy for
probabilities (TESLA's soft labels, DATM's learned ones), and the class a label names.

    l(z, y) = -log softmax(z)_y           (hard labels, int64 class indices)
    l(z, Y) = -sum_c Y_c log softmax(z)_c  (soft labels, N x K probabilities)

each the mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hard_labels", "soft_cross_entropy", "training_loss"]


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy, batch mean:  l = -(1/B) sum_b sum_c y_bc log softmax(z_b)_c."""
    return -(probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def training_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for int64 class indices, soft-target cross-entropy for float N x K labels."""
    if y.is_floating_point():
        return soft_cross_entropy(logits, y)
    return F.cross_entropy(logits, y)



def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices: y itself, or argmax_c y_c for soft labels (classes on the last axis)."""
    return y.argmax(dim=-1) if y.is_floating_point() else y
