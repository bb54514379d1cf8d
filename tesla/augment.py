"""Differentiable siamese augmentation (DSA): six families, sampled once, replayable.

A transform A is split into its *parameters* (sampled per image on the CPU from an explicit
``torch.Generator``, so a run is reproducible on any device) and its *application* to a
batch (on the batch's device, differentiable w.r.t. the images).  The same
:class:`AugParams` applied to another batch of the same shape gives the same transform
("siamese"): the distillation engines replay A_i in their forward and reverse passes.

Families (PAPER.md section 4), for an image x of C x H x W, per-sample parameters:

=========  ==============================================================================
color      brightness x <- x + b, b = u - 0.5;  saturation x <- m + (x - m) * 2u with m
           the per-pixel channel mean;  contrast x <- m + (x - m) * (u + 0.5) with m the
           image mean (three independent u ~ U[0, 1], applied in that order)
crop       translate by integer (dy, dx), each uniform in {-s .. s}, s = int(0.125 H + 0.5),
           zero padded
cutout     zero a square of side int(0.5 H + 0.5) centred at a uniform pixel (clipped at
           the border)
flip       mirror left-right with probability 0.5
scale      sample the input at (sx u, sy v) (u, v the normalised output coordinates,
           sx, sy ~ U[1/1.2, 1.2] independently), bilinear, zero padding
rotate     sample the input at R(a) (u, v), a ~ U[-15, 15] degrees, bilinear, zero padding
=========  ==============================================================================

A *strategy* names the families ``_``-joined (:mod:`tesla.dsa_strategy`).
``DSA(strategy, single_family=True)``: with ``single_family`` every call picks ONE family
of the strategy uniformly (as MTT and TESLA do); otherwise all families are applied in the
order written.  ``strategy='none'`` is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

from tesla.dsa_strategy import DEFAULT_STRATEGY, parse_strategy
from tesla.errors import TeslaError

__all__ = ["AugParams", "DSA", "crop_shift", "cutout_side"]

#: the ranges of PAPER.md section 4
BRIGHTNESS_RANGE = (-0.5, 0.5)
SATURATION_RANGE = (0.0, 2.0)
CONTRAST_RANGE = (0.5, 1.5)
CROP_RATIO = 0.125
CUTOUT_RATIO = 0.5
FLIP_PROBABILITY = 0.5
SCALE_RANGE = (1.0 / 1.2, 1.2)
ROTATE_DEGREES = 15.0


def crop_shift(size: int) -> int:
    """Largest crop translation s = int(0.125 * size + 0.5) pixels."""
    return int(CROP_RATIO * size + 0.5)


def cutout_side(size: int) -> int:
    """Cutout square side int(0.5 * size + 0.5) pixels."""
    return int(CUTOUT_RATIO * size + 0.5)


@dataclass
class AugParams:
    """Sampled parameters of one augmentation call: small per-sample tensors, no images.

    ``families``: the families applied, in order; ``values[family]``: that family's
    parameters (see :meth:`DSA.sample`); ``shape``: the N x C x H x W they were drawn for.
    """

    shape: tuple[int, int, int, int]
    families: tuple[str, ...] = ()
    values: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "AugParams":
        """The same parameters on ``device`` (a new object)."""
        return AugParams(
            self.shape,
            self.families,
            {fam: {k: v.to(device) for k, v in d.items()} for fam, d in self.values.items()},
        )

    @property
    def is_identity(self) -> bool:
        return not self.families

    def __repr__(self) -> str:
        return f"AugParams(shape={self.shape}, families={self.families})"


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


# --------------------------------------------------------------------------------------
# sampling, one function per family (CPU, float64 for exact ranges)
# --------------------------------------------------------------------------------------
def sample_color(shape, generator) -> dict[str, torch.Tensor]:
    n = shape[0]
    return {
        "brightness": _uniform(n, *BRIGHTNESS_RANGE, generator),
        "saturation": _uniform(n, *SATURATION_RANGE, generator),
        "contrast": _uniform(n, *CONTRAST_RANGE, generator),
    }


def sample_crop(shape, generator) -> dict[str, torch.Tensor]:
    n, _, h, w = shape
    sy, sx = crop_shift(h), crop_shift(w)
    return {
        "dy": torch.randint(-sy, sy + 1, (n,), generator=generator),
        "dx": torch.randint(-sx, sx + 1, (n,), generator=generator),
    }


def sample_cutout(shape, generator) -> dict[str, torch.Tensor]:
    n, _, h, w = shape
    return {
        "cy": torch.randint(0, h, (n,), generator=generator),
        "cx": torch.randint(0, w, (n,), generator=generator),
    }


def sample_flip(shape, generator) -> dict[str, torch.Tensor]:
    return {"flip": torch.rand(shape[0], generator=generator) < FLIP_PROBABILITY}


def sample_scale(shape, generator) -> dict[str, torch.Tensor]:
    n = shape[0]
    return {"sx": _uniform(n, *SCALE_RANGE, generator), "sy": _uniform(n, *SCALE_RANGE, generator)}


def sample_rotate(shape, generator) -> dict[str, torch.Tensor]:
    return {"degrees": _uniform(shape[0], -ROTATE_DEGREES, ROTATE_DEGREES, generator)}


# --------------------------------------------------------------------------------------
# application, one function per family (x's device and dtype, differentiable in x)
# --------------------------------------------------------------------------------------
def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def apply_color(x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Brightness x + b; saturation m + (x - m) s, m = channel mean per pixel; contrast
    m + (x - m) c, m = mean over the image."""
    x = x + _per_sample(p["brightness"], x)
    m = x.mean(dim=1, keepdim=True)
    x = m + (x - m) * _per_sample(p["saturation"], x)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return m + (x - m) * _per_sample(p["contrast"], x)


