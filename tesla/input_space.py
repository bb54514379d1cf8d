"""Network input space: how stored uint8 pixels become what a network sees.

For a pixel value u in 0..255 of channel c::

    x = T((u/255 - mean_c) / std_c),      T = ZCA: z -> W (z - mu),  or the identity.

The per-channel constants (mean_c, std_c) come from a named *normalisation*:

* ``split``: the training split's own statistics (its ``mean``/``std`` attributes); the
  default, and what every file written before normalisations had names means;
* ``none``: mean 0, std 1, i.e. pixels in [0, 1] (the published code's space for ZCA:
  it whitens ``ToTensor()`` pixels with no normalisation before or after);
* fixed published constants ``cifar10``, ``cifar100``, ``imagenet``, ``mnist``.

T is a ZCA transform fitted by ``tesla zca`` in one of these normalisations (the ZCA file
records which). An :class:`InputSpace` is the pair (normalisation, ZCA or none); it is the
one definition that experts, distillation (initial images), evaluation (synthetic set,
baselines, test split) and the image export/grids use, and :func:`input_space_key` names it
with a short stable key (``split``, ``cifar10``, ``none+zca-eps0.1``) that the workflow
uses to key expert folders: rows of a table that share inputs share experts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from tesla.data.format import denormalize, normalize
from tesla.errors import TeslaError

if TYPE_CHECKING:  # pragma: no cover
    from tesla.data import ImageSplit
    from tesla.zca import ZCA

__all__ = [
    "DEFAULT_NORMALIZATION",
    "NORMALIZATIONS",
    "PUBLISHED_CONSTANTS",
    "ZCA_CHUNK",
    "InputSpace",
    "Normalization",
    "check_normalization_name",
    "input_space_key",
    "open_input_space",
    "recorded_normalization",
    "resolve_normalization",
    "space_of_record",
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
#: images per matrix product when a split is mapped through ZCA
ZCA_CHUNK = 4096


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


@dataclass(frozen=True)
class InputSpace:
    """x = T((u/255 - mean_c)/std_c): a normalisation and an optional ZCA transform T."""

    normalization: Normalization
    zca: "ZCA | None" = None

    # -- identity ------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The normalisation's name (``split``, ``none``, ``cifar10``, ...)."""
        return self.normalization.name

    @property
    def mean(self) -> list[float]:
        return list(self.normalization.mean)

    @property
    def std(self) -> list[float]:
        return list(self.normalization.std)

    @property
    def key(self) -> str:
        """:func:`input_space_key` of this space."""
        return input_space_key(self.name, None if self.zca is None else self.zca.eps)

    def describe(self) -> str:
        zca = f", then ZCA (eps {self.zca.eps:g})" if self.zca is not None else ""
        return f"{self.normalization.describe()}{zca}"

    # -- pixels -> network input -------------------------------------------------------
    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """T in place, chunk by chunk: x <- W (x - mu) (identity without ZCA)."""
        if self.zca is None:
            return x
        return self.zca.apply_chunked(x, chunk=ZCA_CHUNK)

    def to_input(self, pixels: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 N x H x W x C pixels -> float32 N x C x H x W network input (on ``device``,
        default: where the pixels are): x = T((u/255 - mean)/std)."""
        u = torch.as_tensor(np.ascontiguousarray(pixels) if isinstance(pixels, np.ndarray) else pixels)
        if device is not None:
            u = u.to(device)
        return self.whiten(normalize(u, self.mean, self.std))

    def minibatch_transform(self, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map of :meth:`to_input` for uint8 minibatches already on ``device``, with the
        constants moved there once and a contiguous N x C x H x W result (a split kept on the
        device as uint8 takes a quarter of the memory of float32 images)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        zca = self.zca

        def transform(u: torch.Tensor) -> torch.Tensor:
            x = ((u.permute(0, 3, 1, 2).to(torch.float32).div_(255.0) - mean) / std).contiguous()
            return x if zca is None else zca.apply(x)

        return transform

    def load_split(self, split: "ImageSplit | str | os.PathLike", device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split in this space on ``device``: (float32 N x C x H x W, int64 N)."""
        from tesla.data import ImageSplit

        if not isinstance(split, ImageSplit):
            split = ImageSplit.open(split)
        x, y = split.load_tensors(device, mean=self.mean, std=self.std)
        return self.whiten(x), y

    # -- network input -> pixels --------------------------------------------------------
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse map for viewing: u = clamp(T^-1(x) * std + mean, 0, 1), float32 on the CPU."""
        x = x.detach().to(torch.float32)
        if self.zca is not None:
            x = self.zca.invert(x)
        return denormalize(x.cpu(), self.mean, self.std)


def _load_zca_for(split: "ImageSplit", zca_path: str | os.PathLike, option: str) -> "ZCA":
    """The ZCA file at ``zca_path``, refused unless it was fitted on ``split``'s images."""
    from tesla.zca import ZCA

    zca = ZCA.load(zca_path)
    shape = (split.channels, split.resolution, int(split.attrs["width"]))
    if tuple(zca.image_shape) != shape:
        raise TeslaError(
            f"{option} {zca_path}: fitted on images of shape {tuple(zca.image_shape)}, but {split.path} has {shape}; "
            f"give the zca.h5 fitted on this training split"
        )
    fitted_on = str(zca.meta.get("train_fingerprint", ""))
    if fitted_on and fitted_on != split.fingerprint:
        raise TeslaError(
            f"{option} {zca_path}: fitted on another training split (fingerprint {fitted_on[:12]}, {split.path} has "
            f"{split.fingerprint[:12]}); run 'tesla zca --train {split.path}' and give that file"
        )
    return zca


def open_input_space(
    split: "ImageSplit",
    normalize: str | None = None,
    zca_path: str | os.PathLike | None = None,
    *,
    option: str = "--normalize",
    zca_option: str = "--zca",
) -> InputSpace:
    """The input space a stage asks for on ``split`` (a training split).

    With a ZCA file the normalisation is the one the ZCA was fitted in (recorded in the
    file); a ``normalize`` that contradicts it is refused. Without, ``normalize`` (default
    ``split``).
    """
    if normalize is not None:
        check_normalization_name(normalize, option)
    if zca_path is None:
        return InputSpace(resolve_normalization(normalize or DEFAULT_NORMALIZATION, split, option))
    zca = _load_zca_for(split, zca_path, zca_option)
    fitted_in = zca.normalization
    if normalize is not None and normalize != fitted_in:
        raise TeslaError(
            f"{option} {normalize} contradicts {zca_option} {zca_path}, which was fitted in normalisation {fitted_in} "
            f"(the ZCA decides the input space); drop {option}, or fit a ZCA with 'tesla zca --normalize {normalize}'"
        )
    norm = resolve_normalization(fitted_in, split, f"{zca_option} {zca_path}: normalisation")
    recorded_mean, recorded_std = zca.meta.get("normalization_mean"), zca.meta.get("normalization_std")
    if recorded_mean is not None and not norm.has_constants(np.atleast_1d(recorded_mean), np.atleast_1d(recorded_std)):
        raise TeslaError(
            f"{zca_option} {zca_path}: fitted with mean {np.round(np.atleast_1d(recorded_mean), 4).tolist()}, std "
            f"{np.round(np.atleast_1d(recorded_std), 4).tolist()}, but {norm.describe()} here; give the zca.h5 fitted on {split.path}"
        )
    return InputSpace(norm, zca)


def space_of_record(name: str, mean: Sequence[float], std: Sequence[float], zca: Any, where: str | os.PathLike) -> InputSpace:
    """The input space recorded in a file (expert trajectory, synthetic set): its
    normalisation name and constants, and its ZCA transform (or None)."""
    return InputSpace(recorded_normalization(name, mean, std, where), zca)

