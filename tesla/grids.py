"""Synthetic images as pictures: network input space back to pixels, and the class grid
(one row per class) that ``tesla distill`` writes at checkpoints, ``tesla report`` draws and
``tesla export`` builds on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from tesla.files import atomic_output
from tesla.input_space import InputSpace
from tesla.normalizations import Normalization

__all__ = ["class_grid", "grid_rows", "save_class_grid", "save_png", "to_pixels", "to_uint8_hwc"]


def to_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], zca=None) -> torch.Tensor:
    """Network input space -> pixels in [0, 1]: u = clamp(ZCA^-1(x) * std + mean, 0, 1)
    (:meth:`tesla.input_space.InputSpace.to_pixels` with these constants)."""
    return InputSpace(Normalization("", tuple(mean), tuple(std)), zca).to_pixels(images)


def to_uint8_hwc(pixels: torch.Tensor) -> np.ndarray:
    """C x H x W floats in [0, 1] -> H x W (x C) uint8 for PIL."""
    a = (pixels.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[2] == 1 else a


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an H x W (x C) uint8 array as a PNG file, all or nothing."""
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def grid_rows(num_classes: int, max_rows: int) -> list[int]:
    """The classes shown in a grid: all of them, or ``max_rows`` evenly spaced ones."""
    if num_classes <= max_rows:
        return list(range(num_classes))
    picks = torch.linspace(0, num_classes - 1, max_rows).round().long().tolist()
    return sorted(set(int(p) for p in picks))


def class_grid(
    images: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    zca=None,
    max_rows: int = 20,
    max_cols: int = 10,
    padding: int = 2,
) -> np.ndarray:
    """The class grid as an H x W (x C) uint8 array: one row per class (at most ``max_rows``
    classes, evenly spaced), at most ``max_cols`` images per row, in pixel space."""
    from torchvision.utils import make_grid

    classes = classes.detach().cpu()
    rows = grid_rows(num_classes, max_rows)
    per_row = [torch.nonzero(classes == c).flatten()[:max_cols] for c in rows]
    cols = max(1, max((len(r) for r in per_row), default=1))
    c, h, w = images.shape[1:]
    tiles = torch.zeros(len(rows) * cols, c, h, w)
    for r, idx in enumerate(per_row):
        if len(idx):
            tiles[r * cols : r * cols + len(idx)] = to_pixels(images[idx.to(images.device)], mean, std, zca)
    grid = make_grid(tiles, nrow=cols, padding=padding, pad_value=1.0)
    if c == 1:
        grid = grid[:1]
    return to_uint8_hwc(grid)


def save_class_grid(
    images: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    path: str | os.PathLike,
    mean: Sequence[float],
    std: Sequence[float],
    zca=None,
    **layout: int,
) -> Path:
    """The class grid (:func:`class_grid`; ``layout``: its ``max_rows``, ``max_cols``,
    ``padding``) as a PNG file, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(class_grid(images, classes, num_classes, mean, std, zca, **layout), path)
    return path
