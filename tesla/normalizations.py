"""Named normalisations: z = (u/255 - mean_c) / std_c with per-channel constants, and the
short key of an input space; no torch at import (the workflow checks these names while it
builds the job graph).

The constants of a normalisation come from its name:

* ``split``: the training split's own statistics (its ``mean``/``std`` attributes); the
  default, and what every file written before normalisations had names means;
* ``none``: mean 0, std 1, i.e. pixels in [0, 1] (the published code's space for ZCA:
  it whitens ``ToTensor()`` pixels with no normalisation before or after);
* fixed published constants ``cifar10``, ``cifar100``, ``imagenet``, ``mnist``.

:mod:`tesla.input_space` follows a normalisation with an optional ZCA transform;
:func:`input_space_key` names that pair.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from tesla.errors import TeslaError

if TYPE_CHECKING:  # pragma: no cover
    from tesla.data import ImageSplit

__all__ = [
    "DEFAULT_NORMALIZATION",
    "NORMALIZATIONS",
    "PUBLISHED_CONSTANTS",
    "Normalization",
    "check_normalization_name",
    "input_space_key",
    "recorded_normalization",
    "resolve_normalization",
]

DEFAULT_NORMALIZATION = "split"
#: fixed per-channel (mean, std) of pixels in [0, 1] used by the published MTT/TESLA code
#: (facts about that code, PAPER.md sections 4 and 10; not computed here): CIFAR-10 and
#: ImageNet as PAPER.md gives them, MNIST as the published code sets it; ``cifar100`` is
#: CIFAR-100's own statistics, which the published code does NOT use: it normalises CIFAR-100
#: with the ``cifar10`` constants (config/config.yaml's cifar100 entry does the same).
PUBLISHED_CONSTANTS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
}
#: every normalisation name, the default first
NORMALIZATIONS: tuple[str, ...] = ("split", "none", *PUBLISHED_CONSTANTS)


@dataclass(frozen=True)
class Normalization:
    """z = (u/255 - mean_c) / std_c with per-channel constants; ``name`` says where they come from."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)

    def has_constants(self, mean: Sequence[float], std: Sequence[float]) -> bool:
        """Whether (mean, std) are this normalisation's constants (up to storage round-off)."""
        return _same(self.mean, mean) and _same(self.std, std)

    def describe(self) -> str:
        values = f"mean {[round(v, 4) for v in self.mean]}, std {[round(v, 4) for v in self.std]}"
        return f"normalisation {self.name} ({values})"


def check_normalization_name(name: str, option: str = "--normalize") -> str:
    """``name`` if it is a normalisation, else a TeslaError listing the valid names."""
    if name not in NORMALIZATIONS:
        raise TeslaError(
            f"{option} {name!r} is not a normalisation; choose one of {', '.join(NORMALIZATIONS)} "
            f"('split': the training split's own mean/std; 'none': pixels in [0, 1]; the others: the published constants)"
        )
    return name


def resolve_normalization(name: str, split: "ImageSplit", option: str = "--normalize") -> Normalization:
    """The constants of normalisation ``name`` for ``split`` (its own statistics for
    ``split``), refusing constants made for another number of channels."""
    check_normalization_name(name, option)
    c = split.channels
    if name == "split":
        return Normalization(name, tuple(split.mean), tuple(split.std))
    if name == "none":
        return Normalization(name, (0.0,) * c, (1.0,) * c)
    mean, std = PUBLISHED_CONSTANTS[name]
    if len(mean) != c:
        fitting = [n for n, (m, _) in PUBLISHED_CONSTANTS.items() if len(m) == c]
        raise TeslaError(
            f"{option} {name}: its constants are for {len(mean)}-channel images, but {split.path} has {c} "
            f"channel{'s' if c != 1 else ''}; choose split, none{''.join(', ' + n for n in fitting)}"
        )
    return Normalization(name, mean, std)


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-7, atol=1e-9))


def recorded_normalization(
    name: str, mean: Sequence[float], std: Sequence[float], where: str | os.PathLike
) -> Normalization:
    """The normalisation a file records (name and constants); a file whose constants
    contradict its fixed-constant name is refused (it was not written by tesla)."""
    check_normalization_name(name, f"{where}: normalisation")
    norm = Normalization(name, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    fixed = {**PUBLISHED_CONSTANTS, "none": ((0.0,) * len(mean), (1.0,) * len(mean))}.get(name)
    if fixed is not None and not Normalization(name, *fixed).has_constants(mean, std):
        raise TeslaError(
            f"{where}: records normalisation {name} with mean {list(mean)}, std {list(std)}, not its constants; "
            "the file is damaged"
        )
    return norm


def input_space_key(normalization: str, zca_eps: float | None = None) -> str:
    """The short, stable name of an input space: the normalisation name, plus
    ``+zca-eps<eps>`` when a ZCA transform (regulariser eps) follows it.

    ``split`` -> ``split``; ``cifar10`` -> ``cifar10``; ``none`` with ZCA eps 0.1 ->
    ``none+zca-eps0.1``. It depends on settings only (not on a fitted file), so a workflow
    can name expert folders before anything is fitted; the files themselves record the
    full ZCA fingerprint, which distillation checks.
    """
    check_normalization_name(normalization, "normalisation")
    if zca_eps is None:
        return normalization
    eps = float(zca_eps)
    if not (math.isfinite(eps) and eps > 0):
        raise TeslaError(f"ZCA eps must be positive (got {zca_eps!r}); the paper uses 0.1")
    return f"{normalization}+zca-eps{eps:g}"
