"""Network input space: how stored uint8 pixels become what a network sees.

For a pixel value u in 0..255 of channel c::

    x = T((u/255 - mean_c) / std_c),      T = ZCA: z -> W (z - mu),  or the identity.

The per-channel constants (mean_c, std_c) come from a named *normalisation*
(:mod:`tesla.normalizations`: ``split``, ``none``, or fixed published constants). T is a ZCA
transform (:mod:`tesla.zca`) fitted by ``tesla zca`` in one of these normalisations (the ZCA
file records which). An :class:`InputSpace` is the pair (normalisation, ZCA or none); it is the
one definition that experts, distillation (initial images), evaluation (synthetic set,
baselines, test split) and the image export/grids use, and
:func:`tesla.normalizations.input_space_key` names it with a short stable key (``split``,
``cifar10``, ``none+zca-eps0.1``) that the workflow uses to key expert folders: rows of a
table that share inputs share experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tesla.data import ImageSplit
from tesla.data.format import denormalize, normalize
from tesla.errors import TeslaError
from tesla.normalizations import (
    DEFAULT_NORMALIZATION,
    Normalization,
    check_normalization_name,
    input_space_key,
    recorded_normalization,
    resolve_normalization,
)
from tesla.zca import ZCA, zca_fingerprint

__all__ = [
    "ZCA_CHUNK",
    "InputSpace",
    "experts_input_space",
    "open_input_space",
    "space_of_record",
]

#: images per matrix product when a split is mapped through ZCA
ZCA_CHUNK = 4096


@dataclass(frozen=True)
class InputSpace:
    """x = T((u/255 - mean_c)/std_c): a normalisation and an optional ZCA transform T."""

    normalization: Normalization
    zca: ZCA | None = None

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

    def load_split(self, split: ImageSplit | str | os.PathLike, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split in this space on ``device``: (float32 N x C x H x W, int64 N)."""
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


def _load_zca_for(split: ImageSplit, zca_path: str | os.PathLike, option: str) -> ZCA:
    """The ZCA file at ``zca_path``, refused unless it was fitted on ``split``'s images."""
    zca = ZCA.load(zca_path)
    shape = (split.channels, split.resolution, int(split.attrs["width"]))
    zca.check_shape(shape, f"{option} {zca_path}", f"{split.path} has {shape}", "give the zca.h5 fitted on this training split")
    fitted_on = str(zca.meta.get("train_fingerprint", ""))
    if fitted_on and fitted_on != split.fingerprint:
        raise TeslaError(
            f"{option} {zca_path}: fitted on another training split (fingerprint {fitted_on[:12]}, {split.path} has "
            f"{split.fingerprint[:12]}); run 'tesla zca --train {split.path}' and give that file"
        )
    return zca


def open_input_space(
    split: ImageSplit,
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



def _experts_zca(experts: Sequence[Any], split: ImageSplit, zca_path: str | os.PathLike | None, option: str) -> ZCA | None:
    """The experts' ZCA transform, when they were trained with one: ``zca_path`` must be that
    file (its fingerprint), fitted on ``split`` (:func:`_load_zca_for`)."""
    fingerprint = experts[0].zca_fingerprint or ""
    if not zca_path:
        if fingerprint:
            raise TeslaError(
                f"{experts[0].path}: the experts were trained on ZCA-whitened images; give the same file with {option}"
            )
        return None
    if not fingerprint:
        raise TeslaError(f"{option} {zca_path}: the experts were trained without ZCA; drop {option} (or retrain the experts with it)")
    zca = _load_zca_for(split, zca_path, option)
    if zca_fingerprint(zca) != fingerprint:
        raise TeslaError(f"{option} {zca_path}: not the ZCA file the experts were trained with; give that file")
    return zca


def experts_input_space(
    experts: Sequence[Any], split: ImageSplit, zca_path: str | os.PathLike | None, *, zca_option: str = "--zca"
) -> InputSpace:
    """The input space expert trajectories (:class:`tesla.trajectories.Trajectory`) were
    trained in, on ``split``: every expert records the same normalisation (name and constants),
    which must be what that normalisation means for ``split``; with ZCA, ``zca_path`` must be
    the experts' file (:func:`_experts_zca`), fitted in that normalisation."""
    zca = _experts_zca(experts, split, zca_path, zca_option)
    first = experts[0]
    record = (first.input_normalization, first.input_mean, first.input_std)
    for traj in experts[1:]:
        other = (traj.input_normalization, traj.input_mean, traj.input_std)
        if other != record:
            raise TeslaError(
                f"{traj.path}: expert trained on inputs of normalisation {other[0]} (mean {other[1]}, std {other[2]}), "
                f"but {first.path} on normalisation {record[0]} (mean {record[1]}, std {record[2]}); give experts of one "
                "input space (trained with the same --normalize/--zca)"
            )
    expected = resolve_normalization(first.input_normalization, split, f"{first.path}: normalisation")
    mean, std = (record[1], record[2]) if record[1] else (expected.mean, expected.std)  # files that recorded none
    space = space_of_record(first.input_normalization, mean, std, zca, first.path)
    if not expected.has_constants(space.mean, space.std):
        raise TeslaError(
            f"{first.path}: expert inputs normalised with mean {space.mean}, std {space.std}, but normalisation "
            f"{space.name} of {split.path} is mean {list(expected.mean)}, std {list(expected.std)}; give experts trained on this split"
        )
    if zca is not None and zca.normalization != space.name:
        raise TeslaError(
            f"{zca_option} {zca_path}: fitted in normalisation {zca.normalization}, but the experts record {space.name}; "
            "give the ZCA file the experts were trained with"
        )
    return space