def apply_crop(x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """y[i, j] = x[i - dy, j - dx], zero where that falls outside the image."""
    n, c, h, w = x.shape
    dy = p["dy"].to(x.device).view(n, 1, 1)
    dx = p["dx"].to(x.device).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # advanced indexing puts the channel axis last: (N, H, W, C)
    moved = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1), cols.clamp(0, w - 1)]
    return moved.permute(0, 3, 1, 2) * inside.unsqueeze(1).to(x.dtype)


def apply_cutout(x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Zero the side x side square with top-left (cy - side//2, cx - side//2), clipped."""
    n, _, h, w = x.shape
    side_h, side_w = cutout_side(h), cutout_side(w)
    top = (p["cy"].to(x.device) - side_h // 2).view(n, 1, 1)
    left = (p["cx"].to(x.device) - side_w // 2).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def apply_flip(x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mirror left-right the images whose flag is set."""
    flip = p["flip"].to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def apply_scale(x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sample x at (sx u, sy v): theta = [[sx, 0, 0], [0, sy, 0]]."""
    sx = p["sx"].to(device=x.device, dtype=x.dtype)
    sy = p["sy"].to(device=x.device, dtype=x.dtype)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def apply_rotate(x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sample x at R(a)(u, v): theta = [[cos a, -sin a, 0], [sin a, cos a, 0]]."""
    a = p["degrees"].to(device=x.device, dtype=x.dtype) * (math.pi / 180.0)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_SAMPLE = {
    "color": sample_color,
    "crop": sample_crop,
    "cutout": sample_cutout,
    "flip": sample_flip,
    "scale": sample_scale,
    "rotate": sample_rotate,
}
_APPLY = {
    "color": apply_color,
    "crop": apply_crop,
    "cutout": apply_cutout,
    "flip": apply_flip,
    "scale": apply_scale,
    "rotate": apply_rotate,
}


class DSA:
    """Differentiable siamese augmentation.

    >>> dsa = DSA("color_crop_cutout_flip_scale_rotate")
    >>> g = torch.Generator().manual_seed(0)
    >>> x_aug, params = dsa(x, g)          # sample on the CPU, apply on x.device
    >>> same = dsa.apply(other_x, params)  # the identical transform on another batch
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, single_family: bool = True) -> None:
        self.families = parse_strategy(strategy)
        self.strategy = "_".join(self.families) if self.families else "none"
        self.single_family = bool(single_family)

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r}, single_family={self.single_family})"

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> AugParams:
        """Draw the parameters for a batch of ``shape`` (N, C, H, W) on the CPU.

        With ``single_family`` one family index k ~ U{0 .. F-1} is drawn first, then that
        family's per-sample parameters; otherwise every family's, in strategy order.
        ``generator`` must be a CPU generator (``None``: torch's global one).
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise TeslaError(f"DSA works on N x C x H x W batches, got shape {shape}")
        if generator is not None and generator.device.type != "cpu":
            raise TeslaError("DSA samples its parameters on the CPU: pass a CPU torch.Generator (torch.Generator())")
        if not self.families:
            return AugParams(shape)
        if self.single_family:
            k = int(torch.randint(len(self.families), (1,), generator=generator))
            chosen: tuple[str, ...] = (self.families[k],)
        else:
            chosen = self.families
        return AugParams(shape, chosen, {fam: _SAMPLE[fam](shape, generator) for fam in chosen})

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply sampled parameters to ``x`` (same shape), on x's device, differentiably."""
        if tuple(x.shape) != tuple(params.shape):
            raise TeslaError(
                f"DSA parameters were sampled for a batch of shape {tuple(params.shape)}, "
                f"cannot replay them on shape {tuple(x.shape)}"
            )
        for fam in params.families:
            x = _APPLY[fam](x, params.values[fam])
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, AugParams]:
        """Sample fresh parameters for ``x`` and apply them: (A(x), params)."""
        params = self.sample(x.shape, generator)
        return self.apply(x, params), params
